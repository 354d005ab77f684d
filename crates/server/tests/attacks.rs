//! The server against the users it serves: each test plays an attacker (a VM's user owning its
//! VM directory, someone who planted links before the server started) and then checks that
//! the files it aimed at are untouched. Tests that need two identities run as root and act as
//! `nobody` on a thread of their own (`ivshm_test_support::users`); without root they print
//! `SKIPPED:`.
//!
//! `docs/security.md` lists which line of the threat model each test proves.

mod named_server;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
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

/// What only these tests ask of the shared set-up.
impl Setup {
    /// The directory holding the root and the configuration file.
    fn base(&self) -> &Path {
        self.config.parent().unwrap()
    }

    /// The response to a control request, whatever it says.
    fn control_response(&self, request: &ControlRequest) -> ControlResponse {
        let line = exchange(&self.root.join("control.sock"), &encode_line(request));
        decode_line(&line).unwrap()
    }
}
