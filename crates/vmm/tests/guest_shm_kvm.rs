//! The QNX `guest_shm` device under KVM: two tiny guests create/attach a named region
//! through the factory page, exchange data and notifications through their control pages,
//! see each other attach and detach (interrupt on every status change, observed by the
//! guest's own handler), and get the policy's and the registry's status codes.

mod common;

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use common::{NamedServer, TIMEOUT};
use ivshm_policy::{GuestShmStatus, VmPolicy};
use ivshm_testvmm::asm::{Asm, Cond, Reg};
use ivshm_testvmm::guest::{GuestOps, PROGRAM_BASE};
use ivshm_testvmm::{attach_guest_shm, attach_guest_shm_on_ioapic_pin, kvm_or_skip, TestVm};
use ivshm_vmm::guest_shm::{Factory, GuestShmMode, LocalRegionRegistry};

const RAM: usize = 2 << 20;
const VECTOR: u8 = 0x60;
const PAYLOAD: u32 = 0x9e57_0042;
const MMIO_LOC: u32 = 0x1b00_0000;
/// The MMIO-mode `intr` line: IOAPIC input 20 (16..23 do not reach the PIC).
const INTR_PIN: u32 = 20;

fn policy(text: &str) -> VmPolicy {
    VmPolicy::parse_qnx(text).unwrap()
}

/// Guest code: find the PCI function 1C05:0001, put BAR0 (the factory page) in EBX,
/// enable decoding and the LAPIC, check the signature. Fails with exit 0xBAD1/0xBAD2.
fn pci_prologue(a: &mut Asm) {
    a.enable_lapic()
        .pci_read(1, 0)
        .cmp_imm(Reg::Eax, 0x0001_1c05)
        .jcc(Cond::Ne, "fail_id")
        .pci_read(1, 4)
        .and_imm(Reg::Eax, 0xffff_fff0)
        .mov(Reg::Ebx, Reg::Eax)
        .mov_imm(Reg::Eax, 0x7)
        .pci_write_eax(1, 1);
    check_signature(a);
}

