//! Guest memory layout, boot structures (GDT, IDT, interrupt stubs) and program helpers
//! for the test VMM's flat 32-bit protected-mode guests.
//!
//! Layout (guest-physical, RAM from 0):
//!
//! | address | contents |
//! |---|---|
//! | `0x0500` | GDT: null, flat code (selector 0x08), flat data (0x10) |
//! | `0x1000` | IDT, 256 interrupt gates |
//! | `0x2000` | interrupt counters, one `u32` per vector (`INTR_COUNTERS + 4 * vector`) |
//! | `0x2800` | program variables ([`VARS`]) |
//! | `0x3000` | interrupt stubs written by [`boot_image`] |
//! | `0x8000` | handlers a test installs in place of a stub ([`handler_address`], 64 bytes per vector) |
//! | `0x10000` | the test program ([`PROGRAM_BASE`]) |
//! | `0x80000` | top of stack |
//!
//! Exception vectors 0..31 report `0xE000_0000 | vector` on the exit port and halt.
//! Vectors 32..255 increment their counter, write the LAPIC EOI register and return,
//! so the guest observes each interrupt in memory and needs no registers saved.
//!
//! The stubs return with `retf 4` (pop EIP and CS, drop the saved EFLAGS) instead of
//! `iretd`: on hosts where KVM runs these guests through its instruction emulator (for
//! example the `kvm_pvm` module, which has no hardware virtualization for non-PVM guests)
//! protected-mode IRET is not emulated and stops the VM with an internal error. The
//! handler thus returns with interrupts disabled; test programs enable interrupts only in
//! their `sti; hlt` waits ([`GuestOps::wait_interrupts`]), which re-enable them anyway.

use crate::asm::{Asm, AsmError, Cond, Reg};

/// GDT address.
pub const GDT_BASE: u32 = 0x500;
/// IDT address.
pub const IDT_BASE: u32 = 0x1000;
/// Interrupt counters: `u32` per vector.
pub const INTR_COUNTERS: u32 = 0x2000;
/// Program variables (scratch space for test programs).
pub const VARS: u32 = 0x2800;
/// Interrupt stubs.
pub const STUBS_BASE: u32 = 0x3000;
/// Installed handlers ([`handler_address`]).
pub const HANDLERS_BASE: u32 = 0x8000;
/// Room for one installed handler.
pub const HANDLER_SIZE: u32 = 0x40;
/// Program load address and entry point.
pub const PROGRAM_BASE: u32 = 0x1_0000;
/// Initial stack pointer.
pub const STACK_TOP: u32 = 0x8_0000;
/// Flat code selector.
pub const CODE_SELECTOR: u16 = 0x08;
/// Flat data selector.
pub const DATA_SELECTOR: u16 = 0x10;

/// Local APIC base (default, enabled at reset for the BSP).
pub const LAPIC_BASE: u32 = 0xfee0_0000;
/// LAPIC spurious-interrupt vector register; bit 8 software-enables the APIC.
pub const LAPIC_SVR: u32 = LAPIC_BASE + 0xf0;
/// LAPIC end-of-interrupt register.
pub const LAPIC_EOI: u32 = LAPIC_BASE + 0xb0;
/// In-kernel IOAPIC: index register (IOREGSEL); the data window (IOWIN) is at +0x10.
pub const IOAPIC_BASE: u32 = 0xfec0_0000;
/// MSI address targeting APIC ID 0, physical destination mode.
pub const MSI_ADDRESS: u32 = 0xfee0_0000;

/// Port: each 32-bit `out` appends a value to the VM's report list.
pub const PORT_REPORT: u16 = 0x510;
/// Port: a 32-bit `out` ends the guest with that exit code.
pub const PORT_EXIT: u16 = 0x514;
/// PCI configuration address port.
pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
/// PCI configuration data port.
pub const PCI_CONFIG_DATA: u16 = 0xcfc;

/// Exit code reported by exception stubs: `EXCEPTION_EXIT | vector`.
pub const EXCEPTION_EXIT: u32 = 0xe000_0000;

