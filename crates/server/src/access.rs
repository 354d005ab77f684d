//! Who can reach a socket: the Unix permission check a connecting process goes through (search
//! permission on every directory of the path, write permission on the socket), done ahead of
//! time for a given identity, so that a socket QEMU cannot open is reported before `virsh
//! start` fails with `Permission denied` (which the server never sees).
//!
//! Identities come from `/etc/passwd` and `/etc/group` ([`Identity::user`]: a user with its
//! primary and supplementary groups, as libvirt gives them to QEMU; [`Identity::group`]: any
//! member of one group), and libvirt's QEMU from `/etc/libvirt/qemu.conf`
//! ([`Identity::libvirt_qemu`]). The checks read metadata only; they change nothing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::group::GroupSpec;
use crate::named::{DirectoryConfig, NamedConfig};

/// libvirt's QEMU configuration.
pub const LIBVIRT_QEMU_CONF: &str = "/etc/libvirt/qemu.conf";

/// An identity cannot be resolved.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum IdentityError {
    /// no user {0:?} in /etc/passwd
    ///
    /// No such user in `/etc/passwd`.
    NoUser(String),
    /// no group {0:?} in /etc/group
    ///
    /// No such group in `/etc/group`.
    NoGroup(String),
}

/// Who connects: a user (uid and groups) or any member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// How messages name it, e.g. `user libvirt-qemu` or `group libvirt-qemu`.
    pub label: String,
    /// The uid, for a user; `None` for "any member of these groups".
    pub uid: Option<u32>,
    /// Primary and supplementary gids.
    pub gids: Vec<u32>,
}

/// One `/etc/passwd` or `/etc/group` line split at `:`.
fn fields(line: &str) -> Vec<&str> {
    line.split(':').collect()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The gid of group `name` (or a number) in `group_text`.
fn gid_of(group_text: &str, name: &str) -> Option<u32> {
    if let Ok(gid) = name.trim_start_matches('+').parse() {
        return Some(gid);
    }
    group_text.lines().find_map(|line| {
        let f = fields(line);
        (f.len() >= 3 && f[0] == name)
            .then(|| f[2].parse().ok())
            .flatten()
    })
}

/// The name of gid `gid` in `group_text`, or the number.
fn group_name(group_text: &str, gid: u32) -> String {
    group_text
        .lines()
        .find_map(|line| {
            let f = fields(line);
            (f.len() >= 3 && f[2].parse() == Ok(gid)).then(|| f[0].to_string())
        })
        .unwrap_or_else(|| gid.to_string())
}

impl Identity {
    /// User `name` with its primary group and the groups that list it as a member.
    pub fn user(name: &str) -> Result<Identity, IdentityError> {
        Self::user_in(name, &read("/etc/passwd"), &read("/etc/group"))
    }

    /// [`user`](Self::user) from given file contents.
    pub fn user_in(
        name: &str,
        passwd_text: &str,
        group_text: &str,
    ) -> Result<Identity, IdentityError> {
        let numeric: Option<u32> = name.trim_start_matches('+').parse().ok();
        let (user, uid, gid) = passwd_text
            .lines()
            .find_map(|line| {
                let f = fields(line);
                if f.len() < 4 {
                    return None;
                }
                let uid: u32 = f[2].parse().ok()?;
                if f[0] != name && numeric != Some(uid) {
                    return None;
                }
                Some((f[0].to_string(), uid, f[3].parse::<u32>().ok()?))
            })
            .ok_or_else(|| IdentityError::NoUser(name.to_string()))?;
        let mut gids = vec![gid];
        for line in group_text.lines() {
            let f = fields(line);
            if f.len() >= 4 && f[3].split(',').any(|member| member == user) {
                if let Ok(g) = f[2].parse() {
                    if !gids.contains(&g) {
                        gids.push(g);
                    }
                }
            }
        }
        Ok(Identity {
            label: format!("user {user}"),
            uid: Some(uid),
            gids,
        })
    }

    /// Any member of group `name` (or a numeric gid).
    pub fn group(name: &str) -> Result<Identity, IdentityError> {
        let text = read("/etc/group");
        let gid = gid_of(&text, name).ok_or_else(|| IdentityError::NoGroup(name.to_string()))?;
        Ok(Identity {
            label: format!("group {}", group_name(&text, gid)),
            uid: None,
            gids: vec![gid],
        })
    }

    /// The user libvirt runs QEMU as, per `conf` (`/etc/libvirt/qemu.conf`): its `user` and
    /// `group` settings, else libvirt's built-in default (`libvirt-qemu` on Debian, `qemu`
    /// elsewhere: whichever user exists). `None` when neither libvirt's file nor such a user
    /// is there (libvirt is not installed).
    pub fn libvirt_qemu(conf: &Path) -> Option<Identity> {
        let text = std::fs::read_to_string(conf).ok();
        let setting = |key: &str| text.as_deref().and_then(|t| conf_string(t, key));
        let passwd = read("/etc/passwd");
        let groups = read("/etc/group");
        let user = setting("user").or_else(|| {
            ["libvirt-qemu", "qemu"]
                .into_iter()
                .find(|u| Identity::user_in(u, &passwd, &groups).is_ok())
                .map(String::from)
        })?;
        let mut identity = Identity::user_in(&user, &passwd, &groups).ok()?;
        // libvirt runs QEMU with the configured group as its primary group, plus the user's
        // supplementary groups.
        if let Some(group) = setting("group") {
            if let Some(gid) = gid_of(&groups, &group) {
                if !identity.gids.contains(&gid) {
                    identity.gids.insert(0, gid);
                }
            }
        }
        identity.label = format!("libvirt's QEMU ({})", identity.label);
        Some(identity)
    }

    /// Whether the identity is root (which no permission bit stops).
    pub fn is_root(&self) -> bool {
        self.uid == Some(0)
    }

    /// The permission bits (`rwx` as 0..=7) that apply to it for a file owned by
    /// `owner`:`group` with `mode`.
    pub fn bits_for(&self, owner: u32, group: u32, mode: u32) -> u32 {
        if self.uid == Some(owner) {
            (mode >> 6) & 7
        } else if self.gids.contains(&group) {
            (mode >> 3) & 7
        } else {
            mode & 7
        }
    }
}

/// The value of `key = "value"` in a libvirt configuration text (the last uncommented one).
pub fn conf_string(text: &str, key: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line.strip_prefix(key)?.trim_start();
            let value = rest.strip_prefix('=')?.trim();
            Some(value.trim_matches('"').to_string())
        })
        .next_back()
}

