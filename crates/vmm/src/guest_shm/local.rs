//! An in-process region registry: every VM's [`LocalFactory`] shares one set of named
//! regions (memfd-backed), with the VM's policy applied to each request.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use ivshm_mem::Mapping;
use ivshm_policy::VmPolicy;
use ivshm_proto::guest_shm::{pages_for, GuestShmStatus, MAX_CLIENTS, PAGE_SIZE};

use crate::guest_shm::{dup, Attachment, Factory, RegionConnection};
use crate::ivshmem::link::ring_eventfd;

struct Client {
    /// Connection serial, so a stale handle never touches a reused index.
    serial: u64,
    pending: u16,
    interrupt: OwnedFd,
}

struct Region {
    memory: Arc<Mapping>,
    pages: u32,
    clients: [Option<Client>; MAX_CLIENTS],
    /// Made by a VM's `create` line: stays while the registry lives, as the server keeps
    /// configured regions, instead of going with its last client.
    configured: bool,
}

impl Region {
    fn new(name: &str, pages: u32, configured: bool) -> Result<Region, GuestShmStatus> {
        Ok(Region {
            memory: Arc::new(new_region_memory(name, pages)?),
            pages,
            clients: Default::default(),
            configured,
        })
    }

    fn attached_mask(&self) -> u16 {
        self.clients
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_some())
            .fold(0, |m, (i, _)| m | (1 << i))
    }

    /// Rings every client's interrupt except `except`'s: their attached bitmap changed.
    fn ring_others(&self, except: usize) {
        for (i, c) in self.clients.iter().enumerate() {
            if let (true, Some(c)) = (i != except, c) {
                let _ = ring_eventfd(c.interrupt.as_fd());
            }
        }
    }
}

#[derive(Default)]
struct Registry {
    regions: HashMap<String, Region>,
    next_serial: u64,
}

/// Named regions shared by all factories made from it.
#[derive(Clone, Default)]
pub struct LocalRegionRegistry {
    inner: Arc<Mutex<Registry>>,
    max_pages: u32,
}

impl std::fmt::Debug for LocalRegionRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRegionRegistry")
            .field("max_pages", &self.max_pages)
            .finish_non_exhaustive()
    }
}

impl LocalRegionRegistry {
    /// A registry whose regions may have at most `max_pages` pages (larger creates get
    /// `GSS_NOMEM`).
    pub fn new(max_pages: u32) -> LocalRegionRegistry {
        LocalRegionRegistry {
            inner: Arc::default(),
            max_pages,
        }
    }

    /// A factory for one VM with its policy. The policy's `create` lines are honoured here,
    /// as the server honours them at VM start: each region that does not exist yet is created
    /// with its size rounded up to whole pages (the first creator decides the size; a line's
    /// size is the operator's, so `max_pages` does not apply) and stays while the registry
    /// lives. A region whose memory cannot be had is logged and skipped.
    pub fn factory(&self, policy: VmPolicy) -> LocalFactory {
        if let Ok(mut reg) = self.inner.lock() {
            for (host_name, bytes) in policy.pre_created() {
                let host_name = host_name.into_string();
                if reg.regions.contains_key(&host_name) {
                    continue;
                }
                let created = u32::try_from(pages_for(bytes))
                    .map_err(|_| GuestShmStatus::NoMem)
                    .and_then(|pages| Region::new(&host_name, pages, true));
                match created {
                    Ok(region) => {
                        reg.regions.insert(host_name, region);
                    }
                    Err(status) => tracing::warn!(
                        region = %host_name,
                        bytes,
                        %status,
                        "guest_shm: a create line's region could not be made"
                    ),
                }
            }
        }
        LocalFactory {
            registry: self.clone(),
            policy,
        }
    }

    /// Attached-client bitmap of a region by host name (0 if it does not exist).
    pub fn attached_mask(&self, host_name: &str) -> u16 {
        self.inner
            .lock()
            .ok()
            .and_then(|r| r.regions.get(host_name).map(Region::attached_mask))
            .unwrap_or(0)
    }

    /// Whether a region of that host name exists.
    pub fn contains(&self, host_name: &str) -> bool {
        self.inner
            .lock()
            .is_ok_and(|r| r.regions.contains_key(host_name))
    }

