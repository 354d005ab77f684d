//! The `ivshm` command line: its flags and subcommands ([`Cli`]) and the dispatch to the
//! subcommands' modules. In the library so that tests can walk the whole command tree
//! (`Cli::command()`), as the flag-value sweep in `tests/flag_values.rs` does.

use clap::{CommandFactory, Parser, Subcommand};

use crate::cmd;

/// `ivshm`'s command line.
#[derive(Parser, Debug)]
#[command(
    name = "ivshm",
    version,
    about = "Inter-VM shared memory: server, host peer and guest tools"
)]
pub struct Cli {
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `ivshm`'s subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server in the foreground.
    Serve(cmd::serve::ServeArgs),
    /// Host peer commands.
    #[command(flatten)]
    Host(cmd::host::HostCommand),
    /// Message channels over the region, as a host peer (`ivshm guest chan` in a guest).
    #[command(subcommand)]
    Chan(cmd::chan::ChanCommand),
    /// Carry the TCP or unix connections of an address over a channel of the region to a bridge
    /// on the other side (a VM's `ivshm guest bridge`, or another host program).
    Bridge(cmd::bridge::HostBridgeArgs),
    /// Benchmarks that compare variants in one run.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// Inside a Linux guest: find ivshmem devices, map them, ring and receive doorbells.
    #[command(subcommand)]
    Guest(cmd::guest::GuestCommand),
    /// Check region-access policy offline.
    #[command(subcommand)]
    Policy(cmd::policy::PolicyCommand),
    /// Control socket commands.
    #[command(flatten)]
    Control(cmd::control::ControlCommand),
    /// Check a libvirt domain's `<shmem>` devices against the running server (paths,
    /// permissions of libvirt's QEMU user, `<msi vectors>`, model, size) before virsh start.
    Doctor(cmd::doctor::DoctorArgs),
    /// Write man pages or shell completions made from this program's flags (for packagers).
    #[command(subcommand, hide = true)]
    Generate(cmd::generate::GenerateCommand),
}

impl Cli {
    /// Checks what clap cannot express (a flag that applies only with a certain value of
    /// another), as a usage error: exit status 2 and clap's message, like every other bad
    /// combination of flags.
    pub fn check(&self) -> Result<(), clap::Error> {
        if let Command::Serve(args) = &self.command {
            if let Some(message) = args.backend_mismatch() {
                let mut command = Cli::command();
                command.build();
                let mut serve = command
                    .find_subcommand_mut("serve")
                    .map(std::mem::take)
                    .unwrap_or_default();
                return Err(serve.error(clap::error::ErrorKind::ArgumentConflict, message));
            }
        }
        Ok(())
    }

    /// The log level without `-v` or `RUST_LOG`: benchmarks run a server in-process, whose
    /// info lines would bury the figures.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Bench(_) => "warn",
            _ => "info",
        }
    }

    /// The log level `-v`/`-vv` ask for (debug, trace), else [`Cli::default_log_level`].
    pub fn log_level(&self) -> &'static str {
        match self.verbose {
            0 => self.default_log_level(),
            1 => "debug",
            _ => "trace",
        }
    }

    /// Runs the subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Serve(args) => cmd::serve::run(&args),
            Command::Host(c) => cmd::host::run(c),
            Command::Chan(c) => cmd::chan::run(c),
            Command::Bridge(a) => cmd::bridge::run(&a),
            Command::Bench(c) => cmd::bench::run(c),
            Command::Guest(c) => cmd::guest::run(c),
            Command::Policy(c) => cmd::policy::run(c),
            Command::Control(c) => cmd::control::run(c),
            Command::Doctor(args) => cmd::doctor::run(&args),
            Command::Generate(c) => cmd::generate::run(c, Cli::command()),
        }
    }
}
