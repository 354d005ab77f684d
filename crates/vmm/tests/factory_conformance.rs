//! The `guest_shm` [`Factory`] conformance suite, iceoryx2 style: one set of cases, run against
//! every implementation without KVM — [`LocalFactory`](ivshm_vmm::guest_shm::LocalFactory) on
//! an in-process registry, and [`ServerFactory`](ivshm_vmm::guest_shm::ServerFactory) on a
//! real in-process `ivshm-server` with named regions.
//!
//! Both serve three VMs with the same policies (`common::VM0_POLICY`, `VM1_POLICY`,
//! `VM2_POLICY`) and the same size limit. Every case is what a QNX guest may rely on from any
//! factory, and each decides one thing for both: the status codes (`GSS_DOES_NOT_EXIST` for a
//! create of 0 pages of a missing region, `GSS_CLIENT_MAX` for a region that fills between a
//! server's answer and the join, `GSS_ILLEGAL_NAME` for exactly the refused names), who
//! chooses the size and that every region is whole pages all backed, the `create` lines of a
//! policy, connection indexes, and the control `status` with exactly one interrupt per change.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{NamedServer, MAX_PAGES, TIMEOUT, VM0_POLICY, VM1_POLICY, VM2_POLICY};
use ivshm_policy::VmPolicy;
use ivshm_proto::guest_shm::{GuestShmStatus, PAGE_SIZE};
use ivshm_test_support::fds::{readable_within, take, wait_rung};
use ivshm_vmm::guest_shm::{Attachment, Factory, LocalRegionRegistry, ServerFactory};
use rustix::event::{eventfd, EventfdFlags};

/// How long a client must stay quiet before "no more interrupts" is believed (a failure
/// guard for the asynchronous server path; not a speed assertion).
const QUIET: Duration = Duration::from_millis(300);

/// An implementation under test: factories of VMs `vm0`, `vm1` and `vm2` over one set of
/// regions.
trait Implementation {
    /// A fresh instance (no regions but those the policies create), named after `tag`.
    fn start(tag: &str) -> Self;
    /// A factory for `vm`.
    fn factory(&self, vm: &str) -> Box<dyn Factory>;
    /// A factory for `vm` whose next request (a `find` of `name`) is answered as the factory
    /// answers it now: with a server in between, the join comes after the answer, so a region
    /// that fills meanwhile is full at the join.
    fn factory_answered_now(&self, vm: &str, name: &str) -> Box<dyn Factory>;
}

/// The `vdev shmem` policy of `vm`, as the server has it.
fn vm_policy(vm: &str) -> VmPolicy {
    let text = match vm {
        "vm0" => VM0_POLICY,
        "vm1" => VM1_POLICY,
        "vm2" => VM2_POLICY,
        other => panic!("no VM {other}"),
    };
    VmPolicy::parse_qnx(text).unwrap()
}

struct Local(LocalRegionRegistry);

impl Implementation for Local {
    fn start(_tag: &str) -> Self {
        let local = Local(LocalRegionRegistry::new(MAX_PAGES));
        // As the server does at start: every VM's factory exists (and its `create` lines ran).
        for vm in ["vm0", "vm1", "vm2"] {
            drop(local.factory(vm));
        }
        local
    }

    fn factory(&self, vm: &str) -> Box<dyn Factory> {
        Box::new(self.0.factory(vm_policy(vm)))
    }

    fn factory_answered_now(&self, vm: &str, _name: &str) -> Box<dyn Factory> {
        // The registry decides and attaches under one lock: there is no later join.
        self.factory(vm)
    }
}

struct Server(NamedServer);

impl Implementation for Server {
    /// QNX frees a client's index at its detach, and the suite holds that: the regions here
    /// reuse ids at once (`id_reuse = "immediate"`), right for regions whose peers are all
    /// device models like these (the server's default, `safe`, is for QEMU guests:
    /// `with_safe_reuse_a_detached_index_waits_for_the_clients_that_saw_it_go`).
    fn start(tag: &str) -> Self {
        Server(NamedServer::start_with(
            &format!("conformance-{tag}"),
            "id_reuse = \"immediate\"",
            "",
        ))
    }

    fn factory(&self, vm: &str) -> Box<dyn Factory> {
        Box::new(self.0.factory(vm))
    }

    fn factory_answered_now(&self, vm: &str, name: &str) -> Box<dyn Factory> {
        Box::new(Replayed::new(&self.0, vm, name))
    }
}

/// A [`ServerFactory`] on a socket that answers its first request with the line the real
/// factory gave for a `find` of `name` when this was made, and passes later requests on to the
/// real factory.
struct Replayed {
    factory: ServerFactory,
    path: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    proxy: Option<JoinHandle<()>>,
}

/// One request line from `stream`.
fn request_line(stream: &UnixStream) -> Vec<u8> {
    let mut line = Vec::new();
    BufReader::new(stream).read_until(b'\n', &mut line).unwrap();
    line
}

/// The real factory's answer line to `request`.
fn ask(socket: &std::path::Path, request: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(request).unwrap();
    request_line(&stream)
}

