//! Bracket expressions (`[...]`) with glibc's exact corner-case behaviour in the C locale.
//!
//! The scan walks the members until one matches (then the rest is skipped up to the closing
//! `]`), until the closing `]` (no member matched) or until the pattern ends (the `[` was not a
//! bracket after all and matches itself). The skip and the scan parse a few malformed inputs
//! differently; both are kept as glibc has them so that results agree with `libc::fnmatch`.

/// glibc's `CHAR_CLASS_MAX_LENGTH` (= `CHARCLASS_NAME_MAX`, 2048): a `[:name:]` whose name reaches
/// this many letters makes the whole bracket fail.
const CHAR_CLASS_MAX_LENGTH: usize = 2048;

/// The byte at `i`, or NUL past the end (the C string terminator).
fn at(pattern: &[u8], i: usize) -> u8 {
    pattern.get(i).copied().unwrap_or(0)
}

/// Matches the bracket expression whose body starts at `start` (just after the `[`) against
/// `byte`. Returns the position after the consumed pattern text on a match, `None` otherwise.
pub(super) fn match_bracket(pattern: &[u8], start: usize, byte: u8) -> Option<usize> {
    let mut p = start;
    let negated = matches!(at(pattern, p), b'!' | b'^');
    if negated {
        p += 1;
    }
    let mut c = at(pattern, p);
    p += 1;
    loop {
        // The member's first byte is `c`; `p` is the position after it.
        let low: u8;
        if c == b'\\' {
            let escaped = at(pattern, p);
            if escaped == 0 {
                return None;
            }
            p += 1;
            low = escaped;
        } else if c == b'[' && at(pattern, p) == b':' {
            match parse_class(pattern, p) {
                ClassScan::NotAClass => low = b'[',
                ClassScan::Malformed => return None,
                ClassScan::Class(class, after) => {
                    if class.contains(byte) {
                        return matched(pattern, after, negated, start, byte);
                    }
                    p = after + 1;
                    c = at(pattern, after);
                    if c == b']' {
                        break;
                    }
                    continue;
                }
            }
        } else if c == b'[' && at(pattern, p) == b'=' {
            let symbol = at(pattern, p + 1);
            if symbol != 0 && at(pattern, p + 2) == b'=' && at(pattern, p + 3) == b']' {
                // `[=x=]`: in the C locale every byte is its own equivalence class.
                if byte == symbol {
                    return matched(pattern, p + 4, negated, start, byte);
                }
                c = at(pattern, p + 4);
                p += 5;
                if c == b']' {
                    break;
                }
                continue;
            }
            low = b'[';
        } else if c == 0 {
            // Unterminated: the `[` is an ordinary byte and the pattern goes on after it.
            return (byte == b'[').then_some(start);
        } else if c == b'[' && at(pattern, p) == b'.' {
            // `[.x.]`: a collating symbol; the C locale only knows one-byte symbols.
            let (symbol, after) = collating_symbol(pattern, p)?;
            p = after;
            let is_range = at(pattern, p) == b'-' && at(pattern, p + 1) != 0;
            if !is_range && byte == symbol {
                return matched(pattern, p, negated, start, byte);
            }
            c = at(pattern, p);
            p += 1;
            match range_end(pattern, &mut c, &mut p, symbol, byte)? {
                true => return matched(pattern, p, negated, start, byte),
                false if c == b']' => break,
                false => continue,
            }
        } else {
            low = c;
        }

        let is_range =
            at(pattern, p) == b'-' && at(pattern, p + 1) != 0 && at(pattern, p + 1) != b']';
        if !is_range && low == byte {
            return matched(pattern, p, negated, start, byte);
        }
        c = at(pattern, p);
        p += 1;
        match range_end(pattern, &mut c, &mut p, low, byte)? {
            true => return matched(pattern, p, negated, start, byte),
            false if c == b']' => break,
            false => {}
        }
    }
    // The closing `]` was reached without a match.
    negated.then_some(p)
}

/// If `c` (just read, `p` after it) starts a range `-hi`, evaluates `low..=hi` for `byte`:
/// `Some(true)` on a match (`p` after the range), `Some(false)` otherwise (with `c`/`p` moved to
/// the next member), `None` when the range end is malformed (the bracket fails).
fn range_end(pattern: &[u8], c: &mut u8, p: &mut usize, low: u8, byte: u8) -> Option<bool> {
    if *c != b'-' || at(pattern, *p) == b']' {
        return Some(false);
    }
    let mut high = at(pattern, *p);
    *p += 1;
    if high == b'[' && at(pattern, *p) == b'.' {
        let (symbol, after) = collating_symbol(pattern, *p)?;
        high = symbol;
        *p = after;
    } else {
        if high == b'\\' {
            high = at(pattern, *p);
            *p += 1;
        }
        if high == 0 {
            return None;
        }
    }
    if low <= byte && byte <= high {
        return Some(true);
    }
    *c = at(pattern, *p);
    *p += 1;
    Some(false)
}

