//! The conformance suite every [`Doorbell`] implementation runs (feature `conformance`).
//!
//! One suite, every implementation: the local eventfd doorbells run it in this crate's tests,
//! other crates run it against theirs (e.g. a host peer of a real ivshm server). Each check
//! panics with a message naming the broken rule.
//!
//! The suite needs two doorbells `a` and `b` of different peers that can ring each other, each
//! with at least one vector, and for [`channel_round_trips`] two regions over the same memory.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use crate::doorbell::Doorbell;
use crate::{ChannelOptions, Region, Spin};

/// What an implementation promises beyond the trait's minimum (the channel needs neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `wait` returns `true` only after a ring, and `take` reports exactly whether one is
    /// pending. False for a doorbell that polls without interrupts: its `wait` returns `true`
    /// after a polling interval (a spurious wake-up, which the trait allows).
    pub exact_wakeups: bool,
    /// Ringing a peer id that is not in the region is an error. False for a guest's ivshmem
    /// device: the Doorbell register takes any id and the device drops unknown ones.
    pub knows_peers: bool,
}

impl Capabilities {
    /// Everything: eventfd doorbells of a host peer or a local bus.
    pub const FULL: Capabilities = Capabilities {
        exact_wakeups: true,
        knows_peers: true,
    };
}

/// Runs every doorbell check (an implementation with [`Capabilities::FULL`]).
pub fn run_all(a: &dyn Doorbell, b: &dyn Doorbell) {
    run_with(a, b, Capabilities::FULL);
}

/// Runs every doorbell check that applies to implementations with `caps`.
pub fn run_with(a: &dyn Doorbell, b: &dyn Doorbell, caps: Capabilities) {
    ids_and_vectors(a, b);
    ring_is_remembered_until_waited(a, b);
    if caps.exact_wakeups {
        wait_times_out_without_a_ring(a);
        rings_coalesce_and_are_consumed(a, b);
    }
    ring_from_another_thread_wakes_a_blocked_wait(a, b);
    if caps.exact_wakeups {
        fd_is_readable_exactly_while_rung(a, b);
    }
    unknown_targets_are_errors(a, b, caps);
    huge_timeouts_do_not_panic(a, b);
}

/// Own ids differ and both have vectors.
pub fn ids_and_vectors(a: &dyn Doorbell, b: &dyn Doorbell) {
    assert_ne!(a.own_id(), b.own_id(), "two peers must have different ids");
    assert!(
        a.vectors() >= 1 && b.vectors() >= 1,
        "every peer has a vector"
    );
}

fn drain(d: &dyn Doorbell) {
    while d.take(0).expect("take") {}
}

/// A ring made before the wait is not lost.
pub fn ring_is_remembered_until_waited(a: &dyn Doorbell, b: &dyn Doorbell) {
    drain(b);
    a.ring(b.own_id(), 0).expect("ring");
    assert!(
        b.wait(0, Some(Duration::from_secs(10))).expect("wait"),
        "a ring made before wait must make wait return true"
    );
}

/// No ring: the wait returns false after about the timeout.
pub fn wait_times_out_without_a_ring(a: &dyn Doorbell) {
    drain(a);
    let t = Instant::now();
    assert!(
        !a.wait(0, Some(Duration::from_millis(30))).expect("wait"),
        "wait without a ring must time out"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(25),
        "wait returned early"
    );
    assert!(
        !a.wait(0, Some(Duration::ZERO)).expect("wait"),
        "zero timeout"
    );
}

