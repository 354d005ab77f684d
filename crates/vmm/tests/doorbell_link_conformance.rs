//! The [`DoorbellLink`] conformance suite, iceoryx2 style: one set of cases, run without KVM
//! against every implementation — [`LocalDoorbellBus`] members, and [`ivshm_client::Peer`]s
//! of a real in-process `ivshm-server` region (QEMU's id policy: increasing ids).
//!
//! What an ivshmem-doorbell device relies on: ids and vector counts, the vector eventfds of
//! itself and of the peers it knows, joins and leaves reported through `event_fd` and
//! `process_events`, and a ring of one peer's vector reaching exactly that eventfd.

use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::time::Instant;

use ivshm_client::{ConnectOptions, Peer};
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use ivshm_test_support::fds::{readable_now, take, wait_readable, wait_rung};
use ivshm_test_support::WAIT_GUARD as TIMEOUT;
use ivshm_vmm::ivshmem::link::ring_eventfd;
use ivshm_vmm::ivshmem::{DoorbellLink, LocalDoorbellBus, PeerChange};

/// Vectors per member in every case.
const VECTORS: usize = 2;

/// An implementation under test: a place members join.
trait Implementation {
    /// A fresh bus (no members), named after `tag`.
    fn start(tag: &str) -> Self;
    /// A new member with [`VECTORS`] vectors.
    fn join(&self) -> Box<dyn DoorbellLink>;
}

struct Local(LocalDoorbellBus);

impl Implementation for Local {
    fn start(_tag: &str) -> Self {
        Local(LocalDoorbellBus::new())
    }

    fn join(&self) -> Box<dyn DoorbellLink> {
        Box::new(self.0.join(VECTORS).unwrap())
    }
}

/// A region of a real server; members are v0 peers.
struct Server {
    dir: PathBuf,
    socket: PathBuf,
    server: Option<ServerHandle>,
}

impl Implementation for Server {
    fn start(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ivshm-vmm-link-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("region.sock");
        let mut region = RegionConfig::new(&socket);
        region.vectors = VECTORS;
        region.memory.size = 1 << 16;
        let server = ServerHandle::spawn(ServerConfig::single(region)).unwrap();
        Server {
            dir,
            socket,
            server: Some(server),
        }
    }

    fn join(&self) -> Box<dyn DoorbellLink> {
        let opts = ConnectOptions {
            timeout: TIMEOUT,
            ..ConnectOptions::default()
        };
        Box::new(Peer::connect(&self.socket, opts).unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = server.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (bounded by the failure guard) until `link` reports changes, and returns them.
fn next_changes(link: &mut dyn DoorbellLink) -> Vec<PeerChange> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let event_fd = link
            .event_fd()
            .expect("a link that reports changes has an event fd")
            .try_clone_to_owned()
            .unwrap();
        wait_readable(event_fd.as_fd());
        let changes = link.process_events().unwrap();
        if !changes.is_empty() {
            return changes;
        }
        // A join arrives as one message per vector: more may be on the way.
        assert!(Instant::now() < deadline, "no change within {TIMEOUT:?}");
    }
}

/// Rings `peer`'s `vector` through `link`.
fn ring(link: &dyn DoorbellLink, peer: u16, vector: usize) {
    ring_eventfd(
        link.peer_vector_fd(peer, vector)
            .expect("a known peer vector"),
    )
    .unwrap();
}

/// The cases every implementation agrees on.
mod suite {
    use super::*;

    /// Ids start at 0 and count up; each member has its vectors and no more.
    pub fn ids_count_up_and_members_have_their_vectors<I: Implementation>() {
        let bus = I::start("ids");
        let a = bus.join();
        let b = bus.join();
        assert_eq!((a.own_id(), b.own_id()), (0, 1));
        for link in [&a, &b] {
            assert_eq!(link.own_vector_count(), VECTORS);
            assert!((0..VECTORS).all(|v| link.own_vector_fd(v).is_some()));
            assert!(link.own_vector_fd(VECTORS).is_none());
        }
    }

    /// A member knows the members that were there before it, with their vectors.
    pub fn a_member_knows_the_earlier_members<I: Implementation>() {
        let bus = I::start("earlier");
        let _a = bus.join();
        let b = bus.join();
        assert_eq!(b.peer_ids(), vec![0]);
        assert!((0..VECTORS).all(|v| b.peer_vector_fd(0, v).is_some()));
        assert!(b.peer_vector_fd(0, VECTORS).is_none(), "no such vector");
        assert!(b.peer_vector_fd(99, 0).is_none(), "no such peer");
    }

    /// Nothing happened: `process_events` reports nothing (and does not block).
    pub fn no_events_no_changes<I: Implementation>() {
        let bus = I::start("quiet");
        let mut a = bus.join();
        assert_eq!(a.process_events().unwrap(), Vec::new());
        assert!(a.peer_ids().is_empty());
    }

