//! `ivshm serve`: the server in the foreground (see `docs/cli.md`).

use std::path::PathBuf;

use crate::args;
use anyhow::Context;
use clap::{Args, ValueEnum};
use ivshm_mem::{BackendKind, Pow2Policy};
use ivshm_server::config::{DEFAULT_SIZE, DEFAULT_SOCKET_MODE, DEFAULT_SOCKET_PATH};
use ivshm_server::pidfile::PidFile;
use ivshm_server::service_notify::ServiceNotifier;
use ivshm_server::signals::SignalPipes;
use ivshm_server::{GroupSpec, ListenerConfig, MemoryConfig, RegionConfig, Server, ServerConfig};

/// Which memory backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// An anonymous memfd, sealed against resizing.
    Memfd,
    /// A POSIX shm object (`shm_open`), named by `--shm-name`.
    Shm,
    /// An unlinked file in `--dir` (e.g. a hugetlbfs mount).
    Dir,
}

/// What to do with a size that is not a power of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pow2Choice {
    /// Round up (and log a warning with both sizes).
    RoundUp,
    /// Fail with an error.
    Refuse,
    /// Keep the size (for peers that are not QEMU devices).
    Off,
}

/// Flags of the single-region mode, which `--config` replaces.
const FLAG_MODE_OPTIONS: [&str; 10] = [
    "socket",
    "size",
    "vectors",
    "backend",
    "shm_name",
    "dir",
    "keep_shm",
    "socket_mode",
    "socket_group",
    "pow2",
];

/// `ivshm serve`: one region from flags, or named regions from a configuration file.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Serve named regions, per-VM directories, factories and a control socket as FILE (TOML)
    /// says (see docs/named-regions.md). Replaces the single-region flags.
    #[arg(long, value_name = "FILE", conflicts_with_all = FLAG_MODE_OPTIONS)]
    pub config: Option<PathBuf>,
    /// UNIX socket QEMU's ivshmem-doorbell chardev connects to.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET_PATH, value_parser = args::socket_path)]
    pub socket: PathBuf,
    /// Size of the shared region: bytes, 0x hex, or K/M/G/T suffixes (powers of 1024).
    #[arg(long, default_value = "4M", value_parser = ivshm_mem::parse_size)]
    pub size: u64,
    /// Interrupt vectors (eventfds) per peer, 1..=64.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub vectors: u16,
    /// Memory backend.
    #[arg(long, value_enum, default_value_t = BackendChoice::Memfd)]
    pub backend: BackendChoice,
    /// POSIX shm object name (only with `--backend shm`; default: ivshmem).
    #[arg(long, value_name = "NAME")]
    pub shm_name: Option<String>,
    /// Directory for the backing file (only with `--backend dir`, which needs it), e.g. a
    /// hugetlbfs mount.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Keep the POSIX shm object when the server exits (only with `--backend shm`; default:
    /// remove it).
    #[arg(long)]
    pub keep_shm: bool,
    /// File mode of the socket, in octal.
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = ivshm_server::config::parse_file_mode)]
    pub socket_mode: u32,
    /// Group of the socket: a numeric gid or a name from /etc/group.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Serve metrics over HTTP at ADDR, IP:PORT (e.g. 127.0.0.1:9464): GET /metrics answers
    /// in the Prometheus text format, server-wide, per region and per VM. Off by default; an
    /// address other than loopback is warned about (region and VM names become visible).
    #[arg(long, value_name = "ADDR", value_parser = crate::args::listen_address)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Write the server's pid here (removed on exit).
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,
    /// QEMU needs a power-of-two BAR: round-up, refuse, or off.
    #[arg(long, value_enum, default_value_t = Pow2Choice::RoundUp)]
    pub pow2: Pow2Choice,
    /// Do not mark the channel sides of a peer that leaves as gone (by default the server does
    /// it in regions that hold ivshm channels, so that guests see the departure; the
    /// configuration file's `mark_channel_departures = false` does the same).
    #[arg(long)]
    pub no_mark_channel_departures: bool,
}

