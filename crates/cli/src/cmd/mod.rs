//! One module per group of subcommands.

pub mod bench;
pub mod bench_bridge;
pub mod bench_channel;
pub mod bridge;
pub mod chan;
pub mod control;
pub mod doctor;
pub mod generate;
pub mod guest;
pub mod guest_chan;
pub mod host;
pub mod policy;
pub mod serve;