/// Checks the factory page at EBX: signature 0x4d534732474d5651.
fn check_signature(a: &mut Asm) {
    a.load_ind(Reg::Eax, Reg::Ebx, 0)
        .cmp_imm(Reg::Eax, 0x474d_5651)
        .jcc(Cond::Ne, "fail_sig")
        .load_ind(Reg::Eax, Reg::Ebx, 4)
        .cmp_imm(Reg::Eax, 0x4d53_4732)
        .jcc(Cond::Ne, "fail_sig")
        .jmp("prologue_done")
        .label("fail_id")
        .exit(0xbad1)
        .label("fail_sig")
        .exit(0xbad2)
        .label("prologue_done");
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

/// `size = pages` (create or attach), then report status.
fn create(a: &mut Asm, name: &str, pages: u32) {
    write_name(a, name);
    a.store_ind_imm(Reg::Ebx, 0x18, pages)
        .load_ind(Reg::Eax, Reg::Ebx, 0x14)
        .report(Reg::Eax);
}

fn wait_irq(a: &mut Asm, count: u32, label: &str) {
    a.mov_imm(Reg::Edi, count)
        .wait_interrupts(VECTOR, Reg::Edi, label);
}

/// VM A: creates "shm1" (2 pages), writes the payload, sees B attach, notifies everybody
/// but itself, sees B's notification and detach, detaches, then is denied "secret".
fn program_a() -> Vec<u8> {
    let mut a = Asm::new(PROGRAM_BASE);
    pci_prologue(&mut a);
    create(&mut a, "shm1", 2);
    a.load_ind(Reg::Eax, Reg::Ebx, 0x18)
        .report(Reg::Eax) // actual size
        .load_ind(Reg::Esi, Reg::Ebx, 0x8) // control page
        .load_ind(Reg::Eax, Reg::Esi, 4)
        .report(Reg::Eax) // idx
        .store_ind_imm(Reg::Esi, 0x1000, PAYLOAD);
    wait_irq(&mut a, 1, "w_attach");
    a.load_ind(Reg::Eax, Reg::Esi, 0)
        .report(Reg::Eax)
        .store_ind_imm(Reg::Esi, 8, 0xffff_ffff);
    wait_irq(&mut a, 2, "w_notify");
    a.load_ind(Reg::Eax, Reg::Esi, 0)
        .report(Reg::Eax)
        .store_ind_imm(Reg::Esi, 0x1004, 1); // ack, in the data page
    wait_irq(&mut a, 3, "w_detach");
    a.load_ind(Reg::Eax, Reg::Esi, 0)
        .report(Reg::Eax)
        .store_ind_imm(Reg::Esi, 0xc, 1);
    create(&mut a, "secret", 1);
    a.exit(0);
    a.finish().unwrap()
}

/// VM B: attaches to "shm1" asking 1 page (gets 2), waits for A's notification, reads the
/// payload, notifies A, waits for A's ack, detaches; the control page is then gone.
fn program_b() -> Vec<u8> {
    let mut a = Asm::new(PROGRAM_BASE);
    pci_prologue(&mut a);
    create(&mut a, "shm1", 1);
    a.load_ind(Reg::Eax, Reg::Ebx, 0x18)
        .report(Reg::Eax)
        .load_ind(Reg::Esi, Reg::Ebx, 0x8)
        .load_ind(Reg::Eax, Reg::Esi, 4)
        .report(Reg::Eax);
    wait_irq(&mut a, 1, "w_notify");
    a.load_ind(Reg::Eax, Reg::Esi, 0)
        .report(Reg::Eax)
        .load_ind(Reg::Eax, Reg::Esi, 0x1000)
        .report(Reg::Eax)
        .store_ind_imm(Reg::Esi, 8, 1) // notify client 0
        .spin_until_word(Reg::Esi, 0x1004, 1, "spin") // A's ack
        .store_ind_imm(Reg::Esi, 0xc, 1)
        .load_ind(Reg::Eax, Reg::Esi, 4)
        .report(Reg::Eax)
        .exit(0);
    a.finish().unwrap()
}

fn wait_reports(vm: &TestVm, n: usize) {
    let deadline = Instant::now() + TIMEOUT;
    while vm.reports().len() < n {
        assert!(
            Instant::now() < deadline,
            "guest sent only {:x?}",
            vm.reports()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs the two-VM QNX flow on the given factories (A's must deny "secret*").
fn qnx_flow(fa: Box<dyn Factory>, fb: Box<dyn Factory>) {
    let mut vm_a = TestVm::new(RAM).unwrap();
    let mut vm_b = TestVm::new(RAM).unwrap();
    let att_a = attach_guest_shm(&vm_a, GuestShmMode::Pci, VECTOR, fa).unwrap();
    let _att_b = attach_guest_shm(&vm_b, GuestShmMode::Pci, VECTOR, fb).unwrap();
    vm_a.load_program(&program_a()).unwrap();
    vm_b.load_program(&program_b()).unwrap();
    vm_a.start().unwrap();
    // B starts once A created the region (status, size, idx reported).
    wait_reports(&vm_a, 3);
    vm_b.start().unwrap();

    let code_b = vm_b.wait_exit(TIMEOUT);
    let code_a = vm_a.wait_exit(TIMEOUT);
    assert_eq!(code_b.unwrap(), 0, "B reports {:x?}", vm_b.reports());
    assert_eq!(code_a.unwrap(), 0, "A reports {:x?}", vm_a.reports());
    let ok = GuestShmStatus::Ok.as_u32();
    assert_eq!(
        vm_a.reports(),
        vec![
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

/// MMIO mode (factory page at `loc`, interrupt on IOAPIC input `intr`): a 17th client gets
/// GSS_CLIENT_MAX, a find of a missing name GSS_DOES_NOT_EXIST, a legal create GSS_OK; then
/// the guest's own handler sees a host client attach and notify it through the `intr` line.
/// `host` fills region "full" with 16 connections first; the guest's device uses `guest`.
fn mmio_mode_flow(mut host: Box<dyn Factory>, guest: Box<dyn Factory>) {
    let irq = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    let field = |s: &str| {
        let mut n = [0u8; 32];
        n[..s.len()].copy_from_slice(s.as_bytes());
        n
    };
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
        .mov_imm(Reg::Ebx, MMIO_LOC);
    check_signature(&mut a);
    a.load_ind(Reg::Eax, Reg::Ebx, 0x10).report(Reg::Eax); // vector: the intr line
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
        .report(Reg::Eax); // status: only me attached
    wait_irq(&mut a, 1, "w_host_attach");
    a.load_ind(Reg::Eax, Reg::Esi, 0).report(Reg::Eax);
    wait_irq(&mut a, 2, "w_host_notify");
    a.load_ind(Reg::Eax, Reg::Esi, 0).report(Reg::Eax).exit(0);

    let mut vm = TestVm::new(RAM).unwrap();
    let mode = GuestShmMode::Mmio {
        loc: u64::from(MMIO_LOC),
    };
    let _att = attach_guest_shm_on_ioapic_pin(&vm, mode, INTR_PIN, guest).unwrap();
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
    wait_reports(&vm, 6);
    let host_irq = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    let mut mine = host
        .create_or_attach(&field("mine"), 1, host_irq.as_fd())
        .unwrap();
    assert_eq!(mine.connection.idx(), 1);
    wait_reports(&vm, 7);
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