/// The POSIX shm object's name when `--shm-name` is not given (QEMU's `-M` default).
pub const DEFAULT_SHM_NAME: &str = "ivshmem";

impl ServeArgs {
    /// Flags that only apply to another backend than the one chosen: refused, never ignored
    /// (`--shm-name` and `--keep-shm` need `--backend shm`, `--dir` needs `--backend dir`,
    /// which needs `--dir`). The message names the flag and what to add.
    pub fn backend_mismatch(&self) -> Option<String> {
        let chosen = match self.backend {
            BackendChoice::Memfd => "memfd",
            BackendChoice::Shm => "shm",
            BackendChoice::Dir => "dir",
        };
        let needs = [
            (
                "--shm-name",
                self.shm_name.is_some(),
                BackendChoice::Shm,
                "shm",
            ),
            ("--keep-shm", self.keep_shm, BackendChoice::Shm, "shm"),
            ("--dir", self.dir.is_some(), BackendChoice::Dir, "dir"),
        ];
        if self.backend == BackendChoice::Dir && self.dir.is_none() {
            return Some(
                "--backend dir needs --dir DIR (the directory for the backing file, e.g. a \
                 hugetlbfs mount)"
                    .to_string(),
            );
        }
        needs
            .into_iter()
            .find(|&(_, given, backend, _)| given && self.backend != backend)
            .map(|(flag, _, _, name)| {
                format!(
                    "{flag} applies only to --backend {name}, and the backend is {chosen}{}; \
                     add --backend {name}",
                    if self.backend == BackendChoice::Memfd {
                        " (the default)"
                    } else {
                        ""
                    }
                )
            })
    }

    /// The server configuration these flags describe.
    pub fn to_config(&self) -> anyhow::Result<ServerConfig> {
        let backend = match self.backend {
            BackendChoice::Memfd => BackendKind::Memfd,
            BackendChoice::Shm => BackendKind::PosixShm {
                name: self
                    .shm_name
                    .clone()
                    .unwrap_or_else(|| DEFAULT_SHM_NAME.to_string()),
                keep: self.keep_shm,
            },
            BackendChoice::Dir => BackendKind::DirFile {
                dir: self.dir.clone().context("--backend dir needs --dir DIR")?,
            },
        };
        let group = self
            .socket_group
            .as_deref()
            .map(str::parse::<GroupSpec>)
            .transpose()
            .context("--socket-group")?;
        let region = RegionConfig {
            name: "default".to_string(),
            listener: ListenerConfig {
                path: self.socket.clone(),
                mode: self.socket_mode,
                group,
            },
            memory: MemoryConfig {
                backend,
                size: self.size,
                pow2: match self.pow2 {
                    Pow2Choice::RoundUp => Pow2Policy::RoundUp,
                    Pow2Choice::Refuse => Pow2Policy::Refuse,
                    Pow2Choice::Off => Pow2Policy::Off,
                },
            },
            vectors: usize::from(self.vectors),
        };
        Ok(ServerConfig::single(region))
    }
}

