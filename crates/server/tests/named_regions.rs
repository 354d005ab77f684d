//! Named regions through the factory, the control socket and the QEMU-facing v0 sockets of the
//! per-VM directories, against an in-process server started from a TOML file.

mod named_server;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ivshm_policy::GuestShmStatus;
use ivshm_proto::control::{ControlRequest, ControlResult, CreateRegion};
use ivshm_proto::factory::{decode_line, encode_line, FactoryRequest, FactoryResponse};
use ivshm_test_support::fds::{readable_now, ring, take, wait_readable};
use ivshm_test_support::v0::RawPeer;
use ivshm_test_support::WAIT_GUARD;
use named_server::{exchange, status, Setup};

const LIMIT: Duration = WAIT_GUARD;

fn inode(fd: &OwnedFd) -> u64 {
    rustix::fs::fstat(fd).unwrap().st_ino
}

#[test]
fn the_seed_examples_decide_through_the_factory_and_the_directories() {
    let setup = Setup::new(
        "seed",
        r#"
[defaults]
vectors = 1
[[region]]
name = "testing"
size = 4096
[[region]]
name = "pluto"
size = 4096
[[region]]
name = "plutoplanet"
size = 4096
[[region]]
name = "livefeed"
size = 4096
[[region]]
name = "mars"
size = 4096
[vm.first]
rules = ["allow test*", "allow pluto"]
[vm.second]
qnx = """
    deny live*
    deny pluto
"""
[vm.third]
qnx = "deny pluto allow pluto*"
"#,
    );
    let expect = [
        ("first", vec!["pluto", "testing"]),
        ("second", vec!["mars", "plutoplanet", "testing"]),
        ("third", vec!["plutoplanet"]),
    ];
    for (vm, visible) in expect {
        let mut wanted: Vec<String> = visible.iter().map(|n| format!("{n}.sock")).collect();
        wanted.push("factory.sock".into());
        wanted.sort();
        assert_eq!(setup.listing(vm), wanted, "directory of {vm}");
        for name in ["testing", "pluto", "plutoplanet", "livefeed", "mars"] {
            let response = setup.find(vm, name);
            let allowed = visible.contains(&name);
            let expected = if allowed {
                GuestShmStatus::Ok
            } else {
                GuestShmStatus::NoPermission
            };
            assert_eq!(
                status(&response),
                expected,
                "{vm} finds {name}: {response:?}"
            );
            if allowed {
                let offer = response.region.unwrap();
                assert_eq!(
                    PathBuf::from(&offer.socket),
                    setup.vm_dir(vm).join(format!("{name}.sock"))
                );
                // The socket is a working v0 socket of that region.
                let mut peer = RawPeer::connect(Path::new(&offer.socket));
                let joined = peer.handshake(1, &[]);
                assert_eq!(rustix::fs::fstat(&joined.shm).unwrap().st_size, 4096);
            }
        }
    }
}

#[test]
fn every_status_code_through_the_factory_and_the_v0_sockets() {
    let setup = Setup::new(
        "codes",
        r#"
[defaults]
vectors = 1
max_size = "64M"
[[region]]
name = "small"
size = 4096
peer_limit = 2
[vm.vm0]
rules = ["deny secret*", "allow *"]
"#,
    );
    // GSS_OK: create decides the size (rounded up to a power of two for QEMU's BAR) ...
    let created = setup.create("vm0", "fresh", 983040);
    assert_eq!(status(&created), GuestShmStatus::Ok, "{created:?}");
    let offer = created.region.unwrap();
    assert_eq!(offer.size, 1 << 20);
    assert_eq!(offer.host_name, "fresh");
    assert_eq!(offer.vectors, 1);
    assert_eq!(offer.peer_limit, 16);
    assert_eq!(offer.id_policy, "lowest-free");
    assert!(setup.vm_dir("vm0").join("fresh.sock").exists());
    // ... and a later create with another size attaches and gets the actual size.
    let again = setup.create("vm0", "fresh", 4096);
    assert_eq!(status(&again), GuestShmStatus::Ok);
    assert_eq!(again.region.unwrap().size, 1 << 20);

    assert_eq!(
        status(&setup.create("vm0", "a/b", 4096)),
        GuestShmStatus::IllegalName
    );
    assert_eq!(
        status(&setup.create("vm0", &"x".repeat(32), 4096)),
        GuestShmStatus::IllegalName
    );
    assert_eq!(
        status(&setup.create("vm0", "secret-plans", 4096)),
        GuestShmStatus::NoPermission
    );
    assert!(!setup.vm_dir("vm0").join("secret-plans.sock").exists());
    assert_eq!(
        status(&setup.find("vm0", "nothing")),
        GuestShmStatus::DoesNotExist
    );
    assert_eq!(
        status(&setup.create("vm0", "nothing", 0)),
        GuestShmStatus::DoesNotExist
    );
    assert_eq!(
        status(&setup.create("vm0", "huge", 128 << 20)),
        GuestShmStatus::NoMem
    );
    assert!(!setup.vm_dir("vm0").join("huge.sock").exists());
    let garbage = exchange(&setup.vm_dir("vm0").join("factory.sock"), b"not json\n");
    let garbage: FactoryResponse = decode_line(&garbage).unwrap();
    assert_eq!(status(&garbage), GuestShmStatus::UnknownFailure);

    // GSS_CLIENT_MAX: through the factory and on the v0 socket.
    let socket = setup.vm_dir("vm0").join("small.sock");
    let mut a = RawPeer::connect(&socket);
    let a_joined = a.handshake(1, &[]);
    assert_eq!(a_joined.id, 0);
    let mut b = RawPeer::connect(&socket);
    let b_joined = b.handshake(1, &[0]);
    assert_eq!(b_joined.id, 1);
    a.expect_join(1, 1);
    let full = setup.find("vm0", "small");
    assert_eq!(status(&full), GuestShmStatus::ClientMax);
    assert_eq!(full.region.unwrap().peers, 2);
    let mut refused = RawPeer::connect(&socket);
    assert_eq!(refused.expect_closed(), 0, "a refused peer gets no message");
    // The two members are undisturbed.
    assert!(!readable_now(a.sock.as_fd()));
    ring(&b_joined.peers[&0][0]);
    wait_readable(a_joined.own[0].as_fd());
    assert_eq!(take(&a_joined.own[0]), 1);
    // Ids are reused safely (the default): B saw A's id 0 leave, so 0 is held back while B is
    // connected (QEMU 7.2 aborts when told of a new peer 0 after that), and the region's two
    // ids are one in use, one held: a third peer is refused as by a full region, saying why.
    drop(a);
    b.expect_leave(0);
    let held = setup.find("vm0", "small");
    assert_eq!(status(&held), GuestShmStatus::ClientMax);
    assert!(
        held.message.ends_with(
            ": region small has no id it may give a new peer: of its 2 ids, 1 in use, 1 held \
             back ([0]) until peer(s) [1] leave, which saw their last holders leave (QEMU \
             7.2's ivshmem-doorbell aborts when told of a new peer with such an id; id_reuse \
             = \"immediate\" gives them at once, for regions whose peers all handle reuse)"
        ),
        "{held:?}"
    );
    let mut refused = RawPeer::connect(&socket);
    assert_eq!(refused.expect_closed(), 0, "a refused peer gets no message");
    let small = |r: &[ivshm_proto::control::RegionReport]| {
        r.iter().find(|r| r.name == "small").cloned().unwrap()
    };
    let listed = small(&setup.regions());
    assert_eq!((listed.peers, listed.held_ids), (vec![1], vec![0]));
    assert_eq!(listed.id_reuse, "safe");
    // B leaves too: nobody connected saw either leave, so the next peer gets the lowest id.
    drop(b);
    setup.wait_regions("B's leave", |r| small(r).peers.is_empty());
    assert!(small(&setup.regions()).held_ids.is_empty());
    let mut c = RawPeer::connect(&socket);
    assert_eq!(c.handshake(1, &[]).id, 0);

    let stats = setup.stats();
    assert_eq!(stats.refusals["GSS_CLIENT_MAX"], 4, "{stats:?}");
    assert_eq!(stats.refusals["GSS_ILLEGAL_NAME"], 2);
    assert_eq!(stats.refusals["GSS_NO_PERMISSION"], 1);
    assert_eq!(stats.refusals["GSS_DOES_NOT_EXIST"], 2);
    assert_eq!(stats.refusals["GSS_NOMEM"], 1);
    assert_eq!(stats.refusals["GSS_UNKNOWN_FAILURE"], 1);
    assert_eq!(stats.factory_requests, 11);
    assert_eq!(stats.joins, 3);
    assert_eq!(stats.leaves, 2);
    // a: own 1; b: a's 1 + own 1, and its 1 to a; c: own 1.
    assert_eq!(stats.doorbell_fds, 1 + 3 + 1);
}

