//! ivshmem under KVM: two (or more) tiny guests in one process share a region through
//! the ivshmem device model, ring each other's doorbells and take the MSI-X interrupts in
//! their own IDT handlers.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use ivshm_mem::Mapping;
use ivshm_vmm::ivshmem::{IvshmemDevice, LocalDoorbellBus, REG_DOORBELL};
use ivshm_vmm::testvmm::asm::{Asm, Cond, Reg};
use ivshm_vmm::testvmm::guest::{GuestOps, INTR_COUNTERS, PROGRAM_BASE};
use ivshm_vmm::testvmm::{
    attach_ivshmem, ivshmem_guest_prologue, kvm_available, DoorbellPath, TestVm, IVSHMEM_BAR0,
    IVSHMEM_VECTOR_BASE,
};

const TIMEOUT: Duration = Duration::from_secs(20);
const SHM_SIZE: usize = 1 << 20;
const PAYLOAD: u32 = 0x5eed_1234;
const RAM: usize = 2 << 20;

/// False (after a loud message) when KVM is missing, unless IVSHM_REQUIRE_KVM=1.
fn kvm_or_skip(test: &str) -> bool {
    if kvm_available() {
        return true;
    }
    if std::env::var("IVSHM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: IVSHM_REQUIRE_KVM=1 but /dev/kvm is not usable");
    }
    eprintln!(
        "SKIPPED: {test}: /dev/kvm is not available (set IVSHM_REQUIRE_KVM=1 to fail instead)"
    );
    false
}

fn shared_region() -> Arc<Mapping> {
    let fd = rustix::fs::memfd_create("ivshm-test-shm", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, SHM_SIZE as u64).unwrap();
    Arc::new(Mapping::map_fd(fd.as_fd(), 0, SHM_SIZE).unwrap())
}

/// VM A (sender, id 0): wait until B is ready, write the payload, ring B vector 0,
/// wait for B's reply interrupt, report its interrupt count.
fn sender_program(peer: u16) -> Vec<u8> {
    let mut a = Asm::new(PROGRAM_BASE);
    ivshmem_guest_prologue(&mut a, 1);
    a.label("wait_ready")
        .load_ind(Reg::Eax, Reg::Esi, 0)
        .cmp_imm(Reg::Eax, 1)
        .jcc(Cond::E, "ready")
        .pause()
        .jmp("wait_ready")
        .label("ready")
        .store_ind_imm(Reg::Esi, 0x100, PAYLOAD)
        .store_ind_imm(Reg::Ebx, REG_DOORBELL as u32, u32::from(peer) << 16)
        .mov_imm(Reg::Edi, 1)
        .wait_interrupts(IVSHMEM_VECTOR_BASE, Reg::Edi, "wait_reply")
        .load(Reg::Eax, INTR_COUNTERS + 4 * u32::from(IVSHMEM_VECTOR_BASE))
        .report(Reg::Eax)
        .exit(0);
    a.finish().unwrap()
}

/// VM B (receiver): announce readiness in shared memory, sleep until the doorbell
/// interrupt arrives, report the payload and the interrupt count, ring A back.
fn receiver_program(peer: u16) -> Vec<u8> {
    let mut a = Asm::new(PROGRAM_BASE);
    ivshmem_guest_prologue(&mut a, 1);
    a.store_ind_imm(Reg::Esi, 0, 1)
        .mov_imm(Reg::Edi, 1)
        .wait_interrupts(IVSHMEM_VECTOR_BASE, Reg::Edi, "wait_bell")
        .load_ind(Reg::Eax, Reg::Esi, 0x100)
        .report(Reg::Eax)
        .load(Reg::Eax, INTR_COUNTERS + 4 * u32::from(IVSHMEM_VECTOR_BASE))
        .report(Reg::Eax)
        .store_ind_imm(Reg::Ebx, REG_DOORBELL as u32, u32::from(peer) << 16)
        .exit(0);
    a.finish().unwrap()
}

fn doorbell_flow(path: DoorbellPath) {
    let shm = shared_region();
    let bus = LocalDoorbellBus::new();
    let link_a = bus.join(1).unwrap();
    let link_b = bus.join(1).unwrap();
    let mut dev_a =
        IvshmemDevice::new_doorbell(SHM_SIZE as u64, 1, Box::new(link_a), true).unwrap();
    let dev_b = IvshmemDevice::new_doorbell(SHM_SIZE as u64, 1, Box::new(link_b), false).unwrap();
    // A joined first and learns about B through a peer event.
    dev_a.process_link_events().unwrap();

    let mut vm_a = TestVm::new(RAM).unwrap();
    let mut vm_b = TestVm::new(RAM).unwrap();
    let att_a = attach_ivshmem(&vm_a, dev_a, shm.clone(), path).unwrap();
    let att_b = attach_ivshmem(&vm_b, dev_b, shm.clone(), path).unwrap();
    vm_a.load_program(&sender_program(1)).unwrap();
    vm_b.load_program(&receiver_program(0)).unwrap();
    vm_b.start().unwrap();
    vm_a.start().unwrap();

    let code_a = vm_a.wait_exit(TIMEOUT);
    let code_b = vm_b.wait_exit(TIMEOUT);
    assert_eq!(code_b.unwrap(), 0, "B reports {:x?}", vm_b.reports());
    assert_eq!(code_a.unwrap(), 0, "A reports {:x?}", vm_a.reports());

    // A: IVPosition 0, then one interrupt observed by its own handler.
    assert_eq!(vm_a.reports(), vec![0, 1]);
    // B: IVPosition 1, the payload A wrote through BAR2, one interrupt.
    assert_eq!(vm_b.reports(), vec![1, PAYLOAD, 1]);
    // The host sees the same bytes in the region.
    assert_eq!(shm.view().read_u32(0x100).unwrap(), PAYLOAD);
    assert_eq!(shm.view().read_u32(0).unwrap(), 1);

    let doorbell = IVSHMEM_BAR0 + REG_DOORBELL;
    let trapped_a = att_a.device.lock().unwrap().trapped_doorbells();
    let trapped_b = att_b.device.lock().unwrap().trapped_doorbells();
    match path {
        DoorbellPath::Kvm => {
            assert_eq!(
                vm_a.mmio_exits_at(doorbell),
                0,
                "doorbell write exited to the VMM"
            );
            assert_eq!(
                vm_b.mmio_exits_at(doorbell),
                0,
                "doorbell write exited to the VMM"
            );
            assert_eq!((trapped_a, trapped_b), (0, 0));
        }
        DoorbellPath::Trapped => {
            assert_eq!(vm_a.mmio_exits_at(doorbell), 1);
            assert_eq!(vm_b.mmio_exits_at(doorbell), 1);
            assert_eq!((trapped_a, trapped_b), (1, 1));
        }
    }
}

#[test]
fn doorbell_via_ioeventfd_and_irqfd_never_exits() {
    if !kvm_or_skip("doorbell_via_ioeventfd_and_irqfd_never_exits") {
        return;
    }
    doorbell_flow(DoorbellPath::Kvm);
}

#[test]
fn doorbell_via_register_callbacks() {
    if !kvm_or_skip("doorbell_via_register_callbacks") {
        return;
    }
    doorbell_flow(DoorbellPath::Trapped);
}
