//! Our `ivshmem-server` and `ivshmem-client` against QEMU 7.2's own (built by
//! `scripts/qemu-ivshmem-tools`): the same scripted sessions in every pairing (QEMU's server
//! and client as the reference, QEMU's server with our client, ours with QEMU's client, ours
//! with ours), compared line for line; and the flags, start-up failures and exit codes of each
//! program against QEMU's. Skipped (loudly) without the QEMU programs unless `IVSHM_E2E=1`.

mod peers;
mod transcript;

use ivshm_e2e::require_qemu_tools;
use ivshm_test_support::process::{DaemonGuard, HostProcess, Stream};
use ivshm_test_support::WAIT_GUARD;
use transcript::*;

fn programs(tools: ivshm_e2e::QemuTools) -> Programs {
    Programs { qemu: tools }
}

/// Two clients and a server, then a third client, the server stopped and started again: every
/// interactive command, good and bad, peers joining and leaving, the server going away and
/// coming back. `verbose` runs all three programs with `-v`.
fn session(programs: &Programs, pairing: Pairing, verbose: bool) -> Transcript {
    let run = RunDir::new(if verbose { "session-v" } else { "session" });
    let n = run.normalizer();
    let sock = run.sock_arg();
    let v: &[&str] = if verbose { &["-v"] } else { &[] };
    let server_args: Vec<&str> = [&["-F"], v, &["-S", &sock, "-M", &run.shm, "-n", "2"]].concat();
    let client_args: Vec<&str> = [v, &["-S", &sock]].concat();
    let server_wait = |server: &HostProcess, line: &str| {
        if verbose {
            server.wait_stdout_line(line, WAIT_GUARD).unwrap();
        }
    };

    let mut server = start_server("server", programs.server(pairing.server), &server_args);
    wait_listening(&run.sock);
    let mut a = Client::start("client A", programs.client(pairing.client), &client_args);
    a.wait_connected(1);
    a.wait_eventfds(2);
    server_wait(&server, "new peer id = 0");
    let mut b = Client::start("client B", programs.client(pairing.client), &client_args);
    b.wait_connected(1);
    b.wait_eventfds(4);
    a.wait_eventfds(4);
    server_wait(&server, "new peer id = 1");

    a.send("dump");
    a.send("int 1 0");
    b.wait_notifications(1);
    // `int PEER` without a vector rings every vector of PEER.
    a.send("int 1");
    b.wait_notifications(3);
    a.send("int 1 5");
    a.send("int 0 -1");
    // Our own id rings ourselves.
    a.send("int 0 1");
    a.wait_notifications(1);
    for bad in [
        "?",
        "help",
        "quit",
        "int 7 0",
        "int x",
        "int",
        "   ",
        "",
        "int all 0",
    ] {
        a.send(bad);
    }
    a.send("int all");
    b.wait_notifications(5);
    a.send("dump;int 1 1;bogus");
    b.wait_notifications(6);
    // 131 bytes: QEMU reads 127, then the rest, and prompts after each read.
    a.send_raw(format!("{}\n", "x".repeat(130)).as_bytes(), 2);
    b.send("int all");
    a.wait_notifications(3);
    b.send("int 0");
    a.wait_notifications(5);
    b.send("dump");

    if verbose {
        // More of what QEMU's parser (`sscanf` with "int %ld %d" and "int %ld all") takes or
        // refuses: each command rings what A says it rings (its `notify peer` lines, which
        // only -v prints), and B (or A itself) hears exactly that before the next one.
        let heard = |c: &Client| c.count(Stream::Stdout, "receive notification from ");
        let (mut rung_b, mut rung_a) = (heard(&b), heard(&a));
        for command in [
            "int 1 all",
            "int 1 all junk",
            "int 1 al",
            "int 1 0 junk",
            "int 01 1",
            "int 1 01",
            "int +1 0",
            "int 1 +1",
            "int 1 -0",
            "int  1   0",
            " int 1 0",
            "int 1 0 ",
            "int 1 0x1",
            "int 0x1 0",
            "int 1.5 0",
            "int 1 1.5",
            "int 4294967297 0",
            "int 1 4294967296",
            "int -4294967295 1",
            "int 1-0",
            "intall",
            "int all ",
            " int all",
            "dump junk",
            " dump",
            "dump ",
            "DUMP",
            "help ",
        ] {
            let rings =
                |c: &Client, to: &str| c.count(Stream::Stdout, &format!("notify peer {to} on"));
            let before = (rings(&a, "1"), rings(&a, "0"));
            a.send(command);
            rung_b += rings(&a, "1") - before.0;
            rung_a += rings(&a, "0") - before.1;
            b.wait_notifications(rung_b);
            a.wait_notifications(rung_a);
        }
    }

    // B leaves; C joins (id 2) and sees A.
    let b_end = b.terminate();
    a.wait_eventfds(2);
    server_wait(&server, "free peer 1");
    let mut c = Client::start("client C", programs.client(pairing.client), &client_args);
    c.wait_connected(1);
    c.wait_eventfds(4);
    a.wait_eventfds(4);
    server_wait(&server, "new peer id = 2");
    a.send("dump");
    c.send("dump");

    // The server stops: A and C are told, C also of A's removal, and both retry.
    let server_end = stop_server(&mut server);
    for client in [&a, &c] {
        client.wait_count(Stream::Stdout, "disconnected from server\n", 1);
        client.wait_count(Stream::Stderr, RETRY, 1);
    }
    let c_end = c.terminate();

    // A new server: A comes back (as peer 0 again) and still takes commands.
    let mut second = start_server("server 2", programs.server(pairing.server), &server_args);
    wait_listening(&run.sock);
    a.wait_connected(2);
    a.wait_eventfds(2);
    a.send("dump");
    // A rings itself once more; it ends only after it heard that ring (with -v the loop above
    // rang A too, so a fixed count was reached before this ring and A could end first).
    let heard = a.count(Stream::Stdout, "receive notification from ");
    a.send("int 0 0");
    a.wait_notifications(heard + 1);
    let a_end = a.terminate();
    server_wait(&second, "free peer 0");
    let second_end = stop_server(&mut second);
    assert!(
        !run.sock.exists(),
        "{}: socket left behind",
        pairing.label()
    );
    assert!(
        !run.shm_path().exists(),
        "{}: shm object left behind",
        pairing.label()
    );

    let mut t = Transcript::default();
    t.add_server("server", &server, server_end, &n);
    t.add_server("server 2", &second, second_end, &n);
    t.add_client("client A", &a, a_end, &n);
    t.add_client("client B", &b, b_end, &n);
    t.add_client("client C", &c, c_end, &n);
    t
}

