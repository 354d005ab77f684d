//! One test VM: KVM VM with an in-kernel irqchip, memfd-backed RAM at guest address 0,
//! one vCPU started in flat 32-bit protected mode on its own thread, and a
//! [`PciPlatform`].

use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ivshm_mem::{Mapping, SharedView};
use kvm_bindings::{kvm_segment, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::asm::AsmError;
use crate::guest::{
    boot_image, CODE_SELECTOR, DATA_SELECTOR, GDT_BASE, IDT_BASE, PORT_EXIT, PORT_REPORT,
    PROGRAM_BASE, STACK_TOP,
};
use crate::platform::{PciPlatform, PlatformError, SharedPciDevice};
use ivshm_vmm::ivshmem::kvm::{set_memory_slot, KvmGsiRouter};

/// Errors from the test VMM.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum VmmError {
    /// opening /dev/kvm: {0}
    ///
    /// `/dev/kvm` could not be opened.
    NoKvm(kvm_ioctls::Error),
    /// KVM {op}: {error}
    ///
    /// A KVM call failed.
    Kvm {
        /// What was attempted.
        op: &'static str,
        /// The error.
        error: kvm_ioctls::Error,
    },
    /// {op}: {error}
    ///
    /// A system call failed.
    Sys {
        /// What was attempted.
        op: &'static str,
        /// The error.
        error: rustix::io::Errno,
    },
    /// {0}
    ///
    /// Mapping memory failed.
    Map(ivshm_mem::MapError),
    /// guest image does not fit in RAM
    ///
    /// Guest program does not fit or is out of bounds.
    ImageTooLarge,
    /// {0}
    ///
    /// Assembling the boot image failed.
    Asm(AsmError),
    /// {0}
    ///
    /// The platform failed.
    Platform(PlatformError),
    /// timed out after {0:?} waiting for the guest
    ///
    /// The VM did not finish in time.
    Timeout(Duration),
    /// guest failed: {0}
    ///
    /// The guest stopped abnormally.
    GuestFailed(String),
    /// guest_shm interrupt: {0}
    ///
    /// Wiring a `guest_shm` device's interrupt into KVM failed.
    GuestShmInterrupt(ivshm_vmm::ivshmem::kvm::KvmWiringError),
    /// VM already started
    ///
    /// The VM was already started.
    AlreadyStarted,
    /// lock poisoned
    ///
    /// A lock was poisoned by a panicking thread.
    Poisoned,
    /// no free IOAPIC input for a device line (16..=23 are in use)
    ///
    /// IOAPIC inputs 16..=23 are all in use.
    NoIrqPin,
    /// IOAPIC input {0} is in use or not in 0..=23
    ///
    /// The IOAPIC input a configuration names is in use or does not exist.
    IrqPinTaken(u32),
}

impl From<ivshm_mem::MapError> for VmmError {
    fn from(error: ivshm_mem::MapError) -> Self {
        Self::Map(error)
    }
}

impl From<AsmError> for VmmError {
    fn from(error: AsmError) -> Self {
        Self::Asm(error)
    }
}

impl From<PlatformError> for VmmError {
    fn from(error: PlatformError) -> Self {
        Self::Platform(error)
    }
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |error| VmmError::Kvm { op, error }
}

/// How a guest run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest wrote this code to the exit port.
    Code(u32),
    /// The vCPU stopped for another reason (triple fault, entry failure, stop request).
    Failed(String),
}

#[derive(Debug, Default)]
struct RunState {
    reports: Vec<(u32, Instant)>,
    exit: Option<GuestExit>,
}

#[derive(Debug, Default)]
struct VmShared {
    state: Mutex<RunState>,
    changed: Condvar,
    stop: AtomicBool,
}

impl VmShared {
    fn finish(&self, exit: GuestExit) {
        if let Ok(mut st) = self.state.lock() {
            st.exit.get_or_insert(exit);
        }
        self.changed.notify_all();
    }
}

/// A VM under test.
pub struct TestVm {
    vm: Arc<VmFd>,
    platform: Arc<Mutex<PciPlatform>>,
    router: Arc<KvmGsiRouter>,
    shared: Arc<VmShared>,
    vcpu: Option<VcpuFd>,
    thread: Option<JoinHandle<()>>,
    /// IOAPIC inputs handed to device lines.
    irq_pins: Mutex<Vec<u32>>,
    /// Declared last: dropped after the vCPU stopped and this VM's handles on the VM fd.
    ram: Mapping,
}

impl std::fmt::Debug for TestVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestVm")
            .field("ram", &self.ram.len())
            .finish_non_exhaustive()
    }
}

