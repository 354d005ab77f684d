//! Issue 3 end to end: the guest library through `ivshm guest` in two q35 + intel-iommu guests
//! (VFIO, MSI-X doorbells to eventfds in guest user space) and a host `ivshm listen` peer, all
//! on `ivshm serve` with 4 vectors.
//!
//! Checks: guest A rings guest B on vector 2 and B's `wait` (on all vectors) reports exactly
//! vector 2; B answers A; the host rings each guest and each guest rings the host; 1,000
//! ping-pong round trips between the guests with none lost (`ivshm guest bench`, inside the
//! guests), and 1,000 between a guest and a host peer; data written by one guest is read by
//! the other and by the host; restoring the driver binding; a second command on a device a
//! `wait` holds fails at once without disturbing it; and the sysfs mode (memory, ringing,
//! polling doorbells). A second test boots an `ivshmem-plain` guest without an IOMMU: sysfs by
//! default, memory shared with the host file, and the real kernel's "no IOMMU group" and "no
//! interrupts" cases explained.

use std::time::Duration;

use ivshm_e2e::guest_tool::{
    finish_wait, notify, read_hex, start_wait, vfio_doorbell_guest, write_hex,
};
use ivshm_e2e::host::run_to_completion;
use ivshm_e2e::ivshm::{ivshm_command, read_shared};
use ivshm_e2e::{require_e2e, IvshmListener, IvshmServer, QemuGuest, ScratchDir};
use ivshm_e2e::{HostProcess, Stream};

const BOOT: Duration = Duration::from_secs(240);
const HOST: Duration = Duration::from_secs(60);
const COMMAND: Duration = Duration::from_secs(60);
/// Bound on every background `ivshm guest` command in the guests (they end themselves).
const GUEST_WAIT: Duration = Duration::from_secs(120);
const GUEST_WAIT_SECONDS: u64 = GUEST_WAIT.as_secs();
/// How long such a command may take to end.
const FINISH: Duration = Duration::from_secs(GUEST_WAIT_SECONDS + 60);
/// Bound on 1,000 bench round trips under TCG.
const BENCH: Duration = Duration::from_secs(600);
const SIZE: u64 = 1 << 20;
const VECTORS: u32 = 4;

fn host_notify(socket: &std::path::Path, peer: u16, vector: u32) {
    let mut command = ivshm_command(["notify", "--socket"]).unwrap();
    command
        .arg(socket)
        .args(["--peer", &peer.to_string(), "--vector", &vector.to_string()]);
    run_to_completion("ivshm notify", command, HOST).unwrap();
}

/// Runs 1,000 `ivshm guest bench` round trips from `guest` to `peer` on `vector` (flag at
/// `offset`); returns the report, which must show no lost doorbell.
fn bench_round_trips(guest: &mut QemuGuest, peer: u16, vector: u32, offset: u32) -> String {
    let command = format!(
        "ivshm guest bench --peer {peer} --vector {vector} --offset {offset:#x} --count 1000 \
         --timeout {GUEST_WAIT_SECONDS}"
    );
    let bench = guest.run_ok(&command, BENCH).unwrap();
    eprintln!("{} bench:\n{bench}", guest.name());
    assert!(
        bench.contains("doorbell round_trips=1000 lost=0"),
        "{bench}"
    );
    bench
}