#[test]
fn two_vms_with_subst_share_a_guest_name_but_not_a_region() {
    let setup = Setup::new(
        "subst",
        r#"
[defaults]
vectors = 2
[vm.vm0]
qnx = """
    subst ,guest0
    create mem,0xf0000
"""
[vm.vm1]
qnx = """
    subst ,guest1
    create mem,0xf0000
"""
[vm.other]
rules = ["allow other*"]
[vm.monitor]
rules = ["allow guest*"]
"#,
    );
    assert_eq!(setup.listing("vm0"), ["factory.sock", "mem.sock"]);
    assert_eq!(setup.listing("vm1"), ["factory.sock", "mem.sock"]);
    assert_eq!(setup.listing("other"), ["factory.sock"]);
    assert_eq!(
        setup.listing("monitor"),
        ["factory.sock", "guest0mem.sock", "guest1mem.sock"]
    );
    let found = setup.find("vm0", "mem");
    assert_eq!(status(&found), GuestShmStatus::Ok);
    let offer = found.region.unwrap();
    assert_eq!(offer.host_name, "guest0mem");
    assert_eq!(offer.size, 1 << 20);
    assert_eq!(
        setup.find("vm1", "mem").region.unwrap().host_name,
        "guest1mem"
    );
    assert_eq!(
        status(&setup.find("other", "guest0mem")),
        GuestShmStatus::NoPermission
    );

    let mut p0 = RawPeer::connect(&setup.vm_dir("vm0").join("mem.sock"));
    let j0 = p0.handshake(2, &[]);
    let mut p1 = RawPeer::connect(&setup.vm_dir("vm1").join("mem.sock"));
    let j1 = p1.handshake(2, &[]);
    assert_ne!(
        inode(&j0.shm),
        inode(&j1.shm),
        "same guest name, different regions"
    );
    // The monitor joins vm0's region: it sees vm0's peer and shares its memory and doorbells.
    let mut m = RawPeer::connect(&setup.vm_dir("monitor").join("guest0mem.sock"));
    let jm = m.handshake(2, &[0]);
    assert_eq!(inode(&jm.shm), inode(&j0.shm));
    p0.expect_join(jm.id, 2);
    ring(&jm.peers[&0][1]);
    wait_readable(j0.own[1].as_fd());
    assert_eq!(take(&j0.own[1]), 1);
    assert!(!readable_now(j1.own[1].as_fd()));

    let vms = match setup.control(&ControlRequest::Vms) {
        ControlResult::Vms { vms } => vms,
        other => panic!("{other:?}"),
    };
    let monitor = vms.iter().find(|v| v.name == "monitor").unwrap();
    let guest0 = monitor
        .regions
        .iter()
        .find(|r| r.host_name == "guest0mem")
        .unwrap();
    assert_eq!(guest0.guest_name, "guest0mem");
    assert_eq!(guest0.peers, vec![jm.id]);
    let vm0 = vms.iter().find(|v| v.name == "vm0").unwrap();
    assert_eq!(vm0.regions[0].guest_name, "mem");
    assert_eq!(vm0.regions[0].peers, vec![0]);
}

