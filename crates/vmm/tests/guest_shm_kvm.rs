//! The QNX `guest_shm` device under KVM, seen by guest programs written as QNX's are.
//!
//! * `ghstest_*`: a guest that follows QNX's ghstest sample literally — find 1C05:0001 on the
//!   PCI bus (or take the factory page at `loc`), enable it, take the interrupt from the PCI
//!   Interrupt Line (or, in MMIO mode, from the factory page's `vector`), check the signature,
//!   attach the interrupt as `InterruptAttachEvent()` does (the kernel masks the line and EOIs
//!   it, the program reads `status` and unmasks), `create` "testing" with 16 pages, map
//!   `size + 1` pages at `shmem`, read `idx`, write into its buffer `idx`, notify with `~0`
//!   and with a mask, check both halves of `status` on every interrupt, detach — against a
//!   host client on LocalFactory and on the server, in PCI and MMIO mode, counting the
//!   guest's interrupts exactly.
//! * two VMs sharing a region in PCI mode, MMIO mode's `GSS_CLIENT_MAX` and
//!   `GSS_DOES_NOT_EXIST` with the interrupt on an edge irqfd, INTA#'s level semantics, and
//!   the `sched` priority of the thread that delivers it.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{NamedServer, TIMEOUT};
use ivshm_policy::{GuestShmStatus, VmPolicy};
use ivshm_test_support::fds::{readable_within, take, wait_rung};
use ivshm_testvmm::asm::{Asm, Cond, Reg};
use ivshm_testvmm::guest::{masking_handler, GuestOps, INTR_COUNTERS, PROGRAM_BASE, VARS};
use ivshm_testvmm::{
    attach_guest_shm, kvm_or_skip, Delivery, GuestShmPlacement, TestVm, SERVICE_THREAD,
};
use ivshm_vmm::guest_shm::{Attachment, Factory, GuestShmMode, LocalRegionRegistry};

const RAM: usize = 2 << 20;
/// The IDT vector the guest's interrupt is routed to.
const VECTOR: u8 = 0x60;
const PAYLOAD: u32 = 0x9e57_0042;
const MMIO_LOC: u32 = 0x1b00_0000;
/// The MMIO-mode `intr` line: IOAPIC input 20 (16..23 do not reach the PIC).
const INTR_PIN: u32 = 20;
/// Guest variables: the interrupt line, the address of its own buffer, the host's "go".
const VAR_INTR: u32 = VARS;
const VAR_MYBUFF: u32 = VARS + 4;
const VAR_GO: u32 = VARS + 8;
/// What the guest writes: in its buffer, in the last data page, its reply.
const MARKER: u32 = 0x6873_0001;
const LAST_MARKER: u32 = 0x6873_0002;
const REPLY: u32 = 0x6873_0003;
/// What the host client writes in its buffer.
const HOST_MSG: u32 = 0x6873_00f0;
/// The host client's acknowledgement, in its buffer after the message.
const HOST_ACK: u32 = 0x6873_00f1;
/// How the guests program their IOAPIC input: edge-triggered. The device drives a level line
/// (asserted while a `status` is unread; `inta_stays_asserted_until_status_is_read` shows the
/// level with a level-triggered input), but on this machine's `/dev/kvm` (`kvm_pvm`, KVM's
/// instruction emulator) a level-triggered IOAPIC delivery is taken twice: the local APIC
/// still has the vector pending in IRR inside the handler (measured), so a second, spurious
/// delivery follows the first. Edge-triggered, every rising edge of the line — one per change
/// of `status` — is one interrupt, which the exact counts below need.
const LEVEL_IN_GUEST: bool = false;
/// How long nothing may happen before "no more interrupts" is believed (not a speed claim).
const QUIET: Duration = Duration::from_millis(300);

fn policy(text: &str) -> VmPolicy {
    VmPolicy::parse_qnx(text).unwrap()
}

fn field(s: &str) -> [u8; 32] {
    let mut n = [0u8; 32];
    n[..s.len()].copy_from_slice(s.as_bytes());
    n
}

/// Where a guest finds the factory page.
#[derive(Clone, Copy)]
enum Discovery {
    /// Scan bus 0 for 1C05:0001 (`pci_device_find`).
    Pci,
    /// The `loc` address, as ghstest takes it from its command line (its interrupt then comes
    /// from the factory page's `vector`: ghstest's "auto select").
    Mmio,
}

