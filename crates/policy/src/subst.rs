//! `subst [match],prefix`: how a guest's region name becomes the host's name.
//!
//! QNX: "Specify a prefix to add to shared memory region names"; `match` is "the character string
//! in the shared memory region name to substitute, if found, by the character string specified by
//! prefix"; `prefix` is "the character string to substitute for the character string specified by
//! match, or to simply prefix to the shared region name if match isn't specified". The example:
//! with `subst foo,guest0` the guest's `foomem` is the host's `guest0mem`; `subst ,guest0` turns
//! `mem` into `guest0mem`.
//!
//! As implemented ([`Subst::apply`]):
//!
//! * empty `match`: the host name is `prefix` followed by the guest name;
//! * otherwise the **first occurrence** of `match`, wherever it is in the name ("if found"), is
//!   replaced by `prefix`, like `sed 's/match/prefix/'` without `g`; `match` is a plain string,
//!   not a pattern;
//! * a name that does not contain `match` is passed through unchanged. Note what this means for
//!   isolation: with `subst foo,guest1`, a guest asking for `guest0mem` gets the host's
//!   `guest0mem`. Restrict such guests with `allow foo*` (patterns see the guest's name, see
//!   [`crate::vm`]).
//!
//! The substituted name must itself be a legal region name; "the length of the memory region
//! name (name + prefix) must not exceed" the 31 usable bytes of `GUEST_SHM_MAX_NAME`. Only one
//! `subst` is allowed per vdev, and it affects only `create` options written after it (see
//! [`crate::options`]).

use std::fmt;

use thiserror::Error;

use crate::name::{is_name_byte, MAX_NAME_LEN};

/// Why a `subst` argument is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum SubstError {
    /// expected \[match\],prefix: no comma in {0:?}
    ///
    /// The argument has no comma separating `match` from `prefix`.
    ///
    /// The message is in `#[displaydoc]` because rustdoc would read its `[`/`<` as markup.
    #[displaydoc("expected [match],prefix: no comma in {0:?}")]
    MissingComma(String),
    /// the prefix after the comma is empty
    ///
    /// The prefix is empty.
    EmptyPrefix,
    /// {part} contains {byte:?}; region names only contain A-Z a-z 0-9 _ . + -
    ///
    /// `match` or `prefix` contains a byte no region name can contain (wildcards included:
    /// `match` is a plain string).
    ForbiddenByte {
        /// `"match"` or `"prefix"`.
        part: &'static str,
        /// The offending character.
        byte: char,
    },
    /// {part} is {len} bytes long; region names have at most {MAX_NAME_LEN:} bytes
    ///
    /// `match` or `prefix` is longer than any region name can be.
    TooLong {
        /// `"match"` or `"prefix"`.
        part: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// prefix {0:?} would make every region name illegal
    ///
    /// With an empty `match` the prefix leaves no room for a name or starts with `.`, so every
    /// substituted name would be illegal.
    UnusablePrefix(String),
}

/// A parsed `subst [match],prefix` option.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subst {
    match_text: String,
    prefix: String,
}

impl Subst {
    /// A substitution replacing `match_text` by `prefix` (or prefixing when `match_text` is
    /// empty).
    pub fn new(match_text: &str, prefix: &str) -> Result<Self, SubstError> {
        check_part("match", match_text)?;
        if prefix.is_empty() {
            return Err(SubstError::EmptyPrefix);
        }
        check_part("prefix", prefix)?;
        if match_text.is_empty() && (prefix.len() >= MAX_NAME_LEN || prefix.starts_with('.')) {
            return Err(SubstError::UnusablePrefix(prefix.to_owned()));
        }
        Ok(Self {
            match_text: match_text.to_owned(),
            prefix: prefix.to_owned(),
        })
    }

    /// Parses the option argument `[match],prefix` (split at the first comma).
    pub fn parse(argument: &str) -> Result<Self, SubstError> {
        let (match_text, prefix) = argument
            .split_once(',')
            .ok_or_else(|| SubstError::MissingComma(argument.to_owned()))?;
        Self::new(match_text, prefix)
    }

