//! `ivshm serve --config FILE` as operators run it: a real `SIGHUP` reloads the file without
//! dropping connected peers and logs what happens to peers a change orphans; `intr`/`loc`/`sched`
//! are reported once; a bad file stops the program with `FILE:LINE: OPTION: message`; the
//! control socket refuses users other than root unless its mode says otherwise.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ivshm_test_support::process::{HostProcess, Signal, Stream};
use ivshm_test_support::v0::RawPeer;
use ivshm_test_support::WAIT_GUARD as GUARD;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ivshm-serve-cfg-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `ivshm serve --config FILE` with its output captured line by line.
fn serve(config: &Path) -> HostProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    command.arg("serve").arg("--config").arg(config);
    HostProcess::spawn("ivshm serve --config", command).unwrap()
}

/// Waits (with the guard) for a stderr line containing `needle`; returns it.
fn wait_line(server: &HostProcess, needle: &str) -> String {
    server
        .wait_line_containing(Stream::Stderr, needle, GUARD)
        .unwrap()
}

/// Socket names in a directory, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

const BEFORE: &str = r#"
[defaults]
vectors = 1

[vm.vm0]
qnx = """
    subst ,guest0
    create mem,4096
    loc 0x1c000000
    intr gic:40
    sched 10
"""

[vm.vm1]
rules = ["allow late"]
"#;

/// vm0 may no longer use `mem`; vm1 may now see `guest0mem`; a region `late` is new.
const AFTER: &str = r#"
[defaults]
vectors = 1

[[region]]
name = "late"
size = 4096

[vm.vm0]
qnx = """
    deny mem
    subst ,guest0
    create mem,4096
    loc 0x1c000000
    intr gic:40
    sched 10
"""

[vm.vm1]
rules = ["allow late", "allow guest0mem"]
"#;

#[test]
fn sighup_reloads_without_dropping_peers_and_reports_orphans() {
    let dir = temp_dir("hup");
    let root = dir.join("root");
    let config = dir.join("ivshm.toml");
    let header = format!("root = {:?}\n", root.display().to_string());
    std::fs::write(&config, format!("{header}{BEFORE}")).unwrap();
    let mut server = serve(&config);
    wait_line(
        &server,
        &format!("listening on {}", root.join("control.sock").display()),
    );
    wait_line(
        &server,
        &format!("listening on {}", root.join("vm1/factory.sock").display()),
    );
    assert_eq!(listing(&root.join("vm0")), ["factory.sock", "mem.sock"]);
    assert_eq!(listing(&root.join("vm1")), ["factory.sock"]);

    let mut first = RawPeer::connect(&root.join("vm0/mem.sock"));
    let first_joined = first.handshake(1, &[]);
    let (first_id, first_shm) = (first_joined.id, first_joined.shm);

    std::fs::write(&config, format!("{header}{AFTER}")).unwrap();
    server.signal(Signal::HUP);
    // The orphan report: the socket goes, the peer that joined through it stays.
    let orphan = wait_line(&server, "stay connected");
    assert!(
        orphan.contains("reload: VM vm0: removed socket"),
        "{orphan}"
    );
    assert!(
        orphan.contains(&format!("1 connected peer(s) [{first_id}]")),
        "{orphan}"
    );
    assert!(orphan.contains("region guest0mem"), "{orphan}");
    wait_line(&server, "reload: VM vm1: added socket");
    // vm0's `subst ,guest0` maps every name it could ask for to `guest0...`: it cannot see `late`.
    assert_eq!(listing(&root.join("vm0")), ["factory.sock"]);
    assert_eq!(
        listing(&root.join("vm1")),
        ["factory.sock", "guest0mem.sock", "late.sock"]
    );

    // The first peer was not dropped: a newcomer through vm1 meets it, shares its memory, and
    // the first peer is told about the newcomer.
    let mut second = RawPeer::connect(&root.join("vm1/guest0mem.sock"));
    let second_joined = second.handshake(1, &[first_id]);
    let inode = |fd: &OwnedFd| rustix::fs::fstat(fd).unwrap().st_ino;
    assert_eq!(inode(&first_shm), inode(&second_joined.shm));
    first.expect_join(second_joined.id, 1);

    // A second SIGHUP with an unchanged file changes nothing; the placement warning stays one.
    server.signal(Signal::HUP);
    wait_line(&server, "reload: nothing changed");
    let log = server.lines(Stream::Stderr);
    let warnings = log
        .iter()
        .filter(|line| line.contains("cannot apply to QEMU guests"))
        .count();
    assert_eq!(warnings, 1, "{log:#?}");

    let status = server.terminate(GUARD).unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!root.join("vm0").exists() && !root.join("vm1").exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_bad_file_stops_the_server_with_file_line_and_option() {
    let dir = temp_dir("bad");
    let config = dir.join("ivshm.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\n[vm.vm0]\nrules = [\"allow a\", \"permit b\"]\n",
            dir.join("root").display().to_string()
        ),
    )
    .unwrap();
    let mut server = serve(&config);
    let line = wait_line(&server, "permit");
    assert!(
        line.contains(&format!("{}:3: vm.vm0.rules: ", config.display())),
        "{line}"
    );
    assert!(line.contains("unknown keyword \"permit\""), "{line}");
    assert!(!server.wait_exit(GUARD).unwrap().success());
    assert!(!dir.join("root").exists(), "nothing was set up");
    let _ = std::fs::remove_dir_all(dir);
}

