//! libvirt end to end: real domains (`virsh create`), QEMU as libvirt's unprivileged user
//! (`libvirt-qemu`), with the `<shmem>` elements of the README's "With libvirt" section taken
//! verbatim (only `/run/ivshm` moved to a scratch directory) on
//! (a) `ivshm serve --socket-mode 0660 --socket-group libvirt-qemu`, as the README runs it,
//! (b) `examples/ivshm.toml` as shipped (VM directory group `libvirt-qemu`; only the root moved), and
//! (c) the package's `/etc/ivshm/ivshm.toml` (`packaging/ivshm.toml`), its group standing in for
//! a supplementary group of QEMU's, host commands coming and going while the guest runs.
//! Each checks the guest's IVPosition against the id the host peer saw join, a doorbell from
//! the guest to the host peer, and memory written on each side read back on the other.
//!
//! Daemons: the running libvirtd, or virtlogd + libvirtd started by hand and stopped after
//! (see `ivshm_e2e::libvirt`). Gated like the other end-to-end tests (`IVSHM_E2E=1`: missing
//! libvirt fails).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ivshm_e2e::host::run_to_completion;
use ivshm_e2e::ivshm::{ivshm_command, read_shared, write_shared};
use ivshm_e2e::libvirt::{self, Libvirt, LibvirtGuest};
use ivshm_e2e::{
    require_e2e, HostProcess, IvshmListener, QemuGuest, ScratchDir, ShellDevice, Stream,
};

const BOOT: Duration = Duration::from_secs(240);
const HOST: Duration = Duration::from_secs(60);
const STEP: Duration = Duration::from_secs(60);

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// The README's `<shmem>` blocks, with `/run/ivshm` moved to `root`.
fn readme_shmem(root: &Path) -> Vec<String> {
    let readme = std::fs::read_to_string(repo_file("README.md")).unwrap();
    let section = readme
        .split("\n## With libvirt\n")
        .nth(1)
        .expect("README has a 'With libvirt' section")
        .split("\n## ")
        .next()
        .unwrap();
    libvirt::shmem_blocks(section)
        .into_iter()
        .map(|block| block.replace("/run/ivshm", &root.display().to_string()))
        .collect()
}

/// Starts `ivshm serve ARGS`; returns once `ready` is on its stderr.
fn serve(args: &[&str], extra: &[&Path], ready: &str) -> HostProcess {
    let mut command = ivshm_command(["serve"]).unwrap();
    command.args(args).args(extra);
    let server = HostProcess::spawn("ivshm serve", command).unwrap();
    server
        .wait_line(Stream::Stderr, ready, HOST, |l| l.contains(ready))
        .unwrap();
    server
}

/// The domain's QEMU runs as libvirt's unprivileged user.
fn assert_runs_as_libvirt_qemu(booted: &LibvirtGuest) {
    let (uid, _) = libvirt::user_ids(libvirt::QEMU_USER).unwrap();
    let pid = booted.qemu_pid.expect("libvirt's pid file of the domain");
    assert_eq!(
        libvirt::process_uid(pid),
        Some(uid),
        "QEMU (pid {pid}) runs as {}",
        libvirt::QEMU_USER
    );
}

/// `ivshm doctor` on the domain's XML (QEMU's user from the real `/etc/libvirt/qemu.conf`):
/// nothing will fail and QEMU's user can connect.
fn doctor_passes(booted: &LibvirtGuest, dir: &Path, control: &Path) {
    let xml = dir.join("doctor.xml");
    std::fs::write(&xml, &booted.xml).unwrap();
    let mut command = ivshm_command(["doctor", "--domain"]).unwrap();
    command.arg(&xml).arg("--control").arg(control);
    let mut doctor = HostProcess::spawn("ivshm doctor", command).unwrap();
    let status = doctor.wait_exit(HOST).unwrap();
    let out = doctor.lines(Stream::Stdout).join("\n");
    assert!(status.success(), "{out}");
    assert!(
        out.contains("ok: libvirt's QEMU (user libvirt-qemu) can connect to "),
        "{out}"
    );
    assert!(out.ends_with("summary: nothing here will fail"), "{out}");
}

/// What the host writes before the guest boots, at 0x1000.
const FROM_HOST: &[u8; 24] = b"host->guest via libvirt\0";
/// What the guest writes, at 0x2000.
const FROM_GUEST: &[u8; 12] = b"guest->host!";

/// Before the guest boots: the host writes [`FROM_HOST`] through a short-lived peer. (Its id
/// is not reused while QEMU runs: QEMU 7.2 corrupts its heap and crashes when a peer id it saw
/// leave joins again, which `lowest-free` regions do; see the README.)
fn host_writes(host_socket: &Path, listener: &IvshmListener) {
    write_shared(host_socket, 0x1000, FROM_HOST, HOST).unwrap();
    let (writer, _) = listener.wait_join(HOST).unwrap();
    listener.wait_leave(writer, HOST).unwrap();
}