/// ghstest's start: find the factory page (EBX), the interrupt line (EBP, and `VAR_INTR`),
/// check the signature, attach the interrupt (route the line level-triggered to [`VECTOR`];
/// the VMM installed the masking handler). PCI: also reports the device number it found.
/// Fails with exit 0xBAD1 (no device) / 0xBAD2 (signature).
fn ghstest_discover(a: &mut Asm, discovery: Discovery) {
    a.enable_lapic();
    match discovery {
        Discovery::Pci => {
            for device in 1..=31u8 {
                let next = format!("scan_{}", device + 1);
                a.label(&format!("scan_{device}"))
                    .pci_read(device, 0)
                    .cmp_imm(Reg::Eax, 0x0001_1c05)
                    .jcc(Cond::Ne, &next)
                    .report_imm(u32::from(device))
                    // "Make sure the PCI device is enabled": command = ~0 (16 bits).
                    .mov_imm(Reg::Eax, 0xffff)
                    .pci_write_eax(device, 1)
                    // "Get the interrupt line to use."
                    .pci_read(device, 15)
                    .and_imm(Reg::Eax, 0xff)
                    .store(VAR_INTR, Reg::Eax)
                    // "Get the BAR to find ... the 'factory' page."
                    .pci_read(device, 4)
                    .and_imm(Reg::Eax, 0xffff_fff0)
                    .mov(Reg::Ebx, Reg::Eax)
                    .jmp("found");
            }
            a.label("scan_32").exit(0xbad1);
        }
        Discovery::Mmio => {
            a.mov_imm(Reg::Ebx, MMIO_LOC).store_imm(VAR_INTR, u32::MAX);
        }
    }
    a.label("found")
        .load_ind(Reg::Eax, Reg::Ebx, 0)
        .cmp_imm(Reg::Eax, 0x474d_5651)
        .jcc(Cond::Ne, "fail_sig")
        .load_ind(Reg::Eax, Reg::Ebx, 4)
        .cmp_imm(Reg::Eax, 0x4d53_4732)
        .jcc(Cond::Ne, "fail_sig")
        // "if(intr == ~0u) intr = factory->vector"
        .load(Reg::Eax, VAR_INTR)
        .cmp_imm(Reg::Eax, u32::MAX)
        .jcc(Cond::Ne, "have_intr")
        .load_ind(Reg::Eax, Reg::Ebx, 0x10)
        .store(VAR_INTR, Reg::Eax)
        .label("have_intr")
        .load(Reg::Ebp, VAR_INTR)
        .report(Reg::Ebp)
        // InterruptAttachEvent(intr, ...)
        .route_ioapic_pin_in(Reg::Ebp, VECTOR, LEVEL_IN_GUEST)
        .jmp("discovered")
        .label("fail_sig")
        .exit(0xbad2)
        .label("discovered");
}

/// Writes `name` (NUL-terminated) into the factory page's name field at EBX + 0x1c.
fn write_name(a: &mut Asm, name: &str) {
    let mut bytes = name.as_bytes().to_vec();
    bytes.resize((bytes.len() / 4 + 1) * 4, 0);
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        a.store_ind_imm(Reg::Ebx, 0x1c + 4 * i as u32, v);
    }
}

/// `guest_shm_create(factory, pages)` of `name`, then reports `status`.
fn create(a: &mut Asm, name: &str, pages: u32) {
    write_name(a, name);
    a.store_ind_imm(Reg::Ebx, 0x18, pages)
        .load_ind(Reg::Eax, Reg::Ebx, 0x14)
        .report(Reg::Eax);
}

/// Waits for the `count`th interrupt, reads `status` (ESI), unmasks the line
/// (`InterruptUnmask()`), then reports the status (the host acts on the report, so it never
/// races the unmask).
fn take_interrupt(a: &mut Asm, count: u32) {
    a.mov_imm(Reg::Edi, count)
        .wait_interrupts(VECTOR, Reg::Edi, &format!("wait_{count}"))
        .load_ind(Reg::Ecx, Reg::Esi, 0)
        .route_ioapic_pin_in(Reg::Ebp, VECTOR, LEVEL_IN_GUEST)
        .report(Reg::Ecx);
}