impl Replayed {
    fn new(server: &NamedServer, vm: &str, name: &str) -> Replayed {
        let real = server.factory_socket(vm);
        let request = format!("{{\"op\":\"find\",\"name\":\"{name}\"}}\n");
        let answered_now = ask(&real, request.as_bytes());
        let path = ivshm_test_support::socket_path("answered-now");
        let listener = UnixListener::bind(&path).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let proxy = std::thread::spawn(move || {
            let mut first = Some(answered_now);
            for stream in listener.incoming() {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let stream = stream.unwrap();
                let request = request_line(&stream);
                let answer = first.take().unwrap_or_else(|| ask(&real, &request));
                (&stream).write_all(&answer).unwrap();
            }
        });
        Replayed {
            factory: ServerFactory::new(&path, TIMEOUT),
            path,
            stop,
            proxy: Some(proxy),
        }
    }
}

impl Drop for Replayed {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        if let Some(proxy) = self.proxy.take() {
            proxy.join().unwrap();
        }
    }
}

impl Factory for Replayed {
    fn create_or_attach(
        &mut self,
        name: &[u8],
        pages: u32,
        interrupt: BorrowedFd<'_>,
    ) -> Result<Attachment, GuestShmStatus> {
        self.factory.create_or_attach(name, pages, interrupt)
    }

    fn find(
        &mut self,
        name: &[u8],
        interrupt: BorrowedFd<'_>,
    ) -> Result<Attachment, GuestShmStatus> {
        self.factory.find(name, interrupt)
    }
}

/// The factory page's 32-byte `name` field holding `name`, NUL-padded.
fn field(name: &str) -> [u8; 32] {
    let mut field = [0u8; 32];
    field[..name.len()].copy_from_slice(name.as_bytes());
    field
}

/// A device interrupt eventfd.
fn interrupt() -> OwnedFd {
    eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap()
}

/// One client: a connection, the interrupt its factory signals, and the signals counted.
struct Client {
    attachment: Attachment,
    irq: OwnedFd,
    /// Interrupts seen and not yet checked by [`Client::interrupts`].
    rings: u64,
}

impl Client {
    fn idx(&self) -> u32 {
        self.attachment.connection.idx()
    }

    /// Reads the control `status` until `wanted` holds, waiting for the interrupt between
    /// reads (bounded by the failure guard); returns the status that satisfied it.
    fn status_until(&mut self, what: &str, wanted: impl Fn(u32) -> bool) -> u32 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let status = self.attachment.connection.read_status();
            if wanted(status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: status {status:#010x} after {TIMEOUT:?}"
            );
            self.rings += wait_rung(&self.irq);
        }
    }

    /// Waits until the attached clients (high half of `status`) are exactly `mask`.
    fn attached_until(&mut self, mask: u32) {
        self.status_until(&format!("attached {mask:#06x}"), |s| s >> 16 == mask);
    }

    /// The interrupts received since the last call, once nothing more arrives for [`QUIET`].
    fn interrupts(&mut self) -> u64 {
        self.interrupts_expecting(0)
    }

    /// [`interrupts`](Self::interrupts), waiting first (bounded by the failure guard) until
    /// `expected` have come: what an asynchronous path delivers late still counts, and any
    /// extra one shows.
    fn interrupts_expecting(&mut self, expected: u64) -> u64 {
        let deadline = Instant::now() + TIMEOUT;
        while self.rings < expected && Instant::now() < deadline {
            if readable_within(self.irq.as_fd(), QUIET) {
                self.rings += take(&self.irq);
            }
        }
        while readable_within(self.irq.as_fd(), QUIET) {
            self.rings += take(&self.irq);
        }
        std::mem::take(&mut self.rings)
    }
}

fn create(factory: &mut dyn Factory, name: &str, pages: u32) -> Result<Client, GuestShmStatus> {
    create_field(factory, &field(name), pages)
}

fn create_field(
    factory: &mut dyn Factory,
    name: &[u8],
    pages: u32,
) -> Result<Client, GuestShmStatus> {
    let irq = interrupt();
    let attachment = factory.create_or_attach(name, pages, irq.as_fd())?;
    Ok(Client {
        attachment,
        irq,
        rings: 0,
    })
}

fn find(factory: &mut dyn Factory, name: &str) -> Result<Client, GuestShmStatus> {
    let irq = interrupt();
    let attachment = factory.find(&field(name), irq.as_fd())?;
    Ok(Client {
        attachment,
        irq,
        rings: 0,
    })
}

/// The status of a request that must fail.
fn refused(result: Result<Client, GuestShmStatus>) -> GuestShmStatus {
    match result {
        Ok(client) => panic!("expected a refusal, got connection {}", client.idx()),
        Err(status) => status,
    }
}

/// Repeats `find` until it is no longer `GSS_CLIENT_MAX` (a detach reaches a server
/// asynchronously), bounded by the failure guard.
fn find_when_not_full(factory: &mut dyn Factory, name: &str) -> Client {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match find(factory, name) {
            Ok(client) => return client,
            Err(GuestShmStatus::ClientMax) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(status) => panic!("find {name}: {status}"),
        }
    }
}

/// Writes a marker at both ends of every page through `from` and reads them through `to`: the
/// two share every page, and every page has memory behind it (a page without would fault).
fn every_page_shared(from: &Client, to: &Client) {
    let pages = from.attachment.pages as usize;
    assert_eq!(from.attachment.memory.len(), pages * PAGE_SIZE);
    for page in 0..pages {
        for offset in [page * PAGE_SIZE, (page + 1) * PAGE_SIZE - 4] {
            let marker = 0x5a00_0000 | offset as u32;
            from.attachment
                .memory
                .view()
                .write_u32(offset, marker)
                .unwrap();
            assert_eq!(
                to.attachment.memory.view().read_u32(offset).unwrap(),
                marker
            );
        }
    }
}