/// IVPosition is the id the host peer saw join; the guest rings the host peer, reads what
/// the host wrote and writes [`FROM_GUEST`].
fn guest_side(guest: &mut QemuGuest, listener: &IvshmListener, joined_id: u16) {
    let device = ShellDevice::find_one(guest, STEP).unwrap();
    let position = device.read_ivposition(guest, STEP).unwrap();
    assert_eq!(position, u32::from(joined_id), "IVPosition");
    device.ring_doorbell(guest, listener.id(), 1, STEP).unwrap();
    listener.wait_doorbell(1, HOST).unwrap();
    assert_eq!(
        device
            .read_shared(guest, 0x1000, FROM_HOST.len(), STEP)
            .unwrap(),
        FROM_HOST
    );
    device
        .write_shared(guest, 0x2000, FROM_GUEST, STEP)
        .unwrap();
}

/// The guest powers off and the host peer sees it leave; then the host reads what the guest
/// wrote, and the server stops cleanly.
fn finish(
    mut booted: LibvirtGuest,
    listener: &IvshmListener,
    joined: u16,
    host_socket: &Path,
    mut server: HostProcess,
) {
    assert!(booted.guest.poweroff(STEP).unwrap().success());
    listener.wait_leave(joined, HOST).unwrap();
    assert_eq!(
        read_shared(host_socket, 0x2000, FROM_GUEST.len(), HOST).unwrap(),
        FROM_GUEST
    );
    assert!(server.terminate(HOST).unwrap().success());
}

#[test]
fn single_socket_with_socket_group_as_the_readme_says() {
    let assets = require_e2e!();
    if !libvirt::available_for_test("libvirt::single_socket") {
        return;
    }
    let libvirt = Libvirt::shared().unwrap();
    let dir = ScratchDir::new().unwrap();
    let root = dir.join("run-ivshm");
    std::fs::create_dir(&root).unwrap();
    let blocks = readme_shmem(&root);
    assert_eq!(
        blocks.len(),
        2,
        "README: one <shmem> per set-up: {blocks:?}"
    );
    let socket = root.join("ivshm.sock");
    assert!(blocks[0].contains(&format!("<server path='{}'/>", socket.display())));

    // The README's command line, socket moved.
    let server = serve(
        &[
            "--size",
            "16M",
            "--vectors",
            "2",
            "--socket-mode",
            "0660",
            "--socket-group",
            "libvirt-qemu",
            "--socket",
        ],
        &[&socket],
        "listening on",
    );
    let listener = IvshmListener::start(&socket, HOST).unwrap();
    host_writes(&socket, &listener);
    let builder = QemuGuest::builder(&assets, "libvirt-single");
    let mut booted = libvirt::boot(&libvirt, &builder, dir.path(), &blocks[0], BOOT).unwrap();
    assert_runs_as_libvirt_qemu(&booted);
    let (joined, vectors) = listener.wait_join(HOST).unwrap();
    assert_eq!(vectors, 2);
    guest_side(&mut booted.guest, &listener, joined);
    doctor_passes(&booted, dir.path(), &root.join("no-control.sock"));

    finish(booted, &listener, joined, &socket, server);
}

#[test]
fn named_regions_of_the_shipped_example_with_the_libvirt_group() {
    let assets = require_e2e!();
    if !libvirt::available_for_test("libvirt::named_regions") {
        return;
    }
    let libvirt = Libvirt::shared().unwrap();
    let dir = ScratchDir::new().unwrap();
    let root = dir.join("run-ivshm");
    let blocks = readme_shmem(&root);
    let vm0_socket = root.join("vm0").join("mem.sock");
    assert!(blocks[1].contains(&format!("<server path='{}'/>", vm0_socket.display())));
    assert!(blocks[1].contains("<msi vectors='16'"));

    // examples/ivshm.toml as shipped; only the root moves (and the QNX file's path).
    let examples = repo_file("examples");
    let shipped = std::fs::read_to_string(examples.join("ivshm.toml")).unwrap();
    assert!(shipped.contains("\ngroup = \"libvirt-qemu\"\n"));
    let config_text = shipped
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
        );
    let config = dir.join("ivshm.toml");
    std::fs::write(&config, config_text).unwrap();
    let control = root.join("control.sock");
    let server = serve(
        &["--config"],
        &[&config],
        &format!("listening on {}", control.display()),
    );

    // The host peer joins guest0mem through the monitor VM's directory.
    let host_socket = root.join("monitor").join("guest0mem.sock");
    let listener = IvshmListener::start(&host_socket, HOST).unwrap();
    assert_eq!(listener.id(), 0, "lowest-free ids");
    host_writes(&host_socket, &listener);
    let builder = QemuGuest::builder(&assets, "libvirt-named");
    let mut booted = libvirt::boot(&libvirt, &builder, dir.path(), &blocks[1], BOOT).unwrap();
    assert_runs_as_libvirt_qemu(&booted);
    let (joined, vectors) = listener.wait_join(HOST).unwrap();
    // Not 1: the writer's id is held back while the listener, which saw it leave, stays.
    assert_eq!(vectors, 16);
    assert_ne!(joined, 1, "the id of a peer the listener saw leave");
    guest_side(&mut booted.guest, &listener, joined);
    doctor_passes(&booted, dir.path(), &control);

    // The control socket sees the guest in guest0mem, joined through vm0's mem.sock.
    let mut vms = ivshm_command(["vms", "--control"]).unwrap();
    vms.arg(&control);
    let lines = run_to_completion("ivshm vms", vms, HOST).unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("mem -> guest0mem") && l.contains(&format!("peer-ids=[{joined}]"))),
        "{lines:?}"
    );

    finish(booted, &listener, joined, &host_socket, server);
}

