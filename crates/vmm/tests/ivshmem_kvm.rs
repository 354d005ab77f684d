//! ivshmem under KVM: two (or more) tiny guests in one process share a region through
//! the ivshmem device model, ring each other's doorbells and take the MSI-X interrupts in
//! their own IDT handlers.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use ivshm_client::{ConnectOptions, Peer};
use ivshm_mem::Mapping;
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use ivshm_testvmm::asm::{Asm, Reg};
use ivshm_testvmm::guest::{GuestOps, INTR_COUNTERS, PROGRAM_BASE};
use ivshm_testvmm::{
    attach_ivshmem, ivshmem_guest_prologue, kvm_or_skip, DoorbellPath, TestVm, IVSHMEM_BAR0,
    IVSHMEM_VECTOR_BASE,
};
use ivshm_vmm::ivshmem::kvm::{KvmGsiRouter, FIRST_MSI_GSI};
use ivshm_vmm::ivshmem::{DoorbellLink, IvshmemDevice, LocalDoorbellBus, PeerChange, REG_DOORBELL};
use ivshm_vmm::pci::{MsixMessage, PciDevice};

const TIMEOUT: Duration = Duration::from_secs(20);
const SHM_SIZE: usize = 1 << 20;
const PAYLOAD: u32 = 0x5eed_1234;
const RAM: usize = 2 << 20;

fn shared_region() -> Arc<Mapping> {
    let fd = rustix::fs::memfd_create("ivshm-test-shm", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, SHM_SIZE as u64).unwrap();
    Arc::new(Mapping::map_fd(fd.as_fd(), 0, SHM_SIZE).unwrap())
}

/// Guest code: spin until the receiver set the ready flag (word 0 of the region, at ESI).
fn wait_for_ready_flag(a: &mut Asm) {
    a.spin_until_word(Reg::Esi, 0, 1, "wait_ready");
}

/// Starts receiver B, then sender A, and waits until both exited with 0.
fn run_receiver_then_sender(vm_a: &mut TestVm, vm_b: &mut TestVm) {
    vm_b.start().unwrap();
    vm_a.start().unwrap();
    let code_a = vm_a.wait_exit(TIMEOUT);
    let code_b = vm_b.wait_exit(TIMEOUT);
    assert_eq!(code_b.unwrap(), 0, "B reports {:x?}", vm_b.reports());
    assert_eq!(code_a.unwrap(), 0, "A reports {:x?}", vm_a.reports());
}

/// VM A (sender, id 0): wait until B is ready, write the payload, ring B vector 0,
/// wait for B's reply interrupt, report its interrupt count.
fn sender_program(peer: u16) -> Vec<u8> {
    let mut a = Asm::new(PROGRAM_BASE);
    ivshmem_guest_prologue(&mut a, 1);
    wait_for_ready_flag(&mut a);
    a.store_ind_imm(Reg::Esi, 0x100, PAYLOAD)
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
    doorbell_flow_with(path, Box::new(link_a), Box::new(link_b), &shm, shm.clone());
}

