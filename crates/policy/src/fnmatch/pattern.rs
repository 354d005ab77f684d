//! [`Pattern`]: a checked `fnpattern` as written after `allow` / `deny`.

use std::fmt;

use thiserror::Error;

/// Longest accepted pattern, in bytes. Region names are at most 31 bytes; patterns get room for
/// bracket expressions but stay small enough to print in one line.
pub const MAX_PATTERN_LEN: usize = 255;

/// Why a string is not accepted as an `allow`/`deny` pattern.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum PatternError {
    /// empty pattern
    ///
    /// The pattern is empty (it could only match the empty name, which is never legal).
    Empty,
    /// pattern is {len} bytes long, the limit is {MAX_PATTERN_LEN:}
    ///
    /// The pattern is longer than [`MAX_PATTERN_LEN`] bytes.
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// pattern contains {byte:?}, which cannot appear in an option argument
    ///
    /// The pattern contains a byte that cannot appear in a `vdev shmem` option argument: NUL, a
    /// control character, whitespace or `#` (which starts a comment in a qvm configuration).
    ForbiddenByte {
        /// The offending character.
        byte: char,
    },
    /// pattern ends with a lone backslash and would never match
    ///
    /// The pattern ends in a lone `\`, which makes `fnmatch` fail for every name.
    TrailingBackslash,
    /// pattern can never match: it needs a literal {byte:?} ({written}), and region names only
    /// contain A-Z a-z 0-9 _ . + -{hint}
    ///
    /// The pattern has no bracket expression and a literal byte no region name contains
    /// (see [`crate::name`]), so it can never match. Typically `\*` copied from a shell
    /// command line, where QNX's documentation escapes the star to get it through the shell.
    NeverMatches {
        /// The literal byte.
        byte: char,
        /// How it was written.
        written: Written,
        /// Advice for an escaped wildcard.
        hint: WildcardHint,
    },
}

/// How a pattern wrote a literal byte, as [`PatternError::NeverMatches`] says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Bare (`:`).
    AsIs,
    /// After a backslash (`\:`).
    Escaped,
}

impl std::fmt::Display for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AsIs => "written as is",
            Self::Escaped => "escaped with a backslash",
        })
    }
}

/// What [`PatternError::NeverMatches`] advises after its reason: for an escaped wildcard
/// (`\*`, `\?`, typically copied from a shell command line), to write it bare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WildcardHint {
    /// Nothing to add (its `Display` is empty).
    None,
    /// The literal is an escaped `*` or `?`.
    WriteBare,
}

impl WildcardHint {
    /// The hint for `byte` written as `written`.
    pub fn new(byte: char, written: Written) -> Self {
        if written == Written::Escaped && matches!(byte, '*' | '?') {
            Self::WriteBare
        } else {
            Self::None
        }
    }
}

impl std::fmt::Display for WildcardHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => Ok(()),
            Self::WriteBare => f.write_str(
                "; the backslash is only needed on a shell command line: write the wildcard bare",
            ),
        }
    }
}

/// A shell wildcard pattern (`fnpattern`), checked to be printable as one configuration token.
///
/// Any such string is a valid `fnmatch` pattern; the checks only reject what cannot be written in
/// a qvm configuration or can never match (see [`PatternError`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pattern(String);

impl Pattern {
    /// Checks `text` and wraps it.
    pub fn new(text: &str) -> Result<Self, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.len() > MAX_PATTERN_LEN {
            return Err(PatternError::TooLong { len: text.len() });
        }
        if let Some(byte) = text
            .chars()
            .find(|&c| c.is_control() || c.is_whitespace() || c == '#')
        {
            return Err(PatternError::ForbiddenByte { byte });
        }
        if ends_with_lone_backslash(text.as_bytes()) {
            return Err(PatternError::TrailingBackslash);
        }
        if let Some((byte, escaped)) = impossible_literal(text.as_bytes()) {
            let written = if escaped {
                Written::Escaped
            } else {
                Written::AsIs
            };
            return Err(PatternError::NeverMatches {
                byte,
                written,
                hint: WildcardHint::new(byte, written),
            });
        }
        Ok(Self(text.to_owned()))
    }

    /// The pattern text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` matches this pattern (`fnmatch(pattern, name, 0) == 0`).
    pub fn matches(&self, name: &str) -> bool {
        super::fnmatch(&self.0, name)
    }
}

/// In a pattern without bracket expressions (no `[` at all, so every byte is a literal, an
/// escaped literal, `*` or `?`), the first literal that no region name can contain, and whether
/// it was escaped. Patterns with a `[` are not judged: a bracket expression may still match.
fn impossible_literal(bytes: &[u8]) -> Option<(char, bool)> {
    if bytes.contains(&b'[') {
        return None;
    }
    let mut rest = bytes;
    while let Some((&byte, after)) = rest.split_first() {
        let (literal, escaped, after) = match byte {
            b'*' | b'?' => {
                rest = after;
                continue;
            }
            b'\\' => match after.split_first() {
                Some((&escaped, after)) => (escaped, true, after),
                None => return None,
            },
            _ => (byte, false, after),
        };
        if !crate::name::is_name_byte(literal) {
            return Some((char::from(literal), escaped));
        }
        rest = after;
    }
    None
}

/// Whether the text ends in an odd run of backslashes (the last one escapes nothing).
fn ends_with_lone_backslash(bytes: &[u8]) -> bool {
    let run = bytes.iter().rev().take_while(|&&b| b == b'\\').count();
    run % 2 == 1
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Pattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for Pattern {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::new(&text).map_err(serde::de::Error::custom)
    }
}
