//! What the drop-in programs `ivshmem-server` and `ivshmem-client` share: QEMU's `getopt(3)`
//! command-line handling and their logging set-up.

pub mod getopt;

/// Installs the `tracing` subscriber on stderr: `RUST_LOG` if set, else `default_level`.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
