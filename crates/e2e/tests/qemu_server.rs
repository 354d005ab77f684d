//! QEMU 7.2's own `ivshmem-server` as the hub, with every kind of peer around it: our host
//! peer `ivshm listen` (and one-shot `ivshm read`, `write`, `notify`), QEMU's own
//! `ivshmem-client`, and a QEMU guest with `ivshmem-doorbell`. Checks ids (the listener's
//! `join` lines, QEMU's client, the guest's IVPosition), shared memory between the guest and
//! our host tools, and doorbells guest → our listener, guest → QEMU's client, QEMU's client →
//! our listener, our `notify` → QEMU's client; leaves; and that QEMU 7.2's server removes its
//! socket and shm object at exit.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ivshm_e2e::ivshm::{ivshm_command, read_shared, write_shared};
use ivshm_e2e::{
    require_e2e, require_qemu_tools, HostProcess, IvshmListener, QemuGuest, QemuTools, ScratchDir,
    ShellDevice, Stream,
};
use ivshm_test_support::fds::wait_listening;

const BOOT: Duration = Duration::from_secs(240);
const HOST: Duration = Duration::from_secs(60);
const COMMAND: Duration = Duration::from_secs(60);
const SIZE: u64 = 1 << 20;
const VECTORS: u32 = 2;

/// Waits until `needle` has appeared `n` times on stdout of `process`.
fn wait_count(process: &HostProcess, needle: &str, n: usize) {
    process
        .wait_output(Stream::Stdout, &format!("{n} × {needle:?}"), HOST, |t| {
            t.matches(needle).count() >= n
        })
        .unwrap();
}

fn run(mut command: Command) {
    command.stdin(std::process::Stdio::null());
    let status = command.status().unwrap();
    assert!(status.success(), "{command:?}: {status}");
}

#[test]
fn qemus_server_with_a_guest_qemus_client_and_our_host_peer() {
    let assets = require_e2e!();
    let tools = require_qemu_tools!();
    let dir = ScratchDir::new().unwrap();
    let socket = dir.join("qemu-server.sock");
    let shm = format!("ivshm-e2e-qemu-server-{}", std::process::id());
    let shm_path = Path::new("/dev/shm").join(&shm);
    let mut command = Command::new(&tools.server);
    command
        .args(["-F", "-S"])
        .arg(&socket)
        .args(["-M", &shm, "-l", "1M", "-n", "2"]);
    let mut server = HostProcess::spawn("QEMU ivshmem-server", command).unwrap();
    wait_listening(&socket);

    // Our host peer first: id 0.
    let listener = IvshmListener::start(&socket, HOST).unwrap();
    assert_eq!(
        (listener.id(), listener.vectors(), listener.size()),
        (0, VECTORS, SIZE)
    );

    // QEMU's own client: id 1, with our listener's vectors and its own.
    let mut command = QemuTools::line_buffered(&tools.client);
    command.arg("-v").arg("-S").arg(&socket);
    let mut client = HostProcess::spawn_with_stdin("QEMU ivshmem-client", command).unwrap();
    assert_eq!(listener.wait_join(HOST).unwrap(), (1, VECTORS));
    wait_count(&client, "  new vector 1 (fd=", 2);
    assert!(client.output(Stream::Stdout).contains("our_id=1\n"));

    // A guest: id 2.
    let mut guest = QemuGuest::builder(&assets, "qemu-server")
        .ivshmem_doorbell(&socket, VECTORS)
        .spawn()
        .unwrap();
    assert_eq!(listener.wait_join(HOST).unwrap(), (2, VECTORS));
    wait_count(&client, "new peer id = 2\n", 1);
    guest.wait_ready(BOOT).unwrap();
    let device = ShellDevice::find_one(&mut guest, COMMAND).unwrap();
    assert_eq!(device.shared_memory_size(), SIZE);
    assert_eq!(device.read_ivposition(&mut guest, COMMAND).unwrap(), 2);

    // Shared memory between the guest and our host tools, through QEMU's server.
    let pattern: Vec<u8> = (0u8..16).map(|i| 0x5a ^ i.wrapping_mul(11)).collect();
    device
        .write_shared(&mut guest, 0x100, &pattern, COMMAND)
        .unwrap();
    assert_eq!(read_shared(&socket, 0x100, 16, HOST).unwrap(), pattern);
    let from_host = b"from our host!!!";
    write_shared(&socket, 0x200, from_host, HOST).unwrap();
    assert_eq!(
        device.read_shared(&mut guest, 0x200, 16, COMMAND).unwrap(),
        from_host
    );

    // Doorbells: guest → our listener, guest → QEMU's client.
    device.ring_doorbell(&mut guest, 0, 1, COMMAND).unwrap();
    listener.wait_doorbell(1, HOST).unwrap();
    device.ring_doorbell(&mut guest, 1, 0, COMMAND).unwrap();
    wait_count(&client, "receive notification from peer_id=1 vector=0\n", 1);
    // QEMU's client → our listener; our `ivshm notify` → QEMU's client.
    use std::io::Write;
    let stdin = client.stdin().unwrap();
    stdin.write_all(b"int 0 0\n").unwrap();
    stdin.flush().unwrap();
    listener.wait_doorbell(0, HOST).unwrap();
    let mut notify = ivshm_command(["notify", "--socket"]).unwrap();
    notify.arg(&socket).args(["--peer", "1", "--vector", "1"]);
    run(notify);
    wait_count(&client, "receive notification from peer_id=1 vector=1\n", 1);

    // The guest powers off: both hear of it.
    assert!(guest.poweroff(COMMAND).unwrap().success());
    listener.wait_leave(2, HOST).unwrap();
    wait_count(&client, "delete peer id = 2\n", 1);

    // QEMU 7.2's server removes its socket and its shm object when it stops.
    let status = server.terminate(HOST).unwrap();
    assert!(status.success(), "{status}");
    wait_count(&client, "disconnected from server\n", 1);
    assert!(!socket.exists());
    assert!(!shm_path.exists());
    assert!(server
        .lines(Stream::Stdout)
        .contains(&"server disconnected".to_string()));
}
