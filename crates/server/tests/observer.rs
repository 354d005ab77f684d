//! The loop's observer hooks: what they report, with the fds and ids the peers really have.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use ivshm_server::{
    Control, ControlAction, Observer, RegionConfig, RemovalReason, Server, ServerConfig,
};
use ivshm_test_support::fds::ring;
use ivshm_test_support::v0::RawPeer;
use ivshm_test_support::{socket_path, WAIT_GUARD};
use rustix::event::{eventfd, EventfdFlags};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Accepted(String, RawFd),
    Joined(String, u16, RawFd),
    Removed(String, u16, RemovalReason),
    Wakeup,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Seen>>>);

impl Recorder {
    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Observer for Recorder {
    fn accepted(&mut self, region: &str, socket: BorrowedFd<'_>) {
        let seen = Seen::Accepted(region.into(), socket.as_raw_fd());
        self.0.lock().unwrap().push(seen);
    }
    fn joined(&mut self, region: &str, id: u16, socket: BorrowedFd<'_>) {
        let seen = Seen::Joined(region.into(), id, socket.as_raw_fd());
        self.0.lock().unwrap().push(seen);
    }
    fn removed(&mut self, region: &str, id: u16, reason: &RemovalReason) {
        let seen = Seen::Removed(region.into(), id, reason.clone());
        self.0.lock().unwrap().push(seen);
    }
    fn wakeup_handled(&mut self) {
        self.0.lock().unwrap().push(Seen::Wakeup);
    }
}

/// The next `n` events other than wake-ups, waiting until a wake-up follows the last of them
/// (the loop runs on another thread; a join may take it more than one wake-up, since a new
/// peer gets its fds only once it has read its first messages).
fn next_events(recorder: &Recorder, n: usize) -> Vec<Seen> {
    let mut seen: Vec<Seen> = Vec::new();
    let deadline = std::time::Instant::now() + WAIT_GUARD;
    loop {
        let significant = seen.iter().filter(|s| **s != Seen::Wakeup).count();
        let woke_after = seen
            .iter()
            .rposition(|s| *s != Seen::Wakeup)
            .is_some_and(|last| seen[last..].contains(&Seen::Wakeup));
        if significant >= n && woke_after {
            return seen.into_iter().filter(|s| *s != Seen::Wakeup).collect();
        }
        assert!(std::time::Instant::now() < deadline, "no wake-up: {seen:?}");
        seen.extend(recorder.take());
        std::thread::yield_now();
    }
}

/// A server for region `name` at `path`, observed by the returned recorder, running on a
/// thread until the returned eventfd is rung; the thread then calls `after` and hands the
/// server back.
fn run_observed(
    path: &std::path::Path,
    name: &str,
    after: fn(&mut Server),
) -> (Recorder, Arc<OwnedFd>, std::thread::JoinHandle<Server>) {
    let mut region = RegionConfig::new(path);
    region.name = name.into();
    let mut server = Server::new(ServerConfig::single(region)).unwrap();
    let recorder = Recorder::default();
    server.set_observer(recorder.clone());
    let stop = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap());
    let thread_stop = stop.clone();
    let thread = std::thread::spawn(move || {
        let controls = [Control {
            fd: thread_stop.as_fd(),
            action: ControlAction::Stop,
        }];
        server.run_until(&controls).unwrap();
        after(&mut server);
        server
    });
    (recorder, stop, thread)
}

#[test]
fn observer_sees_accepts_joins_removals_and_wakeups_with_real_fds() {
    let path = socket_path("observer");
    let (recorder, stop, thread) = run_observed(&path, "r", |_| {});

    let mut a = RawPeer::connect(&path);
    a.handshake(1, &[]);
    let seen = next_events(&recorder, 2);
    let [Seen::Accepted(region, fd), Seen::Joined(joined_region, 0, joined_fd)] = &seen[..] else {
        panic!("{seen:?}");
    };
    assert_eq!((region.as_str(), joined_region.as_str()), ("r", "r"));
    assert_eq!(fd, joined_fd);
    // The fd is the server's end of A's connection: the same socket pair (same inode).
    let server_end = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
    let ours = std::fs::read_link(format!("/proc/self/fd/{}", a.sock.as_raw_fd())).unwrap();
    assert!(
        server_end.to_string_lossy().starts_with("socket:["),
        "{server_end:?}"
    );
    assert_ne!(server_end, ours, "the server's end, not ours");

    let mut b = RawPeer::connect(&path);
    b.handshake(1, &[0]);
    let seen = next_events(&recorder, 2);
    assert!(
        matches!(&seen[..], [Seen::Accepted(_, _), Seen::Joined(_, 1, _)]),
        "{seen:?}"
    );
    a.expect_join(1, 1);

    drop(b);
    let seen = next_events(&recorder, 1);
    assert_eq!(seen, [Seen::Removed("r".into(), 1, RemovalReason::Closed)]);
    a.expect_leave(1);

    ring(&*stop);
    thread.join().unwrap();
}

#[test]
fn remove_all_peers_goes_in_join_order_and_tells_the_rest_like_qemu() {
    let path = socket_path("remove-all");
    let (recorder, stop, thread) = run_observed(&path, "default", Server::remove_all_peers);
    let mut a = RawPeer::connect(&path);
    a.handshake(1, &[]);
    let mut b = RawPeer::connect(&path);
    b.handshake(1, &[0]);
    a.expect_join(1, 1);
    let mut c = RawPeer::connect(&path);
    c.handshake(1, &[0, 1]);
    a.expect_join(2, 1);
    b.expect_join(2, 1);

    ring(&*stop);
    let server = thread.join().unwrap();
    assert_eq!(server.peer_count(), 0);
    // The socket went first.
    assert!(!path.exists());
    // A goes first and hears nothing; B hears of A; C of A, then B.
    a.expect_closed();
    b.expect_leave(0);
    b.expect_closed();
    c.expect_leave(0);
    c.expect_leave(1);
    c.expect_closed();
    let removed: Vec<Seen> = recorder
        .take()
        .into_iter()
        .filter(|s| matches!(s, Seen::Removed(..)))
        .collect();
    let stopping = |id| Seen::Removed("default".into(), id, RemovalReason::ServerStopping);
    assert_eq!(removed, [stopping(0), stopping(1), stopping(2)]);
}
