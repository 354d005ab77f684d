//! How the programs word an error for the user: its message and its causes on one line, each
//! said once, never a backtrace (anyhow captures one when `RUST_BACKTRACE` or
//! `RUST_LIB_BACKTRACE` is set; only its `Debug` form prints it).

/// `error`'s message, then each cause's after `": "`, skipping a cause whose text the line
/// already holds. The workspace's own errors never return a source (their messages carry the
/// cause: docs/development.md, "House rules"); a third-party error that writes its source into
/// its message and also returns it from `source()` would otherwise say it twice, as `{:#}`
/// does.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    /// An error that writes its source into its message and returns it from `source()`.
    #[derive(Debug)]
    struct Embeds {
        source: std::io::Error,
    }

    impl std::fmt::Display for Embeds {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "region r: {}", self.source)
        }
    }

    impl std::error::Error for Embeds {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = || std::io::Error::other("disk full");
        let embedded: anyhow::Result<()> = Err(Embeds { source: io() }.into());
        let error = embedded.context("starting the server").unwrap_err();
        assert_eq!(
            format!("{error:#}"),
            "starting the server: region r: disk full: disk full"
        );
        assert_eq!(one_line(&error), "starting the server: region r: disk full");
        let plain: anyhow::Result<()> = Err(io().into());
        let error = plain.context("reading x").unwrap_err();
        assert_eq!(one_line(&error), "reading x: disk full");
    }
}