/// Several rings are consumed by one wait (or take).
pub fn rings_coalesce_and_are_consumed(a: &dyn Doorbell, b: &dyn Doorbell) {
    drain(b);
    for _ in 0..3 {
        a.ring(b.own_id(), 0).expect("ring");
    }
    // Rings may arrive asynchronously (through a hypervisor): let them land before looking.
    if let Some(fd) = b.fd(0) {
        assert!(
            readable_within(fd, Duration::from_secs(10)),
            "no ring arrived within 10 s"
        );
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(b.take(0).expect("take"), "take must see pending rings");
    assert!(
        !b.take(0).expect("take"),
        "take must consume every pending ring"
    );
    assert!(!b.wait(0, Some(Duration::from_millis(5))).expect("wait"));
}

/// A thread blocked without a timeout wakes when another rings.
pub fn ring_from_another_thread_wakes_a_blocked_wait(a: &dyn Doorbell, b: &dyn Doorbell) {
    drain(b);
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            a.ring(b.own_id(), 0).expect("ring");
        });
        assert!(
            b.wait(0, None).expect("wait"),
            "blocked wait must wake on a ring"
        );
    });
    // And the other way round.
    drain(a);
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            b.ring(a.own_id(), 0).expect("ring");
        });
        assert!(a.wait(0, Some(Duration::from_secs(10))).expect("wait"));
    });
}

/// The poll fd (when there is one) is readable while a ring is pending, not after `take`.
/// A ring may arrive asynchronously (a device's doorbell register, an interrupt delivered
/// through the hypervisor), so readability after a ring is awaited within a bound.
pub fn fd_is_readable_exactly_while_rung(a: &dyn Doorbell, b: &dyn Doorbell) {
    drain(b);
    let Some(fd) = b.fd(0) else { return };
    let readable = |fd| readable_within(fd, Duration::ZERO);
    assert!(!readable(fd), "fd readable without a ring");
    a.ring(b.own_id(), 0).expect("ring");
    assert!(
        readable_within(fd, Duration::from_secs(10)),
        "fd not readable within 10 s of a ring"
    );
    assert!(b.take(0).expect("take"));
    assert!(!readable(fd), "fd still readable after take");
}

/// Ringing a vector or (if the implementation knows the peers) a peer that does not exist is
/// an error, and so is waiting on a vector we do not have.
pub fn unknown_targets_are_errors(a: &dyn Doorbell, b: &dyn Doorbell, caps: Capabilities) {
    assert!(
        a.ring(b.own_id(), u16::MAX).is_err(),
        "ringing vector 65535"
    );
    assert!(
        a.wait(a.vectors(), Some(Duration::ZERO)).is_err(),
        "waiting on a missing vector"
    );
    if caps.knows_peers && a.own_id() != u16::MAX && b.own_id() != u16::MAX {
        assert!(a.ring(u16::MAX, 0).is_err(), "ringing peer 65535, unknown");
    }
}

/// `Duration::MAX` is a valid timeout.
pub fn huge_timeouts_do_not_panic(a: &dyn Doorbell, b: &dyn Doorbell) {
    drain(b);
    a.ring(b.own_id(), 0).expect("ring");
    assert!(b.wait(0, Some(Duration::MAX)).expect("wait"));
}

/// A channel between the two regions exchanges messages with blocking waits (spin 0) in both
/// directions: the doorbell wakes the channel's sleepers.
pub fn channel_round_trips(a: &Region, b: &Region, name: &str) {
    let opts = ChannelOptions {
        spin: Spin::Never,
        ..ChannelOptions::default()
    };
    let mut x = a.channel(name, opts).expect("open channel (creator)");
    let mut y = b.channel(name, opts).expect("open channel (joiner)");
    let long = Some(Duration::from_secs(20));
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut buf = Vec::new();
            for _ in 0..200 {
                y.recv(&mut buf, long).expect("recv");
                y.send(&buf, long).expect("echo");
            }
        });
        let mut buf = Vec::new();
        for i in 0..200u32 {
            let m = i.to_le_bytes().repeat(1 + i as usize % 40);
            x.send(&m, long).expect("send");
            x.recv(&mut buf, long).expect("recv echo");
            assert_eq!(buf, m, "echo {i}");
        }
    });
}

/// Whether the fd is readable within `timeout`.
fn readable_within(fd: std::os::fd::BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let ts = rustix::event::Timespec {
        tv_sec: timeout.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: timeout.subsec_nanos().into(),
    };
    loop {
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) => return n > 0,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => panic!("poll: {e}"),
        }
    }
}

