//! Named regions and per-VM directories: what to serve besides the standalone regions of
//! [`ServerConfig::regions`](crate::ServerConfig::regions).
//!
//! Layout under the socket root:
//!
//! ```text
//! <root>/control.sock            control socket (mode 0600 by default)
//! <root>/<vm>/factory.sock       the VM's factory (create / find, JSON lines)
//! <root>/<vm>/<guest name>.sock  one v0 socket per region the VM may see
//! ```
//!
//! A VM sees a region when some name the guest could ask for is allowed by the VM's policy and
//! maps (through its `subst`) to the region's host name; the socket is named by that guest name
//! ([`guest_name_for`]). Sockets appear and disappear as regions are created and removed.

use std::path::{Path, PathBuf};

use ivshm_mem::{BackendKind, Pow2Policy};
use ivshm_policy::name::MAX_NAME_LEN;
use ivshm_policy::{RegionName, VmPolicy};

use crate::group::GroupSpec;
use crate::ids::{IdPolicy, IdReuse};

/// Default socket root.
pub const DEFAULT_ROOT: &str = "/run/ivshm";
/// Name of the control socket in the root.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Name of the factory socket in a VM directory.
pub const FACTORY_SOCKET: &str = "factory.sock";
/// The one legal region name a VM cannot use (its socket would be the VM's [`FACTORY_SOCKET`]):
/// every VM's policy answers `GSS_ILLEGAL_NAME` for it; a region with this host name gets no
/// socket under this name.
pub use ivshm_policy::name::{is_reserved_guest_name, RESERVED_GUEST_NAME};

/// What follows the VM's name for a region in its socket's file name.
const REGION_SOCKET_SUFFIX: &str = ".sock";

/// The file name of a region's socket in a VM directory: the VM's name for the region, `.sock`.
pub fn region_socket_name(guest_name: &str) -> String {
    format!("{guest_name}{REGION_SOCKET_SUFFIX}")
}

/// Whether `file_name` is a name the server gives sockets in a VM directory (region sockets
/// and the factory socket end in `.sock`).
pub(crate) fn is_vm_socket_name(file_name: &str) -> bool {
    file_name.ends_with(REGION_SOCKET_SUFFIX)
}

/// The length in bytes of the longest socket path VM directory `dir` can hold: a region socket
/// with a name of the most bytes a region name may have ([`MAX_NAME_LEN`]; the factory socket's
/// name is shorter). It must fit in a socket address ([`ivshm_proto::MAX_SOCKET_PATH`]).
pub fn longest_socket_path(dir: &Path) -> usize {
    dir.as_os_str().len() + 1 + MAX_NAME_LEN + REGION_SOCKET_SUFFIX.len()
}

/// Default mode of a VM directory.
pub const DEFAULT_DIR_MODE: u32 = 0o750;
/// Default mode of the sockets in a VM directory.
pub const DEFAULT_VM_SOCKET_MODE: u32 = 0o660;
/// Default mode of the control socket: root only.
pub const DEFAULT_CONTROL_MODE: u32 = 0o600;

/// Named regions, VMs and the control socket.
#[derive(Debug, Clone)]
pub struct NamedConfig {
    /// The socket root; VM directories are made in it.
    pub root: PathBuf,
    /// The control socket; `None` for none.
    pub control: Option<ControlConfig>,
    /// Settings for regions created at run time and for VM `create` lines.
    pub defaults: RegionDefaults,
    /// Directory and socket permissions for VMs that do not set their own.
    pub directory: DirectoryConfig,
    /// Regions created at start (`[[region]]`), living as long as the server.
    pub regions: Vec<NamedRegionConfig>,
    /// The VMs.
    pub vms: Vec<VmConfig>,
    /// The file this came from, re-read on `SIGHUP` or a `reload` command.
    pub source: Option<PathBuf>,
}

impl NamedConfig {
    /// A configuration with no regions and no VMs, a control socket at `<root>/control.sock`
    /// and the QNX defaults for regions.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        NamedConfig {
            control: Some(ControlConfig::new(root.join(CONTROL_SOCKET))),
            root,
            defaults: RegionDefaults::default(),
            directory: DirectoryConfig::default(),
            regions: Vec::new(),
            vms: Vec::new(),
            source: None,
        }
    }
}

/// The control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// Its path.
    pub path: PathBuf,
    /// Its mode (default 0600: root only).
    pub mode: u32,
    /// Its group.
    pub group: Option<GroupSpec>,
}

impl ControlConfig {
    /// A root-only control socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ControlConfig {
            path: path.into(),
            mode: DEFAULT_CONTROL_MODE,
            group: None,
        }
    }
}

/// Ownership and permissions of a VM directory and the sockets in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryConfig {
    /// Directory mode (default 0750).
    pub dir_mode: u32,
    /// Mode of the v0 and factory sockets (default 0660).
    pub socket_mode: u32,
    /// Owner (uid) of the directory and its sockets; unchanged (root) if `None`.
    pub owner: Option<u32>,
    /// Group of the directory and its sockets; unchanged if `None`.
    pub group: Option<GroupSpec>,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        DirectoryConfig {
            dir_mode: DEFAULT_DIR_MODE,
            socket_mode: DEFAULT_VM_SOCKET_MODE,
            owner: None,
            group: None,
        }
    }
}

