//! `ivshm bench` subcommands (placeholder until implemented).

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Placeholder.
    #[command(name = "bench-placeholder", hide = true)]
    Placeholder,
}

pub fn run(_c: BenchCommand) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
