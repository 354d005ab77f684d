//! The built `ivshm bench` commands: both variants and their ratio in one run, the join table,
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
        "ivshm bench {args:?} failed: {}",
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
    assert_eq!(lines.len(), 5, "{stdout}");
    assert!(lines[0].starts_with("doorbell round trips: 50 per variant"));
    assert!(lines[1].starts_with("library (Peer::notify + Peer::wait"));
    assert!(lines[2].starts_with("raw eventfd ping-pong"));
    assert!(lines[3].starts_with("ratio library/raw: median "));
    assert!(lines[3].contains('x'));
    // Default placement: both threads of both variants on one CPU.
    let placement = lines[4];
    assert!(
        placement.starts_with("both variants: pinging thread on CPU"),
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
