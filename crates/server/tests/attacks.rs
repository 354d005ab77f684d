//! The server against the users it serves: each test plays an attacker (a VM's user owning its
//! VM directory, someone who planted links before the server started) and then checks that
//! the files it aimed at are untouched. Tests that need two identities run as root and act as
//! `nobody` on a thread of their own (`ivshm_test_support::users`); without root they print
//! `SKIPPED:`.
//!
//! `docs/security.md` lists which line of the threat model each test proves.

mod named_server;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use ivshm_policy::GuestShmStatus;
use ivshm_proto::control::{ControlRequest, ControlResponse};
use ivshm_proto::factory::{decode_line, encode_line};
use ivshm_test_support::users::{can_switch_users, spawn_as, NOBODY_UID, NOGROUP_GID};
use named_server::{exchange, status, Setup};

/// A file the attacker wants: its owner, group, mode and contents.
#[derive(Debug, PartialEq, Eq)]
struct FileFacts {
    uid: u32,
    gid: u32,
    mode: u32,
    contents: Vec<u8>,
}

fn facts(path: &Path) -> FileFacts {
    let meta = std::fs::symlink_metadata(path).unwrap();
    FileFacts {
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.permissions().mode() & 0o7777,
        contents: if meta.is_file() {
            std::fs::read(path).unwrap()
        } else {
            Vec::new()
        },
    }
}

/// A root-owned file with known contents, mode 0644.
fn victim_file(dir: &Path) -> PathBuf {
    let victim = dir.join("victim");
    std::fs::write(&victim, b"root's precious file\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    victim
}

/// How many regions the race tests create (each one is an attempt). `IVSHM_RACE_ATTEMPTS`
/// makes it longer.
fn attempts() -> usize {
    std::env::var("IVSHM_RACE_ATTEMPTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// Issue 10, item 1: the VM's user, who owns its VM directory, keeps replacing the socket the
/// server is about to create (and every temporary name it sees there) with a symbolic link to
/// a root-owned file while asking its factory for new regions. Whatever the server does in that
/// directory, the file keeps its owner, group, mode and contents, and the server keeps serving.
#[test]
fn a_vm_user_racing_links_into_its_directory_never_gets_a_file_changed() {
    if !can_switch_users() {
        eprintln!("SKIPPED: acting as a VM's user needs root");
        return;
    }
    let mut setup = Setup::unstarted("race");
    let victim = victim_file(setup.base());
    let before = facts(&victim);
    setup.write_config(
        "[defaults]\nvectors = 1\nmax_regions = 1000000\n\
         [vm.vm1]\nowner = 65534\ngroup = \"nogroup\"\nsocket_mode = \"0666\"\n",
    );
    setup.start().unwrap();
    let dir = setup.vm_dir("vm1");
    let target = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let (dir, victim, target, stop) =
            (dir.clone(), victim.clone(), target.clone(), stop.clone());
        spawn_as(NOBODY_UID, NOGROUP_GID, move || {
            let link = dir.join(".link");
            let mut swaps = 0u64;
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let mut names = vec![format!("r{}.sock", target.load(Ordering::Relaxed))];
                // Now and then also every temporary name the server has there.
                if round % 8 == 0 {
                    if let Ok(entries) = std::fs::read_dir(&dir) {
                        names.extend(
                            entries
                                .filter_map(|e| e.ok())
                                .map(|e| e.file_name().to_string_lossy().into_owned())
                                .filter(|n| n.starts_with(".ivshm")),
                        );
                    }
                }
                for name in names {
                    let _ = std::fs::remove_file(&link);
                    if std::os::unix::fs::symlink(&victim, &link).is_ok()
                        && std::fs::rename(&link, dir.join(&name)).is_ok()
                    {
                        swaps += 1;
                    }
                }
            }
            swaps
        })
    };
    let mut compromised = None;
    for i in 0..attempts() {
        target.store(i, Ordering::Relaxed);
        let name = format!("r{i}");
        // The answer does not matter: the attacker may have taken the socket's name.
        let _ = setup.create("vm1", &name, 4096);
        let _ = setup.control_response(&ControlRequest::Remove { name });
        if facts(&victim) != before {
            compromised = Some(i);
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = attacker.join().unwrap();
    assert!(swaps > 0, "the attacker never managed to plant a link");
    assert_eq!(
        facts(&victim),
        before,
        "the VM's user changed a root-owned file through the server (attempt {compromised:?}, {swaps} links planted)"
    );
    // The server still serves a name the attacker is not racing for.
    let _ = std::fs::remove_file(dir.join("after.sock"));
    target.store(usize::MAX, Ordering::Relaxed);
    assert_eq!(
        status(&setup.create("vm1", "after", 4096)),
        GuestShmStatus::Ok
    );
    assert!(dir.join("after.sock").exists());
}

/// Issue 10, item 2: `<root>/<vm>` is a symbolic link to another directory when the server
/// starts. The server refuses to start, naming the link, and the directory it points to keeps
/// its owner, mode and contents (no socket is bound in it).
#[test]
fn a_planted_vm_directory_link_is_refused_and_its_target_untouched() {
    let mut setup = Setup::unstarted("vmlink");
    let elsewhere = setup.base().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(elsewhere.join("keep"), b"x").unwrap();
    let before = facts(&elsewhere);
    std::fs::create_dir(&setup.root).unwrap();
    std::os::unix::fs::symlink(&elsewhere, setup.root.join("vm0")).unwrap();
    setup.write_config("[defaults]\nvectors = 1\ndir_mode = \"0700\"\n[vm.vm0]\n");
    let err = setup.start().unwrap_err().to_string();
    assert!(
        err.contains("vm0") && err.contains("symbolic link"),
        "{err}"
    );
    assert_eq!(facts(&elsewhere), before);
    let names: Vec<_> = std::fs::read_dir(&elsewhere)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["keep"], "the server created files through the link");
}

/// The socket root is checked before anything is made in it: a symbolic link, a directory
/// writable by its group or others, or one owned by another user is refused with the reason.
#[test]
fn an_unsafe_socket_root_is_refused() {
    let body = "[defaults]\nvectors = 1\n[vm.vm0]\n";
    // A link.
    let mut setup = Setup::unstarted("rootlink");
    let real = setup.base().join("real");
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, &setup.root).unwrap();
    setup.write_config(body);
    let err = setup.start().unwrap_err().to_string();
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0);
    // Writable by others.
    let mut setup = Setup::unstarted("rootmode");
    std::fs::create_dir(&setup.root).unwrap();
    std::fs::set_permissions(&setup.root, std::fs::Permissions::from_mode(0o777)).unwrap();
    setup.write_config(body);
    let err = setup.start().unwrap_err().to_string();
    assert!(err.contains("writable by"), "{err}");
    assert_eq!(std::fs::read_dir(&setup.root).unwrap().count(), 0);
    // Owned by someone else.
    if can_switch_users() {
        let mut setup = Setup::unstarted("rootowner");
        std::fs::create_dir(&setup.root).unwrap();
        std::os::unix::fs::chown(&setup.root, Some(NOBODY_UID), Some(NOGROUP_GID)).unwrap();
        setup.write_config(body);
        let err = setup.start().unwrap_err().to_string();
        assert!(err.contains("owned by uid 65534"), "{err}");
        assert_eq!(std::fs::read_dir(&setup.root).unwrap().count(), 0);
    } else {
        eprintln!("SKIPPED (owner part): making a directory another user's needs root");
    }
}

