//! The code of the `ivshm`, `ivshmem-server` and `ivshmem-client` programs, as one library
//! the three binaries link: [`cli`] (`ivshm`'s command line), [`cmd`] (the `ivshm` subcommands), [`args`] (value parsers their
//! flags share), [`dropin`] (what the QEMU drop-ins share) and [`logging`] (one `tracing`
//! set-up for all three). It is not a public
//! API: its items serve the binaries and their tests (the crate is published so that
//! `cargo install ivshm-cli` installs the programs).

pub mod args;
pub mod cli;
pub mod cmd;
pub mod dropin;
pub mod logging;
pub mod report;
