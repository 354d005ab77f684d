//! Channels between two peers of one region: delivery, limits, waiting, closing, the
//! directory.

mod common;

use std::time::Duration;

use common::{message, pair, regions};
use ivshm_channel::{ChannelError, ChannelOptions, RegionError, Side, Spin};

const ZERO: Option<Duration> = Some(Duration::ZERO);
const LONG: Option<Duration> = Some(Duration::from_secs(20));

#[test]
fn messages_arrive_whole_in_order_both_ways() {
    let (_bus, a, b) = regions(1 << 20, 4, 4096);
    let (mut x, mut y) = pair(&a, &b, "demo", Spin::default());
    assert_eq!(x.side(), Side::A);
    assert_eq!(y.side(), Side::B);
    assert_eq!(x.peer(), Some(1));
    assert_eq!(y.peer(), Some(0));
    assert_eq!(x.max_message(), 4096 - 64);
    let mut buf = Vec::new();
    // Many more bytes than the ring holds: wraps around many times.
    for i in 0..2000u64 {
        let len = 1 + (i as usize * 37) % x.max_message();
        let m = message(i, len);
        x.send(&m, LONG).unwrap();
        assert_eq!(y.recv(&mut buf, LONG).unwrap(), len);
        assert_eq!(buf, m, "message {i}");
        y.send(&m, LONG).unwrap();
        x.recv(&mut buf, LONG).unwrap();
        assert_eq!(buf, m);
    }
}

#[test]
fn full_ring_would_block_then_drains_in_order() {
    let (_bus, a, b) = regions(1 << 20, 4, 1024);
    let (mut x, mut y) = pair(&a, &b, "full", Spin::Never);
    let mut sent = 0u64;
    loop {
        match x.sender().try_send(&message(sent, 100)) {
            Ok(()) => sent += 1,
            Err(ChannelError::WouldBlock) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // 100-byte messages take 192 ring bytes: 5 fit in 1024.
    assert_eq!(sent, 5);
    let mut buf = Vec::new();
    for i in 0..sent {
        y.recv(&mut buf, ZERO).unwrap();
        assert_eq!(buf, message(i, 100));
    }
    assert!(matches!(
        y.receiver().try_recv(&mut buf),
        Err(ChannelError::WouldBlock)
    ));
    // The ring is usable again.
    x.send(b"again", ZERO).unwrap();
    y.recv(&mut buf, ZERO).unwrap();
    assert_eq!(buf, b"again");
}

#[test]
fn a_message_of_exactly_the_capacity_passes_and_a_larger_one_is_refused() {
    let (_bus, a, b) = regions(1 << 20, 2, 4096);
    let (mut x, mut y) = pair(&a, &b, "cap", Spin::Never);
    let max = x.max_message();
    let mut buf = Vec::new();
    for round in 0..3 {
        // Not at position 0 any more after the first round: the payload wraps.
        x.send(b"shift", ZERO).unwrap();
        y.recv(&mut buf, ZERO).unwrap();
        let m = message(round, max);
        x.send(&m, ZERO).unwrap();
        y.recv(&mut buf, ZERO).unwrap();
        assert_eq!(buf, m);
    }
    match x.send(&vec![0; max + 1], ZERO) {
        Err(ChannelError::TooLarge { len, max: m }) => {
            assert_eq!(len, max + 1);
            assert_eq!(m as usize, max);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(x.send(&[], ZERO), Err(ChannelError::Empty)));
}

#[test]
fn recv_into_a_small_buffer_keeps_the_message() {
    let (_bus, a, b) = regions(1 << 20, 2, 4096);
    let (mut x, mut y) = pair(&a, &b, "small", Spin::Never);
    x.send(&[7; 100], ZERO).unwrap();
    let mut small = [0u8; 10];
    assert!(matches!(
        y.receiver().recv_into(&mut small, ZERO),
        Err(ChannelError::BufferTooSmall {
            needed: 100,
            got: 10
        })
    ));
    let mut big = [0u8; 200];
    assert_eq!(y.receiver().recv_into(&mut big, ZERO).unwrap(), 100);
    assert_eq!(&big[..100], &[7; 100]);
}

#[test]
fn message_guard_reads_inside_the_message_only() {
    let (_bus, a, b) = regions(1 << 20, 2, 4096);
    let (mut x, mut y) = pair(&a, &b, "guard", Spin::Never);
    let m = message(1, 300);
    x.send(&m, ZERO).unwrap();
    x.send(b"next", ZERO).unwrap();
    {
        let msg = y.receiver().recv_message(ZERO).unwrap();
        assert_eq!(msg.len(), 300);
        let mut part = [0u8; 10];
        assert!(msg.read_at(290, &mut part).unwrap());
        assert_eq!(&part, &m[290..]);
        assert!(!msg.read_at(291, &mut part).unwrap());
        assert!(!msg.read_at(usize::MAX, &mut part).unwrap());
        assert_eq!(msg.to_vec().unwrap(), m);
    }
    let mut buf = Vec::new();
    y.recv(&mut buf, ZERO).unwrap();
    assert_eq!(buf, b"next");
}

#[test]
fn blocking_receive_is_woken_by_a_send_from_another_thread() {
    for spin in [Spin::Never, Spin::default(), Spin::Forever] {
        let (_bus, a, b) = regions(1 << 20, 2, 4096);
        let (mut x, mut y) = pair(&a, &b, "wake", spin);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut buf = Vec::new();
                for i in 0..200u64 {
                    y.recv(&mut buf, LONG).unwrap();
                    assert_eq!(buf, message(i, 1 + i as usize % 500));
                    y.send(&buf, LONG).unwrap();
                }
            });
            let mut buf = Vec::new();
            for i in 0..200u64 {
                if i % 50 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
                let m = message(i, 1 + i as usize % 500);
                x.send(&m, LONG).unwrap();
                x.recv(&mut buf, LONG).unwrap();
                assert_eq!(buf, m);
            }
        });
    }
}

