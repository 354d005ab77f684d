//! A peer id that a QEMU guest saw leave is never given to a new peer while that guest is
//! connected. QEMU 7.2's `ivshmem-doorbell` frees a departed peer's eventfd array on the leave
//! message but keeps the slot, and writes the next connect messages for that id into the freed
//! array: the heap is corrupted and QEMU aborts (`malloc(): unsorted double linked list
//! corrupted`, `double free or corruption`). With the shipped example (lowest-free ids): guest
//! A stays connected, host peer B joins and leaves, host peer C joins. C must get a fresh id,
//! A's QEMU must live, and doorbells between A and C must work both ways.

use std::path::Path;
use std::time::Duration;

use ivshm_client::{ConnectOptions, Event, Peer};
use ivshm_e2e::guest_tool::{finish_wait, notify, start_wait, vfio_doorbell_guest};
use ivshm_e2e::host::run_to_completion;
use ivshm_e2e::ivshm::ivshm_command;
use ivshm_e2e::{require_e2e, workspace, HostProcess, IvshmListener, ListenEvent, ScratchDir};
use ivshm_e2e::{QemuGuest, Stream};

const BOOT: Duration = Duration::from_secs(240);
const HOST: Duration = Duration::from_secs(60);
const COMMAND: Duration = Duration::from_secs(60);
/// Bound on the background `ivshm guest wait` (it ends itself).
const GUEST_WAIT: Duration = Duration::from_secs(120);
const FINISH: Duration = Duration::from_secs(GUEST_WAIT.as_secs() + 60);
/// The example's regions: 16 vectors (QNX's one per possible sender).
const VECTORS: u32 = 16;

/// `examples/ivshm.toml` as shipped, with the root (and the QNX file's path) moved.
fn shipped_example(root: &Path) -> String {
    let examples = workspace::root().join("examples");
    let shipped = std::fs::read_to_string(examples.join("ivshm.toml")).unwrap();
    assert!(shipped.contains("\nid_policy = \"lowest-free\"\n"));
    shipped
        .replace(
            "root = \"/run/ivshm\"",
            &format!("root = {:?}", root.display().to_string()),
        )
        .replace(
            "qnx_file = \"vm-qnx.vdev\"",
            &format!(
                "qnx_file = {:?}",
                examples.join("vm-qnx.vdev").display().to_string()
            ),
        )
}

/// Waits for the server's log line that contains every one of `parts`.
fn server_logged(server: &HostProcess, what: &str, parts: &[&str]) {
    server
        .wait_line(Stream::Stderr, what, HOST, |l| {
            parts.iter().all(|p| l.contains(p))
        })
        .unwrap();
}

/// Asserts that QEMU is running and its guest answers a command.
fn assert_alive(guest: &mut QemuGuest, when: &str) {
    if let Err(e) = guest.run_ok("echo alive", COMMAND) {
        panic!("guest A's QEMU {when}: {e}");
    }
}

/// Waits for C's next doorbell and returns its vector.
fn next_doorbell(c: &mut Peer) -> usize {
    let deadline = std::time::Instant::now() + HOST;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "C got no doorbell within {HOST:?}");
        match c.wait(Some(left)).unwrap() {
            Some(Event::Doorbell { vector }) => return vector,
            Some(Event::ServerGone) => panic!("the server closed C's connection"),
            _ => {}
        }
    }
}

#[test]
fn a_qemu_guest_survives_a_host_peer_leaving_and_another_joining() {
    let assets = require_e2e!();
    let dir = ScratchDir::new().unwrap();
    let root = dir.join("run-ivshm");
    let config = dir.join("ivshm.toml");
    std::fs::write(&config, shipped_example(&root)).unwrap();
    let mut command = ivshm_command(["serve", "--config"]).unwrap();
    command.arg(&config);
    let mut server = HostProcess::spawn("ivshm serve --config", command).unwrap();
    let control = root.join("control.sock");
    server_logged(
        &server,
        "the control socket",
        &[&format!("listening on {}", control.display())],
    );

    // Guest A: QEMU's ivshmem-doorbell on VM vm0's `mem` (host region guest0mem). QEMU joins
    // while it starts, before the guest boots: it is the region's first peer, id 0.
    let guest_socket = root.join("vm0").join("mem.sock");
    let host_socket = root.join("monitor").join("guest0mem.sock");
    let mut a = vfio_doorbell_guest(&assets, "idreuse-a", &guest_socket, VECTORS)
        .spawn()
        .unwrap();
    server_logged(&server, "A's join", &["guest0mem", "peer 0 joined"]);
    a.wait_ready(BOOT).unwrap();

    // Host peer B joins (the lowest free id, 1) and leaves. A's QEMU hears both.
    let b = IvshmListener::start(&host_socket, HOST).unwrap();
    assert_eq!(b.id(), 1, "B gets the lowest free id");
    b.wait_event("A in B's peer list", HOST, |e| {
        *e == ListenEvent::Peer {
            id: 0,
            vectors: VECTORS,
        }
    })
    .unwrap();
    drop(b);
    server_logged(&server, "B's leave", &["guest0mem", "peer 1 left"]);

    // Host peer C joins. Id 1 is free but A saw its holder leave: C gets a fresh id.
    let opts = ConnectOptions {
        timeout: HOST,
        ..ConnectOptions::default()
    };
    let mut c = Peer::connect(&host_socket, opts).unwrap();
    assert_alive(&mut a, "after C joined");
    assert_eq!(
        c.id(),
        2,
        "C must not get B's id 1 while A, which saw B leave, is connected"
    );
    assert_eq!(c.peer_ids(), vec![0]);
    assert_eq!(c.peer_vectors(0), Some(VECTORS as usize));

    // The control socket shows id 1 held back.
    let mut regions = ivshm_command(["regions", "--control"]).unwrap();
    regions.arg(&control);
    let lines = run_to_completion("ivshm regions", regions, HOST).unwrap();
    assert!(
        lines.iter().any(|l| l.starts_with("region guest0mem ")
            && l.contains(" peer-ids=[0,2] ")
            && l.contains(" held-ids=[1] ")),
        "{lines:?}"
    );

    // Doorbells A → C and C → A.
    notify(&mut a, c.id(), 3, COMMAND).unwrap();
    assert_eq!(next_doorbell(&mut c), 3);
    let wait_a = start_wait(&mut a, "a-wait", 0, "--vector 5 --count 1", GUEST_WAIT).unwrap();
    c.notify(0, 5).unwrap();
    assert_eq!(
        finish_wait(&mut a, wait_a, FINISH).unwrap(),
        ["doorbell vector=5"]
    );
    assert_alive(&mut a, "after the doorbells");

    // Once A is gone nobody remembers ids 1 and 2: the next peer gets the lowest, 0 (A's).
    drop(c);
    server_logged(&server, "C's leave", &["guest0mem", "peer 2 left"]);
    assert!(a.poweroff(COMMAND).unwrap().success());
    server_logged(&server, "A's leave", &["guest0mem", "peer 0 left"]);
    let d = IvshmListener::start(&host_socket, HOST).unwrap();
    assert_eq!(d.id(), 0, "with no peer left, ids are reused at once");
    drop(d);
    let status = server.terminate(HOST).unwrap();
    assert!(status.success(), "ivshm serve exit status {status}");
}
