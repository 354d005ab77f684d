//! `ivshmem-server`: drop-in replacement for QEMU's `contrib/ivshmem-server`.
//!
//! Same flags, parsed like QEMU's `getopt("hvFp:S:m:M:l:n:")` (`-l4M` and `-l 4M`, clustered
//! flags such as `-vF`, `--` ends options, operands are ignored), same defaults (socket
//! `/tmp/ivshmem_socket`, POSIX shm `ivshmem`, 4 MiB, 1 vector, pid file
//! `/var/run/ivshmem-server.pid` in daemon mode), same messages for bad arguments.
//!
//! Daemon mode (the default, unless `-F`): the program starts itself again as a new session
//! (`setsid`, working directory `/`, stdin/stdout/stderr on `/dev/null` once it is serving);
//! the first process exits 0 only when the socket is listening and the pid file is written, so
//! `ivshmem-server && qemu-system-...` is safe. Relative paths are made absolute first.
//!
//! Unlike QEMU's program: sizes of 2 GiB and more work, a size that is not a power of two is
//! rounded up with a log line (QEMU does it silently), send failures and peers that stop
//! reading are handled, and the shm object is kept on exit exactly like QEMU (never removed).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use ivshm_mem::{BackendKind, Pow2Policy};
use ivshm_server::pidfile::PidFile;
use ivshm_server::signals::SignalPipes;
use ivshm_server::{ListenerConfig, MemoryConfig, RegionConfig, Server, ServerConfig};

#[path = "dropin/mod.rs"]
mod dropin;
use dropin::getopt::Getopt;

const DEFAULT_PID_FILE: &str = "/var/run/ivshmem-server.pid";
const DEFAULT_SOCKET: &str = "/tmp/ivshmem_socket";
const DEFAULT_SHM_NAME: &str = "ivshmem";
const DEFAULT_SIZE: u64 = 4 * 1024 * 1024;
const DEFAULT_VECTORS: u64 = 1;
const MAX_VECTORS: u64 = 64;
/// Set in the environment of the re-executed daemon process.
const DAEMON_CHILD_ENV: &str = "IVSHM_SERVER_DAEMON_CHILD";
/// What the daemon process prints on stdout once it serves.
const READY_LINE: &str = "ivshmem-server: ready";

/// Where the memory comes from (`-M` and `-m` override each other; the last one wins).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Memory {
    Shm(String),
    Dir(PathBuf),
}

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Args {
    verbose: bool,
    foreground: bool,
    pid_file: PathBuf,
    socket: PathBuf,
    memory: Memory,
    size: u64,
    vectors: u64,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            verbose: false,
            foreground: false,
            pid_file: PathBuf::from(DEFAULT_PID_FILE),
            socket: PathBuf::from(DEFAULT_SOCKET),
            memory: Memory::Shm(DEFAULT_SHM_NAME.to_string()),
            size: DEFAULT_SIZE,
            vectors: DEFAULT_VECTORS,
        }
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Run(Args),
    /// `-h`: usage on stdout, exit 0.
    Help,
    /// An unknown option or a missing argument: message, usage on stdout, exit 1.
    Usage(String),
    /// A bad value: message, "Try '... -h'" on stderr, exit 1.
    Invalid(String),
}

/// getopt("hvFp:S:m:M:l:n:") semantics ([`dropin::getopt`]), then QEMU's checks.
fn parse_args(args: &[String]) -> Parsed {
    let mut out = Args::default();
    for option in Getopt::new(args, "hvFp:S:m:M:l:n:") {
        match option {
            Ok(('h', _)) => return Parsed::Help,
            Ok(('v', _)) => out.verbose = true,
            Ok(('F', _)) => out.foreground = true,
            Ok((c, Some(value))) => {
                if let Err(e) = apply_option(&mut out, c, &value) {
                    return Parsed::Invalid(e);
                }
            }
            Ok((_, None)) => {}
            Err(e) => return Parsed::Usage(e.to_string()),
        }
    }
    if out.vectors > MAX_VECTORS {
        return Parsed::Invalid(format!("too many requested vectors (max is {MAX_VECTORS})"));
    }
    if out.verbose && !out.foreground {
        return Parsed::Invalid("cannot use verbose in daemon mode".to_string());
    }
    Parsed::Run(out)
}

fn apply_option(out: &mut Args, option: char, value: &str) -> Result<(), String> {
    match option {
        'p' => out.pid_file = PathBuf::from(value),
        'S' => out.socket = PathBuf::from(value),
        'M' => out.memory = Memory::Shm(value.to_string()),
        'm' => out.memory = Memory::Dir(PathBuf::from(value)),
        'l' => {
            out.size = ivshm_mem::parse_size(value)
                .map_err(|e| format!("Parameter 'shm_size' expects a size: {e}"))?;
        }
        'n' => out.vectors = parse_uint(value).ok_or("cannot parse n_vectors")?,
        _ => {}
    }
    Ok(())
}