#[test]
fn both_sides_fill_their_rings_from_split_halves_without_deadlock() {
    let (_bus, a, b) = regions(1 << 20, 2, 1024);
    let (x, y) = pair(&a, &b, "duplex", Spin::Never);
    const N: u64 = 3000;
    let (mut xs, mut xr) = x.split();
    let (mut ys, mut yr) = y.split();
    std::thread::scope(|s| {
        s.spawn(move || {
            for i in 0..N {
                xs.send(&message(i, 1 + i as usize % 300), LONG).unwrap();
            }
        });
        s.spawn(move || {
            for i in 0..N {
                ys.send(&message(i + N, 1 + i as usize % 200), LONG)
                    .unwrap();
            }
        });
        s.spawn(move || {
            let mut buf = Vec::new();
            for i in 0..N {
                xr.recv(&mut buf, LONG).unwrap();
                assert_eq!(buf, message(i + N, 1 + i as usize % 200));
            }
        });
        let mut buf = Vec::new();
        for i in 0..N {
            yr.recv(&mut buf, LONG).unwrap();
            assert_eq!(buf, message(i, 1 + i as usize % 300));
        }
    });
}

#[test]
fn timeouts_expire_and_huge_ones_do_not_panic() {
    let (_bus, a, b) = regions(1 << 20, 2, 1024);
    let (mut x, mut y) = pair(&a, &b, "time", Spin::default());
    let mut buf = Vec::new();
    assert!(matches!(
        y.recv(&mut buf, Some(Duration::from_millis(20))),
        Err(ChannelError::Timeout)
    ));
    x.send(b"late", Some(Duration::MAX)).unwrap();
    assert_eq!(y.recv(&mut buf, Some(Duration::MAX)).unwrap(), 4);
    while x.sender().try_send(&[1; 500]).is_ok() {}
    assert!(matches!(
        x.send(&[1; 500], Some(Duration::from_millis(20))),
        Err(ChannelError::Timeout)
    ));
}

#[test]
fn closing_delivers_what_was_sent_then_reports_closed() {
    let (_bus, a, b) = regions(1 << 20, 2, 4096);
    let (mut x, mut y) = pair(&a, &b, "close", Spin::Never);
    x.send(b"one", ZERO).unwrap();
    x.send(b"two", ZERO).unwrap();
    drop(x);
    let mut buf = Vec::new();
    y.recv(&mut buf, LONG).unwrap();
    assert_eq!(buf, b"one");
    y.recv(&mut buf, LONG).unwrap();
    assert_eq!(buf, b"two");
    assert!(matches!(
        y.recv(&mut buf, LONG),
        Err(ChannelError::PeerClosed)
    ));
    assert!(matches!(y.send(b"x", LONG), Err(ChannelError::PeerClosed)));
    drop(y);
    // Both closed: the entry is free and the name can be opened afresh.
    assert!(a.channels().unwrap().is_empty());
    let (mut x, mut y) = pair(&a, &b, "close", Spin::Never);
    x.send(b"fresh", ZERO).unwrap();
    y.recv(&mut buf, ZERO).unwrap();
    assert_eq!(buf, b"fresh");
}

#[test]
fn a_blocked_receiver_wakes_when_the_peer_closes_or_leaves() {
    let (_bus, a, b) = regions(1 << 20, 2, 4096);
    let (x, mut y) = pair(&a, &b, "leave", Spin::Never);
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            drop(x);
        });
        let mut buf = Vec::new();
        assert!(matches!(
            y.recv(&mut buf, LONG),
            Err(ChannelError::PeerClosed)
        ));
    });
    drop(y);
    let (x, mut y) = pair(&a, &b, "leave", Spin::Never);
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            // What a host peer does on the server's leave event for peer 0.
            assert_eq!(b.peer_left(0).unwrap(), 1);
        });
        let mut buf = Vec::new();
        assert!(matches!(
            y.recv(&mut buf, LONG),
            Err(ChannelError::PeerGone { peer: 0 })
        ));
    });
    drop(x);
}