#[test]
fn run_time_regions_go_with_their_last_peer_unless_they_persist() {
    let setup = Setup::new(
        "lifetime",
        r#"
[defaults]
vectors = 1
dir_mode = "0710"
[vm.vm0]
"#,
    );
    let mode = std::fs::metadata(setup.vm_dir("vm0"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o710);
    let control_mode = std::fs::symlink_metadata(setup.root.join("control.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(control_mode & 0o777, 0o600);

    // Factory-made: removed when its last peer leaves.
    assert_eq!(
        status(&setup.create("vm0", "scratch", 4096)),
        GuestShmStatus::Ok
    );
    let socket = setup.vm_dir("vm0").join("scratch.sock");
    let mut p = RawPeer::connect(&socket);
    p.handshake(1, &[]);
    drop(p);
    setup.wait_regions("scratch to go", |r| r.iter().all(|r| r.name != "scratch"));
    assert!(!socket.exists());

    // Control-made with persist: stays.
    let created = setup.control(&ControlRequest::Create(CreateRegion {
        name: "kept".into(),
        size: 8192,
        persist: true,
        peer_limit: Some(4),
        id_policy: Some("increasing".into()),
        ..CreateRegion::default()
    }));
    let ControlResult::Created { region } = created else {
        panic!("{created:?}")
    };
    assert_eq!(
        (region.size, region.peer_limit, region.origin.as_str()),
        (8192, 4, "control")
    );
    let kept = setup.vm_dir("vm0").join("kept.sock");
    let mut p = RawPeer::connect(&kept);
    p.handshake(1, &[]);
    drop(p);
    setup.wait_regions("the leave", |r| {
        r.iter().any(|r| r.name == "kept" && r.peers.is_empty())
    });
    assert!(kept.exists());
    assert!(setup
        .control_error(&ControlRequest::Create(CreateRegion {
            name: "kept".into(),
            size: 1,
            ..CreateRegion::default()
        }))
        .contains("exists"));

    // Removing a region with a peer: the socket goes now, the region when the peer leaves.
    let mut p = RawPeer::connect(&kept);
    p.handshake(1, &[]);
    let removed = setup.control(&ControlRequest::Remove {
        name: "kept".into(),
    });
    let ControlResult::Removed { message } = removed else {
        panic!("{removed:?}")
    };
    assert!(
        message.contains("stays until its 1 connected peer(s)"),
        "{message}"
    );
    assert!(!kept.exists());
    assert!(setup
        .regions()
        .iter()
        .any(|r| r.name == "kept" && r.detached));
    drop(p);
    setup.wait_regions("kept to go", |r| r.iter().all(|r| r.name != "kept"));
    assert!(setup
        .control_error(&ControlRequest::Remove {
            name: "kept".into()
        })
        .contains("no region"));
}

#[test]
fn reload_keeps_connected_peers_and_says_what_it_does() {
    let setup = Setup::new(
        "reload",
        r#"
[defaults]
vectors = 1
[vm.vm0]
subst = ",guest0"
create = [{ name = "mem", size = 4096 }, { name = "log", size = 4096 }]
"#,
    );
    assert_eq!(
        setup.listing("vm0"),
        ["factory.sock", "log.sock", "mem.sock"]
    );
    let mut mem_peer = RawPeer::connect(&setup.vm_dir("vm0").join("mem.sock"));
    let mem_joined = mem_peer.handshake(1, &[]);
    let mut log_peer = RawPeer::connect(&setup.vm_dir("vm0").join("log.sock"));
    log_peer.handshake(1, &[]);

    // vm0 may no longer use mem; log is no longer configured; vm1 is new.
    setup.write_config(
        r#"
[defaults]
vectors = 1
[vm.vm0]
subst = ",guest0"
rules = ["deny mem"]
create = [{ name = "mem", size = 4096 }]
[vm.vm1]
"#,
    );
    let reloaded = setup.control(&ControlRequest::Reload);
    let ControlResult::Reloaded { changes } = reloaded else {
        panic!("{reloaded:?}")
    };
    let all = changes.join("\n");
    assert!(all.contains("VM vm1 added"), "{all}");
    assert!(
        all.contains("region guest0log removed from every VM directory"),
        "{all}"
    );
    assert!(all.contains("stay connected"), "{all}");
    assert_eq!(setup.listing("vm0"), ["factory.sock"]);
    // vm1 has no subst and no rules: it sees the host names.
    assert_eq!(setup.listing("vm1"), ["factory.sock", "guest0mem.sock"]);

    // The connected peers were not dropped: a new peer through vm1 meets the mem peer.
    let mut newcomer = RawPeer::connect(&setup.vm_dir("vm1").join("guest0mem.sock"));
    let joined = newcomer.handshake(1, &[mem_joined.id]);
    mem_peer.expect_join(joined.id, 1);
    ring(&joined.peers[&mem_joined.id][0]);
    wait_readable(mem_joined.own[0].as_fd());
    assert!(setup
        .regions()
        .iter()
        .any(|r| r.name == "guest0log" && r.detached && r.peers.len() == 1));
    drop(log_peer);
    setup.wait_regions("guest0log to go", |r| {
        r.iter().all(|r| r.name != "guest0log")
    });

    // A broken file changes nothing.
    setup.write_config("[vm.vm0]\nrules = [\"permit x\"]\n");
    assert!(setup
        .control_error(&ControlRequest::Reload)
        .contains("unknown keyword"));
    assert_eq!(setup.listing("vm1"), ["factory.sock", "guest0mem.sock"]);
}

#[test]
fn a_reload_signal_re_reads_the_file_and_directories_go_at_shutdown() {
    let mut setup = Setup::new("signal", "[defaults]\nvectors = 1\n[vm.vm0]\n");
    assert_eq!(setup.listing("vm0"), ["factory.sock"]);
    setup.write_config(
        "[defaults]\nvectors = 1\n[[region]]\nname = \"late\"\nsize = 4096\n[vm.vm0]\n",
    );
    // What SIGHUP does (the handle's reload fd has the same action as the signal pipe).
    setup.server.as_ref().unwrap().reload().unwrap();
    setup.wait_regions("the reload", |r| r.iter().any(|r| r.name == "late"));
    assert_eq!(setup.listing("vm0"), ["factory.sock", "late.sock"]);
    let server = setup.server.take().unwrap();
    server.shutdown().unwrap();
    assert!(
        !setup.vm_dir("vm0").exists(),
        "empty VM directories are removed"
    );
    assert!(!setup.root.join("control.sock").exists());
}

#[test]
fn a_qnx_style_region_admits_16_clients_and_refuses_the_17th() {
    let setup = Setup::new("sixteen", "[defaults]\nvectors = 1\n[vm.vm0]\n");
    let created = setup.create("vm0", "bus", 4096);
    assert_eq!(status(&created), GuestShmStatus::Ok);
    let offer = created.region.unwrap();
    assert_eq!(
        (offer.peer_limit, offer.id_policy.as_str()),
        (16, "lowest-free")
    );
    let socket = PathBuf::from(offer.socket);
    let mut peers = Vec::new();
    for id in 0..16u16 {
        let mut peer = RawPeer::connect(&socket);
        let existing: Vec<u16> = (0..id).collect();
        assert_eq!(
            peer.handshake(1, &existing).id,
            id,
            "ids are the clients' indices"
        );
        for other in peers.iter_mut() {
            let other: &mut RawPeer = other;
            other.expect_join(id, 1);
        }
        peers.push(peer);
    }
    let full = setup.create("vm0", "bus", 4096);
    assert_eq!(status(&full), GuestShmStatus::ClientMax);
    let mut seventeenth = RawPeer::connect(&socket);
    assert_eq!(seventeenth.expect_closed(), 0);
    assert_eq!(setup.stats().refusals["GSS_CLIENT_MAX"], 2);
}

#[test]
fn factory_connections_are_bounded_and_survive_bad_lines() {
    let setup = Setup::new("conns", "[vm.vm0]\n");
    let factory = setup.vm_dir("vm0").join("factory.sock");
    // Many requests on one connection, with a bad and an oversized line between them.
    let mut stream = UnixStream::connect(&factory).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    let mut batch = encode_line(&FactoryRequest::Find { name: "x".into() });
    batch.extend_from_slice(b"{\"op\":\"find\"}\n");
    batch.extend(std::iter::repeat_n(
        b'z',
        ivshm_proto::factory::MAX_LINE + 5,
    ));
    batch.push(b'\n');
    batch.extend(encode_line(&FactoryRequest::Find { name: "y".into() }));
    stream.write_all(&batch).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut codes = Vec::new();
    for _ in 0..4 {
        let mut line = Vec::new();
        reader.read_until(b'\n', &mut line).unwrap();
        codes.push(status(&decode_line::<FactoryResponse>(&line).unwrap()));
    }
    assert_eq!(
        codes,
        [
            GuestShmStatus::DoesNotExist,
            GuestShmStatus::UnknownFailure,
            GuestShmStatus::UnknownFailure,
            GuestShmStatus::DoesNotExist
        ]
    );
    drop(reader);
    drop(stream);
    // At most 64 connections at once: the 65th is closed without an answer. Each of the 64
    // answers first, so the server has accepted them all before the 65th connects.
    let open: Vec<UnixStream> = (0..64)
        .map(|_| {
            let mut s = UnixStream::connect(&factory).unwrap();
            s.set_read_timeout(Some(LIMIT)).unwrap();
            s.write_all(&encode_line(&FactoryRequest::Find { name: "x".into() }))
                .unwrap();
            let mut line = Vec::new();
            BufReader::new(s.try_clone().unwrap())
                .read_until(b'\n', &mut line)
                .unwrap();
            assert!(!line.is_empty());
            s
        })
        .collect();
    let mut extra = UnixStream::connect(&factory).unwrap();
    extra.set_read_timeout(Some(LIMIT)).unwrap();
    let _ = extra.write_all(&encode_line(&FactoryRequest::Find { name: "x".into() }));
    let mut line = Vec::new();
    let n = BufReader::new(extra)
        .read_until(b'\n', &mut line)
        .unwrap_or(0);
    assert_eq!(n, 0, "the 65th connection is closed unanswered: {line:?}");
    drop(open);
}

/// The server's log, captured for the whole test binary (tests filter by their own VM names).
fn captured_log() -> String {
    use std::sync::{Arc, Mutex, OnceLock};
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    struct Writer(Arc<Mutex<Vec<u8>>>);
    impl Write for Writer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let log = LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Writer(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        log
    });
    String::from_utf8_lossy(&log.lock().unwrap()).into_owned()
}

/// `intr`, `loc` and `sched` are carried to device models; for QEMU guests the server says once
/// per VM (not per peer, not per reload) that they cannot apply.
#[test]
fn placement_options_are_reported_once_per_vm() {
    captured_log();
    let placed = r#"
[defaults]
vectors = 1
[vm.placed-qnx]
qnx = """
    loc 0x1c000000
    intr gic:40
    sched 10
    create mem,4096
"""
[vm.plain-qemu]
"#;
    let setup = Setup::new("placement", placed);
    let warning = "cannot apply to QEMU guests";
    let count = |vm: &str| {
        captured_log()
            .lines()
            .filter(|line| line.contains(warning) && line.contains(&format!("vm={vm}")))
            .count()
    };
    assert_eq!(count("placed-qnx"), 1, "{}", captured_log());
    assert_eq!(count("plain-qemu"), 0);
    // QEMU-style peers joining through the VM's socket do not repeat it ...
    let socket = setup.vm_dir("placed-qnx").join("mem.sock");
    let mut first = RawPeer::connect(&socket);
    first.handshake(1, &[]);
    let mut second = RawPeer::connect(&socket);
    second.handshake(1, &[0]);
    // ... nor do reloads, even one that changes the VM's policy.
    setup.write_config(&placed.replace("sched 10", "sched 11"));
    let ControlResult::Reloaded { changes } = setup.control(&ControlRequest::Reload) else {
        panic!("reload")
    };
    assert!(
        changes.iter().any(|c| c == "VM placed-qnx: policy updated"),
        "{changes:?}"
    );
    setup.control(&ControlRequest::Reload);
    assert_eq!(count("placed-qnx"), 1, "{}", captured_log());
}

/// Memory that cannot be had for its size is `GSS_NOMEM`; a backend failing for another reason
/// is `GSS_UNKNOWN_FAILURE`. Neither leaves a region or a socket behind.
#[test]
fn memory_failures_are_nomem_or_unknown_failure() {
    let giant = Setup::new(
        "giant",
        "[defaults]\nvectors = 1\nmax_size = \"8E\"\n[vm.vm0]\n",
    );
    // Within max_size, but larger than any file can be.
    let response = giant.create("vm0", "giant", 1 << 63);
    assert_eq!(status(&response), GuestShmStatus::NoMem, "{response:?}");
    assert!(response
        .message
        .contains("larger than the largest file size"));
    assert!(giant.regions().is_empty());
    assert_eq!(giant.listing("vm0"), ["factory.sock"]);

    let missing_dir = "/nonexistent-ivshm-backend-dir";
    let broken = Setup::new(
        "nodir",
        &format!("[defaults]\nvectors = 1\nbackend = \"dir\"\ndir = {missing_dir:?}\n[vm.vm0]\n"),
    );
    let response = broken.create("vm0", "mem", 4096);
    assert_eq!(
        status(&response),
        GuestShmStatus::UnknownFailure,
        "{response:?}"
    );
    assert!(response.message.contains(missing_dir), "{response:?}");
    assert!(broken.regions().is_empty());
    assert_eq!(broken.stats().refusals["GSS_UNKNOWN_FAILURE"], 1);
}

/// The seed's first `subst` example, verbatim: VM 0 has `subst foo,guest0` and pre-creates
/// `foomem`; VM 1 has only `subst foo,guest1`. VM 1's guest creates `foomem` at run time and gets
/// the host's `guest1mem`; both guests call their region `foomem`.
#[test]
fn the_seed_subst_example_with_a_run_time_create() {
    let setup = Setup::new(
        "seedsubst",
        r#"
[defaults]
vectors = 1
[vm.vm0]
qnx = """
vdev shmem
    subst foo,guest0
    create foomem,0xf0000
"""
[vm.vm1]
qnx = """
vdev shmem
    subst foo,guest1
"""
"#,
    );
    assert_eq!(setup.listing("vm0"), ["factory.sock", "foomem.sock"]);
    // A name without `foo` passes through `subst` unchanged (QNX: "if found"), so with no rules
    // VM 1 sees VM 0's region under its host name. Confining VMs takes rules (see
    // docs/named-regions.md); the prefix form `subst ,guest1` confines by itself.
    assert_eq!(setup.listing("vm1"), ["factory.sock", "guest0mem.sock"]);
    assert_eq!(
        status(&setup.find("vm1", "foomem")),
        GuestShmStatus::DoesNotExist
    );
    let created = setup.create("vm1", "foomem", 8192);
    assert_eq!(status(&created), GuestShmStatus::Ok, "{created:?}");
    let offer = created.region.unwrap();
    assert_eq!(
        (
            offer.guest_name.as_str(),
            offer.host_name.as_str(),
            offer.size
        ),
        ("foomem", "guest1mem", 8192)
    );
    assert_eq!(
        setup.listing("vm1"),
        ["factory.sock", "foomem.sock", "guest0mem.sock"]
    );
    assert_eq!(
        setup.listing("vm0"),
        ["factory.sock", "foomem.sock", "guest1mem.sock"]
    );
    let vm0 = setup.find("vm0", "foomem").region.unwrap();
    assert_eq!((vm0.host_name.as_str(), vm0.size), ("guest0mem", 1 << 20));
    let mut p0 = RawPeer::connect(Path::new(&vm0.socket));
    let j0 = p0.handshake(1, &[]);
    let mut p1 = RawPeer::connect(Path::new(&offer.socket));
    let j1 = p1.handshake(1, &[]);
    assert_ne!(inode(&j0.shm), inode(&j1.shm));
    let crossing = setup.find("vm1", "guest0mem");
    assert_eq!(status(&crossing), GuestShmStatus::Ok);
    assert_eq!(crossing.region.unwrap().host_name, "guest0mem");
}

/// A reload keeps an existing region's size, vectors, limit and id policy, and says which
/// configured settings wait until the region is recreated.
#[test]
fn reload_says_which_settings_of_an_existing_region_wait() {
    let region = |size: u32, vectors: u32, limit: u32| {
        format!(
            "[[region]]\nname = \"fixed\"\nsize = {size}\nvectors = {vectors}\npeer_limit = {limit}\n[vm.vm0]\n"
        )
    };
    let setup = Setup::new("settings", &region(4096, 1, 2));
    setup.write_config(&region(8192, 2, 4));
    let ControlResult::Reloaded { changes } = setup.control(&ControlRequest::Reload) else {
        panic!("reload")
    };
    assert_eq!(
        changes,
        [
            "region fixed exists with 4096 bytes, vectors=1, peer_limit=2; the configured 8192 \
          bytes, vectors=2, peer_limit=4 do not apply until it is recreated"
        ]
    );
    let fixed = &setup.regions()[0];
    assert_eq!((fixed.size, fixed.vectors, fixed.peer_limit), (4096, 1, 2));
    // A smaller configured size is met by the region as it is: nothing to say.
    setup.write_config(&region(2048, 1, 2));
    let ControlResult::Reloaded { changes } = setup.control(&ControlRequest::Reload) else {
        panic!("reload")
    };
    assert_eq!(changes, ["nothing changed"]);
}

/// VM directories and their sockets get the configured owner, group and modes (a VM's own
/// settings over `[defaults]`), at start, for sockets added later, and again on reload.
#[test]
fn vm_directories_and_sockets_are_owned_and_permissioned_as_configured() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: changing owners needs root");
        return;
    }
    let config_with = |vm1_dir_mode: &str, vm1_group: &str, vm1_socket_mode: &str| {
        format!(
            "[defaults]\nvectors = 1\ndir_mode = \"0750\"\nsocket_mode = \"0660\"\ngroup = \"nogroup\"\n\
             [[region]]\nname = \"shared\"\nsize = 4096\n\
             [vm.vm0]\n\
             [vm.vm1]\nowner = 65534\ngroup = {vm1_group:?}\ndir_mode = {vm1_dir_mode:?}\n\
             socket_mode = {vm1_socket_mode:?}\n"
        )
    };
    let config = |vm1_dir_mode: &str| config_with(vm1_dir_mode, "0", "0600");
    let setup = Setup::new("owners", &config("0700"));
    let meta = |path: PathBuf| std::fs::symlink_metadata(&path).unwrap();
    let facts = |path: PathBuf| {
        let m = meta(path);
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    assert_eq!(facts(setup.vm_dir("vm0")), (0, 65534, 0o750));
    assert_eq!(
        facts(setup.vm_dir("vm0").join("factory.sock")),
        (0, 65534, 0o660)
    );
    assert_eq!(
        facts(setup.vm_dir("vm0").join("shared.sock")),
        (0, 65534, 0o660)
    );
    assert_eq!(facts(setup.vm_dir("vm1")), (65534, 0, 0o700));
    // The VM's owner owns its sockets too, so a VMM running as that user can connect.
    assert_eq!(
        facts(setup.vm_dir("vm1").join("factory.sock")),
        (65534, 0, 0o600)
    );
    // A socket made later follows the same rules.
    assert_eq!(
        status(&setup.create("vm1", "later", 4096)),
        GuestShmStatus::Ok
    );
    assert_eq!(
        facts(setup.vm_dir("vm1").join("later.sock")),
        (65534, 0, 0o600)
    );
    assert_eq!(
        facts(setup.vm_dir("vm0").join("later.sock")),
        (0, 65534, 0o660)
    );
    // A reload applies a new directory mode.
    setup.write_config(&config("0710"));
    let ControlResult::Reloaded { changes } = setup.control(&ControlRequest::Reload) else {
        panic!("reload")
    };
    assert!(
        changes
            .iter()
            .any(|c| c
                == "VM vm1: directory and its 3 socket(s) updated to the new ownership and mode"),
        "{changes:?}"
    );
    assert_eq!(facts(setup.vm_dir("vm1")), (65534, 0, 0o710));
    // A reload that changes the group and socket mode brings the existing sockets in line
    // (the factory's and the regions'), not only the directory.
    setup.write_config(&config_with("0750", "nogroup", "0660"));
    let ControlResult::Reloaded { changes } = setup.control(&ControlRequest::Reload) else {
        panic!("reload")
    };
    assert!(
        changes
            .iter()
            .any(|c| c
                == "VM vm1: directory and its 3 socket(s) updated to the new ownership and mode"),
        "{changes:?}"
    );
    for socket in ["factory.sock", "shared.sock", "later.sock"] {
        assert_eq!(
            facts(setup.vm_dir("vm1").join(socket)),
            (65534, 65534, 0o660),
            "{socket}"
        );
    }
    assert_eq!(facts(setup.vm_dir("vm1")), (65534, 65534, 0o750));
    // A socket swapped for a link to a root file is left alone, and so is the file; the
    // reload says which socket and that a restart fixes it.
    let victim = setup.vm_dir("vm0").parent().unwrap().join("victim");
    std::fs::write(&victim, b"root's").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let later = setup.vm_dir("vm1").join("later.sock");
    std::fs::remove_file(&later).unwrap();
    std::os::unix::fs::symlink(&victim, &later).unwrap();
    setup.write_config(&config_with("0750", "0", "0640"));
    let ControlResult::Reloaded { changes } = setup.control(&ControlRequest::Reload) else {
        panic!("reload")
    };
    assert!(
        changes.iter().any(
            |c| c.contains("later.sock is no longer the socket the server bound")
                && c.contains("a restart of the server gives it the new ownership and mode")
        ),
        "{changes:?}"
    );
    assert_eq!(
        facts(victim.clone()),
        (0, 0, 0o600),
        "the link's target is untouched"
    );
    assert_eq!(
        facts(setup.vm_dir("vm1").join("factory.sock")),
        (65534, 0, 0o640)
    );
}

/// `[defaults] persist = true` keeps every run-time region after its last peer leaves.
#[test]
fn run_time_regions_persist_when_the_defaults_say_so() {
    let setup = Setup::new(
        "persist",
        "[defaults]\nvectors = 1\npersist = true\n[vm.vm0]\n",
    );
    assert_eq!(
        status(&setup.create("vm0", "scratch", 4096)),
        GuestShmStatus::Ok
    );
    setup.control(&ControlRequest::Create(CreateRegion {
        name: "tool".into(),
        size: 4096,
        ..CreateRegion::default()
    }));
    for name in ["scratch", "tool"] {
        let mut peer = RawPeer::connect(&setup.vm_dir("vm0").join(format!("{name}.sock")));
        peer.handshake(1, &[]);
        drop(peer);
    }
    // Without persist the regions would be gone once their peers are (same loop turn).
    setup.wait_regions("both leaves", |r| r.iter().all(|r| r.peers.is_empty()));
    let regions = setup.regions();
    assert_eq!(regions.len(), 2, "{regions:?}");
    assert!(regions.iter().all(|r| r.persist), "{regions:?}");
    assert_eq!(
        setup.listing("vm0"),
        ["factory.sock", "scratch.sock", "tool.sock"]
    );
}

/// `max_regions` bounds the run-time regions (configured ones do not count): a factory create
/// beyond it is `GSS_NOMEM`, a control create an error; removing one makes room.
#[test]
fn run_time_regions_are_bounded_by_max_regions() {
    let setup = Setup::new(
        "maxregions",
        "[defaults]\nvectors = 1\nmax_regions = 2\n[[region]]\nname = \"configured\"\nsize = 4096\n[vm.vm0]\n",
    );
    assert_eq!(status(&setup.create("vm0", "a", 4096)), GuestShmStatus::Ok);
    assert_eq!(status(&setup.create("vm0", "b", 4096)), GuestShmStatus::Ok);
    let refused = setup.create("vm0", "c", 4096);
    assert_eq!(status(&refused), GuestShmStatus::NoMem, "{refused:?}");
    assert!(refused
        .message
        .contains("limit of 2 run-time regions (max_regions)"));
    assert!(!setup.vm_dir("vm0").join("c.sock").exists());
    // Attaching to an existing region is not creating one.
    assert_eq!(status(&setup.create("vm0", "a", 4096)), GuestShmStatus::Ok);
    let error = setup.control_error(&ControlRequest::Create(CreateRegion {
        name: "d".into(),
        size: 4096,
        ..CreateRegion::default()
    }));
    assert!(error.contains("max_regions"), "{error}");
    setup.control(&ControlRequest::Remove { name: "a".into() });
    assert_eq!(status(&setup.create("vm0", "c", 4096)), GuestShmStatus::Ok);
    assert_eq!(setup.regions().len(), 3);
}

/// Issue 10, item 10: one VM cannot take every run-time region. Each VM's factory may create
/// at most `max_regions_per_vm` regions and `max_bytes_per_vm` bytes of them (`[defaults]`;
/// a VM's `max_regions` and `max_bytes` override); past either the answer is `GSS_NOMEM`,
/// naming the limit. Attaching to an existing region costs nothing, other VMs keep their own
/// quota, and removing a region gives its share back.
#[test]
fn each_vm_has_its_own_quota_of_run_time_regions() {
    let setup = Setup::new(
        "vmquota",
        "[defaults]\nvectors = 1\npow2 = \"off\"\nmax_regions_per_vm = 2\nmax_bytes_per_vm = \"1M\"\n\
         [vm.vm0]\nrules = [\"allow a*\"]\n[vm.vm1]\nrules = [\"allow b*\"]\nmax_regions = 3\n\
         [vm.vm2]\nrules = [\"allow c*\"]\nmax_bytes = \"8K\"\n",
    );
    assert_eq!(status(&setup.create("vm0", "a1", 4096)), GuestShmStatus::Ok);
    assert_eq!(status(&setup.create("vm0", "a2", 4096)), GuestShmStatus::Ok);
    let refused = setup.create("vm0", "a3", 4096);
    assert_eq!(status(&refused), GuestShmStatus::NoMem, "{refused:?}");
    assert!(
        refused.message.contains("VM vm0") && refused.message.contains("max_regions"),
        "{refused:?}"
    );
    assert!(!setup.vm_dir("vm0").join("a3.sock").exists());
    // Attaching is not creating.
    assert_eq!(status(&setup.create("vm0", "a1", 4096)), GuestShmStatus::Ok);
    // Another VM has its own quota, here a larger one.
    for name in ["b1", "b2", "b3"] {
        assert_eq!(status(&setup.create("vm1", name, 4096)), GuestShmStatus::Ok);
    }
    assert_eq!(
        status(&setup.create("vm1", "b4", 4096)),
        GuestShmStatus::NoMem
    );
    // Bytes: 8 KiB for vm2, whatever the count.
    assert_eq!(status(&setup.create("vm2", "c1", 4096)), GuestShmStatus::Ok);
    let refused = setup.create("vm2", "c2", 8192);
    assert_eq!(status(&refused), GuestShmStatus::NoMem, "{refused:?}");
    assert!(refused.message.contains("max_bytes"), "{refused:?}");
    assert_eq!(status(&setup.create("vm2", "c2", 4096)), GuestShmStatus::Ok);
    // The default byte quota (1 MiB) holds for vm0 too.
    setup.control(&ControlRequest::Remove { name: "a2".into() });
    assert_eq!(
        status(&setup.create("vm0", "a4", 2 << 20)),
        GuestShmStatus::NoMem
    );
    // A removed region gives its share back.
    assert_eq!(status(&setup.create("vm0", "a3", 4096)), GuestShmStatus::Ok);
}

/// Issue 10, item 10: a region a factory created and nobody ever joined is reclaimed after
/// `unused_timeout` (the loop wakes for it; no thread), while one with a peer, one whose peer
/// has come and gone but persists, and one made through the control socket stay.
#[test]
fn factory_regions_nobody_joins_are_reclaimed() {
    let setup = Setup::new(
        "reclaim",
        "[defaults]\nvectors = 1\nunused_timeout = \"300ms\"\n[vm.vm0]\n",
    );
    assert_eq!(
        status(&setup.create("vm0", "idle", 4096)),
        GuestShmStatus::Ok
    );
    assert_eq!(
        status(&setup.create("vm0", "used", 4096)),
        GuestShmStatus::Ok
    );
    setup.control(&ControlRequest::Create(CreateRegion {
        name: "admin".into(),
        size: 4096,
        ..CreateRegion::default()
    }));
    let mut peer = RawPeer::connect(&setup.vm_dir("vm0").join("used.sock"));
    peer.handshake(1, &[]);
    setup.wait_regions("the unused region to go", |r| {
        r.iter().all(|r| r.name != "idle")
    });
    let names: Vec<String> = setup.regions().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["used", "admin"]);
    assert!(!setup.vm_dir("vm0").join("idle.sock").exists());
    // The name is free again.
    assert_eq!(
        status(&setup.create("vm0", "idle", 4096)),
        GuestShmStatus::Ok
    );
    drop(peer);
}

