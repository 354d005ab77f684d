//! The built `ivshm bench` commands: every variant and their ratios in one run, the join table,
//! and no server log lines on stderr unless asked for.

use std::process::{Command, Output};

fn ivshm_bench(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_ivshm"))
        .arg("bench")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ivshm bench {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[test]
fn doorbell_prints_both_variants_and_their_ratio_and_nothing_else() {
    let out = ivshm_bench(&["doorbell", "--rounds", "50", "--warmup", "5"]);
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{stdout}");
    assert!(lines[0].starts_with("doorbell round trips: 50 per variant"));
    assert!(lines[1].starts_with("library (Peer::notify + Peer::wait"));
    assert!(lines[2].starts_with("raw eventfd ping-pong"));
    assert!(lines[3].starts_with("raw eventfd ping-pong through epoll"));
    assert!(lines[4].starts_with("ratio library/raw: median "));
    assert!(lines[4].contains('x'));
    assert!(lines[5].starts_with("ratio library/raw-epoll"));
    // Default placement: both threads of every variant on one CPU.
    let placement = lines[6];
    assert!(
        placement.starts_with("all variants: pinging thread on CPU"),
        "{stdout}"
    );
    let cpus: Vec<&str> = placement
        .split_whitespace()
        .map(|w| w.trim_end_matches(','))
        .filter(|w| w.parse::<usize>().is_ok())
        .collect();
    assert_eq!(cpus.len(), 2);
    assert_eq!(cpus[0], cpus[1], "{placement}");
    // Quiet by default: the in-process server's join/leave lines stay out of the output.
    assert_eq!(text(&out.stderr), "");
}

#[test]
fn join_prints_one_row_per_count_and_verbose_brings_the_server_log_back() {
    let out = ivshm_bench(&["join", "--peers", "2,4"]);
    let stdout = text(&out.stdout);
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("N=")).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(rows[0].starts_with("N=2 ") && rows[1].starts_with("N=4 "));
    assert!(rows[1].contains("growth "));
    assert_eq!(text(&out.stderr), "");

    let verbose = ivshm_bench(&["-v", "join", "--peers", "2"]);
    assert!(text(&verbose.stderr).contains("peer 1 joined"));
}

#[test]
fn doorbell_placement_free_leaves_threads_unpinned() {
    let out = ivshm_bench(&[
        "doorbell",
        "--rounds",
        "20",
        "--warmup",
        "2",
        "--placement",
        "free",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.lines().last(),
        Some("threads not pinned (the scheduler placed them)")
    );
}

/// `ivshm guest bench --socket` between two host peers: the responder joins first and learns
/// of the pinger only from the server's messages after it joined; it must read them before
/// ringing back (it failed with `unknown peer 1`). A `--peer` that never joins fails with an
/// error that says so and how to find the ids.
#[test]
fn guest_bench_between_two_host_peers_learns_of_the_later_one() {
    use ivshm_test_support::process::{HostProcess, Stream};
    use ivshm_test_support::WAIT_GUARD as GUARD;

    let dir = std::env::temp_dir().join(format!("ivshm-bench-hosts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("s.sock");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    serve
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--size")
        .arg("64K");
    let mut server = HostProcess::spawn("ivshm serve", serve).unwrap();
    server
        .wait_line_containing(Stream::Stderr, "listening on", GUARD)
        .unwrap();
    let bench = |extra: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
        command
            .args(["guest", "bench", "--socket"])
            .arg(&socket)
            .args(["--count", "20"])
            .args(extra);
        command
    };
    let mut responder = HostProcess::spawn(
        "responder",
        bench(&["--respond", "--peer", "1", "--timeout", "20"]),
    )
    .unwrap();
    responder
        .wait_line_containing(Stream::Stdout, "self id=0", GUARD)
        .unwrap();
    let mut pinger =
        HostProcess::spawn("pinger", bench(&["--peer", "0", "--timeout", "20"])).unwrap();
    pinger.wait_success(GUARD).unwrap();
    responder.wait_success(GUARD).unwrap();
    let out = pinger.lines(Stream::Stdout);
    assert_eq!(out[0], "self id=1 vectors=1 size=65536", "{out:?}");
    assert!(
        out[1].starts_with("doorbell round_trips=20 lost=0 "),
        "{out:?}"
    );
    assert_eq!(
        responder.lines(Stream::Stdout)[1],
        "responded doorbells=21 polls=20"
    );

    // Nobody with id 7 joins: the pinger says so once its step times out.
    let responder = HostProcess::spawn(
        "responder",
        bench(&["--respond", "--peer", "9", "--timeout", "20"]),
    )
    .unwrap();
    responder
        .wait_line_containing(Stream::Stdout, "self id=", GUARD)
        .unwrap();
    let mut lonely =
        HostProcess::spawn("pinger", bench(&["--peer", "7", "--timeout", "1"])).unwrap();
    let status = lonely.wait_exit(GUARD).unwrap();
    assert!(!status.success());
    let stderr = lonely.output(Stream::Stderr);
    assert!(stderr.contains("peer 7"), "{stderr}");
    assert!(stderr.contains("ivshm peers"), "{stderr}");
    drop(responder);
    assert!(server.terminate(GUARD).unwrap().success());
    let _ = std::fs::remove_dir_all(dir);
}

/// The number after `label` in `text` (`"joins 12"` → 12).
fn count_after(text: &str, label: &str) -> u64 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {text}"));
    text[at + label.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .find(|w| !w.is_empty())
        .unwrap_or_else(|| panic!("no number after {label:?} in {text}"))
        .parse()
        .unwrap()
}

#[test]
fn soak_runs_every_kind_of_load_and_checks_a_spawned_servers_fds_memory_and_counters() {
    let out = ivshm_bench(&["soak", "--duration", "6s"]);
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("soak: "), "{stdout}");
    // A spawned `ivshm serve`: its own fds and memory, sampled every second.
    let first = lines[1];
    assert!(first.starts_with("server, first half"), "{stdout}");
    assert!(first.contains("fds ") && first.contains(" MiB"), "{stdout}");
    assert!(!stdout.contains("n/a"), "{stdout}");
    assert!(count_after(&stdout, "(") >= 5, "samples: {stdout}");
    // The lulls: load paused, the server settled and sampled (one every second of load at
    // this duration, and one at the end).
    let lulls = lines[4];
    assert!(lulls.starts_with("server in the lulls"), "{stdout}");
    assert!(lulls.matches(" fds, ").count() >= 2, "{stdout}");
    let idle = lines[3];
    let before = count_after(idle, "server idle: ");
    let after = count_after(idle, "before the load, ");
    assert!(before > 0 && after <= before + 4, "{stdout}");
    // The server's own counters: every join ended, bad peers were dropped for what they sent,
    // the VM's quota refused creates.
    let counters = lines
        .iter()
        .find(|l| l.starts_with("server's counters: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(count_after(counters, "counters: ") > 10, "{stdout}");
    assert!(counters.contains(" 0 connected"), "{stdout}");
    assert!(count_after(counters, "sent_data ") > 0, "{stdout}");
    assert!(count_after(counters, "GSS_NOMEM ") > 0, "{stdout}");
    // Every kind of load happened.
    let operations = lines
        .iter()
        .find(|l| l.starts_with("operations: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    for kind in [
        "doorbell round trips ",
        "joins and leaves ",
        "factory creates ",
        "quota refusals ",
        "factory finds ",
        "reloads ",
        "stats ",
        "bad peers ",
    ] {
        assert!(count_after(operations, kind) > 0, "{kind}: {stdout}");
    }
    assert_eq!(lines.last(), Some(&"failures: none"), "{stdout}");
}

#[test]
fn join_refuses_up_front_what_cannot_fit_in_the_fd_limit() {
    // 65,536 peers x 64 vectors need 4,259,840 fds in the server: more than any fd limit
    // (the kernel's nr_open is 1,048,576 by default).
    let out = Command::new(env!("CARGO_BIN_EXE_ivshm"))
        .args(["bench", "join", "--peers", "10,65536", "--vectors", "64"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(text(&out.stdout), "", "nothing ran");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("65536 peers x 64 vectors need 4259840 fds in the server")
            && stderr.contains("open-file limit of")
            && stderr.contains("peers x 64 vectors fit"),
        "{stderr}"
    );
}
