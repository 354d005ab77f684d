//! The layout document and the layout module change together: this test parses the field and
//! constant tables out of `docs/channel-spec.md` and compares them with `ivshm_channel::layout`.

use std::collections::BTreeMap;

use ivshm_channel::layout as l;

fn spec() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/channel-spec.md");
    std::fs::read_to_string(path).expect("docs/channel-spec.md")
}

/// Rows of every markdown table, split into trimmed cells.
fn rows(text: &str) -> Vec<Vec<String>> {
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

fn number(s: &str) -> u64 {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
        None => s.parse().unwrap_or_else(|_| panic!("not a number: {s}")),
    }
}

#[test]
fn field_tables_match_the_layout_module() {
    // (offset, width) of every field the code defines.
    let code: BTreeMap<&str, (usize, usize)> = [
        ("header.magic", (l::H_MAGIC, 4)),
        ("header.version", (l::H_VERSION, 4)),
        ("header.layout_size", (l::H_LAYOUT_SIZE, 8)),
        ("header.header_size", (l::H_HEADER_SIZE, 4)),
        ("header.channel_count", (l::H_CHANNEL_COUNT, 4)),
        ("header.entry_size", (l::H_ENTRY_SIZE, 4)),
        ("header.ring_size", (l::H_RING_SIZE, 4)),
        ("header.directory_offset", (l::H_DIRECTORY_OFFSET, 8)),
        ("header.rings_offset", (l::H_RINGS_OFFSET, 8)),
        ("header.ring_control_size", (l::H_RING_CONTROL_SIZE, 4)),
        ("header.flags", (l::H_FLAGS, 4)),
        ("header.lock", (l::H_LOCK, 4)),
        ("entry.state", (l::E_STATE, 4)),
        ("entry.generation", (l::E_GENERATION, 4)),
        ("entry.name", (l::E_NAME, l::NAME_FIELD)),
        ("entry.side_a", (l::E_SIDE_A, 4)),
        ("entry.side_b", (l::E_SIDE_B, 4)),
        ("entry.ring_ab_offset", (l::E_RING_AB_OFFSET, 8)),
        ("entry.ring_ba_offset", (l::E_RING_BA_OFFSET, 8)),
        ("entry.ring_ab_size", (l::E_RING_AB_SIZE, 4)),
        ("entry.ring_ba_size", (l::E_RING_BA_SIZE, 4)),
        ("ring.tail", (l::R_TAIL, 4)),
        ("ring.data_event", (l::R_DATA_EVENT, 4)),
        ("ring.space_event", (l::R_SPACE_EVENT, 4)),
        ("record.len", (l::REC_LEN, 4)),
        ("record.seq", (l::REC_SEQ, 4)),
    ]
    .into_iter()
    .collect();
    let mut documented = BTreeMap::new();
    for row in rows(&spec()) {
        if row.len() >= 3 && row[2].contains('.') && row[0].chars().all(|c| c.is_ascii_digit()) {
            let (offset, width) = (number(&row[0]) as usize, number(&row[1]) as usize);
            assert!(
                documented.insert(row[2].clone(), (offset, width)).is_none(),
                "{} documented twice",
                row[2]
            );
        }
    }
    assert_eq!(documented.len(), code.len(), "documented: {documented:?}");
    for (field, want) in &code {
        assert_eq!(documented.get(*field), Some(want), "{field}: spec vs code");
    }
}

#[test]
fn constant_table_matches_the_layout_module() {
    let code: BTreeMap<&str, u64> = [
        ("VERSION", l::VERSION.into()),
        ("MAGIC", l::MAGIC.into()),
        ("MAGIC_FORMATTING", l::MAGIC_FORMATTING.into()),
        ("HEADER_SIZE", l::HEADER_SIZE.into()),
        ("ENTRY_SIZE", l::ENTRY_SIZE.into()),
        ("RING_CONTROL_SIZE", l::RING_CONTROL_SIZE.into()),
        ("RECORD_ALIGN", l::RECORD_ALIGN.into()),
        ("INLINE_MAX", l::INLINE_MAX.into()),
        ("PAYLOAD_INLINE", l::PAYLOAD_INLINE.into()),
        ("PAYLOAD_ALIGNED", l::PAYLOAD_ALIGNED.into()),
        ("NAME_MAX", l::NAME_MAX as u64),
        ("RING_SIZE_MIN", l::RING_SIZE_MIN.into()),
        ("RING_SIZE_MAX", l::RING_SIZE_MAX.into()),
        ("CHANNELS_MIN", l::CHANNELS_MIN.into()),
        ("CHANNELS_MAX", l::CHANNELS_MAX.into()),
        ("RINGS_ALIGN", l::RINGS_ALIGN),
        ("LOCK_HELD", l::LOCK_HELD.into()),
        ("EVENT_NONE", l::EVENT_NONE.into()),
    ]
    .into_iter()
    .collect();
    let documented: BTreeMap<String, u64> = rows(&spec())
        .into_iter()
        .filter(|r| r.len() == 2 && code.contains_key(r[0].as_str()))
        .map(|r| (r[0].clone(), number(&r[1])))
        .collect();
    for (name, value) in &code {
        assert_eq!(documented.get(*name), Some(value), "constant {name}");
    }
    // The side states table.
    let states: BTreeMap<String, u64> = rows(&spec())
        .into_iter()
        .filter(|r| {
            r.len() == 3 && ["EMPTY", "ATTACHED", "CLOSED", "GONE"].contains(&r[0].as_str())
        })
        .map(|r| (r[0].clone(), number(&r[1])))
        .collect();
    assert_eq!(states["EMPTY"], l::SIDE_EMPTY.into());
    assert_eq!(states["ATTACHED"], l::SIDE_ATTACHED.into());
    assert_eq!(states["CLOSED"], l::SIDE_CLOSED.into());
    assert_eq!(states["GONE"], l::SIDE_GONE.into());
}

#[test]
fn magic_bytes_read_as_documented() {
    assert_eq!(&l::MAGIC.to_le_bytes(), b"ICHN");
    assert_eq!(&l::MAGIC_FORMATTING.to_le_bytes(), b"ICHF");
}
