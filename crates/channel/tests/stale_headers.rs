//! Payloads that look like record headers never become messages.
//!
//! A producer must make sure that the `seq` word where the next record will start does not
//! read as published: the ring's bytes there may be a payload of an earlier lap, which can hold
//! anything. The producer invalidates such words ahead of its position in batches (see
//! `src/ring.rs`); this test forges the most dangerous payloads — at every 64-byte slot a
//! payload covers, a valid length and the `seq` the next lap's record at that slot will carry —
//! and checks, after every burst of receives, that exactly the committed messages arrive and no
//! phantom one after them. Reservations that write such payloads and are then dropped (nothing
//! published) are part of the schedule.

mod common;

use std::time::Duration;

use common::{message, pair, regions};
use ivshm_channel::layout::{payload_offset, record_size};
use ivshm_channel::{ChannelError, Spin};
use proptest::prelude::*;

const RING: u32 = 4096;

/// A `len`-byte payload for a record at position `pos` whose every slot-header word (bytes 0..8
/// of a 64-byte slot) reads as a published record `ahead` bytes later: length 1, `seq` = slot +
/// `ahead` + 1. The other bytes come from `seq` (to check delivery).
fn forged(seq: u64, pos: u32, len: usize, ahead: u32) -> Vec<u8> {
    let mut bytes = message(seq, len);
    let start = pos + payload_offset(len as u32);
    for (i, b) in bytes.iter_mut().enumerate() {
        let at = start + i as u32;
        let slot = at & !63;
        let header = [1u32.to_le_bytes(), (slot + ahead + 1).to_le_bytes()].concat();
        if let Some(&v) = header.get((at - slot) as usize) {
            *b = v;
        }
    }
    bytes
}

#[derive(Debug, Clone)]
enum Step {
    /// Send a message of this many bytes.
    Send(usize),
    /// Reserve this many bytes, write a forged payload, drop the reservation.
    Cancel(usize),
    /// Receive until the ring is empty.
    Drain,
}

fn step() -> impl Strategy<Value = Step> {
    // Sizes around the inline limit and the slot size matter most; larger ones wrap the ring.
    let size = prop_oneof![1usize..=130, 1usize..=(RING as usize - 64)];
    prop_oneof![
        6 => size.clone().prop_map(Step::Send),
        1 => size.prop_map(Step::Cancel),
        2 => Just(Step::Drain),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn forged_headers_in_payloads_are_never_received(steps in prop::collection::vec(step(), 1..300)) {
        let (_bus, a, b) = regions(1 << 20, 2, RING);
        prop_assert_eq!(a.geometry().ring_size, RING);
        let (mut x, mut y) = pair(&a, &b, "forged", Spin::Never);
        // The producer's position, followed here from the record sizes.
        let mut pos = 0u32;
        let (mut sent, mut received) = (Vec::new(), 0usize);
        let mut buf = Vec::new();
        let zero = Some(Duration::ZERO);
        let drain = |y: &mut ivshm_channel::Channel, received: &mut usize, sent: &[Vec<u8>], buf: &mut Vec<u8>| -> Result<(), TestCaseError> {
            loop {
                match y.receiver().try_recv(buf) {
                    Ok(_) => {
                        prop_assert!(*received < sent.len(), "a message nobody sent arrived");
                        prop_assert_eq!(&*buf, &sent[*received]);
                        *received += 1;
                    }
                    Err(ChannelError::WouldBlock) => {
                        prop_assert_eq!(*received, sent.len());
                        return Ok(());
                    }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
        };
        for step in steps {
            match step {
                Step::Send(len) => {
                    // The next lap's records at these slots.
                    let msg = forged(sent.len() as u64, pos, len, RING);
                    match x.sender().try_send(&msg) {
                        Ok(()) => {
                            pos += record_size(len as u32);
                            sent.push(msg);
                        }
                        Err(ChannelError::WouldBlock) => drain(&mut y, &mut received, &sent, &mut buf)?,
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
                Step::Cancel(len) => match x.sender().reserve(len, zero) {
                    Ok(mut r) => {
                        // Nothing is published: later records of this lap start there.
                        prop_assert!(r.write_at(0, &forged(u64::MAX, pos, len, 0))?);
                        drop(r);
                    }
                    Err(ChannelError::WouldBlock) => {}
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                },
                Step::Drain => drain(&mut y, &mut received, &sent, &mut buf)?,
            }
        }
        drain(&mut y, &mut received, &sent, &mut buf)?;
    }
}

/// A reservation writes the message in place: the receiver gets exactly what was written, in
/// pieces or whole; out-of-range writes are refused; a dropped reservation sends nothing.
#[test]
fn reservations_write_in_place() {
    let (_bus, a, b) = regions(1 << 20, 2, RING);
    let (mut x, mut y) = pair(&a, &b, "reserve", Spin::Never);
    let zero = Some(Duration::ZERO);
    let mut r = x.sender().reserve(100, zero).unwrap();
    assert_eq!(r.len(), 100);
    assert!(r.write_at(0, &[1; 60]).unwrap());
    assert!(r.write_at(60, &[2; 40]).unwrap());
    assert!(!r.write_at(61, &[3; 40]).unwrap());
    assert!(!r.write_at(usize::MAX, &[3]).unwrap());
    r.commit().unwrap();
    drop(x.sender().reserve(10, zero).unwrap());
    let mut buf = Vec::new();
    assert_eq!(y.receiver().try_recv(&mut buf).unwrap(), 100);
    assert_eq!(buf[..60], [1; 60]);
    assert_eq!(buf[60..], [2; 40]);
    assert!(matches!(
        y.receiver().try_recv(&mut buf),
        Err(ChannelError::WouldBlock)
    ));
    assert!(matches!(
        x.sender().reserve(0, zero),
        Err(ChannelError::Empty)
    ));
    assert!(matches!(
        x.sender().reserve(RING as usize, zero),
        Err(ChannelError::TooLarge { .. })
    ));
}