/// ghstest, scripted: the events it reacts to are a host client attaching, notifying and
/// detaching (see [`ghstest_host`]). Reports, in order: (PCI: the device number,) the
/// interrupt line, create status, size, idx, the first status (attach list), the status of
/// each of the three interrupts (the second followed by the host's message), the guest's
/// interrupt count after a quiet period, and the control page's status after detach.
fn ghstest_program(discovery: Discovery) -> Vec<u8> {
    let mut a = Asm::new(PROGRAM_BASE);
    ghstest_discover(&mut a, discovery);
    create(&mut a, "testing", 16); // guest_shm_create(factory, GUEST_SHM_MAX_CLIENTS)
    a.load_ind(Reg::Esi, Reg::Ebx, 0x8) // paddr = factory->shmem
        .load_ind(Reg::Eax, Reg::Ebx, 0x18)
        .report(Reg::Eax) // factory->size
        .load_ind(Reg::Eax, Reg::Esi, 4)
        .report(Reg::Eax) // ctrl->idx
        // mybuff = &shmdata[ctrl->idx * BUFF_SIZE], shmdata = ctrl + 0x1000
        .load_ind(Reg::Eax, Reg::Esi, 4)
        .shl_imm(Reg::Eax, 12)
        .add(Reg::Eax, Reg::Esi)
        .add_imm(Reg::Eax, 0x1000)
        .store(VAR_MYBUFF, Reg::Eax)
        .store_ind_imm(Reg::Eax, 0, MARKER)
        // The last of the size + 1 mapped pages: ctrl + size * 0x1000.
        .load_ind(Reg::Eax, Reg::Ebx, 0x18)
        .shl_imm(Reg::Eax, 12)
        .add(Reg::Eax, Reg::Esi)
        .store_ind_imm(Reg::Eax, 0, LAST_MARKER)
        // Input before anybody else is there: ~0 reaches nobody.
        .store_ind_imm(Reg::Esi, 8, u32::MAX)
        // attach_list = ctrl->status >> 16 (the host attaches once this is reported)
        .load_ind(Reg::Eax, Reg::Esi, 0)
        .report(Reg::Eax);
    take_interrupt(&mut a, 1); // the host attached
    take_interrupt(&mut a, 2); // the host notified
    a.load_ind(Reg::Eax, Reg::Esi, 0x2000) // the host's buffer (idx 1)
        .report(Reg::Eax)
        .load(Reg::Ecx, VAR_MYBUFF)
        .store_ind_imm(Reg::Ecx, 0, REPLY)
        .store_ind_imm(Reg::Esi, 8, u32::MAX) // ctrl->notify = ~0
        .spin_until_word(Reg::Esi, 0x2004, HOST_ACK, "host_ack")
        .store_ind_imm(Reg::Esi, 8, 1 << 1 | 1 << 9); // a mask: the host and nobody
    take_interrupt(&mut a, 3); // the host detached
                               // Quiet: interrupts enabled until the host says so; nothing more may arrive.
    a.sti()
        .mov_imm(Reg::Ecx, VAR_GO)
        .spin_until_word(Reg::Ecx, 0, 1, "quiet")
        .cli()
        .load(Reg::Eax, INTR_COUNTERS + 4 * u32::from(VECTOR))
        .report(Reg::Eax)
        .store_ind_imm(Reg::Esi, 0xc, 0) // ctrl->detach = 0
        .load_ind(Reg::Eax, Reg::Esi, 0)
        .report(Reg::Eax)
        .exit(0);
    a.finish().unwrap()
}

/// A host client's connection and the interrupts its factory signals.
struct HostClient {
    attachment: Attachment,
    irq: OwnedFd,
    rings: u64,
}

impl HostClient {
    fn attach(factory: &mut dyn Factory, name: &str, pages: u32) -> HostClient {
        let irq = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .unwrap();
        let attachment = factory
            .create_or_attach(&field(name), pages, irq.as_fd())
            .unwrap();
        HostClient {
            attachment,
            irq,
            rings: 0,
        }
    }

    /// Waits until a pending bit shows; returns the status read.
    fn notified(&mut self) -> u32 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let status = self.attachment.connection.read_status();
            if status & 0xffff != 0 {
                return status;
            }
            assert!(Instant::now() < deadline, "status {status:#x}");
            self.rings += wait_rung(&self.irq);
        }
    }

    /// Interrupts so far, once none arrives for [`QUIET`].
    fn interrupts(&mut self) -> u64 {
        while readable_within(self.irq.as_fd(), QUIET) {
            self.rings += take(&self.irq);
        }
        self.rings
    }
}

