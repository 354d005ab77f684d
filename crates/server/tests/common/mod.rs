//! An in-process server per test; the raw v0 peer and fd helpers come from
//! `ivshm-test-support`.
#![allow(dead_code, unused_imports)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
pub use ivshm_test_support::fds::{open_fds, readable_now, ring, take, wait_readable};
pub use ivshm_test_support::v0::{Joined, Msg, RawPeer};
pub use ivshm_test_support::WAIT_GUARD;

/// A unique socket path for one test.
pub fn socket_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("ivshm-srv-{tag}-{}-{n}.sock", std::process::id()))
}

/// A server with one memfd region of `size` bytes and `vectors` vectors.
pub fn start_server(tag: &str, vectors: usize, size: u64) -> ServerHandle {
    let mut region = RegionConfig::new(socket_path(tag));
    region.vectors = vectors;
    region.memory.size = size;
    ServerHandle::spawn(ServerConfig::single(region)).unwrap()
}

pub mod named;
