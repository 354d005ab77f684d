//! [`Pattern`]: a checked `fnpattern` as written after `allow` / `deny`.

use std::fmt;

use thiserror::Error;

/// Longest accepted pattern, in bytes. Region names are at most 31 bytes; patterns get room for
/// bracket expressions but stay small enough to print in one line.
pub const MAX_PATTERN_LEN: usize = 255;

/// Why a string is not accepted as an `allow`/`deny` pattern.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PatternError {
    /// The pattern is empty (it could only match the empty name, which is never legal).
    #[error("empty pattern")]
    Empty,
    /// The pattern is longer than [`MAX_PATTERN_LEN`] bytes.
    #[error("pattern is {len} bytes long, the limit is {MAX_PATTERN_LEN}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The pattern contains a byte that cannot appear in a `vdev shmem` option argument: NUL, a
    /// control character, whitespace or `#` (which starts a comment in a qvm configuration).
    #[error("pattern contains {byte:?}, which cannot appear in an option argument")]
    ForbiddenByte {
        /// The offending character.
        byte: char,
    },
    /// The pattern ends in a lone `\`, which makes `fnmatch` fail for every name.
    #[error("pattern ends with a lone backslash and would never match")]
    TrailingBackslash,
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
