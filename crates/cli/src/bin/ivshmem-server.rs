//! `ivshmem-server`: drop-in replacement for QEMU 7.2's `contrib/ivshmem-server`.
//!
//! What a script sees is QEMU's: the flags, parsed like its `getopt("hvFp:S:m:M:l:n:")`
//! (`-l4M` and `-l 4M`, clustered `-vF`, `--` ends options, operands ignored) with its number
//! rules ([`qemu_numbers`]: `-l 1.5M`, `-n 010`); the defaults (socket `/tmp/ivshmem_socket`,
//! POSIX shm `ivshmem`, 4 MiB, 1 vector, pid file `/var/run/ivshmem-server.pid`); the messages
//! and exit codes of bad arguments and failed start-ups (`cannot bind`, `cannot open shm file
//! NAME: ...`); the `-v` lines on stdout (`Using POSIX shared memory: NAME`, `create & bind
//! socket PATH`, `accept()=N`, `new peer id = N`, `peer->sock_fd=N`, `free peer N`, `close
//! server`) with this process's real fd numbers; `server disconnected` on stdout when SIGTERM
//! or SIGINT stops it; at the stop, peers removed in join order with each leave told to the
//! others; the socket's mode from the umask; the POSIX shm object removed at exit and when the
//! start-up fails (QEMU 7.2 does both), the `-m DIR` file unlinked at once.
//!
//! Daemon mode (the default, unless `-F`): the program starts itself again as a new session,
//! like QEMU's `daemon(1, 1)` keeping the working directory and stdout/stderr (so `server
//! disconnected` still reaches them); the first process exits only when the socket listens and
//! the pid file is written: 0, or 1 with the daemon's error (QEMU's has exited 0 by then).
//!
//! Deliberately different (each with its reason in `docs/cli.md`, "Drop-in programs"): no
//! "example code" banner, sizes of 1 GiB and more served as asked, a stale socket reused,
//! `-l 0` refused, peers that stop reading or write to the socket dropped while the others go
//! on, SIGHUP stops it cleanly, the pid file removed at exit, fd numbers of its own layout.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

use ivshm_mem::{BackendError, BackendKind, Pow2Policy};
use ivshm_server::listener::ListenerError;
use ivshm_server::pidfile::PidFile;
use ivshm_server::signals::SignalPipes;
use ivshm_server::{
    ConfigError, Control, ControlAction, ListenerConfig, MemoryConfig, Observer, RegionConfig,
    RemovalReason, Server, ServerConfig, ServerError,
};
use rustix::io::Errno;

use ivshm_cli::dropin::{self, getopt::Getopt, qemu_numbers, strerror};

const DEFAULT_PID_FILE: &str = "/var/run/ivshmem-server.pid";
const DEFAULT_SOCKET: &str = "/tmp/ivshmem_socket";
const DEFAULT_SHM_NAME: &str = "ivshmem";
const DEFAULT_SIZE: u64 = 4 * 1024 * 1024;
const DEFAULT_VECTORS: u64 = 1;
const MAX_VECTORS: u64 = ivshm_proto::v0::MAX_VECTORS as u64;
/// Set in the environment of the re-executed daemon process.
const DAEMON_CHILD_ENV: &str = "IVSHM_SERVER_DAEMON_CHILD";
/// What the daemon process writes to its readiness pipe (its stdin) once it serves.
const READY: &[u8] = b"ivshmem-server: ready\n";

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
    /// Warnings QEMU prints while it parses (a unit on a hexadecimal size).
    warnings: Vec<String>,
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
            warnings: Vec::new(),
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
    /// A bad value: message, "Try '... -h'" on stderr, exit 1 (after the warnings printed so far).
    Invalid {
        warnings: Vec<String>,
        message: String,
    },
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
                if let Err(message) = apply_option(&mut out, c, &value) {
                    return Parsed::Invalid {
                        warnings: out.warnings,
                        message,
                    };
                }
            }
            Ok((_, None)) => {}
            Err(e) => return Parsed::Usage(e.to_string()),
        }
    }
    let invalid = |out: Args, message: &str| Parsed::Invalid {
        warnings: out.warnings,
        message: message.to_string(),
    };
    if out.vectors > MAX_VECTORS {
        return invalid(
            out,
            &format!("too many requested vectors (max is {MAX_VECTORS})"),
        );
    }
    if out.verbose && !out.foreground {
        return invalid(out, "cannot use verbose in daemon mode");
    }
    // QEMU serves a 1-byte object for 0 (and for multiples of 4 GiB): refused here.
    if out.size == 0 {
        return invalid(out, "the shared memory size (-l) must be greater than 0");
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
            let size = qemu_numbers::parse_size(value).map_err(|e| e.message("shm_size", value))?;
            if size.hex_with_unit {
                out.warnings.push(qemu_numbers::hex_unit_warning(value));
            }
            out.size = size.bytes;
        }
        'n' => {
            out.vectors = qemu_numbers::parse_uint_full(value).ok_or("cannot parse n_vectors")?;
        }
        _ => {}
    }
    Ok(())
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
         \x20    suffixes K, M and G can be used, e.g. 1K means 1024\n\
         \x20    default {DEFAULT_SIZE}\n\
         \x20 -n <nvectors>: number of vectors\n\
         \x20    default {DEFAULT_VECTORS}\n"
    )
}

