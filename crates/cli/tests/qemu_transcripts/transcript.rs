//! Running QEMU 7.2's `ivshmem-server`/`ivshmem-client` and ours in the same scripted scenario
//! and comparing what they print, line for line.
//!
//! A [`Transcript`] is every stream of every process of one run (stdout, stderr, how it
//! ended), after [`Normalizer`] replaced what legitimately differs between runs: the run's
//! socket path, directory and shm name, the server's fd numbers (ours has an epoll instance and
//! signal pipes open before the first peer; each distinct number becomes `<fd1>`, `<fd2>`, ... in
//! order of appearance), QEMU's "example code" banner, and how many times a client retried
//! while no server was there. Client fd numbers are compared as they are: ours open the same
//! fds in the same order as QEMU's.
//!
//! Every wait is on something the programs print or do (a prompt, a line, a listening socket,
//! the eventfds a client holds), bounded by [`WAIT_GUARD`]; none is a timing assertion.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ivshm_e2e::QemuTools;
use ivshm_test_support::process::{HostProcess, Signal, Stream};
use ivshm_test_support::WAIT_GUARD;

/// QEMU's server prints this first; ours does not (documented in docs/cli.md).
pub const BANNER: &str = "*** Example code, do not use in production ***";
/// What both clients print on stderr before each new connection attempt.
pub const RETRY: &str = "cannot connect to server, retry in 1 second";

/// Whose program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Impl {
    Qemu,
    Ours,
}

impl Impl {
    pub fn name(self) -> &'static str {
        match self {
            Impl::Qemu => "qemu",
            Impl::Ours => "ours",
        }
    }
}

/// Which programs play server and client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pairing {
    pub server: Impl,
    pub client: Impl,
}

impl Pairing {
    /// QEMU's server with QEMU's client: the reference.
    pub const REFERENCE: Pairing = Pairing {
        server: Impl::Qemu,
        client: Impl::Qemu,
    };

    /// Every pairing, the reference first.
    pub const ALL: [Pairing; 4] = [
        Pairing::REFERENCE,
        Pairing {
            server: Impl::Qemu,
            client: Impl::Ours,
        },
        Pairing {
            server: Impl::Ours,
            client: Impl::Qemu,
        },
        Pairing {
            server: Impl::Ours,
            client: Impl::Ours,
        },
    ];

    pub fn label(self) -> String {
        format!(
            "{} server + {} client",
            self.server.name(),
            self.client.name()
        )
    }
}

/// The programs under comparison.
#[derive(Debug, Clone)]
pub struct Programs {
    pub qemu: QemuTools,
}

impl Programs {
    /// `ivshmem-server` of `which`: QEMU's with its stdout line-buffered (`stdbuf -oL`), so
    /// its lines can be followed live.
    pub fn server(&self, which: Impl) -> Command {
        match which {
            Impl::Qemu => QemuTools::line_buffered(&self.qemu.server),
            Impl::Ours => Command::new(env!("CARGO_BIN_EXE_ivshmem-server")),
        }
    }

    /// `ivshmem-client` of `which` (QEMU's line-buffered).
    pub fn client(&self, which: Impl) -> Command {
        match which {
            Impl::Qemu => QemuTools::line_buffered(&self.qemu.client),
            Impl::Ours => Command::new(env!("CARGO_BIN_EXE_ivshmem-client")),
        }
    }

    /// The program itself, run as `argv[0] = name` (it shows in usage texts).
    pub fn direct(&self, which: Impl, name: &str) -> Command {
        use std::os::unix::process::CommandExt;
        let path: PathBuf = match (which, name) {
            (Impl::Qemu, "ivshmem-server") => self.qemu.server.clone(),
            (Impl::Qemu, _) => self.qemu.client.clone(),
            (Impl::Ours, "ivshmem-server") => env!("CARGO_BIN_EXE_ivshmem-server").into(),
            (Impl::Ours, _) => env!("CARGO_BIN_EXE_ivshmem-client").into(),
        };
        let mut command = Command::new(path);
        command.arg0(name).env_remove("RUST_LOG");
        command
    }
}

/// A directory, socket path and shm name of one run; removed on drop.
#[derive(Debug)]
pub struct RunDir {
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub shm: String,
}

