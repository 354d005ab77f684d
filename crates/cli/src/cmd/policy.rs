//! `ivshm policy` subcommands (placeholder until implemented).

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Placeholder.
    #[command(name = "policy-placeholder", hide = true)]
    Placeholder,
}

pub fn run(_c: PolicyCommand) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
