//! Sizes as users write them: `4194304`, `0x400000`, `0d983040`, `4M`, `4MiB`, `4mb`, `1G`.
//!
//! The one size grammar of every `ivshm` flag and configuration-file field ([`parse_size`],
//! and [`Size`] for serde):
//!
//! - white space around the text is ignored;
//! - a number: decimal digits, `0x`/`0X` and hexadecimal digits, or `0d`/`0D` and decimal
//!   digits (the QNX notation for decimal); no sign, no fraction, no space inside;
//! - then optionally a unit, in any case: `K`, `M`, `G`, `T`, `P` or `E` (powers of 1024, like
//!   QEMU's `-l`), each optionally followed by `B` or `iB`; or `B` alone (bytes). After a
//!   hexadecimal number `B` and `E` are hex digits, so `0x1E` is 30 bytes;
//! - the result must fit in 64 bits.
//!
//! In a configuration file a size may also be a non-negative TOML integer.

use thiserror::Error;

/// A size string that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum SizeError {
    /// empty size
    ///
    /// Nothing was given.
    Empty,
    /// invalid size {0:?}: expected a number (decimal or 0x hex) with an optional K/M/G/T suffix
    ///
    /// There were no digits where the number should be.
    NoDigits(String),
    /// invalid size {input:?}: unknown suffix {suffix:?} (use K, M, G, T, P or E, optionally with B
    /// or iB)
    ///
    /// The suffix is not one of the known ones.
    BadSuffix {
        /// The whole input.
        input: String,
        /// The part that was not understood.
        suffix: String,
    },
    /// size {0:?} is too large
    ///
    /// The value does not fit in 64 bits.
    Overflow(String),
}

const UNITS: [(char, u32); 6] = [
    ('k', 10),
    ('m', 20),
    ('g', 30),
    ('t', 40),
    ('p', 50),
    ('e', 60),
];

/// Parses a size in bytes in the grammar of the [module](self): decimal, `0x` hex or `0d`
/// decimal, then an optional K/M/G/T/P/E unit (powers of 1024, any case, optionally followed by
/// `B` or `iB`) or a `B` alone.
///
/// Its error is an [`Error`](std::error::Error), so it serves as a clap `value_parser`
/// directly.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let text = input.trim();
    if text.is_empty() {
        return Err(SizeError::Empty);
    }
    let (digits, radix, rest) =
        if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            let end = hex
                .find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(hex.len());
            (&hex[..end], 16, &hex[end..])
        } else {
            let decimal = text
                .strip_prefix("0d")
                .or_else(|| text.strip_prefix("0D"))
                .unwrap_or(text);
            let end = decimal
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(decimal.len());
            (&decimal[..end], 10, &decimal[end..])
        };
    if digits.is_empty() {
        return Err(SizeError::NoDigits(input.to_string()));
    }
    let number =
        u64::from_str_radix(digits, radix).map_err(|_| SizeError::Overflow(input.to_string()))?;
    let shift = parse_suffix(rest).ok_or_else(|| SizeError::BadSuffix {
        input: input.to_string(),
        suffix: rest.to_string(),
    })?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(input.to_string()))
}

/// The power of two a unit letter stands for: `K` 10, `M` 20, `G` 30, `T` 40, `P` 50, `E` 60
/// (either case); `None` for any other character.
pub fn unit_shift(unit: char) -> Option<u32> {
    let unit = unit.to_ascii_lowercase();
    UNITS
        .iter()
        .find(|(c, _)| *c == unit)
        .map(|&(_, shift)| shift)
}

/// Returns the power-of-two shift a suffix stands for, or `None` if it is not a size suffix.
fn parse_suffix(suffix: &str) -> Option<u32> {
    let lower = suffix.to_ascii_lowercase();
    if lower.is_empty() || lower == "b" {
        return Some(0);
    }
    let mut chars = lower.chars();
    let shift = unit_shift(chars.next()?)?;
    match chars.as_str() {
        "" | "b" | "ib" => Some(shift),
        _ => None,
    }
}

/// A size in a configuration file: a non-negative integer, or a string in [`parse_size`]'s
/// grammar. The one way every size field of a file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Size(pub u64);

struct SizeVisitor;

impl serde::de::Visitor<'_> for SizeVisitor {
    type Value = Size;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "a size in bytes: a non-negative integer, or a string such as \"1M\", \"960K\" or \"0xf0000\"",
        )
    }

    fn visit_u64<E: serde::de::Error>(self, size: u64) -> Result<Size, E> {
        Ok(Size(size))
    }

    fn visit_i64<E: serde::de::Error>(self, size: i64) -> Result<Size, E> {
        u64::try_from(size)
            .map(Size)
            .map_err(|_| E::custom(format!("size {size} is negative")))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Size, E> {
        parse_size(text).map(Size).map_err(E::custom)
    }
}