#[test]
fn verbose_sessions_match_qemu_in_every_pairing() {
    let programs = programs(require_qemu_tools!());
    compare_pairings(&programs, |p, pairing| session(p, pairing, true));
}

#[test]
fn plain_sessions_match_qemu_in_every_pairing() {
    let programs = programs(require_qemu_tools!());
    compare_pairings(&programs, |p, pairing| session(p, pairing, false));
}

/// The arguments of a case, with `{sock}`, `{shm}`, `{dir}` and `{long}` (a socket path too
/// long for `sun_path`) filled in for `run`.
fn fill(args: &[&str], run: &RunDir) -> Vec<String> {
    let long = run.dir.join("l".repeat(120)).to_string_lossy().into_owned();
    args.iter()
        .map(|a| {
            a.replace("{sock}", &run.sock_arg())
                .replace("{shm}", &run.shm)
                .replace("{dir}", &run.dir.to_string_lossy())
                .replace("{long}", &long)
        })
        .collect()
}

/// How a server case is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runs {
    /// It exits by itself.
    Exits,
    /// It serves until SIGTERM.
    Serves,
    /// It serves until SIGTERM, sent once it printed `create & bind socket` (with `-v`; for a
    /// socket path where a stale socket file already is).
    ServesVerbose,
}

/// Runs `ivshmem-server ARGS` of `which` in a fresh directory prepared by `prepare`; checks
/// that it leaves no socket and no shm object behind.
fn server_case(
    programs: &Programs,
    which: Impl,
    args: &[&str],
    runs: Runs,
    prepare: &dyn Fn(&RunDir),
) -> Outcome {
    let run = RunDir::new("flags");
    prepare(&run);
    let n = run.normalizer();
    let mut command = programs.direct(which, "ivshmem-server");
    command.args(fill(args, &run));
    let label = format!("{} ivshmem-server {args:?}", which.name());
    let outcome = match runs {
        Runs::Exits => Outcome::run(&label, command, &n),
        Runs::Serves => Outcome::serve(&label, command, &run.sock, None, &n),
        Runs::ServesVerbose => {
            let ready = format!("create & bind socket {}", run.sock.display());
            Outcome::serve(&label, command, &run.sock, Some(&ready), &n)
        }
    };
    assert!(
        !run.shm_path().exists(),
        "{label}: the shm object is left behind"
    );
    if runs != Runs::Exits {
        assert!(!run.sock.exists(), "{label}: the socket is left behind");
    }
    outcome
}