/// Runs [`ghstest_program`] in a VM whose device uses `guest`, as `placement` says, with a
/// host client on `host` (the other side of hhstest): attaches, checks the guest's buffer and
/// last page, notifies, reads the guest's `~0` and mask notifications, detaches.
fn ghstest_with(
    guest: Box<dyn Factory>,
    mut host: Box<dyn Factory>,
    placement: GuestShmPlacement,
    discovery: Discovery,
) {
    let mut vm = TestVm::new(RAM).unwrap();
    let attached = attach_guest_shm(&vm, placement, guest).unwrap();
    // The kernel's part of InterruptAttachEvent(): mask the line, EOI.
    let handler = masking_handler(VECTOR, attached.intr as u8, LEVEL_IN_GUEST).unwrap();
    vm.install_handler(VECTOR, &handler).unwrap();
    vm.load_program(&ghstest_program(discovery)).unwrap();
    vm.start().unwrap();
    let lead = usize::from(matches!(discovery, Discovery::Pci));
    let at = |n: usize| n + lead;
    vm.wait_reports(at(5), TIMEOUT).unwrap();

    let mut client = HostClient::attach(host.as_mut(), "testing", 1);
    assert_eq!(client.attachment.connection.idx(), 1);
    assert_eq!(client.attachment.pages, 16, "the guest chose 16 pages");
    let memory = client.attachment.memory.clone();
    assert_eq!(memory.view().read_u32(0).unwrap(), MARKER, "guest's buffer");
    assert_eq!(
        memory.view().read_u32(15 * 4096).unwrap(),
        LAST_MARKER,
        "the guest's size + 1 pages end with the last data page"
    );
    vm.wait_reports(at(6), TIMEOUT).unwrap();

    memory.view().write_u32(0x1000, HOST_MSG).unwrap();
    client.attachment.connection.notify(1 << 0);
    // The guest's `~0`: bit 0 in my status, its reply in its buffer.
    assert_eq!(client.notified(), 0x0003_0001);
    assert_eq!(memory.view().read_u32(0).unwrap(), REPLY);
    memory.view().write_u32(0x1004, HOST_ACK).unwrap();
    // Its mask (1 << 1 | 1 << 9): bit 0 again, index 9 is nobody.
    assert_eq!(client.notified(), 0x0003_0001);
    assert_eq!(client.interrupts(), 2, "one per notification, none else");
    client.attachment.connection.detach();
    vm.wait_reports(at(9), TIMEOUT).unwrap();

    std::thread::sleep(QUIET);
    vm.write_ram(VAR_GO, &1u32.to_le_bytes()).unwrap();
    assert_eq!(
        vm.wait_exit(TIMEOUT).unwrap(),
        0,
        "reports {:x?}",
        vm.reports()
    );
    let mut expected = Vec::new();
    if let Some(device) = attached.pci_device {
        expected.push(u32::from(device));
    }
    expected.extend([
        attached.intr,               // the PCI Interrupt Line, or the factory's vector
        GuestShmStatus::Ok.as_u32(), // create "testing"
        16,                          // size
        0,                           // idx
        0x0001_0000,                 // attach list: me
        0x0003_0000,                 // interrupt 1: the host attached
        0x0003_0002,                 // interrupt 2: the host (idx 1) notified me ...
        HOST_MSG,                    // ... and this is what it wrote
        0x0001_0000,                 // interrupt 3: the host detached
        3,                           // exactly three interrupts, none in the quiet period
        0xffff_ffff,                 // after detach the control page is gone
    ]);
    assert_eq!(vm.reports(), expected);
    assert_eq!(attached.device.lock().unwrap().connections(), 0);
}

/// ghstest in PCI mode through LocalFactory, placed by the VM's options: `loc pci:0:5`
/// (device 5) and `intr 18` (INTA# on IOAPIC input 18, read from the Interrupt Line).
#[test]
fn ghstest_pci_on_local_factory() {
    if !kvm_or_skip("ghstest_pci_on_local_factory") {
        return;
    }
    let registry = LocalRegionRegistry::new(256);
    let options = policy("vdev shmem\n loc pci:0:5\n intr ioapic:18\n");
    let placement = GuestShmPlacement::from_policy(&options);
    assert_eq!((placement.pci_device, placement.intr), (Some(5), Some(18)));
    ghstest_with(
        Box::new(registry.factory(options)),
        Box::new(registry.factory(policy("vdev shmem"))),
        placement,
        Discovery::Pci,
    );
    assert_eq!(
        registry.attached_mask("testing"),
        0,
        "freed by the last detach"
    );
}

