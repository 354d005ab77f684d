//! `docs/bridge.md` and `ivshm_bridge::frame` change together: this test reads the frame,
//! `HELLO` and reason tables out of the document and compares them with the constants.

use std::collections::BTreeMap;

use ivshm_bridge::frame as f;

fn rows() -> Vec<Vec<String>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/bridge.md");
    let text = std::fs::read_to_string(path).expect("docs/bridge.md");
    text.lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect()
        })
        .collect()
}

#[test]
fn header_and_hello_fields_match() {
    let code: BTreeMap<&str, (usize, usize)> = [
        ("type", (f::H_TYPE, 1)),
        ("flags", (f::H_FLAGS, 1)),
        ("reserved", (f::H_RESERVED, 2)),
        ("conn", (f::H_CONN, 4)),
        ("arg", (f::H_ARG, 4)),
        ("reserved2", (f::H_RESERVED2, 4)),
        ("hello.magic", (f::HELLO_MAGIC, 4)),
        ("hello.version", (f::HELLO_VERSION, 2)),
        ("hello.role", (f::HELLO_ROLE, 1)),
        ("hello.reserved", (f::HELLO_RESERVED, 1)),
        ("hello.window", (f::HELLO_WINDOW, 4)),
        ("hello.max_data", (f::HELLO_MAX_DATA, 4)),
        ("hello.max_connections", (f::HELLO_MAX_CONNECTIONS, 4)),
        ("hello.keepalive_ms", (f::HELLO_KEEPALIVE_MS, 4)),
        ("hello.session", (f::HELLO_SESSION, 8)),
    ]
    .into_iter()
    .collect();
    let mut seen = BTreeMap::new();
    for r in rows() {
        if r.len() >= 3 && code.contains_key(r[2].as_str()) {
            if let (Ok(o), Ok(w)) = (r[0].parse(), r[1].parse()) {
                seen.insert(r[2].clone(), (o, w));
            }
        }
    }
    for (name, want) in &code {
        assert_eq!(
            seen.get(*name),
            Some(want),
            "field {name} in docs/bridge.md"
        );
    }
    let header_end = f::H_RESERVED2 + 4;
    assert_eq!(header_end, f::HEADER_LEN);
    assert_eq!(f::HELLO_SESSION + 8, f::HELLO_LEN);
}

#[test]
fn types_and_reasons_match() {
    let code: BTreeMap<&str, u32> = [
        ("HELLO", f::kind::HELLO.into()),
        ("OPEN", f::kind::OPEN.into()),
        ("OPENED", f::kind::OPENED.into()),
        ("DATA", f::kind::DATA.into()),
        ("CREDIT", f::kind::CREDIT.into()),
        ("SHUT", f::kind::SHUT.into()),
        ("CLOSE", f::kind::CLOSE.into()),
        ("RESET", f::kind::RESET.into()),
        ("PING", f::kind::PING.into()),
        ("SOCKET", f::reason::SOCKET),
        ("REFUSED", f::reason::REFUSED),
        ("CONNECT_FAILED", f::reason::CONNECT_FAILED),
        ("PROTOCOL", f::reason::PROTOCOL),
        ("LIMIT", f::reason::LIMIT),
        ("STOPPING", f::reason::STOPPING),
    ]
    .into_iter()
    .collect();
    let mut seen = BTreeMap::new();
    for r in rows() {
        if r.len() >= 2 && code.contains_key(r[0].as_str()) {
            if let Ok(v) = r[1].parse::<u32>() {
                seen.insert(r[0].clone(), v);
            }
        }
    }
    for (name, want) in &code {
        assert_eq!(seen.get(*name), Some(want), "{name} in docs/bridge.md");
    }
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/bridge.md"))
            .unwrap();
    assert!(text.contains(&format!("`{}`", std::str::from_utf8(&f::MAGIC).unwrap())));
    assert!(text.contains(&format!(
        "{}..={}",
        f::KEEPALIVE_MIN_MS,
        f::KEEPALIVE_MAX_MS
    )));
    assert!(text.contains(&format!("0..={} bytes", f::ORIGIN_MAX)));
}
