//! Bridge addresses (`tcp:HOST:PORT`, `unix:PATH`) and the non-blocking socket calls the event
//! loop makes on them.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rustix::fs::FileType;
use rustix::io::Errno;
use rustix::net::{self, AddressFamily, SocketAddrAny, SocketAddrUnix, SocketFlags, SocketType};
use thiserror::Error;

/// An address as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `tcp:HOST:PORT` (`HOST` a name, an IPv4 address or `[IPv6]`).
    Tcp {
        /// Host name or address (without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// `unix:PATH`.
    Unix(PathBuf),
}

/// A malformed address, or one that cannot be used.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum AddressError {
    /// {0:?} is not an address: use tcp:HOST:PORT or unix:PATH
    ///
    /// Neither `tcp:` nor `unix:`.
    Scheme(String),
    /// {0:?}: expected tcp:HOST:PORT (e.g. tcp:127.0.0.1:2222, tcp:\[::1\]:22)
    ///
    /// `tcp:` without `HOST:PORT`.
    ///
    /// The message is in `#[displaydoc]` because rustdoc would read its `[`/`<` as markup.
    #[displaydoc("{0:?}: expected tcp:HOST:PORT (e.g. tcp:127.0.0.1:2222, tcp:[::1]:22)")]
    Tcp(String),
    /// {0:?}: the port must be a number from 1 to 65535 (0 only to listen)
    ///
    /// A bad port.
    Port(String),
    /// {0}
    ///
    /// An empty or too long socket path.
    UnixPath(String),
    /// cannot resolve {host}: {error}
    ///
    /// The host name did not resolve.
    Resolve {
        /// The host.
        host: String,
        /// Why.
        error: String,
    },
    /// {0} resolves to no address
    ///
    /// The host name resolved to nothing.
    NoAddress(String),
    /// {op} {addr}: {errno}
    ///
    /// A system call failed.
    Sys {
        /// What was done.
        op: &'static str,
        /// On which address.
        addr: String,
        /// The error.
        errno: Errno,
    },
    /// {0} exists and is not a stale socket (a bridge or another program uses it?)
    ///
    /// The unix socket path is taken by something that is not a stale socket.
    PathInUse(PathBuf),
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Address, AddressError> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| AddressError::Tcp(s.into()))?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.is_empty() {
                return Err(AddressError::Tcp(s.into()));
            }
            let port = port.parse().map_err(|_| AddressError::Port(s.into()))?;
            Ok(Address::Tcp {
                host: host.into(),
                port,
            })
        } else if let Some(path) = s.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if path.as_os_str().is_empty() {
                return Err(AddressError::UnixPath(format!("{s:?}: the path is empty")));
            }
            ivshm_proto::check_socket_path(&path)
                .map_err(|e| AddressError::UnixPath(e.to_string()))?;
            Ok(Address::Unix(path))
        } else {
            Err(AddressError::Scheme(s.into()))
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A resolved address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP socket address.
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Address {
    /// Resolves the host name (once, at start: the event loop never blocks on DNS). A connect
    /// address needs a port other than 0.
    pub fn resolve(&self, listening: bool) -> Result<Endpoint, AddressError> {
        match self {
            Address::Unix(p) => Ok(Endpoint::Unix(p.clone())),
            Address::Tcp { host, port } => {
                if *port == 0 && !listening {
                    return Err(AddressError::Port(self.to_string()));
                }
                let mut addrs = (host.as_str(), *port).to_socket_addrs().map_err(|e| {
                    AddressError::Resolve {
                        host: host.clone(),
                        error: e.to_string(),
                    }
                })?;
                addrs
                    .next()
                    .map(Endpoint::Tcp)
                    .ok_or_else(|| AddressError::NoAddress(host.clone()))
            }
        }
    }
}

fn sys<'a>(op: &'static str, addr: &'a Endpoint) -> impl Fn(Errno) -> AddressError + 'a {
    move |errno| AddressError::Sys {
        op,
        addr: addr.to_string(),
        errno,
    }
}

fn new_socket(endpoint: &Endpoint) -> Result<OwnedFd, Errno> {
    let family = match endpoint {
        Endpoint::Tcp(SocketAddr::V4(_)) => AddressFamily::INET,
        Endpoint::Tcp(SocketAddr::V6(_)) => AddressFamily::INET6,
        Endpoint::Unix(_) => AddressFamily::UNIX,
    };
    net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
}

/// A listening socket.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    /// The address it is bound to (with the port the kernel chose for port 0).
    pub local: Endpoint,
    /// The unix socket file and its identity, removed on drop if still ours.
    unix: Option<(PathBuf, u64, u64)>,
}

fn file_id(path: &Path) -> Option<(u64, u64, FileType)> {
    rustix::fs::lstat(path)
        .ok()
        .map(|st| (st.st_dev, st.st_ino, FileType::from_raw_mode(st.st_mode)))
}

