//! Marking the channel sides of peers that leave (`docs/channel-spec.md`, "Peers that leave").
//!
//! Guests get no leave events from an ivshmem device, so a guest whose channel peer dies would
//! wait for it until its timeout. The server sees every leave: when a peer goes, and the
//! region's memory starts with a formatted channel region header, it marks the peer's
//! attached channel sides gone, frees the directory lock if the peer held it, and rings the
//! surviving endpoints' vectors (the eventfds it made for them), so sleepers wake and get
//! "peer left". This happens inside the leave's handling, before the next event: a peer that
//! gets the departed peer's id later never meets its marks.
//!
//! The region is hostile memory: the marking is `ivshm_channel::mark_departed`, which reads
//! the header once, validates it against the mapping's size, and only compare-and-exchanges
//! side words and the lock word from exact values. It never waits, never takes the directory
//! lock and does a bounded amount of work (at most 65,536 entries), so the epoll loop stays
//! non-blocking. The server maps only memory whose size is sealed (the memfd backend): a peer
//! holding the fd of a POSIX shm object or a file could truncate it under the mapping and turn
//! the server's access into `SIGBUS`. Regions of other backends are not marked (host peers
//! mark on their leave events instead).

use std::os::fd::OwnedFd;
use std::sync::Arc;

use ivshm_mem::{Mapping, SharedMemory};
use rustix::fs::{fcntl_get_seals, SealFlags};

/// Whether and how the departed peers of one region are marked.
#[derive(Debug)]
pub(crate) struct ChannelDepartures {
    state: State,
}

#[derive(Debug)]
enum State {
    /// Switched off, or the memory cannot be mapped safely.
    Off,
    /// Not mapped yet (nobody left yet).
    Unmapped,
    /// The region's memory, mapped by the server.
    Mapped(Mapping),
}

impl ChannelDepartures {
    /// Marking on (`enabled`) or off.
    pub(crate) fn new(enabled: bool) -> ChannelDepartures {
        ChannelDepartures {
            state: if enabled { State::Unmapped } else { State::Off },
        }
    }

    /// The mapping, made on first use if the memory's size is sealed.
    fn mapping(&mut self, region: &str, memory: &SharedMemory) -> Option<&Mapping> {
        if let State::Unmapped = self.state {
            self.state = match map_sealed(memory) {
                Ok(mapping) => State::Mapped(mapping),
                Err(why) => {
                    tracing::debug!(
                        region,
                        "channel sides of departed peers are not marked: {why}"
                    );
                    State::Off
                }
            };
        }
        match &self.state {
            State::Mapped(m) => Some(m),
            _ => None,
        }
    }

    /// Peer `peer` left: marks its channel sides gone, if the region holds channels, and rings
    /// the survivors through `eventfds_of` (a survivor's own eventfds, by peer id).
    pub(crate) fn peer_left<'a>(
        &mut self,
        region: &str,
        memory: &SharedMemory,
        peer: u16,
        eventfds_of: impl Fn(u16) -> Option<&'a [Arc<OwnedFd>]>,
    ) {
        let Some(mapping) = self.mapping(region, memory) else {
            return;
        };
        let departure = match ivshm_channel::mark_departed(mapping.view(), peer) {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(region, peer, "cannot mark the channels of peer {peer}: {e}");
                return;
            }
        };
        let mut rung = 0;
        for &(survivor, vector) in &departure.to_ring {
            let fd = eventfds_of(survivor).and_then(|fds| fds.get(usize::from(vector)));
            // Non-blocking eventfds: a full counter (EAGAIN) is a pending ring already.
            if let Some(fd) = fd {
                if rustix::io::write(&**fd, &1u64.to_ne_bytes()).is_ok() {
                    rung += 1;
                }
            }
        }
        if departure.marked > 0 || departure.lock_freed {
            tracing::info!(
                region,
                peer,
                "peer {peer} left: {} channel side(s) marked gone, {rung} survivor(s) rung{}",
                departure.marked,
                if departure.lock_freed {
                    ", its channel directory lock freed"
                } else {
                    ""
                }
            );
        }
    }
}

/// Maps `memory` if nobody can shrink it (sealed memfd).
fn map_sealed(memory: &SharedMemory) -> Result<Mapping, String> {
    let seals = fcntl_get_seals(memory.fd()).map_err(|_| {
        "the memory backend cannot seal its size (only memfd regions are marked)".to_string()
    })?;
    if !seals.contains(SealFlags::SHRINK) {
        return Err("the memory's size is not sealed".into());
    }
    let len = usize::try_from(memory.size()).map_err(|_| "the region is too large to map")?;
    Mapping::map_fd(memory.fd(), 0, len).map_err(|e| format!("mapping the region: {e}"))
}
