//! The built `ivshm guest` commands against a fake sysfs tree (`--sysfs`, hidden): the exact
//! `list`/`info` lines, every error the issue names (no device, no IOMMU group, VFIO modules
//! missing, bound elsewhere, no permission, vector out of range, unsupported kinds), and the
//! sysfs access mode end to end with regular files standing in for the BARs (memory contents,
//! the Doorbell register value, polled doorbells between two processes).
//!
//! The VFIO path with a real kernel is covered by `crates/e2e/tests/guest_vfio.rs`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ivshm_test_support::process::{HostProcess, Stream};
use ivshm_test_support::sysfs::{doorbell_resource, FakeFunction, FakeSysfs};
use ivshm_test_support::WAIT_GUARD;

/// BAR2 of the fake devices: the size in their `resource` file and of their `resource2` file.
const SHARED_SIZE: usize = 64 << 10;
/// IVPosition of the fake devices (in their `resource0` file).
const OWN_ID: u32 = 7;

/// An ivshmem-doorbell with 4 vectors and a [`SHARED_SIZE`] BAR2.
fn doorbell(address: &str) -> FakeFunction<'_> {
    FakeFunction {
        resource: doorbell_resource(SHARED_SIZE as u64),
        ..FakeFunction::doorbell(address)
    }
}

/// The built `ivshm guest` commands against a fake tree.
trait GuestCommands {
    /// Adds a function with regular files for BAR0 (IVPosition = [`OWN_ID`]) and BAR2
    /// ([`SHARED_SIZE`] zero bytes).
    fn add_device(&self, f: &FakeFunction<'_>) -> PathBuf;
    /// `ivshm guest <subcommand> --sysfs <root> <args...>`.
    fn command(&self, subcommand: &str, args: &[&str]) -> Command;
    /// Runs [`command`](Self::command) to its end.
    fn run(&self, subcommand: &str, args: &[&str]) -> Output;
}

impl GuestCommands for FakeSysfs {
    fn add_device(&self, f: &FakeFunction<'_>) -> PathBuf {
        self.add_with_bar_files(f, OWN_ID, SHARED_SIZE)
    }

    fn command(&self, subcommand: &str, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
        command
            .args(["guest", subcommand, "--sysfs"])
            .arg(self.sysfs())
            .args(args)
            .env("RUST_LOG", "warn");
        command
    }

    fn run(&self, subcommand: &str, args: &[&str]) -> Output {
        self.command(subcommand, args).output().unwrap()
    }
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// Asserts the command failed and returns its stderr.
fn failure(o: &Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "expected a failure, got stdout {:?} stderr {stderr:?}",
        String::from_utf8_lossy(&o.stdout)
    );
    stderr
}

fn read_bytes(path: &Path, offset: usize, len: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[offset..offset + len].to_vec()
}

#[test]
fn list_prints_every_recognised_device_and_marks_unsupported_ones() {
    let sys = FakeSysfs::new();
    sys.add_device(&FakeFunction::other("0000:00:01.0", 0x8086, 0x29c0));
    sys.add_device(&FakeFunction {
        driver: Some("vfio-pci"),
        iommu_group: Some(3),
        ..doorbell("0000:00:03.0")
    });
    sys.add_device(&FakeFunction::other("0000:00:04.0", 0x1af4, 0x1110));
    sys.add_device(&FakeFunction::other("0000:00:05.0", 0x1c05, 0x0001));
    sys.add_device(&FakeFunction::other("0000:00:06.0", 0x110a, 0x4106));
    let out = stdout(&sys.run("list", &[]));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "0 0000:00:03.0 1af4:1110 ivshmem-doorbell driver=vfio-pci iommu_group=3 vectors=4 size=65536",
            "1 0000:00:04.0 1af4:1110 ivshmem-plain driver=none iommu_group=none vectors=0 size=1048576",
            "2 0000:00:05.0 1c05:0001 qnx-guest-shm (recognised, not supported) driver=none iommu_group=none vectors=0 size=1048576",
            "3 0000:00:06.0 110a:4106 jailhouse-ivshmem-v2 (recognised, not supported) driver=none iommu_group=none vectors=0 size=1048576",
        ]
    );

    // Recognised but not supported: named as such, whether picked by index or address.
    for dev in ["2", "00:06.0"] {
        let err = failure(&sys.run("info", &[dev]));
        assert!(err.contains("recognised but not supported"), "{err}");
    }
    // Two supported devices and no DEV: the user must choose.
    let err = failure(&sys.run("info", &["--no-open"]));
    assert!(
        err.contains("2 ivshmem devices found (0000:00:03.0, 0000:00:04.0)"),
        "{err}"
    );
    let err = failure(&sys.run("info", &["9"]));
    assert!(
        err.contains("`ivshm guest list` shows what exists"),
        "{err}"
    );
    let err = failure(&sys.run("info", &["eth0"]));
    assert!(err.contains("is not a PCI address"), "{err}");
}