impl RunDir {
    pub fn new(tag: &str) -> RunDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("ivshm-tr-{tag}-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        RunDir {
            sock: dir.join("sock"),
            dir,
            shm: name,
        }
    }

    pub fn sock_arg(&self) -> String {
        self.sock.to_string_lossy().into_owned()
    }

    pub fn shm_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/shm/{}", self.shm))
    }

    pub fn normalizer(&self) -> Normalizer {
        Normalizer {
            replacements: vec![
                (self.sock_arg(), "<socket>".to_string()),
                (self.dir.to_string_lossy().into_owned(), "<dir>".to_string()),
                (self.shm.clone(), "<shm>".to_string()),
            ],
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = rustix::shm::unlink(self.shm.as_str());
    }
}

pub use ivshm_test_support::fds::wait_listening;

/// How many eventfds process `pid` holds.
pub fn eventfds_of(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|target| target.to_string_lossy() == "anon_inode:[eventfd]")
        .count()
}

/// A client program with its stdin scripted.
#[derive(Debug)]
pub struct Client {
    pub name: String,
    pub process: HostProcess,
}

impl Client {
    /// Starts `command` (a client) with `args`.
    pub fn start(name: &str, mut command: Command, args: &[&str]) -> Client {
        command.args(args).env_remove("RUST_LOG");
        Client {
            name: name.to_string(),
            process: HostProcess::spawn_with_stdin(name, command).unwrap(),
        }
    }

    /// How many times `needle` has appeared on `stream` so far.
    pub fn count(&self, stream: Stream, needle: &str) -> usize {
        self.process.output(stream).matches(needle).count()
    }

    /// Waits until `needle` has appeared `n` times on `stream` in all.
    pub fn wait_count(&self, stream: Stream, needle: &str, n: usize) {
        self.process
            .wait_output(stream, &format!("{n} × {needle:?}"), WAIT_GUARD, |text| {
                text.matches(needle).count() >= n
            })
            .unwrap();
    }

    /// Waits until it holds `n` eventfds: every vector message it was sent has been handled
    /// (QEMU's client takes one message per wake-up, after stdin).
    pub fn wait_eventfds(&self, n: usize) {
        let deadline = Instant::now() + WAIT_GUARD;
        while eventfds_of(self.process.pid()) != n {
            assert!(
                Instant::now() < deadline,
                "{}: holds {} eventfds, not {n}\n{}",
                self.name,
                eventfds_of(self.process.pid()),
                self.process.failure_context()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Waits for the `n`-th connection (`listen on server socket`).
    pub fn wait_connected(&self, n: usize) {
        self.wait_count(Stream::Stdout, "listen on server socket ", n);
    }

    /// Writes `bytes` to its stdin and waits until it has printed `prompts` more prompts.
    pub fn send_raw(&mut self, bytes: &[u8], prompts: usize) {
        let before = self.count(Stream::Stdout, "cmd> ");
        let stdin = self.process.stdin().expect("stdin is open");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
        self.wait_count(Stream::Stdout, "cmd> ", before + prompts);
    }

    /// Sends one command line and waits for the prompt that follows it.
    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes(), 1);
    }

    /// Waits until it has printed `n` prompts in all.
    pub fn wait_output_count_prompts(&self, n: usize) {
        self.wait_count(Stream::Stdout, "cmd> ", n);
    }

    /// Waits until it has printed `n` notifications in all.
    pub fn wait_notifications(&self, n: usize) {
        self.wait_count(Stream::Stdout, "receive notification from ", n);
    }

    /// Sends SIGTERM and waits until it is gone.
    pub fn terminate(&mut self) -> ExitStatus {
        self.process.signal(Signal::TERM);
        self.process.wait_exit(WAIT_GUARD).unwrap()
    }
}

/// Starts a server program with `args`.
pub fn start_server(name: &str, mut command: Command, args: &[&str]) -> HostProcess {
    command.args(args).env_remove("RUST_LOG");
    HostProcess::spawn(name, command).unwrap()
}

/// Stops a server with SIGTERM and waits for it to exit (within [`WAIT_GUARD`]). QEMU's server
/// checks its quit flag before `select` with the signal unblocked, so a SIGTERM that lands
/// between the check and the call (while it handles a peer's event) is seen only at the next
/// event: the signal is sent again every second until the server exits (each one interrupts
/// `select`; ours takes a repeated one as the first).
pub fn stop_server(server: &mut HostProcess) -> ExitStatus {
    let deadline = Instant::now() + WAIT_GUARD;
    loop {
        server.signal(Signal::TERM);
        match server.wait_exit(std::time::Duration::from_secs(1)) {
            Ok(status) => return status,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
    }
}

/// How a process ended, comparable across implementations.
pub fn ending(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => format!("{status}"),
    }
}

/// Replaces what legitimately differs between runs and implementations.
#[derive(Debug, Clone)]
pub struct Normalizer {
    replacements: Vec<(String, String)>,
}

impl Normalizer {
    /// With no run-specific names (runs that use none).
    pub fn plain() -> Normalizer {
        Normalizer {
            replacements: Vec::new(),
        }
    }