fn nothing(_: &RunDir) {}

/// Sets up a case's directory before the program runs.
type Prepare<'a> = &'a (dyn Fn(&RunDir) + Sync);

#[test]
fn server_flags_start_up_failures_and_exit_codes_match_qemu() {
    let programs = programs(require_qemu_tools!());
    let live = |run: &RunDir| {
        // Leaked on purpose: the socket must stay live while the case runs.
        std::mem::forget(std::os::unix::net::UnixListener::bind(run.dir.join("live")).unwrap());
    };
    let file = |run: &RunDir| std::fs::write(run.dir.join("file"), b"not a socket").unwrap();
    let cases: &[(&[&str], Runs, Prepare)] = &[
        (&["-h"], Runs::Exits, &nothing),
        (&["-h", "-x"], Runs::Exits, &nothing),
        (&["-x"], Runs::Exits, &nothing),
        (&["-F", "-x", "-h"], Runs::Exits, &nothing),
        (&["-F", "-l"], Runs::Exits, &nothing),
        (&["-F", "-l", "4Q"], Runs::Exits, &nothing),
        (&["-F", "-l", "4MiB"], Runs::Exits, &nothing),
        (&["-F", "-l", "1.5"], Runs::Exits, &nothing),
        (&["-F", "-l", ""], Runs::Exits, &nothing),
        (&["-F", "-l", "-1"], Runs::Exits, &nothing),
        (&["-F", "-l", "16E"], Runs::Exits, &nothing),
        (&["-F", "-n", "x"], Runs::Exits, &nothing),
        (&["-F", "-n", "-1"], Runs::Exits, &nothing),
        (&["-F", "-n", "08"], Runs::Exits, &nothing),
        (&["-F", "-n", "65"], Runs::Exits, &nothing),
        (&["-F", "-l", "0x10K", "-n", "x"], Runs::Exits, &nothing),
        (&["-v"], Runs::Exits, &nothing),
        (&["-v", "-S", "{sock}"], Runs::Exits, &nothing),
        // Start-up failures, plain and verbose.
        (
            &["-F", "-S", "{dir}/no/sock", "-M", "{shm}"],
            Runs::Exits,
            &nothing,
        ),
        (
            &["-Fv", "-S", "{dir}/no/sock", "-M", "{shm}"],
            Runs::Exits,
            &nothing,
        ),
        (&["-Fv", "-S", "{sock}", "-M", "a/b"], Runs::Exits, &nothing),
        (
            &["-Fv", "-S", "{sock}", "-m", "{dir}/no"],
            Runs::Exits,
            &nothing,
        ),
        (
            &["-F", "-S", "{sock}", "-m", "{dir}/no"],
            Runs::Exits,
            &nothing,
        ),
        (
            &["-Fv", "-S", "{long}", "-M", "{shm}"],
            Runs::Exits,
            &nothing,
        ),
        (
            &["-Fv", "-S", "{dir}/live", "-M", "{shm}"],
            Runs::Exits,
            &live,
        ),
        (
            &["-Fv", "-S", "{dir}/file", "-M", "{shm}"],
            Runs::Exits,
            &file,
        ),
        // Serving, stopped by SIGTERM.
        (
            &["-F", "-S", "{sock}", "-M", "{shm}"],
            Runs::Serves,
            &nothing,
        ),
        (
            &[
                "-Fv", "-S", "{sock}", "-M", "{shm}", "-l", "1.5M", "-n", "0x8",
            ],
            Runs::Serves,
            &nothing,
        ),
        (
            &["-F", "-v", "-S{sock}", "-m", "{dir}", "-l1.k", "-n", "010"],
            Runs::Serves,
            &nothing,
        ),
        (
            &["-F", "-S", "{sock}", "-M", "{shm}", "-l", "0x10K"],
            Runs::Serves,
            &nothing,
        ),
        (
            &["-Fv", "-S", "{sock}", "-M", "{shm}", "junk", "-n", "3"],
            Runs::Serves,
            &nothing,
        ),
        (
            &["-Fv", "-S", "{sock}", "-M", "{shm}", "--", "-n", "99"],
            Runs::Serves,
            &nothing,
        ),
        (
            &[
                "-vF", "-m", "{dir}", "-M", "{shm}", "-S", "{sock}", "-l", " 2m",
            ],
            Runs::Serves,
            &nothing,
        ),
        // Odd sizes that serve (QEMU rounds each up to a power of two), the vector counts
        // at the ends of the range (0 included) and in other notations.
        (
            &["-Fv", "-S", "{sock}", "-M", "{shm}", "-l", "3", "-n", "0"],
            Runs::Serves,
            &nothing,
        ),
        (
            &[
                "-Fv", "-S", "{sock}", "-M", "{shm}", "-l", "1000", "-n", "64",
            ],
            Runs::Serves,
            &nothing,
        ),
        (
            &[
                "-Fv", "-S", "{sock}", "-M", "{shm}", "-l", "0x1E", "-n", "0x40",
            ],
            Runs::Serves,
            &nothing,
        ),
        (
            &["-Fv", "-S", "{sock}", "-M", "{shm}", "-l", "1.", "-n", "00"],
            Runs::Serves,
            &nothing,
        ),
        (
            &[
                "-Fv", "-S", "{sock}", "-M", "{shm}", "-l", "2.25K", "-n", " 2",
            ],
            Runs::Serves,
            &nothing,
        ),
        (
            &[
                "-Fv", "-S", "{sock}", "-M", "{shm}", "-l", "1b", "-n", "0X3",
            ],
            Runs::Serves,
            &nothing,
        ),
        (
            &[
                "-Fv", "-S", "{sock}", "-M", "{shm}", "-l", "+1M", "-n", "+3",
            ],
            Runs::Serves,
            &nothing,
        ),
        (
            &[
                "-Fv", "-S", "{sock}", "-M", "{shm}", "-l", "0x1p", "-l", "1023M",
            ],
            Runs::Serves,
            &nothing,
        ),
    ];
    let compare = |args: &[&str], runs: Runs, prepare: Prepare| {
        let qemu = server_case(&programs, Impl::Qemu, args, runs, prepare);
        let ours = server_case(&programs, Impl::Ours, args, runs, prepare);
        assert_eq!(
            ours, qemu,
            "ivshmem-server {args:?}: ours (left) differs from QEMU's"
        );
    };
    for &(args, runs, prepare) in cases {
        compare(args, runs, prepare);
    }
    // Values QEMU's parsers refuse (each run with a socket and shm name of its own, should it
    // serve after all). Sizes: trailing text, a second unit, white space inside or after, hex
    // without digits, an exponent, a lone dot, two dots, a hex fraction, beyond 64 bits.
    // Vector counts: white space after, trailing text, empty, an exponent, more than 64 in
    // hex and in octal, beyond 64 bits, a minus sign.
    let refused: [(&str, &[&str]); 2] = [
        (
            "-l",
            &[
                "1M5",
                "1MM",
                "4 M",
                "4M ",
                "0x",
                "1e3",
                ".",
                ".5K",
                "1.5.5",
                "0x1.8M",
                "18446744073709551616",
            ],
        ),
        (
            "-n",
            &[
                "3 ",
                "3x",
                "",
                "1e1",
                "0x41",
                "0101",
                "18446744073709551616",
                "-0",
            ],
        ),
    ];
    for (flag, values) in refused {
        for &value in values {
            let args = ["-F", "-S", "{sock}", "-M", "{shm}", flag, value];
            compare(&args, Runs::Exits, &nothing);
        }
    }
}