/// The `<shmem>` block in the comment at the top of `packaging/ivshm.toml`.
fn packaged_shmem(packaged: &str) -> String {
    let comment: Vec<&str> = packaged
        .lines()
        .filter_map(|l| l.strip_prefix("#     "))
        .collect();
    let start = comment
        .iter()
        .position(|l| l.contains("<shmem"))
        .expect("a <shmem> block in packaging/ivshm.toml's comment");
    let end = comment
        .iter()
        .position(|l| l.contains("</shmem>"))
        .expect("its </shmem>");
    comment[start..=end].join("\n") + "\n"
}

/// The supplementary groups and the effective group of process `pid` (`/proc/PID/status`).
fn process_groups(pid: u32) -> (Vec<u32>, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect()
    };
    (field("Groups:"), field("Gid:")[1])
}

/// The package's `/etc/ivshm/ivshm.toml` as shipped, with the root moved and its group `ivshm`
/// (which the package makes and adds `libvirt-qemu` to) replaced by the primary group of
/// `libvirt-qemu` in /etc/passwd (`kvm` on Debian), which QEMU holds only as a supplementary
/// group under libvirt (its process group is libvirt's `group`, `libvirt-qemu`): access through
/// a supplementary group, as with the package's `ivshm`.
/// Host commands come and go while the guest runs (ids count up, so QEMU 7.2 never sees an
/// id again) and the guest keeps working.
#[test]
fn packaged_configuration_through_a_supplementary_group_of_qemu() {
    let assets = require_e2e!();
    if !libvirt::available_for_test("libvirt::packaged") {
        return;
    }
    let libvirt = Libvirt::shared().unwrap();
    let dir = ScratchDir::new().unwrap();
    let root = dir.join("run-ivshm");
    let packaged = std::fs::read_to_string(repo_file("packaging/ivshm.toml")).unwrap();
    assert!(packaged.contains("\ngroup = \"ivshm\"\n"));
    assert!(packaged.contains("\nid_policy = \"increasing\"\n"));
    // libvirt-qemu's primary group in /etc/passwd (kvm on Debian).
    let (_, primary) = libvirt::user_ids(libvirt::QEMU_USER).unwrap();
    let group = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 3 && f[2].parse() == Ok(primary)).then(|| f[0].to_string())
        })
        .expect("libvirt-qemu's primary group in /etc/group");
    let config_text = packaged
        .replace(
            "root = \"/run/ivshm\"",
            &format!("root = {:?}", root.display().to_string()),
        )
        .replace("\ngroup = \"ivshm\"\n", &format!("\ngroup = {group:?}\n"));
    let config = dir.join("ivshm.toml");
    std::fs::write(&config, config_text).unwrap();
    let control = root.join("control.sock");
    let server = serve(
        &["--config"],
        &[&config],
        &format!("listening on {}", control.display()),
    );
    let socket = root.join("vm0").join("shm0.sock");
    let block = packaged_shmem(&packaged).replace("/run/ivshm", &root.display().to_string());
    assert!(
        block.contains(&format!("<server path='{}'/>", socket.display())),
        "{block}"
    );

    let listener = IvshmListener::start(&socket, HOST).unwrap();
    host_writes(&socket, &listener);
    let builder = QemuGuest::builder(&assets, "libvirt-packaged");
    let mut booted = libvirt::boot(&libvirt, &builder, dir.path(), &block, BOOT).unwrap();
    assert_runs_as_libvirt_qemu(&booted);
    let pid = booted.qemu_pid.unwrap();
    let (groups, gid) = process_groups(pid);
    assert!(
        groups.contains(&primary) && gid != primary,
        "QEMU (pid {pid}) holds {group} ({primary}) only as a supplementary group: groups \
         {groups:?}, gid {gid}"
    );
    let (joined, vectors) = listener.wait_join(HOST).unwrap();
    assert_eq!(vectors, 2);
    // Host commands join and leave while QEMU runs: each gets a new id.
    for _ in 0..3 {
        host_writes(&socket, &listener);
    }
    guest_side(&mut booted.guest, &listener, joined);
    doctor_passes(&booted, dir.path(), &control);

    finish(booted, &listener, joined, &socket, server);
}
