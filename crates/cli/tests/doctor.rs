//! `ivshm doctor --domain FILE.xml` against a running `ivshm serve`: what will fail is named
//! with its fix (a VM directory QEMU's user cannot enter, `<msi vectors>` below the region's,
//! a missing socket), a domain that will work passes, a single-region socket is probed on
//! request, and the exit status says which (0 nothing fails, 2 something will).
//! QEMU's user is played by `nobody` (group `nogroup`), which every Debian system has.

use std::path::{Path, PathBuf};
use std::process::Command;

use ivshm_test_support::process::{HostProcess, Signal, Stream};
use ivshm_test_support::WAIT_GUARD as GUARD;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ivshm-doctor-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn domain(dir: &Path, socket: &Path, vectors: Option<u32>) -> PathBuf {
    let msi = vectors
        .map(|v| format!("<msi vectors='{v}' ioeventfd='on'/>"))
        .unwrap_or_default();
    let xml = format!(
        "<domain type='kvm'>\n  <name>vm0</name>\n  <devices>\n    <shmem name='mem'>\n      \
         <model type='ivshmem-doorbell'/>\n      <server path='{}'/>\n      {msi}\n    \
         </shmem>\n  </devices>\n</domain>\n",
        socket.display()
    );
    let path = dir.join(format!("domain-{}.xml", vectors.unwrap_or(0)));
    std::fs::write(&path, xml).unwrap();
    path
}

/// Runs `ivshm doctor ARGS`; returns the exit code and stdout.
fn doctor(args: &[&str], domain: &Path, control: &Path) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_ivshm"))
        .arg("doctor")
        .arg("--domain")
        .arg(domain)
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

fn serve_config(dir: &Path, group_line: &str) -> (HostProcess, PathBuf, PathBuf) {
    let root = dir.join("root");
    let config = dir.join("ivshm.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\n[defaults]\nvectors = 16\n{group_line}\n[[region]]\nname = \"mem\"\n\
             size = \"64K\"\n[vm.vm0]\nrules = [\"allow mem\"]\n",
            root.display().to_string()
        ),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    command.arg("serve").arg("--config").arg(&config);
    let server = HostProcess::spawn("ivshm serve --config", command).unwrap();
    let control = root.join("control.sock");
    server.wait_listening(&control, GUARD).unwrap();
    (server, root.join("vm0").join("mem.sock"), control)
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[test]
fn names_what_will_fail_and_passes_what_will_work() {
    if !is_root() {
        eprintln!("SKIPPED: doctor permission checks need root (files owned by root)");
        return;
    }
    let dir = temp_dir("named");
    // No group: root:root 0750, QEMU's user (nobody) cannot enter.
    let (mut server, socket, control) = serve_config(&dir, "");
    let (code, out) = doctor(
        &["--qemu-user", "nobody"],
        &domain(&dir, &socket, Some(2)),
        &control,
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("FAIL: user nobody cannot connect: ")
            && out.contains("vm0 (0:0 0750) lacks search (x) for user nobody"),
        "{out}"
    );
    assert!(
        out.contains("ok: region mem (VM vm0's mem): 65536 bytes, 16 vector(s)"),
        "{out}"
    );
    assert!(
        out.contains("FAIL: <msi vectors='2'> but region mem (VM vm0's mem) has 16 vectors")
            && out.contains("doorbells on vectors 2..15 are lost")
            && out.contains("Fix: <msi vectors='16' ioeventfd='on'/>"),
        "{out}"
    );
    assert!(out.contains("summary: 2 problem(s)"), "{out}");
    let (code, out) = doctor(
        &["--qemu-user", "nobody"],
        &domain(&dir, &socket, None),
        &control,
    );
    assert_eq!(code, Some(2));
    assert!(
        out.contains("no <msi vectors> (QEMU's default: 1) but region mem"),
        "{out}"
    );
    server.signal(Signal::TERM);
    assert!(server.wait_exit(GUARD).unwrap().success());

    // QEMU's group on the directory and the right vectors: nothing will fail.
    let (mut server, socket, control) = serve_config(&dir, "group = \"nogroup\"");
    let (code, out) = doctor(
        &["--qemu-user", "nobody"],
        &domain(&dir, &socket, Some(16)),
        &control,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ok: user nobody can connect to "), "{out}");
    assert!(out.contains("ok: <msi vectors='16'> matches"), "{out}");
    assert!(out.ends_with("summary: nothing here will fail\n"), "{out}");
    // Ids held back while a peer that saw them leave stays (the default): nothing to note.
    assert!(!out.contains("note:"), "{out}");
    // A socket that is not there.
    let (code, out) = doctor(
        &["--qemu-user", "nobody"],
        &domain(&dir, &socket.with_file_name("other.sock"), Some(16)),
        &control,
    );
    assert_eq!(code, Some(2));
    assert!(out.contains("FAIL: no socket at "), "{out}");
    server.signal(Signal::TERM);
    assert!(server.wait_exit(GUARD).unwrap().success());

    // Ids given again at once: worth a note (QEMU 7.2 dies of it), not a failure.
    let (mut server, socket, control) =
        serve_config(&dir, "group = \"nogroup\"\nid_reuse = \"immediate\"");
    let (code, out) = doctor(
        &["--qemu-user", "nobody"],
        &domain(&dir, &socket, Some(16)),
        &control,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(
            "note: region mem (VM vm0's mem) gives a departed peer's id to the next peer at once"
        ) && out.contains("QEMU 7.2 (Debian 12's) aborts")
            && out.contains("Set id_reuse = \"safe\""),
        "{out}"
    );
    server.signal(Signal::TERM);
    assert!(server.wait_exit(GUARD).unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_single_region_socket_is_probed_only_on_request() {
    let dir = temp_dir("single");
    let socket = dir.join("ivshm.sock");
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    command
        .args(["serve", "--size", "64K", "--vectors", "4", "--socket"])
        .arg(&socket);
    let mut server = HostProcess::spawn("ivshm serve", command).unwrap();
    server
        .wait_line_containing(Stream::Stderr, "listening on", GUARD)
        .unwrap();
    let xml = domain(&dir, &socket, Some(2));
    let control = dir.join("no-control.sock");
    let (code, out) = doctor(&["--qemu-user", "root"], &xml, &control);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("note: no region of the control socket serves"),
        "{out}"
    );
    assert!(out.contains("--probe joins it briefly"), "{out}");
    let (code, out) = doctor(&["--qemu-user", "root", "--probe"], &xml, &control);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("ok: the region on this socket (probed): 65536 bytes, 4 vector(s)"),
        "{out}"
    );
    assert!(
        out.contains("FAIL: <msi vectors='2'> but the region"),
        "{out}"
    );
    server.signal(Signal::TERM);
    assert!(server.wait_exit(GUARD).unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unreadable_or_foreign_xml_fails_with_a_message() {
    let dir = temp_dir("bad");
    let bad = dir.join("bad.xml");
    std::fs::write(&bad, "<network><name>x</name></network>").unwrap();
    let (code, out) = doctor(&[], &bad, &dir.join("c.sock"));
    assert_eq!(code, Some(1));
    assert!(out.contains("not a libvirt <domain>"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    let (code, out) = doctor(&[], &dir.join("missing.xml"), &dir.join("c.sock"));
    assert_eq!(code, Some(1));
    assert!(out.contains("reading "), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}