/// Why an identity cannot reach a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The path component that stops it.
    pub path: PathBuf,
    /// What is missing: `search (x)` on a directory, `write (w)` on the socket, or that it
    /// does not exist.
    pub missing: String,
    /// Owner, group and mode of that component (`None` when it does not exist).
    pub meta: Option<(u32, u32, u32)>,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.meta {
            Some((uid, gid, mode)) => write!(
                f,
                "{} ({}:{} {:04o}) lacks {}",
                self.path.display(),
                uid,
                gid,
                mode & 0o7777,
                self.missing
            ),
            None => write!(f, "{} {}", self.path.display(), self.missing),
        }
    }
}

/// Checks that `who` can connect to the socket at `socket`: search permission on every
/// directory from `/` down, write permission on the socket itself. Symlinks are followed as
/// `connect(2)` follows them.
pub fn can_connect(socket: &Path, who: &Identity) -> Result<(), Blocked> {
    can_reach(socket, who, 0o2, "write (w)")
}

/// Checks that `who` can search (enter) the directory `dir` and every directory above it.
pub fn can_enter(dir: &Path, who: &Identity) -> Result<(), Blocked> {
    can_reach(dir, who, 0o1, "search (x)")
}

fn can_reach(path: &Path, who: &Identity, last_bit: u32, last_need: &str) -> Result<(), Blocked> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut current = PathBuf::new();
    let components: Vec<_> = absolute.components().collect();
    for (i, component) in components.iter().enumerate() {
        current.push(component);
        let last = i + 1 == components.len();
        let meta = std::fs::metadata(&current).map_err(|_| Blocked {
            path: current.clone(),
            missing: "does not exist".into(),
            meta: None,
        })?;
        if who.is_root() {
            continue;
        }
        let (bit, need) = if last {
            (last_bit, last_need)
        } else {
            (0o1, "search (x)")
        };
        if who.bits_for(meta.uid(), meta.gid(), meta.mode()) & bit == 0 {
            return Err(Blocked {
                path: current,
                missing: format!("{need} for {}", who.label),
                meta: Some((meta.uid(), meta.gid(), meta.mode())),
            });
        }
    }
    Ok(())
}

/// [`vm_directory_warnings`] for this host: libvirt's QEMU is the user and group
/// [`LIBVIRT_QEMU_CONF`] names, when libvirt is installed.
pub fn host_vm_directory_warnings(named: &NamedConfig) -> Vec<String> {
    let qemu = Identity::libvirt_qemu(Path::new(LIBVIRT_QEMU_CONF));
    vm_directory_warnings(named, qemu.as_ref())
}

