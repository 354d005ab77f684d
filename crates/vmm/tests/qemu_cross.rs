//! Our device model next to QEMU's: a KVM test VM (ivshmem-doorbell model, v0 client of the
//! in-process `ivshm-server`) and a QEMU TCG Linux guest (`-device ivshmem-doorbell`, driven
//! with the `ivshm guest` tool over VFIO) on the same server region. Data crosses both ways,
//! the KVM guest's doorbell (an ioeventfd in our VMM) reaches QEMU's guest through MSI-X,
//! and QEMU's guest's doorbell reaches the KVM guest's own interrupt handler.
//!
//! Needs `/dev/kvm` and the end-to-end guest assets (see crates/e2e/README.md); skips with a
//! message otherwise (`IVSHM_REQUIRE_KVM=1` / `IVSHM_E2E=1` turn the skips into failures).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ivshm_client::{ConnectOptions, Peer};
use ivshm_e2e::guest_tool::{
    finish_wait, notify, read_hex, start_wait, vfio_doorbell_guest, write_hex,
};
use ivshm_e2e::{require_e2e, ScratchDir};
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use ivshm_testvmm::asm::{Asm, Cond, Reg};
use ivshm_testvmm::guest::{GuestOps, PROGRAM_BASE};
use ivshm_testvmm::{
    attach_ivshmem, ivshmem_guest_prologue, kvm_or_skip, DoorbellPath, TestVm, IVSHMEM_BAR0,
    IVSHMEM_VECTOR_BASE,
};
use ivshm_vmm::ivshmem::{IvshmemDevice, REG_DOORBELL};

const BOOT: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(90);
const SHM_SIZE: u64 = 1 << 20;
const FROM_KVM: u32 = 0x6b76_6d21;
const FROM_QEMU: u32 = 0x7165_6d75;
const WRITTEN: u32 = 0x5752_4954;
const GO: usize = 0x300;

/// KVM guest (peer 0): write for QEMU, say so, wait for the host's go, ring QEMU (peer 1)
/// vector 0, sleep until QEMU's guest rings back, report what QEMU wrote.
fn kvm_program() -> Vec<u8> {
    let mut a = Asm::new(PROGRAM_BASE);
    ivshmem_guest_prologue(&mut a, 1);
    a.store_ind_imm(Reg::Esi, 0x100, FROM_KVM)
        .report_imm(WRITTEN)
        .label("wait_go")
        .load_ind(Reg::Eax, Reg::Esi, GO as u32)
        .cmp_imm(Reg::Eax, 1)
        .jcc(Cond::E, "go")
        .pause()
        .jmp("wait_go")
        .label("go")
        .store_ind_imm(Reg::Ebx, REG_DOORBELL as u32, 1 << 16)
        .mov_imm(Reg::Edi, 1)
        .wait_interrupts(IVSHMEM_VECTOR_BASE, Reg::Edi, "wait_qemu")
        .load_ind(Reg::Eax, Reg::Esi, 0x200)
        .report(Reg::Eax)
        .exit(0);
    a.finish().unwrap()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hex_le(v: u32) -> String {
    v.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn kvm_test_vm_and_qemu_guest_share_a_server_region() {
    if !kvm_or_skip("kvm_test_vm_and_qemu_guest_share_a_server_region") {
        return;
    }
    let assets = require_e2e!();
    let dir = ScratchDir::new().unwrap();
    let socket = dir.join("ivshm.sock");
    let mut region = RegionConfig::new(&socket);
    region.vectors = 1;
    region.memory.size = SHM_SIZE;
    let server = ServerHandle::spawn(ServerConfig::single(region)).unwrap();

    // The KVM VM's device joins first: id 0. QEMU joins while it starts: id 1.
    let opts = ConnectOptions {
        timeout: Duration::from_secs(10),
        ..ConnectOptions::default()
    };
    let peer = Peer::connect(&socket, opts).unwrap();
    assert_eq!(peer.id(), 0);
    let shm = Arc::new(peer.map().unwrap());
    let device = IvshmemDevice::new_doorbell(SHM_SIZE, 1, Box::new(peer), false).unwrap();
    let mut vm = TestVm::new(2 << 20).unwrap();
    let attached = attach_ivshmem(&vm, device, shm.clone(), DoorbellPath::Kvm).unwrap();
    vm.load_program(&kvm_program()).unwrap();

    let mut guest = vfio_doorbell_guest(&assets, "vmm-cross", &socket, 1)
        .spawn()
        .unwrap();
    // Our VMM learns about QEMU's peer and adds ioeventfds for its doorbell.
    wait_until("QEMU's peer to join", || {
        let mut d = attached.device.lock().unwrap();
        d.process_link_events().unwrap();
        d.link().is_some_and(|l| l.peer_ids() == vec![1])
    });
    vm.refresh_ioevents().unwrap();
    guest.wait_ready(BOOT).unwrap();
    vm.start().unwrap();
    wait_until("the KVM guest's write", || vm.reports().contains(&WRITTEN));

    // Data both ways.
    assert_eq!(
        read_hex(&mut guest, 0x100, 4, STEP).unwrap(),
        hex_le(FROM_KVM)
    );
    write_hex(&mut guest, 0x200, &hex_le(FROM_QEMU), STEP).unwrap();
    assert_eq!(shm.view().read_u32(0x200).unwrap(), FROM_QEMU);

    // KVM guest -> QEMU guest: QEMU's guest waits on its MSI-X vector through VFIO (in the
    // background; once it printed its `self` line the vector is connected).
    let wait = start_wait(&mut guest, "wait", 1, "--count 1", STEP).unwrap();
    shm.view().write_u32(GO, 1).unwrap();
    let doorbells = finish_wait(&mut guest, wait, STEP).unwrap();
    assert_eq!(doorbells, ["doorbell vector=0"]);
    assert_eq!(
        vm.mmio_exits_at(IVSHMEM_BAR0 + REG_DOORBELL),
        0,
        "the KVM guest's doorbell went through an ioeventfd"
    );

    // QEMU guest -> KVM guest: the KVM guest's own handler sees it.
    notify(&mut guest, 0, 0, STEP).unwrap();
    assert_eq!(
        vm.wait_exit(STEP).unwrap(),
        0,
        "reports {:x?}",
        vm.reports()
    );
    // IVPosition 0, the marker, then QEMU's word read after QEMU's doorbell interrupt.
    assert_eq!(vm.reports(), vec![0, WRITTEN, FROM_QEMU]);
    guest.poweroff(STEP).unwrap();
    server.shutdown().unwrap();
}