    fn names(&self, text: &str) -> String {
        self.replacements
            .iter()
            .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
    }

    /// A server's stdout: names, no banner, fd numbers of `accept()=` and `peer->sock_fd=` as
    /// `<fdN>` in order of appearance.
    pub fn server_stdout(&self, text: &str) -> String {
        let mut fds: HashMap<String, usize> = HashMap::new();
        let mut out = String::new();
        for line in self.names(text).split_inclusive('\n') {
            if line.trim_end() == BANNER {
                continue;
            }
            let mut line = line.to_string();
            for prefix in ["accept()=", "peer->sock_fd="] {
                if let Some(number) = line.strip_prefix(prefix).map(str::trim_end) {
                    if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) {
                        let next = fds.len() + 1;
                        let n = *fds.entry(number.to_string()).or_insert(next);
                        line = format!("{prefix}<fd{n}>\n");
                    }
                }
            }
            out.push_str(&line);
        }
        out
    }

    /// A client's stdout: names, and each run of failed connection attempts (what a client
    /// prints while no server is there, as many times as it happened to retry) as one
    /// `<failed connection attempts>` line.
    pub fn client_stdout(&self, text: &str) -> String {
        let text = self.names(text);
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let connect = "connect to client <socket>\n";
        let failure = |l: &str| {
            l.starts_with("cannot connect to ")
                || l.starts_with("cannot read message: ")
                || l.starts_with("cannot read from server")
                || l.starts_with("could not copy unix socket path")
        };
        let mut out = String::new();
        let mut i = 0;
        while i < lines.len() {
            // The first attempt follows the first prompt on its line.
            let attempt_fails = |at: usize| {
                lines
                    .get(at)
                    .is_some_and(|l| l.strip_prefix("cmd> ").unwrap_or(l) == connect)
                    && lines.get(at + 1).is_some_and(|l| failure(l))
            };
            if attempt_fails(i) {
                if lines[i].starts_with("cmd> ") {
                    out.push_str("cmd> ");
                }
                while attempt_fails(i) {
                    i += 1;
                    while lines.get(i).is_some_and(|l| failure(l)) {
                        i += 1;
                    }
                }
                out.push_str("<failed connection attempts>\n");
                continue;
            }
            out.push_str(lines[i]);
            i += 1;
        }
        out
    }

    /// A client's stderr: names, and each run of retry lines as one.
    pub fn client_stderr(&self, text: &str) -> String {
        let mut out = String::new();
        let mut last = "";
        for line in text.split_inclusive('\n') {
            if line.trim_end() == RETRY && last.trim_end() == RETRY {
                continue;
            }
            out.push_str(line);
            last = line;
        }
        self.names(&out)
    }

    /// Anything else: the names.
    pub fn other(&self, text: &str) -> String {
        self.names(text)
    }
}

/// Everything the processes of one run printed, normalized, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transcript {
    /// (process and stream, text).
    pub parts: Vec<(String, String)>,
}

impl Transcript {
    pub fn add(&mut self, what: &str, text: String) {
        self.parts.push((what.to_string(), text));
    }

    /// A server: its stdout, stderr and ending.
    pub fn add_server(
        &mut self,
        label: &str,
        process: &HostProcess,
        status: ExitStatus,
        n: &Normalizer,
    ) {
        self.add(
            &format!("{label} stdout"),
            n.server_stdout(&process.output(Stream::Stdout)),
        );
        self.add(
            &format!("{label} stderr"),
            n.other(&process.output(Stream::Stderr)),
        );
        self.add(&format!("{label} ending"), ending(status));
    }