impl Listener {
    /// Binds and listens on `endpoint` (non-blocking). A unix path that holds a socket nobody
    /// listens on (left by a killed bridge) is replaced; anything else there is an error.
    pub fn bind(endpoint: &Endpoint) -> Result<Listener, AddressError> {
        let fd = new_socket(endpoint).map_err(sys("socket", endpoint))?;
        let mut unix = None;
        match endpoint {
            Endpoint::Tcp(addr) => {
                net::sockopt::set_socket_reuseaddr(&fd, true)
                    .map_err(sys("setsockopt SO_REUSEADDR", endpoint))?;
                net::bind(&fd, addr).map_err(sys("bind", endpoint))?;
            }
            Endpoint::Unix(path) => {
                let addr = SocketAddrUnix::new(path.as_path()).map_err(sys("bind", endpoint))?;
                match net::bind(&fd, &addr) {
                    Ok(()) => {}
                    Err(Errno::ADDRINUSE) if is_stale_socket(path, &addr) => {
                        rustix::fs::unlink(path.as_path()).map_err(sys("unlink", endpoint))?;
                        net::bind(&fd, &addr).map_err(sys("bind", endpoint))?;
                    }
                    Err(Errno::ADDRINUSE) => return Err(AddressError::PathInUse(path.clone())),
                    Err(e) => return Err(sys("bind", endpoint)(e)),
                }
                if let Some((dev, ino, _)) = file_id(path) {
                    unix = Some((path.clone(), dev, ino));
                }
            }
        }
        net::listen(&fd, 128).map_err(sys("listen", endpoint))?;
        let local = match endpoint {
            Endpoint::Tcp(_) => net::getsockname(&fd)
                .ok()
                .and_then(|a| SocketAddr::try_from(a).ok())
                .map_or_else(|| endpoint.clone(), Endpoint::Tcp),
            Endpoint::Unix(_) => endpoint.clone(),
        };
        Ok(Listener { fd, local, unix })
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Accepts one connection: `Ok(None)` when none is waiting. Returns the socket
    /// (non-blocking, `TCP_NODELAY` set) and a description of the client.
    pub fn accept(&self) -> Result<Option<(OwnedFd, String)>, Errno> {
        match net::acceptfrom_with(&self.fd, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
            Ok((fd, from)) => {
                let origin = describe(from.as_ref(), &self.local);
                if matches!(self.local, Endpoint::Tcp(_)) {
                    // Small writes (a 64-byte request) must not wait for Nagle.
                    let _ = net::sockopt::set_tcp_nodelay(&fd, true);
                }
                Ok(Some((fd, origin)))
            }
            Err(Errno::AGAIN | Errno::INTR) => Ok(None),
            // The client gave up before we accepted: nothing to do.
            Err(Errno::CONNABORTED | Errno::PROTO) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = &self.unix {
            // Remove the file only if it is still the socket we made.
            if let Some((d, i, FileType::Socket)) = file_id(path) {
                if d == *dev && i == *ino {
                    let _ = rustix::fs::unlink(path.as_path());
                }
            }
        }
    }
}

/// True when `path` is a socket that refuses connections (its listener is gone).
fn is_stale_socket(path: &Path, addr: &SocketAddrUnix) -> bool {
    if !matches!(file_id(path), Some((_, _, FileType::Socket))) {
        return false;
    }
    let Ok(probe) = net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    ) else {
        return false;
    };
    matches!(net::connect(&probe, addr), Err(Errno::CONNREFUSED))
}

fn describe(from: Option<&SocketAddrAny>, local: &Endpoint) -> String {
    match (from.cloned().map(SocketAddr::try_from), local) {
        (Some(Ok(a)), _) => format!("tcp:{a}"),
        (_, Endpoint::Unix(p)) => format!("a client of unix:{}", p.display()),
        _ => "a client".into(),
    }
}

/// Starts connecting to `endpoint`: the socket (non-blocking, `TCP_NODELAY` set) and whether
/// it is connected already (else wait until it is writable, then call [`finish_connect`]).
pub fn start_connect(endpoint: &Endpoint) -> Result<(OwnedFd, bool), Errno> {
    let fd = new_socket(endpoint)?;
    let result = match endpoint {
        Endpoint::Tcp(addr) => {
            let _ = net::sockopt::set_tcp_nodelay(&fd, true);
            net::connect(&fd, addr)
        }
        Endpoint::Unix(path) => net::connect(&fd, &SocketAddrUnix::new(path.as_path())?),
    };
    match result {
        Ok(()) => Ok((fd, true)),
        Err(Errno::INPROGRESS | Errno::INTR) => Ok((fd, false)),
        // A unix listener's backlog is full: as good as refused.
        Err(Errno::AGAIN) => Err(Errno::CONNREFUSED),
        Err(e) => Err(e),
    }
}

/// Whether a connect started by [`start_connect`] succeeded (call once the socket is
/// writable or reports an error).
pub fn finish_connect(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    net::sockopt::socket_error(fd)?
}

/// Closes a socket so that its peer sees a reset (TCP: `SO_LINGER` 0 sends RST; a unix
/// socket's peer sees the close).
pub fn close_with_reset(fd: OwnedFd) {
    let _ = net::sockopt::set_socket_linger(&fd, Some(Duration::ZERO));
    drop(fd);
}
