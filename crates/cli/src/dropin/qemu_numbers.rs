//! Numbers on QEMU's command line, read exactly as QEMU 7.2's `ivshmem-server` reads them:
//! `-l` with `parse_option_size` (`qemu_strtosz`) and `-n` with `parse_uint_full(.., 0)`.
//!
//! A script's `-l 1.5M`, `-l 1.k`, `-l " 2m"` or `-n 010` must mean to the drop-in what it means
//! to QEMU, and `-l 4MiB` must fail as it does there, so this follows QEMU's rules (written from
//! their description in `util/cutils.c`, on top of the C library's `strtoull` and `strtod`)
//! rather than [`ivshm_mem::parse_size`], whose grammar is `ivshm`'s own.
//!
//! `qemu_strtosz`: leading white space; a decimal integer (no `-` anywhere in it); then either
//! `x`/`X` after a lone `0` (the whole number is read again as hexadecimal, no fraction allowed)
//! or an optional fraction `.digits` (no exponent); then an optional unit `B`, `K`, `M`, `G`,
//! `T`, `P` or `E` in either case (powers of 1024; a unit on a hexadecimal number is accepted
//! with a deprecation warning); nothing may follow. A fraction needs a unit other than `B`; the
//! result is rounded to the nearest byte (halves up) and must fit in 64 bits.

/// Why `-l` was refused (QEMU's two messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size at all (`-EINVAL`).
    Invalid,
    /// A size, but not below 2^64 (`-ERANGE`).
    OutOfRange,
}

impl SizeError {
    /// QEMU's message for option `name` with value `value` (possibly several lines, no final
    /// newline).
    pub fn message(self, name: &str, value: &str) -> String {
        match self {
            SizeError::Invalid => format!(
                "Parameter '{name}' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively."
            ),
            SizeError::OutOfRange => {
                format!("Value '{value}' is out of range for parameter '{name}'")
            }
        }
    }
}

/// A size QEMU accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    /// The size in bytes.
    pub bytes: u64,
    /// A hexadecimal number with a unit: QEMU warns that this is deprecated.
    pub hex_with_unit: bool,
}

/// QEMU's deprecation warning for a unit on a hexadecimal size.
pub fn hex_unit_warning(value: &str) -> String {
    format!("warning: Using a multiplier suffix on hex numbers is deprecated: {value}")
}

/// The C locale's `isspace`.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// What `strtoull` made of the start of a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Strtoull {
    /// The value (negated modulo 2^64 after a `-`, as `strtoull` does).
    value: u64,
    /// Where parsing stopped; 0 when nothing was converted (`endptr == nptr`).
    end: usize,
    /// `ERANGE`: the magnitude does not fit in 64 bits.
    overflow: bool,
}

/// glibc's `strtoull(s, &end, base)` for base 0, 10 or 16.
fn strtoull(s: &[u8], base: u32) -> Strtoull {
    let mut i = 0;
    while s.get(i).copied().is_some_and(is_c_space) {
        i += 1;
    }
    let negative = s.get(i) == Some(&b'-');
    if matches!(s.get(i), Some(b'-' | b'+')) {
        i += 1;
    }
    let hex_prefix = matches!(s.get(i..i + 2), Some([b'0', b'x' | b'X']))
        && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
    let radix = match base {
        0 if hex_prefix => 16,
        0 if s.get(i) == Some(&b'0') => 8,
        0 => 10,
        b => b,
    };
    if radix == 16 && hex_prefix {
        i += 2;
    }
    let start = i;
    let mut value: u64 = 0;
    let mut overflow = false;
    while let Some(digit) = s.get(i).and_then(|&b| char::from(b).to_digit(radix)) {
        match value
            .checked_mul(u64::from(radix))
            .and_then(|v| v.checked_add(u64::from(digit)))
        {
            Some(v) => value = v,
            None => overflow = true,
        }
        i += 1;
    }
    if i == start {
        return Strtoull {
            value: 0,
            end: 0,
            overflow: false,
        };
    }
    let value = match (overflow, negative) {
        (true, _) => u64::MAX,
        (false, true) => value.wrapping_neg(),
        (false, false) => value,
    };
    Strtoull {
        value,
        end: i,
        overflow,
    }
}

