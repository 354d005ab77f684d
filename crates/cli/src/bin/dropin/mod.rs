//! What the drop-in programs `ivshmem-server` and `ivshmem-client` share: QEMU's `getopt(3)`
//! command-line handling and their logging set-up.

pub mod getopt;

#[path = "../../logging.rs"]
mod logging;

/// Installs the `tracing` subscriber on stderr: `RUST_LOG` if set, else `default_level`.
pub fn init_logging(default_level: &str) {
    logging::init(default_level);
}
