//! Issue 3 end to end: the guest library through `ivshm guest` in two q35 + intel-iommu guests
//! (VFIO, MSI-X doorbells to eventfds in guest user space) and a host `ivshm listen` peer, all
//! on `ivshm serve` with 4 vectors.
//!
//! Checks: guest A rings guest B on vector 2 and B's `wait` (on all vectors) reports exactly
//! vector 2; B answers A; the host rings each guest and each guest rings the host; 1,000
//! ping-pong round trips between the guests with none lost (`ivshm guest bench`, inside the
//! guests), and 1,000 between a guest and a host peer; data written by one guest is read by
//! the other and by the host; restoring the driver binding; and the sysfs mode (memory,
//! ringing, polling doorbells).

use std::time::Duration;

use ivshm_e2e::host::run_to_completion;
use ivshm_e2e::ivshm::{ivshm_command, read_shared};
use ivshm_e2e::{require_e2e, IvshmListener, IvshmServer, QemuGuest, ScratchDir};
use ivshm_e2e::{BackgroundCommand, HostProcess, Stream};

const BOOT: Duration = Duration::from_secs(240);
const HOST: Duration = Duration::from_secs(60);
const COMMAND: Duration = Duration::from_secs(60);
/// Bound on every background `ivshm guest` command in the guests.
const GUEST_WAIT_SECONDS: u32 = 120;
const SIZE: u64 = 1 << 20;
const VECTORS: u32 = 4;

/// How long a background `ivshm guest` command may take to end (they bound themselves).
const FINISH: Duration = Duration::from_secs(GUEST_WAIT_SECONDS as u64 + 60);

fn finish(guest: &mut QemuGuest, background: BackgroundCommand) -> (i32, String) {
    let done = background.finish(guest, FINISH).unwrap();
    (done.status, done.output)
}

/// Starts `ivshm guest wait` with `args` and returns once it printed its `self` line (MSI-X
/// connected), so that doorbells sent from now on reach it.
fn start_wait(guest: &mut QemuGuest, name: &str, id: u16, args: &str) -> BackgroundCommand {
    let background = guest
        .spawn_background(
            name,
            &format!("ivshm guest wait {args} --timeout {GUEST_WAIT_SECONDS}"),
        )
        .unwrap();
    background
        .wait_output(guest, &format!("self id={id} vectors="), COMMAND)
        .unwrap();
    background
}

/// The `doorbell ...` lines of a `wait` output.
fn doorbell_lines(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|l| l.starts_with("doorbell "))
        .collect()
}

fn host_notify(socket: &std::path::Path, peer: u16, vector: u32) {
    let mut command = ivshm_command(["notify", "--socket"]).unwrap();
    command
        .arg(socket)
        .args(["--peer", &peer.to_string(), "--vector", &vector.to_string()]);
    run_to_completion("ivshm notify", command, HOST).unwrap();
}

