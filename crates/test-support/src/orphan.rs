//! Starting child processes that die with the test process.
//!
//! Children get `PR_SET_PDEATHSIG(SIGKILL)`, so a test process killed outright (no unwinding,
//! no `Drop`) does not leave QEMU or servers running. Linux sends that signal when the
//! *thread* that forked the child exits, so every child is forked by one long-lived spawner
//! thread rather than by the (short-lived) test threads.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::process::{getpid, getppid, set_parent_process_death_signal, Signal};

/// A spawn request: the command and where to send the result.
type Request = (Command, Sender<io::Result<Child>>);

fn spawner() -> io::Result<Sender<Request>> {
    static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    if let Some(sender) = SPAWNER.get() {
        return Ok(lock(sender).clone());
    }
    let (sender, receiver) = channel::<Request>();
    std::thread::Builder::new()
        .name("test-spawner".into())
        .spawn(move || {
            for (mut command, reply) in receiver {
                // The receiver may have given up; nothing to do then.
                let _ = reply.send(spawn_here(&mut command));
            }
        })?;
    // If another thread won the race, its spawner is used and this one exits with its
    // channel.
    Ok(lock(SPAWNER.get_or_init(|| Mutex::new(sender))).clone())
}

fn lock(sender: &Mutex<Sender<Request>>) -> std::sync::MutexGuard<'_, Sender<Request>> {
    sender
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs in the forked child before `exec`: asks for SIGKILL when the parent (thread) dies,
/// and exits at once if the parent is already gone.
fn die_with_parent(parent: rustix::process::Pid) -> io::Result<()> {
    set_parent_process_death_signal(Some(Signal::KILL))?;
    if getppid() != Some(parent) {
        return Err(io::Error::other("the test process exited"));
    }
    Ok(())
}

fn spawn_here(command: &mut Command) -> io::Result<Child> {
    let parent = getpid();
    // SAFETY: the closure runs between fork and exec in the child; it only makes the
    // `prctl` and `getppid` system calls (async-signal-safe, no allocation, no locks).
    unsafe {
        command.pre_exec(move || die_with_parent(parent));
    }
    command.spawn()
}

/// Spawns `command` so that the child is killed when this test process dies.
pub fn spawn(command: Command) -> io::Result<Child> {
    let (reply, result) = channel();
    spawner()?
        .send((command, reply))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    result
        .recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

/// Polls `child` until it exits (its status) or `deadline` passes (`None`).
pub fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// For `Drop`: kills and reaps `child` unless it was reaped already (`reaped`), then joins
/// the threads reading its output (they end when its pipes close).
pub fn kill_and_join(child: &mut Child, reaped: bool, readers: &mut Vec<JoinHandle<()>>) {
    if !reaped {
        let _ = child.kill();
        let _ = child.wait();
    }
    for reader in readers.drain(..) {
        let _ = reader.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[test]
    fn spawned_children_run_and_outlive_the_calling_thread() {
        let mut child = std::thread::spawn(|| {
            let mut command = Command::new("sh");
            command.args(["-c", "sleep 1; exit 7"]).stdin(Stdio::null());
            spawn(command).unwrap()
        })
        .join()
        .unwrap();
        // The spawning test thread has exited; the child was not killed with it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = wait_until(&mut child, deadline).unwrap().unwrap();
        assert_eq!(status.code(), Some(7));
    }

    #[test]
    fn waiting_until_a_deadline_gives_up_and_kill_and_join_reaps() {
        let mut command = Command::new("sleep");
        command.arg("60");
        let mut child = spawn(command).unwrap();
        assert!(wait_until(&mut child, Instant::now()).unwrap().is_none());
        let reader = std::thread::spawn(|| ());
        let mut readers = vec![reader];
        kill_and_join(&mut child, false, &mut readers);
        assert!(readers.is_empty());
        assert!(child.try_wait().unwrap().is_some(), "killed and reaped");
    }
}