/// A root that becomes unsafe while the server runs makes a reload fail and change nothing.
#[test]
fn a_reload_checks_the_socket_root_again() {
    let setup = Setup::new("rootreload", "[defaults]\nvectors = 1\n[vm.vm0]\n");
    std::fs::set_permissions(&setup.root, std::fs::Permissions::from_mode(0o777)).unwrap();
    setup.write_config("[defaults]\nvectors = 1\n[vm.vm0]\n[vm.vm1]\n");
    let err = setup.control_error(&ControlRequest::Reload);
    assert!(err.contains("writable by"), "{err}");
    assert!(!setup.vm_dir("vm1").exists());
    std::fs::set_permissions(&setup.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    setup.control(&ControlRequest::Reload);
    assert!(setup.vm_dir("vm1").join("factory.sock").exists());
}

/// A link planted where the server would put a region's socket (`<vm>/<name>.sock`) is not
/// followed, replaced or removed: that VM gets no socket for the region (the factory says
/// why), the file it points to is untouched, and the server serves the rest. One planted at
/// `factory.sock` stops the start with an error naming it.
#[test]
fn planted_socket_links_are_refused_and_their_targets_untouched() {
    let mut setup = Setup::unstarted("socklink");
    let victim = victim_file(setup.base());
    let before = facts(&victim);
    let vm0 = setup.root.join("vm0");
    std::fs::create_dir_all(&vm0).unwrap();
    std::os::unix::fs::symlink(&victim, vm0.join("mem.sock")).unwrap();
    setup.write_config(
        "[defaults]\nvectors = 1\n[[region]]\nname = \"mem\"\nsize = 4096\n\
         [[region]]\nname = \"other\"\nsize = 4096\n[vm.vm0]\n",
    );
    setup.start().unwrap();
    assert!(std::fs::symlink_metadata(vm0.join("mem.sock"))
        .unwrap()
        .is_symlink());
    assert!(vm0.join("other.sock").exists());
    let refused = setup.find("vm0", "mem");
    assert_eq!(
        status(&refused),
        GuestShmStatus::UnknownFailure,
        "{refused:?}"
    );
    assert_eq!(facts(&victim), before);
    // Stopping removes the server's sockets, never the link.
    setup.server.take().unwrap().shutdown().unwrap();
    assert!(std::fs::symlink_metadata(vm0.join("mem.sock"))
        .unwrap()
        .is_symlink());
    assert_eq!(facts(&victim), before);

    let mut setup = Setup::unstarted("factorylink");
    let victim = victim_file(setup.base());
    let vm0 = setup.root.join("vm0");
    std::fs::create_dir_all(&vm0).unwrap();
    std::os::unix::fs::symlink(&victim, vm0.join("factory.sock")).unwrap();
    setup.write_config("[defaults]\nvectors = 1\n[vm.vm0]\n");
    let err = setup.start().unwrap_err().to_string();
    assert!(
        err.contains("factory.sock") && err.contains("not a socket"),
        "{err}"
    );
    assert_eq!(facts(&victim), before);
}

/// With the `shm` backend, region names are names in `/dev/shm`, which every local user can
/// write. A link planted at a region's object name is refused (the region is not made, the
/// file it points to is untouched); so is an object another user made there first, which
/// would have given that user the region's memory. Needs root to be that other user.
#[test]
fn planted_shm_objects_are_refused() {
    if !can_switch_users() {
        eprintln!("SKIPPED: making a file another user's needs root");
        return;
    }
    let mut setup = Setup::unstarted("shmlink");
    let victim = victim_file(setup.base());
    let before = facts(&victim);
    let tag = format!(
        "{}-{}",
        std::process::id(),
        setup.base().display().to_string().len()
    );
    let linked = format!("l{tag}");
    let foreign = format!("f{tag}");
    let link_path = PathBuf::from(format!("/dev/shm/ivshm-{linked}"));
    std::os::unix::fs::symlink(&victim, &link_path).unwrap();
    // The VM's user makes the object of a name it will ask its factory for.
    let foreign_path = PathBuf::from(format!("/dev/shm/ivshm-{foreign}"));
    let made = foreign_path.clone();
    spawn_as(NOBODY_UID, NOGROUP_GID, move || {
        std::fs::write(&made, b"the attacker's object").unwrap();
    })
    .join()
    .unwrap();
    setup.write_config(&format!(
        "[defaults]\nvectors = 1\nbackend = \"shm\"\n[[region]]\nname = \"{linked}\"\nsize = 4096\n\
         [vm.vm0]\nowner = 65534\n"
    ));
    setup.start().unwrap();
    assert!(setup.regions().iter().all(|r| r.name != linked));
    assert_eq!(facts(&victim), before);
    let refused = setup.create("vm0", &foreign, 4096);
    assert_ne!(status(&refused), GuestShmStatus::Ok, "{refused:?}");
    assert!(
        refused.message.contains("owned by uid 65534"),
        "{refused:?}"
    );
    assert_eq!(
        std::fs::read(&foreign_path).unwrap(),
        b"the attacker's object"
    );
    std::fs::remove_file(link_path).unwrap();
    std::fs::remove_file(foreign_path).unwrap();
}

/// With the `dir` backend in a directory others can write (a shared hugetlbfs mount, here
/// mode 1777 full of links to a root-owned file), regions are made without following or
/// leaving any name there.
#[test]
fn the_dir_backend_follows_no_planted_name() {
    let mut setup = Setup::unstarted("dirlink");
    let victim = victim_file(setup.base());
    let before = facts(&victim);
    let shared = setup.base().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    for i in 0..32 {
        std::os::unix::fs::symlink(&victim, shared.join(format!("ivshmem.{i}"))).unwrap();
    }
    let listing = |dir: &Path| -> Vec<_> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let names_before = listing(&shared);
    setup.write_config(&format!(
        "[defaults]\nvectors = 1\nbackend = \"dir\"\ndir = {:?}\n[[region]]\nname = \"a\"\nsize = 4096\n[vm.vm0]\n",
        shared.display().to_string()
    ));
    setup.start().unwrap();
    for name in ["b", "c", "d"] {
        assert_eq!(status(&setup.create("vm0", name, 4096)), GuestShmStatus::Ok);
    }
    assert_eq!(setup.regions().len(), 4);
    assert_eq!(listing(&shared), names_before);
    assert_eq!(facts(&victim), before);
}

/// A VM's user (here `nobody`, owner of `vm1`) cannot reach another VM's directory, sockets or
/// regions, nor the control socket, nor plant anything in the socket root; it can use its own
/// directory's sockets, and its factory only offers what its policy allows.
#[test]
fn a_vm_user_cannot_reach_another_vms_directory_or_regions() {
    if !can_switch_users() {
        eprintln!("SKIPPED: acting as a VM's user needs root");
        return;
    }
    let setup = Setup::new(
        "othervm",
        "[defaults]\nvectors = 1\n[[region]]\nname = \"secret\"\nsize = 4096\n\
         [[region]]\nname = \"mine\"\nsize = 4096\n\
         [vm.vm0]\ngroup = \"root\"\n\
         [vm.vm1]\nowner = 65534\nrules = [\"allow mine\"]\n",
    );
    let (root, vm0, vm1) = (setup.root.clone(), setup.vm_dir("vm0"), setup.vm_dir("vm1"));
    let errors = spawn_as(NOBODY_UID, NOGROUP_GID, move || {
        let kind = |r: std::io::Result<UnixStream>| r.err().map(|e| e.kind());
        let denied = Some(std::io::ErrorKind::PermissionDenied);
        let listing = std::fs::read_dir(&vm0).err().map(|e| e.kind());
        let other_factory = kind(UnixStream::connect(vm0.join("factory.sock")));
        let other_region = kind(UnixStream::connect(vm0.join("secret.sock")));
        let control = kind(UnixStream::connect(root.join("control.sock")));
        let plant = std::fs::create_dir(root.join("vm2"))
            .err()
            .map(|e| e.kind());
        let own_factory = kind(UnixStream::connect(vm1.join("factory.sock")));
        let own_region = kind(UnixStream::connect(vm1.join("mine.sock")));
        let no_socket = vm1.join("secret.sock").exists();
        assert_eq!(
            [listing, other_factory, other_region, control, plant],
            [denied; 5],
            "what nobody could reach"
        );
        assert_eq!((own_factory, own_region, no_socket), (None, None, false));
    });
    errors.join().unwrap();
    let refused = setup.find("vm1", "secret");
    assert_eq!(
        status(&refused),
        GuestShmStatus::NoPermission,
        "{refused:?}"
    );
}

/// A factory client that sends requests and never reads the answers is dropped once 1 MiB of
/// answers waits for it; another client of the same factory is answered meanwhile and after.
#[test]
fn a_factory_client_that_never_reads_its_answers_is_dropped() {
    use std::io::Write;
    let setup = Setup::new("noread", "[defaults]\nvectors = 1\n[vm.vm0]\n");
    let factory = setup.vm_dir("vm0").join("factory.sock");
    let mut hog = UnixStream::connect(&factory).unwrap();
    hog.set_write_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    let line = encode_line(&ivshm_proto::factory::FactoryRequest::Find {
        name: "nothing-here".into(),
    });
    let chunk: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take(line.len() * 512)
        .collect();
    let deadline = std::time::Instant::now() + ivshm_test_support::WAIT_GUARD;
    let mut sent = 0usize;
    let ended = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "still connected after {sent} bytes of requests"
        );
        match hog.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // The server is busy answering; another client still gets its answer.
                assert_eq!(
                    status(&setup.find("vm0", "nothing-here")),
                    GuestShmStatus::DoesNotExist
                );
            }
            Err(e) => break e.kind(),
        }
    };
    assert!(
        matches!(
            ended,
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{ended:?} after {sent} bytes"
    );
    // Answers are longer than requests: it was dropped for what it left unread.
    assert!(
        sent > 64 << 10,
        "dropped after only {sent} bytes of requests"
    );
    assert_eq!(
        status(&setup.find("vm0", "nothing-here")),
        GuestShmStatus::DoesNotExist
    );
}

/// What only these tests ask of the shared set-up.
impl Setup {
    /// The directory holding the root and the configuration file.
    fn base(&self) -> &Path {
        self.config.parent().unwrap()
    }

    /// `find` through `vm`'s factory.
    fn find(&self, vm: &str, name: &str) -> ivshm_proto::factory::FactoryResponse {
        let request = ivshm_proto::factory::FactoryRequest::Find { name: name.into() };
        let line = exchange(
            &self.vm_dir(vm).join("factory.sock"),
            &encode_line(&request),
        );
        decode_line(&line).unwrap()
    }

    /// The regions, by the control socket.
    fn regions(&self) -> Vec<ivshm_proto::control::RegionReport> {
        match self.control(&ControlRequest::Regions) {
            ivshm_proto::control::ControlResult::Regions { regions } => regions,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The response to a control request, whatever it says.
    fn control_response(&self, request: &ControlRequest) -> ControlResponse {
        let line = exchange(&self.root.join("control.sock"), &encode_line(request));
        decode_line(&line).unwrap()
    }
}
