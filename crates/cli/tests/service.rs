//! `ivshm` as a systemd service and as a package: readiness notification on a fake
//! `NOTIFY_SOCKET` (path and abstract names), `RELOADING=1`/`READY=1` around a SIGHUP reload and
//! `STOPPING=1` at the end; journal-friendly log lines when stderr is `$JOURNAL_STREAM`; man
//! pages and completions generated from the real command, with every subcommand; and the
//! default service configuration (`packaging/ivshm.toml`) served by a process whose only
//! capability is `CAP_CHOWN`, as `ivshm.service` runs it.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ivshm_test_support::process::{HostProcess, Signal, Stream};
use ivshm_test_support::WAIT_GUARD as GUARD;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ivshm-service-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ivshm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ivshm"))
}

/// The next datagram, or a failure after the guard.
fn receive(socket: &UnixDatagram) -> String {
    socket.set_read_timeout(Some(GUARD)).unwrap();
    let mut buf = [0u8; 1024];
    let n = socket
        .recv(&mut buf)
        .expect("no notification within the guard");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

fn nothing_pending(socket: &UnixDatagram) -> bool {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 64];
    socket.recv(&mut buf).is_err()
}

#[test]
fn single_region_server_is_ready_only_once_its_socket_accepts_and_says_stopping() {
    let dir = temp_dir("ready");
    let notify_path = dir.join("notify.sock");
    let receiver = UnixDatagram::bind(&notify_path).unwrap();
    let socket = dir.join("ivshm.sock");
    let mut command = ivshm();
    command
        .args(["serve", "--size", "64K", "--socket"])
        .arg(&socket)
        .env("NOTIFY_SOCKET", &notify_path);
    let mut server = HostProcess::spawn("ivshm serve", command).unwrap();

    let ready = receive(&receiver);
    assert!(
        ready.starts_with("READY=1\nSTATUS=serving 1 region(s)"),
        "{ready:?}"
    );
    // Readiness means bound: a peer connects at once, without retrying.
    UnixStream::connect(&socket).expect("socket not accepting when READY=1 arrived");

    server.signal(Signal::TERM);
    assert_eq!(receive(&receiver), "STOPPING=1\nSTATUS=shutting down\n");
    assert!(server.wait_exit(GUARD).unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_server_reports_reloads_on_an_abstract_notify_socket() {
    let dir = temp_dir("reload");
    let name = format!("ivshm-test-notify-{}", std::process::id());
    let receiver =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    let root = dir.join("root");
    let config = dir.join("ivshm.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\n[[region]]\nname = \"a\"\nsize = \"64K\"\n[vm.vm0]\nrules = [\"allow a\"]\n",
            root.display().to_string()
        ),
    )
    .unwrap();
    let mut command = ivshm();
    command
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", format!("@{name}"));
    let mut server = HostProcess::spawn("ivshm serve --config", command).unwrap();
    let ready = receive(&receiver);
    assert!(
        ready.starts_with("READY=1\nSTATUS=serving 1 region(s), 0 peer(s), 1 VM director(ies)"),
        "{ready:?}"
    );
    assert!(root.join("vm0").join("a.sock").exists());

    server.signal(Signal::HUP);
    let reloading = receive(&receiver);
    let lines: Vec<&str> = reloading.lines().collect();
    assert_eq!(lines[0], "RELOADING=1", "{reloading:?}");
    assert!(lines.iter().any(|l| l.starts_with("MONOTONIC_USEC=")));
    let ready = receive(&receiver);
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(nothing_pending(&receiver));

    server.signal(Signal::TERM);
    assert!(receive(&receiver).starts_with("STOPPING=1\n"));
    assert!(server.wait_exit(GUARD).unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unusable_notify_socket_is_a_warning_not_a_failure() {
    let dir = temp_dir("badnotify");
    let socket = dir.join("ivshm.sock");
    let mut command = ivshm();
    command
        .args(["serve", "--size", "64K", "--socket"])
        .arg(&socket)
        .env("NOTIFY_SOCKET", "relative/notify");
    let mut server = HostProcess::spawn("ivshm serve", command).unwrap();
    server
        .wait_line_containing(
            Stream::Stderr,
            "NOTIFY_SOCKET=\"relative/notify\" is not supported",
            GUARD,
        )
        .unwrap();
    UnixStream::connect(&socket).unwrap();
    server.signal(Signal::TERM);
    assert!(server.wait_exit(GUARD).unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `ivshm serve` with stderr to a file, `JOURNAL_STREAM` naming that file or not, until
/// a peer has joined and left; returns the log.
fn serve_log(dir: &Path, journal: bool) -> String {
    let socket = dir.join("ivshm.sock");
    let log_path = dir.join(if journal { "journal.log" } else { "plain.log" });
    let log = std::fs::File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    let mut command = ivshm();
    command
        // 65000 bytes is rounded up to 64 KiB with a warning.
        .args(["serve", "--size", "65000", "--socket"])
        .arg(&socket)
        .stderr(log);
    if journal {
        command.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    } else {
        command.env_remove("JOURNAL_STREAM");
    }
    let mut child = command.spawn().unwrap();
    let deadline = std::time::Instant::now() + GUARD;
    let peer = loop {
        if let Ok(peer) = UnixStream::connect(&socket) {
            break peer;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "server never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // The server's greeting arrives once it has accepted: then the join is logged.
    let mut byte = [0u8; 8];
    std::io::Read::read_exact(&mut &peer, &mut byte).unwrap();
    drop(peer);
    let deadline = std::time::Instant::now() + GUARD;
    while !std::fs::read_to_string(&log_path).unwrap().contains("left") {
        assert!(std::time::Instant::now() < deadline, "no leave line");
        std::thread::sleep(Duration::from_millis(20));
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(&log_path).unwrap()
}

#[test]
fn log_lines_for_the_journal_carry_no_timestamp_and_no_colour() {
    let dir = temp_dir("journal");
    let journal = serve_log(&dir, true);
    let plain = serve_log(&dir, false);
    let first = |log: &str| {
        log.lines()
            .find(|l| l.contains("joined"))
            .unwrap_or_else(|| panic!("no join line in {log:?}"))
            .to_string()
    };
    let (journal_join, plain_join) = (first(&journal), first(&plain));
    // The journal's priority prefix (info), then the level, no timestamp.
    assert!(
        journal_join.starts_with("<6> INFO ") || journal_join.starts_with("<6>INFO "),
        "journal line starts with its priority and level: {journal_join:?}"
    );
    // One line per join and leave, with the region, the VM (`-`: a single-region socket) and
    // the peer id.
    assert!(
        journal_join.contains("peer 0 joined region=default vm=- peer=0 "),
        "{journal_join:?}"
    );
    let leave = journal
        .lines()
        .find(|l| l.contains(" left: "))
        .unwrap_or_else(|| panic!("no leave line in {journal:?}"));
    assert!(
        leave.starts_with("<6>") && leave.contains("region=default vm=- peer=0 "),
        "{leave:?}"
    );
    // Warnings are priority 4, so `journalctl -p warning` finds them.
    let warning = journal
        .lines()
        .find(|l| l.contains(" WARN "))
        .unwrap_or_else(|| panic!("no warning in {journal:?}"));
    assert!(warning.starts_with("<4>"), "{warning:?}");
    // Every log line has its priority (the rest are the plain `listening on` lines, info
    // for the journal).
    assert!(
        journal
            .lines()
            .all(|l| l.starts_with('<') || l.starts_with("listening on ")),
        "{journal:?}"
    );
    assert!(
        plain_join.starts_with("20"),
        "a plain line starts with its timestamp: {plain_join:?}"
    );
    assert!(
        !journal.contains('\u{1b}'),
        "no escape sequences: {journal:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every visible subcommand path of `ivshm`, from `ivshm --help` output, recursively
/// (e.g. `["guest", "wait"]`).
fn subcommands(path: &[String]) -> Vec<Vec<String>> {
    let output = ivshm().args(path).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    let mut found = Vec::new();
    let mut in_commands = false;
    for line in help.lines() {
        if line == "Commands:" {
            in_commands = true;
            continue;
        }
        if in_commands {
            if line.is_empty() {
                break;
            }
            let name = line.split_whitespace().next().unwrap().to_string();
            if name == "help" {
                continue;
            }
            let mut sub = path.to_vec();
            sub.push(name);
            found.extend(subcommands(&sub));
            found.push(sub);
        }
    }
    found
}

#[test]
fn man_pages_and_completions_cover_every_subcommand() {
    let dir = temp_dir("generate");
    let status = ivshm()
        .args(["generate", "man"])
        .arg(dir.join("man"))
        .status()
        .unwrap();
    assert!(status.success());
    let status = ivshm()
        .args(["generate", "completions"])
        .arg(dir.join("completions"))
        .status()
        .unwrap();
    assert!(status.success());

    let all = subcommands(&[]);
    assert!(all.len() > 20, "{all:?}");
    assert!(
        !all.iter().any(|s| s[0] == "generate"),
        "generate stays hidden"
    );
    let root_page = std::fs::read_to_string(dir.join("man/ivshm.1")).unwrap();
    assert!(root_page.contains(".TH ivshm 1"), "{root_page}");
    assert!(
        !dir.join("man/ivshm-help.1").exists(),
        "clap's help gets no page"
    );
    let bash = std::fs::read_to_string(dir.join("completions/ivshm.bash")).unwrap();
    let zsh = std::fs::read_to_string(dir.join("completions/_ivshm")).unwrap();
    let fish = std::fs::read_to_string(dir.join("completions/ivshm.fish")).unwrap();
    for sub in &all {
        let page = dir.join("man").join(format!("ivshm-{}.1", sub.join("-")));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(
            text.contains(&format!(".TH ivshm-{} 1", sub.join("-"))),
            "{}",
            page.display()
        );
        let last = sub.last().unwrap();
        let parent_page = if sub.len() == 1 {
            root_page.clone()
        } else {
            std::fs::read_to_string(
                dir.join("man")
                    .join(format!("ivshm-{}.1", sub[..sub.len() - 1].join("-"))),
            )
            .unwrap()
        };
        let escaped = last.replace('-', "\\-");
        assert!(parent_page.contains(&escaped), "parent page lacks {last}");
        assert!(bash.contains(last.as_str()), "bash lacks {last}");
        assert!(zsh.contains(last.as_str()), "zsh lacks {last}");
        assert!(fish.contains(last.as_str()), "fish lacks {last}");
    }
    // Flags too, e.g. serve's.
    let serve = std::fs::read_to_string(dir.join("man/ivshm-serve.1")).unwrap();
    assert!(serve.contains("\\-\\-socket\\-group"), "{serve}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `setpriv` from util-linux, if present.
fn setpriv() -> Option<PathBuf> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

#[test]
fn default_service_config_runs_with_only_cap_chown() {
    if !is_root() {
        eprintln!("SKIPPED: default_service_config_runs_with_only_cap_chown: needs root");
        return;
    }
    let Some(setpriv) = setpriv() else {
        eprintln!("SKIPPED: default_service_config_runs_with_only_cap_chown: no setpriv");
        return;
    };
    let dir = temp_dir("caps");
    let root = dir.join("run-ivshm");
    // systemd's RuntimeDirectory=ivshm, RuntimeDirectoryMode=0755.
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The shipped file, with the root moved and a group that exists everywhere (the package
    // makes `ivshm`; `nogroup` stands in for it).
    let shipped = std::fs::read_to_string(repo_file("packaging/ivshm.toml")).unwrap();
    assert!(shipped.contains("root = \"/run/ivshm\""));
    assert!(shipped.contains("group = \"ivshm\""));
    let config = dir.join("ivshm.toml");
    std::fs::write(
        &config,
        shipped
            .replace(
                "\"/run/ivshm\"",
                &format!("{:?}", root.display().to_string()),
            )
            .replace("group = \"ivshm\"", "group = \"nogroup\""),
    )
    .unwrap();
    let mut command = Command::new(setpriv);
    command
        .args([
            "--bounding-set",
            "-all,+chown",
            "--inh-caps",
            "-all",
            "--no-new-privs",
        ])
        .arg(env!("CARGO_BIN_EXE_ivshm"))
        .args(["serve", "--config"])
        .arg(&config);
    let mut server = HostProcess::spawn("ivshm serve (CAP_CHOWN only)", command).unwrap();
    server
        .wait_line_containing(Stream::Stderr, "factory.sock", GUARD)
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let bounding = status
        .lines()
        .find(|l| l.starts_with("CapBnd:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    assert_eq!(bounding, "0000000000000001", "only CAP_CHOWN (bit 0)");
    let groups = std::fs::read_to_string("/etc/group").unwrap();
    let nogroup: u32 = groups
        .lines()
        .find_map(|l| l.strip_prefix("nogroup:x:"))
        .and_then(|rest| rest.split(':').next())
        .and_then(|gid| gid.parse().ok())
        .expect("a nogroup line in /etc/group");
    let vm_dir = root.join("vm0");
    let socket = vm_dir.join("shm0.sock");
    let dir_meta = std::fs::metadata(&vm_dir).unwrap();
    assert_eq!((dir_meta.gid(), dir_meta.mode() & 0o7777), (nogroup, 0o750));
    let sock_meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        (sock_meta.gid(), sock_meta.mode() & 0o7777),
        (nogroup, 0o660)
    );
    UnixStream::connect(&socket).unwrap();
    // Host commands are short-lived peers; with QEMU 7.2 (Debian 12's) guests on the region,
    // an id given again after its peer left crashes them, so the shipped region never reuses
    // ids: two `ivshm peers` one after the other, the first gone before the second joins, get
    // different ids.
    let self_id = || {
        let out = ivshm()
            .args(["peers", "--socket"])
            .arg(&socket)
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "{stdout}");
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("self id="))
            .and_then(|rest| rest.split_whitespace().next())
            .map_or_else(|| panic!("no self id in {stdout:?}"), str::to_string)
    };
    let first = self_id();
    server
        .wait_line_containing(Stream::Stderr, &format!("peer {first} left"), GUARD)
        .unwrap();
    let second = self_id();
    assert_ne!(
        first, second,
        "the shipped region gave a departed peer's id again"
    );
    // A reload works as well, and the end removes what the server made.
    server.signal(Signal::HUP);
    server
        .wait_line_containing(Stream::Stderr, "reload: nothing changed", GUARD)
        .unwrap();
    server.signal(Signal::TERM);
    assert!(server.wait_exit(GUARD).unwrap().success());
    assert!(!socket.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn policy_check_warns_when_the_group_cannot_reach_a_vm_directory() {
    let dir = temp_dir("reach");
    let config = dir.join("ivshm.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\n[defaults]\ngroup = \"nogroup\"\n[vm.shut]\ndir_mode = \"0700\"\n\
             rules = [\"allow *\"]\n[vm.open]\nrules = [\"allow *\"]\n",
            dir.join("root").display().to_string()
        ),
    )
    .unwrap();
    let check = |vm: &str| {
        let output = ivshm()
            .args(["policy", "check", "--config"])
            .arg(&config)
            .args(["--vm", vm, "anything"])
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stderr).unwrap()
    };
    let warning = check("shut");
    assert!(
        warning.contains("warning: VM shut: dir_mode 0700 keeps group nogroup out of "),
        "{warning}"
    );
    assert!(!check("open").contains("VM open: dir_mode"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn start_and_reload_warn_when_the_group_cannot_reach_a_vm_directory() {
    if !is_root() {
        eprintln!("SKIPPED: start_and_reload_warn_...: needs root (chown to nogroup)");
        return;
    }
    let dir = temp_dir("reach-serve");
    let root = dir.join("root");
    let config = dir.join("ivshm.toml");
    let write_config = |open_socket_mode: &str| {
        std::fs::write(
            &config,
            format!(
                "root = {:?}\n[defaults]\ngroup = \"nogroup\"\n[[region]]\nname = \"a\"\n\
                 size = \"64K\"\n[vm.shut]\ndir_mode = \"0700\"\nrules = [\"allow *\"]\n\
                 [vm.open]\nsocket_mode = \"{open_socket_mode}\"\nrules = [\"allow *\"]\n",
                root.display().to_string()
            ),
        )
        .unwrap();
    };
    write_config("0660");
    let mut command = ivshm();
    command.args(["serve", "--config"]).arg(&config);
    let mut server = HostProcess::spawn("ivshm serve --config", command).unwrap();
    let warning = server
        .wait_line_containing(Stream::Stderr, "VM shut: dir_mode 0700 keeps group", GUARD)
        .unwrap();
    assert!(warning.contains(" WARN "), "{warning}");
    assert!(warning.contains("keeps group nogroup out of "), "{warning}");
    let control = root.join("control.sock");
    server.wait_listening(&control, GUARD).unwrap();
    let reload = || {
        let output = ivshm()
            .args(["reload", "--control"])
            .arg(&control)
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    };
    // A reload that closes the sockets of VM open to the group says so; the warning about
    // VM shut, which the reload did not bring, is not repeated to the one reloading.
    write_config("0640");
    let out = reload();
    assert!(
        out.contains("warning: VM open: socket_mode 0640 lets group nogroup see but not connect"),
        "{out}"
    );
    assert!(!out.contains("VM shut"), "{out}");
    server
        .wait_line_containing(
            Stream::Stderr,
            "reload: warning: VM open: socket_mode 0640",
            GUARD,
        )
        .unwrap();
    // Put right: the sockets change back, no warning.
    write_config("0660");
    let out = reload();
    assert!(!out.contains("warning"), "{out}");
    let meta = std::fs::metadata(root.join("open").join("a.sock")).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o660);
    server.signal(Signal::TERM);
    assert!(server.wait_exit(GUARD).unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}