/// Parses `[.x.]` with `dot` at the position of the first `.`; returns the symbol byte and the
/// position after `.]`. Unterminated or multi-byte symbols make the bracket fail (`None`).
fn collating_symbol(pattern: &[u8], dot: usize) -> Option<(u8, usize)> {
    let mut q = dot;
    let mut length = 0usize;
    loop {
        q += 1;
        let d = at(pattern, q);
        if d == b'.' && at(pattern, q + 1) == b']' {
            break;
        }
        if d == 0 {
            return None;
        }
        length += 1;
    }
    (length == 1).then(|| (at(pattern, dot + 1), q + 2))
}

/// What the scan found after `[:`.
enum ClassScan {
    /// Not a class after all (a byte outside `a`..=`y` came first): `[` is an ordinary member.
    NotAClass,
    /// A name of [`CHAR_CLASS_MAX_LENGTH`] letters or an unknown class: the bracket fails.
    Malformed,
    /// A known class and the position after its `:]`.
    Class(AsciiClass, usize),
}

/// Parses a class name at `colon` (the position of the `:` after `[`).
fn parse_class(pattern: &[u8], colon: usize) -> ClassScan {
    let mut q = colon;
    let mut length = 0usize;
    loop {
        if length == CHAR_CLASS_MAX_LENGTH {
            return ClassScan::Malformed;
        }
        q += 1;
        let d = at(pattern, q);
        if d == b':' && at(pattern, q + 1) == b']' {
            break;
        }
        // glibc's test is `c < 'a' || c >= 'z'`: no class name contains a `z`.
        if !(b'a'..=b'y').contains(&d) {
            return ClassScan::NotAClass;
        }
        length += 1;
    }
    match AsciiClass::from_name(&pattern[colon + 1..q]) {
        Some(class) => ClassScan::Class(class, q + 2),
        None => ClassScan::Malformed,
    }
}

/// A member matched at a position before `p`: skips the rest of the bracket up to its `]`.
/// If the pattern ends first, the `[` (its body started at `start`) was an ordinary byte after
/// all and is compared with `byte`.
fn matched(pattern: &[u8], mut p: usize, negated: bool, start: usize, byte: u8) -> Option<usize> {
    loop {
        let c = at(pattern, p);
        p += 1;
        match c {
            b']' => break,
            0 => return (byte == b'[').then_some(start),
            b'\\' => {
                if at(pattern, p) == 0 {
                    return None;
                }
                p += 1;
            }
            b'[' if at(pattern, p) == b':' => {
                let start = p;
                let mut length = 0usize;
                loop {
                    p += 1;
                    let d = at(pattern, p);
                    length += 1;
                    if length == CHAR_CLASS_MAX_LENGTH {
                        return None;
                    }
                    if d == b':' && at(pattern, p + 1) == b']' {
                        p += 2;
                        break;
                    }
                    if !(b'a'..=b'y').contains(&d) {
                        p = start;
                        break;
                    }
                }
            }
            b'[' if at(pattern, p) == b'=' => {
                if at(pattern, p + 1) == 0 {
                    return None;
                }
                if at(pattern, p + 2) != b'=' || at(pattern, p + 3) != b']' {
                    return None;
                }
                p += 4;
            }
            b'[' if at(pattern, p) == b'.' => loop {
                p += 1;
                let d = at(pattern, p);
                if d == 0 {
                    return None;
                }
                if d == b'.' && at(pattern, p + 1) == b']' {
                    p += 2;
                    break;
                }
            },
            _ => {}
        }
    }
    (!negated).then_some(p)
}

/// The POSIX character classes, with their C-locale (ASCII) members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AsciiClass {
    Alnum,
    Alpha,
    Blank,
    Cntrl,
    Digit,
    Graph,
    Lower,
    Print,
    Punct,
    Space,
    Upper,
    Xdigit,
}

impl AsciiClass {
    fn from_name(name: &[u8]) -> Option<Self> {
        Some(match name {
            b"alnum" => Self::Alnum,
            b"alpha" => Self::Alpha,
            b"blank" => Self::Blank,
            b"cntrl" => Self::Cntrl,
            b"digit" => Self::Digit,
            b"graph" => Self::Graph,
            b"lower" => Self::Lower,
            b"print" => Self::Print,
            b"punct" => Self::Punct,
            b"space" => Self::Space,
            b"upper" => Self::Upper,
            b"xdigit" => Self::Xdigit,
            _ => return None,
        })
    }

    fn contains(self, byte: u8) -> bool {
        match self {
            Self::Alnum => byte.is_ascii_alphanumeric(),
            Self::Alpha => byte.is_ascii_alphabetic(),
            Self::Blank => matches!(byte, b' ' | b'\t'),
            Self::Cntrl => byte.is_ascii_control(),
            Self::Digit => byte.is_ascii_digit(),
            Self::Graph => byte.is_ascii_graphic(),
            Self::Lower => byte.is_ascii_lowercase(),
            Self::Print => matches!(byte, 0x20..=0x7e),
            Self::Punct => byte.is_ascii_punctuation(),
            // C's isspace includes the vertical tab, unlike `u8::is_ascii_whitespace`.
            Self::Space => matches!(byte, b' ' | b'\t'..=b'\r'),
            Self::Upper => byte.is_ascii_uppercase(),
            Self::Xdigit => byte.is_ascii_hexdigit(),
        }
    }
}