#[test]
fn server_differences_from_qemu_are_the_documented_ones() {
    let programs = programs(require_qemu_tools!());
    let both = |args: &[&str], prepare: &dyn Fn(&RunDir)| {
        (
            server_case(&programs, Impl::Qemu, args, Runs::Exits, prepare),
            server_case(&programs, Impl::Ours, args, Runs::ServesVerbose, prepare),
        )
    };
    // QEMU prints its banner first; we do not (the normalizer drops it: check it is there).
    let run = RunDir::new("banner");
    let qemu = Outcome::run(
        "qemu -h",
        {
            let mut c = programs.direct(Impl::Qemu, "ivshmem-server");
            c.arg("-h");
            c
        },
        &Normalizer::plain(),
    );
    drop(run);
    assert!(
        qemu.stdout.starts_with("Usage: ivshmem-server"),
        "{}",
        qemu.stdout
    );
    let raw = std::process::Command::new(&programs.qemu.server)
        .arg("-h")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&raw.stdout).starts_with(&format!("{BANNER}\n")));
    let ours = std::process::Command::new(env!("CARGO_BIN_EXE_ivshmem-server"))
        .arg("-h")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&ours.stdout).contains(BANNER));

    // 2 GiB: QEMU's server fails (its size goes through 32 bits and a 1 GiB limit); ours serves.
    let (qemu, ours) = both(
        &["-Fv", "-S", "{sock}", "-M", "{shm}", "-l", "2G"],
        &nothing,
    );
    assert_eq!(
        qemu.stderr,
        "ftruncate(<shm>) failed: Success\ncannot bind\n"
    );
    assert_eq!(qemu.ending, "exit 1");
    assert_eq!(ours.stdout, "Using POSIX shared memory: <shm>\ncreate & bind socket <socket>\nserver disconnected\nclose server\n");
    assert_eq!(ours.ending, "exit 0");

    // A stale socket file: QEMU cannot bind it; ours replaces it.
    let stale = |run: &RunDir| drop(std::os::unix::net::UnixListener::bind(&run.sock).unwrap());
    let (qemu, ours) = both(&["-Fv", "-S", "{sock}", "-M", "{shm}"], &stale);
    assert_eq!(qemu.stderr, "cannot bind\n");
    assert!(qemu
        .stdout
        .ends_with("cannot connect to <socket>: Address already in use\n"));
    assert_eq!(ours.ending, "exit 0");
    assert!(ours.stdout.ends_with("server disconnected\nclose server\n"));

    // -l 0: QEMU serves a 1-byte object; ours refuses.
    let qemu = server_case(
        &programs,
        Impl::Qemu,
        &["-F", "-S", "{sock}", "-M", "{shm}", "-l", "0"],
        Runs::Serves,
        &nothing,
    );
    assert_eq!(
        (qemu.stdout.as_str(), qemu.ending.as_str()),
        ("server disconnected\n", "exit 0")
    );
    let ours = server_case(
        &programs,
        Impl::Ours,
        &["-F", "-S", "{sock}", "-M", "{shm}", "-l", "0"],
        Runs::Exits,
        &nothing,
    );
    assert_eq!(ours.stderr, "the shared memory size (-l) must be greater than 0\nTry 'ivshmem-server -h' for more information.\n");
    assert_eq!(ours.ending, "exit 1");
}

