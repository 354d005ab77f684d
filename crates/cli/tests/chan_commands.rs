//! `ivshm chan` and `ivshm guest chan` as built, against `ivshm serve` (each command a host
//! peer) and a fake sysfs tree (guest devices in sysfs mode, polling):
//!
//! - the commands' exact output: `init`, `list`, `send` (arguments, `@FILE`, stdin lines),
//!   `recv` (text, hex, files), `--peer`, a closed or absent other end, timeouts;
//! - two host processes exchange 100,000 checksummed messages of random sizes (1 B to 64 KiB)
//!   both ways at once through the server's region: none lost, duplicated, reordered or
//!   damaged;
//! - a peer (this test) writes random words over one channel's rings while two processes send
//!   and receive on it: they end with an error that says what went wrong (the channel is
//!   corrupt, or a message did not verify, or a timeout), never a panic, a signal or a hang,
//!   while two other processes exchange 20,000 messages on another channel of the region
//!   undisturbed;
//! - the guest commands over two fake devices sharing one BAR2 file, with the same output, and
//!   the hidden `selftest` (the doorbell conformance suite) on them.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ivshm_channel::Region;
use ivshm_client::{ConnectOptions, Peer, PeerDoorbell};
use ivshm_test_support::fds::wait_listening;
use ivshm_test_support::process::{HostProcess, Stream};
use ivshm_test_support::socket_path;
use ivshm_test_support::sysfs::{doorbell_resource, FakeFunction, FakeSysfs};

const STEP: Duration = Duration::from_secs(60);
/// Bound on the 100,000-message exchange (it takes seconds; a loaded CI machine may be slow).
const BULK: Duration = Duration::from_secs(600);

fn ivshm(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    command.args(args).env("RUST_LOG", "warn");
    command
}

/// `ivshm serve` with a memfd region of `size` and 2 vectors on `socket`.
fn serve(socket: &Path, size: &str) -> HostProcess {
    let mut command = ivshm(&["serve", "--size", size, "--vectors", "2", "--socket"]);
    command.arg(socket);
    let server = HostProcess::spawn("ivshm serve", command).unwrap();
    wait_listening(socket);
    server
}

/// `ivshm chan init --socket <socket> --channels <channels> --ring-size <ring>`, which must
/// succeed.
fn init(socket: &str, channels: &str, ring: &str) {
    let (ok, _, err) = run(&[
        "chan",
        "init",
        "--socket",
        socket,
        "--channels",
        channels,
        "--ring-size",
        ring,
    ]);
    assert!(ok, "{err}");
}

/// Runs `ivshm args` to its end; returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = ivshm(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn start(name: &str, args: &[&str]) -> HostProcess {
    HostProcess::spawn(name, ivshm(args)).unwrap()
}

/// The stdout lines of `p` after it ended successfully.
fn finish(mut p: HostProcess) -> Vec<String> {
    p.wait_success(STEP).unwrap();
    p.lines(Stream::Stdout)
}

fn without_self(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .map(String::as_str)
        .filter(|l| !l.starts_with("self id="))
        .collect()
}

/// The peer id in the `self id=<ID> ...` line of `p`.
fn self_id(p: &HostProcess) -> String {
    let lines = p.lines(Stream::Stdout);
    let first = lines.first().expect("a self line");
    let id = first.strip_prefix("self id=").expect("a self line");
    id.split(' ').next().unwrap().to_string()
}

/// A receiver's lines without its `peer id=` line: it prints one only if it sees the other end
/// attached, which a sender that sends and closes quickly may no longer be.
fn received(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .map(String::as_str)
        .filter(|l| !l.starts_with("peer id="))
        .collect()
}