/// QEMU's `parse_uint_full(s, &v, 0)`: decimal, `0x` hex or leading-`0` octal, nothing else.
fn parse_uint(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).ok();
    }
    if s.len() > 1 && s.starts_with('0') {
        return u64::from_str_radix(&s[1..], 8).ok();
    }
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn usage(progname: &str) -> String {
    format!(
        "Usage: {progname} [OPTION]...\n\
         \x20 -h: show this help\n\
         \x20 -v: verbose mode\n\
         \x20 -F: foreground mode (default is to daemonize)\n\
         \x20 -p <pid-file>: path to the PID file (used in daemon mode only)\n\
         \x20    default {DEFAULT_PID_FILE}\n\
         \x20 -S <unix-socket-path>: path to the unix socket to listen to\n\
         \x20    default {DEFAULT_SOCKET}\n\
         \x20 -M <shm-name>: POSIX shared memory object to use\n\
         \x20    default {DEFAULT_SHM_NAME}\n\
         \x20 -m <dir-name>: where to create shared memory\n\
         \x20 -l <size>: size of shared memory in bytes\n\
         \x20    suffixes K, M, G and T can be used, e.g. 1K means 1024\n\
         \x20    default {DEFAULT_SIZE}\n\
         \x20 -n <nvectors>: number of vectors\n\
         \x20    default {DEFAULT_VECTORS}\n"
    )
}

/// Makes `path` absolute against the current directory (the daemon changes to `/`).
fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    std::env::current_dir()
        .map(|d| d.join(path))
        .unwrap_or_else(|_| path.to_path_buf())
}

fn config(args: &Args) -> ServerConfig {
    let backend = match &args.memory {
        // QEMU's server never removes its shm object; neither do we.
        Memory::Shm(name) => BackendKind::PosixShm {
            name: name.clone(),
            keep: true,
        },
        Memory::Dir(dir) => BackendKind::DirFile { dir: absolute(dir) },
    };
    ServerConfig::single(RegionConfig {
        name: "default".to_string(),
        listener: ListenerConfig::new(absolute(&args.socket)),
        memory: MemoryConfig {
            backend,
            size: args.size,
            pow2: Pow2Policy::RoundUp,
        },
        vectors: usize::try_from(args.vectors).unwrap_or(usize::MAX),
    })
}

fn init_logging(verbose: bool) {
    dropin::init_logging(if verbose { "debug" } else { "info" });
}

/// Serves in this process. In daemon mode, first becomes a session leader, and once serving
/// writes the pid file, prints the ready line and detaches stdio.
fn serve(args: &Args, daemon: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    if daemon {
        rustix::process::setsid().context("setsid")?;
    }
    let config = config(args);
    let signals = SignalPipes::install().context("installing signal handlers")?;
    let mut server = Server::new(config)?;
    let mut pid_file = None;
    if daemon {
        pid_file = Some(PidFile::create(&absolute(&args.pid_file))?);
        rustix::process::chdir("/").context("chdir /")?;
    }
    for path in server.socket_paths() {
        eprintln!("listening on {}", path.display());
    }
    if daemon {
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{READY_LINE}")?;
        stdout.flush()?;
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .context("opening /dev/null")?;
        rustix::stdio::dup2_stdin(&null).context("stdin to /dev/null")?;
        rustix::stdio::dup2_stdout(&null).context("stdout to /dev/null")?;
        rustix::stdio::dup2_stderr(&null).context("stderr to /dev/null")?;
    }
    server.run_until(&signals.controls())?;
    drop(server);
    drop(pid_file);
    Ok(())
}