/// The cases; every implementation passes every one.
mod suite {
    use super::*;

    /// The first creator chooses the size; later creates and finds attach to the same memory
    /// with that size and get the next indexes.
    pub fn creator_chooses_the_size_and_others_share_the_memory<I: Implementation>() {
        let imp = I::start("size");
        let (mut vm0, mut vm1) = (imp.factory("vm0"), imp.factory("vm1"));
        let a = create(vm0.as_mut(), "shared", 4).unwrap();
        assert_eq!((a.idx(), a.attachment.pages), (0, 4));
        let b = create(vm1.as_mut(), "shared", 1).unwrap();
        assert_eq!((b.idx(), b.attachment.pages), (1, 4), "the creator chose");
        let c = find(vm1.as_mut(), "shared").unwrap();
        assert_eq!((c.idx(), c.attachment.pages), (2, 4));
        every_page_shared(&a, &c);
        every_page_shared(&b, &a);
    }

    /// A create of N pages gets at least N whole pages (a server may round up, never down),
    /// each backed and shared; every later client gets the same count.
    pub fn a_create_gets_at_least_the_pages_asked_all_backed<I: Implementation>() {
        let imp = I::start("pages");
        let (mut vm0, mut vm1) = (imp.factory("vm0"), imp.factory("vm1"));
        for pages in [1, 3, 5, 17, MAX_PAGES] {
            let name = format!("p{pages}");
            let a = create(vm0.as_mut(), &name, pages).unwrap();
            assert!(
                a.attachment.pages >= pages,
                "{pages}: {}",
                a.attachment.pages
            );
            let b = find(vm1.as_mut(), &name).unwrap();
            assert_eq!(b.attachment.pages, a.attachment.pages);
            every_page_shared(&a, &b);
            every_page_shared(&b, &a);
        }
    }

    /// `find` never creates: `GSS_DOES_NOT_EXIST`.
    pub fn find_of_a_missing_region_does_not_exist<I: Implementation>() {
        let imp = I::start("missing");
        assert_eq!(
            refused(find(imp.factory("vm0").as_mut(), "nothere")),
            GuestShmStatus::DoesNotExist
        );
    }

    /// A create of 0 pages of a missing region creates nothing: `GSS_DOES_NOT_EXIST` (it
    /// can only attach); of an existing region it attaches with the region's size.
    pub fn create_of_zero_pages_only_attaches<I: Implementation>() {
        let imp = I::start("zero");
        let mut vm1 = imp.factory("vm1");
        assert_eq!(
            refused(create(vm1.as_mut(), "zero", 0)),
            GuestShmStatus::DoesNotExist
        );
        assert_eq!(
            refused(find(vm1.as_mut(), "zero")),
            GuestShmStatus::DoesNotExist,
            "nothing was created"
        );
        let a = create(vm1.as_mut(), "zero", 2).unwrap();
        let b = create(vm1.as_mut(), "zero", 0).unwrap();
        assert_eq!((b.idx(), b.attachment.pages), (1, a.attachment.pages));
    }

    /// The policy's `create` lines make their regions (whole pages) before any guest asks,
    /// and those stay after their last client detaches.
    pub fn policy_create_lines_pre_create_regions<I: Implementation>() {
        let imp = I::start("premade");
        let mut vm1 = imp.factory("vm1");
        let mut a = find(vm1.as_mut(), "premade").unwrap();
        assert_eq!(a.attachment.pages, 2, "create premade,0x2000");
        a.attachment.connection.detach();
        drop(a);
        // Still there (a server learns of the detach asynchronously; a configured region
        // stays either way).
        let b = find_when_not_full(vm1.as_mut(), "premade");
        assert_eq!(b.attachment.pages, 2);
        // vm0 sees it too: its policy allows the name.
        assert_eq!(
            find(imp.factory("vm0").as_mut(), "premade")
                .unwrap()
                .attachment
                .pages,
            2
        );
    }

    /// The VM's policy decides first: a denied name is `GSS_NO_PERMISSION` for that VM only.
    pub fn the_policy_refuses_denied_names<I: Implementation>() {
        let imp = I::start("policy");
        let (mut vm0, mut vm1) = (imp.factory("vm0"), imp.factory("vm1"));
        assert_eq!(
            refused(create(vm0.as_mut(), "secret1", 1)),
            GuestShmStatus::NoPermission
        );
        assert_eq!(
            refused(find(vm0.as_mut(), "secret1")),
            GuestShmStatus::NoPermission
        );
        assert!(create(vm1.as_mut(), "secret1", 1).is_ok(), "vm1 may");
    }

