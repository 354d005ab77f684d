//! The host peer's v0 handshake state machine (`ivshm_client::Handshake`) and the peer table it
//! hands over, fed arbitrary message sequences with real eventfds.
//!
//! The input is cut into 9-byte records: a flag byte and an 8-byte little-endian value. Flag bit 0
//! attaches a fresh eventfd to the message; bit 1 folds the value into `-2..=67`, so that ids
//! repeat, hit our own id, and the shared-memory marker and invalid values show up often.
//!
//! Must never panic. Checked:
//! - the first message is accepted only as version 0 without an fd, the second only as an id
//!   without an fd, and a completed handshake reports that id as its own;
//! - once finished (complete or failed), the machine refuses further messages;
//! - no peer ever holds more than the maximum of 64 vectors;
//! - after the handshake, every `Left` is of a peer the user knew of: listed by the table at
//!   the start (or that arrived before our own first vector: there before us) or reported
//!   `Joined` before (a peer whose vectors were still arriving is reported joined, then left);
//!   every `Joined` is of a peer not known yet; the table lists exactly those peers;
//! - no fd leaks: when everything is dropped, the process has as many open fds as before.

#![no_main]

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;

use ivshm_client::handshake::Step;
use ivshm_client::{Handshake, HandshakeError, PeerEvent};
use ivshm_proto::v0::MAX_VECTORS;
use libfuzzer_sys::fuzz_target;
use rustix::event::{eventfd, EventfdFlags};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn decode(record: &[u8]) -> (i64, Option<OwnedFd>) {
    let flags = record[0];
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&record[1..9]);
    let mut value = i64::from_le_bytes(bytes);
    if flags & 2 != 0 {
        value = value.rem_euclid(70) - 2;
    }
    let fd = (flags & 1 != 0)
        .then(|| eventfd(0, EventfdFlags::CLOEXEC).ok())
        .flatten();
    (value, fd)
}

fn run(data: &[u8]) {
    let mut records = data.chunks_exact(9).map(decode);
    let mut handshake = Handshake::default();
    let mut index = 0usize;
    let mut own_id_sent = None;
    let established = loop {
        let Some((value, fd)) = records.next() else {
            return;
        };
        let has_fd = fd.is_some();
        let result = handshake.feed(value, fd);
        match index {
            0 => assert_eq!(result.is_ok(), value == 0 && !has_fd, "version {value}"),
            1 => {
                let valid = (0..=65535).contains(&value) && !has_fd;
                assert_eq!(result.is_ok(), valid, "own id {value}");
                own_id_sent = Some(value);
            }
            _ => {}
        }
        index += 1;
        match result {
            Ok(Step::Continue) => {}
            Ok(Step::Complete(established)) => break established,
            Err(_) => {
                let again = handshake.feed(0, None);
                assert!(matches!(again, Err(HandshakeError::Finished)));
                return;
            }
        }
    };
    assert_eq!(Some(i64::from(established.own_id)), own_id_sent);
    assert!(matches!(
        handshake.feed(0, None),
        Err(HandshakeError::Finished)
    ));

    let mut table = established.table;
    // The peers the user knows of: those the table lists at the start, then as its events
    // say. A peer whose vectors were still arriving is reported joined, then left, when it
    // goes: every `Left` must follow its presence or a `Joined` (in the same batch or earlier).
    let mut known: BTreeSet<u16> = table.peer_ids().into_iter().collect();
    for (value, fd) in records {
        // Before our own first vector, a peer's vectors are those of a peer that was there
        // before us (QEMU's server sends them first): present, never reported as joining.
        let before_own_vectors = table.own_vector_count() == 0;
        if let Ok(applied) = table.apply(value, fd) {
            for event in applied.events {
                observe(&mut known, event);
            }
        }
        if before_own_vectors {
            known.extend(table.peer_ids());
        }
        assert!(table.own_vector_count() <= MAX_VECTORS);
        for id in table.peer_ids() {
            assert!(table.peer_vector_count(id).unwrap_or(0) <= MAX_VECTORS);
        }
        assert_eq!(
            table.peer_ids().into_iter().collect::<BTreeSet<u16>>(),
            known,
            "the table lists other peers than its events announced"
        );
    }
    for event in table.end_of_burst() {
        assert!(matches!(event, PeerEvent::Joined { .. }), "{event:?}");
        observe(&mut known, event);
    }
    assert_eq!(
        table.peer_ids().into_iter().collect::<BTreeSet<u16>>(),
        known
    );
}

/// Checks one event against the peers known so far and updates them: a join is of a peer not
/// known yet with at most 64 vectors, a leave of a known peer.
fn observe(known: &mut BTreeSet<u16>, event: PeerEvent) {
    match event {
        PeerEvent::Joined { id, vectors } => {
            assert!(
                vectors <= MAX_VECTORS,
                "peer {id} joined with {vectors} vectors"
            );
            assert!(known.insert(id), "peer {id} joined twice");
        }
        PeerEvent::Left { id } => {
            assert!(known.remove(&id), "peer {id} left but was never there");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let before = open_fds();
    run(data);
    assert_eq!(open_fds(), before, "an fd leaked");
});