/// Starts the daemon (this program again, in a new session) and waits until it serves.
fn spawn_daemon(progname: &str) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("{progname}: cannot daemonize: {e}");
            return ExitCode::FAILURE;
        }
    };
    let child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(DAEMON_CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            eprintln!("{progname}: cannot daemonize: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The daemon prints the ready line, then puts /dev/null on its stdout: EOF for us.
    let ready = child
        .stdout
        .take()
        .map(|out| {
            BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .any(|line| line == READY_LINE)
        })
        .unwrap_or(false);
    if ready {
        return ExitCode::SUCCESS;
    }
    let _ = child.wait();
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let progname = argv
        .first()
        .cloned()
        .unwrap_or_else(|| "ivshmem-server".to_string());
    let args = match parse_args(argv.get(1..).unwrap_or(&[])) {
        Parsed::Run(args) => args,
        Parsed::Help => {
            print!("{}", usage(&progname));
            return ExitCode::SUCCESS;
        }
        Parsed::Usage(message) => {
            eprintln!("{progname}: {message}");
            print!("{}", usage(&progname));
            return ExitCode::FAILURE;
        }
        Parsed::Invalid(message) => {
            eprintln!("{message}");
            eprintln!("Try '{progname} -h' for more information.");
            return ExitCode::FAILURE;
        }
    };
    let daemon_child = std::env::var_os(DAEMON_CHILD_ENV).is_some();
    if !args.foreground && !daemon_child {
        return spawn_daemon(&progname);
    }
    init_logging(args.verbose);
    match serve(&args, daemon_child && !args.foreground) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{progname}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(args: &[&str]) -> Parsed {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse_args(&args)
    }

    fn run(args: &[&str]) -> Args {
        match parse(args) {
            Parsed::Run(a) => a,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_qemus() {
        let a = run(&[]);
        assert_eq!(a, Args::default());
        assert_eq!(a.socket, PathBuf::from("/tmp/ivshmem_socket"));
        assert_eq!(a.memory, Memory::Shm("ivshmem".into()));
        assert_eq!(a.size, 4 << 20);
        assert_eq!(a.vectors, 1);
        assert!(!a.foreground);
        assert_eq!(a.pid_file, PathBuf::from("/var/run/ivshmem-server.pid"));
    }

    #[test]
    fn attached_and_separate_arguments() {
        assert_eq!(run(&["-F", "-l4M"]).size, 4 << 20);
        assert_eq!(run(&["-F", "-l", "4M"]).size, 4 << 20);
        assert_eq!(run(&["-Fl2G"]).size, 2 << 30);
        assert_eq!(run(&["-F", "-l", "5G"]).size, 5 << 30);
        assert_eq!(run(&["-Fn", "8"]).vectors, 8);
        assert_eq!(run(&["-F", "-n", "0"]).vectors, 0);
        assert_eq!(run(&["-F", "-n0x10"]).vectors, 16);
        assert_eq!(run(&["-F", "-n", "010"]).vectors, 8);
        assert_eq!(run(&["-F", "-S/tmp/x"]).socket, PathBuf::from("/tmp/x"));
        assert_eq!(run(&["-p", "/run/p"]).pid_file, PathBuf::from("/run/p"));
    }

    #[test]
    fn clustered_flags_and_last_memory_option_wins() {
        let a = run(&["-vF"]);
        assert!(a.verbose && a.foreground);
        let a = run(&["-Fv", "-M", "foo", "-m", "/dev/hugepages"]);
        assert_eq!(a.memory, Memory::Dir("/dev/hugepages".into()));
        let a = run(&["-F", "-m", "/dev/hugepages", "-Mfoo"]);
        assert_eq!(a.memory, Memory::Shm("foo".into()));
        // A value that looks like an option is still the value.
        assert_eq!(run(&["-F", "-S", "-v"]).socket, PathBuf::from("-v"));
    }

    #[test]
    fn operands_are_ignored_and_double_dash_ends_options() {
        assert_eq!(run(&["-F", "junk", "-n", "2"]).vectors, 2);
        assert_eq!(run(&["-F", "--", "-n", "2"]).vectors, 1);
        assert_eq!(run(&["-F", "-"]).vectors, 1);
    }

    #[test]
    fn errors_match_qemu() {
        assert_eq!(parse(&["-h"]), Parsed::Help);
        assert_eq!(
            parse(&["-F", "-x"]),
            Parsed::Usage("invalid option -- 'x'".into())
        );
        assert_eq!(
            parse(&["-F", "-l"]),
            Parsed::Usage("option requires an argument -- 'l'".into())
        );
        assert_eq!(
            parse(&["-v"]),
            Parsed::Invalid("cannot use verbose in daemon mode".into())
        );
        assert_eq!(
            parse(&["-F", "-n", "65"]),
            Parsed::Invalid("too many requested vectors (max is 64)".into())
        );
        assert_eq!(
            parse(&["-F", "-n", "x"]),
            Parsed::Invalid("cannot parse n_vectors".into())
        );
        assert!(matches!(parse(&["-F", "-l", "4Q"]), Parsed::Invalid(_)));
    }

    #[test]
    fn config_uses_kept_posix_shm_and_rounds_up() {
        let c = config(&run(&["-F", "-l", "3M", "-n", "2"]));
        let r = &c.regions[0];
        assert_eq!(
            r.memory.backend,
            BackendKind::PosixShm {
                name: "ivshmem".into(),
                keep: true
            }
        );
        assert_eq!(r.memory.pow2, Pow2Policy::RoundUp);
        assert_eq!(r.vectors, 2);
        assert!(r.listener.path.is_absolute());
    }

    proptest! {
        #[test]
        fn parser_never_panics(args in prop::collection::vec("-?[a-zA-Z0-9-]{0,6}", 0..6)) {
            let _ = parse_args(&args);
        }

        #[test]
        fn attached_equals_separate(n in 1u64..=64) {
            let a = run(&["-F", &format!("-n{n}")]);
            let b = run(&["-F", "-n", &n.to_string()]);
            prop_assert_eq!(a, b);
        }
    }
}