impl<'de> serde::Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// Formats a size for humans: the largest binary unit that divides it exactly (`4 MiB`,
/// `1536 KiB`, `5 GiB`), else plain bytes (`4097 B`).
pub fn format_size(bytes: u64) -> String {
    const NAMES: [(&str, u32); 6] = [
        ("EiB", 60),
        ("PiB", 50),
        ("TiB", 40),
        ("GiB", 30),
        ("MiB", 20),
        ("KiB", 10),
    ];
    if bytes != 0 {
        for (name, shift) in NAMES {
            let unit = 1u64 << shift;
            if bytes % unit == 0 {
                return format!("{} {name}", bytes / unit);
            }
        }
    }
    format!("{bytes} B")
}

/// What to do when a size is not a power of two (QEMU's `ivshmem-doorbell` maps the region as a
/// PCI BAR, and PCI BARs must be powers of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pow2Policy {
    /// Round up to the next power of two (the caller logs both sizes).
    #[default]
    RoundUp,
    /// Refuse the size with an error.
    Refuse,
    /// Keep the size as given (for peers that are not QEMU devices).
    Off,
}

impl std::str::FromStr for Pow2Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-up" => Ok(Pow2Policy::RoundUp),
            "refuse" => Ok(Pow2Policy::Refuse),
            "off" => Ok(Pow2Policy::Off),
            other => Err(format!(
                "unknown power-of-two policy {other:?} (use round-up, refuse or off)"
            )),
        }
    }
}

/// A size that the power-of-two policy does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum Pow2Error {
    /// size must be greater than zero
    ///
    /// Zero bytes cannot be shared.
    Zero,
    /// size {size} bytes is not a power of two, which QEMU's ivshmem needs for its PCI BAR (next
    /// power of two: {next}); use a power-of-two size or round up
    ///
    /// The size is not a power of two and the policy is [`Pow2Policy::Refuse`].
    NotPowerOfTwo {
        /// The size asked for.
        size: u64,
        /// The next power of two.
        next: u64,
    },
    /// size {0} bytes cannot be rounded up to a power of two within 64 bits
    ///
    /// There is no power of two at or above the size in 64 bits (whatever the policy: the
    /// size could not be rounded up, nor be named a next power of two).
    TooLarge(u64),
}