    /// Exactly the refused names are `GSS_ILLEGAL_NAME`, create and find alike, whatever the
    /// rules (vm0 denies `secret*`): each class documented in `docs/named-regions.md`. The
    /// names QNX documents as legal that are not in a refused class work.
    pub fn illegal_names_are_exactly_the_refused_classes<I: Implementation>() {
        let imp = I::start("names");
        let (mut vm0, mut vm1, mut vm2) =
            (imp.factory("vm0"), imp.factory("vm1"), imp.factory("vm2"));
        let mut refused_fields: Vec<(String, Vec<u8>)> = Vec::new();
        let mut named = |what: &str, name: &[u8]| {
            let mut f = name.to_vec();
            f.resize(32, 0);
            refused_fields.push((what.to_owned(), f));
        };
        named("empty", b"");
        named("slash", b"a/b");
        named("leading slash", b"/etc");
        named("space", b"a b");
        named("tab", b"a\tb");
        named("control byte", b"a\x01b");
        named("DEL", b"a\x7fb");
        named("colon", b"a:b");
        named("star", b"mem*");
        named("backslash", b"a\\b");
        named("quote", b"a\"b");
        named("non-ASCII", "caf\u{e9}".as_bytes());
        named("leading dot", b".hidden");
        named("dot", b".");
        named("dot dot", b"..");
        named("dot dot inside", b"a..b");
        named("dot dot path", b"../x");
        named("reserved", b"factory");
        refused_fields.push(("no NUL in 32 bytes".into(), vec![b'x'; 32]));
        for (what, f) in &refused_fields {
            for factory in [&mut vm0, &mut vm1] {
                let irq = interrupt();
                assert_eq!(
                    factory
                        .create_or_attach(f, 1, irq.as_fd())
                        .map(|_| ())
                        .unwrap_err(),
                    GuestShmStatus::IllegalName,
                    "create: {what}"
                );
                assert_eq!(
                    factory.find(f, irq.as_fd()).map(|_| ()).unwrap_err(),
                    GuestShmStatus::IllegalName,
                    "find: {what}"
                );
            }
        }
        // Longer than 31 bytes after vm2's `subst ,vm2-`: the host name would not fit.
        let long = "n".repeat(28);
        assert_eq!(
            refused(create(vm2.as_mut(), &long, 1)),
            GuestShmStatus::IllegalName
        );
        assert!(
            create(vm2.as_mut(), &long[..27], 1).is_ok(),
            "27 + 4 bytes fit"
        );
        // Legal: 1 to 31 bytes of [A-Za-z0-9_.+-], no leading dot, no `..`; bytes after the
        // NUL do not count.
        for name in ["a", "-x", "+", "A.b_c-1", "x.", "factory2", &"z".repeat(31)] {
            let client = create(vm1.as_mut(), name, 1);
            assert!(client.is_ok(), "{name:?}: {:?}", client.map(|c| c.idx()));
        }
        let mut garbage_after_nul = field("tail");
        garbage_after_nul[5..].fill(b'/');
        let tail = create_field(vm1.as_mut(), &garbage_after_nul, 1).unwrap();
        assert_eq!(
            find(vm1.as_mut(), "tail").unwrap().attachment.pages,
            tail.attachment.pages
        );
    }

    /// A create larger than the factory allows is `GSS_NOMEM`; the limit itself is fine.
    pub fn a_region_above_the_limit_is_no_mem<I: Implementation>() {
        let imp = I::start("nomem");
        let mut vm1 = imp.factory("vm1");
        assert_eq!(
            refused(create(vm1.as_mut(), "huge", MAX_PAGES * 2)),
            GuestShmStatus::NoMem
        );
        let limit = create(vm1.as_mut(), "limit", MAX_PAGES).unwrap();
        assert_eq!(limit.attachment.pages, MAX_PAGES);
    }

    /// Sixteen connections get indexes 0..16, the 17th `GSS_CLIENT_MAX`; a detach frees its
    /// index and the next connection gets the lowest free one.
    pub fn sixteen_clients_then_client_max_and_the_lowest_free_index<I: Implementation>() {
        let imp = I::start("full");
        let mut vm1 = imp.factory("vm1");
        let mut held: Vec<Client> = (0..16)
            .map(|_| create(vm1.as_mut(), "full", 1).unwrap())
            .collect();
        let indexes: Vec<u32> = held.iter().map(Client::idx).collect();
        assert_eq!(indexes, (0..16).collect::<Vec<u32>>());
        assert_eq!(
            refused(create(vm1.as_mut(), "full", 1)),
            GuestShmStatus::ClientMax
        );
        assert_eq!(
            refused(find(vm1.as_mut(), "full")),
            GuestShmStatus::ClientMax
        );
        held[5].attachment.connection.detach();
        held[9].attachment.connection.detach();
        let again = find_when_not_full(vm1.as_mut(), "full");
        assert_eq!(again.idx(), 5);
        let and_again = find_when_not_full(vm1.as_mut(), "full");
        assert_eq!(and_again.idx(), 9);
    }

