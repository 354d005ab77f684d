//! Child processes with captured output: each of stdout and stderr is read line by line by a
//! thread, and tests wait for lines matching a predicate, for the next line, or for the exit.
//! Every wait is bounded and fails with the last lines of both streams. Killed on drop, and
//! when the test process dies ([`orphan`]).

use std::io::Read;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use rustix::process::Signal;
use rustix::process::{kill_process, Pid};

use crate::orphan;

/// How many lines of each stream failure messages show.
const TAIL_LINES: usize = 30;

/// A child process failed or did not print what was expected.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum HostError {
    /// {name}: cannot start {command}: {error}
    ///
    /// The program could not be started.
    Spawn {
        /// The process's name.
        name: String,
        /// The command.
        command: String,
        /// The underlying error.
        error: std::io::Error,
    },
    /// {name}: {what}: {error}
    ///
    /// Waiting for the process failed.
    Io {
        /// The process's name.
        name: String,
        /// What was being done.
        what: String,
        /// The underlying error.
        error: std::io::Error,
    },
    /// {name}: timed out after {timeout:?} waiting for {what}
    ///
    /// A wait timed out.
    /// Then, after a line break, `{context}`. A doc comment cannot hold the line break, so
    /// `#[displaydoc]` gives the message.
    #[displaydoc("{name}: timed out after {timeout:?} waiting for {what}\n{context}")]
    Timeout {
        /// The process's name.
        name: String,
        /// What was awaited.
        what: String,
        /// How long was waited.
        timeout: Duration,
        /// The last output lines.
        context: String,
    },
    /// {name}: output ended while waiting for {what}
    ///
    /// The output stream ended (the process exited) before the awaited line.
    /// Then, after a line break, `{context}`. A doc comment cannot hold the line break, so
    /// `#[displaydoc]` gives the message.
    #[displaydoc("{name}: output ended while waiting for {what}\n{context}")]
    Ended {
        /// The process's name.
        name: String,
        /// What was awaited.
        what: String,
        /// The last output lines.
        context: String,
    },
    /// {name}: exited with {status}
    ///
    /// The process exited unsuccessfully.
    /// Then, after a line break, `{context}`. A doc comment cannot hold the line break, so
    /// `#[displaydoc]` gives the message.
    #[displaydoc("{name}: exited with {status}\n{context}")]
    Failed {
        /// The process's name.
        name: String,
        /// Its exit status.
        status: String,
        /// The last output lines.
        context: String,
    },
}

/// One captured line and whether a wait has already returned it.
#[derive(Debug)]
struct Line {
    text: String,
    taken: bool,
}

#[derive(Debug, Default)]
struct LinesState {
    lines: Vec<Line>,
    /// Everything read so far, a line not yet ended included (a prompt without a newline).
    raw: Vec<u8>,
    /// Where the line being read starts in `raw`.
    line_start: usize,
    closed: bool,
}

/// The lines of one output stream, filled by a reader thread.
#[derive(Debug, Default)]
struct LineBuffer {
    state: Mutex<LinesState>,
    changed: Condvar,
}

enum LineWait {
    Found(String),
    Timeout,
    Ended,
}

impl LineBuffer {
    fn lock(&self) -> MutexGuard<'_, LinesState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends what was read; every line it ends becomes a [`Line`].
    fn append(&self, bytes: &[u8]) {
        let mut state = self.lock();
        state.raw.extend_from_slice(bytes);
        while let Some(end) = state.raw[state.line_start..]
            .iter()
            .position(|&b| b == b'\n')
        {
            let end = state.line_start + end;
            let text = String::from_utf8_lossy(&state.raw[state.line_start..end])
                .trim_end_matches('\r')
                .to_string();
            state.lines.push(Line { text, taken: false });
            state.line_start = end + 1;
        }
        drop(state);
        self.changed.notify_all();
    }