/// ghstest in PCI mode through the server's factories, placed by the VMM (device 1, the
/// first free IOAPIC input: 16).
#[test]
fn ghstest_pci_through_the_server() {
    if !kvm_or_skip("ghstest_pci_through_the_server") {
        return;
    }
    let server = NamedServer::start("ghstest-pci");
    ghstest_with(
        Box::new(server.factory("vm1")),
        Box::new(server.factory("vm0")),
        GuestShmPlacement::pci(),
        Discovery::Pci,
    );
}

/// ghstest in MMIO mode (factory page at `loc`, interrupt from the factory's `vector` =
/// `intr`) through LocalFactory.
#[test]
fn ghstest_mmio_on_local_factory() {
    if !kvm_or_skip("ghstest_mmio_on_local_factory") {
        return;
    }
    let registry = LocalRegionRegistry::new(256);
    ghstest_with(
        Box::new(registry.factory(policy("vdev shmem"))),
        Box::new(registry.factory(policy("vdev shmem"))),
        GuestShmPlacement::mmio(u64::from(MMIO_LOC), INTR_PIN),
        Discovery::Mmio,
    );
}

/// ghstest in MMIO mode through the server's factories.
#[test]
fn ghstest_mmio_through_the_server() {
    if !kvm_or_skip("ghstest_mmio_through_the_server") {
        return;
    }
    let server = NamedServer::start("ghstest-mmio");
    ghstest_with(
        Box::new(server.factory("vm1")),
        Box::new(server.factory("vm0")),
        GuestShmPlacement::mmio(u64::from(MMIO_LOC), INTR_PIN),
        Discovery::Mmio,
    );
}

/// INTA# is level-triggered: a guest that acknowledges (EOI) without reading `status` gets
/// the interrupt again and again; once it reads `status`, the line is down and at most the
/// one delivery already accepted by its local APIC follows.
#[test]
fn inta_stays_asserted_until_status_is_read() {
    if !kvm_or_skip("inta_stays_asserted_until_status_is_read") {
        return;
    }
    let registry = LocalRegionRegistry::new(256);
    let mut vm = TestVm::new(RAM).unwrap();
    let attached = attach_guest_shm(
        &vm,
        GuestShmPlacement::pci(),
        Box::new(registry.factory(policy("vdev shmem"))),
    )
    .unwrap();
    // The default stub counts and EOIs: it never reads status. The input is level-triggered.
    let mut a = Asm::new(PROGRAM_BASE);
    ghstest_discover(&mut a, Discovery::Pci);
    a.route_ioapic_pin_in(Reg::Ebp, VECTOR, true);
    create(&mut a, "level", 1);
    a.load_ind(Reg::Esi, Reg::Ebx, 0x8)
        .report_imm(0x5eed)
        .mov_imm(Reg::Edi, 5)
        .wait_interrupts(VECTOR, Reg::Edi, "five") // one change, five deliveries
        .cli()
        .load_ind(Reg::Eax, Reg::Esi, 0)
        .report(Reg::Eax) // status: the host attached
        .load(Reg::Eax, INTR_COUNTERS + 4 * u32::from(VECTOR))
        .report(Reg::Eax)
        .sti()
        .mov_imm(Reg::Ecx, VAR_GO)
        .spin_until_word(Reg::Ecx, 0, 1, "quiet")
        .cli()
        .load(Reg::Eax, INTR_COUNTERS + 4 * u32::from(VECTOR))
        .report(Reg::Eax)
        .exit(0);
    vm.load_program(&a.finish().unwrap()).unwrap();
    vm.start().unwrap();
    // Device number, line, create status, 0x5eed.
    vm.wait_reports(4, TIMEOUT).unwrap();
    let mut host = registry.factory(policy("vdev shmem"));
    let _client = HostClient::attach(&mut host, "level", 1);
    vm.wait_reports(6, TIMEOUT).unwrap();
    std::thread::sleep(QUIET);
    vm.write_ram(VAR_GO, &1u32.to_le_bytes()).unwrap();
    assert_eq!(vm.wait_exit(TIMEOUT).unwrap(), 0, "{:x?}", vm.reports());
    let reports = vm.reports();
    assert_eq!(
        reports[..6],
        [1, attached.intr, 0, 0x5eed, 0x0003_0000, reports[5]]
    );
    assert!(reports[5] >= 5, "{reports:x?}");
    assert!(
        reports[6] <= reports[5] + 1,
        "the line stayed asserted after the status read: {reports:x?}"
    );
    assert!(!attached.device.lock().unwrap().interrupt_level());
}

