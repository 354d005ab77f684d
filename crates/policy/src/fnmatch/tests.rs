use super::*;

fn yes(pattern: &str, name: &str) {
    assert!(fnmatch(pattern, name), "{pattern:?} should match {name:?}");
}

fn no(pattern: &str, name: &str) {
    assert!(
        !fnmatch(pattern, name),
        "{pattern:?} should not match {name:?}"
    );
}

#[test]
fn literals_match_exactly() {
    yes("pluto", "pluto");
    no("pluto", "plutoplanet");
    no("pluto", "plut");
    no("pluto", "Pluto");
    yes("", "");
    no("", "a");
    no("a", "");
}

#[test]
fn star_matches_any_run() {
    yes("*", "");
    yes("*", "anything");
    yes("test*", "test");
    yes("test*", "testing");
    no("test*", "tes");
    yes("*mem", "guest0mem");
    yes("a*b*c", "aXXbYYc");
    yes("a*b*c", "abc");
    no("a*b*c", "acb");
    yes("**", "x");
    yes("a**b", "ab");
    yes("*a", "aaa");
    no("*a", "aab");
    yes("*ab", "aab");
}

#[test]
fn question_mark_matches_one_byte() {
    yes("?", "x");
    no("?", "");
    no("?", "xy");
    yes("gu?st", "guest");
    yes("*?", "a");
    no("*??", "a");
    yes("?*?", "ab");
}

#[test]
fn backslash_escapes() {
    yes(r"test\*", "test*");
    no(r"test\*", "testing");
    yes(r"\?", "?");
    no(r"\?", "x");
    yes(r"\[a]", "[a]");
    yes(r"a\\b", r"a\b");
    yes(r"\a", "a");
    // A trailing lone backslash matches nothing, not even a backslash.
    no("a\\", "a\\");
    no("a\\", "a");
    no("*\\", "x\\");
}

#[test]
fn bracket_sets_and_ranges() {
    yes("[abc]", "b");
    no("[abc]", "d");
    yes("[a-c]x", "bx");
    no("[a-c]x", "dx");
    yes("pluto[0-9]", "pluto7");
    yes("[a-cx-z]", "y");
    yes("[-a]", "-");
    yes("[a-]", "-");
    yes("[a-]", "a");
    // A reversed range is empty.
    no("[z-a]", "m");
    // Ranges compare byte values.
    yes("[+--]", ",");
    yes(r"[\]]", "]");
    yes(r"[a\-z]", "-");
    no(r"[a\-z]", "m");
    yes(r"[a-\z]", "m");
}

#[test]
fn bracket_negation_with_bang_and_caret() {
    yes("[!abc]", "d");
    no("[!abc]", "a");
    yes("[^abc]", "d");
    no("[^abc]", "b");
    yes("[!0-9]x", "ax");
    no("[!0-9]x", "5x");
    no("[!a]", "");
}

#[test]
fn closing_bracket_first_is_literal() {
    yes("[]]", "]");
    yes("[]a]", "a");
    yes("[]a]", "]");
    no("[]a]", "b");
    yes("[!]]", "a");
    no("[!]]", "]");
    yes("[^]a]", "b");
    yes("[]-a]", "^");
}

#[test]
fn character_classes() {
    let cases: &[(&str, &[u8], &[u8])] = &[
        ("alpha", b"aZ", b"0_-"),
        ("digit", b"09", b"aZ"),
        ("alnum", b"a5Z", b"_-."),
        ("upper", b"AZ", b"az"),
        ("lower", b"az", b"AZ"),
        ("space", b" \t\n\x0b\x0c\r", b"a_"),
        ("blank", b" \t", b"\n_"),
        ("punct", b"!-_~", b"a0 "),
        ("xdigit", b"09afAF", b"gG"),
        ("print", b" a~", b"\x7f\t"),
        ("graph", b"a~!", b" \x7f"),
        ("cntrl", b"\x01\x1f\x7f", b" a"),
    ];
    for &(class, members, others) in cases {
        let pattern = format!("[[:{class}:]]");
        for &b in members {
            assert!(
                fnmatch_bytes(pattern.as_bytes(), &[b]),
                "{pattern} vs {b:#x}"
            );
        }
        for &b in others {
            assert!(
                !fnmatch_bytes(pattern.as_bytes(), &[b]),
                "{pattern} vs {b:#x}"
            );
        }
    }
    yes("[[:alpha:][:digit:]_]", "_");
    yes("[![:digit:]]", "x");
    no("[![:digit:]]", "1");
    // Bytes above 0x7f belong to no class in the C locale.
    assert!(!fnmatch_bytes(b"[[:alpha:]]", &[0xe9]));
    assert!(!fnmatch_bytes(b"[[:print:]]", &[0xa0]));
}

#[test]
fn unknown_class_matches_nothing() {
    no("[[:nope:]]", "n");
    no("[[:nope:]a]", "a");
    no("[![:nope:]]", "x");
}