#[test]
fn host_commands_format_list_send_and_receive() {
    let socket = socket_path("chan-cmds");
    let _server = serve(&socket, "1M");
    let s = socket.to_str().unwrap();

    let (ok, out, _) = run(&["chan", "list", "--socket", s]);
    assert!(ok);
    assert_eq!(
        without_self(&out.lines().map(String::from).collect::<Vec<_>>()),
        ["region unformatted"]
    );
    let (ok, out, _) = run(&[
        "chan",
        "init",
        "--socket",
        s,
        "--channels",
        "8",
        "--ring-size",
        "16K",
    ]);
    assert!(ok);
    let region_line = "region channels=8 ring_size=16384 max_message=16320 layout_size=274432";
    assert!(out.ends_with(&format!("{region_line}\n")), "{out}");
    let (ok, _, err) = run(&["chan", "init", "--socket", s]);
    assert!(
        !ok && err.contains("formatted already") && err.contains("--force"),
        "{err}"
    );

    // Text: arguments and a file, then the receiver sees the sender close.
    let dir = std::env::temp_dir().join(format!("ivshm-chan-cmds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("payload");
    std::fs::write(&file, b"line one\nline\ttwo\\\x00\xff").unwrap();
    let recv = start("recv", &["chan", "recv", "--socket", s, "--name", "demo"]);
    recv.wait_stdout_line("channel name=demo side=a", STEP)
        .unwrap();
    let at_file = format!("@{}", file.display());
    let send = start(
        "send",
        &[
            "chan", "send", "--socket", s, "--name", "demo", "hello", &at_file,
        ],
    );
    let sent = finish(send);
    let receiver = format!("peer id={}", self_id(&recv));
    assert_eq!(
        without_self(&sent),
        [
            "channel name=demo side=b",
            &receiver,
            "sent len=5",
            "sent len=20"
        ]
    );
    let got = finish(recv);
    assert_eq!(
        received(&got)[1..],
        [
            "channel name=demo side=a",
            "message len=5 data=hello",
            "message len=20 data=line one\\nline\\ttwo\\\\\\x00\\xff",
            "closed",
        ]
    );

    // The sender first, lines from stdin, `--count` repeating, hex and files, `--peer`.
    let mut send = HostProcess::spawn_with_stdin(
        "send-stdin",
        ivshm(&[
            "chan",
            "send",
            "--socket",
            s,
            "--name",
            "lines",
            "--timeout",
            "60",
        ]),
    )
    .unwrap();
    send.wait_stdout_line("channel name=lines side=a", STEP)
        .unwrap();
    std::io::Write::write_all(send.stdin().unwrap(), b"first\n\nsecond\r\n").unwrap();
    send.close_stdin();
    send.wait_stdout_line("sent len=6", STEP).unwrap();
    let sender_id = self_id(&send);
    let (ok, out, _) = run(&[
        "chan", "recv", "--socket", s, "--name", "lines", "--count", "2", "--format", "hex",
        "--peer", &sender_id,
    ]);
    assert!(ok);
    let lines: Vec<String> = out.lines().map(String::from).collect();
    assert_eq!(
        without_self(&lines)[2..],
        [
            "message len=5 hex=6669727374",
            "message len=6 hex=7365636f6e64"
        ]
    );
    finish(send);

    let files = dir.join("files");
    let recv = start(
        "recv-files",
        &[
            "chan",
            "recv",
            "--socket",
            s,
            "--name",
            "files",
            "--count",
            "3",
            "--out-dir",
            files.to_str().unwrap(),
        ],
    );
    recv.wait_stdout_line("channel name=files side=a", STEP)
        .unwrap();
    let (ok, _, err) = run(&[
        "chan", "send", "--socket", s, "--name", "files", "--count", "3", "x", "yy",
    ]);
    assert!(ok, "{err}");
    let got = finish(recv);
    assert_eq!(
        got.last().unwrap(),
        &format!("message len=1 file={}", files.join("3").display())
    );
    assert_eq!(std::fs::read(files.join("1")).unwrap(), b"x");
    assert_eq!(std::fs::read(files.join("2")).unwrap(), b"yy");
    assert_eq!(std::fs::read(files.join("3")).unwrap(), b"x");

    // `--peer` names someone else: refused once the other end is there.
    let recv = start(
        "recv-peer",
        &[
            "chan", "recv", "--socket", s, "--name", "who", "--peer", "999",
        ],
    );
    recv.wait_stdout_line("channel name=who side=a", STEP)
        .unwrap();
    let (_, _, _) = run(&[
        "chan",
        "send",
        "--socket",
        s,
        "--name",
        "who",
        "--timeout",
        "5",
        "hi",
    ]);
    let mut recv = recv;
    assert!(!recv.wait_exit(STEP).unwrap().success());
    let err = recv.output(Stream::Stderr);
    assert!(
        err.contains("is open at peer") && err.contains("not at peer 999"),
        "{err}"
    );

    // Nobody takes the messages: a timeout that says so; a listing of what is open.
    let (ok, _, err) = run(&[
        "chan",
        "send",
        "--socket",
        s,
        "--name",
        "void",
        "--timeout",
        "0.2",
        "m",
    ]);
    assert!(
        !ok && err.contains("nobody opened channel \"void\""),
        "{err}"
    );
    let recv = start(
        "recv-open",
        &["chan", "recv", "--socket", s, "--name", "open"],
    );
    recv.wait_stdout_line("channel name=open side=a", STEP)
        .unwrap();
    let receiver_id = self_id(&recv);
    let (ok, out, _) = run(&["chan", "list", "--socket", s, "--peer", &receiver_id]);
    assert!(ok);
    let lines: Vec<String> = out.lines().map(String::from).collect();
    assert_eq!(
        without_self(&lines),
        [
            region_line.to_string(),
            format!("channel name=open index=0 side_a=attached:{receiver_id}:0 side_b=empty"),
        ]
    );
    // A receiver that waits in vain times out with the count it got.
    let (ok, _, err) = run(&[
        "chan",
        "recv",
        "--socket",
        s,
        "--name",
        "quiet",
        "--timeout",
        "0.2",
    ]);
    assert!(
        !ok && err.contains("timed out after 0.2 s: received 0 message(s)"),
        "{err}"
    );
}

/// The `exchanged ...` line of `lines` for channel `name`: (sent, received, seconds).
fn exchanged(lines: &[String], name: &str) -> (u64, u64, f64) {
    let line = lines
        .iter()
        .find(|l| l.starts_with(&format!("exchanged name={name} ")))
        .unwrap_or_else(|| panic!("no exchanged line for {name}: {lines:?}"));
    let field = |key: &str| {
        line.split(' ')
            .find_map(|f| f.strip_prefix(&format!("{key}=")))
            .unwrap()
            .to_string()
    };
    (
        field("sent").parse().unwrap(),
        field("received").parse().unwrap(),
        field("seconds").parse().unwrap(),
    )
}

#[test]
fn two_host_processes_exchange_100000_checked_messages_both_ways_through_ivshm_serve() {
    let socket = socket_path("chan-bulk");
    let _server = serve(&socket, "16M");
    let s = socket.to_str().unwrap();
    init(s, "4", "1M");
    let args = [
        "chan",
        "exchange",
        "--socket",
        s,
        "--name",
        "bulk",
        "--count",
        "100000",
        "--max-len",
        "64K",
        "--timeout",
        "120",
    ];
    let started = Instant::now();
    let mut a = start("exchange-a", &args);
    let mut b = start("exchange-b", &args);
    a.wait_success(BULK).unwrap();
    b.wait_success(BULK).unwrap();
    let wall = started.elapsed();
    for p in [&a, &b] {
        let (sent, received, seconds) = exchanged(&p.lines(Stream::Stdout), "bulk");
        assert_eq!((sent, received), (100_000, 100_000));
        eprintln!("{}: 100,000 messages each way in {seconds:.2} s", p.name());
    }
    eprintln!(
        "two processes, 100,000 messages each way: {:.2} s wall",
        wall.as_secs_f64()
    );
}

/// What an honest side of the scribbled channel may end with: the channel found corrupt; a
/// timeout (a record header overwritten looks like a record not yet published, the spec's
/// "stale or hostile bytes look the same", so the receiver waits until its timeout, and so does
/// its peer's sender on the full ring); the other end gone after its own error.
const HONEST_ENDINGS: &[&str] = &["is corrupt", "timed out", "the peer closed the channel"];

#[test]
fn a_peer_scribbling_over_a_channels_rings_makes_its_honest_sides_fail_cleanly() {
    let socket = socket_path("chan-scribble");
    let _server = serve(&socket, "4M");
    let s = socket.to_str().unwrap();
    init(s, "4", "64K");
    let exchange = |name: &str, channel: &str, extra: &[&str]| {
        let mut args = vec!["chan", "exchange", "--socket", s, "--name", channel];
        args.extend_from_slice(extra);
        let p = start(name, &args);
        p.wait_line(Stream::Stdout, "the channel line", STEP, |l| {
            l.starts_with(&format!("channel name={channel} side="))
        })
        .unwrap();
        p
    };
    // The bystanders first (a channel of their own, which they keep while the victims come
    // and go), then the victims, which count damaged messages and go on (only a channel error
    // ends them).
    let bystander = ["--count", "100000", "--max-len", "16K", "--timeout", "120"];
    let mut bystanders = [
        exchange("bystander-a", "bystander", &bystander),
        exchange("bystander-b", "bystander", &bystander),
    ];
    let victim = ["--count", "1000000", "--timeout", "3", "--tolerate-damage"];
    let mut victims = [
        exchange("victim-a", "victim", &victim),
        exchange("victim-b", "victim", &victim),
    ];

    // This test is the hostile peer: it finds the victim's rings in the directory and writes
    // random words over them until both victims have ended.
    let peer = Arc::new(
        PeerDoorbell::new(Peer::connect(&socket, ConnectOptions::default()).unwrap()).unwrap(),
    );
    let mapping = peer.peer().map().unwrap();
    let region = Region::open(peer.peer().map().unwrap(), peer.clone()).unwrap();
    let index = region
        .channels()
        .unwrap()
        .into_iter()
        .find(|c| c.name == b"victim")
        .unwrap()
        .index;
    let geo = region.geometry();
    let rings = usize::try_from(geo.ring_offset(index, false)).unwrap();
    let rings_len = 2 * usize::try_from(geo.ring_stride()).unwrap();
    let view = mapping.view();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut ended = [None, None];
    while ended.iter().any(Option::is_none) {
        assert!(Instant::now() < deadline, "an honest side hangs");
        for _ in 0..256 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = rings + (seed as usize % rings_len) / 4 * 4;
            view.write_u32(at, (seed >> 32) as u32).unwrap();
        }
        std::thread::sleep(Duration::from_micros(200));
        for (v, e) in victims.iter_mut().zip(ended.iter_mut()) {
            if e.is_none() {
                if let Ok(status) = v.wait_exit(Duration::ZERO) {
                    *e = Some(status);
                }
            }
        }
    }
    for (v, status) in victims.iter().zip(ended) {
        use std::os::unix::process::ExitStatusExt;
        let status = status.unwrap();
        let err = v.output(Stream::Stderr);
        assert!(
            status.code().is_some(),
            "{}: killed by signal {:?}: {err}",
            v.name(),
            status.signal()
        );
        assert_ne!(status.code(), Some(101), "{}: panicked: {err}", v.name());
        assert!(!err.contains("panicked"), "{}: {err}", v.name());
        // Exit 0: it kept working (counting damaged messages) to the end.
        if status.code() == Some(1) {
            assert!(
                HONEST_ENDINGS.iter().any(|e| err.contains(e)),
                "{}: unexpected ending: {err}",
                v.name()
            );
        } else {
            assert_eq!(status.code(), Some(0), "{}: {err}", v.name());
        }
        eprintln!("{} ended ({status}): {err}", v.name());
    }
    for b in &mut bystanders {
        b.wait_success(BULK).unwrap();
        let (sent, received, _) = exchanged(&b.lines(Stream::Stdout), "bystander");
        assert_eq!((sent, received), (100_000, 100_000));
    }
}

/// Two fake ivshmem-doorbell devices (IVPosition 7 and 8) whose BAR2 files are one file.
fn two_fake_devices(tree: &FakeSysfs) {
    let size = 1 << 20;
    let function = |address| FakeFunction {
        resource: doorbell_resource(size as u64),
        ..FakeFunction::doorbell(address)
    };
    let a = tree.add_with_bar_files(&function("0000:00:03.0"), 7, size);
    let b = tree.add_with_bar_files(&function("0000:00:04.0"), 8, size);
    std::fs::remove_file(b.join("resource2")).unwrap();
    std::fs::hard_link(a.join("resource2"), b.join("resource2")).unwrap();
}

fn guest_args<'a>(sysfs: &'a str, dev: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["guest", "chan"];
    args.extend_from_slice(rest);
    args.extend_from_slice(&["--mode", "sysfs", "--sysfs", sysfs, "--dev", dev]);
    args
}

