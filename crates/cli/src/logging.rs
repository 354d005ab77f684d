//! Logging set-up shared by all binaries: `tracing` to stderr, level from `-v` or `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `verbose` counts `-v` flags (0 = `quiet_level`, which is
/// `info` for most commands; benchmarks pass `warn` so the in-process server's join and leave
/// lines do not clutter their figures).
pub fn init(verbose: u8, quiet_level: &str) {
    let default = match verbose {
        0 => quiet_level,
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
