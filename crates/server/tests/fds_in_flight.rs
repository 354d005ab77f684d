//! File descriptors in flight: the kernel counts every fd sent over a UNIX socket and not yet
//! received against the sending user, and refuses more (`ETOOMANYREFS`) beyond its
//! `RLIMIT_NOFILE` (root is exempt). Connections that never read must not use that budget up
//! and lock honest peers out.
//!
//! Its own test binary: it lowers this process's fd limit to 1024, as for an unprivileged
//! service. The server runs as `nobody` (a thread with its own credentials, see
//! `ivshm_test_support::users`), the attackers and honest peers as root.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use ivshm_proto::Received;
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use ivshm_test_support::fds::{ring, take, wait_readable};
use ivshm_test_support::users::{can_switch_users, run_as, NOBODY_UID, NOGROUP_GID};
use ivshm_test_support::v0::RawPeer;
use rustix::process::{setrlimit, Resource, Rlimit};

const VECTORS: usize = 4;

/// A directory `nobody` can bind a socket in.
fn socket_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ivshm-inflight-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(NOBODY_UID), Some(NOGROUP_GID)).unwrap();
    dir
}

/// A server with one region of 4 vectors, running as `nobody`.
fn unprivileged_server(dir: &Path) -> ServerHandle {
    unprivileged_server_with(dir, VECTORS)
}

/// A server with one region of `vectors` vectors, running as `nobody`.
fn unprivileged_server_with(dir: &Path, vectors: usize) -> ServerHandle {
    let mut region = RegionConfig::new(dir.join("sock"));
    region.vectors = vectors;
    region.memory.size = 1 << 16;
    run_as(NOBODY_UID, NOGROUP_GID, move || {
        ServerHandle::spawn(ServerConfig::single(region)).unwrap()
    })
}

/// An honest peer: reads its whole handshake, whoever else is there. Returns its id, the
/// other peers' ids it was told about and its own eventfds.
fn honest_join(path: &Path) -> (RawPeer, u16, Vec<u16>, Vec<OwnedFd>) {
    honest_join_with(path, VECTORS)
}

/// [`honest_join`] of a region with `vectors` vectors.
fn honest_join_with(path: &Path, vectors: usize) -> (RawPeer, u16, Vec<u16>, Vec<OwnedFd>) {
    let mut peer = RawPeer::connect(path);
    peer.expect(0, false);
    let id = u16::try_from(peer.recv().value).unwrap();
    peer.expect(-1, true);
    let mut others = Vec::new();
    let mut own = Vec::new();
    while own.len() < vectors {
        let m = peer.recv();
        let fd =
            m.fd.expect("every handshake message after the shm carries an eventfd");
        let from = u16::try_from(m.value).unwrap();
        if from == id {
            own.push(fd);
        } else if !others.contains(&from) {
            others.push(from);
        }
    }
    (peer, id, others, own)
}

/// Reads what has arrived without waiting; true if the server closed the connection.
fn drain(peer: &mut RawPeer) -> bool {
    let mut reader = ivshm_proto::MessageReader::new();
    loop {
        match reader.receive(peer.sock.as_fd()) {
            Ok(Received::Message { .. }) => {}
            Ok(Received::WouldBlock) => return false,
            Ok(Received::Closed) | Err(_) => return true,
        }
    }
}

/// One test at a time: they share the process's fd limit and `nobody`'s count of fds in
/// flight.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn limit_fds_to_1024() {
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(1024),
            maximum: Some(1024),
        },
    )
    .unwrap();
}

