//! `ivshm guest` subcommands (placeholder until implemented).

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum GuestCommand {
    /// Placeholder.
    #[command(name = "guest-placeholder", hide = true)]
    Placeholder,
}

pub fn run(_c: GuestCommand) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
