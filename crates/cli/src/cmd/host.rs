//! `ivshm host` subcommands (placeholder until implemented).

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// Placeholder.
    #[command(name = "host-placeholder", hide = true)]
    Placeholder,
}

pub fn run(_c: HostCommand) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
