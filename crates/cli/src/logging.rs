//! Logging set-up shared by all binaries (`ivshm` and the drop-in programs): `tracing` to
//! stderr, `RUST_LOG` if set, else the level the program asks for; colours only on a terminal.
//!
//! Under systemd, when stderr is the journal (`$JOURNAL_STREAM` names stderr's device and
//! inode, as `systemd.exec(5)` says to check), lines carry no timestamps and no colours: the
//! journal stamps every line itself. Each line starts with its syslog priority as
//! `sd-daemon(3)` defines the prefix (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug),
//! which journald takes off and records, so `journalctl -p warning -u ivshm` shows the
//! refusals, drops and warnings alone.

use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The variable systemd sets to `<device>:<inode>` of the journal stream it connected.
const JOURNAL_STREAM_ENV: &str = "JOURNAL_STREAM";

/// Installs the global subscriber with `default_level` unless `RUST_LOG` says otherwise.
pub fn init(default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if stderr_is_journal() {
        let format = tracing_subscriber::fmt::format()
            .with_ansi(false)
            .without_time();
        builder
            .with_ansi(false)
            .event_format(JournalPriority(format))
            .try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}

/// The `sd-daemon(3)` priority prefix of a line at `level`.
fn priority_prefix(level: Level) -> &'static str {
    match level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        Level::DEBUG | Level::TRACE => "<7>",
    }
}

/// An event format that puts the journal's priority prefix before each line of `F`.
struct JournalPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for JournalPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        writer.write_str(priority_prefix(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Whether stderr is the stream `$JOURNAL_STREAM` names.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os(JOURNAL_STREAM_ENV) else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    journal_stream_matches(&value.to_string_lossy(), stat.st_dev, stat.st_ino)
}

/// Whether a `$JOURNAL_STREAM` value (`<device>:<inode>`, decimal) names `dev`/`ino`.
fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_value_is_device_colon_inode() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(!journal_stream_matches("8:12345", 8, 1));
        assert!(!journal_stream_matches("9:12345", 8, 12345));
        assert!(!journal_stream_matches("", 8, 12345));
        assert!(!journal_stream_matches("8", 8, 12345));
        assert!(!journal_stream_matches("x:y", 8, 12345));
    }
}
