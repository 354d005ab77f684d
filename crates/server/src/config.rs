//! What a server serves: its regions, and for each the socket, memory and vectors.

use std::path::{Path, PathBuf};

use ivshm_mem::{BackendKind, Pow2Policy};
use ivshm_policy::name::MAX_NAME_LEN;
use ivshm_proto::socket_path::{check_socket_path, SocketPathTooLong, MAX_SOCKET_PATH};
use thiserror::Error;

use crate::group::GroupSpec;
use crate::named::{longest_socket_path, NamedConfig, NamedRegionConfig};

/// QEMU's default socket path.
pub const DEFAULT_SOCKET_PATH: &str = "/tmp/ivshmem_socket";
/// QEMU's default region size: 4 MiB.
pub const DEFAULT_SIZE: u64 = 4 << 20;
/// Default socket file mode.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Default bound on notifications queued for a peer beyond its handshake.
pub const DEFAULT_MAX_QUEUED_MESSAGES: usize = 16 * 1024;

/// {0:?} is not an octal file mode (octal digits, at most 7777, e.g. 0750 or 600)
///
/// A text that is not an octal file mode.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub struct FileModeError(pub String);

/// Parses a file mode written in octal, as flags and the configuration file take it: octal
/// digits with an optional `0o` prefix (`600`, `0660`, `0o750`), at most `7777`. The one mode
/// parser.
pub fn parse_file_mode(text: &str) -> Result<u32, FileModeError> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(FileModeError(text.to_string()));
    }
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
        .ok_or_else(|| FileModeError(text.to_string()))
}

/// Parses a time as the configuration file and the command line write it: a whole number
/// followed by `ms`, `s`, `m` or `h` (`"300ms"`, `"20s"`, `"10m"`, `"1h"`). The one time
/// grammar.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let bad = || {
        format!("{text:?} is not a time: a whole number with ms, s, m or h (\"300ms\", \"10m\")")
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs).ok_or_else(bad),
        "h" => n.checked_mul(3600).map(Duration::from_secs).ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// The whole server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The regions to serve (at least one).
    pub regions: Vec<RegionConfig>,
    /// A peer that has more than this many notifications waiting (it stopped reading its
    /// socket) is dropped. Its handshake does not count.
    pub max_queued_messages: usize,
    /// Named regions, per-VM directories, factories and the control socket.
    pub named: Option<NamedConfig>,
    /// When a peer leaves a region whose memory holds `ivshm-channel` channels (and is a
    /// sealed memfd), mark its channel sides gone and ring the survivors, so that guests,
    /// which get no leave events, see the departure (default on).
    pub mark_channel_departures: bool,
}

impl ServerConfig {
    /// A server with a single region.
    pub fn single(region: RegionConfig) -> Self {
        ServerConfig {
            regions: vec![region],
            max_queued_messages: DEFAULT_MAX_QUEUED_MESSAGES,
            named: None,
            mark_channel_departures: true,
        }
    }

    /// Checks the configuration before anything is created.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.regions.is_empty() && self.named.is_none() {
            return Err(ConfigError::NoRegions);
        }
        if let Some(named) = &self.named {
            validate_named(named)?;
        }
        if self.max_queued_messages == 0 {
            return Err(ConfigError::ZeroQueueBound);
        }
        for (i, r) in self.regions.iter().enumerate() {
            r.validate()?;
            if self.regions[..i]
                .iter()
                .any(|o| o.listener.path == r.listener.path)
            {
                return Err(ConfigError::DuplicateSocket(r.listener.path.clone()));
            }
        }
        Ok(())
    }
}