/// A factory answer that offers a region nobody has joined yet gives the client the whole
/// `unused_timeout` to join: its time starts again. It used to count from the creation only, so
/// a `create` (or `find`) of a name made almost `unused_timeout` ago was answered with a socket
/// that went a moment later, before the client could join through it.
#[test]
fn a_factory_answer_gives_the_client_the_whole_unused_timeout() {
    let timeout = Duration::from_secs(4);
    let setup = Setup::new(
        "offered",
        "[defaults]\nvectors = 1\nunused_timeout = \"4s\"\n[vm.vm0]\n",
    );
    let made = Instant::now();
    assert_eq!(
        status(&setup.create("vm0", "late", 4096)),
        GuestShmStatus::Ok
    );
    // Half-way through its time, a client asks for it again and is told its socket.
    std::thread::sleep(timeout / 2);
    let offered = setup.create("vm0", "late", 4096);
    assert_eq!(status(&offered), GuestShmStatus::Ok, "{offered:?}");
    let socket = PathBuf::from(&offered.region.as_ref().unwrap().socket);
    // Past the time counted from the creation, within the time counted from the answer: the
    // client joins through the socket it was told of.
    std::thread::sleep((made + timeout + timeout / 8).saturating_duration_since(Instant::now()));
    let mut peer = RawPeer::connect(&socket);
    peer.handshake(1, &[]);
    assert!(setup.regions().iter().any(|r| r.name == "late"));
    drop(peer);
}

