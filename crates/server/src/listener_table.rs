//! The listening sockets of every region, by key: which region each one serves, which VM
//! directory holds it, and its place in the epoll set.
//!
//! The table is the only code that puts a region socket into the epoll set or takes one out,
//! so "a socket is watched exactly when it is in the table and its region is accepting" holds
//! by construction: adding registers, removing (or dropping the table) deregisters, and a
//! region paused for lack of fds has all its sockets out of the set until [`resume_all`].
//!
//! [`resume_all`]: ListenerTable::resume_all

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use rustix::io::Errno;

use crate::event_loop::{Poller, Token};
use crate::limits::ReserveFd;
use crate::listener::Listener;
use crate::regions::RegionId;

/// A region socket's key: its epoll token and its name in the table (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct SocketKey(pub(crate) usize);

/// The VM directory a socket is in, and the VM's name for the region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VmSocket {
    /// The VM.
    pub(crate) vm: String,
    /// The name the VM knows the region by (the socket is `<guest>.sock`).
    pub(crate) guest: String,
}

/// A listening socket of a region: its own (standalone) or one in a VM's directory.
#[derive(Debug)]
pub(crate) struct RegionSocket {
    region: RegionId,
    vm: Option<VmSocket>,
    listener: Listener,
}

impl RegionSocket {
    /// The region it serves.
    pub(crate) fn region(&self) -> RegionId {
        self.region
    }

    /// The VM directory that holds it (`None` for a standalone region's socket).
    pub(crate) fn vm(&self) -> Option<&VmSocket> {
        self.vm.as_ref()
    }

    /// Whether it is in `vm`'s directory.
    pub(crate) fn is_in(&self, vm: &str) -> bool {
        self.vm.as_ref().is_some_and(|s| s.vm == vm)
    }

    /// Its path.
    pub(crate) fn path(&self) -> &Path {
        self.listener.path()
    }

    /// Device and inode of the socket file as bound.
    pub(crate) fn identity(&self) -> (u64, u64) {
        self.listener.identity()
    }
}

/// Every region socket, by key, and its epoll registration.
#[derive(Debug)]
pub(crate) struct ListenerTable {
    poller: Arc<Poller>,
    sockets: BTreeMap<SocketKey, RegionSocket>,
    next_key: usize,
    /// Regions whose sockets are out of the epoll set because fds ran out.
    paused: BTreeSet<RegionId>,
}

impl ListenerTable {
    pub(crate) fn new(poller: Arc<Poller>) -> Self {
        ListenerTable {
            poller,
            sockets: BTreeMap::new(),
            next_key: 0,
            paused: BTreeSet::new(),
        }
    }

    /// Adds a socket of `region` and watches it (unless the region is paused). If it cannot be
    /// watched it is not added (and its file goes with it).
    pub(crate) fn add(
        &mut self,
        region: RegionId,
        vm: Option<VmSocket>,
        listener: Listener,
    ) -> Result<SocketKey, Errno> {
        let key = SocketKey(self.next_key);
        if !self.paused.contains(&region) {
            self.poller.add(listener.fd(), Token::Listener(key.0))?;
        }
        self.next_key += 1;
        self.sockets.insert(
            key,
            RegionSocket {
                region,
                vm,
                listener,
            },
        );
        Ok(key)
    }

    /// Removes socket `key`, stops watching it and removes its file. Returns it (its path still
    /// readable until it is dropped).
    pub(crate) fn remove(&mut self, key: SocketKey) -> Option<RegionSocket> {
        let socket = self.sockets.remove(&key)?;
        if !self.paused.contains(&socket.region) {
            let _ = self.poller.remove(socket.listener.fd());
        }
        Some(socket)
    }

    /// Removes every socket of `region`.
    pub(crate) fn remove_region(&mut self, region: RegionId) {
        for key in self.keys_of(region) {
            self.remove(key);
        }
        self.paused.remove(&region);
    }

    /// Socket `key`.
    pub(crate) fn get(&self, key: SocketKey) -> Option<&RegionSocket> {
        self.sockets.get(&key)
    }

    /// Every socket, in the order they were added.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (SocketKey, &RegionSocket)> {
        self.sockets.iter().map(|(&key, socket)| (key, socket))
    }

    /// The sockets of `region`, in the order they were added.
    pub(crate) fn of_region(
        &self,
        region: RegionId,
    ) -> impl Iterator<Item = (SocketKey, &RegionSocket)> {
        self.iter().filter(move |(_, s)| s.region == region)
    }

    fn keys_of(&self, region: RegionId) -> Vec<SocketKey> {
        self.of_region(region).map(|(key, _)| key).collect()
    }

    /// Accepts one connection on socket `key` (`Ok(None)` when none is waiting or the socket
    /// is gone).
    pub(crate) fn accept(&self, key: SocketKey) -> Result<Option<OwnedFd>, Errno> {
        match self.sockets.get(&key) {
            Some(socket) => socket.listener.accept(),
            None => Ok(None),
        }
    }

    /// Out of fds: accepts one waiting connection on socket `key` into the reserve fd's slot
    /// and closes it, calling `refused` before the close (so whoever sees the connection closed
    /// sees it counted). `Ok(true)` if one was refused (there may be more), `Ok(false)` if none
    /// was waiting, `Err` if even that failed.
    pub(crate) fn refuse_one(
        &self,
        key: SocketKey,
        reserve: &mut ReserveFd,
        refused: impl FnOnce(),
    ) -> Result<bool, Errno> {
        let Some(socket) = self.sockets.get(&key) else {
            return Ok(false);
        };
        reserve.release_for(|| {
            socket.listener.accept().map(|connection| {
                let some = connection.is_some();
                if some {
                    refused();
                }
                some
            })
        })
    }

    /// Stops watching `region`'s sockets until [`resume_all`](Self::resume_all), so the loop
    /// does not spin on a listener it cannot accept from.
    pub(crate) fn pause(&mut self, region: RegionId) {
        if !self.paused.insert(region) {
            return;
        }
        for socket in self.sockets.values().filter(|s| s.region == region) {
            let _ = self.poller.remove(socket.listener.fd());
        }
    }

    /// Whether `region` is paused.
    pub(crate) fn is_paused(&self, region: RegionId) -> bool {
        self.paused.contains(&region)
    }

    /// Watches the sockets of every paused region again (fds were freed). Returns the regions
    /// resumed.
    pub(crate) fn resume_all(&mut self) -> Vec<RegionId> {
        let resumed: Vec<RegionId> = std::mem::take(&mut self.paused).into_iter().collect();
        for socket in self
            .sockets
            .iter()
            .filter(|(_, s)| resumed.contains(&s.region))
        {
            let (key, socket) = socket;
            if let Err(errno) = self
                .poller
                .add(socket.listener.fd(), Token::Listener(key.0))
            {
                tracing::error!(socket = %socket.path().display(), %errno, "cannot watch a socket again");
            }
        }
        resumed
    }
}
