//! An in-process server per test (the raw v0 peer and fd helpers come from
//! `ivshm-test-support`).

use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use ivshm_test_support::socket_path;

/// A server with one memfd region of `size` bytes and `vectors` vectors.
pub fn start_server(tag: &str, vectors: usize, size: u64) -> ServerHandle {
    let mut region = RegionConfig::new(socket_path(tag));
    region.vectors = vectors;
    region.memory.size = size;
    ServerHandle::spawn(ServerConfig::single(region)).unwrap()
}