/// Runs sender A (peer 0) and receiver B (peer 1) on links that A joined first.
fn doorbell_flow_with(
    path: DoorbellPath,
    link_a: Box<dyn DoorbellLink>,
    link_b: Box<dyn DoorbellLink>,
    shm_a: &Arc<Mapping>,
    shm_b: Arc<Mapping>,
) {
    assert_eq!((link_a.own_id(), link_b.own_id()), (0, 1));
    let mut dev_a = IvshmemDevice::new_doorbell(SHM_SIZE as u64, 1, link_a, true).unwrap();
    let dev_b = IvshmemDevice::new_doorbell(SHM_SIZE as u64, 1, link_b, false).unwrap();
    // A joined first and learns about B through a peer event.
    dev_a.process_link_events().unwrap();

    let mut vm_a = TestVm::new(RAM).unwrap();
    let mut vm_b = TestVm::new(RAM).unwrap();
    let att_a = attach_ivshmem(&vm_a, dev_a, shm_a.clone(), path).unwrap();
    let att_b = attach_ivshmem(&vm_b, dev_b, shm_b, path).unwrap();
    vm_a.load_program(&sender_program(1)).unwrap();
    vm_b.load_program(&receiver_program(0)).unwrap();
    run_receiver_then_sender(&mut vm_a, &mut vm_b);

    // A: IVPosition 0, then one interrupt observed by its own handler.
    assert_eq!(vm_a.reports(), vec![0, 1]);
    // B: IVPosition 1, the payload A wrote through BAR2, one interrupt.
    assert_eq!(vm_b.reports(), vec![1, PAYLOAD, 1]);
    // The host sees the same bytes in the region.
    assert_eq!(shm_a.view().read_u32(0x100).unwrap(), PAYLOAD);
    assert_eq!(shm_a.view().read_u32(0).unwrap(), 1);

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

/// The same flow with both devices as v0 clients of the real `ivshm-server`.
#[test]
fn doorbell_through_ivshm_server() {
    if !kvm_or_skip("doorbell_through_ivshm_server") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ivshm-vmm-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("sock");
    let mut region = RegionConfig::new(&socket);
    region.vectors = 1;
    region.memory.size = SHM_SIZE as u64;
    let server = ServerHandle::spawn(ServerConfig::single(region)).unwrap();
    let opts = ConnectOptions {
        timeout: Duration::from_secs(10),
        ..ConnectOptions::default()
    };
    let a = Peer::connect(&socket, opts.clone()).unwrap();
    let b = Peer::connect(&socket, opts).unwrap();
    let shm_a = Arc::new(a.map().unwrap());
    let shm_b = Arc::new(b.map().unwrap());
    // A learns about B from the server; wait (bounded) until its join message arrived.
    let mut a: Box<dyn DoorbellLink> = Box::new(a);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while a.peer_ids().is_empty() {
        assert!(std::time::Instant::now() < deadline, "A never heard of B");
        a.process_events().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    doorbell_flow_with(DoorbellPath::Kvm, a, Box::new(b), &shm_a, shm_b);
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// One guest rings itself on the KVM path: a masked vector shows up in the PBA and fires
/// when unmasked; after the guest moves BAR0 the doorbell ioeventfd follows it.
#[test]
fn msix_masking_and_bar0_relocation_on_kvm_path() {
    if !kvm_or_skip("msix_masking_and_bar0_relocation_on_kvm_path") {
        return;
    }
    const NEW_BAR0: u32 = 0xc000_2000;
    const NEW_BAR2: u32 = 0xd800_0000;
    const VAR_BAR1: u32 = ivshm_testvmm::guest::VARS + 4;
    let counter = INTR_COUNTERS + 4 * u32::from(IVSHMEM_VECTOR_BASE);
    let mut a = Asm::new(PROGRAM_BASE);
    ivshmem_guest_prologue(&mut a, 1);
    a.load(Reg::Ecx, VAR_BAR1)
        .store_ind_imm(Reg::Ecx, 12, 1) // mask vector 0
        .store_ind_imm(Reg::Ebx, REG_DOORBELL as u32, 0) // ring peer 0 (ourselves) vector 0
        .load_ind(Reg::Eax, Reg::Ecx, 0x800) // PBA
        .report(Reg::Eax)
        .load(Reg::Eax, counter)
        .report(Reg::Eax)
        .store_ind_imm(Reg::Ecx, 12, 0) // unmask: the pending interrupt arrives
        .mov_imm(Reg::Edi, 1)
        .wait_interrupts(IVSHMEM_VECTOR_BASE, Reg::Edi, "wait1")
        .load(Reg::Eax, counter)
        .report(Reg::Eax)
        .load(Reg::Ecx, VAR_BAR1)
        .load_ind(Reg::Eax, Reg::Ecx, 0x800)
        .report(Reg::Eax)
        // Move BAR0 and ring through the new address.
        .mov_imm(Reg::Eax, NEW_BAR0)
        .pci_write_eax(1, 4)
        .mov_imm(Reg::Ebx, NEW_BAR0)
        .store_ind_imm(Reg::Ebx, REG_DOORBELL as u32, 0)
        .mov_imm(Reg::Edi, 2)
        .wait_interrupts(IVSHMEM_VECTOR_BASE, Reg::Edi, "wait2")
        .load(Reg::Eax, counter)
        .report(Reg::Eax)
        // IVPosition still answers at the new place.
        .load_ind(Reg::Eax, Reg::Ebx, 8)
        .report(Reg::Eax)
        // Move BAR2 (64-bit: low dword, high stays 0) and write through the new address.
        .mov_imm(Reg::Eax, NEW_BAR2)
        .pci_write_eax(1, 6)
        .mov_imm(Reg::Esi, NEW_BAR2)
        .store_ind_imm(Reg::Esi, 0x40, 0xb2b2_b2b2)
        .load_ind(Reg::Eax, Reg::Esi, 0x40)
        .report(Reg::Eax)
        .exit(0);

    let bus = LocalDoorbellBus::new();
    let dev = IvshmemDevice::new_doorbell(SHM_SIZE as u64, 1, Box::new(bus.join(1).unwrap()), true)
        .unwrap();
    let mut vm = TestVm::new(RAM).unwrap();
    let shm = shared_region();
    let att = attach_ivshmem(&vm, dev, shm.clone(), DoorbellPath::Kvm).unwrap();
    vm.load_program(&a.finish().unwrap()).unwrap();
    vm.start().unwrap();
    let code = vm.wait_exit(TIMEOUT);
    assert_eq!(code.unwrap(), 0, "reports {:x?}", vm.reports());
    // IVPosition, PBA while masked, counter while masked, counter after unmask, PBA after,
    // counter after the relocated ring, IVPosition through the new BAR0, the word written
    // through the relocated BAR2.
    assert_eq!(vm.reports(), vec![0, 1, 0, 1, 0, 2, 0, 0xb2b2_b2b2]);
    assert_eq!(shm.view().read_u32(0x40).unwrap(), 0xb2b2_b2b2);
    assert_eq!(vm.mmio_exits_at(IVSHMEM_BAR0 + REG_DOORBELL), 0);
    assert_eq!(vm.mmio_exits_at(u64::from(NEW_BAR0) + REG_DOORBELL), 0);
    assert_eq!(vm.mmio_exits_at(u64::from(NEW_BAR0) + 8), 1);
    assert_eq!(att.device.lock().unwrap().trapped_doorbells(), 0);
}

/// ivshmem-plain: two guests share a memory backend without a server or interrupts.
#[test]
fn plain_shared_memory_between_two_vms() {
    if !kvm_or_skip("plain_shared_memory_between_two_vms") {
        return;
    }
    let shm = shared_region();
    let mut writer = Asm::new(PROGRAM_BASE);
    ivshmem_guest_prologue(&mut writer, 0);
    writer
        .store_ind_imm(Reg::Esi, 0x200, PAYLOAD)
        .store_ind_imm(Reg::Esi, 0x204, 1) // flag after data
        .exit(0);
    let mut reader = Asm::new(PROGRAM_BASE);
    ivshmem_guest_prologue(&mut reader, 0);
    reader
        .spin_until_word(Reg::Esi, 0x204, 1, "spin")
        .load_ind(Reg::Eax, Reg::Esi, 0x200)
        .report(Reg::Eax)
        .exit(0);
    let mut vms = Vec::new();
    let mut devices = Vec::new();
    for code in [writer.finish().unwrap(), reader.finish().unwrap()] {
        let dev = IvshmemDevice::new_plain(SHM_SIZE as u64, false).unwrap();
        let vm = TestVm::new(RAM).unwrap();
        devices.push(attach_ivshmem(&vm, dev, shm.clone(), DoorbellPath::Kvm).unwrap());
        vm.load_program(&code).unwrap();
        vms.push(vm);
    }
    for vm in &mut vms {
        vm.start().unwrap();
    }
    for vm in &vms {
        assert_eq!(
            vm.wait_exit(TIMEOUT).unwrap(),
            0,
            "reports {:x?}",
            vm.reports()
        );
    }
    assert_eq!(vms[0].reports(), vec![0]);
    assert_eq!(vms[1].reports(), vec![0, PAYLOAD]);
}

/// B joins after A's guest is already running: A's VMM learns of B from a peer event and
/// re-registers its doorbell ioeventfds, so A's ring still never exits; when B leaves,
/// A's ioevent for B goes away again.
#[test]
fn peer_joining_a_running_vm_gets_ioeventfds() {
    if !kvm_or_skip("peer_joining_a_running_vm_gets_ioeventfds") {
        return;
    }
    let shm = shared_region();
    let bus = LocalDoorbellBus::new();
    let dev_a =
        IvshmemDevice::new_doorbell(SHM_SIZE as u64, 1, Box::new(bus.join(1).unwrap()), true)
            .unwrap();
    let mut vm_a = TestVm::new(RAM).unwrap();
    let att_a = attach_ivshmem(&vm_a, dev_a, shm.clone(), DoorbellPath::Kvm).unwrap();
    vm_a.load_program(&sender_program(1)).unwrap();
    vm_a.start().unwrap();

    let dev_b =
        IvshmemDevice::new_doorbell(SHM_SIZE as u64, 1, Box::new(bus.join(1).unwrap()), false)
            .unwrap();
    let changes = att_a.device.lock().unwrap().process_link_events().unwrap();
    assert_eq!(changes, vec![PeerChange::Joined { id: 1, vectors: 1 }]);
    vm_a.refresh_ioevents().unwrap();

    let mut vm_b = TestVm::new(RAM).unwrap();
    let att_b = attach_ivshmem(&vm_b, dev_b, shm.clone(), DoorbellPath::Kvm).unwrap();
    vm_b.load_program(&receiver_program(0)).unwrap();
    vm_b.start().unwrap();

    assert_eq!(
        vm_b.wait_exit(TIMEOUT).unwrap(),
        0,
        "B reports {:x?}",
        vm_b.reports()
    );
    assert_eq!(
        vm_a.wait_exit(TIMEOUT).unwrap(),
        0,
        "A reports {:x?}",
        vm_a.reports()
    );
    assert_eq!(vm_b.reports(), vec![1, PAYLOAD, 1]);
    assert_eq!(vm_a.reports(), vec![0, 1]);
    assert_eq!(vm_a.mmio_exits_at(IVSHMEM_BAR0 + REG_DOORBELL), 0);
    assert_eq!(vm_b.mmio_exits_at(IVSHMEM_BAR0 + REG_DOORBELL), 0);

    drop(vm_b);
    drop(att_b);
    let changes = att_a.device.lock().unwrap().process_link_events().unwrap();
    assert_eq!(changes, vec![PeerChange::Left { id: 1 }]);
    vm_a.refresh_ioevents().unwrap();
    // Only A's own (id 0, vector 0) doorbell remains.
    let left: Vec<u64> = att_a
        .device
        .lock()
        .unwrap()
        .ioevents()
        .iter()
        .map(|e| e.datamatch)
        .collect();
    assert_eq!(left, vec![0]);
}

/// A peer leaves and a new peer gets its id (the server's `lowest-free` ids, reused at once:
/// `id_reuse = "immediate"`, for regions whose peers handle reuse, as this device model does)
/// before the VMM re-syncs its ioeventfds: the doorbell for that id must reach the *new* peer's eventfd,
/// not the old one the registry still holds (the descriptor number is usually the same).
#[test]
fn doorbell_reaches_a_new_peer_that_reuses_an_id() {
    if !kvm_or_skip("doorbell_reaches_a_new_peer_that_reuses_an_id") {
        return;
    }
    let base = std::env::temp_dir().join(format!("ivshm-vmm-reuse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let text = format!(
        "root = {:?}\n[[region]]\nname = \"r\"\nsize = \"1M\"\nvectors = 1\nid_policy = \"lowest-free\"\n\
         id_reuse = \"immediate\"\n[vm.vm0]\n",
        base.join("root").display().to_string()
    );
    let path = base.join("ivshm.toml");
    let config = ivshm_server::config_file::parse(&text, &path).unwrap();
    let server = ServerHandle::spawn(config).unwrap();
    let socket = base.join("root").join("vm0").join("r.sock");
    let opts = ConnectOptions {
        timeout: TIMEOUT,
        ..ConnectOptions::default()
    };
    let a = Peer::connect(&socket, opts.clone()).unwrap();
    let b = Peer::connect(&socket, opts.clone()).unwrap();
    assert_eq!((a.id(), b.id()), (0, 1));
    let shm = Arc::new(a.map().unwrap());
    let dev_a = IvshmemDevice::new_doorbell(SHM_SIZE as u64, 1, Box::new(a), true).unwrap();

    let mut vm_a = TestVm::new(RAM).unwrap();
    let att_a = attach_ivshmem(&vm_a, dev_a, shm, DoorbellPath::Kvm).unwrap();
    let changes_until = |want: &[PeerChange]| {
        let deadline = std::time::Instant::now() + TIMEOUT;
        let mut seen = Vec::new();
        while !want.iter().all(|w| seen.contains(w)) {
            assert!(std::time::Instant::now() < deadline, "A saw only {seen:?}");
            seen.extend(att_a.device.lock().unwrap().process_link_events().unwrap());
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    changes_until(&[PeerChange::Joined { id: 1, vectors: 1 }]);
    vm_a.refresh_ioevents().unwrap();

    // B leaves, C arrives with id 1; the VMM processes both before re-syncing once.
    drop(b);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let c = loop {
        let c = Peer::connect(&socket, opts.clone()).unwrap();
        if c.id() == 1 {
            break c;
        }
        // The server has not seen B's hang-up yet.
        drop(c);
        assert!(std::time::Instant::now() < deadline, "id 1 never freed");
        std::thread::sleep(Duration::from_millis(10));
    };
    changes_until(&[
        PeerChange::Left { id: 1 },
        PeerChange::Joined { id: 1, vectors: 1 },
    ]);
    vm_a.refresh_ioevents().unwrap();

    let mut prog = Asm::new(PROGRAM_BASE);
    ivshmem_guest_prologue(&mut prog, 1);
    prog.store_ind_imm(Reg::Ebx, REG_DOORBELL as u32, 1 << 16)
        .exit(0);
    vm_a.load_program(&prog.finish().unwrap()).unwrap();
    vm_a.start().unwrap();
    assert_eq!(
        vm_a.wait_exit(TIMEOUT).unwrap(),
        0,
        "reports {:x?}",
        vm_a.reports()
    );

    let bell = c.own_vector_fd(0).unwrap();
    let mut fds = [rustix::event::PollFd::new(
        &bell,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::time::Timespec {
        tv_sec: TIMEOUT.as_secs() as i64,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&timeout)).unwrap();
    assert_eq!(
        ivshm_vmm::ivshmem::link::drain_eventfd(bell).unwrap(),
        1,
        "the new peer 1 was not rung"
    );
    assert_eq!(vm_a.mmio_exits_at(IVSHMEM_BAR0 + REG_DOORBELL), 0);
    drop(vm_a);
    drop(att_a);
    drop(c);
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&base);
}

/// Reports the guest's interrupt counters of MSI-X vectors 0..3.
fn report_vector_counters(a: &mut Asm) {
    for v in 0..3u32 {
        a.load(
            Reg::Eax,
            INTR_COUNTERS + 4 * (u32::from(IVSHMEM_VECTOR_BASE) + v),
        )
        .report(Reg::Eax);
    }
}

/// Three vectors per peer: A rings B's vector 2, B rings A's vector 1. Each guest's
/// handler for exactly that vector runs (the datamatch picks the (peer, vector) eventfd,
/// the vector's irqfd/MSI-X entry picks the guest vector); on the KVM path with no exit.
fn three_vector_flow(path: DoorbellPath) {
    let shm = shared_region();
    let bus = LocalDoorbellBus::new();
    let mut dev_a =
        IvshmemDevice::new_doorbell(SHM_SIZE as u64, 3, Box::new(bus.join(3).unwrap()), true)
            .unwrap();
    let dev_b =
        IvshmemDevice::new_doorbell(SHM_SIZE as u64, 3, Box::new(bus.join(3).unwrap()), false)
            .unwrap();
    dev_a.process_link_events().unwrap();

    let mut a = Asm::new(PROGRAM_BASE);
    ivshmem_guest_prologue(&mut a, 3);
    wait_for_ready_flag(&mut a);
    a.store_ind_imm(Reg::Ebx, REG_DOORBELL as u32, (1 << 16) | 2)
        .mov_imm(Reg::Edi, 1)
        .wait_interrupts(IVSHMEM_VECTOR_BASE + 1, Reg::Edi, "wait_v1");
    report_vector_counters(&mut a);
    a.exit(0);

    let mut b = Asm::new(PROGRAM_BASE);
    ivshmem_guest_prologue(&mut b, 3);
    b.store_ind_imm(Reg::Esi, 0, 1)
        .mov_imm(Reg::Edi, 1)
        .wait_interrupts(IVSHMEM_VECTOR_BASE + 2, Reg::Edi, "wait_v2");
    report_vector_counters(&mut b);
    b.store_ind_imm(Reg::Ebx, REG_DOORBELL as u32, 1).exit(0);

    let mut vm_a = TestVm::new(RAM).unwrap();
    let mut vm_b = TestVm::new(RAM).unwrap();
    let att_a = attach_ivshmem(&vm_a, dev_a, shm.clone(), path).unwrap();
    let att_b = attach_ivshmem(&vm_b, dev_b, shm, path).unwrap();
    // Both ends register one ioeventfd per (peer, vector): 2 peers x 3 vectors.
    assert_eq!(att_a.device.lock().unwrap().ioevents().len(), 6);
    assert_eq!(att_b.device.lock().unwrap().ioevents().len(), 6);
    vm_a.load_program(&a.finish().unwrap()).unwrap();
    vm_b.load_program(&b.finish().unwrap()).unwrap();
    run_receiver_then_sender(&mut vm_a, &mut vm_b);
    // IVPosition, then the counters of vectors 0, 1, 2.
    assert_eq!(vm_b.reports(), vec![1, 0, 0, 1]);
    assert_eq!(vm_a.reports(), vec![0, 0, 1, 0]);
    let exits = vm_a.mmio_exits_at(IVSHMEM_BAR0 + REG_DOORBELL)
        + vm_b.mmio_exits_at(IVSHMEM_BAR0 + REG_DOORBELL);
    assert_eq!(exits, if path == DoorbellPath::Kvm { 0 } else { 2 });
}

#[test]
fn three_vectors_each_reach_their_own_handler_via_ioeventfd_and_irqfd() {
    if !kvm_or_skip("three_vectors_each_reach_their_own_handler_via_ioeventfd_and_irqfd") {
        return;
    }
    three_vector_flow(DoorbellPath::Kvm);
}

#[test]
fn three_vectors_each_reach_their_own_handler_via_register_callbacks() {
    if !kvm_or_skip("three_vectors_each_reach_their_own_handler_via_register_callbacks") {
        return;
    }
    three_vector_flow(DoorbellPath::Trapped);
}

/// The GSI router hands out GSIs from FIRST_MSI_GSI, reuses released ones, and KVM accepts
/// the routing table it builds.
#[test]
fn gsis_are_released_and_reused_and_kvm_takes_the_table() {
    if !kvm_or_skip("gsis_are_released_and_reused_and_kvm_takes_the_table") {
        return;
    }
    let vm = Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let router = KvmGsiRouter::new(vm);
    let a = router.allocate_gsi().unwrap();
    let b = router.allocate_gsi().unwrap();
    assert_eq!((a, b), (FIRST_MSI_GSI, FIRST_MSI_GSI + 1));
    let msg = MsixMessage {
        addr: 0xfee0_0000,
        data: 0x41,
    };
    router.set_route(a, Some(msg)).unwrap();
    router.set_route(b, Some(msg)).unwrap();
    router.release_gsi(a).unwrap();
    assert_eq!(router.allocate_gsi().unwrap(), a, "released GSI reused");
    assert_eq!(router.allocate_gsi().unwrap(), FIRST_MSI_GSI + 2);
}
