//! The common vdev option `log FILTER[,FILTER...] DESTINATION`: which severities of the vdev's
//! messages go where, overriding the VM's global logging for this vdev. Its argument is two
//! words: a comma-separated list of severities (`fatal`, `internal`, `error`, `warning`, `info`,
//! `debug`, `verbose`) and a destination (`stdout`, `stderr`, `slog`, `none`). The option may be
//! repeated; for a severity named twice the later option wins.

use std::fmt;

use thiserror::Error;

/// A message severity, as qvm names them (most severe first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LogSeverity {
    /// `fatal`
    Fatal,
    /// `internal`
    Internal,
    /// `error`
    Error,
    /// `warning`
    Warning,
    /// `info`
    Info,
    /// `debug`
    Debug,
    /// `verbose`
    Verbose,
}

impl LogSeverity {
    /// Every severity, most severe first.
    pub const ALL: [Self; 7] = [
        Self::Fatal,
        Self::Internal,
        Self::Error,
        Self::Warning,
        Self::Info,
        Self::Debug,
        Self::Verbose,
    ];

    /// The keyword.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Fatal => "fatal",
            Self::Internal => "internal",
            Self::Error => "error",
            Self::Warning => "warning",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Verbose => "verbose",
        }
    }
}

/// Where messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogDestination {
    /// `stdout`
    Stdout,
    /// `stderr`
    Stderr,
    /// `slog` (QNX's system logger; the journal or syslog on Linux)
    Slog,
    /// `none`: not output.
    None,
}

impl LogDestination {
    /// The keyword.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Slog => "slog",
            Self::None => "none",
        }
    }
}

/// Why a `log` argument is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum LogError {
    /// unknown severity {0:?}: use fatal, internal, error, warning, info, debug or verbose,
    /// separated by commas
    ///
    /// A severity that is not one of qvm's.
    Severity(String),
    /// unknown destination {0:?}: use stdout, stderr, slog or none
    ///
    /// A destination that is not one of qvm's.
    Destination(String),
}

/// One `log` option.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LogOption {
    /// The severities it sets, in the order written (at least one).
    pub severities: Vec<LogSeverity>,
    /// Where they go.
    pub destination: LogDestination,
}

impl LogOption {
    /// Parses the option's two words.
    pub fn parse(filters: &str, destination: &str) -> Result<Self, LogError> {
        let severities = filters
            .split(',')
            .map(|word| {
                LogSeverity::ALL
                    .into_iter()
                    .find(|s| s.as_str() == word)
                    .ok_or_else(|| LogError::Severity(word.to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let destination = [
            LogDestination::Stdout,
            LogDestination::Stderr,
            LogDestination::Slog,
            LogDestination::None,
        ]
        .into_iter()
        .find(|d| d.as_str() == destination)
        .ok_or_else(|| LogError::Destination(destination.to_owned()))?;
        Ok(Self {
            severities,
            destination,
        })
    }

    /// Where messages of `severity` go after `options` (the last option naming it wins), if any
    /// option names it.
    pub fn destination_of(options: &[LogOption], severity: LogSeverity) -> Option<LogDestination> {
        options
            .iter()
            .rev()
            .find(|o| o.severities.contains(&severity))
            .map(|o| o.destination)
    }
}

/// Prints the option's two words, `error,warning stderr`.
impl fmt::Display for LogOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let filters: Vec<&str> = self.severities.iter().map(|s| s.as_str()).collect();
        write!(f, "{} {}", filters.join(","), self.destination.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_filters_and_destination() {
        let option = LogOption::parse("fatal,error,warning", "stderr").unwrap();
        assert_eq!(
            option.severities,
            [LogSeverity::Fatal, LogSeverity::Error, LogSeverity::Warning]
        );
        assert_eq!(option.destination, LogDestination::Stderr);
        assert_eq!(option.to_string(), "fatal,error,warning stderr");
        assert_eq!(
            LogOption::parse("info", "slog").unwrap().destination,
            LogDestination::Slog
        );
    }

    #[test]
    fn rejects_unknown_words() {
        assert_eq!(
            LogOption::parse("error,loud", "stderr"),
            Err(LogError::Severity("loud".into()))
        );
        assert_eq!(
            LogOption::parse("error,", "stderr"),
            Err(LogError::Severity(String::new()))
        );
        assert_eq!(
            LogOption::parse("error", "file"),
            Err(LogError::Destination("file".into()))
        );
    }

    #[test]
    fn the_later_option_wins() {
        let options = [
            LogOption::parse("fatal,warning", "stderr").unwrap(),
            LogOption::parse("warning", "none").unwrap(),
        ];
        assert_eq!(
            LogOption::destination_of(&options, LogSeverity::Warning),
            Some(LogDestination::None)
        );
        assert_eq!(
            LogOption::destination_of(&options, LogSeverity::Fatal),
            Some(LogDestination::Stderr)
        );
        assert_eq!(LogOption::destination_of(&options, LogSeverity::Info), None);
    }
}