/// How a named region's memory is backed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NamedBackend {
    /// An anonymous memfd.
    #[default]
    Memfd,
    /// A POSIX shm object named `ivshm-<host name>`.
    Shm {
        /// Keep it when the region goes.
        keep: bool,
    },
    /// An unlinked file in a directory (e.g. hugetlbfs).
    Dir(PathBuf),
}

impl NamedBackend {
    /// The memory backend for region `name`.
    pub fn kind(&self, name: &str) -> BackendKind {
        match self {
            NamedBackend::Memfd => BackendKind::Memfd,
            NamedBackend::Shm { keep } => BackendKind::PosixShm {
                name: format!("ivshm-{name}"),
                keep: *keep,
            },
            NamedBackend::Dir(dir) => BackendKind::DirFile { dir: dir.clone() },
        }
    }
}

/// Settings a region gets unless it says otherwise. The defaults are QNX's: 16 clients with
/// the lowest free id, 16 vectors (one per possible sender), memfd, sizes rounded up to a
/// power of two (QEMU maps the region as a BAR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDefaults {
    /// Vectors per peer.
    pub vectors: usize,
    /// Peers at once.
    pub peer_limit: usize,
    /// Id policy.
    pub id_policy: IdPolicy,
    /// When the id of a peer that left may be given again (default [`IdReuse::Safe`]: not
    /// while a peer that saw it leave is connected, which QEMU 7.2 guests need).
    pub id_reuse: IdReuse,
    /// Backend.
    pub backend: NamedBackend,
    /// Power-of-two policy.
    pub pow2: Pow2Policy,
    /// Largest size a factory `create` may ask for; larger requests get `GSS_NOMEM`.
    /// Default: what a `guest_shm` size register can describe (2³² − 1 pages).
    pub max_size: u64,
    /// Keep regions made at run time (factory, control) after their last peer leaves. Default
    /// `false`: they go with their last peer, as a QNX region goes with its last client.
    pub persist: bool,
    /// Run-time regions (factory, control) the server holds at once, so that factory clients
    /// cannot exhaust its memory and file descriptors; a factory `create` beyond it gets
    /// `GSS_NOMEM`. Default [`DEFAULT_MAX_RUNTIME_REGIONS`].
    pub max_regions: usize,
    /// What one VM's factory may create, unless the VM says otherwise ([`VmLimits`]).
    pub vm_limits: VmLimits,
    /// A region a factory created that no peer has joined this long after is removed, so that
    /// factory clients cannot leave regions behind (`None`: never). Default
    /// [`DEFAULT_UNUSED_TIMEOUT`].
    pub unused_timeout: Option<std::time::Duration>,
}

/// Default bound on run-time regions.
pub const DEFAULT_MAX_RUNTIME_REGIONS: usize = 1024;

/// Default bound on the run-time regions one VM's factory creates.
pub const DEFAULT_MAX_REGIONS_PER_VM: usize = 64;

/// Default time after which a factory-made region that no peer joined is removed.
pub const DEFAULT_UNUSED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// What one VM's factory may create: regions that exist at once, and their bytes. A factory
/// `create` past either gets `GSS_NOMEM`. Regions it attaches to, configured ones and those
/// made through the control socket do not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLimits {
    /// Regions (default [`DEFAULT_MAX_REGIONS_PER_VM`]).
    pub max_regions: usize,
    /// Bytes, sizes as created (after rounding); `None` for no bound beyond `max_size` per
    /// region (the default).
    pub max_bytes: Option<u64>,
}

impl Default for VmLimits {
    fn default() -> Self {
        VmLimits {
            max_regions: DEFAULT_MAX_REGIONS_PER_VM,
            max_bytes: None,
        }
    }
}

impl Default for RegionDefaults {
    fn default() -> Self {
        RegionDefaults {
            vectors: ivshm_policy::guest_shm::MAX_CLIENTS,
            peer_limit: ivshm_policy::guest_shm::MAX_CLIENTS,
            id_policy: IdPolicy::LowestFree,
            id_reuse: IdReuse::Safe,
            backend: NamedBackend::Memfd,
            pow2: Pow2Policy::RoundUp,
            max_size: ivshm_policy::guest_shm::MAX_REGION_BYTES,
            persist: false,
            max_regions: DEFAULT_MAX_RUNTIME_REGIONS,
            vm_limits: VmLimits::default(),
            unused_timeout: Some(DEFAULT_UNUSED_TIMEOUT),
        }
    }
}

/// Who made a region (for listings and for its lifetime).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A flag-mode region with its own socket ([`crate::RegionConfig`]).
    Standalone,
    /// The configuration (`[[region]]` or a VM's `create`): lives as long as the server, or
    /// until a reload drops it.
    Config,
    /// A factory `create`.
    Factory,
    /// A control `create`.
    Control,
}