/// A create whose socket cannot be bound says why and keeps no region: the region made for it
/// used to stay without its socket, so that create and every later one of the name answered
/// `region X has no socket in the directory of VM Y` (`GSS_UNKNOWN_FAILURE`, no cause) until
/// the region was reclaimed as unused. Once the name is free again, the same create succeeds
/// with a socket a peer joins through.
#[test]
fn a_create_whose_socket_cannot_be_bound_says_why_and_keeps_no_region() {
    let setup = Setup::new("nobind", "[defaults]\nvectors = 1\n[vm.vm0]\n");
    let planted = setup.vm_dir("vm0").join("busy.sock");
    std::fs::write(&planted, b"precious").unwrap();
    for _ in 0..2 {
        let refused = setup.create("vm0", "busy", 4096);
        assert_eq!(
            status(&refused),
            GuestShmStatus::UnknownFailure,
            "{refused:?}"
        );
        assert!(
            refused.message.contains("busy.sock") && refused.message.contains("not a socket"),
            "{refused:?}"
        );
        assert!(
            setup.regions().iter().all(|r| r.name != "busy"),
            "a region without a socket was kept: {:?}",
            setup.regions()
        );
    }
    assert_eq!(std::fs::read(&planted).unwrap(), b"precious");
    std::fs::remove_file(&planted).unwrap();
    let made = setup.create("vm0", "busy", 4096);
    assert_eq!(status(&made), GuestShmStatus::Ok, "{made:?}");
    let socket = made.region.unwrap().socket;
    assert_eq!(Path::new(&socket), planted);
    let mut peer = RawPeer::connect(Path::new(&socket));
    peer.handshake(1, &[]);
}

