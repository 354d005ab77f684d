//! Guest-to-guest doorbell round trip, in one run, through
//! * the in-kernel path: ioeventfd on BAR0+12 and irqfd routed to the MSI-X message, and
//! * the trapped path: the Doorbell write exits to the VMM, the device model rings the
//!   peer's eventfd, a VMM thread on the peer side injects the MSI with KVM_SIGNAL_MSI,
//!
//! and reports the ratio of the medians of 5 alternating runs each.
//! `cargo bench -p ivshm-vmm --bench doorbell_round_trip`; `IVSHM_BENCH_ROUNDS` sets the
//! number of round trips per run (default 2000).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ivshm_mem::Mapping;
use ivshm_testvmm::asm::{Asm, Cond, Reg};
use ivshm_testvmm::guest::{GuestOps, PROGRAM_BASE};
use ivshm_testvmm::{
    attach_ivshmem, ivshmem_guest_prologue, kvm_available, DoorbellPath, TestVm, IVSHMEM_BAR0,
    IVSHMEM_VECTOR_BASE,
};
use ivshm_vmm::ivshmem::{IvshmemDevice, LocalDoorbellBus, REG_DOORBELL};

const SHM_SIZE: usize = 1 << 20;
const START: u32 = 0x5747_0001;
const END: u32 = 0x5747_0002;

/// Pinger (peer 0): wait for the ponger's ready flag, then `rounds` times: ring peer 1,
/// sleep until our interrupt count reaches the round number. Reports START and END.
fn pinger(rounds: u32) -> Vec<u8> {
    let mut a = Asm::new(PROGRAM_BASE);
    ivshmem_guest_prologue(&mut a, 1);
    a.spin_until_word(Reg::Esi, 0, 1, "wait_ready")
        .report_imm(START)
        .mov_imm(Reg::Edi, 0)
        .label("round")
        .add_imm(Reg::Edi, 1)
        .store_ind_imm(Reg::Ebx, REG_DOORBELL as u32, 1 << 16)
        .wait_interrupts(IVSHMEM_VECTOR_BASE, Reg::Edi, "pong")
        .cmp_imm(Reg::Edi, rounds)
        .jcc(Cond::B, "round")
        .report_imm(END)
        .exit(0);
    a.finish().expect("pinger assembles")
}

/// Ponger (peer 1): set the ready flag, then `rounds` times: sleep until rung, ring back.
fn ponger(rounds: u32) -> Vec<u8> {
    let mut a = Asm::new(PROGRAM_BASE);
    ivshmem_guest_prologue(&mut a, 1);
    a.store_ind_imm(Reg::Esi, 0, 1)
        .mov_imm(Reg::Edi, 0)
        .label("round")
        .add_imm(Reg::Edi, 1)
        .wait_interrupts(IVSHMEM_VECTOR_BASE, Reg::Edi, "ping")
        .store_ind_imm(Reg::Ebx, REG_DOORBELL as u32, 0)
        .cmp_imm(Reg::Edi, rounds)
        .jcc(Cond::B, "round")
        .exit(0);
    a.finish().expect("ponger assembles")
}

struct Run {
    per_round_trip: Duration,
    doorbell_exits: u64,
}

