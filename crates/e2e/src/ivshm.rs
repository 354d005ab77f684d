//! Driving the host `ivshm` program as `docs/cli.md` specifies: a server, a listening peer
//! whose event lines are parsed, and one-shot `read`/`write` of the shared memory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::binaries::{self, BuildError};
use crate::host::{self, HostError, HostProcess, Stream};

/// Something went wrong running `ivshm` on the host.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum IvshmError {
    /// {0}
    ///
    /// Building the host `ivshm` failed.
    Build(BuildError),
    /// {0}
    ///
    /// The process failed or did not print what was expected.
    Host(HostError),
    /// unexpected output from ivshm {what}: {line:?}
    ///
    /// A line did not have the documented form.
    Parse {
        /// Which command.
        what: &'static str,
        /// The line.
        line: String,
    },
}

impl From<BuildError> for IvshmError {
    fn from(error: BuildError) -> Self {
        Self::Build(error)
    }
}

impl From<HostError> for IvshmError {
    fn from(error: HostError) -> Self {
        Self::Host(error)
    }
}

/// A `Command` for the host `ivshm` (built on first use) with `args`.
pub fn ivshm_command<I, S>(args: I) -> Result<Command, BuildError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(binaries::host_ivshm()?);
    command.args(args);
    Ok(command)
}

/// One line of `ivshm listen` (or `ivshm peers`) output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenEvent {
    /// `self id=<ID> vectors=<N> size=<BYTES>`
    SelfInfo {
        /// Own peer id.
        id: u16,
        /// Own vector count.
        vectors: u32,
        /// Shared memory size.
        size: u64,
    },
    /// `peer id=<ID> vectors=<N>`: a peer present when the listener joined.
    Peer {
        /// The peer's id.
        id: u16,
        /// Its vector count.
        vectors: u32,
    },
    /// `join peer=<ID> vectors=<N>`
    Join {
        /// The peer's id.
        peer: u16,
        /// Its vector count.
        vectors: u32,
    },
    /// `leave peer=<ID>`
    Leave {
        /// The peer's id.
        peer: u16,
    },
    /// `doorbell vector=<V>`
    Doorbell {
        /// The own vector that was rung.
        vector: u32,
    },
}

/// The value of `key=` among the whitespace-separated fields.
fn field<T: std::str::FromStr>(fields: &[&str], key: &str) -> Option<T> {
    fields
        .iter()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// Parses one line of `ivshm listen` output; `None` if it is not one of the documented forms.
pub fn parse_listen_line(line: &str) -> Option<ListenEvent> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (kind, rest) = fields.split_first()?;
    match *kind {
        "self" => Some(ListenEvent::SelfInfo {
            id: field(rest, "id")?,
            vectors: field(rest, "vectors")?,
            size: field(rest, "size")?,
        }),
        "peer" => Some(ListenEvent::Peer {
            id: field(rest, "id")?,
            vectors: field(rest, "vectors")?,
        }),
        "join" => Some(ListenEvent::Join {
            peer: field(rest, "peer")?,
            vectors: field(rest, "vectors")?,
        }),
        "leave" => Some(ListenEvent::Leave {
            peer: field(rest, "peer")?,
        }),
        "doorbell" => Some(ListenEvent::Doorbell {
            vector: field(rest, "vector")?,
        }),
        _ => None,
    }
}

/// Decodes lowercase or uppercase hex without separators.
pub fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Encodes bytes as lowercase hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running `ivshm serve`; stopped with SIGTERM on [`stop`](Self::stop), killed on drop.
#[derive(Debug)]
pub struct IvshmServer {
    process: HostProcess,
    socket: PathBuf,
}

impl IvshmServer {
    /// Starts `ivshm serve --socket <socket> <args...>` and waits for `listening on` on stderr.
    pub fn start(socket: &Path, args: &[&str], timeout: Duration) -> Result<Self, IvshmError> {
        let mut command = ivshm_command(["serve", "--socket"])?;
        command.arg(socket).args(args);
        let process = HostProcess::spawn("ivshm serve", command)?;
        process.wait_line(Stream::Stderr, "`listening on`", timeout, |l| {
            l.contains("listening on")
        })?;
        Ok(Self {
            process,
            socket: socket.to_path_buf(),
        })
    }

    /// The server's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The server process (for its output).
    pub fn process(&self) -> &HostProcess {
        &self.process
    }

    /// Sends SIGTERM and waits for exit.
    pub fn stop(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, IvshmError> {
        Ok(self.process.terminate(timeout)?)
    }
}

/// A running `ivshm listen`: a host peer whose events can be awaited.
#[derive(Debug)]
pub struct IvshmListener {
    process: HostProcess,
    id: u16,
    vectors: u32,
    size: u64,
}

impl IvshmListener {
    /// Starts `ivshm listen --socket <socket>` and waits for its `self` line.
    pub fn start(socket: &Path, timeout: Duration) -> Result<Self, IvshmError> {
        let mut command = ivshm_command(["listen", "--socket"])?;
        command.arg(socket);
        let process = HostProcess::spawn("ivshm listen", command)?;
        let line = process.wait_line(Stream::Stdout, "the `self` line", timeout, |l| {
            matches!(parse_listen_line(l), Some(ListenEvent::SelfInfo { .. }))
        })?;
        match parse_listen_line(&line) {
            Some(ListenEvent::SelfInfo { id, vectors, size }) => Ok(Self {
                process,
                id,
                vectors,
                size,
            }),
            _ => Err(IvshmError::Parse {
                what: "listen",
                line,
            }),
        }
    }