    /// The string to replace; empty means "prefix the name".
    pub fn match_text(&self) -> &str {
        &self.match_text
    }

    /// The replacement (or prefix).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The host name for a guest name (see the [module documentation](self)). The result is not
    /// checked; validate it with [`crate::name::validate`].
    pub fn apply(&self, name: &str) -> String {
        if self.match_text.is_empty() {
            return format!("{}{name}", self.prefix);
        }
        match name.find(&self.match_text) {
            Some(at) => format!(
                "{}{}{}",
                &name[..at],
                self.prefix,
                &name[at + self.match_text.len()..]
            ),
            None => name.to_owned(),
        }
    }
}

fn check_part(part: &'static str, text: &str) -> Result<(), SubstError> {
    if let Some(byte) = text
        .chars()
        .find(|&c| !c.is_ascii() || !is_name_byte(c as u8))
    {
        return Err(SubstError::ForbiddenByte { part, byte });
    }
    if text.len() > MAX_NAME_LEN {
        return Err(SubstError::TooLong {
            part,
            len: text.len(),
        });
    }
    Ok(())
}

/// Prints the option argument, `match,prefix`.
impl fmt::Display for Subst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.match_text, self.prefix)
    }
}

impl std::str::FromStr for Subst {
    type Err = SubstError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for Subst {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_example_substitutes_foo() {
        let vm0 = Subst::parse("foo,guest0").unwrap();
        let vm1 = Subst::parse("foo,guest1").unwrap();
        assert_eq!(vm0.apply("foomem"), "guest0mem");
        assert_eq!(vm1.apply("foomem"), "guest1mem");
    }

    #[test]
    fn seed_example_empty_match_prefixes() {
        let vm0 = Subst::parse(",guest0").unwrap();
        assert_eq!(vm0.match_text(), "");
        assert_eq!(vm0.prefix(), "guest0");
        assert_eq!(vm0.apply("mem"), "guest0mem");
    }

    #[test]
    fn replaces_only_the_first_occurrence_anywhere() {
        let subst = Subst::parse("foo,bar").unwrap();
        assert_eq!(subst.apply("xfooyfoo"), "xbaryfoo");
        assert_eq!(subst.apply("memfoo"), "membar");
        assert_eq!(subst.apply("foo"), "bar");
    }

    #[test]
    fn names_without_the_match_pass_through() {
        let subst = Subst::parse("foo,guest1").unwrap();
        assert_eq!(subst.apply("guest0mem"), "guest0mem");
        assert_eq!(subst.apply("fo"), "fo");
    }

    #[test]
    fn parse_errors() {
        assert_eq!(
            Subst::parse("guest0"),
            Err(SubstError::MissingComma("guest0".into()))
        );
        assert_eq!(Subst::parse("foo,"), Err(SubstError::EmptyPrefix));
        assert_eq!(
            Subst::parse("foo*,x"),
            Err(SubstError::ForbiddenByte {
                part: "match",
                byte: '*'
            })
        );
        assert_eq!(
            Subst::parse("foo,a/b"),
            Err(SubstError::ForbiddenByte {
                part: "prefix",
                byte: '/'
            })
        );
        // The second comma belongs to the prefix, which cannot contain one.
        assert_eq!(
            Subst::parse("a,b,c"),
            Err(SubstError::ForbiddenByte {
                part: "prefix",
                byte: ','
            })
        );
        assert_eq!(
            Subst::parse(&format!(",{}", "p".repeat(31))),
            Err(SubstError::UnusablePrefix("p".repeat(31)))
        );
        assert_eq!(
            Subst::parse(",.hidden"),
            Err(SubstError::UnusablePrefix(".hidden".into()))
        );
        assert_eq!(
            Subst::parse(&format!("{},x", "m".repeat(32))),
            Err(SubstError::TooLong {
                part: "match",
                len: 32
            })
        );
    }

    #[test]
    fn display_round_trips() {
        for text in ["foo,guest0", ",guest1", "a.b,c-d"] {
            let subst = Subst::parse(text).unwrap();
            assert_eq!(subst.to_string(), text);
            assert_eq!(Subst::parse(&subst.to_string()), Ok(subst));
        }
    }
}
