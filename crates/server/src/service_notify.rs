//! Readiness and state notifications to a service manager (systemd's `sd_notify(3)` protocol):
//! one datagram of `KEY=VALUE` lines to the unix socket named by `$NOTIFY_SOCKET`, a path or,
//! with a leading `@`, an abstract name.
//!
//! Written here rather than taken from the `sd-notify` crate: that crate connects to
//! `$NOTIFY_SOCKET` as a path, so the abstract `@` names `sd_notify(3)` specifies (and that
//! containers and test harnesses use) do not work; the protocol itself is one `sendto`.
//!
//! `ivshm serve` sends `READY=1` once every socket is bound, `RELOADING=1` (with
//! `MONOTONIC_USEC`, which systemd 253's `Type=notify-reload` requires) and `READY=1` around a
//! reload, and `STOPPING=1` when it shuts down. The environment is read once
//! ([`ServiceNotifier::from_env`]); a failed send is logged, never fatal.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;

use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use thiserror::Error;

/// The environment variable a service manager sets to its notification socket.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// The notification socket cannot be used.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum NotifyError {
    /// NOTIFY_SOCKET={0:?} is not supported (an absolute path or an @abstract name is needed)
    ///
    /// `$NOTIFY_SOCKET` is neither an absolute path nor an `@` abstract name.
    Unsupported(String),
    /// NOTIFY_SOCKET={address:?}: {error}
    ///
    /// The address does not fit a unix socket address.
    Address {
        /// The address.
        address: String,
        /// Why.
        error: rustix::io::Errno,
    },
    /// creating the notification socket: {0}
    ///
    /// The datagram socket could not be created.
    Socket(rustix::io::Errno),
    /// notifying the service manager at {address}: {error}
    ///
    /// Sending failed.
    Send {
        /// Where it was sent.
        address: String,
        /// Why.
        error: rustix::io::Errno,
    },
}

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct ServiceNotifier {
    socket: OwnedFd,
    address: SocketAddrUnix,
    display: String,
}

impl ServiceNotifier {
    /// The notifier `$NOTIFY_SOCKET` names; `Ok(None)` when it is unset or empty (not run by a
    /// service manager that wants notifications).
    pub fn from_env() -> Result<Option<ServiceNotifier>, NotifyError> {
        match std::env::var_os(NOTIFY_SOCKET_ENV) {
            Some(value) if !value.is_empty() => Self::new(&value).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for `address`: an absolute path, or `@name` for an abstract socket.
    pub fn new(address: &OsStr) -> Result<ServiceNotifier, NotifyError> {
        let bytes = address.as_bytes();
        let display = address.to_string_lossy().into_owned();
        let unix = match bytes.first() {
            Some(b'@') => SocketAddrUnix::new_abstract_name(&bytes[1..]),
            Some(b'/') => SocketAddrUnix::new(bytes),
            _ => return Err(NotifyError::Unsupported(display)),
        }
        .map_err(|error| NotifyError::Address {
            address: display.clone(),
            error,
        })?;
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(NotifyError::Socket)?;
        Ok(ServiceNotifier {
            socket,
            address: unix,
            display,
        })
    }

    /// Sends `message` (newline-separated `KEY=VALUE` assignments) as one datagram.
    pub fn send(&self, message: &str) -> Result<(), NotifyError> {
        rustix::net::sendto(
            &self.socket,
            message.as_bytes(),
            SendFlags::NOSIGNAL,
            &self.address,
        )
        .map(|_| ())
        .map_err(|error| NotifyError::Send {
            address: self.display.clone(),
            error,
        })
    }

    /// Sends `message`; a failure is logged as a warning.
    pub fn notify(&self, message: &str) {
        if let Err(e) = self.send(message) {
            tracing::warn!("{e}");
        }
    }

    /// `READY=1` with a `STATUS=` line.
    pub fn ready(&self, status: &str) {
        self.notify(&ready_message(status));
    }

    /// `RELOADING=1` and `MONOTONIC_USEC=` (now).
    pub fn reloading(&self) {
        self.notify(&reloading_message(monotonic_usec()));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.notify("STOPPING=1\nSTATUS=shutting down\n");
    }
}

/// The `READY=1` message (a status line's newlines become spaces).
pub fn ready_message(status: &str) -> String {
    format!("READY=1\nSTATUS={}\n", status.replace('\n', " "))
}

/// The `RELOADING=1` message for CLOCK_MONOTONIC time `usec`.
pub fn reloading_message(usec: u128) -> String {
    format!("RELOADING=1\nSTATUS=reloading the configuration\nMONOTONIC_USEC={usec}\n")
}

/// CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC=` wants it.
fn monotonic_usec() -> u128 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u128::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u128::try_from(now.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("ivshm-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = ServiceNotifier::new(path.as_os_str()).unwrap();
        notifier.ready("serving 2 regions");
        assert_eq!(receive(&receiver), "READY=1\nSTATUS=serving 2 regions\n");
        notifier.stopping();
        assert_eq!(receive(&receiver), "STOPPING=1\nSTATUS=shutting down\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("ivshm-notify-test-{}", std::process::id());
        let receiver =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let notifier = ServiceNotifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        notifier.reloading();
        let message = receive(&receiver);
        let lines: Vec<&str> = message.lines().collect();
        assert_eq!(lines[0], "RELOADING=1");
        let usec: u128 = lines[2]
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec > 0);
    }

    #[test]
    fn refuses_relative_and_empty_addresses() {
        for bad in ["relative/path", "vsock:2:1234", ""] {
            assert!(matches!(
                ServiceNotifier::new(OsStr::new(bad)),
                Err(NotifyError::Unsupported(_))
            ));
        }
        let long = format!("/{}", "x".repeat(200));
        assert!(matches!(
            ServiceNotifier::new(OsStr::new(&long)),
            Err(NotifyError::Address { .. })
        ));
    }

    #[test]
    fn a_missing_receiver_is_an_error_not_a_panic() {
        let notifier = ServiceNotifier::new(OsStr::new("/nonexistent/ivshm/notify")).unwrap();
        assert!(matches!(
            notifier.send("READY=1\n"),
            Err(NotifyError::Send { .. })
        ));
        notifier.ready("logged, not fatal");
    }

    #[test]
    fn status_lines_stay_one_line() {
        assert_eq!(ready_message("a\nb"), "READY=1\nSTATUS=a b\n");
        assert!(reloading_message(5).ends_with("MONOTONIC_USEC=5\n"));
    }
}
