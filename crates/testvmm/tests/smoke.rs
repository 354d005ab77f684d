//! The test VMM itself: a guest reports values, takes a self-sent MSI in its IDT handler,
//! and exits; two VMs run at once.

use std::time::Duration;

use ivshm_testvmm::asm::{Asm, Reg};
use ivshm_testvmm::guest::{GuestOps, INTR_COUNTERS, PROGRAM_BASE};
use ivshm_testvmm::{kvm_or_skip, TestVm};

const TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn guest_reports_and_exits() {
    if !kvm_or_skip("guest_reports_and_exits") {
        return;
    }
    let mut vm = TestVm::new(2 << 20).unwrap();
    let mut a = Asm::new(PROGRAM_BASE);
    a.report_imm(0x1234_5678).report_imm(7).exit(42);
    vm.load_program(&a.finish().unwrap()).unwrap();
    vm.start().unwrap();
    assert_eq!(vm.wait_exit(TIMEOUT).unwrap(), 42);
    assert_eq!(vm.reports(), vec![0x1234_5678, 7]);
}

fn wait_reports(vm: &TestVm, n: usize) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while vm.reports().len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "guest sent {:x?}, expected {n} reports",
            vm.reports()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn two_vms_take_injected_msis_in_their_handlers() {
    if !kvm_or_skip("two_vms_take_injected_msis_in_their_handlers") {
        return;
    }
    let mut vms: Vec<TestVm> = (0..2).map(|_| TestVm::new(2 << 20).unwrap()).collect();
    for (i, vm) in vms.iter_mut().enumerate() {
        // Report the VM index, then the vector 0x50 counter after each of two interrupts.
        let mut a = Asm::new(PROGRAM_BASE);
        a.enable_lapic()
            .report_imm(i as u32)
            .mov_imm(Reg::Edi, 1)
            .wait_interrupts(0x50, Reg::Edi, "wait1")
            .load(Reg::Eax, INTR_COUNTERS + 4 * 0x50)
            .report(Reg::Eax)
            .mov_imm(Reg::Edi, 2)
            .wait_interrupts(0x50, Reg::Edi, "wait2")
            .load(Reg::Eax, INTR_COUNTERS + 4 * 0x50)
            .report(Reg::Eax)
            .exit(0);
        vm.load_program(&a.finish().unwrap()).unwrap();
        vm.start().unwrap();
    }
    let msi = kvm_bindings::kvm_msi {
        address_lo: 0xfee0_0000,
        data: 0x50,
        ..Default::default()
    };
    // Both VMs run at once; each interrupt is sent only after the guest reported the
    // previous step, so none can coalesce.
    for step in 1..=2 {
        for vm in &vms {
            wait_reports(vm, step);
            vm.vm_fd().signal_msi(msi).unwrap();
        }
    }
    for (i, vm) in vms.iter().enumerate() {
        assert_eq!(vm.wait_exit(TIMEOUT).unwrap(), 0);
        assert_eq!(vm.reports(), vec![i as u32, 1, 2]);
    }
}