/// Flat 4 GiB code segment descriptor (present, ring 0, exec/read, accessed, 32-bit, 4K).
const GDT_CODE: u64 = 0x00cf_9b00_0000_ffff;
/// Flat 4 GiB data segment descriptor (present, ring 0, read/write, accessed).
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;

/// The boot structures: `(guest address, bytes)` pieces to copy into guest RAM.
pub fn boot_image() -> Result<Vec<(u32, Vec<u8>)>, AsmError> {
    let mut gdt = Vec::new();
    for d in [0u64, GDT_CODE, GDT_DATA] {
        gdt.extend_from_slice(&d.to_le_bytes());
    }
    let mut stubs = Asm::new(STUBS_BASE);
    let mut entries = Vec::with_capacity(256);
    for vector in 0..256u32 {
        entries.push(stubs.here());
        if vector < 32 {
            stubs
                .mov_imm(Reg::Eax, EXCEPTION_EXIT | vector)
                .mov_imm(Reg::Edx, u32::from(PORT_EXIT))
                .out_dx_eax()
                .hlt();
        } else {
            stubs
                .inc_mem(INTR_COUNTERS + 4 * vector)
                .store_imm(LAPIC_EOI, 0)
                // `retf 4` = iret without restoring EFLAGS (see the module docs).
                .retf_imm(4);
        }
    }
    let stub_code = stubs.finish()?;
    let idt: Vec<u8> = entries.into_iter().flat_map(idt_gate).collect();
    Ok(vec![
        (GDT_BASE, gdt),
        (IDT_BASE, idt),
        (STUBS_BASE, stub_code),
    ])
}

/// A 32-bit interrupt gate to `handler`: offset 15..0, selector, 0, type 0x8e, offset 31..16.
pub fn idt_gate(handler: u32) -> [u8; 8] {
    let [o0, o1, o2, o3] = handler.to_le_bytes();
    let [s0, s1] = CODE_SELECTOR.to_le_bytes();
    [o0, o1, s0, s1, 0, 0x8e, o2, o3]
}

/// Where [`crate::TestVm::install_handler`] puts the handler of `vector`.
pub fn handler_address(vector: u8) -> u32 {
    HANDLERS_BASE + HANDLER_SIZE * u32::from(vector)
}

/// The IOAPIC redirection entry (low dword) for IDT `vector` on APIC ID 0, fixed delivery,
/// physical destination, active high; `level` triggered or edge, `masked` or not.
pub fn ioapic_redirection(vector: u8, level: bool, masked: bool) -> u32 {
    u32::from(vector) | (u32::from(level) << 15) | (u32::from(masked) << 16)
}

/// What QNX's `InterruptAttachEvent()` does in the kernel when the interrupt comes (its
/// handler for `vector`, assembled for [`handler_address`]): count it, mask IOAPIC input `pin`
/// (programmed `level` or edge), EOI, return — the interrupt stays masked until the program
/// has handled it and unmasks the pin (`InterruptUnmask()`, [`GuestOps::route_ioapic_pin`]).
pub fn masking_handler(vector: u8, pin: u8, level: bool) -> Result<Vec<u8>, AsmError> {
    let redirection = 0x10 + 2 * u32::from(pin);
    let mut a = Asm::new(handler_address(vector));
    a.inc_mem(INTR_COUNTERS + 4 * u32::from(vector))
        .store_imm(IOAPIC_BASE, redirection)
        .store_imm(IOAPIC_BASE + 0x10, ioapic_redirection(vector, level, true))
        .store_imm(LAPIC_EOI, 0)
        // `retf 4` = iret without restoring EFLAGS (see the module docs).
        .retf_imm(4);
    a.finish()
}

/// Configuration address for bus 0, `device`, function 0, register `reg` (dword index).
pub fn pci_config_address(device: u8, reg: u8) -> u32 {
    0x8000_0000 | (u32::from(device & 0x1f) << 11) | (u32::from(reg) << 2)
}