    /// A detached index given to a new client is that client's: the others see the detach, then
    /// the attach, and notifications of that index reach the new client, which can answer.
    pub fn a_reused_index_is_a_new_client<I: Implementation>() {
        let imp = I::start("reuse");
        let (mut vm0, mut vm1) = (imp.factory("vm0"), imp.factory("vm1"));
        let mut a = create(vm0.as_mut(), "re", 1).unwrap();
        let mut b = find(vm1.as_mut(), "re").unwrap();
        let c = find(vm1.as_mut(), "re").unwrap();
        assert_eq!((a.idx(), b.idx(), c.idx()), (0, 1, 2));
        a.attached_until(0b111);
        drop(c);
        a.attached_until(0b11);
        b.attached_until(0b11);
        let mut d = find(vm1.as_mut(), "re").unwrap();
        assert_eq!(d.idx(), 2, "the lowest free index, C's");
        for client in [&mut a, &mut b, &mut d] {
            client.attached_until(0b111);
        }
        a.interrupts();
        a.attachment.connection.notify(1 << 2);
        let status = d.status_until("A's notification", |s| s & 0xffff != 0);
        assert_eq!(status & 0xffff, 1 << a.idx());
        d.attachment.connection.notify(1 << a.idx());
        let status = a.status_until("D's answer", |s| s & 0xffff != 0);
        assert_eq!(status & 0xffff, 1 << 2, "from index 2: D");
        assert_eq!(
            b.attachment.connection.read_status(),
            0b111 << 16,
            "B: nothing"
        );
    }

    /// A region that fills between the factory's answer and the join is `GSS_CLIENT_MAX`, as
    /// if the factory had seen it full; the clients already there see nothing.
    pub fn a_region_that_fills_before_the_join_is_client_max<I: Implementation>() {
        let imp = I::start("race");
        let mut vm1 = imp.factory("vm1");
        let mut held: Vec<Client> = (0..15)
            .map(|_| create(vm1.as_mut(), "race", 1).unwrap())
            .collect();
        let mut late = imp.factory_answered_now("vm1", "race");
        held.push(create(vm1.as_mut(), "race", 1).unwrap());
        held[0].attached_until(0xffff);
        held[0].interrupts();
        assert_eq!(
            refused(find(late.as_mut(), "race")),
            GuestShmStatus::ClientMax
        );
        assert_eq!(held[0].interrupts(), 0, "no attach, no detach seen");
        assert_eq!(held[0].attachment.connection.read_status(), 0xffff << 16);
    }

    /// The high half of `status` is the attached clients: others see an attach and a detach
    /// (with an interrupt), and a detached index's bit goes.
    pub fn attach_and_detach_change_the_attached_clients<I: Implementation>() {
        let imp = I::start("attach");
        let (mut vm0, mut vm1) = (imp.factory("vm0"), imp.factory("vm1"));
        let mut a = create(vm0.as_mut(), "r", 1).unwrap();
        a.attached_until(0b1);
        let mut b = find(vm1.as_mut(), "r").unwrap();
        a.attached_until(0b11);
        b.attached_until(0b11);
        let c = find(vm1.as_mut(), "r").unwrap();
        a.attached_until(0b111);
        b.attached_until(0b111);
        drop(c);
        a.attached_until(0b11);
        b.attachment.connection.detach();
        a.attached_until(0b1);
    }

    /// Exactly one interrupt per attach and per detach of another client, none for one's own
    /// attach.
    pub fn attach_and_detach_interrupt_once_each<I: Implementation>() {
        let imp = I::start("attach-count");
        let (mut vm0, mut vm1) = (imp.factory("vm0"), imp.factory("vm1"));
        let mut a = create(vm0.as_mut(), "ad", 1).unwrap();
        let mut b = find(vm1.as_mut(), "ad").unwrap();
        a.attached_until(0b11);
        assert_eq!(a.interrupts(), 1, "A: B attached");
        assert_eq!(b.interrupts(), 0, "B: its own attach");
        let c = find(vm1.as_mut(), "ad").unwrap();
        a.attached_until(0b111);
        b.attached_until(0b111);
        assert_eq!((a.interrupts(), b.interrupts()), (1, 1), "C attached");
        drop(c);
        a.attached_until(0b11);
        b.attached_until(0b11);
        assert_eq!((a.interrupts(), b.interrupts()), (1, 1), "C detached");
        b.attachment.connection.detach();
        a.attached_until(0b1);
        assert_eq!(a.interrupts(), 1, "B detached");
    }

    /// `notify(mask)` sets the sender's bit in the low half of each target's `status` and
    /// interrupts it; reading clears the bit; clients outside the mask see nothing.
    pub fn notify_sets_the_senders_bit_in_the_targets<I: Implementation>() {
        let imp = I::start("notify");
        let (mut vm0, mut vm1) = (imp.factory("vm0"), imp.factory("vm1"));
        let mut a = create(vm0.as_mut(), "n", 1).unwrap();
        let mut b = find(vm1.as_mut(), "n").unwrap();
        let mut c = find(vm1.as_mut(), "n").unwrap();
        for client in [&mut a, &mut b, &mut c] {
            client.attached_until(0b111);
        }
        a.attachment.connection.notify(1 << b.idx());
        let status = b.status_until("A's notification", |s| s & 0xffff != 0);
        assert_eq!(status, 0b111 << 16 | 1 << a.idx(), "sender's bit only");
        assert_eq!(
            b.attachment.connection.read_status(),
            0b111 << 16,
            "read clears"
        );
        // B notifies C; by then A's notification would have reached C too if it went there.
        b.attachment.connection.notify(1 << c.idx());
        let status = c.status_until("B's notification", |s| s & 0xffff != 0);
        assert_eq!(status & 0xffff, 1 << b.idx(), "C got B's bit, not A's");
    }