/// `sched`: the thread that turns status changes into the level line runs SCHED_FIFO at the
/// VM's priority (when the process may; else it logs and keeps its priority).
#[test]
fn sched_sets_the_priority_of_the_interrupt_thread() {
    if !kvm_or_skip("sched_sets_the_priority_of_the_interrupt_thread") {
        return;
    }
    if !common::realtime_allowed() {
        eprintln!("SKIPPED: sched_sets_the_priority_of_the_interrupt_thread: no CAP_SYS_NICE");
        return;
    }
    let registry = LocalRegionRegistry::new(256);
    let vm = TestVm::new(RAM).unwrap();
    let options = policy("vdev shmem sched 23");
    let _attached = attach_guest_shm(
        &vm,
        GuestShmPlacement::from_policy(&options),
        Box::new(registry.factory(options)),
    )
    .unwrap();
    common::wait_for_thread_priority(SERVICE_THREAD, 23);
}

/// Guest code for the two-VM flow: find the device, its line and factory page as ghstest
/// does, then `create` `name` with `pages`.
fn two_vm_prologue(a: &mut Asm, name: &str, pages: u32) {
    ghstest_discover(a, Discovery::Pci);
    create(a, name, pages);
    a.load_ind(Reg::Eax, Reg::Ebx, 0x18)
        .report(Reg::Eax) // actual size
        .load_ind(Reg::Esi, Reg::Ebx, 0x8) // control page
        .load_ind(Reg::Eax, Reg::Esi, 4)
        .report(Reg::Eax); // idx
}

/// VM A: creates "shm1" (2 pages), writes the payload, sees B attach, notifies everybody
/// but itself, sees B's notification and detach, detaches, then is denied "secret".
fn program_a() -> Vec<u8> {
    let mut a = Asm::new(PROGRAM_BASE);
    two_vm_prologue(&mut a, "shm1", 2);
    a.store_ind_imm(Reg::Esi, 0x1000, PAYLOAD);
    take_interrupt(&mut a, 1);
    a.store_ind_imm(Reg::Esi, 8, 0xffff_ffff);
    take_interrupt(&mut a, 2);
    a.store_ind_imm(Reg::Esi, 0x1004, 1); // ack, in the data page
    take_interrupt(&mut a, 3);
    a.store_ind_imm(Reg::Esi, 0xc, 1);
    create(&mut a, "secret", 1);
    a.exit(0);
    a.finish().unwrap()
}

/// VM B: attaches to "shm1" asking 1 page (gets 2), waits for A's notification, reads the
/// payload, notifies A, waits for A's ack, detaches; the control page is then gone.
fn program_b() -> Vec<u8> {
    let mut a = Asm::new(PROGRAM_BASE);
    two_vm_prologue(&mut a, "shm1", 1);
    take_interrupt(&mut a, 1);
    a.load_ind(Reg::Eax, Reg::Esi, 0x1000)
        .report(Reg::Eax)
        .store_ind_imm(Reg::Esi, 8, 1) // notify client 0
        .spin_until_word(Reg::Esi, 0x1004, 1, "spin") // A's ack
        .store_ind_imm(Reg::Esi, 0xc, 1)
        .load_ind(Reg::Eax, Reg::Esi, 4)
        .report(Reg::Eax)
        .exit(0);
    a.finish().unwrap()
}