#[test]
fn info_prints_pci_facts_and_the_peer_id() {
    let sys = FakeSysfs::new();
    sys.add_device(&FakeFunction {
        iommu_group: Some(3),
        ..doorbell("0000:00:03.0")
    });
    let facts = stdout(&sys.run("info", &["--no-open"]));
    let expected = [
        "address=0000:00:03.0",
        "kind=ivshmem-doorbell",
        "vendor=0x1af4 device=0x1110 revision=1",
        "class=0x050000",
        "subsystem_vendor=0x1af4 subsystem_device=0x1100",
        "bar0 start=0xfea00000 size=256 flags=0x40200",
        "bar1 start=0xfea01000 size=4096 flags=0x40200",
        "bar2 start=0x200000000 size=65536 flags=0x14220c",
        "msix vectors=4 enabled=false",
        "driver=none",
        "iommu_group=3",
    ];
    assert_eq!(facts.lines().collect::<Vec<_>>(), expected);
    // Without --no-open the device is mapped (sysfs mode) to read IVPosition.
    let full = stdout(&sys.run("info", &[]));
    let tail: Vec<_> = full.lines().skip(expected.len()).collect();
    assert_eq!(
        tail,
        [
            format!("id={OWN_ID}"),
            "size=65536".into(),
            "mode=sysfs".into()
        ]
    );
    assert_eq!(
        std::fs::read_to_string(sys.device_dir("0000:00:03.0").join("enable"))
            .unwrap()
            .trim(),
        "1",
        "the sysfs mode enables the function"
    );
}

#[test]
fn missing_devices_and_sysfs_are_explained() {
    let sys = FakeSysfs::new();
    sys.add_device(&FakeFunction::other("0000:00:01.0", 0x8086, 0x29c0));
    let err = failure(&sys.run("info", &[]));
    assert!(
        err.contains("no ivshmem device found")
            && err.contains("-device ivshmem-plain or ivshmem-doorbell"),
        "{err}"
    );
    assert!(stdout(&sys.run("list", &[])).is_empty());

    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    let out = command
        .args(["guest", "list", "--sysfs", "/nonexistent-sysfs"])
        .output()
        .unwrap();
    let err = failure(&out);
    assert!(err.contains("is sysfs mounted"), "{err}");
}