    /// A client: its stdout, stderr and ending.
    pub fn add_client(&mut self, label: &str, client: &Client, status: ExitStatus, n: &Normalizer) {
        let p = &client.process;
        self.add(
            &format!("{label} stdout"),
            n.client_stdout(&p.output(Stream::Stdout)),
        );
        self.add(
            &format!("{label} stderr"),
            n.client_stderr(&p.output(Stream::Stderr)),
        );
        self.add(&format!("{label} ending"), ending(status));
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (what, text) in &self.parts {
            let _ = writeln!(out, "--- {what} ---");
            out.push_str(text);
            if !text.ends_with('\n') {
                out.push_str("⏎ (no newline)\n");
            }
        }
        out
    }
}

/// Panics with both transcripts and the first differing line unless they are equal.
pub fn assert_same(what: &str, reference: &Transcript, other: &Transcript) {
    if reference == other {
        return;
    }
    let (a, b) = (reference.render(), other.render());
    let first = a
        .lines()
        .zip(b.lines())
        .position(|(x, y)| x != y)
        .unwrap_or_else(|| a.lines().count().min(b.lines().count()));
    panic!(
        "{what} differs from QEMU's, first at transcript line {}:\n  qemu: {:?}\n  this: {:?}\n\n=== QEMU (reference) ===\n{a}\n=== this pairing ===\n{b}",
        first + 1,
        a.lines().nth(first).unwrap_or("<end>"),
        b.lines().nth(first).unwrap_or("<end>"),
    );
}

/// Runs `scenario` for every pairing (in parallel) and checks each against the reference.
pub fn compare_pairings(
    programs: &Programs,
    scenario: impl Fn(&Programs, Pairing) -> Transcript + Sync,
) {
    let results: Vec<(Pairing, Transcript)> = std::thread::scope(|scope| {
        let handles: Vec<_> = Pairing::ALL
            .iter()
            .map(|&pairing| {
                let scenario = &scenario;
                scope.spawn(move || (pairing, scenario(programs, pairing)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let reference = &results[0].1;
    eprintln!(
        "reference transcript (QEMU {}):\n{}",
        programs.qemu.version,
        reference.render()
    );
    for (pairing, transcript) in &results[1..] {
        assert_same(&pairing.label(), reference, transcript);
    }
}

/// What one program run printed and how it ended, normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub ending: String,
}

impl Outcome {
    /// Runs `command` to its end (stdin `/dev/null`).
    pub fn run(name: &str, command: Command, n: &Normalizer) -> Outcome {
        let mut process = HostProcess::spawn(name, command).unwrap();
        let status = process.wait_exit(WAIT_GUARD).unwrap();
        Outcome::of(&process, status, n)
    }

    /// Runs a server `command`, waits until it listens at `socket` (or, with `ready`, until it
    /// prints that stdout line), stops it with SIGTERM.
    pub fn serve(
        name: &str,
        command: Command,
        socket: &Path,
        ready: Option<&str>,
        n: &Normalizer,
    ) -> Outcome {
        let mut process = HostProcess::spawn(name, command).unwrap();
        match ready {
            Some(line) => drop(process.wait_stdout_line(line, WAIT_GUARD).unwrap()),
            None => {
                let deadline = Instant::now() + WAIT_GUARD;
                while !ivshm_test_support::fds::is_listening(socket) {
                    let ended = process.wait_exit(std::time::Duration::from_millis(10));
                    assert!(
                        ended.is_err() && Instant::now() < deadline,
                        "{name}: does not serve at {} ({ended:?})\n{}",
                        socket.display(),
                        process.failure_context()
                    );
                }
            }
        }
        let status = stop_server(&mut process);
        Outcome::of(&process, status, n)
    }

    fn of(process: &HostProcess, status: ExitStatus, n: &Normalizer) -> Outcome {
        Outcome {
            stdout: n.server_stdout(&process.output(Stream::Stdout)),
            stderr: n.other(&process.output(Stream::Stderr)),
            ending: ending(status),
        }
    }
}