fn run(path: DoorbellPath, rounds: u32) -> Result<Run, String> {
    let fd = rustix::fs::memfd_create("ivshm-bench", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| e.to_string())?;
    rustix::fs::ftruncate(&fd, SHM_SIZE as u64).map_err(|e| e.to_string())?;
    let shm = Arc::new(Mapping::map_fd(fd.as_fd(), 0, SHM_SIZE).map_err(|e| e.to_string())?);
    let bus = LocalDoorbellBus::new();
    let link_a = bus.join(1).map_err(|e| e.to_string())?;
    let link_b = bus.join(1).map_err(|e| e.to_string())?;
    let mut dev_a = IvshmemDevice::new_doorbell(SHM_SIZE as u64, 1, Box::new(link_a), false)
        .map_err(|e| e.to_string())?;
    let dev_b = IvshmemDevice::new_doorbell(SHM_SIZE as u64, 1, Box::new(link_b), false)
        .map_err(|e| e.to_string())?;
    dev_a.process_link_events().map_err(|e| e.to_string())?;
    let mut vm_a = TestVm::new(2 << 20).map_err(|e| e.to_string())?;
    let mut vm_b = TestVm::new(2 << 20).map_err(|e| e.to_string())?;
    let _att_a = attach_ivshmem(&vm_a, dev_a, shm.clone(), path).map_err(|e| e.to_string())?;
    let _att_b = attach_ivshmem(&vm_b, dev_b, shm, path).map_err(|e| e.to_string())?;
    vm_a.load_program(&pinger(rounds))
        .map_err(|e| e.to_string())?;
    vm_b.load_program(&ponger(rounds))
        .map_err(|e| e.to_string())?;
    vm_b.start().map_err(|e| e.to_string())?;
    vm_a.start().map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(300);
    vm_a.wait_exit(timeout)
        .map_err(|e| format!("pinger: {e}"))?;
    vm_b.wait_exit(timeout)
        .map_err(|e| format!("ponger: {e}"))?;
    let reports = vm_a.timed_reports();
    let at = |marker: u32| -> Result<Instant, String> {
        reports
            .iter()
            .find(|r| r.0 == marker)
            .map(|r| r.1)
            .ok_or_else(|| format!("no {marker:#x} report"))
    };
    let elapsed = at(END)? - at(START)?;
    let doorbell = IVSHMEM_BAR0 + REG_DOORBELL;
    Ok(Run {
        per_round_trip: elapsed / rounds,
        doorbell_exits: vm_a.mmio_exits_at(doorbell) + vm_b.mmio_exits_at(doorbell),
    })
}

fn main() {
    if !kvm_available() {
        if std::env::var("IVSHM_REQUIRE_KVM").as_deref() == Ok("1") {
            eprintln!("doorbell_round_trip: IVSHM_REQUIRE_KVM=1 but /dev/kvm is not usable");
            std::process::exit(1);
        }
        eprintln!("SKIPPED: doorbell_round_trip: /dev/kvm is not available");
        return;
    }
    let rounds: u32 = std::env::var("IVSHM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(2000);
    // Alternate the paths and take each one's median, so a burst of load on the shared
    // machine does not decide the ratio.
    const REPEATS: usize = 5;
    let paths = [
        ("ioeventfd/irqfd (in-kernel)", DoorbellPath::Kvm),
        ("trapped to the VMM", DoorbellPath::Trapped),
    ];
    let mut samples: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut exits = [0u64; 2];
    for _ in 0..REPEATS {
        for (i, (name, path)) in paths.iter().enumerate() {
            match run(*path, rounds) {
                Ok(r) => {
                    samples[i].push(r.per_round_trip);
                    exits[i] = r.doorbell_exits;
                }
                Err(e) => {
                    eprintln!("{name}: failed: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    let mut medians = [Duration::ZERO; 2];
    for (i, (name, _)) in paths.iter().enumerate() {
        samples[i].sort();
        medians[i] = samples[i][REPEATS / 2];
        let all: Vec<String> = samples[i]
            .iter()
            .map(|d| format!("{:.1}", d.as_secs_f64() * 1e6))
            .collect();
        println!(
            "{name:<28} {:>8.2} us per round trip (median of {REPEATS}: {} us), {} doorbell exits to the VMM per run",
            medians[i].as_secs_f64() * 1e6,
            all.join(" "),
            exits[i]
        );
    }
    let ratio = medians[1].as_secs_f64() / medians[0].as_secs_f64();
    println!("{rounds} round trips per run; trapped / in-kernel = {ratio:.2}x (medians)");
}