#[test]
fn not_a_class_is_read_as_bytes() {
    // `[:` followed by something that is not a lowercase name: ordinary members.
    yes("[[:A]", "[");
    yes("[[:A]", ":");
    yes("[[:A]", "A");
    no("[[:A]", "B");
}

#[test]
fn equivalence_classes_and_collating_symbols() {
    yes("[[=a=]]", "a");
    no("[[=a=]]", "b");
    yes("[[.-.]]", "-");
    yes("[[.a.]-c]", "b");
    yes("[a-[.c.]]", "b");
    // Multi-byte collating symbols do not exist in the C locale.
    no("[[.ab.]]", "a");
}

#[test]
fn unterminated_bracket_is_a_literal() {
    yes("[", "[");
    yes("[ab", "[ab");
    no("[ab", "a");
    yes("x[", "x[");
    yes("*[", "abc[");
    yes("[!", "[!");
    no("[", "");
}

#[test]
fn glibc_corner_cases() {
    // The range has no end: never matches, not even literally.
    no("[a-", "[a-");
    no("[a-", "a");
    // Unterminated even after a matching member: the `[` is literal.
    no("[[", "[");
    yes("[[", "[[");
    yes("*[[", "[[");
    no("[a", "a");
    // A malformed `[=` after the matching member makes the bracket fail.
    no("[a[=b]", "a");
    no("[a[=b]", "[a[=b]");
    // `[.a.]-]`: the dash is not a range and `a` itself is skipped.
    no("[[.a.]-]", "a");
    yes("[[.a.]-]", "-");
}

#[test]
fn nul_ends_pattern_and_name() {
    assert!(fnmatch_bytes(b"ab\0cd", b"ab"));
    assert!(fnmatch_bytes(b"ab", b"ab\0zz"));
    assert!(fnmatch("a*\0b", "axx"));
}

#[test]
fn many_stars_are_not_exponential() {
    let pattern = "*a".repeat(40) + "b";
    let name = "a".repeat(200);
    // Quadratic at worst: 81 × 200 steps. An exponential matcher would not return.
    assert!(!fnmatch(&pattern, &name));
    let pattern = "*a".repeat(40) + "*";
    assert!(fnmatch(&pattern, &name));
    let pattern = "*?".repeat(30) + "*[!a]";
    assert!(!fnmatch(&pattern, &name));
}

#[test]
fn pattern_type_checks_writability() {
    assert_eq!(Pattern::new(""), Err(PatternError::Empty));
    assert_eq!(
        Pattern::new("a b"),
        Err(PatternError::ForbiddenByte { byte: ' ' })
    );
    assert_eq!(
        Pattern::new("a#"),
        Err(PatternError::ForbiddenByte { byte: '#' })
    );
    assert_eq!(
        Pattern::new("a\0"),
        Err(PatternError::ForbiddenByte { byte: '\0' })
    );
    assert_eq!(Pattern::new("ab\\"), Err(PatternError::TrailingBackslash));
    // `test\*` from a shell command line matches only the name "test*", which cannot exist.
    let shell = Pattern::new("test\\*").unwrap_err();
    assert_eq!(
        shell,
        PatternError::NeverMatches {
            byte: '*',
            written: Written::Escaped,
            hint: WildcardHint::WriteBare,
        }
    );
    assert_eq!(
        shell.to_string(),
        "pattern can never match: it needs a literal '*' (escaped with a backslash), and region \
         names only contain A-Z a-z 0-9 _ . + -; the backslash is only needed on a shell command \
         line: write the wildcard bare"
    );
    assert_eq!(
        Pattern::new("a:b*").unwrap_err().to_string(),
        "pattern can never match: it needs a literal ':' (written as is), and region names only \
         contain A-Z a-z 0-9 _ . + -"
    );
    assert_eq!(
        Pattern::new("a:b*"),
        Err(PatternError::NeverMatches {
            byte: ':',
            written: Written::AsIs,
            hint: WildcardHint::None,
        })
    );
    assert_eq!(
        Pattern::new("\\\\*"),
        Err(PatternError::NeverMatches {
            byte: '\\',
            written: Written::Escaped,
            hint: WildcardHint::None
        })
    );
    // Escaped name bytes are fine, and bracket expressions are not judged.
    Pattern::new("\\t\\e\\s\\t*").unwrap();
    Pattern::new("test[\\*x]").unwrap();
    Pattern::new("[!:]*").unwrap();
    // An even run of backslashes ends in an escaped (literal) backslash, not a lone one.
    assert_eq!(
        Pattern::new("ab\\\\"),
        Err(PatternError::NeverMatches {
            byte: '\\',
            written: Written::Escaped,
            hint: WildcardHint::None
        })
    );
    let long = "x".repeat(MAX_PATTERN_LEN + 1);
    assert_eq!(
        Pattern::new(&long),
        Err(PatternError::TooLong { len: long.len() })
    );
    let pattern = Pattern::new("test*").unwrap();
    assert!(pattern.matches("testing"));
    assert!(!pattern.matches("tes"));
    assert_eq!(pattern.to_string(), "test*");
}
