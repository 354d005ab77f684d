//! Hooks into the event loop for programs that report what happens to peers in their own words.
//!
//! The `ivshmem-server` drop-in prints QEMU's `-v` lines with them (`accept()=N`,
//! `new peer id = N`, `peer->sock_fd=N`, `free peer N`); `tracing` logs stay what every other
//! program sees. Install one with [`Server::set_observer`](crate::Server::set_observer).

use std::fmt;
use std::os::fd::BorrowedFd;

use crate::peer::RemovalReason;

/// Called by the loop as connections come and peers go. Every method does nothing by default.
///
/// The loop calls these synchronously: keep them short, and never block.
pub trait Observer {
    /// A connection was accepted on a socket of region `region`; `socket` is its fd in this
    /// process (it may still be refused: full region, no free id, no fds for its eventfds).
    fn accepted(&mut self, region: &str, socket: BorrowedFd<'_>) {
        let _ = (region, socket);
    }

    /// The connection on `socket` became peer `id` of region `region` (its handshake and the
    /// news for the others are queued).
    fn joined(&mut self, region: &str, id: u16, socket: BorrowedFd<'_>) {
        let _ = (region, id, socket);
    }

    /// Peer `id` of region `region` is gone, for `reason` (the others are being told).
    fn removed(&mut self, region: &str, id: u16, reason: &RemovalReason) {
        let _ = (region, id, reason);
    }

    /// The loop has handled everything one wait for events returned (one wake-up).
    fn wakeup_handled(&mut self) {}
}

/// The observer a server without one uses.
#[derive(Debug, Default)]
pub(crate) struct NoObserver;

impl Observer for NoObserver {}

/// The server's observer, if any (a box, so `Server` stays `Send` and printable).
#[derive(Default)]
pub(crate) struct ObserverSlot {
    installed: Option<Box<dyn Observer + Send>>,
    none: NoObserver,
}

impl ObserverSlot {
    /// Installs `observer` (replacing any other).
    pub(crate) fn set(&mut self, observer: Box<dyn Observer + Send>) {
        self.installed = Some(observer);
    }

    /// The observer to call: the installed one, or one that does nothing.
    pub(crate) fn get(&mut self) -> &mut dyn Observer {
        match &mut self.installed {
            Some(observer) => observer.as_mut(),
            None => &mut self.none,
        }
    }
}

impl fmt::Debug for ObserverSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let installed = if self.installed.is_some() {
            "Some(..)"
        } else {
            "None"
        };
        f.debug_struct("ObserverSlot")
            .field("installed", &format_args!("{installed}"))
            .finish()
    }
}