/// A VM cannot use the name `factory` (its socket would be the VM's `factory.sock`): the
/// factory says `GSS_ILLEGAL_NAME` and creates nothing; a host region of that name gets no
/// socket called `factory.sock`, but a VM that sees it under another name gets that socket.
#[test]
fn the_name_factory_is_reserved() {
    let setup = Setup::new(
        "reserved",
        "[defaults]\nvectors = 1\n[[region]]\nname = \"factory\"\nsize = 4096\n[vm.plain]\n[vm.renamed]\nqnx = \"subst fab,factory\"\n",
    );
    let refused = setup.create("plain", "factory", 4096);
    assert_eq!(status(&refused), GuestShmStatus::IllegalName, "{refused:?}");
    assert!(refused.message.contains("reserved"), "{refused:?}");
    assert_eq!(
        status(&setup.find("plain", "factory")),
        GuestShmStatus::IllegalName
    );
    assert_eq!(setup.regions().len(), 1, "nothing was created");
    assert_eq!(setup.listing("plain"), ["factory.sock"]);
    assert_eq!(setup.listing("renamed"), ["fab.sock", "factory.sock"]);
    // The factory socket is still the factory.
    assert_eq!(
        status(&setup.find("plain", "nothing")),
        GuestShmStatus::DoesNotExist
    );
}

/// The reserved name is an illegal name whatever the VM's rules say (a name check, made before
/// the rules, as QNX checks a name's legality before its restrictions list): never
/// `GSS_NO_PERMISSION` because a rule happens to deny it.
#[test]
fn the_name_factory_is_illegal_whatever_the_rules() {
    let setup = Setup::new(
        "reserved-rules",
        "[defaults]\nvectors = 1\n[vm.closed]\nrules = [\"deny *\"]\n\
         [vm.listed]\nrules = [\"allow mem*\"]\n[vm.denied]\nrules = [\"deny fact*\"]\n",
    );
    // Each VM's rules deny this other name: it gets what the rules say.
    for (vm, denied) in [
        ("closed", "other"),
        ("listed", "other"),
        ("denied", "factory2"),
    ] {
        for response in [setup.create(vm, "factory", 4096), setup.find(vm, "factory")] {
            assert_eq!(
                status(&response),
                GuestShmStatus::IllegalName,
                "{vm}: {response:?}"
            );
            assert!(response.message.contains("reserved"), "{vm}: {response:?}");
        }
        assert_eq!(
            status(&setup.create(vm, denied, 4096)),
            GuestShmStatus::NoPermission,
            "{vm}"
        );
    }
    assert!(setup.regions().is_empty());
}

