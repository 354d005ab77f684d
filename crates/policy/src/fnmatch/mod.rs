//! POSIX `fnmatch(pattern, name, 0)`, byte for byte as glibc does it in the C locale.
//!
//! QNX's `allow`/`deny` options take "the same syntax as shell file name expansion"; this module
//! is that matcher. With flags `0` (no `FNM_PATHNAME`, `FNM_PERIOD`, `FNM_NOESCAPE`) the rules are:
//!
//! * `*` matches any run of bytes, including none; `?` matches exactly one byte.
//! * `\x` matches the byte `x` literally; a trailing lone `\` makes the pattern match nothing.
//! * `[...]` matches one byte from a set: single bytes, ranges `a-z` (compared as byte values),
//!   character classes `[:alpha:]` `[:digit:]` `[:alnum:]` `[:upper:]` `[:lower:]` `[:space:]`
//!   `[:punct:]` `[:xdigit:]` `[:print:]` `[:graph:]` `[:cntrl:]` `[:blank:]` (ASCII, as in the C
//!   locale), the one-byte equivalence class `[=x=]` and collating symbol `[.x.]` of the C locale,
//!   and `\x` escapes. `!` or `^` right after `[` negates the set; `]` right after `[`, `[!` or
//!   `[^` is a literal member. An unknown class name (`[[:foo:]]`) makes the bracket match nothing.
//! * A `[` without a closing `]` is an ordinary byte that matches a literal `[`.
//! * Everything else matches itself. Matching is case-sensitive and byte-based: names and patterns
//!   are not decoded as UTF-8 and bytes above 0x7f belong to no class.
//!
//! C strings end at the first NUL, so both the pattern and the name are cut at their first NUL
//! byte, exactly as `libc::fnmatch` would see them.
//!
//! The corner cases follow glibc's `fnmatch_loop.c` (2.34 and later: single-byte version, C
//! locale, `POSIXLY_CORRECT` unset so that `^` negates), which the tests check against
//! `libc::fnmatch` on generated patterns. Examples of such corners: `[a-` never matches (the
//! range has no end), `[[.a.]-]` does not match `a`, and a bracket with a malformed `[=` after
//! the matching member (`[a[=b]`) fails.
//!
//! # Complexity
//!
//! Stars are handled with the classic "backtrack to the last star" loop, which is also what glibc
//! does (an inner segment that reaches the next `*` commits to the earliest position), so the
//! cost is at most `O(pattern.len() × name.len())` byte steps: `*a*a*a*a*a*b` against a long run
//! of `a` is not exponential.

mod bracket;
mod pattern;

pub use pattern::{Pattern, PatternError, WildcardHint, Written, MAX_PATTERN_LEN};

/// Returns whether `name` matches the shell wildcard `pattern`, as `fnmatch(pattern, name, 0)`.
///
/// ```
/// use ivshm_policy::fnmatch::fnmatch;
/// assert!(fnmatch("test*", "testing"));
/// assert!(fnmatch("pluto[0-9]", "pluto7"));
/// assert!(!fnmatch("pluto[!0-9]", "pluto7"));
/// assert!(fnmatch("[[:upper:]]*", "Mars"));
/// ```
pub fn fnmatch(pattern: &str, name: &str) -> bool {
    fnmatch_bytes(pattern.as_bytes(), name.as_bytes())
}

/// [`fnmatch`] on raw bytes (for names read from a guest's factory page).
pub fn fnmatch_bytes(pattern: &[u8], name: &[u8]) -> bool {
    let pattern = until_nul(pattern);
    let name = until_nul(name);

    // Pattern position and name position of the current attempt.
    let mut p = 0;
    let mut n = 0;
    // After the most recent `*`: the pattern position right behind it and the name position the
    // current attempt of the following segment started at.
    let mut last_star: Option<(usize, usize)> = None;

    loop {
        if pattern.get(p) == Some(&b'*') {
            p += 1;
            last_star = Some((p, n));
            continue;
        }
        if p == pattern.len() && n == name.len() {
            return true;
        }
        let step = match name.get(n) {
            Some(&byte) if p < pattern.len() => match_one(pattern, p, byte),
            _ => None,
        };
        if let Some(next) = step {
            p = next;
            n += 1;
            continue;
        }
        // Mismatch: let the last star swallow one more byte and retry the segment after it.
        match last_star {
            Some((star_p, star_n)) if star_n < name.len() => {
                last_star = Some((star_p, star_n + 1));
                p = star_p;
                n = star_n + 1;
            }
            _ => return false,
        }
    }
}

/// Matches the single pattern element at `pattern[p]` (not a `*`) against `byte`; on success
/// returns the position of the next element.
fn match_one(pattern: &[u8], p: usize, byte: u8) -> Option<usize> {
    match pattern[p] {
        b'?' => Some(p + 1),
        b'\\' => match pattern.get(p + 1) {
            Some(&escaped) if escaped == byte => Some(p + 2),
            _ => None,
        },
        b'[' => bracket::match_bracket(pattern, p + 1, byte),
        literal => (literal == byte).then_some(p + 1),
    }
}

/// The part of `bytes` before the first NUL, as C sees a string.
fn until_nul(bytes: &[u8]) -> &[u8] {
    match bytes.iter().position(|&b| b == 0) {
        Some(end) => &bytes[..end],
        None => bytes,
    }
}

#[cfg(test)]
mod tests;