/// Warnings about who will not reach the VM directories of `named`: members of the configured
/// group (when the directory or socket mode leaves the group out, or a directory above the root
/// is closed to it) and `qemu`, libvirt's QEMU if known (when the owner, group and modes the
/// server will give a VM's directory and sockets keep it out). Nothing is changed; a directory
/// that does not exist yet is judged by the modes it will get.
pub fn vm_directory_warnings(named: &NamedConfig, qemu: Option<&Identity>) -> Vec<String> {
    let mut warnings = Vec::new();
    let server_uid = rustix::process::geteuid().as_raw();
    let server_gid = rustix::process::getegid().as_raw();
    let root = std::path::absolute(&named.root).unwrap_or_else(|_| named.root.clone());
    // The root itself is made 0755; what matters above it is what is on disk.
    let above_root = root.parent().map(Path::to_path_buf);
    for vm in &named.vms {
        let dir = root.join(vm.name.as_str());
        let d = &vm.directory;
        let owner = d.owner.unwrap_or(server_uid);
        let group = d.group.as_ref().and_then(|g| g.resolve().ok());
        if let Some(gid) = group {
            let member = Identity {
                label: format!("group {}", group_label(d)),
                uid: None,
                gids: vec![gid],
            };
            if let Some(parent) = &above_root {
                if let Err(blocked) = can_enter(parent, &member) {
                    if blocked.meta.is_some() {
                        warnings.push(format!(
                            "VM {}: {} cannot reach {}: {blocked}",
                            vm.name,
                            member.label,
                            dir.display()
                        ));
                    }
                }
            }
            if d.dir_mode & 0o010 == 0 {
                warnings.push(format!(
                    "VM {}: dir_mode {:04o} keeps {} out of {} (use 0750)",
                    vm.name,
                    d.dir_mode,
                    member.label,
                    dir.display()
                ));
            } else if d.socket_mode & 0o020 == 0 {
                warnings.push(format!(
                    "VM {}: socket_mode {:04o} lets {} see but not connect to the sockets in {} \
                     (use 0660)",
                    vm.name,
                    d.socket_mode,
                    member.label,
                    dir.display()
                ));
            }
        }
        let Some(qemu) = qemu else {
            continue;
        };
        let dir_gid = group.unwrap_or(server_gid);
        let enters = qemu.is_root() || qemu.bits_for(owner, dir_gid, d.dir_mode) & 0o1 != 0;
        let connects = qemu.is_root() || qemu.bits_for(owner, dir_gid, d.socket_mode) & 0o2 != 0;
        let above = above_root
            .as_deref()
            .map_or(Ok(()), |parent| can_enter(parent, qemu));
        if let Err(blocked) = above {
            if blocked.meta.is_some() {
                warnings.push(format!(
                    "VM {}: {} cannot reach {}: {blocked}",
                    vm.name,
                    qemu.label,
                    dir.display()
                ));
                continue;
            }
        }
        if !enters || !connects {
            let what = if enters {
                format!("socket mode {:04o}", d.socket_mode)
            } else {
                format!("{} {owner}:{dir_gid} {:04o}", dir.display(), d.dir_mode)
            };
            warnings.push(format!(
                "VM {}: {} cannot connect to the sockets in {} ({what}); a libvirt domain of this \
                 VM fails with 'Permission denied'. Set group = \"<QEMU's group>\" (libvirt-qemu \
                 on Debian, qemu on Fedora/RHEL) with dir_mode 0750 and socket_mode 0660 in \
                 [defaults] or [vm.{}]",
                vm.name,
                qemu.label,
                dir.display(),
                vm.name
            ));
        }
    }
    warnings
}