    /// One interrupt per change of `status`: a notification whose bit is already pending
    /// changes nothing and rings nothing; after the read clears it, the next one rings again.
    /// A notification of an absent client reaches nobody.
    pub fn notify_interrupts_once_per_change<I: Implementation>() {
        let imp = I::start("notify-count");
        let (mut vm0, mut vm1) = (imp.factory("vm0"), imp.factory("vm1"));
        let mut a = create(vm0.as_mut(), "nc", 1).unwrap();
        let mut b = find(vm1.as_mut(), "nc").unwrap();
        a.attached_until(0b11);
        b.attached_until(0b11);
        a.interrupts();
        b.interrupts();
        for _ in 0..3 {
            a.attachment.connection.notify(1 << b.idx());
        }
        assert_eq!(b.interrupts_expecting(1), 1, "one change: bit 0 set once");
        assert_eq!(b.attachment.connection.peek_status(), 0b11 << 16 | 1);
        assert_eq!(b.attachment.connection.read_status(), 0b11 << 16 | 1);
        a.attachment.connection.notify(u32::MAX);
        assert_eq!(
            b.interrupts_expecting(1),
            1,
            "cleared by the read: a change again"
        );
        assert_eq!(b.attachment.connection.read_status(), 0b11 << 16 | 1);
        a.attachment.connection.notify(1 << 7);
        assert_eq!(
            (a.interrupts(), b.interrupts()),
            (0, 0),
            "nobody has index 7"
        );
        assert_eq!(b.attachment.connection.read_status(), 0b11 << 16);
    }

    /// `notify(0xffff_ffff)` reaches every attached client but the sender.
    pub fn notify_all_reaches_everybody_but_me<I: Implementation>() {
        let imp = I::start("notify-all");
        let (mut vm0, mut vm1) = (imp.factory("vm0"), imp.factory("vm1"));
        let mut a = create(vm0.as_mut(), "all", 1).unwrap();
        let mut b = find(vm1.as_mut(), "all").unwrap();
        let mut c = find(vm1.as_mut(), "all").unwrap();
        for client in [&mut a, &mut b, &mut c] {
            client.attached_until(0b111);
        }
        a.attachment.connection.notify(u32::MAX);
        for target in [&mut b, &mut c] {
            let status = target.status_until("notify all", |s| s & 0xffff != 0);
            assert_eq!(status & 0xffff, 1 << a.idx());
        }
        // B answers A; A's own notification never set its own bit.
        b.attachment.connection.notify(1 << a.idx());
        let status = a.status_until("B's answer", |s| s & 0xffff != 0);
        assert_eq!(status & 0xffff, 1 << b.idx(), "A did not notify itself");
    }

    /// Refused requests (missing, denied, illegal, full) change nothing a client can see.
    pub fn refused_requests_change_nothing<I: Implementation>() {
        let imp = I::start("refused");
        let (mut vm0, mut vm1) = (imp.factory("vm0"), imp.factory("vm1"));
        let mut a = create(vm1.as_mut(), "secret-r", 1).unwrap();
        let mut others: Vec<Client> = (0..15)
            .map(|_| find(vm1.as_mut(), "secret-r").unwrap())
            .collect();
        a.attached_until(0xffff);
        a.interrupts();
        assert_eq!(
            refused(find(vm0.as_mut(), "secret-r")),
            GuestShmStatus::NoPermission
        );
        assert_eq!(
            refused(find(vm1.as_mut(), "secret-r")),
            GuestShmStatus::ClientMax
        );
        assert_eq!(
            refused(create(vm1.as_mut(), "secret-r", 1)),
            GuestShmStatus::ClientMax
        );
        assert_eq!(
            refused(find(vm1.as_mut(), "a/b")),
            GuestShmStatus::IllegalName
        );
        assert_eq!(a.interrupts(), 0);
        assert_eq!(a.attachment.connection.read_status(), 0xffff << 16);
        others.clear();
        a.attached_until(0b1);
    }

    /// The last detach frees the region: a later `find` is `GSS_DOES_NOT_EXIST`.
    pub fn the_last_detach_frees_the_region<I: Implementation>() {
        let imp = I::start("free");
        let mut vm1 = imp.factory("vm1");
        let mut a = create(vm1.as_mut(), "temp", 1).unwrap();
        a.attachment.connection.detach();
        // A server learns of the detach asynchronously: a find that still attaches keeps the
        // region for a moment (and detaches again when dropped).
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match find(vm1.as_mut(), "temp") {
                Err(GuestShmStatus::DoesNotExist) => break,
                Ok(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => panic!("find after the last detach: {:?}", other.map(|c| c.idx())),
            }
        }
    }
}

/// Instantiates every case of [`suite`] for an implementation.
macro_rules! factory_suite {
    ($implementation:ty) => {
        factory_suite!(@cases $implementation:
            creator_chooses_the_size_and_others_share_the_memory,
            a_create_gets_at_least_the_pages_asked_all_backed,
            find_of_a_missing_region_does_not_exist,
            create_of_zero_pages_only_attaches,
            policy_create_lines_pre_create_regions,
            the_policy_refuses_denied_names,
            illegal_names_are_exactly_the_refused_classes,
            a_region_above_the_limit_is_no_mem,
            sixteen_clients_then_client_max_and_the_lowest_free_index,
            a_reused_index_is_a_new_client,
            a_region_that_fills_before_the_join_is_client_max,
            attach_and_detach_change_the_attached_clients,
            attach_and_detach_interrupt_once_each,
            notify_sets_the_senders_bit_in_the_targets,
            notify_interrupts_once_per_change,
            notify_all_reaches_everybody_but_me,
            refused_requests_change_nothing,
            the_last_detach_frees_the_region,
        );
    };
    (@cases $implementation:ty: $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                suite::$case::<$implementation>();
            }
        )*
    };
}