    fn close(&self) {
        let mut state = self.lock();
        if state.line_start < state.raw.len() {
            let text = String::from_utf8_lossy(&state.raw[state.line_start..]).to_string();
            state.lines.push(Line { text, taken: false });
            state.line_start = state.raw.len();
        }
        state.closed = true;
        drop(state);
        self.changed.notify_all();
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock().raw).into_owned()
    }

    /// Waits until `found` finds something in the state (checked now and after every change),
    /// or the stream ends, or `timeout` passes.
    fn wait_for(
        &self,
        timeout: Duration,
        mut found: impl FnMut(&mut LinesState) -> Option<String>,
    ) -> LineWait {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(text) = found(&mut state) {
                return LineWait::Found(text);
            }
            if state.closed {
                return LineWait::Ended;
            }
            let now = Instant::now();
            if now >= deadline {
                return LineWait::Timeout;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map_or_else(|poisoned| poisoned.into_inner().0, |(guard, _)| guard);
        }
    }

    /// Waits until everything read so far satisfies `wanted`; returns it.
    fn wait_text(&self, timeout: Duration, wanted: &mut dyn FnMut(&str) -> bool) -> LineWait {
        self.wait_for(timeout, |state| {
            let text = String::from_utf8_lossy(&state.raw);
            wanted(&text).then(|| text.into_owned())
        })
    }

    fn snapshot(&self) -> Vec<String> {
        self.lock().lines.iter().map(|l| l.text.clone()).collect()
    }

    fn tail(&self) -> String {
        let lines = self.snapshot();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    }

    /// Waits for the first line not yet taken that satisfies `wanted`, and takes it.
    fn take_matching(&self, timeout: Duration, wanted: &mut dyn FnMut(&str) -> bool) -> LineWait {
        self.wait_for(timeout, |state| {
            let line = state
                .lines
                .iter_mut()
                .find(|l| !l.taken && wanted(&l.text))?;
            line.taken = true;
            Some(line.text.clone())
        })
    }

    /// Waits until the stream has ended.
    fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !state.closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map_or_else(|poisoned| poisoned.into_inner().0, |(guard, _)| guard);
        }
        true
    }
}