#[test]
fn guest_commands_talk_over_two_fake_devices_by_polling() {
    let tree = FakeSysfs::new();
    two_fake_devices(&tree);
    let sysfs = tree.sysfs();
    let sysfs = sysfs.to_str().unwrap();
    let recv = start(
        "guest-recv",
        &guest_args(
            sysfs,
            "0000:00:03.0",
            &["recv", "--name", "g", "--count", "2"],
        ),
    );
    recv.wait_stdout_line("channel name=g side=a", STEP)
        .unwrap();
    let sent = finish(start(
        "guest-send",
        &guest_args(sysfs, "00:04.0", &["send", "--name", "g", "hi", "there"]),
    ));
    assert_eq!(
        sent,
        [
            "self id=8 vectors=4 size=1048576",
            "channel name=g side=b",
            "peer id=7",
            "sent len=2",
            "sent len=5"
        ]
    );
    let got = finish(recv);
    assert_eq!(
        received(&got),
        [
            "self id=7 vectors=4 size=1048576",
            "channel name=g side=a",
            "message len=2 data=hi",
            "message len=5 data=there"
        ]
    );
    let (ok, out, _) = run(&guest_args(sysfs, "1", &["list"]));
    assert!(ok);
    assert_eq!(
        out,
        "self id=8 vectors=4 size=1048576\nregion channels=64 ring_size=4096 max_message=4032 layout_size=602112\n"
    );
    // The doorbell conformance suite and 200 round trips between the two devices.
    let mut args = vec![
        "guest", "chan", "selftest", "--mode", "sysfs", "--sysfs", sysfs,
    ];
    args.extend_from_slice(&["--dev", "0", "--dev", "1"]);
    let (ok, out, err) = run(&args);
    assert!(ok, "{err}");
    assert!(
        out.ends_with("selftest passed doorbells=polling\n"),
        "{out}"
    );
}