mod local_factory {
    use super::*;

    factory_suite!(Local);
}

mod server_factory {
    use super::*;
    use ivshm_client::{ConnectOptions, Peer};

    factory_suite!(Server);

    /// What only a server region can carry: vectors of 16 and more, and peers (QEMU guests,
    /// host programs) with ids of 16 and more when a region allows more than 16 peers. A
    /// `guest_shm` client's `status` has no bit for them: their doorbells, joins and leaves
    /// change nothing and interrupt nothing.
    #[test]
    fn doorbells_and_peers_outside_the_sixteen_clients_interrupt_nothing() {
        let server = NamedServer::start_with(
            "wide",
            "",
            "[[region]]\nname = \"wide\"\nsize = 4096\nvectors = 32\npeer_limit = 20\n",
        );
        let mut vm1 = server.factory("vm1");
        let mut g = find(&mut vm1, "wide").unwrap();
        assert_eq!(g.idx(), 0);
        let socket = server.root().join("vm1").join("wide.sock");
        let join = || {
            let opts = ConnectOptions {
                timeout: TIMEOUT,
                ..ConnectOptions::default()
            };
            Peer::connect(&socket, opts).unwrap()
        };
        let clients: Vec<Peer> = (1..16).map(|_| join()).collect();
        g.attached_until(0xffff);
        assert_eq!(g.interrupts(), 15, "15 client indexes joined");
        let outsider = join();
        assert_eq!(outsider.id(), 16);
        for vector in [16, 20, 31] {
            outsider.notify(0, vector).unwrap();
            clients[0].notify(0, vector).unwrap();
        }
        assert_eq!(g.interrupts(), 0, "peer 16 joined, vectors 16..32 rang");
        assert_eq!(g.attachment.connection.read_status(), 0xffff << 16);
        clients[0].notify(0, 1).unwrap();
        assert_eq!(g.interrupts_expecting(1), 1, "vector 1: client 1 notified");
        assert_eq!(g.attachment.connection.read_status(), 0xffff << 16 | 0b10);
        drop(outsider);
        assert_eq!(g.interrupts(), 0, "peer 16 left");
        drop(clients);
        g.attached_until(0b1);
        assert_eq!(g.interrupts(), 15, "15 client indexes left");
    }

    /// The server's default, `id_reuse = "safe"` (QEMU 7.2 guests abort when told of a new
    /// peer with an id they saw leave): a detached index is not given again while a client
    /// that saw the detach is attached; when every index is attached or held back the factory
    /// answers `GSS_CLIENT_MAX`; once the witnesses are gone the lowest index comes back.
    #[test]
    fn with_safe_reuse_a_detached_index_waits_for_the_clients_that_saw_it_go() {
        let server =
            NamedServer::start_with("safe", "", "[[region]]\nname = \"safe\"\nsize = 4096\n");
        let mut vm1 = server.factory("vm1");
        let mut a = find(&mut vm1, "safe").unwrap();
        let b = find(&mut vm1, "safe").unwrap();
        assert_eq!((a.idx(), b.idx()), (0, 1));
        a.attached_until(0b11);
        drop(b);
        a.attached_until(0b1);
        // A saw index 1 detach: the next client gets 2, and so on for every index A saw go.
        for expected in 2..16 {
            let next = find(&mut vm1, "safe").unwrap();
            assert_eq!(next.idx(), expected);
            a.attached_until(0b1 | 1 << expected);
            drop(next);
            a.attached_until(0b1);
        }
        assert_eq!(
            refused(find(&mut vm1, "safe")),
            GuestShmStatus::ClientMax,
            "indexes 1..16 are held back while A is attached"
        );
        // With A gone nobody remembers an index: the next client gets the lowest, 0.
        a.attachment.connection.detach();
        let again = find_when_not_full(&mut vm1, "safe");
        assert_eq!(again.idx(), 0);
    }

    /// `sched`: each connection's notification thread (it turns doorbells into the device
    /// interrupt) runs SCHED_FIFO at the VM's priority, when the process may.
    #[test]
    fn the_notification_thread_runs_at_the_sched_priority() {
        if !common::realtime_allowed() {
            eprintln!(
                "SKIPPED: the_notification_thread_runs_at_the_sched_priority: no CAP_SYS_NICE"
            );
            return;
        }
        let server = NamedServer::start("sched");
        let mut factory = server.factory("vm1").with_notification_priority(Some(29));
        let _client = create(&mut factory, "sched", 1).unwrap();
        common::wait_for_thread_priority(ivshm_vmm::guest_shm::NOTIFICATION_THREAD, 29);
    }