#[test]
fn vfio_preconditions_fail_with_what_to_do() {
    // No IOMMU group: explain intel_iommu=on and the emulated IOMMU.
    let sys = FakeSysfs::new();
    sys.load_driver("vfio-pci");
    sys.add_device(&doorbell("0000:00:03.0"));
    let err = failure(&sys.run("wait", &["--timeout", "1"]));
    assert!(
        err.contains("has no IOMMU group")
            && err.contains("intel_iommu=on")
            && err.contains("-machine q35 -device intel-iommu")
            && err.contains("sysfs mode"),
        "{err}"
    );

    // An IOMMU group but vfio-pci not loaded: name the modules.
    let sys = FakeSysfs::new();
    sys.add_device(&FakeFunction {
        iommu_group: Some(3),
        ..doorbell("0000:00:03.0")
    });
    let err = failure(&sys.run("notify", &["--peer", "1", "--vector", "0"]));
    assert!(
        err.contains("vfio-pci driver is not loaded")
            && err.contains("irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci"),
        "{err}"
    );

    // Bound to another driver: refused (nothing written), naming the driver and --take-over.
    let sys = FakeSysfs::new();
    sys.load_driver("vfio-pci");
    let dir = sys.add_device(&FakeFunction {
        iommu_group: Some(3),
        driver: Some("uio_pci_generic"),
        ..doorbell("0000:00:03.0")
    });
    let err = failure(&sys.run("wait", &["--timeout", "1"]));
    assert!(
        err.contains("bound to the `uio_pci_generic` driver") && err.contains("--take-over"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("driver_override")).unwrap(),
        "(null)\n"
    );
    let unbind = sys.sysfs().join("bus/pci/drivers/uio_pci_generic/unbind");
    assert_eq!(std::fs::read_to_string(&unbind).unwrap(), "");
}

#[test]
fn sysfs_mode_shares_memory_and_rings_through_the_doorbell_register() {
    let sys = FakeSysfs::new();
    let dir = sys.add_device(&doorbell("0000:00:03.0"));
    stdout(&sys.run(
        "write",
        &["--mode", "sysfs", "--offset", "0x100", "deadbeef"],
    ));
    assert_eq!(
        read_bytes(&dir.join("resource2"), 0x100, 4),
        [0xde, 0xad, 0xbe, 0xef]
    );
    let file = sys.sysfs().join("payload");
    std::fs::write(&file, b"from a file").unwrap();
    let at_file = format!("@{}", file.display());
    stdout(&sys.run("write", &["--mode", "sysfs", "--offset", "0x200", &at_file]));
    assert_eq!(
        read_bytes(&dir.join("resource2"), 0x200, 11),
        b"from a file"
    );
    let hex = stdout(&sys.run(
        "read",
        &["--mode", "sysfs", "--offset", "0x100", "--len", "4"],
    ));
    assert_eq!(hex, "deadbeef\n");
    let raw = sys
        .run(
            "read",
            &[
                "--mode", "sysfs", "--offset", "0x200", "--len", "11", "--raw",
            ],
        )
        .stdout;
    assert_eq!(raw, b"from a file");

    // One 32-bit store of (peer << 16) | vector to BAR0 + 12.
    stdout(&sys.run(
        "notify",
        &["--mode", "sysfs", "--peer", "3", "--vector", "2"],
    ));
    assert_eq!(
        read_bytes(&dir.join("resource0"), 12, 4),
        0x0003_0002u32.to_le_bytes()
    );

    let err = failure(&sys.run(
        "notify",
        &["--mode", "sysfs", "--peer", "3", "--vector", "256"],
    ));
    assert!(err.contains("vector 256 cannot be rung"), "{err}");
    // A polling area beyond the memory, or a refused vector: an error, nothing written.
    let beyond = [
        "--mode",
        "sysfs",
        "--peer",
        "3",
        "--vector",
        "200",
        "--poll-offset",
        "0xffff",
    ];
    let err = failure(&sys.run("notify", &beyond));
    assert!(
        err.contains("polling area at offset 0xffff for 201 vector(s) does not fit"),
        "{err}"
    );
    let refused = [
        "--mode",
        "sysfs",
        "--peer",
        "3",
        "--vector",
        "300",
        "--poll-offset",
        "0",
    ];
    let err = failure(&sys.run("notify", &refused));
    assert!(err.contains("vector 300 cannot be rung"), "{err}");
    assert_eq!(read_bytes(&dir.join("resource2"), 4 * 300, 4), [0; 4]);
    let err = failure(&sys.run(
        "read",
        &["--mode", "sysfs", "--offset", "0xfffe", "--len", "4"],
    ));
    assert!(err.contains("beyond the 65536-byte shared memory"), "{err}");
    let err = failure(&sys.run("read", &["--mode", "sysfs", "--offset", "0", "--len", "1T"]));
    assert!(err.contains("beyond the 65536-byte shared memory"), "{err}");
    let err = failure(&sys.run("write", &["--mode", "sysfs", "--offset", "0", "xyz1"]));
    assert!(err.contains("not a hex digit"), "{err}");
}