/// A configured region removed over the control socket is created again by the next reload.
#[test]
fn a_removed_configured_region_comes_back_at_reload() {
    let setup = Setup::new(
        "comeback",
        "[defaults]\nvectors = 1\n[[region]]\nname = \"kept\"\nsize = 4096\n[vm.vm0]\n",
    );
    setup.control(&ControlRequest::Remove {
        name: "kept".into(),
    });
    assert_eq!(setup.listing("vm0"), ["factory.sock"]);
    let ControlResult::Reloaded { changes } = setup.control(&ControlRequest::Reload) else {
        panic!("reload")
    };
    assert!(
        changes.iter().any(|c| c == "created region kept"),
        "{changes:?}"
    );
    assert_eq!(setup.listing("vm0"), ["factory.sock", "kept.sock"]);
}

/// The shipped `examples/ivshm.toml` (with a temporary root) serves what its comments say.
/// Its group is libvirt's QEMU group on Debian; on a machine without libvirt, root's group
/// stands in (the libvirt end-to-end test runs the file with the real group).
#[test]
fn the_shipped_example_serves_what_it_says() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let text = std::fs::read_to_string(examples.join("ivshm.toml")).unwrap();
    assert!(text.contains("\ngroup = \"libvirt-qemu\"\n"));
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let text = if groups.lines().any(|l| l.starts_with("libvirt-qemu:")) {
        text
    } else {
        text.replace("group = \"libvirt-qemu\"", "group = \"root\"")
    };
    let body: String = text
        .lines()
        .filter(|line| !line.starts_with("root = "))
        .map(|line| {
            line.replace(
                "qnx_file = \"vm-qnx.vdev\"",
                &format!(
                    "qnx_file = {:?}",
                    examples.join("vm-qnx.vdev").display().to_string()
                ),
            ) + "\n"
        })
        .collect();
    let setup = Setup::new("example", &body);
    assert_eq!(setup.listing("vm0"), ["factory.sock", "mem.sock"]);
    assert_eq!(setup.listing("vm1"), ["factory.sock", "mem.sock"]);
    assert_eq!(
        setup.listing("monitor"),
        [
            "factory.sock",
            "guest0mem.sock",
            "guest1mem.sock",
            "telemetry.sock"
        ]
    );
    assert_eq!(setup.listing("qnx"), ["factory.sock", "testbuf.sock"]);
    let mut regions: Vec<(String, u64, u32, u32)> = setup
        .regions()
        .into_iter()
        .map(|r| (r.name, r.size, r.vectors, r.peer_limit))
        .collect();
    regions.sort();
    assert_eq!(
        regions,
        [
            ("guest0mem".to_string(), 1 << 20, 16, 16),
            ("guest1mem".to_string(), 1 << 20, 16, 16),
            ("qnx-testbuf".to_string(), 64 << 10, 16, 16),
            ("telemetry".to_string(), 1 << 20, 1, 4),
        ]
    );
    // vm1's rules: secret names are refused, others may be created (as guest1<name>).
    assert_eq!(
        status(&setup.create("vm1", "secret-key", 4096)),
        GuestShmStatus::NoPermission
    );
    let created = setup.create("vm1", "scratch", 4096);
    assert_eq!(created.region.unwrap().host_name, "guest1scratch");
    // The QNX guest: test* and pluto only, test-secret denied.
    assert_eq!(
        status(&setup.find("qnx", "test-secret")),
        GuestShmStatus::NoPermission
    );
    assert_eq!(status(&setup.find("qnx", "testbuf")), GuestShmStatus::Ok);
    assert_eq!(
        status(&setup.create("qnx", "mars", 4096)),
        GuestShmStatus::NoPermission
    );
}

/// Every named region is whole 4 KiB pages, rounded up before the power-of-two rule: a
/// `guest_shm` client reads `size` in pages and maps every one. `create x,100` gives one page,
/// and with `pow2 = "off"` `create x,0x1800` gives two; control and factory creates alike.
#[test]
fn named_regions_are_whole_pages_rounded_up() {
    let sizes = |pow2: &str| {
        let setup = Setup::new(
            &format!("pages-{pow2}"),
            &format!(
                "[defaults]\nvectors = 1\npow2 = \"{pow2}\"\n[[region]]\nname = \"listed\"\n\
                 size = 10\n[vm.vm0]\nqnx = \"create x,100 create y,0x1800\"\n"
            ),
        );
        setup.control(&ControlRequest::Create(CreateRegion {
            name: "c".into(),
            size: 4097,
            persist: true,
            ..CreateRegion::default()
        }));
        let created = setup.create("vm0", "f", 1);
        assert_eq!(status(&created), GuestShmStatus::Ok, "{created:?}");
        ["x", "y", "listed", "c", "f"]
            .map(|name| {
                let found = setup.find("vm0", name);
                assert_eq!(status(&found), GuestShmStatus::Ok, "{name}: {found:?}");
                let offered = found.region.unwrap().size;
                // The memory behind the socket is that size too.
                let listed = setup.regions();
                let report = listed.iter().find(|r| r.name == name).unwrap();
                assert_eq!(report.size, offered, "{name}");
                offered
            })
            .to_vec()
    };
    assert_eq!(sizes("off"), [4096, 8192, 4096, 8192, 4096]);
    assert_eq!(sizes("round-up"), [4096, 8192, 4096, 8192, 4096]);
}

/// An error about a region names it once: "region x: ...", never "region x: region x: ..."
/// (the control socket and the factory add the prefix; the errors under it do not).
#[test]
fn control_and_factory_errors_name_the_region_once() {
    let setup = Setup::new(
        "prefix",
        "[defaults]\nvectors = 1\npow2 = \"refuse\"\nmax_regions = 1\n[vm.vm0]\n",
    );
    let create = |name: &str, size: u64, vectors: Option<u32>| {
        setup.control_error(&ControlRequest::Create(CreateRegion {
            name: name.into(),
            size,
            vectors,
            ..CreateRegion::default()
        }))
    };
    // Three whole pages: not a power of two (a size below a page is first made one page).
    let pow2 = create("x", 3 * 4096, None);
    assert!(
        pow2.starts_with("region x: size 12288 bytes is not a power of two"),
        "{pow2}"
    );
    let vectors = create("x", 4096, Some(99));
    assert_eq!(
        vectors,
        "region x: 99 vectors per peer: at most 64 are supported"
    );
    let factory = setup.create("vm0", "y", 3 * 4096);
    assert_eq!(status(&factory), GuestShmStatus::NoMem, "{factory:?}");
    setup.control(&ControlRequest::Create(CreateRegion {
        name: "z".into(),
        size: 4096,
        ..CreateRegion::default()
    }));
    let exists = create("z", 4096, None);
    let too_many = create("w", 4096, None);
    for (text, name) in [
        (&pow2, "x"),
        (&vectors, "x"),
        (&factory.message, "y"),
        (&exists, "z"),
        (&too_many, "w"),
    ] {
        assert_eq!(text.matches(&format!("region {name}")).count(), 1, "{text}");
    }
}

