//! POSIX `getopt(3)` as QEMU's `ivshmem-server` and `ivshmem-client` use it (glibc, permuting):
//! options may come in clusters (`-vF`), an option's value is the rest of its word (`-l4M`) or
//! the next word (`-l 4M`, even if that word starts with `-`), `--` ends the options, and
//! operands (words not starting with `-`, and a lone `-`) are skipped wherever they are.
//!
//! Options come out one at a time, in command-line order, so a program acts on them in the
//! order QEMU's would (e.g. `-h` before a later bad option prints the help). After an error the
//! iterator ends.

use std::fmt;

/// An option that `getopt` rejects, with glibc's wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetoptError {
    /// A letter not in the option string.
    Invalid(char),
    /// An option that takes a value came last, without one.
    MissingArgument(char),
}

impl fmt::Display for GetoptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GetoptError::Invalid(c) => write!(f, "invalid option -- '{c}'"),
            GetoptError::MissingArgument(c) => write!(f, "option requires an argument -- '{c}'"),
        }
    }
}

/// The options of a command line, per an option string such as `"hvS:"` (a letter followed by
/// `:` takes a value).
#[derive(Debug)]
pub struct Getopt<'a> {
    args: &'a [String],
    spec: &'a str,
    /// The next word to look at.
    next: usize,
    /// The rest of the cluster being read (after the letters already handed out).
    cluster: &'a str,
    done: bool,
}

impl<'a> Getopt<'a> {
    /// Options of `args` (without the program name) according to `spec`.
    pub fn new(args: &'a [String], spec: &'a str) -> Self {
        Getopt {
            args,
            spec,
            next: 0,
            cluster: "",
            done: false,
        }
    }

    /// Whether `c` is an option, and whether it takes a value.
    fn takes_value(&self, c: char) -> Option<bool> {
        let at = self.spec.find(c).filter(|_| c != ':')?;
        Some(self.spec[at + c.len_utf8()..].starts_with(':'))
    }

    /// Moves to the next word that starts an option cluster; false at the end or after `--`.
    fn next_cluster(&mut self) -> bool {
        while let Some(word) = self.args.get(self.next) {
            self.next += 1;
            if word == "--" {
                return false;
            }
            if let Some(cluster) = word.strip_prefix('-').filter(|c| !c.is_empty()) {
                self.cluster = cluster;
                return true;
            }
        }
        false
    }
}

impl Iterator for Getopt<'_> {
    /// An option letter and its value (for options that take one).
    type Item = Result<(char, Option<String>), GetoptError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || (self.cluster.is_empty() && !self.next_cluster()) {
            self.done = true;
            return None;
        }
        let mut chars = self.cluster.chars();
        let c = chars.next()?;
        self.cluster = chars.as_str();
        let item = match self.takes_value(c) {
            None => Err(GetoptError::Invalid(c)),
            Some(false) => Ok((c, None)),
            Some(true) if !self.cluster.is_empty() => {
                let value = std::mem::take(&mut self.cluster).to_string();
                Ok((c, Some(value)))
            }
            Some(true) => match self.args.get(self.next) {
                Some(value) => {
                    self.next += 1;
                    Ok((c, Some(value.clone())))
                }
                None => Err(GetoptError::MissingArgument(c)),
            },
        };
        self.done = item.is_err();
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn opts(args: &[&str], spec: &str) -> Vec<Result<(char, Option<String>), GetoptError>> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Getopt::new(&args, spec).collect()
    }

    fn ok(c: char, v: Option<&str>) -> Result<(char, Option<String>), GetoptError> {
        Ok((c, v.map(str::to_string)))
    }

    #[test]
    fn clusters_values_operands_and_double_dash() {
        assert_eq!(
            opts(
                &["-vF", "junk", "-l4M", "-", "-S", "-v", "--", "-n", "2"],
                "hvFl:S:n:"
            ),
            vec![
                ok('v', None),
                ok('F', None),
                ok('l', Some("4M")),
                ok('S', Some("-v")),
            ]
        );
        assert_eq!(
            opts(&["-vl", "8"], "vl:"),
            vec![ok('v', None), ok('l', Some("8"))]
        );
        assert_eq!(opts(&[], "v"), vec![]);
    }

    #[test]
    fn errors_end_the_options_with_glibcs_words() {
        assert_eq!(
            opts(&["-v", "-x", "-v"], "v"),
            vec![ok('v', None), Err(GetoptError::Invalid('x'))]
        );
        assert_eq!(
            opts(&["-l"], "l:"),
            vec![Err(GetoptError::MissingArgument('l'))]
        );
        assert_eq!(
            GetoptError::Invalid('x').to_string(),
            "invalid option -- 'x'"
        );
        assert_eq!(
            GetoptError::MissingArgument('l').to_string(),
            "option requires an argument -- 'l'"
        );
        // ':' is never an option letter.
        assert_eq!(opts(&["-:"], "l:"), vec![Err(GetoptError::Invalid(':'))]);
    }

    proptest! {
        #[test]
        fn never_panics_and_stops_after_an_error(
            args in prop::collection::vec("-?-?[a-zA-Z0-9:é-]{0,5}", 0..8)
        ) {
            let all: Vec<_> = Getopt::new(&args, "hvFp:S:m:M:l:n:").collect();
            if let Some(at) = all.iter().position(Result::is_err) {
                prop_assert_eq!(at, all.len() - 1);
            }
        }
    }
}
