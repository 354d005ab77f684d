//! Model checking of the ring protocol and the sleep/wake handshake with loom.
//!
//! Run with `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p ivshm-channel --test
//! loom --release` (scripts/test does). The code checked is the crate's own: `--cfg loom` only
//! swaps the atomics, fences, mutexes and the memory accessor (`src/sync.rs`, `src/shm.rs`).
//! Doorbells are a model too: a counter per peer under a loom mutex, waited on with a loom
//! condition variable (an eventfd's semantics: rings add up, a wait consumes them all).
//!
//! Checked in every explored execution: every message arrives once, whole and in order; no
//! thread sleeps forever (loom reports a deadlock if every thread blocks: a lost wake-up);
//! nothing panics.
#![cfg(loom)]

use std::sync::Arc;
use std::time::Duration;

use ivshm_channel::{ChannelOptions, Doorbell, DoorbellError, FormatOptions, Region, Spin};
use loom::sync::{Condvar, Mutex};

#[derive(Debug, Default)]
struct Bus {
    counts: Mutex<[u64; 2]>,
    cv: Condvar,
}

#[derive(Debug)]
struct ModelDoorbell {
    bus: Arc<Bus>,
    id: u16,
}

impl Doorbell for ModelDoorbell {
    fn own_id(&self) -> u16 {
        self.id
    }
    fn vectors(&self) -> u16 {
        1
    }
    fn ring(&self, peer: u16, vector: u16) -> Result<(), DoorbellError> {
        assert!(peer < 2 && vector == 0);
        let mut c = self.bus.counts.lock().unwrap();
        c[usize::from(peer)] += 1;
        self.bus.cv.notify_all();
        Ok(())
    }
    fn wait(&self, _vector: u16, _timeout: Option<Duration>) -> Result<bool, DoorbellError> {
        let mut c = self.bus.counts.lock().unwrap();
        while c[usize::from(self.id)] == 0 {
            c = self.bus.cv.wait(c).unwrap();
        }
        c[usize::from(self.id)] = 0;
        Ok(true)
    }
    fn take(&self, _vector: u16) -> Result<bool, DoorbellError> {
        let mut c = self.bus.counts.lock().unwrap();
        let had = c[usize::from(self.id)] > 0;
        c[usize::from(self.id)] = 0;
        Ok(had)
    }
    fn fd(&self, _vector: u16) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// Two peers' regions over one model memory with one channel of 128-byte rings (two records
/// of up to 56 bytes fill a ring).
fn regions() -> (Region, Region) {
    regions_with(128)
}

/// As [`regions`], with rings of `ring` bytes.
fn regions_with(ring: u32) -> (Region, Region) {
    let bus = Arc::new(Bus::default());
    let a = Region::model(
        8192,
        Arc::new(ModelDoorbell {
            bus: bus.clone(),
            id: 0,
        }),
        FormatOptions {
            channels: 1,
            ring_size_max: ring,
        },
    )
    .unwrap();
    let b = a
        .model_peer(Arc::new(ModelDoorbell { bus, id: 1 }))
        .unwrap();
    (a, b)
}

fn opts(spin: Spin) -> ChannelOptions {
    ChannelOptions {
        spin,
        ..ChannelOptions::default()
    }
}

fn msg(i: u8) -> Vec<u8> {
    vec![i.wrapping_mul(37).wrapping_add(1); 1 + usize::from(i % 5)]
}

/// One direction, more messages than the ring holds: the sender sleeps on a full ring, the
/// receiver on an empty one.
fn one_way(spin: Spin, n: u8) {
    loom::model(move || {
        let (a, b) = regions();
        let mut x = a.channel("m", opts(spin)).unwrap();
        let mut y = b.channel("m", opts(spin)).unwrap();
        let t = loom::thread::spawn(move || {
            for i in 0..n {
                x.send(&msg(i), None).unwrap();
            }
            x
        });
        let mut buf = Vec::new();
        for i in 0..n {
            y.recv(&mut buf, None).unwrap();
            assert_eq!(buf, msg(i), "message {i}");
        }
        drop(t.join().unwrap());
    });
}

#[test]
fn one_way_blocking_no_lost_message_or_wakeup() {
    one_way(Spin::Never, 3);
}

#[test]
fn one_way_spin_then_block() {
    one_way(Spin::For(Duration::from_micros(5)), 3);
}

/// Both sides fill their rings at once, each side's sender and receiver in their own threads
/// sharing the side's one doorbell vector: no deadlock, nothing lost. Four threads: explored
/// with a preemption bound of 1 (~30,000 executions; a bound of 2 takes far longer than a test
/// run may).
#[test]
fn both_ways_full_rings_split_halves() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(1);
    builder.check(|| {
        const N: u8 = 3;
        let (a, b) = regions();
        let x = a.channel("m", opts(Spin::Never)).unwrap();
        let y = b.channel("m", opts(Spin::Never)).unwrap();
        let (mut xs, mut xr) = x.split();
        let (mut ys, mut yr) = y.split();
        let t1 = loom::thread::spawn(move || {
            for i in 0..N {
                xs.send(&msg(i), None).unwrap();
            }
        });
        let t2 = loom::thread::spawn(move || {
            for i in 0..N {
                ys.send(&msg(i + 100), None).unwrap();
            }
        });
        let t3 = loom::thread::spawn(move || {
            let mut buf = Vec::new();
            for i in 0..N {
                xr.recv(&mut buf, None).unwrap();
                assert_eq!(buf, msg(i + 100));
            }
        });
        let mut buf = Vec::new();
        for i in 0..N {
            yr.recv(&mut buf, None).unwrap();
            assert_eq!(buf, msg(i));
        }
        t1.join().unwrap();
        t2.join().unwrap();
        t3.join().unwrap();
    });
}

