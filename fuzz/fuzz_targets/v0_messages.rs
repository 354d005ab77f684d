//! QEMU ivshmem protocol v0 message classification on arbitrary values.
//!
//! The input is cut into 9-byte records: a flag byte (bit 0: an fd came with the message) and an
//! 8-byte little-endian value. For each record, `ivshm_proto::v0` must never panic and must agree
//! with QEMU's rules (`hw/misc/ivshmem-pci.c`, `docs/specs/ivshmem-spec.rst`):
//! - the wire encoding round-trips and is little-endian;
//! - the version message is accepted only as `0` without an fd;
//! - the own-id message is accepted only as `0..=65535` without an fd;
//! - any later message is accepted only as `-1` with an fd (shared memory) or `0..=65535`
//!   (with an fd: a peer's vector; without: that peer left).

#![no_main]

use ivshm_proto::v0::{
    classify, decode, encode, parse_own_id, parse_version, Message, MAX_PEER_ID, SHM_MARKER,
};
use libfuzzer_sys::fuzz_target;

fn check(value: i64, has_fd: bool) {
    let bytes = encode(value);
    assert_eq!(decode(bytes), value);
    assert_eq!(bytes, value.to_le_bytes());

    assert_eq!(
        parse_version(value, has_fd).is_ok(),
        value == 0 && !has_fd,
        "version {value} fd {has_fd}"
    );

    let in_id_range = (0..=i64::from(MAX_PEER_ID)).contains(&value);
    match parse_own_id(value, has_fd) {
        Ok(id) => {
            assert!(in_id_range && !has_fd, "own id {value} fd {has_fd}");
            assert_eq!(i64::from(id), value);
        }
        Err(_) => assert!(!in_id_range || has_fd, "own id {value} fd {has_fd}"),
    }

    match classify(value, has_fd) {
        Ok(Message::SharedMemory) => assert!(value == SHM_MARKER && has_fd),
        Ok(Message::PeerVector { id }) => assert!(has_fd && i64::from(id) == value),
        Ok(Message::PeerGone { id }) => assert!(!has_fd && i64::from(id) == value),
        Err(error) => {
            assert!(
                !in_id_range && !(value == SHM_MARKER && has_fd),
                "{value}: {error}"
            );
            // Every rejection explains itself.
            assert!(!error.to_string().is_empty());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    for record in data.chunks_exact(9) {
        let has_fd = record[0] & 1 != 0;
        let mut value = [0u8; 8];
        value.copy_from_slice(&record[1..]);
        check(i64::from_le_bytes(value), has_fd);
    }
});