/// Prints a line on stdout; a closed stdout is not an error (QEMU ignores it too).
fn say(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(line);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// The mode QEMU's socket gets from `bind`: 0777 less the umask.
fn socket_mode_from_umask() -> u32 {
    use rustix::fs::Mode;
    let umask = rustix::process::umask(Mode::empty());
    rustix::process::umask(umask);
    0o777 & !umask.bits()
}

fn config(args: &Args) -> ServerConfig {
    let backend = match &args.memory {
        // QEMU 7.2 removes the object when it stops (`shm_unlink` in ivshmem_server_close).
        Memory::Shm(name) => BackendKind::PosixShm {
            name: name.clone(),
            keep: false,
        },
        Memory::Dir(dir) => BackendKind::DirFile { dir: dir.clone() },
    };
    let mut listener = ListenerConfig::new(&args.socket);
    listener.mode = socket_mode_from_umask();
    ServerConfig::single(RegionConfig {
        name: "default".to_string(),
        listener,
        memory: MemoryConfig {
            backend,
            size: args.size,
            pow2: Pow2Policy::RoundUp,
        },
        vectors: usize::try_from(args.vectors).unwrap_or(usize::MAX),
    })
}

/// What `-v` prints about peers, in the order QEMU's loop prints it: per wake-up, `accept()=N`
/// and `new peer id = N` for a connection, then `peer->sock_fd=N` for every peer in join order,
/// each followed by `free peer N` if it left. QEMU accepts one connection per wake-up, so a
/// second one accepted in the same wake-up starts a new listing.
#[derive(Debug, Default)]
struct PeerLines {
    /// Peers in join order: id and socket fd.
    peers: Vec<(u16, RawFd)>,
    /// Peers removed since the last listing.
    gone: Vec<u16>,
    /// A connection was accepted since the last listing.
    accepted: bool,
    /// Something to list.
    changed: bool,
}

impl PeerLines {
    fn list(&mut self) {
        let gone = std::mem::take(&mut self.gone);
        self.peers.retain(|&(id, fd)| {
            say(format_args!("peer->sock_fd={fd}"));
            let left = gone.contains(&id);
            if left {
                say(format_args!("free peer {id}"));
            }
            !left
        });
        self.accepted = false;
        self.changed = false;
    }
}

/// The observer that prints [`PeerLines`] (shared with `main`, which prints the last ones).
#[derive(Debug, Clone, Default)]
struct Verbose(Arc<Mutex<PeerLines>>);

impl Verbose {
    fn lines(&self) -> std::sync::MutexGuard<'_, PeerLines> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Observer for Verbose {
    fn accepted(&mut self, _region: &str, socket: BorrowedFd<'_>) {
        let mut lines = self.lines();
        if lines.accepted {
            lines.list();
        }
        say(format_args!("accept()={}", socket.as_raw_fd()));
        lines.accepted = true;
        lines.changed = true;
    }

    fn joined(&mut self, _region: &str, id: u16, socket: BorrowedFd<'_>) {
        say(format_args!("new peer id = {id}"));
        self.lines().peers.push((id, socket.as_raw_fd()));
    }

    fn removed(&mut self, _region: &str, id: u16, _reason: &RemovalReason) {
        let mut lines = self.lines();
        lines.gone.push(id);
        lines.changed = true;
    }

    fn wakeup_handled(&mut self) {
        let mut lines = self.lines();
        if lines.changed {
            lines.list();
        }
    }
}

/// The errno QEMU's `bind` would have seen where ours refused the path.
fn listener_errno(error: &ListenerError) -> Option<Errno> {
    match error {
        ListenerError::InUse(_) | ListenerError::NotASocket(_) => Some(Errno::ADDRINUSE),
        ListenerError::NoDirectory { .. } => Some(Errno::NOENT),
        ListenerError::Sys { errno, .. } => Some(*errno),
        ListenerError::Group(_) | ListenerError::PathTooLong(_) => None,
    }
}

/// Prints what QEMU prints when `ivshmem_server_start` fails at the same step.
fn report_start_failure(args: &Args, progname: &str, error: &ServerError) {
    let memory_name = match &args.memory {
        Memory::Shm(name) => name.clone(),
        Memory::Dir(dir) => dir.display().to_string(),
    };
    let socket = args.socket.display();
    match error {
        ServerError::Memory { error, .. } => match error {
            BackendError::Resize { errno, .. } => {
                eprintln!("ftruncate({memory_name}) failed: {}", strerror(*errno));
            }
            BackendError::Sys { errno, .. } => {
                eprintln!("cannot open shm file {memory_name}: {}", strerror(*errno));
            }
            other => eprintln!("cannot open shm file {memory_name}: {other}"),
        },
        // A path longer than a socket address holds is refused before anything is created (by
        // the configuration's check, or the listener's); QEMU refuses it when it binds.
        ServerError::Config(ConfigError::SocketPath(_))
        | ServerError::Listener(ListenerError::PathTooLong(_)) => {
            if args.verbose {
                say(format_args!("create & bind socket {socket}"));
                say(format_args!("could not copy unix socket path"));
            }
        }
        ServerError::Listener(e) => {
            if args.verbose {
                say(format_args!("create & bind socket {socket}"));
                if let Some(errno) = listener_errno(e) {
                    say(format_args!(
                        "cannot connect to {socket}: {}",
                        strerror(errno)
                    ));
                }
            }
        }
        other => {
            eprintln!("{progname}: {other}");
            return;
        }
    }
    eprintln!("cannot bind");
}

/// The daemon's readiness pipe: its stdin, set up by [`spawn_daemon`].
fn signal_ready() {
    let stdin = std::io::stdin();
    // The launcher may be gone; the daemon serves all the same.
    let _ = rustix::io::write(stdin.as_fd(), READY);
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = rustix::stdio::dup2_stdin(&null);
    }
}

