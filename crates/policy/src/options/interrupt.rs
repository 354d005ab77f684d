//! The `intr` option's argument: `[controller:]line`, e.g. `gic:36` or `myioapic:4`.

use std::fmt;

use thiserror::Error;

use crate::number::{parse_number, NumberError};

/// Why an `intr` argument is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum InterruptError {
    /// interrupt controller name {0:?} must be non-empty and use only A-Z a-z 0-9 _ . -
    ///
    /// The controller name before `:` is empty or has characters other than
    /// `A-Z a-z 0-9 _ . -`.
    BadController(String),
    /// interrupt line: {0}
    ///
    /// The interrupt line is not a number.
    BadLine(NumberError),
}

impl From<NumberError> for InterruptError {
    fn from(error: NumberError) -> Self {
        InterruptError::BadLine(error)
    }
}

/// Where the vdev's interrupt goes: an interrupt controller vdev (by its `name`, e.g. `gic` or
/// `myioapic`) and the line on it, as in `intr gic:36`. A bare number leaves the controller to
/// qvm's default.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Interrupt {
    /// The controller's name, if given.
    pub controller: Option<String>,
    /// The interrupt line (e.g. the SPI number on a GIC).
    pub line: u32,
}

impl Interrupt {
    /// Parses `[controller:]line`.
    pub fn parse(text: &str) -> Result<Self, InterruptError> {
        let (controller, line) = match text.split_once(':') {
            Some((controller, line)) => {
                let valid = !controller.is_empty()
                    && controller
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
                if !valid {
                    return Err(InterruptError::BadController(controller.to_owned()));
                }
                (Some(controller.to_owned()), line)
            }
            None => (None, text),
        };
        let line = parse_number(line, u64::from(u32::MAX))?;
        let line = u32::try_from(line).map_err(|_| NumberError::TooLarge {
            text: text.to_owned(),
            max: u64::from(u32::MAX),
        })?;
        Ok(Self { controller, line })
    }
}

/// Prints the option argument, `controller:line` or `line`.
impl fmt::Display for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.controller {
            Some(controller) => write!(f, "{controller}:{}", self.line),
            None => write!(f, "{}", self.line),
        }
    }
}

impl std::str::FromStr for Interrupt {
    type Err = InterruptError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Reads an `intr` value given as a string (`"gic:36"`) or a bare integer (`36`).
struct InterruptVisitor;

impl serde::de::Visitor<'_> for InterruptVisitor {
    type Value = Interrupt;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an interrupt: a line number such as 36 or a string such as \"gic:36\"")
    }

    fn visit_u64<E: serde::de::Error>(self, line: u64) -> Result<Interrupt, E> {
        let line = u32::try_from(line)
            .map_err(|_| E::custom(format!("interrupt line {line} does not fit in 32 bits")))?;
        Ok(Interrupt {
            controller: None,
            line,
        })
    }

    fn visit_i64<E: serde::de::Error>(self, line: i64) -> Result<Interrupt, E> {
        match u64::try_from(line) {
            Ok(line) => self.visit_u64(line),
            Err(_) => Err(E::custom(format!("interrupt line {line} is negative"))),
        }
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Interrupt, E> {
        Interrupt::parse(text).map_err(E::custom)
    }
}

/// Accepts `"gic:36"` or a bare integer `36`.
impl<'de> serde::Deserialize<'de> for Interrupt {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(InterruptVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Holder {
        intr: Interrupt,
    }

    fn from_toml(value: &str) -> Result<Interrupt, String> {
        toml::from_str::<Holder>(&format!("intr = {value}"))
            .map(|h| h.intr)
            .map_err(|e| e.message().to_string())
    }

    #[test]
    fn deserializes_from_an_integer_or_a_string_with_clear_errors() {
        assert_eq!(
            from_toml("36"),
            Ok(Interrupt {
                controller: None,
                line: 36
            })
        );
        assert_eq!(
            from_toml("\"gic:36\""),
            Ok(Interrupt {
                controller: Some("gic".into()),
                line: 36
            })
        );
        assert!(from_toml("-1").unwrap_err().contains("negative"));
        assert!(from_toml("4294967296")
            .unwrap_err()
            .contains("does not fit in 32 bits"));
        let wrong_type = from_toml("[]").unwrap_err();
        assert!(
            wrong_type.contains("expected an interrupt: a line number such as 36"),
            "{wrong_type}"
        );
    }

    #[test]
    fn parses_controller_and_line() {
        assert_eq!(
            Interrupt::parse("gic:36"),
            Ok(Interrupt {
                controller: Some("gic".into()),
                line: 36
            })
        );
        assert_eq!(
            Interrupt::parse("myioapic:0x4"),
            Ok(Interrupt {
                controller: Some("myioapic".into()),
                line: 4
            })
        );
        assert_eq!(
            Interrupt::parse("7"),
            Ok(Interrupt {
                controller: None,
                line: 7
            })
        );
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(
            Interrupt::parse(":3"),
            Err(InterruptError::BadController(String::new()))
        );
        assert_eq!(
            Interrupt::parse("a/b:3"),
            Err(InterruptError::BadController("a/b".into()))
        );
        assert!(matches!(
            Interrupt::parse("gic:"),
            Err(InterruptError::BadLine(NumberError::Empty))
        ));
        assert!(matches!(
            Interrupt::parse("apic"),
            Err(InterruptError::BadLine(_))
        ));
        assert!(matches!(
            Interrupt::parse("gic:4294967296"),
            Err(InterruptError::BadLine(NumberError::TooLarge { .. }))
        ));
    }

    #[test]
    fn display_round_trips() {
        for text in ["gic:36", "7", "my_pic-0:4294967295"] {
            let intr = Interrupt::parse(text).unwrap();
            assert_eq!(intr.to_string(), text);
        }
    }
}