fn spawn_line_reader(
    stream: impl Read + Send + 'static,
    buffer: Arc<LineBuffer>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("test-lines".into())
        .spawn(move || {
            let mut stream = stream;
            let mut chunk = [0u8; 4096];
            loop {
                match stream.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => buffer.append(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            buffer.close();
        })
}

/// Which output stream of a [`HostProcess`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A process on the host whose stdout and stderr lines are captured.
#[derive(Debug)]
pub struct HostProcess {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<LineBuffer>,
    stderr: Arc<LineBuffer>,
    readers: Vec<JoinHandle<()>>,
    exit_status: Option<ExitStatus>,
}

impl HostProcess {
    /// Starts `command` with piped stdout and stderr (stdin is `/dev/null`); `name` is used
    /// in messages. The process is killed if the test process dies.
    pub fn spawn(name: &str, command: Command) -> Result<Self, HostError> {
        Self::spawn_with(name, command, Stdio::null())
    }

    /// As [`spawn`](Self::spawn), with stdin a pipe the test writes to ([`stdin`](Self::stdin)).
    pub fn spawn_with_stdin(name: &str, command: Command) -> Result<Self, HostError> {
        Self::spawn_with(name, command, Stdio::piped())
    }

    fn spawn_with(name: &str, mut command: Command, stdin: Stdio) -> Result<Self, HostError> {
        let description = format!("{command:?}");
        eprintln!("{name}: starting {description}");
        command
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = orphan::spawn(command).map_err(|error| HostError::Spawn {
            name: name.to_string(),
            command: description,
            error,
        })?;
        let stdout = Arc::new(LineBuffer::default());
        let stderr = Arc::new(LineBuffer::default());
        let pipes = (child.stdout.take(), child.stderr.take());
        let mut process = Self {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            stdout: Arc::clone(&stdout),
            stderr: Arc::clone(&stderr),
            readers: Vec::new(),
            exit_status: None,
        };
        let io = |error| HostError::Io {
            name: name.to_string(),
            what: "starting an output reader".into(),
            error,
        };
        if let (Some(out), Some(err)) = pipes {
            process
                .readers
                .push(spawn_line_reader(out, stdout).map_err(io)?);
            process
                .readers
                .push(spawn_line_reader(err, stderr).map_err(io)?);
        }
        Ok(process)
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The write end of its stdin, if it was started with
    /// [`spawn_with_stdin`](Self::spawn_with_stdin) (`None` after [`close_stdin`](Self::close_stdin)).
    pub fn stdin(&mut self) -> Option<&mut ChildStdin> {
        self.stdin.as_mut()
    }

    /// Closes its stdin (the program reads end-of-file).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Sends `signal` (ignored if the process has been reaped).
    pub fn signal(&self, signal: Signal) {
        if self.exit_status.is_some() {
            return;
        }
        if let Some(pid) = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw) {
            // The process may have exited already; a wait tells.
            let _ = kill_process(pid, signal);
        }
    }

    fn buffer(&self, stream: Stream) -> &LineBuffer {
        match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        }
    }

    /// All lines of `stream` captured so far (taken or not).
    pub fn lines(&self, stream: Stream) -> Vec<String> {
        self.buffer(stream).snapshot()
    }

    /// Everything `stream` has printed so far, as text, a last line without a newline (a prompt)
    /// included.
    pub fn output(&self, stream: Stream) -> String {
        self.buffer(stream).text()
    }

    /// Waits until everything `stream` has printed so far satisfies `wanted` (e.g. holds a
    /// prompt a number of times); returns that text.
    pub fn wait_output(
        &self,
        stream: Stream,
        what: &str,
        timeout: Duration,
        mut wanted: impl FnMut(&str) -> bool,
    ) -> Result<String, HostError> {
        let waited = self.buffer(stream).wait_text(timeout, &mut wanted);
        self.waited(waited, what, timeout)
    }

    /// A wait's outcome as a result: what was found, or the error naming `what`.
    fn waited(&self, wait: LineWait, what: &str, timeout: Duration) -> Result<String, HostError> {
        match wait {
            LineWait::Found(text) => Ok(text),
            LineWait::Timeout => Err(HostError::Timeout {
                name: self.name.clone(),
                what: what.to_string(),
                timeout,
                context: self.failure_context(),
            }),
            LineWait::Ended => Err(HostError::Ended {
                name: self.name.clone(),
                what: what.to_string(),
                context: self.failure_context(),
            }),
        }
    }

    /// The last captured lines of both streams, for failure messages.
    pub fn failure_context(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            self.stdout.tail(),
            self.name,
            self.stderr.tail()
        )
    }

    /// Waits for the first line of `stream` not returned by an earlier wait that satisfies
    /// `wanted`, marks it as returned, and returns it. Lines that do not match stay available
    /// to later waits, so events may be awaited in any order.
    pub fn wait_line(
        &self,
        stream: Stream,
        what: &str,
        timeout: Duration,
        mut wanted: impl FnMut(&str) -> bool,
    ) -> Result<String, HostError> {
        let waited = self.buffer(stream).take_matching(timeout, &mut wanted);
        self.waited(waited, what, timeout)
    }

    /// The first line of `stream` not returned by an earlier wait: reads a stream in order when
    /// every wait on it uses this.
    pub fn next_line(&self, stream: Stream, timeout: Duration) -> Result<String, HostError> {
        self.wait_line(stream, "the next line", timeout, |_| true)
    }

    /// [`wait_line`](Self::wait_line) for a line that contains `needle`.
    pub fn wait_line_containing(
        &self,
        stream: Stream,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, HostError> {
        self.wait_line(
            stream,
            &format!("a line containing {needle:?}"),
            timeout,
            |l| l.contains(needle),
        )
    }

    /// Waits for the `listening on PATH` line `ivshm serve` prints on stderr once `socket` (a
    /// region, factory or control socket) accepts; returns the line.
    pub fn wait_listening(
        &self,
        socket: &std::path::Path,
        timeout: Duration,
    ) -> Result<String, HostError> {
        let line = format!("listening on {}", socket.display());
        self.wait_line(Stream::Stderr, &format!("{line:?}"), timeout, |l| {
            l.trim_end() == line
        })
    }

    /// [`wait_line`](Self::wait_line) on stdout for a line equal to `line`.
    pub fn wait_stdout_line(&self, line: &str, timeout: Duration) -> Result<String, HostError> {
        self.wait_line(
            Stream::Stdout,
            &format!("stdout line {line:?}"),
            timeout,
            |l| l.trim() == line,
        )
    }

    /// Waits up to `timeout` for the process to exit, then for its output to be fully read.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, HostError> {
        let deadline = Instant::now() + timeout;
        let status = match self.exit_status {
            Some(status) => status,
            None => {
                let polled = orphan::wait_until(&mut self.child, deadline).map_err(|error| {
                    HostError::Io {
                        name: self.name.clone(),
                        what: "waiting for exit".into(),
                        error,
                    }
                })?;
                let Some(status) = polled else {
                    return Err(HostError::Timeout {
                        name: self.name.clone(),
                        what: "the process to exit".into(),
                        timeout,
                        context: self.failure_context(),
                    });
                };
                self.exit_status = Some(status);
                status
            }
        };
        // Children that inherited the pipes could keep them open; do not wait forever.
        let rest = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        self.stdout.wait_closed(rest);
        self.stderr.wait_closed(rest);
        Ok(status)
    }

    /// Waits for exit and fails unless the status is success.
    pub fn wait_success(&mut self, timeout: Duration) -> Result<(), HostError> {
        let status = self.wait_exit(timeout)?;
        if status.success() {
            Ok(())
        } else {
            Err(HostError::Failed {
                name: self.name.clone(),
                status: status.to_string(),
                context: self.failure_context(),
            })
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for exit; kills with SIGKILL if it is still
    /// running then.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, HostError> {
        self.signal(Signal::TERM);
        match self.wait_exit(timeout) {
            Ok(status) => Ok(status),
            Err(_) => {
                let _ = self.child.kill();
                self.wait_exit(timeout)
            }
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        orphan::kill_and_join(
            &mut self.child,
            self.exit_status.is_some(),
            &mut self.readers,
        );
    }
}

/// Sends SIGTERM to process `pid`, which need not be a child of this one (a daemon), and
/// waits up to `timeout` for it to exit (through a pidfd). Panics if it was not running or
/// did not exit in time.
pub fn terminate_pid(pid: u32, timeout: Duration) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .expect("a process id");
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        .expect("the process is running");
    kill_process(pid, Signal::TERM).expect("sending SIGTERM");
    assert!(
        crate::fds::readable_within(std::os::fd::AsFd::as_fd(&pidfd), timeout),
        "process {pid:?} did not exit within {timeout:?}"
    );
}

/// A daemon a test started. It has left the test's process tree, so neither
/// `PR_SET_PDEATHSIG` nor a [`HostProcess`]'s drop reaches it: this guard kills it (SIGKILL)
/// when dropped, also while a failing test unwinds, so no daemon outlives its test. The daemon
/// is found by an argument only its command line holds (`marker`: its pid file or socket path,
/// unique to the test run), so the guard works before the pid file is written, and without it.
#[derive(Debug)]
pub struct DaemonGuard {
    marker: std::ffi::OsString,
}

impl DaemonGuard {
    /// Guards every process (but this one) whose command line has the argument `marker`.
    /// Create it before starting the daemon.
    pub fn new(marker: impl AsRef<std::ffi::OsStr>) -> DaemonGuard {
        DaemonGuard {
            marker: marker.as_ref().to_owned(),
        }
    }

    /// The live processes whose command line holds the marker now (a zombie is dead: the
    /// kernel may still show its command line for a moment after it exited).
    pub fn pids(&self) -> Vec<u32> {
        use std::os::unix::ffi::OsStrExt;
        let marker = self.marker.as_bytes();
        let own = std::process::id();
        let Ok(proc) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        proc.filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != own)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|line| line.split(|&b| b == 0).any(|arg| arg == marker))
            })
            .filter(|&pid| alive(pid))
            .collect()
    }

    /// Kills every guarded process (SIGKILL through a pidfd, after checking that the pid still
    /// holds the marker) and waits up to 10 s for all to be gone or zombies.
    ///
    /// A command line is not stable while its process execs (it reads empty for a moment), so
    /// this looks again until no live process holds the marker: a process missed in one round
    /// (mid-exec when checked) is killed in the next.
    fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut told = std::collections::HashSet::new();
        let mut empty_rounds = 0;
        loop {
            let pids = self.pids();
            // Two empty looks 10 ms apart: a process mid-exec in the first is seen in the second.
            empty_rounds = if pids.is_empty() { empty_rounds + 1 } else { 0 };
            if empty_rounds == 2 || Instant::now() >= deadline {
                return;
            }
            for pid in pids {
                let Some(raw) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
                    continue;
                };
                let Ok(pidfd) =
                    rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
                else {
                    continue;
                };
                // The pidfd pins the process: if the pid still holds the marker now, it is ours.
                if !self.pids().contains(&pid) {
                    continue;
                }
                if told.insert(pid) {
                    eprintln!(
                        "killing daemon {pid} (command line with {:?}) that its test left running",
                        self.marker
                    );
                }
                let _ = rustix::process::pidfd_send_signal(&pidfd, Signal::KILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// True while process `pid` exists and is not a zombie (per `/proc/<pid>/stat`, whose state
/// field follows the last ") ": the command name may hold one).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !matches!(
            stat.rsplit(") ")
                .next()
                .and_then(|rest| rest.chars().next()),
            None | Some('Z' | 'X')
        )
    })
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Starts a program that daemonizes: `command` runs with stdin `/dev/null` and stdout and
/// stderr in the file `log` (a daemon that keeps them would hold a pipe open); its launcher
/// must exit successfully within `timeout` (else this panics with the log), leaving the
/// daemon's pid in `pid_file`. Returns that pid and a guard that kills the daemon when dropped
/// (found by `pid_file` on its command line, which must hold it as one argument).
pub fn start_daemon(
    mut command: Command,
    log: &std::path::Path,
    pid_file: &std::path::Path,
    timeout: Duration,
) -> (u32, DaemonGuard) {
    let guard = DaemonGuard::new(pid_file);
    let file = std::fs::File::create(log).expect("creating the log file");
    let mut launcher = command
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("duplicating the log file"))
        .stderr(file)
        .spawn()
        .expect("starting the launcher");
    let status = orphan::wait_until(&mut launcher, Instant::now() + timeout)
        .expect("waiting for the launcher")
        .expect("the launcher did not exit");
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        status.success(),
        "the launcher failed ({status}):\n{}",
        log_text()
    );
    let pid = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {}:\n{}", pid_file.display(), log_text()));
    (pid, guard)
}