    /// Own peer id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Own vector count.
    pub fn vectors(&self) -> u32 {
        self.vectors
    }

    /// Shared memory size reported by the server.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The listener process (for all of its output).
    pub fn process(&self) -> &HostProcess {
        &self.process
    }

    /// Waits for the first not yet awaited event satisfying `wanted` and returns it.
    pub fn wait_event(
        &self,
        what: &str,
        timeout: Duration,
        mut wanted: impl FnMut(&ListenEvent) -> bool,
    ) -> Result<ListenEvent, IvshmError> {
        let line = self.process.wait_line(Stream::Stdout, what, timeout, |l| {
            parse_listen_line(l).is_some_and(|event| wanted(&event))
        })?;
        parse_listen_line(&line).ok_or(IvshmError::Parse {
            what: "listen",
            line,
        })
    }

    /// Waits for the next `join` event and returns the peer id and its vector count.
    pub fn wait_join(&self, timeout: Duration) -> Result<(u16, u32), IvshmError> {
        match self.wait_event("a `join` line", timeout, |e| {
            matches!(e, ListenEvent::Join { .. })
        })? {
            ListenEvent::Join { peer, vectors } => Ok((peer, vectors)),
            other => Err(IvshmError::Parse {
                what: "listen",
                line: format!("{other:?}"),
            }),
        }
    }

    /// Waits for `leave peer=<peer>`.
    pub fn wait_leave(&self, peer: u16, timeout: Duration) -> Result<(), IvshmError> {
        self.wait_event(&format!("`leave peer={peer}`"), timeout, |e| {
            *e == ListenEvent::Leave { peer }
        })?;
        Ok(())
    }

    /// Waits for `doorbell vector=<vector>`.
    pub fn wait_doorbell(&self, vector: u32, timeout: Duration) -> Result<(), IvshmError> {
        self.wait_event(&format!("`doorbell vector={vector}`"), timeout, |e| {
            *e == ListenEvent::Doorbell { vector }
        })?;
        Ok(())
    }
}

/// `ivshm read --socket <socket> --offset <offset> --len <len>`, decoded.
pub fn read_shared(
    socket: &Path,
    offset: u64,
    len: usize,
    timeout: Duration,
) -> Result<Vec<u8>, IvshmError> {
    let mut command = ivshm_command(["read", "--socket"])?;
    command
        .arg(socket)
        .args(["--offset", &offset.to_string(), "--len", &len.to_string()]);
    let lines = host::run_to_completion("ivshm read", command, timeout)?;
    let text = lines.concat();
    decode_hex(&text)
        .filter(|bytes| bytes.len() == len)
        .ok_or(IvshmError::Parse {
            what: "read",
            line: text,
        })
}

/// `ivshm write --socket <socket> --offset <offset> <hex>`.
pub fn write_shared(
    socket: &Path,
    offset: u64,
    bytes: &[u8],
    timeout: Duration,
) -> Result<(), IvshmError> {
    let mut command = ivshm_command(["write", "--socket"])?;
    command
        .arg(socket)
        .args(["--offset", &offset.to_string(), &encode_hex(bytes)]);
    host::run_to_completion("ivshm write", command, timeout)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_documented_lines() {
        assert_eq!(
            parse_listen_line("self id=0 vectors=2 size=1048576"),
            Some(ListenEvent::SelfInfo {
                id: 0,
                vectors: 2,
                size: 1 << 20
            })
        );
        assert_eq!(
            parse_listen_line("peer id=3 vectors=1"),
            Some(ListenEvent::Peer { id: 3, vectors: 1 })
        );
        assert_eq!(
            parse_listen_line("join peer=1 vectors=2"),
            Some(ListenEvent::Join {
                peer: 1,
                vectors: 2
            })
        );
        assert_eq!(
            parse_listen_line("leave peer=2"),
            Some(ListenEvent::Leave { peer: 2 })
        );
        assert_eq!(
            parse_listen_line("doorbell vector=1"),
            Some(ListenEvent::Doorbell { vector: 1 })
        );
    }

    #[test]
    fn rejects_other_lines() {
        assert_eq!(parse_listen_line(""), None);
        assert_eq!(parse_listen_line("join peer=x vectors=2"), None);
        assert_eq!(parse_listen_line("leave"), None);
        assert_eq!(parse_listen_line("listening on /tmp/s"), None);
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(decode_hex("deadBEEF\n"), Some(vec![0xde, 0xad, 0xbe, 0xef]));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(encode_hex(&[0, 0xff]), "00ff");
    }

    proptest! {
        #[test]
        fn hex_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(decode_hex(&encode_hex(&bytes)), Some(bytes));
        }

        #[test]
        fn event_lines_round_trip(peer in any::<u16>(), vectors in 1u32..=64) {
            let line = format!("join peer={peer} vectors={vectors}");
            prop_assert_eq!(parse_listen_line(&line), Some(ListenEvent::Join { peer, vectors }));
        }

        #[test]
        fn never_panics(line in "\\PC*") {
            let _ = parse_listen_line(&line);
            let _ = decode_hex(&line);
        }
    }
}
