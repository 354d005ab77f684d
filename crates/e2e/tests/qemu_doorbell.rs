//! Issue 2 end to end: `ivshm serve` with two QEMU guests (`ivshmem-doorbell`) and a host
//! `ivshm listen` peer. Checks the ids the server assigned (IVPosition in each guest against
//! the listener's `join` lines), shared memory in both directions (`devmem` in the guests,
//! `ivshm read`/`ivshm write` on the host), guest → host doorbells on two vectors, and
//! `leave` when a guest powers off.

use std::time::Duration;

use ivshm_e2e::ivshm::{read_shared, write_shared};
use ivshm_e2e::{require_e2e, IvshmListener, IvshmServer, QemuGuest, ScratchDir, ShellDevice};

const BOOT: Duration = Duration::from_secs(240);
const HOST: Duration = Duration::from_secs(60);
const COMMAND: Duration = Duration::from_secs(60);
const SIZE: u64 = 1 << 20;
const VECTORS: u32 = 2;

#[test]
fn two_guests_and_a_host_peer_share_memory_and_ring_the_host() {
    let assets = require_e2e!();
    let dir = ScratchDir::new().unwrap();
    let socket = dir.join("ivshm.sock");
    let mut server =
        IvshmServer::start(&socket, &["--vectors", "2", "--size", "1M"], HOST).unwrap();

    let listener = IvshmListener::start(&socket, HOST).unwrap();
    assert_eq!(listener.id(), 0, "the first peer gets id 0");
    assert_eq!(listener.vectors(), VECTORS);
    assert_eq!(listener.size(), SIZE);
    let host_id = listener.id();

    // QEMU connects to the server while starting, before the guest boots: start one guest,
    // see it join, then the other, so ids follow boot order while the boots overlap.
    let mut guest_a = QemuGuest::builder(&assets, "doorbell-a")
        .ivshmem_doorbell(&socket, VECTORS)
        .spawn()
        .unwrap();
    let (id_a, vectors_a) = listener.wait_join(HOST).unwrap();
    let mut guest_b = QemuGuest::builder(&assets, "doorbell-b")
        .ivshmem_doorbell(&socket, VECTORS)
        .spawn()
        .unwrap();
    let (id_b, vectors_b) = listener.wait_join(HOST).unwrap();
    assert_eq!((id_a, id_b), (1, 2), "guests get ids 1 and 2 in boot order");
    assert_eq!((vectors_a, vectors_b), (VECTORS, VECTORS));

    guest_a.wait_ready(BOOT).unwrap();
    guest_b.wait_ready(BOOT).unwrap();
    let device_a = ShellDevice::find_one(&mut guest_a, COMMAND).unwrap();
    let device_b = ShellDevice::find_one(&mut guest_b, COMMAND).unwrap();
    assert_eq!(device_a.shared_memory_size(), SIZE);
    assert_eq!(device_b.shared_memory_size(), SIZE);

    // IVPosition is the id the server assigned, as the listener saw it.
    assert_eq!(
        device_a.read_ivposition(&mut guest_a, COMMAND).unwrap(),
        u32::from(id_a)
    );
    assert_eq!(
        device_b.read_ivposition(&mut guest_b, COMMAND).unwrap(),
        u32::from(id_b)
    );

    // Guests → host: distinct patterns at distinct offsets.
    let pattern_a: Vec<u8> = (0u8..16).map(|i| 0xa0 ^ i.wrapping_mul(7)).collect();
    let pattern_b: Vec<u8> = (0u8..16).map(|i| 0xb0 ^ i.wrapping_mul(13)).collect();
    device_a
        .write_shared(&mut guest_a, 0x1000, &pattern_a, COMMAND)
        .unwrap();
    device_b
        .write_shared(&mut guest_b, 0x2000, &pattern_b, COMMAND)
        .unwrap();
    assert_eq!(read_shared(&socket, 0x1000, 16, HOST).unwrap(), pattern_a);
    assert_eq!(read_shared(&socket, 0x2000, 16, HOST).unwrap(), pattern_b);
    // Each guest sees the other's pattern in the same region.
    assert_eq!(
        device_b
            .read_shared(&mut guest_b, 0x1000, 16, COMMAND)
            .unwrap(),
        pattern_a
    );
    assert_eq!(
        device_a
            .read_shared(&mut guest_a, 0x2000, 16, COMMAND)
            .unwrap(),
        pattern_b
    );

    // Host → guests.
    let from_host = b"host wrote this!";
    write_shared(&socket, SIZE - 16, from_host, HOST).unwrap();
    assert_eq!(
        device_a
            .read_shared(&mut guest_a, SIZE - 16, 16, COMMAND)
            .unwrap(),
        from_host
    );
    assert_eq!(
        device_b
            .read_shared(&mut guest_b, SIZE - 16, 16, COMMAND)
            .unwrap(),
        from_host
    );

    // Guest → host doorbells (sending needs no MSI-X in the guest).
    device_a
        .ring_doorbell(&mut guest_a, host_id, 1, COMMAND)
        .unwrap();
    listener.wait_doorbell(1, HOST).unwrap();
    device_b
        .ring_doorbell(&mut guest_b, host_id, 0, COMMAND)
        .unwrap();
    listener.wait_doorbell(0, HOST).unwrap();

    // A guest powering off leaves.
    assert!(guest_b.poweroff(COMMAND).unwrap().success());
    listener.wait_leave(id_b, HOST).unwrap();
    assert!(guest_a.poweroff(COMMAND).unwrap().success());
    listener.wait_leave(id_a, HOST).unwrap();

    let status = server.stop(HOST).unwrap();
    assert!(status.success(), "ivshm serve exit status {status}");
    assert!(!socket.exists(), "the server removes its socket on SIGTERM");
}