/// Where `strtod` stops reading a fraction that starts at `s[0] == '.'`, and its value; `None`
/// if it converts nothing (no digit after the dot). The exponent flag says whether it read an
/// exponent (QEMU refuses those).
fn strtod_fraction(s: &[u8]) -> Option<(f64, usize, bool)> {
    let digits = s[1..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut end = 1 + digits;
    let mut exponent = false;
    if matches!(s.get(end), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(s.get(end + 1), Some(b'+' | b'-')));
        if s.get(end + 1 + sign).is_some_and(u8::is_ascii_digit) {
            exponent = true;
            end += 1 + sign;
            end += s[end..].iter().take_while(|b| b.is_ascii_digit()).count();
        }
    }
    let text = std::str::from_utf8(&s[..end]).ok()?;
    let value: f64 = format!("0{text}").parse().ok()?;
    Some((value, end, exponent))
}

/// `qemu_strtosz(value, NULL, &size)`: see the module documentation.
pub fn parse_size(value: &str) -> Result<Size, SizeError> {
    let s = value.as_bytes();
    let int = strtoull(s, 10);
    if int.overflow {
        return Err(SizeError::OutOfRange);
    }
    if int.end == 0 {
        return Err(SizeError::Invalid);
    }
    if s[..int.end].contains(&b'-') {
        return Err(SizeError::Invalid);
    }
    let mut val = int.value;
    let mut end = int.end;
    let mut fraction: u64 = 0;
    let mut hex = false;
    if val == 0 && matches!(s.get(end), Some(b'x' | b'X')) {
        let h = strtoull(s, 16);
        if h.overflow {
            return Err(SizeError::OutOfRange);
        }
        if h.end == 0 || s.get(h.end) == Some(&b'.') {
            return Err(SizeError::Invalid);
        }
        (val, end, hex) = (h.value, h.end, true);
    } else if s.get(end) == Some(&b'.') {
        match strtod_fraction(&s[end..]) {
            None => end += 1,
            Some((_, _, true)) => return Err(SizeError::Invalid),
            Some((f, len, false)) => {
                // A 0.64 fixed-point fraction, as QEMU computes it (`f` is below 1).
                fraction = (f * 18_446_744_073_709_551_616.0) as u64;
                end += len;
            }
        }
    }
    let shift = match s.get(end).map(|&b| char::from(b)) {
        Some('b' | 'B') => Some(0),
        Some(c) => ivshm_mem::unit_shift(c),
        None => None,
    };
    let unit_given = shift.is_some();
    if unit_given {
        end += 1;
    }
    let shift = shift.unwrap_or(0);
    let bytes = if shift == 0 {
        if fraction != 0 {
            return Err(SizeError::Invalid);
        }
        val
    } else {
        // 64.64 fixed point times the unit, rounded half up.
        let whole = u128::from(val) << shift;
        let part = u128::from(fraction) << shift;
        let total = whole + (part >> 64) + ((part >> 63) & 1);
        u64::try_from(total).map_err(|_| SizeError::OutOfRange)?
    };
    if end != s.len() {
        return Err(SizeError::Invalid);
    }
    Ok(Size {
        bytes,
        hex_with_unit: hex && unit_given,
    })
}