#[test]
fn the_socket_mode_follows_the_umask_as_in_qemu() {
    use std::os::unix::fs::PermissionsExt;
    let programs = programs(require_qemu_tools!());
    // The modes of the socket and of the POSIX shm object while `which` serves under `umask`.
    let modes = |which: Impl, umask: &str| {
        let run = RunDir::new("umask");
        let program = match which {
            Impl::Qemu => programs.qemu.server.clone(),
            Impl::Ours => env!("CARGO_BIN_EXE_ivshmem-server").into(),
        };
        let mut command = std::process::Command::new("sh");
        command
            .args(["-c", &format!("umask {umask} && exec \"$0\" \"$@\"")])
            .arg(program)
            .args(["-F", "-S", &run.sock_arg(), "-M", &run.shm]);
        let mut server = start_server(&format!("{} umask {umask}", which.name()), command, &[]);
        wait_listening(&run.sock);
        let mode = |path: &std::path::Path| {
            std::fs::symlink_metadata(path)
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        let modes = (mode(&run.sock), mode(&run.shm_path()));
        assert_eq!(ending(stop_server(&mut server)), "exit 0");
        modes
    };
    for umask in ["022", "007", "077", "000", "027"] {
        let (qemu_socket, qemu_shm) = modes(Impl::Qemu, umask);
        let (ours_socket, ours_shm) = modes(Impl::Ours, umask);
        let umask = u32::from_str_radix(umask, 8).unwrap();
        assert_eq!(
            qemu_socket,
            0o777 & !umask,
            "QEMU's socket, umask {umask:03o}"
        );
        assert_eq!(ours_socket, qemu_socket, "our socket, umask {umask:03o}");
        // Documented difference: QEMU creates its shm object 0700, ours 0600 (less the umask).
        assert_eq!(
            qemu_shm,
            0o700 & !umask,
            "QEMU's shm object, umask {umask:03o}"
        );
        assert_eq!(
            ours_shm,
            0o600 & !umask,
            "our shm object, umask {umask:03o}"
        );
    }
}

/// Why huge pages cannot be tried here (`-m` on a hugetlbfs mount in a private mount
/// namespace needs root, util-linux's `unshare` and a kernel with hugetlbfs), if so.
fn hugetlbfs_unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root".into());
    }
    let unshare = std::process::Command::new("unshare")
        .arg("--version")
        .output();
    if !unshare.is_ok_and(|o| o.status.success()) {
        return Some("no unshare (util-linux)".into());
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.lines().any(|l| l.ends_with("\thugetlbfs")) {
        return Some("the kernel has no hugetlbfs".into());
    }
    None
}