/// Runs the two-VM QNX flow on the given factories (A's must deny "secret*"), both devices in
/// PCI mode with INTA# on IOAPIC input 16.
fn qnx_flow(fa: Box<dyn Factory>, fb: Box<dyn Factory>) {
    let mut vm_a = TestVm::new(RAM).unwrap();
    let mut vm_b = TestVm::new(RAM).unwrap();
    let att_a = attach_guest_shm(&vm_a, GuestShmPlacement::pci(), fa).unwrap();
    let att_b = attach_guest_shm(&vm_b, GuestShmPlacement::pci(), fb).unwrap();
    for (vm, att) in [(&vm_a, &att_a), (&vm_b, &att_b)] {
        let handler = masking_handler(VECTOR, att.intr as u8, LEVEL_IN_GUEST).unwrap();
        vm.install_handler(VECTOR, &handler).unwrap();
    }
    vm_a.load_program(&program_a()).unwrap();
    vm_b.load_program(&program_b()).unwrap();
    vm_a.start().unwrap();
    // B starts once A created the region (device, line, status, size, idx reported).
    vm_a.wait_reports(5, TIMEOUT).unwrap();
    vm_b.start().unwrap();

    let code_b = vm_b.wait_exit(TIMEOUT);
    let code_a = vm_a.wait_exit(TIMEOUT);
    assert_eq!(code_b.unwrap(), 0, "B reports {:x?}", vm_b.reports());
    assert_eq!(code_a.unwrap(), 0, "A reports {:x?}", vm_a.reports());
    let ok = GuestShmStatus::Ok.as_u32();
    assert_eq!(
        vm_a.reports(),
        vec![
            1,                                     // device number
            16,                                    // Interrupt Line
            ok,                                    // create "shm1"
            2,                                     // actual size
            0,                                     // idx
            0x0003_0000,                           // B attached (interrupt), nothing pending
            0x0003_0002,                           // B notified me
            0x0001_0000,                           // B detached (interrupt)
            GuestShmStatus::NoPermission.as_u32(), // "secret" denied by A's policy
        ]
    );
    assert_eq!(
        vm_b.reports(),
        vec![
            1,           // device number
            16,          // Interrupt Line
            ok,          // attach "shm1"
            2,           // the creator's size, not the 1 page B asked for
            1,           // idx: lowest free
            0x0003_0001, // A notified me
            PAYLOAD,     // A's data
            0xffff_ffff, // control page gone after detach
        ]
    );
    assert_eq!(att_a.device.lock().unwrap().connections(), 0);
}

#[test]
fn qnx_flow_between_two_vms() {
    if !kvm_or_skip("qnx_flow_between_two_vms") {
        return;
    }
    let registry = LocalRegionRegistry::new(256);
    let fa = registry.factory(policy("vdev shmem\n deny secret*"));
    let fb = registry.factory(policy("vdev shmem"));
    qnx_flow(Box::new(fa), Box::new(fb));
    assert_eq!(
        registry.attached_mask("shm1"),
        0,
        "region freed after the last detach"
    );
}

/// The same flow with `ServerFactory` against `ivshm-server`'s factory sockets: the server
/// applies each VM's policy, the connections are v0 peers on the region (notifications are
/// doorbells on vector = sender's index).
#[test]
fn qnx_flow_through_the_servers_factory() {
    if !kvm_or_skip("qnx_flow_through_the_servers_factory") {
        return;
    }
    let server = NamedServer::start("gs-flow");
    qnx_flow(
        Box::new(server.factory("vm0")),
        Box::new(server.factory("vm1")),
    );
}