#[test]
fn names_find_each_other_and_a_third_opener_is_refused() {
    let (_bus, a, b) = regions(1 << 20, 3, 1024);
    let (x, _y) = pair(&a, &b, "one", Spin::Never);
    let (_p, _q) = pair(&b, &a, "two", Spin::Never);
    assert!(matches!(
        a.channel("one", ChannelOptions::default()),
        Err(RegionError::Busy { a: 0, b: 1, .. })
    ));
    let list = a.channels().unwrap();
    let names: Vec<_> = list.iter().map(|c| c.name.clone()).collect();
    assert_eq!(names, vec![b"one".to_vec(), b"two".to_vec()]);
    assert_eq!(list[1].a.peer, 1);
    assert_eq!(list[1].b.state, "attached");
    let _r = a.channel("three", ChannelOptions::default()).unwrap();
    assert!(matches!(
        a.channel("four", ChannelOptions::default()),
        Err(RegionError::DirectoryFull { channels: 3 })
    ));
    for bad in ["", "0123456789012345678901234567890x", "nul\0"] {
        assert!(matches!(
            a.channel(bad, ChannelOptions::default()),
            Err(RegionError::BadName { .. })
        ));
    }
    assert!(matches!(
        a.channel(
            "v",
            ChannelOptions {
                vector: 1,
                ..Default::default()
            }
        ),
        Err(RegionError::BadVector {
            vector: 1,
            vectors: 1
        })
    ));
    drop(x);
}

#[test]
fn racing_creators_get_one_channel() {
    for round in 0..50 {
        let (_bus, a, b) = regions(1 << 20, 8, 1024);
        let name = format!("race{round}");
        let (x, y) = std::thread::scope(|s| {
            let t = s.spawn(|| a.channel(&name, ChannelOptions::default()).unwrap());
            let y = b.channel(&name, ChannelOptions::default()).unwrap();
            (t.join().unwrap(), y)
        });
        assert_ne!(x.side(), y.side());
        assert_eq!(a.channels().unwrap().len(), 1);
    }
}

/// A region carries many channels at once (64 by default, more when formatted so), each
/// between its own two endpoints: every channel open at the same time, messages queued on all
/// of them before any is received, each side receives exactly its own; one more is refused.
#[test]
fn every_channel_of_a_region_carries_its_own_messages_at_once() {
    for (size, channels, ring) in [(4u64 << 20, 64u32, 1u32 << 20), (16 << 20, 1024, 4096)] {
        let (_bus, a, b) = regions(size, channels, ring);
        assert_eq!(a.geometry().channels, channels);
        // Creators alternate: side A is peer 0 on even channels, peer 1 on odd ones.
        let mut ends: Vec<_> = (0..channels)
            .map(|i| {
                let name = format!("ch{i}");
                if i % 2 == 0 {
                    pair(&a, &b, &name, Spin::Never)
                } else {
                    pair(&b, &a, &name, Spin::Never)
                }
            })
            .collect();
        assert_eq!(a.channels().unwrap().len(), channels as usize);
        assert!(matches!(
            a.channel("one-more", ChannelOptions::default()),
            Err(RegionError::DirectoryFull { channels: c }) if c == channels
        ));
        let seq = |i: usize, round: u64, dir: u64| (i as u64) << 8 | round << 1 | dir;
        let len = |i: usize, round: u64| 1 + (i * 97 + round as usize * 31) % 1000;
        for round in 0..3 {
            for (i, (x, y)) in ends.iter_mut().enumerate() {
                x.send(&message(seq(i, round, 0), len(i, round)), ZERO)
                    .unwrap();
                y.send(&message(seq(i, round, 1), len(i, round)), ZERO)
                    .unwrap();
            }
        }
        let mut buf = Vec::new();
        for round in 0..3 {
            // Receive in the reverse channel order from the sending order.
            for (i, (x, y)) in ends.iter_mut().enumerate().rev() {
                y.recv(&mut buf, ZERO).unwrap();
                assert_eq!(buf, message(seq(i, round, 0), len(i, round)), "ch{i}");
                x.recv(&mut buf, ZERO).unwrap();
                assert_eq!(buf, message(seq(i, round, 1), len(i, round)), "ch{i}");
            }
        }
        for (x, y) in &mut ends {
            for end in [x, y] {
                assert!(matches!(
                    end.receiver().try_recv(&mut buf),
                    Err(ChannelError::WouldBlock)
                ));
            }
        }
        drop(ends);
        assert!(a.channels().unwrap().is_empty());
    }
}