    /// A region that is not whole pages (one a server could only offer if configured outside
    /// named regions) is refused, never shown rounded down: the guest's `size` is always the
    /// pages it can map, every one backed.
    #[test]
    fn a_region_of_partial_pages_is_refused_not_floored() {
        let server = NamedServer::start("partial");
        // A factory that offers the real region but claims 4096 + 100 bytes.
        let mut good = server.factory("vm1");
        let _real = create(&mut good, "partial", 2).unwrap();
        let request = b"{\"op\":\"find\",\"name\":\"partial\"}\n";
        let mut answer = String::from_utf8(ask(&server.factory_socket("vm1"), request)).unwrap();
        assert!(answer.contains("\"size\":8192"), "{answer}");
        answer = answer.replace("\"size\":8192", "\"size\":4196");
        let path = ivshm_test_support::socket_path("partial-factory");
        let listener = UnixListener::bind(&path).unwrap();
        let replay = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            request_line(&stream);
            (&stream).write_all(answer.as_bytes()).unwrap();
        });
        let mut lying = ServerFactory::new(&path, TIMEOUT);
        assert_eq!(
            refused(find(&mut lying, "partial")),
            GuestShmStatus::UnknownFailure
        );
        replay.join().unwrap();
    }
}

/// Every size a `guest_shm` client can ask for — a factory create in pages, a VM's `create`
/// line or a control create in bytes — gives a region of at least `ceil(bytes / 4096)` whole
/// pages (exactly that with `pow2 = "off"`, the next power of two with the default
/// `"round-up"`), and every page has memory behind it: mapped through one connection, written
/// at both ends, read through another.
mod region_sizes {
    use super::*;
    use ivshm_proto::control::{ControlRequest, ControlResponse, CreateRegion};
    use ivshm_proto::factory::{decode_line, encode_line};
    use ivshm_proto::guest_shm::pages_for;
    use proptest::prelude::*;

    /// Sizes in bytes up to the factories' limit, with the page edges drawn often.
    fn bytes() -> impl Strategy<Value = u64> {
        let max = u64::from(MAX_PAGES) * 4096;
        prop_oneof![
            1..=max,
            (1..=u64::from(MAX_PAGES), 0..3u64).prop_map(|(pages, edge)| (pages * 4096 + edge)
                .saturating_sub(1)
                .clamp(1, u64::from(MAX_PAGES) * 4096)),
        ]
    }

    /// The pages a region of `bytes` must get under `pow2`.
    fn expected_pages(bytes: u64, pow2_off: bool) -> u32 {
        let pages = pages_for(bytes);
        let pages = if pow2_off {
            pages
        } else {
            (pages * 4096).next_power_of_two() / 4096
        };
        u32::try_from(pages).unwrap()
    }

    /// Attaches twice to `name` through `factory` and checks its pages against `bytes`.
    fn check(factory: &mut dyn Factory, name: &str, bytes: u64, exact: Option<u32>) {
        let a = find(factory, name).unwrap();
        let b = find(factory, name).unwrap();
        let pages = a.attachment.pages;
        assert!(
            u64::from(pages) >= pages_for(bytes),
            "{name}: {bytes} bytes gave {pages} pages"
        );
        if let Some(exact) = exact {
            assert_eq!(pages, exact, "{name}: {bytes} bytes");
        }
        every_page_shared(&a, &b);
        every_page_shared(&b, &a);
    }

    fn control_create(server: &NamedServer, name: &str, bytes: u64) {
        let request = ControlRequest::Create(CreateRegion {
            name: name.into(),
            size: bytes,
            persist: true,
            ..CreateRegion::default()
        });
        let line = ask(&server.root().join("control.sock"), &encode_line(&request));
        let response: ControlResponse = decode_line(&line).unwrap();
        assert!(response.ok, "{name}: {:?}", response.error);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        #[test]
        fn every_requested_size_gets_whole_backed_pages(
            sizes in prop::collection::vec(bytes(), 1..5),
            pow2_off in any::<bool>(),
        ) {
            // The server: create lines, control creates and factory creates of each size.
            let lines: Vec<String> =
                sizes.iter().enumerate().map(|(i, b)| format!("create line{i},{b:#x}")).collect();
            let server = NamedServer::start_with(
                "sizes",
                if pow2_off { "pow2 = \"off\"" } else { "" },
                &format!("[vm.sized]\nqnx = \"{}\"\n", lines.join(" ")),
            );
            let mut sized = server.factory("sized");
            for (i, &b) in sizes.iter().enumerate() {
                let exact = Some(expected_pages(b, pow2_off));
                check(&mut sized, &format!("line{i}"), b, exact);
                control_create(&server, &format!("ctl{i}"), b);
                check(&mut sized, &format!("ctl{i}"), b, exact);
                let pages = u32::try_from(pages_for(b)).unwrap();
                let created = create(&mut sized, &format!("fac{i}"), pages).unwrap();
                check(&mut sized, &format!("fac{i}"), b, exact);
                drop(created);
            }
            // LocalRegionRegistry: create lines and factory creates (no power-of-two rule).
            let registry = LocalRegionRegistry::new(MAX_PAGES);
            let policy = VmPolicy::parse_qnx(&lines.join("\n")).unwrap();
            let mut local = registry.factory(policy);
            for (i, &b) in sizes.iter().enumerate() {
                let exact = Some(expected_pages(b, true));
                check(&mut local, &format!("line{i}"), b, exact);
                let pages = u32::try_from(pages_for(b)).unwrap();
                let created = create(&mut local, &format!("fac{i}"), pages).unwrap();
                check(&mut local, &format!("fac{i}"), b, exact);
                drop(created);
            }
        }
    }
}