/// `ivshm stats` as the unprivileged user `nobody` (uid/gid 65534) through `setpriv`; `None`
/// when this test cannot switch users (not root, or no `setpriv`).
fn stats_as_nobody(control: &Path) -> Option<std::process::Output> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_ivshm"))
        .args(["stats", "--control"])
        .arg(control)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    Some(output)
}

#[test]
fn the_control_socket_is_root_only_by_default() {
    let dir = temp_dir("rootonly");
    let config = dir.join("ivshm.toml");
    let control = dir.join("root/control.sock");
    for (mode_line, nobody_may) in [("", false), ("control_mode = \"0666\"\n", true)] {
        let text = format!(
            "root = {:?}\n{mode_line}[vm.vm0]\n",
            dir.join("root").display().to_string()
        );
        std::fs::write(&config, text).unwrap();
        let mut server = serve(&config);
        wait_line(&server, &format!("listening on {}", control.display()));
        let as_root = Command::new(env!("CARGO_BIN_EXE_ivshm"))
            .args(["stats", "--control"])
            .arg(&control)
            .output()
            .unwrap();
        assert!(as_root.status.success(), "{as_root:?}");
        assert!(String::from_utf8_lossy(&as_root.stdout).starts_with("joins=0 "));
        match stats_as_nobody(&control) {
            None => eprintln!("SKIPPED: cannot run a command as nobody here"),
            Some(output) if nobody_may => assert!(output.status.success(), "{output:?}"),
            Some(output) => {
                assert!(!output.status.success(), "{output:?}");
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert!(stderr.contains("Permission denied"), "{stderr}");
                assert!(stderr.contains("control socket"), "{stderr}");
            }
        }
        assert!(server.terminate(GUARD).unwrap().success());
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// After `kill -9` the sockets stay in the VM directories; the socket of a region made at run
/// time then refuses every connection, and nothing binds its name again. The next start
/// removes it and says so.
#[test]
fn a_restart_after_sigkill_removes_the_sockets_left_behind() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;

    let dir = temp_dir("sigkill");
    let root = dir.join("root");
    let config = dir.join("ivshm.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\n[defaults]\nvectors = 1\npersist = true\n[vm.vm0]\n",
            root.display().to_string()
        ),
    )
    .unwrap();
    let factory = root.join("vm0/factory.sock");
    let mut server = serve(&config);
    wait_line(&server, &format!("listening on {}", factory.display()));
    let mut stream = UnixStream::connect(&factory).unwrap();
    stream
        .write_all(b"{\"op\":\"create\",\"name\":\"scratch\",\"size\":4096}\n")
        .unwrap();
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).unwrap();
    assert!(answer.contains("GSS_OK"), "{answer}");
    assert_eq!(listing(&root.join("vm0")), ["factory.sock", "scratch.sock"]);

    server.signal(Signal::KILL);
    server.wait_exit(GUARD).unwrap();
    let scratch = root.join("vm0/scratch.sock");
    let refused = UnixStream::connect(&scratch).unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );

    let mut again = serve(&config);
    wait_line(&again, &format!("listening on {}", factory.display()));
    wait_line(
        &again,
        &format!("removed stale socket {}", scratch.display()),
    );
    assert_eq!(listing(&root.join("vm0")), ["factory.sock"]);
    assert!(again.terminate(GUARD).unwrap().success());
    let _ = std::fs::remove_dir_all(dir);
}
