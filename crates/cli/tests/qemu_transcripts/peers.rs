//! QEMU 7.2's own `ivshmem-client` as a peer of `ivshm serve --config` (named regions, the
//! sockets of two VMs' directories, lowest-free ids reused at once and a peer limit), next to
//! our `ivshm` host commands: what QEMU's debug client sees of joins, leaves, doorbells in both
//! directions, a refusal at the peer limit and the id reuse after it. (QEMU's client, unlike
//! QEMU's `ivshmem-doorbell` device, forgets a peer that leaves and starts afresh for a new one
//! with its id, so the region may give ids again at once: `id_reuse = "immediate"`.) Skipped (loudly) without QEMU's
//! programs unless `IVSHM_E2E=1`. (A module of the `qemu_transcripts` test binary: it shares
//! the QEMU-program harness in `transcript.rs`.)

use std::path::Path;
use std::process::Command;

use crate::transcript::*;
use ivshm_e2e::require_qemu_tools;
use ivshm_test_support::process::{HostProcess, Stream};
use ivshm_test_support::WAIT_GUARD;

fn ivshm(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ivshm"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ivshm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The stdout lines `client` printed after `from` (a byte offset).
fn since(client: &Client, from: usize) -> String {
    client.process.output(Stream::Stdout)[from..].to_string()
}

#[test]
fn qemus_client_is_a_peer_of_named_regions() {
    let programs = Programs {
        qemu: require_qemu_tools!(),
    };
    let run = RunDir::new("named");
    let root = run.dir.join("root");
    let config = run.dir.join("ivshm.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\n\
             [[region]]\nname = \"shared\"\nsize = \"64K\"\nvectors = 2\npeer_limit = 2\n\
             id_policy = \"lowest-free\"\nid_reuse = \"immediate\"\n\
             [vm.vm0]\nrules = [\"allow shared\"]\n\
             [vm.vm1]\nrules = [\"allow shared\"]\n",
            root.display().to_string()
        ),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    command.arg("serve").arg("--config").arg(&config);
    let mut server = HostProcess::spawn("ivshm serve --config", command).unwrap();
    let (vm0, vm1) = (root.join("vm0/shared.sock"), root.join("vm1/shared.sock"));
    wait_listening(&vm0);
    wait_listening(&vm1);
    let client = |name: &str, socket: &Path| {
        let socket = socket.to_string_lossy().into_owned();
        Client::start(name, programs.client(Impl::Qemu), &["-v", "-S", &socket])
    };

    // Two VMs' sockets, one region: ids 0 and 1, each sees the other's two vectors.
    let mut a = client("QEMU client A (vm0)", &vm0);
    a.wait_connected(1);
    a.wait_eventfds(2);
    let mut b = client("QEMU client B (vm1)", &vm1);
    b.wait_connected(1);
    b.wait_eventfds(4);
    a.wait_eventfds(4);
    a.wait_count(Stream::Stdout, "  new vector 1 (fd=8) for peer id 1\n", 1);
    assert!(a.process.output(Stream::Stdout).contains(
        "new peer id = 1\n  new vector 0 (fd=7) for peer id 1\n  new vector 1 (fd=8) for peer id 1\n"
    ));

    // Doorbells between the QEMU clients, both ways. (B holds its eventfds before the lines
    // that tell of them reach us: wait for its last handshake line before taking the mark.)
    b.wait_count(Stream::Stdout, "  new vector 1 (fd=8) for peer id 1\n", 1);
    let mark = b.process.output(Stream::Stdout).len();
    a.send("int 1 1");
    b.wait_notifications(1);
    assert_eq!(
        since(&b, mark),
        "received event on fd 8 vector 1: 1\nreceive notification from peer_id=1 vector=1\n"
    );
    b.send("int 0");
    a.wait_notifications(2);

    // Our host commands in the same region (B leaves first: the peer limit is 2).
    let b_end = b.terminate();
    a.wait_count(Stream::Stdout, "delete peer id = 1\n", 1);
    let mark = a.process.output(Stream::Stdout).len();
    let vm1_arg = vm1.to_string_lossy().into_owned();
    let peers = ivshm(&["peers", "--socket", &vm1_arg]);
    assert_eq!(
        peers,
        "self id=1 vectors=2 size=65536\npeer id=0 vectors=2\n"
    );
    // Its leave is through before the next one joins (else the limit refuses that one).
    a.wait_count(Stream::Stdout, "delete peer id = 1\n", 2);
    ivshm(&[
        "notify", "--socket", &vm1_arg, "--peer", "0", "--vector", "1",
    ]);
    a.wait_notifications(3);
    a.wait_count(Stream::Stdout, "delete peer id = 1\n", 3);
    // A saw each host command join (the lowest free id: 1, B's) and leave, and the doorbell
    // (which may come before, between or after the news of its sender: another channel).
    let a_out = since(&a, mark);
    for line in [
        "new peer id = 1\n",
        "  new vector 0 (fd=7) for peer id 1\n",
        "  new vector 1 (fd=8) for peer id 1\n",
        "delete peer id = 1\n",
    ] {
        assert_eq!(a_out.matches(line).count(), 2, "{line:?} in {a_out}");
    }
    assert!(
        a_out.contains(
            "received event on fd 6 vector 1: 1\nreceive notification from peer_id=0 vector=1\n"
        ),
        "{a_out}"
    );

    // The limit: with A and C in, a third QEMU client is refused (the connection closes before
    // any message: QEMU's client cannot read the version) and retries; when A leaves it gets
    // A's id, 0.
    let mut c = client("QEMU client C (vm1)", &vm1);
    c.wait_connected(1);
    c.wait_eventfds(4);
    let mut d = client("QEMU client D (vm0)", &vm0);
    d.wait_count(Stream::Stderr, RETRY, 1);
    d.wait_count(Stream::Stdout, "cannot read from server\n", 1);
    let d_out = d.process.output(Stream::Stdout);
    assert!(
        d_out.contains(&format!(
            "connect to client {}\ncannot read message: Success\ncannot read from server\n",
            vm0.display()
        )),
        "{d_out}"
    );
    let a_end = a.terminate();
    d.wait_connected(1);
    d.wait_eventfds(4);
    assert!(d.process.output(Stream::Stdout).contains("our_id=0\n"));
    d.send("dump");
    assert!(d.process.output(Stream::Stdout).ends_with(
        "our_id = 0\n  vector 0 is enabled (fd=7)\n  vector 1 is enabled (fd=8)\n\
         peer_id = 1\n  vector 0 is enabled (fd=5)\n  vector 1 is enabled (fd=6)\ncmd> "
    ));

    // The server stops: both are disconnected and retry.
    server.signal(ivshm_test_support::process::Signal::TERM);
    assert!(server.wait_exit(WAIT_GUARD).unwrap().success());
    for client in [&c, &d] {
        client.wait_count(Stream::Stdout, "disconnected from server\n", 1);
    }
    c.terminate();
    d.terminate();
    for end in [a_end, b_end] {
        assert_eq!(ending(end), "signal 15");
    }
}

/// A session of `client`s (QEMU's or ours) in a named region whose ids are reused at once
/// (`lowest-free`, `id_reuse = "immediate"`: no QEMU guest here) and whose peer limit refuses a third peer: a peer leaves and a new one gets
/// its id, `dump` before and after, doorbells to the reused id, a refused client that retries
/// until a place is free (and then gets the id of the one that left), the server stopping.
fn reuse_session(programs: &Programs, which: Impl) -> Transcript {
    let mut run = RunDir::new("reuse");
    let root = run.dir.join("root");
    let config = run.dir.join("ivshm.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\n\
             [[region]]\nname = \"shared\"\nsize = \"64K\"\nvectors = 2\npeer_limit = 2\n\
             id_policy = \"lowest-free\"\nid_reuse = \"immediate\"\n\
             [vm.vm0]\nrules = [\"allow shared\"]\n",
            root.display().to_string()
        ),
    )
    .unwrap();
    // The region's socket plays the run's socket (`<socket>` in the transcripts).
    run.sock = root.join("vm0/shared.sock");
    let n = run.normalizer();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    command.arg("serve").arg("--config").arg(&config);
    let mut server = HostProcess::spawn("ivshm serve --config", command).unwrap();
    wait_listening(&run.sock);
    let sock = run.sock_arg();
    let start = |name: &str| Client::start(name, programs.client(which), &["-v", "-S", &sock]);

    let mut a = start("client A");
    a.wait_connected(1);
    a.wait_eventfds(2);
    let mut b = start("client B");
    b.wait_connected(1);
    b.wait_eventfds(4);
    a.wait_eventfds(4);
    // B leaves; C gets B's id, 1.
    let b_end = b.terminate();
    a.wait_count(Stream::Stdout, "delete peer id = 1\n", 1);
    a.wait_eventfds(2);
    let mut c = start("client C");
    c.wait_connected(1);
    c.wait_eventfds(4);
    a.wait_eventfds(4);
    a.send("dump");
    c.send("dump");
    a.send("int 1 all");
    c.wait_notifications(2);
    c.send("int 0 1");
    a.wait_notifications(1);
    // The limit: D is refused and retries; when A leaves, D gets A's id, 0.
    let mut d = start("client D");
    d.wait_count(Stream::Stderr, RETRY, 1);
    d.wait_count(Stream::Stdout, "cannot read from server\n", 1);
    let a_end = a.terminate();
    c.wait_count(Stream::Stdout, "delete peer id = 0\n", 1);
    d.wait_connected(1);
    d.wait_eventfds(4);
    c.wait_eventfds(4);
    d.send("dump");
    c.send("dump");
    d.send("int 1 0");
    c.wait_notifications(3);
    c.send("int all");
    d.wait_notifications(2);
    // The server stops: C and D are told and retry.
    assert_eq!(ending(stop_server(&mut server)), "exit 0");
    for client in [&c, &d] {
        client.wait_count(Stream::Stdout, "disconnected from server\n", 1);
        client.wait_count(Stream::Stderr, RETRY, 1);
    }
    let c_end = c.terminate();
    let d_end = d.terminate();
    let mut t = Transcript::default();
    t.add_client("client A", &a, a_end, &n);
    t.add_client("client B", &b, b_end, &n);
    t.add_client("client C", &c, c_end, &n);
    t.add_client("client D", &d, d_end, &n);
    t
}

#[test]
fn our_client_matches_qemus_on_a_server_that_reuses_ids_and_refuses_peers() {
    let programs = Programs {
        qemu: require_qemu_tools!(),
    };
    let (qemu, ours) = std::thread::scope(|scope| {
        let qemu = scope.spawn(|| reuse_session(&programs, Impl::Qemu));
        let ours = reuse_session(&programs, Impl::Ours);
        (qemu.join().unwrap(), ours)
    });
    eprintln!("reference transcript (QEMU's client):\n{}", qemu.render());
    assert_same("our client", &qemu, &ours);
}