/// Serves in this process until SIGTERM, SIGINT or SIGHUP. In daemon mode it is already the
/// re-executed process: it becomes a session leader, and once serving writes the pid file and
/// signals readiness.
fn serve(args: &Args, progname: &str, daemon: bool) -> ExitCode {
    if daemon {
        if let Err(e) = rustix::process::setsid() {
            eprintln!("cannot daemonize: {}", strerror(e));
            return ExitCode::FAILURE;
        }
    }
    let signals = match SignalPipes::install() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("failed to add signal handler; sigaction: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.verbose {
        match &args.memory {
            Memory::Shm(name) => say(format_args!("Using POSIX shared memory: {name}")),
            Memory::Dir(dir) => say(format_args!(
                "Using file-backed shared memory: {}",
                dir.display()
            )),
        }
    }
    let mut server = match Server::new(config(args)) {
        Ok(server) => server,
        Err(e) => {
            report_start_failure(args, progname, &e);
            return ExitCode::FAILURE;
        }
    };
    if args.verbose {
        say(format_args!(
            "create & bind socket {}",
            args.socket.display()
        ));
    }
    let verbose = Verbose::default();
    if args.verbose {
        server.set_observer(verbose.clone());
    }
    let mut pid_file = None;
    if daemon {
        match PidFile::create(&args.pid_file) {
            Ok(file) => pid_file = Some(file),
            Err(e) => {
                let why = match e.error.raw_os_error() {
                    Some(code) => strerror(Errno::from_raw_os_error(code)),
                    None => e.error.to_string(),
                };
                eprintln!("cannot write pid file: {why}");
                return ExitCode::FAILURE;
            }
        }
        signal_ready();
    }
    let stop = [
        Control {
            fd: signals.stop_fd(),
            action: ControlAction::Stop,
        },
        Control {
            fd: signals.status_fd(),
            action: ControlAction::Stop,
        },
    ];
    let result = server.run_until(&stop);
    if let Err(e) = &result {
        eprintln!("{progname}: {e}");
    }
    say(format_args!("server disconnected"));
    if args.verbose {
        say(format_args!("close server"));
        for &(id, _) in &verbose.lines().peers {
            say(format_args!("free peer {id}"));
        }
    }
    server.remove_all_peers();
    drop(server);
    drop(pid_file);
    ExitCode::SUCCESS
}