/// The caller's own poll loop over a channel of the two regions: after
/// [`crate::ChannelError::WouldBlock`] (the ring is then armed) the endpoint's
/// [`crate::Channel::poll_fd`] becomes readable once the other side makes progress, and
/// [`crate::Channel::take_doorbell`] consumes that. Checked both ways: an empty ring waits for a
/// message, a full ring for space; then 500 messages from a blocking sender in another thread
/// to a receiver that only ever waits in `poll(2)` on the fd. Returns false, checking nothing,
/// when the doorbell has no fd (an implementation that polls memory).
pub fn channel_poll_loop(a: &Region, b: &Region, name: &str) -> bool {
    use crate::ChannelError::WouldBlock;
    let opts = ChannelOptions {
        spin: Spin::Never,
        ..ChannelOptions::default()
    };
    let mut x = a.channel(name, opts).expect("open channel (creator)");
    let mut y = b.channel(name, opts).expect("open channel (joiner)");
    // Duplicates (the same eventfds), so that the endpoints stay usable meanwhile.
    let dup = |fd: Option<std::os::fd::BorrowedFd<'_>>| {
        fd.map(|fd| fd.try_clone_to_owned().expect("dup of the poll fd"))
    };
    let (Some(xfd), Some(yfd)) = (dup(x.poll_fd()), dup(y.poll_fd())) else {
        return false;
    };
    let long = Duration::from_secs(20);
    let mut buf = Vec::new();

    // An empty ring: the receiver's fd wakes on the next message.
    while y.take_doorbell().expect("take") {}
    assert!(
        matches!(y.receiver().try_recv(&mut buf), Err(WouldBlock)),
        "an empty ring must say WouldBlock"
    );
    x.send(b"wake up", Some(Duration::ZERO)).expect("send");
    assert!(
        readable_within(yfd.as_fd(), long),
        "the receiver's poll fd must become readable when a message arrives after WouldBlock"
    );
    assert!(
        y.take_doorbell().expect("take"),
        "take_doorbell after a ring"
    );
    y.receiver()
        .try_recv(&mut buf)
        .expect("recv after the fd was readable");
    assert_eq!(buf, b"wake up");

    // A full ring: the sender's fd wakes once the receiver frees space.
    let len = x.max_message() / 3 + 1;
    let mut queued = 0u32;
    loop {
        match x.sender().try_send(&vec![7; len]) {
            Ok(()) => queued += 1,
            Err(WouldBlock) => break,
            Err(e) => panic!("filling the ring: {e}"),
        }
        assert!(queued < 10, "a ring of three messages' size never filled");
    }
    while x.take_doorbell().expect("take") {}
    assert!(
        matches!(x.sender().try_send(&vec![8; len]), Err(WouldBlock)),
        "a full ring must say WouldBlock"
    );
    y.recv(&mut buf, Some(long))
        .expect("recv from the full ring");
    assert!(
        readable_within(xfd.as_fd(), long),
        "the sender's poll fd must become readable when space is freed after WouldBlock"
    );
    assert!(
        x.take_doorbell().expect("take"),
        "take_doorbell after a ring"
    );
    x.sender()
        .try_send(&vec![8; len])
        .expect("send after the fd was readable");
    for _ in 0..queued {
        y.recv(&mut buf, Some(long)).expect("drain");
    }

    // A poll loop that only ever sleeps in poll(2): no message is lost, no wake-up missed.
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..500u32 {
                let m = i.to_le_bytes().repeat(1 + i as usize % 60);
                x.send(&m, Some(long)).expect("send");
            }
        });
        let mut next = 0u32;
        while next < 500 {
            match y.receiver().try_recv(&mut buf) {
                Ok(_) => {
                    let want = next.to_le_bytes().repeat(1 + next as usize % 60);
                    assert_eq!(buf, want, "message {next} in the poll loop");
                    next += 1;
                }
                Err(WouldBlock) => {
                    assert!(
                        readable_within(yfd.as_fd(), long),
                        "the poll loop missed a wake-up after message {next}"
                    );
                    y.take_doorbell().expect("take");
                }
                Err(e) => panic!("poll loop: {e}"),
            }
        }
    });
    true
}
