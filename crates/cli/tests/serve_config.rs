//! `ivshm serve --config FILE` as operators run it: a real `SIGHUP` reloads the file without
//! dropping connected peers and logs what happens to peers a change orphans; `intr`/`loc`/`sched`
//! are reported once; a bad file stops the program with `FILE:LINE: OPTION: message`; the
//! control socket refuses users other than root unless its mode says otherwise.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

mod common;
use common::{stream_stderr, wait_line, Peer};

/// Failure guard for every wait (never a timing assertion).
const GUARD: Duration = Duration::from_secs(30);

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ivshm-serve-cfg-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `ivshm serve --config FILE` with its stderr read line by line: every line is kept in the
/// returned log and sent on the channel.
fn serve(config: &Path) -> (Child, Receiver<String>, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ivshm"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (rx, log) = stream_stderr(&mut child);
    (child, rx, log)
}

fn signal(child: &Child, signal: Signal) {
    kill_process(Pid::from_raw(child.id() as i32).unwrap(), signal).unwrap();
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

impl Peer {
    /// The handshake of a peer joining a one-vector region that holds `others`: returns its id
    /// and its shm fd.
    fn handshake(&mut self, others: &[i64]) -> (i64, OwnedFd) {
        assert_eq!(self.recv().0, 0, "version");
        let (id, fd) = self.recv();
        assert!(fd.is_none());
        let (minus_one, shm) = self.recv();
        assert_eq!(minus_one, -1);
        for &other in others {
            let (value, fd) = self.recv();
            assert_eq!(
                (value, fd.is_some()),
                (other, true),
                "peer {other}'s vector"
            );
        }
        let (own, fd) = self.recv();
        assert_eq!((own, fd.is_some()), (id, true), "own vector");
        (id, shm.expect("shm fd"))
    }
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
    let (child, lines, log) = serve(&config);
    wait_line(
        &lines,
        &format!("listening on {}", root.join("control.sock").display()),
    );
    wait_line(
        &lines,
        &format!("listening on {}", root.join("vm1/factory.sock").display()),
    );
    assert_eq!(listing(&root.join("vm0")), ["factory.sock", "mem.sock"]);
    assert_eq!(listing(&root.join("vm1")), ["factory.sock"]);

    let mut first = Peer::connect(&root.join("vm0/mem.sock"));
    let (first_id, first_shm) = first.handshake(&[]);

    std::fs::write(&config, format!("{header}{AFTER}")).unwrap();
    signal(&child, Signal::HUP);
    // The orphan report: the socket goes, the peer that joined through it stays.
    let orphan = wait_line(&lines, "stay connected");
    assert!(
        orphan.contains("reload: VM vm0: removed socket"),
        "{orphan}"
    );
    assert!(
        orphan.contains(&format!("1 connected peer(s) [{first_id}]")),
        "{orphan}"
    );
    assert!(orphan.contains("region guest0mem"), "{orphan}");
    wait_line(&lines, "reload: VM vm1: added socket");
    // vm0's `subst ,guest0` maps every name it could ask for to `guest0...`: it cannot see `late`.
    assert_eq!(listing(&root.join("vm0")), ["factory.sock"]);
    assert_eq!(
        listing(&root.join("vm1")),
        ["factory.sock", "guest0mem.sock", "late.sock"]
    );

    // The first peer was not dropped: a newcomer through vm1 meets it, shares its memory, and
    // the first peer is told about the newcomer.
    let mut second = Peer::connect(&root.join("vm1/guest0mem.sock"));
    let (second_id, second_shm) = second.handshake(&[first_id]);
    let inode = |fd: &OwnedFd| rustix::fs::fstat(fd).unwrap().st_ino;
    assert_eq!(inode(&first_shm), inode(&second_shm));
    let (joined, fd) = first.recv();
    assert_eq!((joined, fd.is_some()), (second_id, true));

    // A second SIGHUP with an unchanged file changes nothing; the placement warning stays one.
    signal(&child, Signal::HUP);
    wait_line(&lines, "reload: nothing changed");
    let warnings = log
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains("cannot apply to QEMU guests"))
        .count();
    assert_eq!(warnings, 1, "{:#?}", log.lock().unwrap());

    signal(&child, Signal::TERM);
    let status = wait_exit(child);
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
    let (child, lines, _) = serve(&config);
    let line = wait_line(&lines, "permit");
    assert!(
        line.contains(&format!("{}:3: vm.vm0.rules: ", config.display())),
        "{line}"
    );
    assert!(line.contains("unknown keyword \"permit\""), "{line}");
    assert!(!wait_exit(child).success());
    assert!(!dir.join("root").exists(), "nothing was set up");
    let _ = std::fs::remove_dir_all(dir);
}

/// Waits (with the guard) for the child to exit.
fn wait_exit(mut child: Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + GUARD;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
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
        let (child, lines, _) = serve(&config);
        wait_line(&lines, &format!("listening on {}", control.display()));
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
        signal(&child, Signal::TERM);
        assert!(wait_exit(child).success());
    }
    let _ = std::fs::remove_dir_all(dir);
}