/// Starts the daemon (this program again, in a new session, with the same stdout and stderr)
/// and waits until it serves: its stdin is a pipe it writes [`READY`] to.
fn spawn_daemon(progname: &str) -> ExitCode {
    let failed = |what: &dyn std::fmt::Display| {
        eprintln!("cannot daemonize: {what}");
        ExitCode::FAILURE
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return failed(&e),
    };
    let (ready_read, ready_write): (OwnedFd, OwnedFd) =
        match rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC) {
            Ok(pipe) => pipe,
            Err(e) => return failed(&strerror(e)),
        };
    let child = Command::new(exe)
        .arg0(progname)
        .args(std::env::args_os().skip(1))
        .env(DAEMON_CHILD_ENV, "1")
        .stdin(Stdio::from(ready_write))
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => return failed(&e),
    };
    // The daemon writes the ready line, then puts /dev/null on its stdin: EOF for us (the
    // Command's copy of the write end is gone with it).
    let mut got = Vec::new();
    let _ = std::fs::File::from(ready_read).read_to_end(&mut got);
    if got == READY {
        return ExitCode::SUCCESS;
    }
    // It failed (and said why on the stderr it shares with us).
    let _ = child.wait();
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let progname = argv
        .first()
        .cloned()
        .unwrap_or_else(|| "ivshmem-server".to_string());
    let daemon_child = std::env::var_os(DAEMON_CHILD_ENV).is_some();
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
        Parsed::Invalid { warnings, message } => {
            for warning in warnings {
                eprintln!("{warning}");
            }
            eprintln!("{message}");
            eprintln!("Try '{progname} -h' for more information.");
            return ExitCode::FAILURE;
        }
    };
    if !daemon_child {
        for warning in &args.warnings {
            eprintln!("{warning}");
        }
    }
    // QEMU's program prints only its own lines: logs only when RUST_LOG asks for them.
    dropin::init_logging("off");
    if !args.foreground && !daemon_child {
        return spawn_daemon(&progname);
    }
    serve(&args, &progname, daemon_child && !args.foreground)
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

    fn invalid(message: &str) -> Parsed {
        Parsed::Invalid {
            warnings: Vec::new(),
            message: message.to_string(),
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
        assert_eq!(run(&["-F", "-l", "1.5M"]).size, 3 << 19);
        assert_eq!(run(&["-Fn", "8"]).vectors, 8);
        assert_eq!(run(&["-F", "-n", "0"]).vectors, 0);
        assert_eq!(run(&["-F", "-n0x10"]).vectors, 16);
        assert_eq!(run(&["-F", "-n", "010"]).vectors, 8);
        assert_eq!(run(&["-F", "-n", " +2"]).vectors, 2);
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
        assert_eq!(parse(&["-v"]), invalid("cannot use verbose in daemon mode"));
        assert_eq!(
            parse(&["-F", "-n", "65"]),
            invalid("too many requested vectors (max is 64)")
        );
        assert_eq!(parse(&["-F", "-n", "x"]), invalid("cannot parse n_vectors"));
        assert_eq!(
            parse(&["-F", "-n", "-1"]),
            invalid("cannot parse n_vectors")
        );
        assert_eq!(
            parse(&["-F", "-l", "16E"]),
            invalid("Value '16E' is out of range for parameter 'shm_size'")
        );
        assert!(
            matches!(parse(&["-F", "-l", "4MiB"]), Parsed::Invalid { message, .. } if message.starts_with("Parameter 'shm_size' expects"))
        );
    }

    #[test]
    fn a_unit_on_a_hex_size_warns_like_qemu() {
        let a = run(&["-F", "-l", "0x10K"]);
        assert_eq!(a.size, 16 << 10);
        assert_eq!(
            a.warnings,
            ["warning: Using a multiplier suffix on hex numbers is deprecated: 0x10K"]
        );
        // Printed before the error that stops the parse.
        assert_eq!(
            parse(&["-F", "-l", "0x10K", "-n", "x"]),
            Parsed::Invalid {
                warnings: vec![
                    "warning: Using a multiplier suffix on hex numbers is deprecated: 0x10K".into()
                ],
                message: "cannot parse n_vectors".into()
            }
        );
    }

    #[test]
    fn config_removes_the_shm_object_rounds_up_and_follows_the_umask() {
        let c = config(&run(&["-F", "-l", "3M", "-n", "2"]));
        let r = &c.regions[0];
        assert_eq!(
            r.memory.backend,
            BackendKind::PosixShm {
                name: "ivshmem".into(),
                keep: false
            }
        );
        assert_eq!(r.memory.pow2, Pow2Policy::RoundUp);
        assert_eq!(r.vectors, 2);
        let umask = rustix::process::umask(rustix::fs::Mode::empty());
        rustix::process::umask(umask);
        assert_eq!(r.listener.mode, 0o777 & !umask.bits());
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