impl Origin {
    /// Whether the region was made at run time (factory or control): it goes with its last
    /// peer unless it persists, and counts against `max_regions`.
    pub fn is_run_time(self) -> bool {
        matches!(self, Origin::Factory | Origin::Control)
    }

    /// `standalone`, `config`, `factory` or `control`.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Standalone => "standalone",
            Origin::Config => "config",
            Origin::Factory => "factory",
            Origin::Control => "control",
        }
    }
}

/// A named region to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedRegionConfig {
    /// Host name.
    pub name: RegionName,
    /// Requested size in bytes (the actual size may be rounded up).
    pub size: u64,
    /// Vectors per peer (0..=64).
    pub vectors: usize,
    /// Peers at once (1..=65536).
    pub peer_limit: usize,
    /// Id policy.
    pub id_policy: IdPolicy,
    /// Id reuse rule.
    pub id_reuse: IdReuse,
    /// Backend.
    pub backend: NamedBackend,
    /// Power-of-two policy.
    pub pow2: Pow2Policy,
    /// Keep the region after its last peer leaves (run-time regions only; configured ones
    /// always stay).
    pub persist: bool,
}

impl NamedRegionConfig {
    /// A region of `size` bytes with `defaults`.
    pub fn with_defaults(name: RegionName, size: u64, defaults: &RegionDefaults) -> Self {
        NamedRegionConfig {
            name,
            size,
            vectors: defaults.vectors,
            peer_limit: defaults.peer_limit,
            id_policy: defaults.id_policy,
            id_reuse: defaults.id_reuse,
            backend: defaults.backend.clone(),
            pow2: defaults.pow2,
            persist: defaults.persist,
        }
    }
}

/// One VM: its policy and its directory `<root>/<name>/`.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The VM's name (a legal region name: it is a directory name).
    pub name: RegionName,
    /// Its policy (rules, subst, pre-created regions, device placement).
    pub policy: VmPolicy,
    /// Permissions of its directory and sockets.
    pub directory: DirectoryConfig,
    /// What its factory may create.
    pub limits: VmLimits,
}

/// The name under which a VM with `policy` sees the host region `host_name`, if it may see it.
///
/// Candidates are the host name with `subst` reversed (for `subst m,p`: every occurrence of `p`
/// replaced by `m`; for `subst ,p`: the host name without the prefix `p`), then the host name
/// itself. The first candidate that is a legal name (and not [`RESERVED_GUEST_NAME`]), that
/// `subst` maps back to `host_name` and that the policy allows wins.
pub fn guest_name_for(policy: &VmPolicy, host_name: &str) -> Option<String> {
    let mut candidates = Vec::new();
    if let Some(subst) = policy.subst() {
        let (m, p) = (subst.match_text(), subst.prefix());
        if m.is_empty() {
            if let Some(rest) = host_name.strip_prefix(p) {
                candidates.push(rest.to_string());
            }
        } else if !p.is_empty() {
            for (at, _) in host_name.match_indices(p) {
                candidates.push(format!(
                    "{}{m}{}",
                    &host_name[..at],
                    &host_name[at + p.len()..]
                ));
            }
        }
    }
    candidates.push(host_name.to_string());
    candidates.into_iter().find(|guest| {
        !is_reserved_guest_name(guest)
            && RegionName::new(guest).is_ok()
            && policy.host_name_of(guest) == host_name
            && policy.decide(guest).is_allowed()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(text: &str) -> VmPolicy {
        VmPolicy::parse_qnx(text).unwrap()
    }

    #[test]
    fn prefix_subst_is_reversed() {
        let vm0 = vm("subst ,guest0");
        assert_eq!(guest_name_for(&vm0, "guest0mem").as_deref(), Some("mem"));
        assert_eq!(guest_name_for(&vm0, "guest1mem"), None);
        assert_eq!(guest_name_for(&vm0, "mem"), None);
    }

    #[test]
    fn match_subst_is_reversed_and_identity_needs_permission() {
        let vm0 = vm("subst foo,guest0\nallow foo*");
        assert_eq!(guest_name_for(&vm0, "guest0mem").as_deref(), Some("foomem"));
        assert_eq!(guest_name_for(&vm0, "guest1mem"), None);
        let open = vm("subst foo,guest0");
        assert_eq!(guest_name_for(&open, "bar").as_deref(), Some("bar"));
        assert_eq!(guest_name_for(&open, "foobar"), None);
    }

    #[test]
    fn third_vm_sees_prefixed_regions_only_if_allowed() {
        assert_eq!(
            guest_name_for(&vm("allow guest*"), "guest0mem").as_deref(),
            Some("guest0mem")
        );
        assert_eq!(guest_name_for(&vm("allow other*"), "guest0mem"), None);
        assert_eq!(guest_name_for(&vm("deny guest*"), "guest0mem"), None);
    }
}
