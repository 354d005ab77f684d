//! File-descriptor limits: raise `RLIMIT_NOFILE`, recognise exhaustion, refuse without spinning.
//!
//! Each peer costs the server one socket plus one eventfd per vector, so a server with many
//! peers needs many fds. At start the soft limit is raised to the hard limit. When `accept` fails
//! with `EMFILE`/`ENFILE` the pending connection would keep the listener readable forever (a busy
//! loop); [`ReserveFd`] keeps one fd in reserve so that connection can be accepted and closed.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// The fd limit after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// Soft limit (what applies), `None` if unlimited.
    pub soft: Option<u64>,
    /// Hard limit, `None` if unlimited.
    pub hard: Option<u64>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the limits now in force.
pub fn raise_nofile_limit() -> NofileLimit {
    let current = getrlimit(Resource::Nofile);
    if current.current != current.maximum {
        let raised = Rlimit {
            current: current.maximum,
            maximum: current.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::debug!(
                from = ?current.current,
                to = ?current.maximum,
                "raised the open file limit"
            ),
            Err(errno) => tracing::warn!(%errno, "could not raise the open file limit"),
        }
    }
    current_nofile_limit()
}

/// The limits in force now.
pub fn current_nofile_limit() -> NofileLimit {
    let l = getrlimit(Resource::Nofile);
    NofileLimit {
        soft: l.current,
        hard: l.maximum,
    }
}

/// True for "out of file descriptors" errors (per process or system-wide).
pub fn is_fd_exhaustion(errno: Errno) -> bool {
    errno == Errno::MFILE || errno == Errno::NFILE
}

/// Describes the soft limit for log lines.
pub fn describe_soft_limit() -> String {
    match current_nofile_limit().soft {
        Some(n) => n.to_string(),
        None => "unlimited".to_string(),
    }
}

/// The log line for running out of fds while `peers` peers with `vectors` vectors each are
/// connected: what happened, what it costs, and what to do about it.
pub fn fd_exhaustion_message(peers: usize, vectors: usize, outcome: &str) -> String {
    format!(
        "out of file descriptors: {peers} peers connected, open file limit {}; {outcome}. \
         Each peer costs the server 1 + {vectors} fds: raise the hard limit \
         (`ulimit -Hn`, systemd `LimitNOFILE=`, /etc/security/limits.conf) and restart",
        describe_soft_limit()
    )
}

/// One spare fd (`/dev/null`), released to accept-and-close a connection when fds run out.
#[derive(Debug)]
pub struct ReserveFd {
    fd: Option<OwnedFd>,
}

impl ReserveFd {
    /// Opens the reserve fd (or holds none if even that fails).
    pub fn new() -> Self {
        ReserveFd {
            fd: open_dev_null(),
        }
    }

    /// Frees the reserve, runs `f` (which may use the freed slot), then takes the reserve back.
    pub fn release_for<T>(&mut self, f: impl FnOnce() -> T) -> T {
        self.fd = None;
        let result = f();
        self.fd = open_dev_null();
        result
    }

    /// The reserve fd, if held.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }
}

impl Default for ReserveFd {
    fn default() -> Self {
        Self::new()
    }
}

fn open_dev_null() -> Option<OwnedFd> {
    rustix::fs::open("/dev/null", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_leaves_soft_equal_to_hard() {
        let l = raise_nofile_limit();
        assert_eq!(l.soft, l.hard);
    }

    #[test]
    fn reserve_is_released_and_taken_back() {
        let mut r = ReserveFd::new();
        assert!(r.fd().is_some());
        let inside = r.release_for(|| 7);
        assert_eq!(inside, 7);
        assert!(r.fd().is_some());
        assert!(is_fd_exhaustion(Errno::MFILE));
        assert!(is_fd_exhaustion(Errno::NFILE));
        assert!(!is_fd_exhaustion(Errno::AGAIN));
    }
}
