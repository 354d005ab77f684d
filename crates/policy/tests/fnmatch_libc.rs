//! `ivshm_policy::fnmatch` agrees with the C library's `fnmatch(pattern, name, 0)`.
//!
//! Patterns are generated from a small alphabet that is dense in special bytes (`* ? [ ] ! ^ - \
//! : . =`) and whole class, equivalence and collating-symbol tokens, so that malformed brackets
//! and glibc's corner cases come up often. The test process never calls `setlocale`, so libc
//! runs in the C locale, which is what the crate implements.

use std::ffi::CString;

use ivshm_policy::fnmatch::fnmatch_bytes;
use ivshm_policy::{Pattern, PatternError, RegionName};
use proptest::prelude::*;

/// `libc::fnmatch(pattern, name, 0) == 0`.
fn libc_fnmatch(pattern: &[u8], name: &[u8]) -> bool {
    let pattern = CString::new(pattern).unwrap();
    let name = CString::new(name).unwrap();
    // SAFETY: both pointers come from live `CString`s, so they are valid NUL-terminated strings
    // for the duration of the call; fnmatch only reads them.
    let result = unsafe { libc::fnmatch(pattern.as_ptr(), name.as_ptr(), 0) };
    result == 0
}

fn pattern_token() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "a",
        "b",
        "c",
        "A",
        "1",
        "*",
        "*",
        "?",
        "[",
        "[",
        "]",
        "]",
        "!",
        "^",
        "-",
        "-",
        "\\",
        ":",
        ".",
        "=",
        "[:alpha:]",
        "[:digit:]",
        "[:upper:]",
        "[:lower:]",
        "[:alnum:]",
        "[:punct:]",
        "[:space:]",
        "[:xdigit:]",
        "[:print:]",
        "[:graph:]",
        "[:cntrl:]",
        "[:blank:]",
        "[:nope:]",
        "[:",
        ":]",
        "[=a=]",
        "[=",
        "=]",
        "[.a.]",
        "[.-.]",
        "[.",
        ".]",
        "[!",
        "[^",
        "[]",
        "a-c",
        "\\]",
        "\\-",
        "\\\\",
    ])
}

fn name_byte() -> impl Strategy<Value = u8> {
    prop::sample::select(b"abcA1-[]!^:\\*?.= \t_".to_vec())
}

fn pattern() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(pattern_token(), 0..10).prop_map(|tokens| tokens.concat().into_bytes())
}

fn check(pattern: &[u8], name: &[u8]) -> Result<(), TestCaseError> {
    let ours = fnmatch_bytes(pattern, name);
    let theirs = libc_fnmatch(pattern, name);
    prop_assert_eq!(
        ours,
        theirs,
        "pattern {:?} name {:?}",
        String::from_utf8_lossy(pattern),
        String::from_utf8_lossy(name)
    );
    Ok(())
}

#[test]
fn posixly_correct_is_unset() {
    // With POSIXLY_CORRECT set, glibc stops treating `^` as negation; the comparison below
    // assumes the default.
    assert!(
        std::env::var_os("POSIXLY_CORRECT").is_none(),
        "unset POSIXLY_CORRECT to run these tests"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6000))]

    #[test]
    fn agrees_with_libc_on_generated_names(pattern in pattern(), name in prop::collection::vec(name_byte(), 0..8)) {
        check(&pattern, &name)?;
    }

    #[test]
    fn agrees_with_libc_on_tiny_alphabet(
        pattern in prop::collection::vec(prop::sample::select(b"ab*?[]!-\\".to_vec()), 0..9),
        name in prop::collection::vec(prop::sample::select(b"ab[]-".to_vec()), 0..6),
    ) {
        check(&pattern, &name)?;
    }

    #[test]
    fn agrees_with_libc_on_arbitrary_ascii(
        pattern in prop::collection::vec(1u8..0x80, 0..12),
        name in prop::collection::vec(1u8..0x80, 0..8),
    ) {
        check(&pattern, &name)?;
    }

    /// Names built from the pattern's own bytes, so that matches are frequent.
    #[test]
    fn agrees_with_libc_on_names_from_the_pattern(pattern in pattern(), picks in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        let bytes: Vec<u8> = if pattern.is_empty() {
            Vec::new()
        } else {
            picks.iter().map(|i| pattern[i.index(pattern.len())]).collect()
        };
        check(&pattern, &bytes)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// A pattern refused because it can never match indeed matches no legal region name, by
    /// our fnmatch and by libc's.
    #[test]
    fn patterns_refused_as_never_matching_match_no_legal_name(
        pattern in prop::collection::vec(prop::sample::select(b"ab-.*?\\:!".to_vec()), 1..8),
        names in prop::collection::vec("[ab][ab.-]{0,6}", 1..8),
    ) {
        let Ok(text) = String::from_utf8(pattern.clone()) else { return Ok(()); };
        if let Err(PatternError::NeverMatches { .. }) = Pattern::new(&text) {
            for name in names.iter().filter(|n| RegionName::new(n).is_ok()) {
                prop_assert!(!fnmatch_bytes(&pattern, name.as_bytes()), "{text:?} matched {name:?}");
                prop_assert!(!libc_fnmatch(&pattern, name.as_bytes()), "libc: {text:?} matched {name:?}");
            }
        }
    }
}

#[test]
fn agrees_with_libc_on_class_name_length_limits() {
    for letters in (0..20).chain(2040..2056) {
        let name = "a".repeat(letters);
        for pattern in [
            format!("[[:{name}:]]"),
            format!("[[:{name}]"),
            format!("[a[:{name}:]]"),
            format!("[a[:{name}]"),
        ] {
            for subject in ["a", "[", ":", "]", "b"] {
                assert_eq!(
                    fnmatch_bytes(pattern.as_bytes(), subject.as_bytes()),
                    libc_fnmatch(pattern.as_bytes(), subject.as_bytes()),
                    "pattern {pattern:?} name {subject:?}"
                );
            }
        }
    }
}