fn validate_named(named: &NamedConfig) -> Result<(), ConfigError> {
    for (i, r) in named.regions.iter().enumerate() {
        validate_named_region(r)?;
        if named.regions[..i].iter().any(|o| o.name == r.name) {
            return Err(ConfigError::DuplicateRegion(r.name.to_string()));
        }
    }
    if let Some(control) = &named.control {
        check_socket_path(&control.path)?;
    }
    for (i, vm) in named.vms.iter().enumerate() {
        if named.vms[..i].iter().any(|o| o.name == vm.name) {
            return Err(ConfigError::DuplicateVm(vm.name.to_string()));
        }
        check_vm_directory(&named.root.join(vm.name.as_str()))?;
        for mode in [vm.directory.dir_mode, vm.directory.socket_mode] {
            if mode & !0o7777 != 0 {
                return Err(ConfigError::Mode(mode));
            }
        }
    }
    validate_named_region(&NamedRegionConfig::with_defaults(
        ivshm_policy::RegionName::new("defaults").map_err(|_| ConfigError::ZeroSize)?,
        1,
        &named.defaults,
    ))
}

/// Checks one named region's numbers.
pub fn validate_named_region(r: &NamedRegionConfig) -> Result<(), ConfigError> {
    if r.vectors > ivshm_proto::v0::MAX_VECTORS {
        return Err(ConfigError::Vectors(r.vectors));
    }
    if r.size == 0 {
        return Err(ConfigError::ZeroSize);
    }
    if r.peer_limit == 0 || r.peer_limit > 1 << 16 {
        return Err(ConfigError::PeerLimit(r.peer_limit));
    }
    Ok(())
}

/// One shared-memory region and the socket its peers connect to.
#[derive(Debug, Clone)]
pub struct RegionConfig {
    /// A name for logs (later: the region's name in the per-VM directory).
    pub name: String,
    /// Where peers connect.
    pub listener: ListenerConfig,
    /// The memory.
    pub memory: MemoryConfig,
    /// Interrupt vectors (eventfds) per peer, 0..=64. With 0 (accepted for compatibility with
    /// QEMU's `-n 0`) peers get no eventfds and so no join notifications, only leaves.
    pub vectors: usize,
}

impl RegionConfig {
    /// A region with QEMU's defaults (4 MiB memfd, 1 vector, mode 0600) on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        RegionConfig {
            name: "default".to_string(),
            listener: ListenerConfig::new(socket),
            memory: MemoryConfig::default(),
            vectors: 1,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.vectors > ivshm_proto::v0::MAX_VECTORS {
            return Err(ConfigError::Vectors(self.vectors));
        }
        if self.memory.size == 0 {
            return Err(ConfigError::ZeroSize);
        }
        if self.listener.mode & !0o7777 != 0 {
            return Err(ConfigError::Mode(self.listener.mode));
        }
        check_socket_path(&self.listener.path)?;
        Ok(())
    }
}

/// The listening socket of a region.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Socket path.
    pub path: PathBuf,
    /// File mode of the socket (default 0600).
    pub mode: u32,
    /// Group owning the socket, if it should change.
    pub group: Option<GroupSpec>,
}

impl ListenerConfig {
    /// A socket at `path` with mode 0600 and the default group.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ListenerConfig {
            path: path.into(),
            mode: DEFAULT_SOCKET_MODE,
            group: None,
        }
    }
}

/// How a region's memory is created.
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// The backend.
    pub backend: BackendKind,
    /// Requested size in bytes.
    pub size: u64,
    /// What to do with a size that is not a power of two.
    pub pow2: Pow2Policy,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            backend: BackendKind::Memfd,
            size: DEFAULT_SIZE,
            pow2: Pow2Policy::RoundUp,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum ConfigError {
    /// no region to serve
    ///
    /// No region was configured.
    NoRegions,
    /// {0} vectors per peer: at most 64 are supported
    ///
    /// More than 64 vectors.
    Vectors(usize),
    /// region size must be greater than zero
    ///
    /// Size zero.
    ZeroSize,
    /// socket mode {0:o} is not a file mode
    ///
    /// Mode with bits outside 0o7777.
    Mode(u32),
    /// the per-peer queue bound must be at least 1
    ///
    /// Queue bound zero.
    ZeroQueueBound,
    /// socket {0} is configured twice
    ///
    /// Two regions on one socket.
    DuplicateSocket(PathBuf),
    /// peer limit {0} is not in 1..=65536
    ///
    /// A peer limit of 0 or above 65536.
    PeerLimit(usize),
    /// region {0:?} is configured twice
    ///
    /// Two named regions with one name.
    DuplicateRegion(String),
    /// VM {0:?} is configured twice
    ///
    /// Two VMs with one name.
    DuplicateVm(String),
    /// {0}
    ///
    /// A socket path (a region's, the control socket's) does not fit in a socket address.
    SocketPath(SocketPathTooLong),
    /// VM directory {dir} is {len} bytes long: a region socket in it (a name of up to
    /// {MAX_NAME_LEN:} bytes and ".sock") could be {longest} bytes, more than the
    /// {MAX_SOCKET_PATH:} bytes of a UNIX socket path (sun_path): use a shorter root or VM name
    ///
    /// A VM directory whose path leaves too little room for its sockets' names.
    VmDirectoryTooLong {
        /// The directory.
        dir: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The longest socket path in it.
        longest: usize,
    },
}

