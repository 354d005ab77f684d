//! How a rust-vmm based VMM wires the device models in, using only `kvm-ioctls` and
//! `vm-device` (no test VMM): an `ivshmem-doorbell` device with its doorbells as KVM
//! ioeventfds and its vectors as irqfds routed to their MSI-X messages, and a QNX
//! `guest_shm` device in MMIO mode. Guest accesses are simulated through the
//! `vm-device` bus, exactly as a VMM's MMIO-exit handler would forward them.
//!
//! ```sh
//! cargo run -p ivshm-vmm --example vmm_wiring                       # in-process peers
//! cargo run -p ivshm-vmm --example vmm_wiring -- /tmp/ivshmem_socket # a server's v0 socket
//! ```
//!
//! `cargo test -p ivshm-vmm` builds this example, so the wiring below always compiles
//! against the current API. It needs `/dev/kvm` to run.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ivshm_client::{ConnectOptions, Peer};
use ivshm_mem::Mapping;
use ivshm_policy::VmPolicy;
use ivshm_vmm::adapters::{GuestShmMmio, PciBarMmio};
use ivshm_vmm::guest_shm::{
    GuestShmDevice, GuestShmMode, KvmRegionWindows, LocalRegionRegistry, RegionWindowMapper,
};
use ivshm_vmm::ivshmem::kvm::{
    dup_eventfd, set_memory_slot, KvmGsiRouter, KvmIoeventRegistry, KvmIrqfdInterrupts,
};
use ivshm_vmm::ivshmem::link::ring_eventfd;
use ivshm_vmm::ivshmem::{DoorbellLink, IvshmemDevice, LocalDoorbellBus, REG_IV_POSITION};
use ivshm_vmm::pci::PciDevice;
use kvm_ioctls::{Kvm, VmFd};
use vm_device::bus::{MmioAddress, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};

type Error = Box<dyn std::error::Error>;

/// Where this VMM's PCI allocator put the ivshmem BARs.
const BAR0: u64 = 0xc000_0000;
const BAR1: u64 = 0xc000_1000;
const BAR2: u64 = 0xd000_0000;
/// The guest_shm factory page (`loc`) and where region windows go.
const GUEST_SHM_LOC: u64 = 0x1b00_0000;
const GUEST_SHM_WINDOWS: std::ops::Range<u64> = 0xe000_0000..0xf000_0000;
/// KVM memory slots: 0 is guest RAM in a real VMM.
const BAR2_SLOT: u32 = 1;
const FIRST_WINDOW_SLOT: u32 = 8;

/// ivshmem-doorbell: returns the device (for the VMM's exit handlers) and the
/// ioeventfd registry (re-sync it after BAR moves and peer changes).
fn wire_ivshmem(
    vm: &Arc<VmFd>,
    router: &Arc<KvmGsiRouter>,
    io: &mut IoManager,
    link: Box<dyn DoorbellLink>,
    shm: &Arc<Mapping>,
) -> Result<(Arc<Mutex<IvshmemDevice>>, KvmIoeventRegistry), Error> {
    let vectors = link.own_vector_count().max(1);
    let size = shm.len() as u64;
    let mut dev = IvshmemDevice::new_doorbell(size, vectors, link, false)?;
    dev.set_bar_addr(0, BAR0);
    dev.set_bar_addr(1, BAR1);
    dev.set_bar_addr(2, BAR2);
    // Interrupts: each own vector's eventfd is an irqfd on its own GSI, routed to the
    // vector's MSI-X message while the guest leaves it unmasked.
    let own: Vec<BorrowedFd<'_>> = (0..vectors).filter_map(|v| dev.own_vector_fd(v)).collect();
    let backend = KvmIrqfdInterrupts::new(router.clone(), &own)?;
    dev.set_interrupt_backend(Box::new(backend));
    // Doorbells: one ioeventfd per (peer, vector) on BAR0 + 12 with datamatch.
    let mut ioevents = KvmIoeventRegistry::new(vm.clone());
    ioevents.sync(&dev.ioevents())?;
    // BAR2 is the shared memory itself.
    // SAFETY: `shm` is an Arc the caller keeps (in `main`) for as long as the VM exists.
    unsafe { set_memory_slot(vm, BAR2_SLOT, BAR2, shm, size) }?;
    // BAR0 and BAR1 trap: the bus forwards them to the device.
    let dev = Arc::new(Mutex::new(dev));
    io.register_mmio(
        MmioRange::new(MmioAddress(BAR0), 0x100)?,
        Arc::new(PciBarMmio::new(dev.clone(), 0)),
    )?;
    io.register_mmio(
        MmioRange::new(MmioAddress(BAR1), 0x1000)?,
        Arc::new(PciBarMmio::new(dev.clone(), 1)),
    )?;
    // A real VMM also routes config-space accesses of this function to
    // dev.read_config_register / write_config_register, moves the BAR2 slot and the bus
    // ranges on a returned BarRelocation, and calls ioevents.sync(&dev.ioevents()) after
    // it and after dev.process_link_events() reports peer changes (when
    // dev.link().event_fd() becomes readable).
    Ok((dev, ioevents))
}