/// Signal used to kick a vCPU out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn ignore_signal(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), VmmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), ignore_signal) {
            result = Err(VmmError::Sys {
                op: "installing the vCPU kick signal handler",
                error: rustix::io::Errno::from_raw_os_error(e.errno()),
            });
        }
    });
    result
}

/// True when `/dev/kvm` can be opened.
pub fn kvm_available() -> bool {
    Kvm::new().is_ok()
}

/// Environment variable that turns a missing `/dev/kvm` from a skip into a failure.
pub const REQUIRE_KVM_ENV: &str = "IVSHM_REQUIRE_KVM";

/// For KVM tests: true when KVM is usable. Otherwise prints `SKIPPED: <test>: ...` to the
/// process's stderr (not captured by the test harness) and returns false — or panics when `IVSHM_REQUIRE_KVM=1` (as CI sets it).
pub fn kvm_or_skip(test: &str) -> bool {
    if kvm_available() {
        return true;
    }
    if std::env::var(REQUIRE_KVM_ENV).as_deref() == Ok("1") {
        panic!("{test}: {REQUIRE_KVM_ENV}=1 but /dev/kvm is not usable");
    }
    // Straight to the process's stderr: libtest captures `eprintln!` of passing tests,
    // and a skip must be seen.
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED: {test}: /dev/kvm is not available (set {REQUIRE_KVM_ENV}=1 to fail instead)"
    );
    false
}

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl TestVm {
    /// A VM with `ram_size` bytes of RAM (at least 1 MiB) and the boot structures loaded.
    pub fn new(ram_size: usize) -> Result<TestVm, VmmError> {
        if ram_size < (1 << 20) {
            return Err(VmmError::ImageTooLarge);
        }
        install_kick_handler()?;
        let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;

        let memfd = rustix::fs::memfd_create("ivshm-test-vm-ram", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|error| VmmError::Sys {
                op: "memfd_create",
                error,
            })?;
        rustix::fs::ftruncate(&memfd, ram_size as u64).map_err(|error| VmmError::Sys {
            op: "ftruncate",
            error,
        })?;
        let ram = Mapping::map_fd(memfd.as_fd(), 0, ram_size)?;
        // SAFETY: `ram` is owned by the TestVm; its Drop stops the vCPU before `ram` (the last
        // field) is unmapped, so no guest access reaches the range afterwards (KVM itself
        // tolerates unmapped slot memory).
        unsafe { set_memory_slot(&vm, 0, 0, &ram, ram_size as u64) }
            .map_err(|e| VmmError::Platform(e.into()))?;

        let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        sregs.cs = flat_segment(CODE_SELECTOR, 0xb);
        let data = flat_segment(DATA_SELECTOR, 0x3);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = u64::from(GDT_BASE);
        sregs.gdt.limit = 3 * 8 - 1;
        sregs.idt.base = u64::from(IDT_BASE);
        sregs.idt.limit = 256 * 8 - 1;
        // Protected mode, no paging; ET set as on real hardware.
        sregs.cr0 = 0x11;
        sregs.cr4 = 0;
        sregs.efer = 0;
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rip = u64::from(PROGRAM_BASE);
        regs.rsp = u64::from(STACK_TOP);
        regs.rflags = 0x2;
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let _ = &mut vcpu;

        let router = Arc::new(KvmGsiRouter::new(vm.clone()));
        let platform = Arc::new(Mutex::new(PciPlatform::new(vm.clone(), 1)));
        let tvm = TestVm {
            vm,
            platform,
            router,
            shared: Arc::new(VmShared::default()),
            vcpu: Some(vcpu),
            thread: None,
            irq_pins: Mutex::new(Vec::new()),
            ram,
        };
        for (addr, bytes) in boot_image()? {
            tvm.write_ram(addr, &bytes)?;
        }
        Ok(tvm)
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The VM's GSI routing table owner.
    pub fn gsi_router(&self) -> &Arc<KvmGsiRouter> {
        &self.router
    }

    /// Guest RAM as seen from the host.
    pub fn ram(&self) -> SharedView<'_> {
        self.ram.view()
    }

    /// Copies `bytes` into guest RAM at `addr`.
    pub fn write_ram(&self, addr: u32, bytes: &[u8]) -> Result<(), VmmError> {
        self.ram
            .view()
            .write(addr as usize, bytes)
            .map_err(|_| VmmError::ImageTooLarge)
    }

    /// Loads the test program at [`PROGRAM_BASE`] (the entry point).
    pub fn load_program(&self, code: &[u8]) -> Result<(), VmmError> {
        if PROGRAM_BASE as usize + code.len() > STACK_TOP as usize - 0x1000 {
            return Err(VmmError::ImageTooLarge);
        }
        self.write_ram(PROGRAM_BASE, code)
    }

    /// Plugs a PCI device in (see [`PciPlatform::add_device`]); returns its device number.
    pub fn add_pci_device(
        &self,
        device: SharedPciDevice,
        ram_bars: Vec<(usize, Arc<Mapping>)>,
        ioeventfds: bool,
    ) -> Result<u8, VmmError> {
        Ok(self
            .platform
            .lock()
            .map_err(|_| VmmError::Poisoned)?
            .add_device(device, ram_bars, ioeventfds)?)
    }

    /// Plugs a PCI device in at device number `number` (see [`PciPlatform::add_device_at`]).
    pub fn add_pci_device_at(
        &self,
        number: u8,
        device: SharedPciDevice,
        ram_bars: Vec<(usize, Arc<Mapping>)>,
        ioeventfds: bool,
    ) -> Result<u8, VmmError> {
        Ok(self
            .platform
            .lock()
            .map_err(|_| VmmError::Poisoned)?
            .add_device_at(number, device, ram_bars, ioeventfds)?)
    }

    /// An IOAPIC input for a level-triggered device line (PCI INTx#): 16..=23, the pins that do
    /// not also reach the (uninitialised) PIC, each handed out once per VM.
    pub fn allocate_irq_pin(&self) -> Result<u32, VmmError> {
        let mut used = self.irq_pins.lock().map_err(|_| VmmError::Poisoned)?;
        let pin = (16..=23)
            .find(|pin| !used.contains(pin))
            .ok_or(VmmError::NoIrqPin)?;
        used.push(pin);
        Ok(pin)
    }

    /// Marks IOAPIC input `pin` as used (a line the configuration names).
    pub fn claim_irq_pin(&self, pin: u32) -> Result<(), VmmError> {
        let mut used = self.irq_pins.lock().map_err(|_| VmmError::Poisoned)?;
        if pin > 23 || used.contains(&pin) {
            return Err(VmmError::IrqPinTaken(pin));
        }
        used.push(pin);
        Ok(())
    }

    /// Writes `handler` (machine code assembled for [`handler_address`]`(vector)`, at most
    /// [`HANDLER_SIZE`] bytes) into guest RAM and points IDT vector `vector` at it, replacing
    /// the default counting stub, e.g. with [`guest::masking_handler`].
    ///
    /// [`handler_address`]: crate::guest::handler_address
    /// [`HANDLER_SIZE`]: crate::guest::HANDLER_SIZE
    /// [`guest::masking_handler`]: crate::guest::masking_handler
    pub fn install_handler(&self, vector: u8, handler: &[u8]) -> Result<(), VmmError> {
        if handler.len() > crate::guest::HANDLER_SIZE as usize {
            return Err(VmmError::ImageTooLarge);
        }
        let at = crate::guest::handler_address(vector);
        self.write_ram(at, handler)?;
        self.write_ram(
            IDT_BASE + 8 * u32::from(vector),
            &crate::guest::idt_gate(at),
        )
    }

    /// Adds a handler for MMIO outside PCI BARs.
    pub fn add_mmio_handler(
        &self,
        handler: crate::platform::SharedMmioHandler,
    ) -> Result<(), VmmError> {
        self.platform
            .lock()
            .map_err(|_| VmmError::Poisoned)?
            .add_mmio_handler(handler);
        Ok(())
    }

    /// Re-registers device ioevents (after doorbell peers changed).
    pub fn refresh_ioevents(&self) -> Result<(), VmmError> {
        Ok(self
            .platform
            .lock()
            .map_err(|_| VmmError::Poisoned)?
            .refresh_ioevents()?)
    }

    /// MMIO exits seen at `addr` so far.
    pub fn mmio_exits_at(&self, addr: u64) -> u64 {
        self.platform.lock().map_or(0, |p| p.mmio_exits_at(addr))
    }

    /// Starts the vCPU thread.
    pub fn start(&mut self) -> Result<(), VmmError> {
        let vcpu = self.vcpu.take().ok_or(VmmError::AlreadyStarted)?;
        let platform = self.platform.clone();
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("ivshm-test-vcpu".into())
            .spawn(move || run_vcpu(vcpu, &platform, &shared))
            .map_err(|e| VmmError::Sys {
                op: "spawning the vCPU thread",
                error: rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::AGAIN),
            })?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Values the guest reported so far.
    pub fn reports(&self) -> Vec<u32> {
        self.shared
            .state
            .lock()
            .map(|s| s.reports.iter().map(|r| r.0).collect())
            .unwrap_or_default()
    }

    /// Waits until the guest reported at least `n` values (or exited); returns them all.
    pub fn wait_reports(&self, n: usize, timeout: Duration) -> Result<Vec<u32>, VmmError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state.lock().map_err(|_| VmmError::Poisoned)?;
        loop {
            if st.reports.len() >= n {
                return Ok(st.reports.iter().map(|r| r.0).collect());
            }
            match &st.exit {
                Some(GuestExit::Code(c)) => {
                    return Err(VmmError::GuestFailed(format!(
                        "exited with {c:#x} after reporting {:x?}",
                        st.reports.iter().map(|r| r.0).collect::<Vec<_>>()
                    )))
                }
                Some(GuestExit::Failed(why)) => return Err(VmmError::GuestFailed(why.clone())),
                None => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmmError::GuestFailed(format!(
                    "reported only {:x?} of {n} values in {timeout:?}",
                    st.reports.iter().map(|r| r.0).collect::<Vec<_>>()
                )));
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .map_err(|_| VmmError::Poisoned)?
                .0;
        }
    }

    /// Values the guest reported so far, with the host time each arrived.
    pub fn timed_reports(&self) -> Vec<(u32, Instant)> {
        self.shared
            .state
            .lock()
            .map(|s| s.reports.clone())
            .unwrap_or_default()
    }

    /// Waits until the guest exits; returns its exit code, or an error on failure/timeout.
    pub fn wait_exit(&self, timeout: Duration) -> Result<u32, VmmError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state.lock().map_err(|_| VmmError::Poisoned)?;
        loop {
            match &st.exit {
                Some(GuestExit::Code(c)) => return Ok(*c),
                Some(GuestExit::Failed(why)) => return Err(VmmError::GuestFailed(why.clone())),
                None => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmmError::Timeout(timeout));
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .map_err(|_| VmmError::Poisoned)?
                .0;
        }
    }

    /// Stops the vCPU (if running) and joins its thread.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // A kick can land just before the thread enters KVM_RUN; repeat until it ends.
            for _ in 0..1000 {
                if t.is_finished() {
                    break;
                }
                let _ = t.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(2));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::error!("vCPU thread did not stop; leaking it");
            }
        }
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_vcpu(mut vcpu: VcpuFd, platform: &Mutex<PciPlatform>, shared: &VmShared) {
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            shared.finish(GuestExit::Failed("stopped by the host".into()));
            return;
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                shared.finish(GuestExit::Failed(format!("KVM_RUN: {e}")));
                return;
            }
        };
        match exit {
            VcpuExit::IoOut(port, data) => {
                if port == PORT_REPORT || port == PORT_EXIT {
                    let mut b = [0u8; 4];
                    let n = data.len().min(4);
                    b[..n].copy_from_slice(&data[..n]);
                    let v = u32::from_le_bytes(b);
                    if port == PORT_EXIT {
                        shared.finish(GuestExit::Code(v));
                        return;
                    }
                    if let Ok(mut st) = shared.state.lock() {
                        st.reports.push((v, Instant::now()));
                    }
                    shared.changed.notify_all();
                    continue;
                }
                let Ok(mut p) = platform.lock() else {
                    shared.finish(GuestExit::Failed("platform lock poisoned".into()));
                    return;
                };
                if let Err(e) = p.pio_write(port, data) {
                    shared.finish(GuestExit::Failed(format!("port {port:#x} write: {e}")));
                    return;
                }
            }
            VcpuExit::IoIn(port, data) => {
                let handled = platform.lock().is_ok_and(|mut p| p.pio_read(port, data));
                if !handled {
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                if let Ok(mut p) = platform.lock() {
                    p.mmio_read(addr, data);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                if let Ok(mut p) = platform.lock() {
                    p.mmio_write(addr, data);
                }
            }
            VcpuExit::Intr => continue,
            VcpuExit::Hlt => {
                shared.finish(GuestExit::Failed("unexpected HLT exit".into()));
                return;
            }
            VcpuExit::Shutdown => {
                let rip = vcpu.get_regs().map_or(0, |r| r.rip);
                shared.finish(GuestExit::Failed(format!(
                    "shutdown (triple fault) near rip {rip:#x}"
                )));
                return;
            }
            other => {
                let mut what = format!("{other:?}");
                if what == "InternalError" {
                    let run = vcpu.get_kvm_run();
                    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // active union member.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    let n = (internal.ndata as usize).min(internal.data.len());
                    what = format!(
                        "InternalError suberror {} data {:x?}",
                        internal.suberror,
                        &internal.data[..n]
                    );
                }
                let rip = vcpu.get_regs().map_or(0, |r| r.rip);
                shared.finish(GuestExit::Failed(format!(
                    "unexpected exit {what} at rip {rip:#x}"
                )));
                return;
            }
        }
    }
}