    fn attach(
        &self,
        host_name: &str,
        create_pages: Option<u32>,
        interrupt: BorrowedFd<'_>,
    ) -> Result<Attachment, GuestShmStatus> {
        let mut reg = self
            .inner
            .lock()
            .map_err(|_| GuestShmStatus::UnknownFailure)?;
        if !reg.regions.contains_key(host_name) {
            let pages = match create_pages {
                // A find, or a create of no pages: nothing to attach to, nothing to create.
                None | Some(0) => return Err(GuestShmStatus::DoesNotExist),
                Some(p) if p > self.max_pages => return Err(GuestShmStatus::NoMem),
                Some(p) => p,
            };
            let region = Region::new(host_name, pages, false)?;
            reg.regions.insert(host_name.to_owned(), region);
        }
        let serial = reg.next_serial;
        let region = reg
            .regions
            .get_mut(host_name)
            .ok_or(GuestShmStatus::UnknownFailure)?;
        let idx = region
            .clients
            .iter()
            .position(Option::is_none)
            .ok_or(GuestShmStatus::ClientMax)?;
        region.clients[idx] = Some(Client {
            serial,
            pending: 0,
            interrupt: dup(interrupt)?,
        });
        region.ring_others(idx);
        let attachment = Attachment {
            connection: Box::new(LocalConnection {
                registry: self.clone(),
                host_name: host_name.to_owned(),
                idx,
                serial,
                detached: false,
            }),
            memory: region.memory.clone(),
            pages: region.pages,
        };
        reg.next_serial += 1;
        Ok(attachment)
    }
}

fn new_region_memory(name: &str, pages: u32) -> Result<Mapping, GuestShmStatus> {
    let bytes = u64::from(pages) * PAGE_SIZE as u64;
    let len = usize::try_from(bytes).map_err(|_| GuestShmStatus::NoMem)?;
    let fd = rustix::fs::memfd_create(format!("guest_shm-{name}"), rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|_| GuestShmStatus::NoMem)?;
    rustix::fs::ftruncate(&fd, bytes).map_err(|_| GuestShmStatus::NoMem)?;
    Mapping::map_fd(fd.as_fd(), 0, len).map_err(|_| GuestShmStatus::NoMem)
}

/// One VM's factory on a [`LocalRegionRegistry`].
pub struct LocalFactory {
    registry: LocalRegionRegistry,
    policy: VmPolicy,
}

impl std::fmt::Debug for LocalFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalFactory").finish_non_exhaustive()
    }
}

impl LocalFactory {
    fn host_name(&self, name: &[u8]) -> Result<String, GuestShmStatus> {
        let decision = self.policy.decide_factory_field(name);
        if decision.status != GuestShmStatus::Ok {
            return Err(decision.status);
        }
        decision
            .host_name
            .map(|n| n.into_string())
            .ok_or(GuestShmStatus::IllegalName)
    }
}

impl Factory for LocalFactory {
    fn create_or_attach(
        &mut self,
        name: &[u8],
        pages: u32,
        interrupt: BorrowedFd<'_>,
    ) -> Result<Attachment, GuestShmStatus> {
        let host = self.host_name(name)?;
        self.registry.attach(&host, Some(pages), interrupt)
    }

    fn find(
        &mut self,
        name: &[u8],
        interrupt: BorrowedFd<'_>,
    ) -> Result<Attachment, GuestShmStatus> {
        let host = self.host_name(name)?;
        self.registry.attach(&host, None, interrupt)
    }
}

struct LocalConnection {
    registry: LocalRegionRegistry,
    host_name: String,
    idx: usize,
    serial: u64,
    detached: bool,
}

impl LocalConnection {
    fn with_region<T>(&self, f: impl FnOnce(&mut Region) -> T) -> Option<T> {
        if self.detached {
            return None;
        }
        let mut reg = self.registry.inner.lock().ok()?;
        let region = reg.regions.get_mut(&self.host_name)?;
        match &region.clients[self.idx] {
            Some(c) if c.serial == self.serial => Some(f(region)),
            _ => None,
        }
    }