/// Issue 10, item 3: as an unprivileged server with 1024 fds, connections that connect and
/// never read (16, then 64) do not make the server drop honest peers: a peer that joins after
/// them gets its whole handshake, the peer that was there first hears of it, and doorbells
/// work between the two.
#[test]
fn idle_connections_do_not_lock_honest_peers_out_of_an_unprivileged_server() {
    if !can_switch_users() {
        eprintln!("SKIPPED: running the server as nobody needs root");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    limit_fds_to_1024();
    let dir = socket_dir("idle");
    let server = unprivileged_server(&dir);
    let path = server.socket_path().to_path_buf();
    let (mut first, first_id, _, first_own) = honest_join(&path);
    let mut idle: Vec<OwnedFd> = Vec::new();
    for round in [16, 64] {
        while idle.len() < round {
            idle.push(RawPeer::connect(&path).sock);
            // The first peer keeps reading what it is told.
            assert!(!drain(&mut first), "the server dropped the first peer");
        }
        let (mut late, late_id, others, late_own) = honest_join(&path);
        assert!(
            others.contains(&first_id),
            "the late peer was not told of the first one: {others:?}"
        );
        // The first peer hears of the late one, and doorbells work both ways.
        let mut heard = false;
        while !heard {
            wait_readable(first.sock.as_fd());
            let m = first.recv();
            heard = m.value == i64::from(late_id) && m.fd.is_some();
            if heard {
                let to_late = m.fd.unwrap();
                ring(&to_late);
                wait_readable(late_own[0].as_fd());
                assert_eq!(take(&late_own[0]), 1);
            }
        }
        let _ = drain(&mut late);
        assert!(!drain(&mut first), "the server dropped the first peer");
        let _ = &first_own;
        drop(late);
    }
    let stats = server.stats();
    drop(idle);
    server.shutdown().unwrap();
    assert_eq!(
        stats.peers_dropped, 0,
        "honest peers were dropped: {stats:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Whether the server has closed its end of `sock` (messages may still be queued unread).
fn hung_up(sock: &OwnedFd) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(sock, PollFlags::RDHUP)];
    poll(&mut fds, Some(&rustix::time::Timespec::default())).unwrap() > 0
        && fds[0].revents().contains(PollFlags::RDHUP)
}

/// Closes the hogs the server has dropped, as their programs would once their connection
/// ends: that gives their fds in flight back.
fn close_dropped(hogs: &mut [Option<RawPeer>]) {
    for slot in hogs.iter_mut() {
        if slot.as_ref().is_some_and(|hog| hung_up(&hog.sock)) {
            *slot = None;
        }
    }
}

/// What an honest peer has been told so far: the first eventfd of each peer (the others are
/// closed at once: this process has 1024 fds, fewer than a wide region's peers send).
type Heard = std::collections::BTreeMap<i64, OwnedFd>;

/// Reads what has arrived for `peer` without waiting.
fn read_arrived(peer: &RawPeer, reader: &mut ivshm_proto::MessageReader, heard: &mut Heard) {
    while let Ok(Received::Message { value, fd }) = reader.receive(peer.sock.as_fd()) {
        if let Some(fd) = fd {
            heard.entry(value).or_insert(fd);
        }
    }
}

/// Waits until `peer` has been told of peer `id` (reading as it comes, and closing the hogs
/// the server drops meanwhile, whose fds the server may need back to send it); returns the
/// first of `id`'s eventfds it got.
fn news_of(
    id: u16,
    peer: &RawPeer,
    reader: &mut ivshm_proto::MessageReader,
    heard: &mut Heard,
    hogs: &mut [Option<RawPeer>],
) -> OwnedFd {
    let deadline = std::time::Instant::now() + ivshm_test_support::WAIT_GUARD;
    loop {
        if let Some(fd) = heard.remove(&i64::from(id)) {
            return fd;
        }
        close_dropped(hogs);
        read_arrived(peer, reader, heard);
        assert!(
            std::time::Instant::now() < deadline,
            "the peer was not told of peer {id}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Connections that read their first message and then stop (each one may then be sent its
/// share of fds and keeps them unread) fill the kernel's count until sends fail with
/// `ETOOMANYREFS`. The server keeps the messages of the honest peers it could not send to,
/// drops the peers holding the most unread fds, and retries; as the dropped ones close their
/// connections, the honest peers get everything, in order, and none of them is dropped.
#[test]
fn when_fds_in_flight_run_out_the_hogs_go_and_honest_peers_wait_their_turn() {
    if !can_switch_users() {
        eprintln!("SKIPPED: running the server as nobody needs root");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    limit_fds_to_1024();
    let dir = socket_dir("hogs");
    let server = unprivileged_server(&dir);
    let path = server.socket_path().to_path_buf();
    let (mut first, first_id, _, _first_own) = honest_join(&path);
    // The first peer reads what it gets whenever the test thread gets to it (it may have to
    // wait for its turn, and a loaded machine may leave it unread for a while): what it heard,
    // with the fds.
    let mut reader = ivshm_proto::MessageReader::new();
    let mut heard = Heard::new();
    let mut hogs: Vec<Option<RawPeer>> = Vec::new();
    for _ in 0..40 {
        let mut hog = RawPeer::connect(&path);
        hog.expect(0, false);
        hogs.push(Some(hog));
        read_arrived(&first, &mut reader, &mut heard);
    }
    let mut late = late_join(&path, VECTORS, (&first, first_id), &mut hogs);
    assert!(!drain(&mut late));
    assert!(!drain(&mut first), "the server dropped the first peer");
    let stats = server.stats();
    let held = stats.removals[ivshm_server::RemovalReason::HeldFds { unread: 0 }.index()];
    assert!(held > 0, "no hog was dropped: {stats:?}");
    assert_eq!(
        stats.peers_dropped, held,
        "only hogs are dropped: {stats:?}"
    );
    drop(hogs);
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// A late honest peer joins while `first` reads what it gets and the hogs the server drops are
/// closed; it must hear of `first`, and `first` of it: a doorbell rung with the eventfd `first`
/// was given reaches it. Returns it.
fn late_join(
    path: &Path,
    vectors: usize,
    (first, first_id): (&RawPeer, u16),
    hogs: &mut [Option<RawPeer>],
) -> RawPeer {
    let mut reader = ivshm_proto::MessageReader::new();
    let mut heard = Heard::new();
    let (late, late_id, others, late_own) = std::thread::scope(|scope| {
        let joining = scope.spawn(|| honest_join_with(path, vectors));
        while !joining.is_finished() {
            close_dropped(hogs);
            read_arrived(first, &mut reader, &mut heard);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        joining.join().unwrap()
    });
    assert!(others.contains(&first_id), "{others:?}");
    // The first peer hears of the late one (after every hog it was told about).
    ring(news_of(late_id, first, &mut reader, &mut heard, hogs));
    wait_readable(late_own[0].as_fd());
    assert_eq!(take(&late_own[0]), 1);
    late
}

/// The case that dropped an honest peer under load, made to happen every time: the honest
/// peer pauses (a loaded machine's reader) until its buffer holds as many unread messages as
/// any hog's (16 vectors fill it after four joins, long before the fds in flight run out),
/// and it comes first in peer order. The server used to drop the peer with the most unread,
/// the first of equals: the honest one. Now the connections that never read their handshake
/// go, and it stays; once it reads again, it gets everything and a late peer joins.
#[test]
fn an_honest_peer_paused_with_a_full_buffer_is_not_taken_for_a_hog() {
    if !can_switch_users() {
        eprintln!("SKIPPED: running the server as nobody needs root");
        return;
    }
    const WIDE: usize = 16;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    limit_fds_to_1024();
    let dir = socket_dir("paused");
    let server = unprivileged_server_with(&dir, WIDE);
    let path = server.socket_path().to_path_buf();
    let (mut first, first_id, _, _first_own) = honest_join_with(&path, WIDE);
    // The first peer stops reading; hogs join, read their first message and stop.
    let mut hogs: Vec<Option<RawPeer>> = Vec::new();
    for _ in 0..40 {
        let mut hog = RawPeer::connect(&path);
        hog.expect(0, false);
        hogs.push(Some(hog));
    }
    assert!(
        queued(&first.sock) / 8 >= ivshm_server::MAX_UNREAD,
        "the paused peer's buffer is full"
    );
    // The fds in flight ran out (40 hogs hold far more than 1024): wait until the server has
    // dropped a few hogs (closing them, as their programs would), the paused peer unread.
    let deadline = std::time::Instant::now() + ivshm_test_support::WAIT_GUARD;
    let mut dropped = 0;
    while dropped < 3 {
        assert!(
            !hung_up(&first.sock),
            "the server dropped the paused honest peer (after {dropped} hogs)"
        );
        let before = hogs.iter().flatten().count();
        close_dropped(&mut hogs);
        dropped += before - hogs.iter().flatten().count();
        assert!(
            std::time::Instant::now() < deadline,
            "no hog was dropped: {:?}",
            server.stats()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        !hung_up(&first.sock),
        "the server dropped the paused honest peer"
    );
    // The first peer reads again (everything, while a late peer joins).
    let late = late_join(&path, WIDE, (&first, first_id), &mut hogs);
    assert!(!drain(&mut first), "the server dropped the first peer");
    let stats = server.stats();
    let held = stats.removals[ivshm_server::RemovalReason::HeldFds { unread: 0 }.index()];
    assert_eq!(
        stats.peers_dropped, held,
        "only hogs are dropped: {stats:?}"
    );
    drop((late, hogs));
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// Bytes queued for `sock` to read.
fn queued(sock: &OwnedFd) -> usize {
    rustix::io::ioctl_fionread(sock).unwrap() as usize
}

/// What a peer that does not read costs the server, as any user (root too, which the kernel's
/// count of fds in flight exempts): a connection that never reads is sent its first two
/// messages (version and id, no fd) and nothing more, however many peers join; one that read
/// and then stopped has at most about `MAX_UNREAD` messages queued (the rest waits, bounded,
/// in the server's queue for it).
#[test]
fn a_peer_that_does_not_read_is_sent_a_bounded_amount() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = common::start_server("bounded", VECTORS, 1 << 16);
    let path = server.socket_path().to_path_buf();
    let never = RawPeer::connect(&path);
    let mut stopped = RawPeer::connect(&path);
    stopped.expect(0, false);
    let mut joined = Vec::new();
    for _ in 0..100 {
        let (peer, ..) = honest_join(&path);
        joined.push(peer);
    }
    // 100 joins are 400 messages with an fd for each of the two.
    assert_eq!(queued(&never.sock), 16, "two messages of 8 bytes, no more");
    let unread = queued(&stopped.sock) / 8;
    assert!(
        (ivshm_server::MAX_UNREAD / 2..=ivshm_server::MAX_UNREAD + 1).contains(&unread),
        "{unread} messages queued"
    );
    drop(joined);
    server.shutdown().unwrap();
}