#[test]
fn guests_ring_each_other_and_the_host_through_vfio_and_sysfs() {
    let assets = require_e2e!();
    let dir = ScratchDir::new().unwrap();
    let socket = dir.join("ivshm.sock");
    let mut server =
        IvshmServer::start(&socket, &["--vectors", "4", "--size", "1M"], HOST).unwrap();
    let listener = IvshmListener::start(&socket, HOST).unwrap();
    let host_id = listener.id();
    assert_eq!(listener.vectors(), VECTORS);

    let mut a = vfio_doorbell_guest(&assets, "guest-vfio-a", &socket, VECTORS)
        .spawn()
        .unwrap();
    let (id_a, _) = listener.wait_join(HOST).unwrap();
    let mut b = vfio_doorbell_guest(&assets, "guest-vfio-b", &socket, VECTORS)
        .spawn()
        .unwrap();
    let (id_b, _) = listener.wait_join(HOST).unwrap();
    a.wait_ready(BOOT).unwrap();
    b.wait_ready(BOOT).unwrap();

    // Discovery: one doorbell device with 4 vectors behind an IOMMU, no driver yet.
    let list = a.run_ok("ivshm guest list", COMMAND).unwrap();
    let line = list.lines().next().unwrap_or_default().to_string();
    assert!(
        line.contains(" 1af4:1110 ivshmem-doorbell driver=none iommu_group=")
            && line.ends_with(&format!("vectors={VECTORS} size={SIZE}")),
        "{list}"
    );
    let info = b.run_ok("ivshm guest info", COMMAND).unwrap();
    assert!(info.contains(&format!("\nid={id_b}\n")), "{info}");
    assert!(info.contains("msix vectors=4"), "{info}");

    // A rings B on vector 2; B waits on all vectors and sees exactly vector 2.
    let wait_b = start_wait(&mut b, "b-wait-1", id_b, "--count 1", GUEST_WAIT).unwrap();
    // While B's wait holds the device through VFIO, a second command in B fails at once and
    // says why, in both modes, and leaves the wait's binding and interrupts alone.
    let busy = b
        .run(
            &format!("ivshm guest notify --peer {id_a} --vector 0"),
            COMMAND,
        )
        .unwrap();
    assert!(
        busy.status != 0
            && busy
                .output
                .contains("is busy: another process has this device open"),
        "{}",
        busy.output
    );
    let claimed = b
        .run(
            &format!("ivshm guest notify --mode sysfs --peer {id_a} --vector 0"),
            COMMAND,
        )
        .unwrap();
    assert!(
        claimed.status != 0 && claimed.output.contains("the kernel refuses to map"),
        "{}",
        claimed.output
    );
    let listed = b.run_ok("ivshm guest list", COMMAND).unwrap();
    assert!(listed.contains("driver=vfio-pci"), "{listed}");
    notify(&mut a, id_b, 2, COMMAND).unwrap();
    let doorbells = finish_wait(&mut b, wait_b, FINISH).unwrap();
    assert_eq!(doorbells, ["doorbell vector=2"]);

    // B answers A on vector 1.
    let wait_a = start_wait(&mut a, "a-wait-1", id_a, "--count 1", GUEST_WAIT).unwrap();
    notify(&mut b, id_a, 1, COMMAND).unwrap();
    let doorbells = finish_wait(&mut a, wait_a, FINISH).unwrap();
    assert_eq!(doorbells, ["doorbell vector=1"]);

    // The host rings each guest.
    for (guest, id, vector) in [(&mut a, id_a, 3), (&mut b, id_b, 0)] {
        let wait = start_wait(guest, "host-ring", id, "--count 1", GUEST_WAIT).unwrap();
        host_notify(&socket, id, vector);
        let doorbells = finish_wait(guest, wait, FINISH).unwrap();
        assert_eq!(doorbells, [format!("doorbell vector={vector}")]);
    }

    // Each guest rings the host.
    notify(&mut a, host_id, 1, COMMAND).unwrap();
    listener.wait_doorbell(1, HOST).unwrap();
    notify(&mut b, host_id, 2, COMMAND).unwrap();
    listener.wait_doorbell(2, HOST).unwrap();

    // Out-of-range vectors are refused clearly.
    let refused = a
        .run("ivshm guest wait --vector 4 --timeout 5", COMMAND)
        .unwrap();
    assert_ne!(refused.status, 0);
    assert!(
        refused.output.contains("vector 4 is out of range"),
        "{}",
        refused.output
    );

    // Data written by one guest is read by the other (and the host).
    let data = "00112233445566778899aabbccddeeff";
    write_hex(&mut a, 0x1000, data, COMMAND).unwrap();
    assert_eq!(read_hex(&mut b, 0x1000, 16, COMMAND).unwrap(), data);
    assert_eq!(
        read_shared(&socket, 0x1000, 16, HOST).unwrap(),
        (0u8..16).map(|i| i * 0x11).collect::<Vec<_>>()
    );

    // 1,000 round trips between the guests, inside the guests; a lost doorbell fails the run.
    let respond = format!(
        "ivshm guest bench --respond --peer {id_a} --vector 2 --offset 0x8000 \
         --timeout {GUEST_WAIT_SECONDS}"
    );
    let responder = b.spawn_background("bench-respond", &respond).unwrap();
    responder
        .wait_output(&mut b, &format!("self id={id_b}"), COMMAND)
        .unwrap();
    let bench = bench_round_trips(&mut a, id_b, 2, 0x8000);
    assert!(bench.contains("polling round_trips=1000"), "{bench}");
    assert!(bench.contains("ratio doorbell/polling="), "{bench}");
    let responded = responder.finish(&mut b, FINISH).unwrap();
    assert_eq!(responded.status, 0, "{}", responded.output);
    assert!(
        responded
            .output
            .contains("responded doorbells=1001 polls=1000"),
        "{}",
        responded.output
    );

    // Guest ↔ host round trips: a host peer answers A with the same protocol.
    let mut command = ivshm_command(["guest", "bench", "--socket"]).unwrap();
    command.arg(&socket).args([
        "--respond",
        "--peer",
        &id_a.to_string(),
        "--vector",
        "3",
        "--offset",
        "0x9000",
        "--timeout",
        &GUEST_WAIT_SECONDS.to_string(),
    ]);
    let mut host_responder = HostProcess::spawn("ivshm guest bench --socket", command).unwrap();
    let self_line = host_responder
        .wait_line(Stream::Stdout, "the `self` line", HOST, |l| {
            l.starts_with("self id=")
        })
        .unwrap();
    let host_bench_id: u16 = self_line
        .trim_start_matches("self id=")
        .split(' ')
        .next()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no id in {self_line:?}"));
    listener.wait_join(HOST).unwrap();
    bench_round_trips(&mut a, host_bench_id, 3, 0x9000);
    host_responder.wait_success(HOST).unwrap();
    assert!(
        host_responder
            .lines(Stream::Stdout)
            .iter()
            .any(|l| l == "responded doorbells=1001 polls=1000"),
        "{}",
        host_responder.failure_context()
    );

    // Restoring the driver: the device had none, so it ends unbound again.
    let listed = b.run_ok("ivshm guest list", COMMAND).unwrap();
    assert!(listed.contains("driver=vfio-pci"), "{listed}");
    b.run_ok(
        "ivshm guest read --offset 0 --len 4 --restore-driver",
        COMMAND,
    )
    .unwrap();
    let listed = b.run_ok("ivshm guest list", COMMAND).unwrap();
    assert!(listed.contains("driver=none"), "{listed}");
    // Also when the command fails: a wait that times out still gives the device back.
    let timed_out = b
        .run(
            "ivshm guest wait --count 1 --timeout 1 --restore-driver",
            COMMAND,
        )
        .unwrap();
    assert!(
        timed_out.status != 0 && timed_out.output.contains("timed out"),
        "{}",
        timed_out.output
    );
    let listed = b.run_ok("ivshm guest list", COMMAND).unwrap();
    assert!(listed.contains("driver=none"), "{listed}");

    // sysfs mode: memory, own id, ringing the host, and a polled doorbell between the guests.
    let info = a.run_ok("ivshm guest info --mode sysfs", COMMAND).unwrap();
    assert!(
        info.contains(&format!("\nid={id_a}\n")) && info.contains("mode=sysfs"),
        "{info}"
    );
    a.run_ok(
        "ivshm guest write --mode sysfs --offset 0x3000 feedf00d",
        COMMAND,
    )
    .unwrap();
    let read = b
        .run_ok(
            "ivshm guest read --mode sysfs --offset 0x3000 --len 4",
            COMMAND,
        )
        .unwrap();
    assert_eq!(read.trim(), "feedf00d");
    let no_interrupts = b
        .run("ivshm guest wait --mode sysfs --timeout 5", COMMAND)
        .unwrap();
    assert_ne!(no_interrupts.status, 0);
    assert!(
        no_interrupts.output.contains("no interrupts"),
        "{}",
        no_interrupts.output
    );
    a.run_ok(
        &format!("ivshm guest notify --mode sysfs --peer {host_id} --vector 3"),
        COMMAND,
    )
    .unwrap();
    listener.wait_doorbell(3, HOST).unwrap();
    let polled = start_wait(
        &mut b,
        "b-poll",
        id_b,
        "--mode sysfs --poll-offset 0x4000 --vector 1 --count 1",
        GUEST_WAIT,
    )
    .unwrap();
    a.run_ok(
        &format!("ivshm guest notify --mode sysfs --peer {id_b} --vector 1 --poll-offset 0x4000"),
        COMMAND,
    )
    .unwrap();
    let doorbells = finish_wait(&mut b, polled, FINISH).unwrap();
    assert_eq!(doorbells, ["doorbell vector=1"]);

    assert!(a.poweroff(COMMAND).unwrap().success());
    assert!(b.poweroff(COMMAND).unwrap().success());
    let status = server.stop(HOST).unwrap();
    assert!(status.success(), "ivshm serve exit status {status}");
}

