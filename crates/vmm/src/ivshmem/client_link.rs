//! [`DoorbellLink`] for `ivshm_client::Peer`: an ivshmem-doorbell device backed by a real
//! v0 connection to an ivshmem server (ours or QEMU's).

use std::os::fd::BorrowedFd;

use ivshm_client::{ClientError, Peer, PeerEvent};

use crate::ivshmem::link::{DoorbellLink, LinkError, PeerChange};

impl DoorbellLink for Peer {
    fn own_id(&self) -> u16 {
        self.id()
    }

    fn own_vector_count(&self) -> usize {
        self.vectors()
    }

    fn own_vector_fd(&self, vector: usize) -> Option<BorrowedFd<'_>> {
        Peer::own_vector_fd(self, vector)
    }

    fn peer_ids(&self) -> Vec<u16> {
        Peer::peer_ids(self)
    }

    fn peer_vector_fd(&self, peer: u16, vector: usize) -> Option<BorrowedFd<'_>> {
        Peer::peer_vector_fd(self, peer, vector)
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.socket_fd())
    }

    fn process_events(&mut self) -> Result<Vec<PeerChange>, LinkError> {
        match self.process_server_messages() {
            Ok(events) => Ok(events
                .into_iter()
                .map(|e| match e {
                    PeerEvent::Joined { id, vectors } => PeerChange::Joined { id, vectors },
                    PeerEvent::Left { id } => PeerChange::Left { id },
                })
                .collect()),
            // Doorbells between known peers keep working without the server.
            Err(ClientError::ServerGone) => Ok(Vec::new()),
            Err(e) => Err(LinkError::Client(e)),
        }
    }
}
