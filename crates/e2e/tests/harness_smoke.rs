//! Proves the harness: a guest with `ivshmem-plain` on a `/dev/shm` file (no server). The guest
//! writes a pattern into BAR2 with `devmem` and the host reads it from the file; the host
//! writes and the guest reads. The static `ivshm` runs in the guest.

use std::time::Duration;

use ivshm_e2e::{require_e2e, QemuGuest, ShellDevice, ShmFile};

const BOOT: Duration = Duration::from_secs(240);
const COMMAND: Duration = Duration::from_secs(60);
const SIZE: u64 = 1 << 20;

#[test]
fn plain_shared_memory_both_directions() {
    let assets = require_e2e!();
    let shm = ShmFile::new(SIZE).unwrap();
    let mut guest = QemuGuest::builder(&assets, "smoke")
        .ivshmem_plain(shm.path(), SIZE)
        .with_ivshm_binary()
        .boot(BOOT)
        .unwrap();

    // The shell protocol: output and exit status.
    let result = guest
        .run("echo hello; echo oops >&2; false", COMMAND)
        .unwrap();
    assert_eq!(result.output, "hello\noops\n");
    assert_eq!(result.status, 1);
    assert_eq!(guest.run_ok("printf abc", COMMAND).unwrap(), "abc");

    // The static ivshm binary runs in the guest.
    let version = guest.run_ok("/bin/ivshm --version", COMMAND).unwrap();
    assert!(version.starts_with("ivshm "), "{version}");

    let device = ShellDevice::find_one(&mut guest, COMMAND).unwrap();
    assert_eq!(device.shared_memory_size(), SIZE);

    // Guest → host.
    let pattern: Vec<u8> = (0u8..16)
        .map(|i| i.wrapping_mul(17).wrapping_add(3))
        .collect();
    device
        .write_shared(&mut guest, 0x100, &pattern, COMMAND)
        .unwrap();
    assert_eq!(shm.read_at(0x100, pattern.len()).unwrap(), pattern);

    // Host → guest, near the end of the region.
    let offset = SIZE - 8;
    shm.write_at(offset, b"\xde\xad\xbe\xef\x01\x02\x03\x04")
        .unwrap();
    assert_eq!(
        device.read_shared_u32(&mut guest, offset, COMMAND).unwrap(),
        0xefbe_adde
    );
    assert_eq!(
        device.read_shared(&mut guest, offset, 8, COMMAND).unwrap(),
        b"\xde\xad\xbe\xef\x01\x02\x03\x04"
    );

    // A guest command that blocks until the host writes shared memory.
    let flag = device.shared_memory() + 0x200;
    let waiter = guest
        .start_command(&format!(
            "while [ \"$(devmem {flag:#x} 32)\" != 0x600DF00D ]; do usleep 10000; done; echo seen"
        ))
        .unwrap();
    shm.write_at(0x200, &0x600d_f00du32.to_le_bytes()).unwrap();
    let seen = guest.finish_command(waiter, COMMAND).unwrap();
    assert_eq!((seen.output.as_str(), seen.status), ("seen\n", 0));

    // `cmd &` as users type it: the job ends while the shell sits reading the console, and the
    // shell (a child of `/init`, not PID 1) carries on, printing no job notices into outputs.
    assert_eq!(
        guest.run_ok("sleep 0.5 & echo started", COMMAND).unwrap(),
        "started\n"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(guest.run_ok("echo alive", COMMAND).unwrap(), "alive\n");

    // Background commands: output while running, then exit status and all output.
    let background = guest
        .spawn_background(
            "smoke",
            "echo ready; read -t 60 _ </dev/null; sleep 0.5; echo \"it's done\" >&2; exit 3",
        )
        .unwrap();
    let seen = background
        .wait_output(&mut guest, "ready", COMMAND)
        .unwrap();
    assert_eq!(seen, "ready\n");
    assert_eq!(
        guest.run_ok("echo meanwhile", COMMAND).unwrap(),
        "meanwhile\n"
    );
    let done = background.finish(&mut guest, COMMAND).unwrap();
    assert_eq!(
        (done.output.as_str(), done.status),
        ("ready\nit's done\n", 3)
    );
    // Waiting for output the command never printed fails once it ended.
    let quiet = guest.spawn_background("quiet", "true").unwrap();
    let missing = quiet.wait_output(&mut guest, "never", COMMAND).unwrap_err();
    assert!(
        missing.to_string().contains("ended with status 0"),
        "{missing}"
    );
    assert_eq!(guest.run_ok("echo alive", COMMAND).unwrap(), "alive\n");

    let status = guest.poweroff(COMMAND).unwrap();
    assert!(status.success(), "QEMU exit status {status}");
}

#[test]
fn vfio_modules_load_and_bind_the_device() {
    let assets = require_e2e!();
    let shm = ShmFile::new(SIZE).unwrap();
    let mut guest = QemuGuest::builder(&assets, "smoke-vfio")
        .with_vfio()
        .ivshmem_plain(shm.path(), SIZE)
        .boot(BOOT)
        .unwrap();
    let modules = guest.run_ok("cat /proc/modules", COMMAND).unwrap();
    for module in [
        "vfio_pci",
        "vfio_pci_core",
        "vfio_iommu_type1",
        "vfio",
        "irqbypass",
    ] {
        assert!(
            modules
                .lines()
                .any(|l| l.starts_with(&format!("{module} "))),
            "{module} not loaded:\n{modules}"
        );
    }
    let mut devices = ShellDevice::discover(&mut guest, COMMAND).unwrap();
    assert_eq!(devices.len(), 1);
    let device = devices.remove(0);
    let group = device.bind_vfio(&mut guest, COMMAND).unwrap();
    let driver = guest
        .run_ok(
            &format!(
                "basename $(readlink /sys/bus/pci/devices/{}/driver)",
                device.bdf
            ),
            COMMAND,
        )
        .unwrap();
    assert_eq!(driver.trim(), "vfio-pci");
    assert!(group.starts_with("/dev/vfio/"), "{group}");
    assert!(guest.poweroff(COMMAND).unwrap().success());
}