#[test]
fn on_hugetlbfs_the_region_size_matches_qemus() {
    let programs = programs(require_qemu_tools!());
    if let Some(why) = hugetlbfs_unavailable() {
        assert!(
            std::env::var_os("IVSHM_E2E").is_none(),
            "cannot try -m on hugetlbfs: {why}"
        );
        eprintln!("SKIPPED: on_hugetlbfs_the_region_size_matches_qemus: {why}");
        return;
    }
    // `-m DIR` on a hugetlbfs mount (in a mount namespace of its own): what the server prints
    // and the size a peer is given. QEMU doubles the size until `ftruncate` takes it (a
    // multiple of the huge page size); ours rounds up to that multiple: the same sizes.
    let case = |which: Impl, size: &str| {
        let run = RunDir::new("huge");
        let huge = run.dir.join("huge");
        std::fs::create_dir(&huge).unwrap();
        let program = match which {
            Impl::Qemu => programs.qemu.server.clone(),
            Impl::Ours => env!("CARGO_BIN_EXE_ivshmem-server").into(),
        };
        let mut command = std::process::Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount -t hugetlbfs ivshm-test-huge \"$0\" && exec \"$@\"")
            .arg(&huge)
            .arg(program)
            .args(["-Fv", "-S", &run.sock_arg(), "-m"])
            .arg(&huge)
            .args(["-l", size]);
        let label = format!("{} -m hugetlbfs -l {size}", which.name());
        let mut server = start_server(&label, command, &[]);
        wait_listening(&run.sock);
        let peers = std::process::Command::new(env!("CARGO_BIN_EXE_ivshm"))
            .args(["peers", "--socket", &run.sock_arg()])
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(peers.status.success(), "{label}: {peers:?}");
        let status = stop_server(&mut server);
        let n = run.normalizer();
        let outcome = Outcome {
            stdout: n.server_stdout(&server.output(Stream::Stdout)),
            stderr: n.other(&server.output(Stream::Stderr)),
            ending: ending(status),
        };
        (outcome, String::from_utf8(peers.stdout).unwrap())
    };
    // The default huge page size (hugetlbfs's without `pagesize=`), from /proc/meminfo.
    let page: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Hugepagesize:"))
        .and_then(|v| v.trim().strip_suffix(" kB")?.parse::<u64>().ok())
        .expect("Hugepagesize in /proc/meminfo")
        * 1024;
    for (size, asked) in [("64K", 64 << 10), ("3M", 4 << 20), ("1.5M", 2 << 20)] {
        // A power of two (as QEMU rounds), then whole huge pages.
        let expected = u64::max(asked, page);
        let (qemu, qemu_peers) = case(Impl::Qemu, size);
        let (ours, ours_peers) = case(Impl::Ours, size);
        assert_eq!(ours, qemu, "-m hugetlbfs -l {size}: ours (left) differs");
        assert_eq!(
            qemu_peers,
            format!("self id=0 vectors=1 size={expected}\n"),
            "-l {size}"
        );
        assert_eq!(ours_peers, qemu_peers, "-m hugetlbfs -l {size}");
    }
}

/// Waits (with the guard) until `done` holds.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + WAIT_GUARD;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A daemon-mode run: `ivshmem-server -S SOCKET -M SHM -p PID` started in the run's directory.
struct DaemonCase<'a> {
    /// The pid file as given (relative paths are in the run's directory, the daemon's
    /// working directory as the launcher's).
    pid: &'a str,
    /// The socket path (`{sock}`, `{dir}` filled in).
    socket: &'a str,
    /// Whether the daemon serves (else it fails to start).
    serves: bool,
    /// Sets up the run's directory first.
    prepare: Prepare<'a>,
}