/// MMIO mode (factory page at `loc`, interrupt on IOAPIC input `intr` as an edge irqfd): a
/// 17th client gets GSS_CLIENT_MAX, a find of a missing name GSS_DOES_NOT_EXIST, a legal
/// create GSS_OK; then the guest's own handler sees a host client attach and notify it
/// through the `intr` line. `host` fills region "full" with 16 connections first; the guest's
/// device uses `guest`.
fn mmio_mode_flow(mut host: Box<dyn Factory>, guest: Box<dyn Factory>) {
    let irq = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    let held: Vec<_> = (0..16)
        .map(|_| {
            host.create_or_attach(&field("full"), 1, irq.as_fd())
                .unwrap()
        })
        .collect();
    let idx: Vec<u32> = held.iter().map(|a| a.connection.idx()).collect();
    assert_eq!(idx, (0..16).collect::<Vec<u32>>());

    let mut a = Asm::new(PROGRAM_BASE);
    a.enable_lapic()
        .route_ioapic_pin(INTR_PIN as u8, VECTOR)
        .mov_imm(Reg::Ebx, MMIO_LOC)
        .load_ind(Reg::Eax, Reg::Ebx, 0)
        .cmp_imm(Reg::Eax, 0x474d_5651)
        .jcc(Cond::Ne, "fail_sig")
        .load_ind(Reg::Eax, Reg::Ebx, 0x10)
        .report(Reg::Eax); // vector: the intr line
    create(&mut a, "full", 1);
    write_name(&mut a, "nothere");
    a.store_ind_imm(Reg::Ebx, 0x3c, 1) // find
        .load_ind(Reg::Eax, Reg::Ebx, 0x14)
        .report(Reg::Eax);
    create(&mut a, "mine", 1);
    a.load_ind(Reg::Esi, Reg::Ebx, 0x8) // control page of "mine"
        .load_ind(Reg::Eax, Reg::Esi, 4)
        .report(Reg::Eax) // idx
        .load_ind(Reg::Eax, Reg::Esi, 0)
        .report(Reg::Eax) // status: only me attached
        .mov_imm(Reg::Edi, 1)
        .wait_interrupts(VECTOR, Reg::Edi, "w_host_attach")
        .load_ind(Reg::Eax, Reg::Esi, 0)
        .report(Reg::Eax)
        .mov_imm(Reg::Edi, 2)
        .wait_interrupts(VECTOR, Reg::Edi, "w_host_notify")
        .load_ind(Reg::Eax, Reg::Esi, 0)
        .report(Reg::Eax)
        .exit(0)
        .label("fail_sig")
        .exit(0xbad2);

    let mut vm = TestVm::new(RAM).unwrap();
    let placement = GuestShmPlacement {
        delivery: Delivery::EdgeIrqfd,
        ..GuestShmPlacement::mmio(u64::from(MMIO_LOC), INTR_PIN)
    };
    assert!(matches!(placement.mode, GuestShmMode::Mmio { .. }));
    let _att = attach_guest_shm(&vm, placement, guest).unwrap();
    // Another device's MSI route in the same VM (as an ivshmem device adds) must not cut
    // the IOAPIC line off: the router keeps KVM's irqchip routes in its table.
    let router = vm.gsi_router().clone();
    let other = router.allocate_gsi().unwrap();
    let msi = ivshm_vmm::pci::MsixMessage {
        addr: 0xfee0_0000,
        data: 0x41,
    };
    router.set_route(other, Some(msi)).unwrap();
    vm.load_program(&a.finish().unwrap()).unwrap();
    vm.start().unwrap();

    // Once the guest created "mine", a host client attaches (idx 1), then notifies it.
    vm.wait_reports(6, TIMEOUT).unwrap();
    let host_irq = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    let mut mine = host
        .create_or_attach(&field("mine"), 1, host_irq.as_fd())
        .unwrap();
    assert_eq!(mine.connection.idx(), 1);
    vm.wait_reports(7, TIMEOUT).unwrap();
    mine.connection.notify(1 << 0);
    assert_eq!(
        vm.wait_exit(TIMEOUT).unwrap(),
        0,
        "reports {:x?}",
        vm.reports()
    );
    assert_eq!(
        vm.reports(),
        vec![
            INTR_PIN,
            GuestShmStatus::ClientMax.as_u32(),
            GuestShmStatus::DoesNotExist.as_u32(),
            GuestShmStatus::Ok.as_u32(),
            0,           // idx
            0x0001_0000, // only me
            0x0003_0000, // the host client attached (interrupt on the intr line)
            0x0003_0002, // it notified me
        ]
    );
    router.release_gsi(other).unwrap();
}

#[test]
fn mmio_mode_client_max_and_missing_region() {
    if !kvm_or_skip("mmio_mode_client_max_and_missing_region") {
        return;
    }
    let registry = LocalRegionRegistry::new(256);
    mmio_mode_flow(
        Box::new(registry.factory(policy("vdev shmem"))),
        Box::new(registry.factory(policy("vdev shmem"))),
    );
}

/// The same with the server's factory: 16 v0 peers on a named region, the guest's 17th
/// attach is refused by the server (`GSS_CLIENT_MAX`).
#[test]
fn mmio_mode_client_max_through_the_servers_factory() {
    if !kvm_or_skip("mmio_mode_client_max_through_the_servers_factory") {
        return;
    }
    let server = NamedServer::start("gs-mmio");
    mmio_mode_flow(
        Box::new(server.factory("vm1")),
        Box::new(server.factory("vm1")),
    );
}