/// `ivshmem-plain` on the default i440FX machine (no IOMMU, no server): `ivshm guest` picks the
/// sysfs mode, shares memory with the host's backing file, and explains, with the real
/// kernel, why neither VFIO nor waiting can work there.
#[test]
fn plain_device_without_iommu_uses_sysfs_and_explains_vfio() {
    let assets = require_e2e!();
    let dir = ScratchDir::new().unwrap();
    let mem_path = dir.join("plain.mem");
    let plain_size: u64 = 1 << 20;
    let mut guest = QemuGuest::builder(&assets, "guest-plain")
        .with_ivshm_binary()
        .ivshmem_plain(&mem_path, plain_size)
        .spawn()
        .unwrap();
    guest.wait_ready(BOOT).unwrap();

    let list = guest.run_ok("ivshm guest list", COMMAND).unwrap();
    assert!(
        list.contains(&format!(
            " 1af4:1110 ivshmem-plain driver=none iommu_group=none vectors=0 size={plain_size}"
        )),
        "{list}"
    );
    let info = guest.run_ok("ivshm guest info", COMMAND).unwrap();
    assert!(
        info.contains("msix none") && info.contains("\nid=0\n") && info.contains("mode=sysfs"),
        "{info}"
    );

    // Default mode for a plain device is sysfs: the bytes land in the host's backing file.
    guest
        .run_ok("ivshm guest write --offset 0x2000 c0ffee", COMMAND)
        .unwrap();
    let host_bytes = std::fs::read(&mem_path).unwrap();
    assert_eq!(&host_bytes[0x2000..0x2003], [0xc0, 0xff, 0xee]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mem_path)
        .and_then(|mut f| {
            use std::io::{Seek, SeekFrom, Write};
            f.seek(SeekFrom::Start(0x3000))?;
            f.write_all(b"host")
        })
        .unwrap();
    let read = guest
        .run_ok("ivshm guest read --offset 0x3000 --len 4", COMMAND)
        .unwrap();
    assert_eq!(read.trim(), "686f7374");

    // VFIO needs an IOMMU group: the error says how to get one.
    let vfio = guest
        .run("ivshm guest wait --mode vfio --timeout 5", COMMAND)
        .unwrap();
    assert!(
        vfio.status != 0
            && vfio.output.contains("has no IOMMU group")
            && vfio.output.contains("intel_iommu=on")
            && vfio.output.contains("-device intel-iommu"),
        "{}",
        vfio.output
    );
    // No interrupts without VFIO (and none at all on a plain device).
    let wait = guest.run("ivshm guest wait --timeout 5", COMMAND).unwrap();
    assert!(
        wait.status != 0 && wait.output.contains("no interrupts"),
        "{}",
        wait.output
    );

    assert!(guest.poweroff(COMMAND).unwrap().success());
}