/// Daemon mode of `which`: the launcher's exit code, and what reached its stdout and stderr
/// (files) by the time the daemon has gone (after SIGTERM if it serves). Returns also what the
/// pid file held while the daemon served (its pid and a newline), and whether it was left
/// behind.
fn daemon_case(programs: &Programs, which: Impl, case: &DaemonCase) -> (Outcome, bool) {
    let run = RunDir::new("daemon");
    (case.prepare)(&run);
    let n = run.normalizer();
    let [pid_arg, socket]: [String; 2] = fill(&[case.pid, case.socket], &run).try_into().unwrap();
    let pid_file = run.dir.join(&pid_arg);
    let (out_path, err_path) = (run.dir.join("out"), run.dir.join("err"));
    // Killed when the case ends, also when it fails: a daemon is no child of the test.
    let _daemon = DaemonGuard::new(&socket);
    let mut command = programs.direct(which, "ivshmem-server");
    command
        .args(["-S", &socket, "-M", &run.shm, "-p", &pid_arg])
        .current_dir(&run.dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let status = command.status().unwrap();
    if case.serves {
        // QEMU's launcher exits right after the fork: its daemon writes the pid file later
        // (over what a prepared file held).
        let daemon_pid = || {
            std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.strip_suffix('\n')?.parse::<i32>().ok())
                .filter(|&pid| {
                    rustix::process::test_kill_process(rustix::process::Pid::from_raw(pid).unwrap())
                        .is_ok()
                })
        };
        wait_for("the pid file", || daemon_pid().is_some());
        let pid = rustix::process::Pid::from_raw(daemon_pid().unwrap()).unwrap();
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            .expect("the daemon runs");
        // It is the daemon serving the socket: a new session, in the run's directory.
        assert_eq!(rustix::process::getsid(Some(pid)).unwrap(), pid);
        assert_eq!(
            std::fs::read_link(format!("/proc/{}/cwd", pid.as_raw_nonzero())).unwrap(),
            run.dir
        );
        wait_listening(std::path::Path::new(&socket));
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        assert!(ivshm_test_support::fds::readable_within(
            std::os::fd::AsFd::as_fd(&pidfd),
            WAIT_GUARD
        ));
    } else {
        // QEMU's launcher exits 0 before its daemon fails: wait for the daemon's message.
        wait_for("the daemon's message", || {
            std::fs::read_to_string(&err_path).is_ok_and(|t| t.ends_with('\n'))
        });
        wait_for("the socket to go", || {
            !std::path::Path::new(&socket).exists()
        });
    }
    wait_for("the shm object to go", || !run.shm_path().exists());
    let outcome = Outcome {
        stdout: n.server_stdout(&std::fs::read_to_string(&out_path).unwrap()),
        stderr: n.other(&std::fs::read_to_string(&err_path).unwrap()),
        ending: ending(status),
    };
    assert!(!std::path::Path::new(&socket).exists());
    (outcome, pid_file.exists())
}

#[test]
fn daemon_mode_matches_qemu_but_for_the_documented_exit_code_and_pid_file() {
    let programs = programs(require_qemu_tools!());
    let both = |case: &DaemonCase| {
        (
            daemon_case(&programs, Impl::Qemu, case),
            daemon_case(&programs, Impl::Ours, case),
        )
    };
    // Serving, with the pid file as an absolute path, as a relative one (in the working
    // directory the daemon keeps), and over an existing file.
    let old_pid_file =
        |run: &RunDir| std::fs::write(run.dir.join("pid"), "old contents\n").unwrap();
    for (pid, prepare) in [
        ("{dir}/pid", &nothing as Prepare),
        ("pid", &nothing),
        ("pid", &old_pid_file),
    ] {
        let case = DaemonCase {
            pid,
            socket: "{sock}",
            serves: true,
            prepare,
        };
        let ((qemu, qemu_left_pid), (ours, ours_left_pid)) = both(&case);
        assert_eq!(
            ours, qemu,
            "daemon mode, -p {pid}: ours (left) differs from QEMU's"
        );
        assert_eq!(ours.stdout, "server disconnected\n");
        assert_eq!(ours.ending, "exit 0");
        // Documented: QEMU leaves its pid file; ours removes it.
        assert!(qemu_left_pid && !ours_left_pid, "-p {pid}");
    }
    // The pid file cannot be written: the same message; QEMU's launcher has exited 0 by then,
    // ours says 1 (documented).
    let ((qemu, _), (ours, _)) = both(&DaemonCase {
        pid: "no/pid",
        socket: "{sock}",
        serves: false,
        prepare: &nothing,
    });
    assert_eq!(
        qemu.stderr,
        "cannot write pid file: No such file or directory\n"
    );
    assert_eq!(
        (ours.stdout.as_str(), ours.stderr.as_str()),
        (qemu.stdout.as_str(), qemu.stderr.as_str())
    );
    assert_eq!(
        (qemu.ending.as_str(), ours.ending.as_str()),
        ("exit 0", "exit 1")
    );
    // The socket cannot be bound: both fail before the fork, with QEMU's message and exit 1,
    // and write no pid file.
    let ((qemu, qemu_pid), (ours, ours_pid)) = both(&DaemonCase {
        pid: "pid",
        socket: "{dir}/no/sock",
        serves: false,
        prepare: &nothing,
    });
    assert_eq!(ours, qemu, "daemon mode, no socket directory");
    assert_eq!(
        (qemu.stderr.as_str(), qemu.ending.as_str()),
        ("cannot bind\n", "exit 1")
    );
    assert!(!qemu_pid && !ours_pid);
}