/// Program-building helpers on top of [`Asm`] (they clobber EAX and EDX).
pub trait GuestOps {
    /// `eax = config[device].reg`
    fn pci_read(&mut self, device: u8, reg: u8) -> &mut Self;
    /// `config[device].reg = eax` (uses ECX as scratch)
    fn pci_write_eax(&mut self, device: u8, reg: u8) -> &mut Self;
    /// Appends register `r` to the VM's reports.
    fn report(&mut self, r: Reg) -> &mut Self;
    /// Appends an immediate to the VM's reports.
    fn report_imm(&mut self, v: u32) -> &mut Self;
    /// Ends the guest with `code`.
    fn exit(&mut self, code: u32) -> &mut Self;
    /// Software-enables the local APIC (SVR = 0x1ff).
    fn enable_lapic(&mut self) -> &mut Self;
    /// Spins (with `pause`) until the `u32` at `[base + offset]` equals `value`: how a guest
    /// waits for a flag another VM or the host writes in shared memory. Clobbers EAX.
    /// `label` must be unique in the program.
    fn spin_until_word(&mut self, base: Reg, offset: u32, value: u32, label: &str) -> &mut Self;
    /// Routes IOAPIC input `pin` to IDT `vector` on APIC ID 0: fixed delivery, physical
    /// destination, edge-triggered, active high, unmasked. Clobbers no register.
    fn route_ioapic_pin(&mut self, pin: u8, vector: u8) -> &mut Self {
        self.route_ioapic_pin_as(pin, vector, false)
    }
    /// [`route_ioapic_pin`](Self::route_ioapic_pin), `level`-triggered or edge (a PCI INTx#
    /// line is level-triggered and, on KVM's IOAPIC, active high). Also what unmasks a pin a
    /// [`masking_handler`] masked.
    fn route_ioapic_pin_as(&mut self, pin: u8, vector: u8, level: bool) -> &mut Self;
    /// [`route_ioapic_pin_as`](Self::route_ioapic_pin_as) for the IOAPIC input whose number
    /// is in register `pin` (not EAX) at run time, e.g. the PCI Interrupt Line a guest read.
    /// Clobbers EAX.
    fn route_ioapic_pin_in(&mut self, pin: Reg, vector: u8, level: bool) -> &mut Self;
    /// Waits with `sti; hlt` until the counter of `vector` reaches the value in `target`
    /// (a register other than EAX). `label` must be unique in the program.
    fn wait_interrupts(&mut self, vector: u8, target: Reg, label: &str) -> &mut Self;
}

impl GuestOps for Asm {
    fn pci_read(&mut self, device: u8, reg: u8) -> &mut Self {
        self.mov_imm(Reg::Edx, u32::from(PCI_CONFIG_ADDRESS))
            .mov_imm(Reg::Eax, pci_config_address(device, reg))
            .out_dx_eax()
            .mov_imm(Reg::Edx, u32::from(PCI_CONFIG_DATA))
            .in_eax_dx()
    }

    fn pci_write_eax(&mut self, device: u8, reg: u8) -> &mut Self {
        self.mov(Reg::Ecx, Reg::Eax)
            .mov_imm(Reg::Edx, u32::from(PCI_CONFIG_ADDRESS))
            .mov_imm(Reg::Eax, pci_config_address(device, reg))
            .out_dx_eax()
            .mov_imm(Reg::Edx, u32::from(PCI_CONFIG_DATA))
            .mov(Reg::Eax, Reg::Ecx)
            .out_dx_eax()
    }

    fn report(&mut self, r: Reg) -> &mut Self {
        if r != Reg::Eax {
            self.mov(Reg::Eax, r);
        }
        self.mov_imm(Reg::Edx, u32::from(PORT_REPORT)).out_dx_eax()
    }

    fn report_imm(&mut self, v: u32) -> &mut Self {
        self.mov_imm(Reg::Eax, v).report(Reg::Eax)
    }

    fn exit(&mut self, code: u32) -> &mut Self {
        self.mov_imm(Reg::Eax, code)
            .mov_imm(Reg::Edx, u32::from(PORT_EXIT))
            .out_dx_eax()
            .hlt()
    }

    fn enable_lapic(&mut self) -> &mut Self {
        self.store_imm(LAPIC_SVR, 0x1ff)
    }

