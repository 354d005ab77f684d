//! `ivshm`: the main command-line program.
//!
//! Its command line ([`ivshm_cli::cli::Cli`]) and each group of subcommands live in the crate's
//! library; this file parses, sets up logging and prints the error, if any.

use std::process::ExitCode;

use clap::Parser;
use ivshm_cli::cli::Cli;
use ivshm_cli::{logging, report};

/// Runs the command; an error is printed as its message and its causes on one line
/// ([`report::one_line`]), never with the backtrace anyhow captures when `RUST_BACKTRACE` or
/// `RUST_LIB_BACKTRACE` is set: these are the user's errors (a bad file, a server that is
/// not there), not the program's.
fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = cli.check() {
        error.exit();
    }
    logging::init(cli.log_level());
    match cli.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", report::one_line(&error));
            ExitCode::FAILURE
        }
    }
}
