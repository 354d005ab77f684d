//! The server a benchmark measures: `ivshm serve` in a child process when this program is
//! `ivshm` (so its memory and fds are its own, read from `/proc/<pid>`), else an in-process
//! [`ServerHandle`] (in unit tests, whose program is the test harness).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ivshm_server::{ServerConfig, ServerHandle};
use rustix::process::{kill_process, Pid, Signal};

/// A server under measurement.
#[derive(Debug)]
pub enum BenchServer {
    /// `ivshm serve` in a child process.
    Spawned(Spawned),
    /// A server thread in this process.
    InProcess(ServerHandle),
}

/// `ivshm serve` in a child process, stopped (`SIGTERM`) on drop.
#[derive(Debug)]
pub struct Spawned {
    child: Child,
}

impl BenchServer {
    /// Starts a server: `ivshm serve ARGS` when this program is `ivshm` (waiting until
    /// `ready` exists), else `in_process` in this process.
    pub fn start(
        args: &[OsString],
        ready: &Path,
        in_process: impl FnOnce() -> ServerConfig,
    ) -> anyhow::Result<BenchServer> {
        match ivshm_program() {
            Some(program) => Ok(BenchServer::Spawned(Spawned::start(&program, args, ready)?)),
            None => Ok(BenchServer::InProcess(
                ServerHandle::spawn(in_process()).context("starting the in-process server")?,
            )),
        }
    }

    /// The server's resident memory in bytes (`None` in process: it shares this process's).
    pub fn resident_bytes(&self) -> Option<u64> {
        match self {
            BenchServer::Spawned(s) => statm_resident(&format!("/proc/{}/statm", s.child.id())),
            BenchServer::InProcess(_) => None,
        }
    }

    /// The server's open fds (`None` in process).
    pub fn open_fds(&self) -> Option<usize> {
        match self {
            BenchServer::Spawned(s) => std::fs::read_dir(format!("/proc/{}/fd", s.child.id()))
                .ok()
                .map(Iterator::count),
            BenchServer::InProcess(_) => None,
        }
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        match self {
            BenchServer::Spawned(s) => matches!(s.child.try_wait(), Ok(None)),
            BenchServer::InProcess(_) => true,
        }
    }

    /// Stops it; an error if it had already exited or fails to stop.
    pub fn stop(self) -> anyhow::Result<()> {
        match self {
            BenchServer::Spawned(s) => s.stop(),
            BenchServer::InProcess(h) => h.shutdown().map(|_| ()).context("stopping the server"),
        }
    }
}

impl Spawned {
    fn start(program: &Path, args: &[OsString], ready: &Path) -> anyhow::Result<Spawned> {
        // As quiet as this process: its log shows only with `-v` (join and leave lines on
        // stderr, as the in-process server's would).
        let verbose = tracing::enabled!(tracing::Level::INFO);
        let mut command = Command::new(program);
        command
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if verbose {
            command.stderr(Stdio::inherit());
        } else {
            command.env("RUST_LOG", "warn").stderr(Stdio::null());
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {} serve", program.display()))?;
        let mut spawned = Spawned { child };
        let deadline = Instant::now() + Duration::from_secs(30);
        // The socket appears (renamed into place) once the server listens.
        while std::fs::symlink_metadata(ready).is_err() {
            if let Ok(Some(status)) = spawned.child.try_wait() {
                bail!("the server exited before it was ready: {status}");
            }
            if Instant::now() > deadline {
                bail!("the server did not create {} in 30 s", ready.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(spawned)
    }

    fn stop(mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!("the server had exited: {status}");
        }
        signal(&self.child, Signal::TERM)?;
        let status = self.child.wait().context("waiting for the server")?;
        if !status.success() {
            bail!("the server exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = signal(&self.child, Signal::KILL);
            let _ = self.child.wait();
        }
    }
}

fn signal(child: &Child, signal: Signal) -> anyhow::Result<()> {
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(Pid::from_raw)
        .context("the server's pid")?;
    kill_process(pid, signal).with_context(|| format!("signalling the server ({signal:?})"))
}

/// This program if it is `ivshm` (not a test harness).
pub(crate) fn ivshm_program() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    (exe.file_name()? == "ivshm").then_some(exe)
}

/// Resident bytes from a `statm` file.
pub fn statm_resident(path: &str) -> Option<u64> {
    let statm = std::fs::read_to_string(path).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}
