//! Numbers as qvm configurations write them: decimal (`983040`, or `0d983040`), hexadecimal
//! (`0xf0000`), and for sizes and addresses an optional binary suffix `K`, `M` or `G` (either
//! case, times 1024, 1024² or 1024³) as in `ram 1024M`. A leading zero does not mean octal.

use thiserror::Error;

/// Why a string is not a number.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum NumberError {
    /// empty number
    ///
    /// Nothing was given.
    Empty,
    /// {text:?} is not a number: expected {expected}
    ///
    /// Not a decimal or hexadecimal number (with a K/M/G suffix where allowed).
    Invalid {
        /// The text.
        text: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// {text:?} is too large (the limit is {max})
    ///
    /// The value does not fit.
    TooLarge {
        /// The text.
        text: String,
        /// The largest accepted value.
        max: u64,
    },
}

const PLAIN: &str = "decimal digits or 0x followed by hex digits";
const WITH_SUFFIX: &str =
    "decimal digits or 0x followed by hex digits, optionally followed by K, M or G";

/// Parses a plain number (no suffix) up to `max`.
pub fn parse_number(text: &str, max: u64) -> Result<u64, NumberError> {
    let value = parse_digits(text, text, PLAIN)?;
    check_max(text, value, max)
}

/// Parses a size or address: a number with an optional `K`/`M`/`G` suffix, up to `max`.
pub fn parse_size(text: &str, max: u64) -> Result<u64, NumberError> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 20),
        Some(b'g' | b'G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    // A hex number cannot take a suffix letter that is itself a hex digit; none of K/M/G is.
    let value = parse_digits(digits, text, WITH_SUFFIX)?;
    let scaled = value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| NumberError::TooLarge {
            text: text.to_owned(),
            max,
        })?;
    check_max(text, scaled, max)
}

fn parse_digits(digits: &str, text: &str, expected: &'static str) -> Result<u64, NumberError> {
    if text.is_empty() {
        return Err(NumberError::Empty);
    }
    let (body, radix) = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        (hex, 16)
    } else if let Some(dec) = digits
        .strip_prefix("0d")
        .or_else(|| digits.strip_prefix("0D"))
    {
        (dec, 10)
    } else {
        (digits, 10)
    };
    let valid = !body.is_empty() && body.chars().all(|c| c.is_digit(radix));
    if !valid {
        return Err(NumberError::Invalid {
            text: text.to_owned(),
            expected,
        });
    }
    u64::from_str_radix(body, radix).map_err(|_| NumberError::TooLarge {
        text: text.to_owned(),
        max: u64::MAX,
    })
}

fn check_max(text: &str, value: u64, max: u64) -> Result<u64, NumberError> {
    if value > max {
        return Err(NumberError::TooLarge {
            text: text.to_owned(),
            max,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_numbers() {
        assert_eq!(parse_number("0", u64::MAX), Ok(0));
        assert_eq!(parse_number("983040", u64::MAX), Ok(983040));
        assert_eq!(parse_number("0xf0000", u64::MAX), Ok(0xf0000));
        assert_eq!(parse_number("0XF0000", u64::MAX), Ok(0xf0000));
        assert_eq!(parse_number("0d16384", u64::MAX), Ok(16384));
        assert_eq!(parse_number("010", u64::MAX), Ok(10));
        assert_eq!(parse_number("18446744073709551615", u64::MAX), Ok(u64::MAX));
    }

    #[test]
    fn plain_numbers_reject_garbage_and_suffixes() {
        for text in [
            "x", "0x", "0xg", "1K", "-1", "+1", "1 ", "1_000", "0d", "0b1",
        ] {
            assert!(
                matches!(
                    parse_number(text, u64::MAX),
                    Err(NumberError::Invalid { .. })
                ),
                "{text:?}"
            );
        }
        assert_eq!(parse_number("", 10), Err(NumberError::Empty));
        assert_eq!(
            parse_number("256", 255),
            Err(NumberError::TooLarge {
                text: "256".into(),
                max: 255
            })
        );
        assert!(matches!(
            parse_number("18446744073709551616", u64::MAX),
            Err(NumberError::TooLarge { .. })
        ));
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4K", u64::MAX), Ok(4096));
        assert_eq!(parse_size("4k", u64::MAX), Ok(4096));
        assert_eq!(parse_size("32m", u64::MAX), Ok(32 << 20));
        assert_eq!(parse_size("1024M", u64::MAX), Ok(1 << 30));
        assert_eq!(parse_size("2G", u64::MAX), Ok(2 << 30));
        assert_eq!(parse_size("0x10K", u64::MAX), Ok(16 * 1024));
        assert_eq!(parse_size("0xf0000", u64::MAX), Ok(0xf0000));
        assert!(matches!(
            parse_size("K", u64::MAX),
            Err(NumberError::Invalid { .. })
        ));
        assert!(matches!(
            parse_size("4KB", u64::MAX),
            Err(NumberError::Invalid { .. })
        ));
        assert!(matches!(
            parse_size("4T", u64::MAX),
            Err(NumberError::Invalid { .. })
        ));
        assert!(matches!(
            parse_size("17179869184G", u64::MAX),
            Err(NumberError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_size("2G", 1 << 30),
            Err(NumberError::TooLarge { .. })
        ));
    }
}