    fn status(&self, clear: bool) -> u32 {
        let idx = self.idx;
        self.with_region(|r| {
            let attached = u32::from(r.attached_mask());
            let pending = r.clients[idx].as_mut().map_or(0, |c| {
                if clear {
                    std::mem::take(&mut c.pending)
                } else {
                    c.pending
                }
            });
            (attached << 16) | u32::from(pending)
        })
        .unwrap_or(0)
    }
}

impl RegionConnection for LocalConnection {
    fn idx(&self) -> u32 {
        self.idx as u32
    }

    fn read_status(&mut self) -> u32 {
        self.status(true)
    }

    fn peek_status(&self) -> u32 {
        self.status(false)
    }

    fn notify(&mut self, mask: u32) {
        let idx = self.idx;
        let mask = if mask == u32::MAX {
            0xffff & !(1 << idx)
        } else {
            mask & 0xffff
        };
        self.with_region(|r| {
            for (i, c) in r.clients.iter_mut().enumerate() {
                let Some(c) = c.as_mut().filter(|_| mask & (1 << i) != 0) else {
                    continue;
                };
                // Only a bit that was clear changes the target's status: ring once for it.
                if c.pending & (1 << idx) == 0 {
                    c.pending |= 1 << idx;
                    let _ = ring_eventfd(c.interrupt.as_fd());
                }
            }
        });
    }

    fn detach(&mut self) {
        if self.detached {
            return;
        }
        if let Ok(mut reg) = self.registry.inner.lock() {
            let mut now_unused = false;
            if let Some(r) = reg.regions.get_mut(&self.host_name) {
                if matches!(&r.clients[self.idx], Some(c) if c.serial == self.serial) {
                    r.clients[self.idx] = None;
                    r.ring_others(self.idx);
                }
                now_unused = r.attached_mask() == 0 && !r.configured;
            }
            if now_unused {
                reg.regions.remove(&self.host_name);
            }
        }
        self.detached = true;
    }
}

impl Drop for LocalConnection {
    fn drop(&mut self) {
        self.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ivshmem::link::drain_eventfd;
    use rustix::event::{eventfd, EventfdFlags};

    fn efd() -> OwnedFd {
        eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap()
    }

    fn name(s: &str) -> [u8; 32] {
        let mut n = [0u8; 32];
        n[..s.len()].copy_from_slice(s.as_bytes());
        n
    }

    #[test]
    fn create_attach_notify_detach() {
        let reg = LocalRegionRegistry::new(1024);
        let mut fa = reg.factory(VmPolicy::parse_qnx("vdev shmem").unwrap());
        let mut fb = reg.factory(VmPolicy::parse_qnx("vdev shmem").unwrap());
        let (ia, ib) = (efd(), efd());
        let mut a = fa.create_or_attach(&name("r"), 4, ia.as_fd()).unwrap();
        assert_eq!((a.connection.idx(), a.pages), (0, 4));
        let mut b = fb.create_or_attach(&name("r"), 1, ib.as_fd()).unwrap();
        assert_eq!(
            (b.connection.idx(), b.pages),
            (1, 4),
            "creator chose the size"
        );
        assert_eq!(drain_eventfd(ia.as_fd()).unwrap(), 1, "A sees B attach");
        assert_eq!(drain_eventfd(ib.as_fd()).unwrap(), 0);
        a.memory.view().write_u32(0, 77).unwrap();
        assert_eq!(b.memory.view().read_u32(0).unwrap(), 77);
        a.connection.notify(u32::MAX);
        assert_eq!(drain_eventfd(ib.as_fd()).unwrap(), 1);
        assert_eq!(b.connection.read_status(), 0x0003_0001);
        assert_eq!(b.connection.read_status(), 0x0003_0000, "read clears");
        b.connection.detach();
        assert_eq!(drain_eventfd(ia.as_fd()).unwrap(), 1, "A sees B detach");
        assert_eq!(a.connection.read_status(), 0x0001_0000);
        assert_eq!(
            fb.find(&name("r"), ib.as_fd()).unwrap().connection.idx(),
            1,
            "lowest free index"
        );
    }
}