/// A raw control `create` with `vectors: 0` is refused like `ivshm create --vectors 0` (the
/// file's 0 is QEMU's `-n 0`; a run-time region names its vectors to have them), and nothing
/// is made.
#[test]
fn a_run_time_create_with_zero_vectors_is_refused() {
    let setup = Setup::new("novectors", "[defaults]\nvectors = 1\n[vm.vm0]\n");
    let request = |vectors| {
        ControlRequest::Create(CreateRegion {
            name: "scratch".into(),
            size: 4096,
            vectors,
            ..CreateRegion::default()
        })
    };
    assert_eq!(
        setup.control_error(&request(Some(0))),
        "region scratch: 0 vectors per peer: a region created at run time has 1 to 64"
    );
    assert!(setup.regions().iter().all(|r| r.name != "scratch"));
    // The same request with a vector is made.
    setup.control(&request(Some(1)));
    let made = setup.regions();
    let scratch = made.iter().find(|r| r.name == "scratch").unwrap();
    assert_eq!(scratch.vectors, 1);
}

/// What only these tests ask of the shared set-up.
impl Setup {
    /// Socket names in a VM's directory, sorted.
    fn listing(&self, vm: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.vm_dir(vm))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn find(&self, vm: &str, name: &str) -> FactoryResponse {
        self.factory(vm, &FactoryRequest::Find { name: name.into() })
    }

    fn regions(&self) -> Vec<ivshm_proto::control::RegionReport> {
        match self.control(&ControlRequest::Regions) {
            ControlResult::Regions { regions } => regions,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn stats(&self) -> ivshm_proto::control::StatsReport {
        match self.control(&ControlRequest::Stats) {
            ControlResult::Stats { stats } => stats,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Polls the region list until `condition` holds (fails after the guard timeout).
    fn wait_regions(
        &self,
        what: &str,
        condition: impl Fn(&[ivshm_proto::control::RegionReport]) -> bool,
    ) {
        let deadline = Instant::now() + LIMIT;
        loop {
            if condition(&self.regions()) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// One name, one region: a configured region that a reload retired while peers kept it, and
/// that a later reload configures again, is the region those peers still use (same memory,
/// new peers meet them), never a second region of the same name. The same for a configured
/// region removed over the control socket, and for a factory `create` of a kept region; a
/// control `create` of it is refused, saying why.
#[test]
fn a_returning_configured_region_adopts_the_one_kept_for_its_peers() {
    let with_mem = r#"
[defaults]
vectors = 1
[vm.vm0]
subst = ",guest0"
create = [{ name = "mem", size = 4096 }]
"#;
    let without_mem = "[defaults]\nvectors = 1\n[vm.vm0]\nsubst = \",guest0\"\n";
    let setup = Setup::new("adopt", with_mem);
    let socket = setup.vm_dir("vm0").join("mem.sock");
    let mut first = RawPeer::connect(&socket);
    let first_joined = first.handshake(1, &[]);
    let reload = |body: &str| {
        setup.write_config(body);
        match setup.control(&ControlRequest::Reload) {
            ControlResult::Reloaded { changes } => changes,
            other => panic!("{other:?}"),
        }
    };
    let named = |name: &str| -> Vec<ivshm_proto::control::RegionReport> {
        setup
            .regions()
            .into_iter()
            .filter(|r| r.name == name)
            .collect()
    };

    // Retired by a reload, kept for its peer.
    let changes = reload(without_mem);
    assert!(
        changes.iter().any(|c| c.contains("it stays until")),
        "{changes:?}"
    );
    assert!(!socket.exists());
    // Configured again: the kept region comes back with its sockets.
    let changes = reload(with_mem);
    assert!(
        !changes.iter().any(|c| c.contains("created region")),
        "{changes:?}"
    );
    assert!(
        changes
            .iter()
            .any(|c| c.contains("region guest0mem") && c.contains("configured again")),
        "{changes:?}"
    );
    let regions = named("guest0mem");
    assert_eq!(regions.len(), 1, "{regions:?}");
    assert!(!regions[0].detached, "{regions:?}");
    assert_eq!(regions[0].origin, "config");
    assert_eq!(regions[0].peers, [first_joined.id]);
    let mut second = RawPeer::connect(&socket);
    let second_joined = second.handshake(1, &[first_joined.id]);
    assert_eq!(inode(&first_joined.shm), inode(&second_joined.shm));
    first.expect_join(second_joined.id, 1);

    // Removed over the control socket, then a reload: the same region again.
    setup.control(&ControlRequest::Remove {
        name: "guest0mem".into(),
    });
    assert!(!socket.exists());
    reload(with_mem);
    let regions = named("guest0mem");
    assert_eq!(regions.len(), 1, "{regions:?}");
    assert_eq!(regions[0].peers.len(), 2, "{regions:?}");
    let mut third = RawPeer::connect(&socket);
    let third_joined = third.handshake(1, &[first_joined.id, second_joined.id]);
    assert_eq!(inode(&first_joined.shm), inode(&third_joined.shm));

    // Retired again; a factory create of the name attaches to the kept region.
    reload(without_mem);
    let created = setup.create("vm0", "mem", 4096);
    assert_eq!(status(&created), GuestShmStatus::Ok, "{created:?}");
    assert_eq!(created.region.as_ref().unwrap().peers, 3);
    let regions = named("guest0mem");
    assert_eq!(regions.len(), 1, "{regions:?}");
    assert_eq!(regions[0].origin, "factory");
    let mut fourth = RawPeer::connect(&socket);
    let fourth_joined = fourth.handshake(1, &[first_joined.id, second_joined.id, third_joined.id]);
    assert_eq!(inode(&first_joined.shm), inode(&fourth_joined.shm));

    // Removed, kept for its peers: a control create of the name is refused, saying why.
    setup.control(&ControlRequest::Remove {
        name: "guest0mem".into(),
    });
    let error = setup.control_error(&ControlRequest::Create(CreateRegion {
        name: "guest0mem".into(),
        size: 4096,
        ..CreateRegion::default()
    }));
    assert!(error.contains("removed"), "{error}");
    assert!(error.contains("4 connected peer(s)"), "{error}");
    assert_eq!(named("guest0mem").len(), 1);
}

/// A server that was killed leaves its sockets in the VM directories: a region socket made at
/// run time then has nothing behind it (connect: refused) and nothing binds its name again.
/// The next start removes such sockets, and nothing else: a socket someone listens on, a
/// link (even to a stale socket), a file that is not a socket and names that are not the
/// server's stay untouched.
#[test]
fn a_start_removes_stale_sockets_from_vm_directories_and_nothing_else() {
    use std::os::unix::net::UnixListener;

    let mut setup = Setup::unstarted("stale");
    setup.write_config("[defaults]\nvectors = 1\n[vm.vm0]\n");
    let dir = setup.vm_dir("vm0");
    std::fs::create_dir_all(&dir).unwrap();
    let stale = |path: PathBuf| drop(UnixListener::bind(path).unwrap());
    stale(dir.join("scratch.sock"));
    stale(dir.join("factory.sock"));
    stale(dir.join("other-name"));
    std::fs::write(dir.join("notes.sock"), b"not a socket\n").unwrap();
    let elsewhere = setup.root.parent().unwrap().join("elsewhere.sock");
    stale(elsewhere.clone());
    std::os::unix::fs::symlink(&elsewhere, dir.join("link.sock")).unwrap();
    let live = UnixListener::bind(dir.join("live.sock")).unwrap();

    setup.start().unwrap();
    assert_eq!(
        setup.listing("vm0"),
        [
            "factory.sock",
            "link.sock",
            "live.sock",
            "notes.sock",
            "other-name"
        ]
    );
    assert!(elsewhere.exists(), "the link's target is untouched");
    assert_eq!(
        std::fs::read(dir.join("notes.sock")).unwrap(),
        b"not a socket\n"
    );
    // The live socket is still the one its owner listens on.
    let _client = UnixStream::connect(dir.join("live.sock")).unwrap();
    live.accept().unwrap();
    // The factory socket is the server's new one.
    assert_eq!(
        status(&setup.create("vm0", "scratch", 4096)),
        GuestShmStatus::Ok
    );
    assert!(dir.join("scratch.sock").exists());
}