/// Applies `policy` to `size`: returns the size to create (unchanged if it is already a power of
/// two or the policy is `Off`). Zero is always an error.
pub fn apply_pow2_policy(size: u64, policy: Pow2Policy) -> Result<u64, Pow2Error> {
    if size == 0 {
        return Err(Pow2Error::Zero);
    }
    if size.is_power_of_two() || policy == Pow2Policy::Off {
        return Ok(size);
    }
    match (policy, size.checked_next_power_of_two()) {
        (_, None) => Err(Pow2Error::TooLarge(size)),
        (Pow2Policy::RoundUp, Some(next)) => Ok(next),
        (_, Some(next)) => Err(Pow2Error::NotPowerOfTwo { size, next }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_and_hex() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size(" 42 "), Ok(42));
        assert_eq!(parse_size("0d983040"), Ok(983040));
        assert_eq!(parse_size("0D16K"), Ok(16 << 10));
        assert_eq!(parse_size("0x1E"), Ok(30));
        assert!(matches!(parse_size("0d"), Err(SizeError::NoDigits(_))));
        assert!(matches!(parse_size("0dx1"), Err(SizeError::NoDigits(_))));
        assert_eq!(parse_size("4194304"), Ok(4 << 20));
        assert_eq!(parse_size("0x400000"), Ok(4 << 20));
        assert_eq!(parse_size("0X10"), Ok(16));
        assert_eq!(parse_size("0xffffffffffffffff"), Ok(u64::MAX));
        assert_eq!(parse_size("123B"), Ok(123));
        assert_eq!(parse_size("123b"), Ok(123));
    }

    #[test]
    fn suffixes_are_powers_of_1024_case_insensitive() {
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("4MB"), Ok(4 << 20));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("4mib"), Ok(4 << 20));
        assert_eq!(parse_size("4mb"), Ok(4 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("5G"), Ok(5 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("15E"), Ok(15 << 60));
        assert_eq!(parse_size("0x10M"), Ok(16 << 20));
    }

    #[test]
    fn rejects_junk() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("  "), Err(SizeError::Empty));
        assert!(matches!(parse_size("M"), Err(SizeError::NoDigits(_))));
        assert!(matches!(parse_size("0x"), Err(SizeError::NoDigits(_))));
        assert!(matches!(parse_size("-1"), Err(SizeError::NoDigits(_))));
        assert!(matches!(parse_size("4X"), Err(SizeError::BadSuffix { .. })));
        assert!(matches!(
            parse_size("4MM"),
            Err(SizeError::BadSuffix { .. })
        ));
        assert!(matches!(
            parse_size("4Mi"),
            Err(SizeError::BadSuffix { .. })
        ));
        assert!(matches!(
            parse_size("4 M"),
            Err(SizeError::BadSuffix { .. })
        ));
        assert!(matches!(
            parse_size("1.5M"),
            Err(SizeError::BadSuffix { .. })
        ));
        assert!(matches!(parse_size("16E"), Err(SizeError::Overflow(_))));
        assert!(matches!(
            parse_size("18446744073709551616"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn sizes_deserialize_from_integers_and_strings_in_the_one_grammar() {
        use serde::de::value::{Error, I64Deserializer, StrDeserializer, U64Deserializer};
        use serde::Deserialize;
        let text = |t: &str| Size::deserialize(StrDeserializer::<Error>::new(t));
        assert_eq!(text("1M").unwrap(), Size(1 << 20));
        assert_eq!(text("0d983040").unwrap(), Size(983040));
        assert_eq!(text("0xf0000").unwrap(), Size(0xf0000));
        assert_eq!(text("4MiB").unwrap(), Size(4 << 20));
        let err = text("lots").unwrap_err().to_string();
        assert!(err.contains("invalid size \"lots\""), "{err}");
        assert_eq!(
            Size::deserialize(U64Deserializer::<Error>::new(65536)).unwrap(),
            Size(65536)
        );
        let err = Size::deserialize(I64Deserializer::<Error>::new(-1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("negative"), "{err}");
    }

    #[test]
    fn pow2_policies() {
        assert_eq!(apply_pow2_policy(0, Pow2Policy::Off), Err(Pow2Error::Zero));
        assert_eq!(apply_pow2_policy(4 << 20, Pow2Policy::Refuse), Ok(4 << 20));
        assert_eq!(apply_pow2_policy(3 << 20, Pow2Policy::RoundUp), Ok(4 << 20));
        assert_eq!(apply_pow2_policy(3 << 20, Pow2Policy::Off), Ok(3 << 20));
        assert_eq!(
            apply_pow2_policy(3 << 20, Pow2Policy::Refuse),
            Err(Pow2Error::NotPowerOfTwo {
                size: 3 << 20,
                next: 4 << 20
            })
        );
        assert_eq!(apply_pow2_policy(5 << 30, Pow2Policy::RoundUp), Ok(8 << 30));
        assert_eq!(
            apply_pow2_policy(u64::MAX, Pow2Policy::RoundUp),
            Err(Pow2Error::TooLarge(u64::MAX))
        );
        // Refused too: no "next power of two: 0".
        assert_eq!(
            apply_pow2_policy(u64::MAX, Pow2Policy::Refuse),
            Err(Pow2Error::TooLarge(u64::MAX))
        );
        assert_eq!("round-up".parse(), Ok(Pow2Policy::RoundUp));
        assert_eq!("refuse".parse(), Ok(Pow2Policy::Refuse));
        assert_eq!("off".parse(), Ok(Pow2Policy::Off));
        "up".parse::<Pow2Policy>().unwrap_err();
    }

    #[test]
    fn formats_exact_units() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(4097), "4097 B");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(1536 * 1024), "1536 KiB");
        assert_eq!(format_size(4 << 20), "4 MiB");
        assert_eq!(format_size(5 << 30), "5 GiB");
        assert_eq!(format_size(1 << 40), "1 TiB");
    }

    proptest! {
        #[test]
        fn decimal_and_hex_round_trip(n in any::<u64>()) {
            prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
            prop_assert_eq!(parse_size(&format!("{n:#x}")), Ok(n));
        }

        #[test]
        fn suffix_multiplies_or_overflows(
            n in any::<u64>(),
            unit in 0usize..6,
            tail in prop::sample::select(vec!["", "b", "B", "ib", "iB", "IB"]),
            upper in any::<bool>(),
        ) {
            let (c, shift) = UNITS[unit];
            let c = if upper { c.to_ascii_uppercase() } else { c };
            let text = format!("{n}{c}{tail}");
            match n.checked_mul(1u64 << shift) {
                Some(v) => prop_assert_eq!(parse_size(&text), Ok(v)),
                None => prop_assert!(matches!(parse_size(&text), Err(SizeError::Overflow(_)))),
            }
        }

        #[test]
        fn format_then_parse_round_trips(n in any::<u64>()) {
            let text = format_size(n).replace(' ', "");
            prop_assert_eq!(parse_size(&text), Ok(n));
        }

        #[test]
        fn round_up_gives_smallest_power_of_two_not_below(n in 1u64..=(1u64 << 63)) {
            let up = apply_pow2_policy(n, Pow2Policy::RoundUp).unwrap();
            prop_assert!(up.is_power_of_two());
            prop_assert!(up >= n);
            prop_assert!(up / 2 < n);
        }

        #[test]
        fn never_panics(s in ".{0,24}") {
            let _ = parse_size(&s);
        }
    }
}