    fn spin_until_word(&mut self, base: Reg, offset: u32, value: u32, label: &str) -> &mut Self {
        let done = format!("{label}_done");
        self.label(label)
            .load_ind(Reg::Eax, base, offset)
            .cmp_imm(Reg::Eax, value)
            .jcc(Cond::E, &done)
            .pause()
            .jmp(label)
            .label(&done)
    }

    fn route_ioapic_pin_as(&mut self, pin: u8, vector: u8, level: bool) -> &mut Self {
        let redirection = 0x10 + 2 * u32::from(pin);
        self.store_imm(IOAPIC_BASE, redirection + 1)
            .store_imm(IOAPIC_BASE + 0x10, 0)
            .store_imm(IOAPIC_BASE, redirection)
            .store_imm(IOAPIC_BASE + 0x10, ioapic_redirection(vector, level, false))
    }

    fn route_ioapic_pin_in(&mut self, pin: Reg, vector: u8, level: bool) -> &mut Self {
        // IOREGSEL = 0x10 + 2 * pin (the low dword of the pin's redirection entry).
        self.mov(Reg::Eax, pin)
            .add(Reg::Eax, pin)
            .add_imm(Reg::Eax, 0x11)
            .store(IOAPIC_BASE, Reg::Eax)
            .store_imm(IOAPIC_BASE + 0x10, 0)
            .add_imm(Reg::Eax, 0xffff_ffff)
            .store(IOAPIC_BASE, Reg::Eax)
            .store_imm(IOAPIC_BASE + 0x10, ioapic_redirection(vector, level, false))
    }

    fn wait_interrupts(&mut self, vector: u8, target: Reg, label: &str) -> &mut Self {
        let done = format!("{label}_done");
        // cli before the check and `sti; hlt` after it: an interrupt arriving after the
        // check is held until `hlt` starts (sti's one-instruction shadow), so no wakeup
        // is lost.
        self.label(label)
            .cli()
            .load(Reg::Eax, INTR_COUNTERS + 4 * u32::from(vector))
            .cmp(Reg::Eax, target)
            .jcc(Cond::Ae, &done)
            .sti()
            .hlt()
            .jmp(label)
            .label(&done)
            .sti()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idt_gates_point_at_stubs() {
        let image = boot_image().unwrap();
        let idt = &image.iter().find(|(a, _)| *a == IDT_BASE).unwrap().1;
        assert_eq!(idt.len(), 2048);
        let gate = &idt[0x40 * 8..0x41 * 8];
        let offset = u32::from(u16::from_le_bytes([gate[0], gate[1]]))
            | (u32::from(u16::from_le_bytes([gate[6], gate[7]])) << 16);
        assert!(offset >= STUBS_BASE);
        assert_eq!(u16::from_le_bytes([gate[2], gate[3]]), CODE_SELECTOR);
        assert_eq!(gate[5], 0x8e);
        let stubs = &image.iter().find(|(a, _)| *a == STUBS_BASE).unwrap().1;
        let stub = &stubs[(offset - STUBS_BASE) as usize..];
        // inc dword [INTR_COUNTERS + 0x100]
        assert_eq!(&stub[..6], &[0xff, 0x05, 0x00, 0x21, 0x00, 0x00]);
        assert!(stubs.len() + STUBS_BASE as usize <= PROGRAM_BASE as usize);
    }

    #[test]
    fn installed_handlers_fit_and_gates_point_at_them() {
        let handler = masking_handler(0xff, 23, true).unwrap();
        assert!(handler.len() <= HANDLER_SIZE as usize, "{}", handler.len());
        assert!(handler_address(0xff) + HANDLER_SIZE <= PROGRAM_BASE);
        assert!(HANDLERS_BASE >= STUBS_BASE + boot_image().unwrap()[2].1.len() as u32);
        let gate = idt_gate(0x1234_5678);
        assert_eq!(gate, [0x78, 0x56, 0x08, 0x00, 0x00, 0x8e, 0x34, 0x12]);
        assert_eq!(ioapic_redirection(0x60, true, true), 0x0001_8060);
        assert_eq!(ioapic_redirection(0x60, false, false), 0x60);
    }

    #[test]
    fn config_address() {
        assert_eq!(pci_config_address(1, 4), 0x8000_0810);
    }
}