/// The producer invalidates the `seq` words of free record slots ahead of its position, after a
/// publishing store (`src/ring.rs`, "Invalidating ahead"), instead of the next record's `seq`
/// right before publishing. Checked here where it matters, in a 256-byte ring: two 57-byte
/// messages (records of 128 bytes whose payload starts at record offset 64 and so covers the
/// record's second 64-byte slot) whose first bytes forge the header that the next lap's record
/// at that slot would carry (`len` 1, `seq` slot + 256 + 1), then three 1-byte messages that
/// wrap the ring onto both forged slots. In every interleaving the consumer frees space early
/// or late, so the slots are invalidated at a commit or in a batch ahead; the receiver gets
/// the five messages and then nothing: never a forged one.
#[test]
fn forged_headers_in_payloads_are_never_received() {
    loom::model(|| {
        let (a, b) = regions_with(256);
        let mut x = a.channel("m", opts(Spin::Never)).unwrap();
        let mut y = b.channel("m", opts(Spin::Never)).unwrap();
        let forged = |slot: u32| [1u32.to_le_bytes(), (slot + 256 + 1).to_le_bytes()].concat();
        let t = loom::thread::spawn(move || {
            for slot in [64, 192] {
                let mut r = x.sender().reserve(57, None).unwrap();
                assert!(r.write_at(0, &forged(slot)).unwrap());
                r.commit().unwrap();
            }
            for i in 1..4 {
                x.send(&[i], None).unwrap();
            }
            x
        });
        let mut buf = Vec::new();
        for _ in 0..2 {
            y.recv(&mut buf, None).unwrap();
            assert_eq!(buf.len(), 57);
        }
        for i in 1..4 {
            y.recv(&mut buf, None).unwrap();
            assert_eq!(buf, [i], "message {i}");
        }
        let x = t.join().unwrap();
        assert!(matches!(
            y.receiver().try_recv(&mut buf),
            Err(ivshm_channel::ChannelError::WouldBlock)
        ));
        drop(x);
    });
}

/// A receiver blocked on an empty ring wakes when the peer closes (after the messages sent
/// before the close).
#[test]
fn close_wakes_a_sleeping_receiver() {
    loom::model(|| {
        let (a, b) = regions();
        let mut x = a.channel("m", opts(Spin::Never)).unwrap();
        let mut y = b.channel("m", opts(Spin::Never)).unwrap();
        let t = loom::thread::spawn(move || {
            x.send(b"last", None).unwrap();
            drop(x);
        });
        let mut buf = Vec::new();
        y.recv(&mut buf, None).unwrap();
        assert_eq!(buf, b"last");
        assert!(matches!(
            y.recv(&mut buf, None),
            Err(ivshm_channel::ChannelError::PeerClosed)
        ));
        t.join().unwrap();
    });
}