    /// A later member arrives as a `Joined` change on the earlier members' event fd; then
    /// its vectors can be rung.
    pub fn a_later_member_arrives_as_a_change<I: Implementation>() {
        let bus = I::start("later");
        let mut a = bus.join();
        let b = bus.join();
        assert_eq!(
            next_changes(a.as_mut()),
            vec![PeerChange::Joined {
                id: b.own_id(),
                vectors: VECTORS
            }]
        );
        assert_eq!(a.peer_ids(), vec![1]);
        assert!((0..VECTORS).all(|v| a.peer_vector_fd(1, v).is_some()));
    }

    /// A ring of a peer's vector reaches exactly that vector's eventfd, both ways.
    pub fn a_ring_reaches_exactly_that_vector<I: Implementation>() {
        let bus = I::start("ring");
        let mut a = bus.join();
        let b = bus.join();
        next_changes(a.as_mut());
        ring(a.as_ref(), 1, 1);
        assert_eq!(wait_rung(b.own_vector_fd(1).unwrap()), 1);
        assert!(
            !readable_now(b.own_vector_fd(0).unwrap()),
            "vector 0 untouched"
        );
        ring(b.as_ref(), 0, 0);
        ring(b.as_ref(), 0, 0);
        wait_readable(a.own_vector_fd(0).unwrap());
        assert_eq!(take(a.own_vector_fd(0).unwrap()), 2, "two rings counted");
        assert!(
            !readable_now(a.own_vector_fd(1).unwrap()),
            "vector 1 untouched"
        );
    }

    /// A member that goes is a `Left` change; its vectors are forgotten.
    pub fn a_leaving_member_is_a_change_and_forgotten<I: Implementation>() {
        let bus = I::start("leave");
        let mut a = bus.join();
        let b = bus.join();
        next_changes(a.as_mut());
        drop(b);
        assert_eq!(next_changes(a.as_mut()), vec![PeerChange::Left { id: 1 }]);
        assert!(a.peer_ids().is_empty());
        assert!(a.peer_vector_fd(1, 0).is_none());
    }

    /// Ids are not reused while the counter has not wrapped (QEMU's server).
    pub fn ids_are_not_reused<I: Implementation>() {
        let bus = I::start("reuse");
        let mut a = bus.join();
        let b = bus.join();
        next_changes(a.as_mut());
        drop(b);
        next_changes(a.as_mut());
        let c = bus.join();
        assert_eq!(c.own_id(), 2);
        assert_eq!(c.peer_ids(), vec![0]);
        assert_eq!(
            next_changes(a.as_mut()),
            vec![PeerChange::Joined {
                id: 2,
                vectors: VECTORS
            }]
        );
    }

    /// The own id is never a peer, but ringing it as one reaches the member's own vectors
    /// (the trait's contract: a peer may ring itself, as QEMU allows).
    pub fn own_id_as_a_peer_gives_own_vectors<I: Implementation>() {
        let bus = I::start("self");
        let mut a = bus.join();
        let b = bus.join();
        next_changes(a.as_mut());
        for link in [&a, &b] {
            let own = link.own_id();
            assert!(!link.peer_ids().contains(&own), "own id listed as a peer");
            for v in 0..VECTORS {
                let as_peer = link.peer_vector_fd(own, v).expect("own vector as a peer");
                assert_eq!(
                    as_peer.as_raw_fd(),
                    link.own_vector_fd(v).unwrap().as_raw_fd(),
                    "the own vector's eventfd"
                );
            }
            assert!(
                link.peer_vector_fd(own, VECTORS).is_none(),
                "no such vector"
            );
        }
        ring(b.as_ref(), 1, 1);
        assert_eq!(wait_rung(b.own_vector_fd(1).unwrap()), 1);
        assert!(
            !readable_now(b.own_vector_fd(0).unwrap()),
            "vector 0 untouched"
        );
        assert!(
            !readable_now(a.own_vector_fd(1).unwrap()),
            "the other member untouched"
        );
    }
}

/// Instantiates every agreed case of [`suite`] for an implementation.
macro_rules! doorbell_link_suite {
    ($implementation:ty) => {
        doorbell_link_suite!($implementation:
            ids_count_up_and_members_have_their_vectors,
            a_member_knows_the_earlier_members,
            no_events_no_changes,
            a_later_member_arrives_as_a_change,
            a_ring_reaches_exactly_that_vector,
            a_leaving_member_is_a_change_and_forgotten,
            ids_are_not_reused,
            own_id_as_a_peer_gives_own_vectors,
        );
    };
    ($implementation:ty: $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                suite::$case::<$implementation>();
            }
        )*
    };
}

mod local_doorbell_link {
    use super::*;

    doorbell_link_suite!(Local);
}

mod client_peer {
    use super::*;

    doorbell_link_suite!(Server);
}