#[test]
fn client_flags_and_connection_failures_match_qemu() {
    let programs = programs(require_qemu_tools!());
    for args in [
        &["-h"][..],
        &["-x"],
        &["-S"],
        &["-v", "-x"],
        &["-h", "-x"],
        &["-x", "-h"],
    ] {
        let run = |which| {
            let mut command = programs.direct(which, "ivshmem-client");
            command.args(args);
            Outcome::run(
                &format!("{} client {args:?}", which.name()),
                command,
                &Normalizer::plain(),
            )
        };
        assert_eq!(run(Impl::Ours), run(Impl::Qemu), "ivshmem-client {args:?}");
    }
    // No server (no socket file, a stale one, a path too long for sun_path): the first
    // attempt's lines, then the retry line, each time.
    let stale = |run: &RunDir| drop(std::os::unix::net::UnixListener::bind(&run.sock).unwrap());
    let no_file = |_: &RunDir| {};
    let cases: [(&str, Prepare); 3] = [
        ("{sock}", &no_file),
        ("{sock}", &stale),
        ("{long}", &no_file),
    ];
    for (socket, prepare) in cases {
        let attempt = |which: Impl| {
            let run = RunDir::new("client-retry");
            prepare(&run);
            let socket = fill(&[socket], &run).remove(0);
            let mut client = Client::start(
                &format!("{} client", which.name()),
                programs.client(which),
                &["-v", "-S", &socket],
            );
            // The attempt's stdout lines come before its retry line.
            client.wait_count(Stream::Stderr, RETRY, 1);
            let status = client.terminate();
            assert_eq!(ending(status), "signal 15");
            let n = run.normalizer();
            let stdout = n.other(&client.process.output(Stream::Stdout));
            // A second attempt may have begun before SIGTERM: keep the first.
            let second = stdout
                .match_indices("connect to client ")
                .nth(1)
                .map_or(stdout.len(), |(i, _)| i);
            let stderr = client.process.output(Stream::Stderr);
            (
                stdout[..second].to_string(),
                stderr.lines().next().unwrap_or("").to_string(),
            )
        };
        let (qemu, ours) = std::thread::scope(|scope| {
            let qemu = scope.spawn(|| attempt(Impl::Qemu));
            let ours = attempt(Impl::Ours);
            (qemu.join().unwrap(), ours)
        });
        assert_eq!(ours, qemu, "client with no server at {socket}");
        assert!(
            qemu.0.contains("cannot connect to ") || qemu.0.contains("could not copy"),
            "{}",
            qemu.0
        );
    }
}

#[test]
fn at_the_end_of_its_input_our_client_stops_reading_stdin_where_qemus_spins() {
    let programs = programs(require_qemu_tools!());
    for which in [Impl::Qemu, Impl::Ours] {
        let run = RunDir::new("eof");
        let sock = run.sock_arg();
        let mut server = start_server(
            "server",
            programs.server(Impl::Ours),
            &["-F", "-S", &sock, "-M", &run.shm],
        );
        wait_listening(&run.sock);
        let mut a = Client::start("client A", programs.client(which), &["-S", &sock]);
        a.wait_connected(1);
        a.wait_eventfds(1);
        let mut b = Client::start("client B", programs.client(Impl::Ours), &["-S", &sock]);
        b.wait_connected(1);
        b.wait_eventfds(2);
        a.wait_eventfds(2);
        a.send("dump");
        let before_eof = a.process.output(Stream::Stdout);
        let prompts = before_eof.matches("cmd> ").count();
        a.process.close_stdin();
        match which {
            Impl::Qemu => {
                // It prints the prompt over and over (a busy loop).
                a.wait_output_count_prompts(prompts + 100);
            }
            Impl::Ours => {
                // Nothing more from stdin; doorbells are still served.
                b.send("int 0 0");
                a.wait_notifications(1);
                b.send("int 0 0");
                a.wait_notifications(2);
                let after = a.process.output(Stream::Stdout);
                assert_eq!(
                    after.strip_prefix(before_eof.as_str()),
                    Some(
                        "receive notification from peer_id=0 vector=0\n"
                            .repeat(2)
                            .as_str()
                    )
                );
            }
        }
        a.terminate();
        b.terminate();
        stop_server(&mut server);
    }
}