fn vfio_guest(assets: &ivshm_e2e::GuestAssets, name: &str, socket: &std::path::Path) -> QemuGuest {
    QemuGuest::builder(assets, name)
        .with_vfio()
        .with_ivshm_binary()
        .ivshmem_doorbell(socket, VECTORS)
        .spawn()
        .unwrap()
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

    let mut a = vfio_guest(&assets, "guest-vfio-a", &socket);
    let (id_a, _) = listener.wait_join(HOST).unwrap();
    let mut b = vfio_guest(&assets, "guest-vfio-b", &socket);
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
    let wait_b = start_wait(&mut b, "b-wait-1", id_b, "--count 1");
    a.run_ok(
        &format!("ivshm guest notify --peer {id_b} --vector 2"),
        COMMAND,
    )
    .unwrap();
    let (status, output) = finish(&mut b, wait_b);
    assert_eq!(status, 0, "{output}");
    assert_eq!(doorbell_lines(&output), ["doorbell vector=2"], "{output}");

    // B answers A on vector 1.
    let wait_a = start_wait(&mut a, "a-wait-1", id_a, "--count 1");
    b.run_ok(
        &format!("ivshm guest notify --peer {id_a} --vector 1"),
        COMMAND,
    )
    .unwrap();
    let (status, output) = finish(&mut a, wait_a);
    assert_eq!(status, 0, "{output}");
    assert_eq!(doorbell_lines(&output), ["doorbell vector=1"], "{output}");

    // The host rings each guest.
    for (guest, id, vector) in [(&mut a, id_a, 3), (&mut b, id_b, 0)] {
        let wait = start_wait(guest, "host-ring", id, "--count 1");
        host_notify(&socket, id, vector);
        let (status, output) = finish(guest, wait);
        assert_eq!(status, 0, "{output}");
        assert_eq!(
            doorbell_lines(&output),
            [format!("doorbell vector={vector}")],
            "{output}"
        );
    }

    // Each guest rings the host.
    a.run_ok(
        &format!("ivshm guest notify --peer {host_id} --vector 1"),
        COMMAND,
    )
    .unwrap();
    listener.wait_doorbell(1, HOST).unwrap();
    b.run_ok(
        &format!("ivshm guest notify --peer {host_id} --vector 2"),
        COMMAND,
    )
    .unwrap();
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
    a.run_ok(
        &format!("ivshm guest write --offset 0x1000 {data}"),
        COMMAND,
    )
    .unwrap();
    let read = b
        .run_ok("ivshm guest read --offset 0x1000 --len 16", COMMAND)
        .unwrap();
    assert_eq!(read.trim(), data);
    assert_eq!(
        read_shared(&socket, 0x1000, 16, HOST).unwrap(),
        (0u8..16).map(|i| i * 0x11).collect::<Vec<_>>()
    );

    // 1,000 round trips between the guests, inside the guests; a lost doorbell fails the run.
    let responder = b.spawn_background(
        "bench-respond",
        &format!(
            "ivshm guest bench --respond --peer {id_a} --vector 2 --offset 0x8000 --timeout {GUEST_WAIT_SECONDS}"
        ),
    ).unwrap();
    responder
        .wait_output(&mut b, &format!("self id={id_b}"), COMMAND)
        .unwrap();
    let bench = a
        .run_ok(
            &format!(
                "ivshm guest bench --peer {id_b} --vector 2 --offset 0x8000 --count 1000 --timeout {GUEST_WAIT_SECONDS}"
            ),
            Duration::from_secs(600),
        )
        .unwrap();
    eprintln!("guest bench:\n{bench}");
    assert!(
        bench.contains("doorbell round_trips=1000 lost=0"),
        "{bench}"
    );
    assert!(bench.contains("polling round_trips=1000"), "{bench}");
    assert!(bench.contains("ratio doorbell/polling="), "{bench}");
    let (status, output) = finish(&mut b, responder);
    assert_eq!(status, 0, "{output}");
    assert!(
        output.contains("responded doorbells=1001 polls=1000"),
        "{output}"
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
    let bench = a
        .run_ok(
            &format!(
                "ivshm guest bench --peer {host_bench_id} --vector 3 --offset 0x9000 --count 1000 --timeout {GUEST_WAIT_SECONDS}"
            ),
            Duration::from_secs(600),
        )
        .unwrap();
    eprintln!("guest ↔ host bench:\n{bench}");
    assert!(
        bench.contains("doorbell round_trips=1000 lost=0"),
        "{bench}"
    );
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
    );
    a.run_ok(
        &format!("ivshm guest notify --mode sysfs --peer {id_b} --vector 1 --poll-offset 0x4000"),
        COMMAND,
    )
    .unwrap();
    let (status, output) = finish(&mut b, polled);
    assert_eq!(status, 0, "{output}");
    assert_eq!(doorbell_lines(&output), ["doorbell vector=1"], "{output}");

    assert!(a.poweroff(COMMAND).unwrap().success());
    assert!(b.poweroff(COMMAND).unwrap().success());
    let status = server.stop(HOST).unwrap();
    assert!(status.success(), "ivshm serve exit status {status}");
}