impl From<SocketPathTooLong> for ConfigError {
    fn from(error: SocketPathTooLong) -> Self {
        Self::SocketPath(error)
    }
}

/// Fails when VM directory `dir` cannot hold a socket for every region name.
pub fn check_vm_directory(dir: &Path) -> Result<(), ConfigError> {
    let longest = longest_socket_path(dir);
    if longest > MAX_SOCKET_PATH {
        return Err(ConfigError::VmDirectoryTooLong {
            dir: dir.to_path_buf(),
            len: dir.as_os_str().len(),
            longest,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let ok = ServerConfig::single(RegionConfig::new("/tmp/x"));
        assert_eq!(ok.validate(), Ok(()));
        let mut bad = ok.clone();
        bad.regions[0].vectors = 65;
        assert_eq!(bad.validate(), Err(ConfigError::Vectors(65)));
        bad.regions[0].vectors = 0;
        assert_eq!(bad.validate(), Ok(()));
        let mut bad = ok.clone();
        bad.regions[0].memory.size = 0;
        assert_eq!(bad.validate(), Err(ConfigError::ZeroSize));
        let mut bad = ok.clone();
        bad.regions.push(RegionConfig::new("/tmp/x"));
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::DuplicateSocket(_))
        ));
        let mut bad = ok.clone();
        bad.regions[0].listener.path = PathBuf::from(format!("/{}", "s".repeat(107)));
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::SocketPath(SocketPathTooLong { len: 108, .. }))
        ));
        let mut bad = ok;
        bad.regions.clear();
        assert_eq!(bad.validate(), Err(ConfigError::NoRegions));
    }

    #[test]
    fn durations_are_whole_numbers_with_a_unit() {
        use std::time::Duration;
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration(" 20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in [
            "",
            "5",
            "5x",
            "m",
            "-1s",
            "1.5s",
            "99999999999999999999h",
            "5 s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn file_modes_are_octal_up_to_7777() {
        assert_eq!(parse_file_mode("600"), Ok(0o600));
        assert_eq!(parse_file_mode("0660"), Ok(0o660));
        assert_eq!(parse_file_mode("0o750"), Ok(0o750));
        assert_eq!(parse_file_mode("7777"), Ok(0o7777));
        for bad in [
            "", "0o", "10000", "0999", "+600", "-1", "0x1ff", "rw-", " 600",
        ] {
            let err = parse_file_mode(bad).unwrap_err().to_string();
            assert!(err.contains("not an octal file mode"), "{bad:?}: {err}");
        }
    }

    proptest::proptest! {
        #[test]
        fn every_mode_written_in_octal_parses_back(mode in 0u32..=0o7777, prefix in proptest::bool::ANY) {
            let text = if prefix { format!("0o{mode:o}") } else { format!("{mode:04o}") };
            proptest::prop_assert_eq!(parse_file_mode(&text), Ok(mode));
        }

        #[test]
        fn never_panics(text in ".{0,12}") {
            let _ = parse_file_mode(&text);
        }
    }
}