/// Runs `command` to completion within `timeout` and returns its stdout lines; fails (with
/// its output) on a non-zero exit.
pub fn run_to_completion(
    name: &str,
    command: Command,
    timeout: Duration,
) -> Result<Vec<String>, HostError> {
    let mut process = HostProcess::spawn(name, command)?;
    process.wait_success(timeout)?;
    Ok(process.lines(Stream::Stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn waits_take_matching_lines_in_any_order() {
        let process =
            HostProcess::spawn("sh", shell("echo one; echo two; echo err >&2; echo three"))
                .unwrap();
        let timeout = Duration::from_secs(30);
        assert_eq!(process.wait_stdout_line("three", timeout).unwrap(), "three");
        assert_eq!(process.wait_stdout_line("one", timeout).unwrap(), "one");
        assert_eq!(
            process
                .wait_line(Stream::Stderr, "err", timeout, |l| l == "err")
                .unwrap(),
            "err"
        );
        // A taken line is not returned twice.
        assert!(matches!(
            process.wait_stdout_line("one", timeout),
            Err(HostError::Ended { .. })
        ));
    }

    #[test]
    fn raw_output_keeps_a_line_without_newline() {
        let process = HostProcess::spawn(
            "sh",
            shell("printf 'one\\ncmd> '; sleep 0.1; printf 'two\\n'"),
        )
        .unwrap();
        let timeout = Duration::from_secs(30);
        let text = process
            .wait_output(Stream::Stdout, "the prompt", timeout, |t| {
                t.ends_with("cmd> ")
            })
            .unwrap();
        assert_eq!(text, "one\ncmd> ");
        assert_eq!(
            process.wait_stdout_line("cmd> two", timeout).unwrap(),
            "cmd> two"
        );
        assert_eq!(process.output(Stream::Stdout), "one\ncmd> two\n");
    }

    #[test]
    fn run_to_completion_reports_failure_with_output() {
        let lines =
            run_to_completion("ok", shell("echo a; echo b"), Duration::from_secs(30)).unwrap();
        assert_eq!(lines, vec!["a", "b"]);
        let err = run_to_completion(
            "bad",
            shell("echo why >&2; exit 3"),
            Duration::from_secs(30),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("why"), "{err}");
    }

    #[test]
    fn terminate_stops_a_running_process() {
        let mut process = HostProcess::spawn("sleeper", shell("exec sleep 600")).unwrap();
        let status = process.terminate(Duration::from_secs(30)).unwrap();
        assert!(!status.success());
    }

    #[test]
    fn a_daemon_guard_kills_the_daemon_that_left_the_process_tree() {
        let marker = format!("ivshm-daemon-guard-test-{}", std::process::id());
        let guard = DaemonGuard::new(&marker);
        // `setsid -f` forks: the daemon is no child of this test, as a real daemon. It never
        // forks itself (`exec -a` keeps the marker as its argv[0]): a shell loop's short-lived
        // children hold the marker between fork and exec, and one caught there by `pids` would
        // be a sleeping `sleep` by the time it is checked below.
        let status = Command::new("setsid")
            .args(["-f", "bash", "-c", "exec -a \"$0\" sleep 600", &marker])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        // Settled: the daemon is `sleep` (with the marker), no longer `setsid` or `bash`.
        let settled = |pids: &[u32]| {
            pids.iter().any(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c == "sleep\n")
            })
        };
        while !settled(&guard.pids()) {
            assert!(Instant::now() < deadline, "the daemon did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let pids = guard.pids();
        drop(guard);
        for pid in pids {
            // Gone, or a zombie its new parent has not reaped yet.
            assert!(!alive(pid), "{pid} still runs");
        }
        assert!(DaemonGuard::new(&marker).pids().is_empty());
    }
}