#[test]
fn sysfs_mode_waits_by_polling_an_agreed_counter() {
    let sys = FakeSysfs::new();
    sys.add_device(&doorbell("0000:00:03.0"));

    // No interrupts and no polling area: explained.
    let err = failure(&sys.run("wait", &["--mode", "sysfs", "--timeout", "1"]));
    assert!(
        err.contains("no interrupts in its access mode (sysfs mode)")
            && err.contains("--poll-offset"),
        "{err}"
    );
    let err = failure(&sys.run(
        "wait",
        &[
            "--mode",
            "sysfs",
            "--poll-offset",
            "0x1000",
            "--vector",
            "4",
            "--timeout",
            "1",
        ],
    ));
    assert!(
        err.contains("vector 4 is out of range: this device has 4 vector(s)"),
        "{err}"
    );
    let err = failure(&sys.run(
        "wait",
        &[
            "--mode",
            "sysfs",
            "--poll-offset",
            "0x1000",
            "--count",
            "1",
            "--timeout",
            "0.2",
        ],
    ));
    assert!(
        err.contains("timed out") && err.contains("0 of 1 doorbell(s)"),
        "{err}"
    );

    // A waiting process sees each polled doorbell from another process, on the right vector.
    let command = sys.command(
        "wait",
        &[
            "--mode",
            "sysfs",
            "--poll-offset",
            "0x1000",
            "--count",
            "2",
            "--timeout",
            "60",
        ],
    );
    let mut waiter = HostProcess::spawn("ivshm guest wait", command).unwrap();
    assert_eq!(
        waiter.next_line(Stream::Stdout, WAIT_GUARD).unwrap(),
        format!("self id={OWN_ID} vectors=4 size=65536")
    );
    for vector in ["3", "1"] {
        stdout(&sys.run(
            "notify",
            &[
                "--mode",
                "sysfs",
                "--peer",
                "7",
                "--vector",
                vector,
                "--poll-offset",
                "0x1000",
            ],
        ));
        assert_eq!(
            waiter.next_line(Stream::Stdout, WAIT_GUARD).unwrap(),
            format!("doorbell vector={vector}")
        );
    }
    assert!(waiter.wait_exit(WAIT_GUARD).unwrap().success());
}

#[test]
fn no_permission_is_explained_in_both_modes() {
    let sys = FakeSysfs::new();
    sys.load_driver("vfio-pci");
    sys.add_device(&FakeFunction {
        iommu_group: Some(3),
        ..doorbell("0000:00:03.0")
    });
    // Root may write anything, so as root the commands run as `nobody`; otherwise the sysfs
    // files are made read-only for us.
    let as_root = rustix::process::getuid().is_root();
    if !as_root {
        for entry in walk(&sys.sysfs()) {
            let mut permissions = std::fs::metadata(&entry).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o444);
            std::fs::set_permissions(&entry, permissions).unwrap();
        }
    }
    let run = |subcommand: &str, args: &[&str]| {
        let mut command = sys.command(subcommand, args);
        if as_root {
            command.uid(65534).gid(65534);
        }
        command.output().unwrap()
    };
    let err = failure(&run("write", &["--mode", "sysfs", "--offset", "0", "00"]));
    assert!(
        err.contains("permission denied on")
            && err.contains("enable")
            && err.contains("needs root"),
        "{err}"
    );
    let err = failure(&run("notify", &["--peer", "1", "--vector", "0"]));
    assert!(
        err.contains("permission denied on")
            && err.contains("driver_override")
            && err.contains("run as root"),
        "{err}"
    );
}

/// Every regular file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            files.extend(walk(&entry.path()));
        } else if kind.is_file() {
            files.push(entry.path());
        }
    }
    files
}