/// Places `guest_shm` region windows with [`KvmRegionWindows`] (control page unbacked, data
/// pages in a KVM slot) and registers each control page on the bus, where it traps to the
/// device.
struct BusWindowMapper {
    windows: KvmRegionWindows,
    io: Arc<Mutex<IoManager>>,
    device: Arc<Mutex<Option<GuestShmMmio>>>,
}

impl RegionWindowMapper for BusWindowMapper {
    fn map_region(&mut self, memory: &Arc<Mapping>, pages: u32) -> Result<u64, String> {
        let control = self.windows.map_region(memory, pages)?;
        // The control page traps: register it on the bus for the device.
        let handler = self.device.lock().map_err(|e| e.to_string())?.take();
        if let Some(handler) = handler {
            let range = MmioRange::new(MmioAddress(control), 4096).map_err(|e| e.to_string())?;
            let mut io = self.io.lock().map_err(|e| e.to_string())?;
            io.register_mmio(range, Arc::new(handler))
                .map_err(|e| e.to_string())?;
        }
        Ok(control)
    }

    fn unmap_region(&mut self, control_addr: u64) {
        self.windows.unmap_region(control_addr);
    }
}

fn main() -> Result<(), Error> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm is needed to run this example: {e}"))?;
    let vm = Arc::new(kvm.create_vm()?);
    vm.create_irq_chip()?;
    // One GSI router per VM, shared by every device that uses irqfds.
    let router = Arc::new(KvmGsiRouter::new(vm.clone()));
    let mut io = IoManager::new();

    // --- ivshmem: a v0 peer of a server, or an in-process peer pair. ---
    type Links = (
        Box<dyn DoorbellLink>,
        Option<Box<dyn DoorbellLink>>,
        Mapping,
    );
    let (link, remote, shm): Links = match std::env::args().nth(1) {
        Some(socket) => {
            let peer = Peer::connect(socket.as_ref(), ConnectOptions::default())?;
            let shm = peer.map()?; // the server's region
            (Box::new(peer), None, shm)
        }
        None => {
            let bus = LocalDoorbellBus::new();
            let ours = bus.join(1)?;
            let remote = bus.join(1)?;
            let fd = rustix::fs::memfd_create("ivshmem", rustix::fs::MemfdFlags::CLOEXEC)?;
            rustix::fs::ftruncate(&fd, 1 << 20)?;
            let shm = Mapping::map_fd(fd.as_fd(), 0, 1 << 20)?;
            (Box::new(ours), Some(Box::new(remote)), shm)
        }
    };
    let shm = Arc::new(shm);
    let (dev, ioevents) = wire_ivshmem(&vm, &router, &mut io, link, &shm)?;
    dev.lock()
        .map_err(|_| "device lock poisoned")?
        .process_link_events()?;
    let mut ioevents = ioevents;
    ioevents.sync(&dev.lock().map_err(|_| "device lock poisoned")?.ioevents())?;
    println!("ivshmem: {} doorbell ioeventfds registered", ioevents.len());

    // What the guest driver does, through the bus: read IVPosition, program MSI-X vector 0
    // (address, data, unmask) and enable MSI-X in config space.
    let mut ivpos = [0u8; 4];
    io.mmio_read(MmioAddress(BAR0 + REG_IV_POSITION), &mut ivpos)?;
    println!("ivshmem: IVPosition {}", u32::from_le_bytes(ivpos));
    io.mmio_write(MmioAddress(BAR1), &0xfee0_0000u32.to_le_bytes())?;
    io.mmio_write(MmioAddress(BAR1 + 8), &0x41u32.to_le_bytes())?;
    io.mmio_write(MmioAddress(BAR1 + 12), &0u32.to_le_bytes())?;
    {
        let mut d = dev.lock().map_err(|_| "device lock poisoned")?;
        // The MSI-X capability is the first one, at 0x40; message control is at +2.
        d.write_config_register(0x40 / 4, 2, &0x8000u16.to_le_bytes());
    }

    // A peer rings our vector 0: KVM's irqfd consumes the eventfd and injects the MSI
    // without the VMM (nothing here reads it).
    if let Some(remote) = remote {
        let own = dup_own_vector(&dev)?;
        let bell = remote
            .peer_vector_fd(0, 0)
            .ok_or("remote does not know peer 0")?;
        ring_eventfd(bell)?;
        let deadline = Instant::now() + Duration::from_secs(1);
        while readable(own.as_fd()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        println!(
            "ivshmem: remote doorbell {} by KVM's irqfd",
            if readable(own.as_fd()) {
                "NOT consumed"
            } else {
                "consumed"
            }
        );
    }

    // --- guest_shm in MMIO mode (`vdev shmem loc 0x1b000000 intr ioapic:5`). ---
    let policy = VmPolicy::parse_qnx("vdev shmem loc 0x1b000000 intr ioapic:5")?;
    let (mode, intr) = GuestShmMode::from_policy(&policy);
    let registry = LocalRegionRegistry::new(256); // or ServerFactory::new(<vm>/factory.sock, ..)
    let io = Arc::new(Mutex::new(io));
    let handler_slot = Arc::new(Mutex::new(None));
    let mapper = BusWindowMapper {
        windows: KvmRegionWindows::new(vm.clone(), GUEST_SHM_WINDOWS, FIRST_WINDOW_SLOT),
        io: io.clone(),
        device: handler_slot.clone(),
    };
    let line = intr.unwrap_or(5);
    let gs = GuestShmDevice::new(
        mode,
        line, // the factory page's `vector`
        Box::new(registry.factory(policy)),
        Box::new(mapper),
    )?;
    // Its one interrupt: an irqfd on the GSI of the `intr` line (IOAPIC pin 5 here).
    vm.register_irqfd(&dup_eventfd(gs.interrupt_fd())?, line)?;
    let gs = Arc::new(Mutex::new(gs));
    let loc = match mode {
        GuestShmMode::Mmio { loc } => loc,
        GuestShmMode::Pci => GUEST_SHM_LOC,
    };
    {
        let mut bus = io.lock().map_err(|_| "bus lock poisoned")?;
        bus.register_mmio(
            MmioRange::new(MmioAddress(loc), 4096)?,
            Arc::new(GuestShmMmio::new(gs.clone())),
        )?;
    }
    // Each control page registers a new bus range; hand the mapper a handler for it.
    *handler_slot.lock().map_err(|_| "lock poisoned")? = Some(GuestShmMmio::new(gs.clone()));

    // The guest: name, then size (create), then status and shmem. The factory request runs
    // inside the bus write; don't hold the bus lock (the mapper registers the control page).
    let guest_write = |addr: u64, v: &[u8]| -> Result<(), Error> {
        let bus = io.lock().map_err(|_| "bus lock poisoned")?;
        let device = bus
            .mmio_device(MmioAddress(addr))
            .map(|(_, d)| d.clone())
            .ok_or("no device at address")?;
        drop(bus);
        device.mmio_write(MmioAddress(loc), addr - loc, v);
        Ok(())
    };
    guest_write(loc + 0x1c, b"demo\0\0\0\0")?;
    guest_write(loc + 0x18, &2u32.to_le_bytes())?;
    let mut b4 = [0u8; 4];
    let mut b8 = [0u8; 8];
    {
        let bus = io.lock().map_err(|_| "bus lock poisoned")?;
        bus.mmio_read(MmioAddress(loc + 0x14), &mut b4)?;
        bus.mmio_read(MmioAddress(loc + 0x08), &mut b8)?;
    }
    let shmem = u64::from_le_bytes(b8);
    println!(
        "guest_shm: status {} (GSS_OK is 0), control page at {shmem:#x}",
        u32::from_le_bytes(b4)
    );
    let bus = io.lock().map_err(|_| "bus lock poisoned")?;
    bus.mmio_read(MmioAddress(shmem + 4), &mut b4)?;
    println!("guest_shm: idx {}", u32::from_le_bytes(b4));
    Ok(())
}

/// A duplicate of the device's own vector 0 eventfd (to watch it).
fn dup_own_vector(dev: &Mutex<IvshmemDevice>) -> Result<OwnedFd, Error> {
    let d = dev.lock().map_err(|_| "device lock poisoned")?;
    Ok(d.own_vector_fd(0)
        .ok_or("no vector 0")?
        .try_clone_to_owned()?)
}

/// True when an eventfd has a count to read.
fn readable(fd: BorrowedFd<'_>) -> bool {
    let mut p = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    matches!(rustix::event::poll(&mut p, Some(&rustix::time::Timespec::default())), Ok(n) if n > 0)
}