/// Runs the server until SIGINT or SIGTERM; then the socket, the pid file and (unless kept)
/// the shm object are removed. SIGHUP re-reads `--config` (if given) and logs the status.
/// With `$NOTIFY_SOCKET` set (systemd `Type=notify`), sends `READY=1` once the sockets are
/// bound, `RELOADING=1`/`READY=1` around reloads and `STOPPING=1` at shutdown.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => ivshm_server::config_file::load(path)?,
        None => args.to_config()?,
    };
    if args.no_mark_channel_departures {
        config.mark_channel_departures = false;
    }
    let named = config.named.clone();
    // Bound first: an address that cannot be had stops the start before any region is made.
    let metrics_listener = args.metrics.map(ivshm_server::metrics::bind).transpose()?;
    let signals = SignalPipes::install().context("installing signal handlers")?;
    let mut server = Server::new(config).context("starting the server")?;
    let metrics = metrics_listener
        .map(|listener| server.serve_metrics(listener))
        .transpose()?;
    let pidfile = args.pidfile.as_deref().map(PidFile::create).transpose()?;
    if let Some(address) = metrics {
        eprintln!("metrics on http://{address}/metrics");
    }
    for path in server.socket_paths() {
        eprintln!("listening on {}", path.display());
    }
    if let Some(named) = named {
        if let Some(control) = &named.control {
            eprintln!("listening on {}", control.path.display());
        }
        for vm in &named.vms {
            eprintln!(
                "listening on {}",
                named
                    .root
                    .join(vm.name.as_str())
                    .join(ivshm_server::named::FACTORY_SOCKET)
                    .display()
            );
        }
    }
    // Under systemd (Type=notify): ready now that every socket is bound and the pid file
    // written; the server itself reports reloads.
    match ServiceNotifier::from_env() {
        Ok(Some(notifier)) => {
            notifier.ready(&server.status_line());
            server.set_notifier(notifier);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("{e}; the service manager is not told when the server is ready"),
    }
    server
        .run_until(&signals.controls())
        .context("server loop")?;
    if let Some(notifier) = server.notifier() {
        notifier.stopping();
    }
    drop(server);
    drop(pidfile);
    Ok(())
}

// Keep the documented defaults and the library's in one place.
const _: () = assert!(DEFAULT_SIZE == 4 << 20 && DEFAULT_SOCKET_MODE == 0o600);

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(argv: &[&str]) -> Result<ServeArgs, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("serve").chain(argv.iter().copied()))
            .map(|w| w.args)
    }

    #[test]
    fn defaults_match_the_documentation() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.socket, PathBuf::from("/tmp/ivshmem_socket"));
        assert_eq!(a.size, 4 << 20);
        assert_eq!(a.vectors, 1);
        assert_eq!(a.backend, BackendChoice::Memfd);
        assert_eq!(a.socket_mode, 0o600);
        assert_eq!(a.pow2, Pow2Choice::RoundUp);
        let c = a.to_config().unwrap();
        assert_eq!(c.regions[0].memory.backend, BackendKind::Memfd);
    }

    #[test]
    fn flags() {
        let a = parse(&[
            "--socket",
            "/tmp/s",
            "--size",
            "5G",
            "--vectors",
            "64",
            "--backend",
            "shm",
            "--shm-name",
            "foo",
            "--keep-shm",
            "--socket-mode",
            "0660",
            "--socket-group",
            "kvm",
            "--pow2",
            "refuse",
        ])
        .unwrap();
        assert_eq!(a.size, 5 << 30);
        let c = a.to_config().unwrap();
        let r = &c.regions[0];
        assert_eq!(r.vectors, 64);
        assert_eq!(r.listener.mode, 0o660);
        assert_eq!(r.listener.group, Some(GroupSpec::Name("kvm".into())));
        assert_eq!(
            r.memory.backend,
            BackendKind::PosixShm {
                name: "foo".into(),
                keep: true
            }
        );
        assert_eq!(r.memory.pow2, Pow2Policy::Refuse);
    }

    #[test]
    fn config_replaces_the_single_region_flags() {
        let a = parse(&["--config", "/etc/ivshm.toml", "--pidfile", "/tmp/p"]).unwrap();
        assert_eq!(a.config, Some(PathBuf::from("/etc/ivshm.toml")));
        parse(&["--config", "/etc/ivshm.toml", "--socket", "/tmp/s"]).unwrap_err();
        parse(&["--config", "/etc/ivshm.toml", "--size", "1M"]).unwrap_err();
    }

    #[test]
    fn bad_values_are_rejected() {
        parse(&["--vectors", "0"]).unwrap_err();
        parse(&["--vectors", "65"]).unwrap_err();
        parse(&["--size", "4X"]).unwrap_err();
        parse(&["--socket-mode", "999"]).unwrap_err();
        parse(&["--pow2", "sometimes"]).unwrap_err();
        parse(&["--backend", "dir"])
            .unwrap()
            .to_config()
            .unwrap_err();
    }
}
