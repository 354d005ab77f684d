//! `ivshm`: the main command-line program.
//!
//! Each group of subcommands lives in its own module of the crate's library (`ivshm_cli::cmd`),
//! which owns its clap argument types and its `run` function; this file only dispatches.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use ivshm_cli::{cmd, logging};

#[derive(Parser, Debug)]
#[command(
    name = "ivshm",
    version,
    about = "Inter-VM shared memory: server, host peer and guest tools"
)]
struct Cli {
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server in the foreground.
    Serve(cmd::serve::ServeArgs),
    #[command(flatten)]
    Host(cmd::host::HostCommand),
    /// Benchmarks that compare variants in one run.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// Inside a Linux guest: find ivshmem devices, map them, ring and receive doorbells.
    #[command(subcommand)]
    Guest(cmd::guest::GuestCommand),
    /// Check region-access policy offline.
    #[command(subcommand)]
    Policy(cmd::policy::PolicyCommand),
    #[command(flatten)]
    Control(cmd::control::ControlCommand),
    /// Check a libvirt domain's `<shmem>` devices against the running server (paths,
    /// permissions of libvirt's QEMU user, `<msi vectors>`, model, size) before virsh start.
    Doctor(cmd::doctor::DoctorArgs),
    /// Write man pages or shell completions made from this program's flags (for packagers).
    #[command(subcommand, hide = true)]
    Generate(cmd::generate::GenerateCommand),
}

/// Runs the command; an error is printed as its message and its causes on one line
/// (`{:#}`), never with the backtrace anyhow captures when `RUST_BACKTRACE` or
/// `RUST_LIB_BACKTRACE` is set: these are the user's errors (a bad file, a server that is
/// not there), not the program's.
fn main() -> ExitCode {
    let cli = Cli::parse();
    // Benchmarks run a server in-process: its info lines would bury the figures.
    let quiet_level = match cli.command {
        Command::Bench(_) => "warn",
        _ => "info",
    };
    // -v debug, -vv trace.
    logging::init(match cli.verbose {
        0 => quiet_level,
        1 => "debug",
        _ => "trace",
    });
    let result = match cli.command {
        Command::Serve(args) => cmd::serve::run(args),
        Command::Host(c) => cmd::host::run(c),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Guest(c) => cmd::guest::run(c),
        Command::Policy(c) => cmd::policy::run(c),
        Command::Control(c) => cmd::control::run(c),
        Command::Doctor(args) => cmd::doctor::run(args),
        Command::Generate(c) => cmd::generate::run(c, Cli::command()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