fn group_label(d: &DirectoryConfig) -> String {
    match &d.group {
        Some(GroupSpec::Name(name)) => name.clone(),
        Some(GroupSpec::Id(id)) => id.to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
                          libvirt-qemu:x:64055:107:Libvirt Qemu,,,:/var/lib/libvirt:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nkvm:x:107:\nlibvirt-qemu:x:64055:libvirt-qemu\nivshm:x:990:libvirt-qemu,alice\n";

    #[test]
    fn a_user_has_its_primary_and_member_groups() {
        let id = Identity::user_in("libvirt-qemu", PASSWD, GROUP).unwrap();
        assert_eq!(id.uid, Some(64055));
        assert_eq!(id.gids, [107, 64055, 990]);
        assert_eq!(id.label, "user libvirt-qemu");
        let by_number = Identity::user_in("+64055", PASSWD, GROUP).unwrap();
        assert_eq!(by_number.uid, Some(64055));
        assert!(matches!(
            Identity::user_in("nobody-here", PASSWD, GROUP),
            Err(IdentityError::NoUser(_))
        ));
    }

    #[test]
    fn permission_bits_follow_owner_then_group_then_other() {
        let id = Identity::user_in("libvirt-qemu", PASSWD, GROUP).unwrap();
        assert_eq!(id.bits_for(64055, 0, 0o700), 7);
        assert_eq!(id.bits_for(0, 990, 0o750), 5);
        assert_eq!(id.bits_for(0, 0, 0o750), 0);
        assert_eq!(id.bits_for(0, 0, 0o755), 5);
    }

    #[test]
    fn reads_libvirt_settings() {
        let conf = "#user = \"root\"\nuser = \"qemu\"\n  group = \"kvm\"\n";
        assert_eq!(conf_string(conf, "user").as_deref(), Some("qemu"));
        assert_eq!(conf_string(conf, "group").as_deref(), Some("kvm"));
        assert_eq!(conf_string(conf, "dynamic_ownership"), None);
    }

    #[test]
    fn finds_the_component_that_blocks() {
        let base = std::env::temp_dir().join(format!("ivshm-access-{}", std::process::id()));
        let dir = base.join("vm0");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        let sock = dir.join("mem.sock");
        std::fs::write(&sock, b"").unwrap();
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660)).unwrap();
        let meta = std::fs::metadata(&dir).unwrap();
        let outsider = Identity {
            label: "user nobody-in-particular".into(),
            uid: Some(meta.uid() + 4242),
            gids: vec![meta.gid() + 4242],
        };
        let blocked = can_connect(&sock, &outsider).unwrap_err();
        assert_eq!(blocked.path, dir);
        assert!(blocked.missing.starts_with("search (x)"), "{blocked}");
        let member = Identity {
            label: "group of the directory".into(),
            uid: None,
            gids: vec![meta.gid()],
        };
        assert_eq!(can_connect(&sock, &member), Ok(()));
        assert_eq!(can_enter(&dir, &member), Ok(()));
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o640)).unwrap();
        let blocked = can_connect(&sock, &member).unwrap_err();
        assert_eq!(blocked.path, sock);
        assert!(blocked.missing.starts_with("write (w)"));
        let missing = can_connect(&dir.join("nope.sock"), &member).unwrap_err();
        assert_eq!(missing.meta, None);
        let root = Identity {
            label: "root".into(),
            uid: Some(0),
            gids: vec![0],
        };
        assert_eq!(can_connect(&sock, &root), Ok(()));
        std::fs::remove_dir_all(&base).unwrap();
    }

    fn config(text: &str) -> NamedConfig {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base =
            std::env::temp_dir().join(format!("ivshm-access-cfg-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let path = base.join("c.toml");
        std::fs::write(&path, format!("root = \"{}/root\"\n{text}", base.display())).unwrap();
        let named = crate::config_file::load(&path).unwrap().named.unwrap();
        std::fs::remove_dir_all(&base).unwrap();
        named
    }

    fn qemu() -> Identity {
        Identity {
            label: "libvirt's QEMU (user libvirt-qemu)".into(),
            uid: Some(64055),
            gids: vec![64055, 107],
        }
    }

    #[test]
    fn no_group_keeps_qemu_out_and_says_how_to_fix_it() {
        let named = config("[vm.vm0]\nrules = [\"allow *\"]\n");
        let warnings = vm_directory_warnings(&named, Some(&qemu()));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("VM vm0: libvirt's QEMU (user libvirt-qemu) cannot connect")
        );
        assert!(warnings[0].contains("Set group = "), "{}", warnings[0]);
        assert!(vm_directory_warnings(&named, None).is_empty());
    }

    #[test]
    fn the_qemu_group_lets_it_in_and_closed_modes_are_named() {
        let gid = rustix::process::getegid().as_raw();
        let named = config(&format!(
            "[defaults]\ngroup = \"{gid}\"\n[vm.vm0]\nrules = [\"allow *\"]\n\
             [vm.shut]\ndir_mode = \"0700\"\n[vm.nosock]\nsocket_mode = \"0640\"\n"
        ));
        let member = Identity {
            label: "libvirt's QEMU (user q)".into(),
            uid: Some(64055),
            gids: vec![gid],
        };
        let warnings = vm_directory_warnings(&named, Some(&member));
        assert!(
            !warnings.iter().any(|w| w.starts_with("VM vm0:")),
            "{warnings:?}"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.starts_with("VM shut: dir_mode 0700 keeps group")),
            "{warnings:?}"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.starts_with("VM nosock: socket_mode 0640 lets group")),
            "{warnings:?}"
        );
    }
}