/// `parse_uint_full(s, &v, 0)`: the whole string is one unsigned number in C notation
/// (decimal, `0x` hexadecimal or `0` octal, white space and `+` allowed in front, no `-`).
pub fn parse_uint_full(s: &str) -> Option<u64> {
    let bytes = s.as_bytes();
    let r = strtoull(bytes, 0);
    if r.overflow || r.end == 0 || r.end != bytes.len() {
        return None;
    }
    let first = bytes.iter().position(|&b| !is_c_space(b))?;
    (bytes[first] != b'-').then_some(r.value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn size(s: &str) -> Result<u64, SizeError> {
        parse_size(s).map(|s| s.bytes)
    }

    #[test]
    fn sizes_qemu_accepts() {
        assert_eq!(size("4194304"), Ok(4 << 20));
        assert_eq!(size("4M"), Ok(4 << 20));
        assert_eq!(size("4m"), Ok(4 << 20));
        assert_eq!(size("1k"), Ok(1024));
        assert_eq!(size("2G"), Ok(2 << 30));
        assert_eq!(size("3T"), Ok(3 << 40));
        assert_eq!(size("1E"), Ok(1 << 60));
        assert_eq!(size("512B"), Ok(512));
        assert_eq!(size(" 2M"), Ok(2 << 20));
        assert_eq!(size("+2M"), Ok(2 << 20));
        assert_eq!(size("1.5M"), Ok(3 << 19));
        assert_eq!(size("1.k"), Ok(1024));
        assert_eq!(size("0.5K"), Ok(512));
        // Rounded to the nearest byte, halves up.
        assert_eq!(size("0.0001K"), Ok(0));
        assert_eq!(size("0.0005K"), Ok(1));
        assert_eq!(size("0x400000"), Ok(4 << 20));
        assert_eq!(size("0X10"), Ok(16));
        assert_eq!(size("0"), Ok(0));
        assert_eq!(size("15E"), Ok(15 << 60));
        assert_eq!(
            parse_size("0x10K"),
            Ok(Size {
                bytes: 16 << 10,
                hex_with_unit: true
            })
        );
        assert!(!parse_size("16K").unwrap().hex_with_unit);
        // "1.5e" is 1.5 exabytes: the `e` that strtod does not take is the unit.
        assert_eq!(size("1.5e"), Ok(3 << 59));
    }

    #[test]
    fn sizes_qemu_refuses() {
        for bad in [
            "", " ", "M", "4MB", "4MiB", "4 M", "-1", "-0", "1.5", "1.5B", "1.5e3M", "1.5E3", "0x",
            "0x1.5M", "00x10", "4Q", "1..5M", "0x-1", "4M ",
        ] {
            assert_eq!(size(bad), Err(SizeError::Invalid), "{bad:?}");
        }
        for big in [
            "16E",
            "18446744073709551616",
            "99999999999999999999",
            "0x1ffffffffffffffff",
        ] {
            assert_eq!(size(big), Err(SizeError::OutOfRange), "{big:?}");
        }
        assert_eq!(size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn messages_are_qemus() {
        assert_eq!(
            SizeError::OutOfRange.message("shm_size", "16E"),
            "Value '16E' is out of range for parameter 'shm_size'"
        );
        assert_eq!(
            SizeError::Invalid.message("shm_size", "4Q"),
            "Parameter 'shm_size' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        );
        assert_eq!(
            hex_unit_warning("0x10K"),
            "warning: Using a multiplier suffix on hex numbers is deprecated: 0x10K"
        );
    }

    #[test]
    fn unsigned_integers_in_c_notation() {
        assert_eq!(parse_uint_full("8"), Some(8));
        assert_eq!(parse_uint_full(" +8"), Some(8));
        assert_eq!(parse_uint_full("010"), Some(8));
        assert_eq!(parse_uint_full("0x10"), Some(16));
        assert_eq!(parse_uint_full("0"), Some(0));
        assert_eq!(parse_uint_full("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            " ",
            "x",
            "8 ",
            "08",
            "0x",
            "0xg",
            "-1",
            " -0",
            "1e3",
            "18446744073709551616",
        ] {
            assert_eq!(parse_uint_full(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn plain_decimal_with_a_unit_is_a_shift(n in 0u64..1 << 13, unit in 0usize..7) {
            let (letter, shift) = [("", 0), ("B", 0), ("K", 10), ("M", 20), ("G", 30), ("t", 40), ("p", 50)][unit];
            prop_assert_eq!(size(&format!("{n}{letter}")), Ok(n << shift));
        }

        #[test]
        fn never_panics(s in "[ +\\-0-9xXa-fA-F.eEkKmMgGtTpPbB]{0,12}") {
            let _ = parse_size(&s);
            let _ = parse_uint_full(&s);
        }
    }
}
