//! What the program tests share: a raw v0 peer that reads what the server sends, and the
//! server's stderr read line by line.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ivshm_proto::fd_passing::MessageReader;
pub use ivshm_proto::fd_passing::Received;

/// Failure guard for every read (never a timing assertion).
pub const READ_GUARD: Duration = Duration::from_secs(30);

/// A raw v0 peer: a connection to a region socket and the messages on it.
pub struct Peer {
    pub sock: UnixStream,
    reader: MessageReader,
}

impl Peer {
    /// Connects to a region socket (reads fail after [`READ_GUARD`]).
    pub fn connect(path: &Path) -> Peer {
        let sock = UnixStream::connect(path).unwrap();
        sock.set_read_timeout(Some(READ_GUARD)).unwrap();
        Peer {
            sock,
            reader: MessageReader::new(),
        }
    }

    /// Whatever comes next: a message, or the end of the connection.
    pub fn receive(&mut self) -> Received {
        self.reader.receive(self.sock.as_fd()).unwrap()
    }

    /// The next message: its value and its fd, if one came with it.
    pub fn recv(&mut self) -> (i64, Option<OwnedFd>) {
        match self.receive() {
            Received::Message { value, fd } => (value, fd),
            other => panic!("no message: {other:?}"),
        }
    }
}

/// Reads the child's piped stderr on a thread: every line is kept in the returned log and sent
/// on the channel.
pub fn stream_stderr(child: &mut Child) -> (Receiver<String>, Arc<Mutex<Vec<String>>>) {
    let stderr = child.stderr.take().expect("stderr must be piped");
    let (tx, rx) = mpsc::channel();
    let log = Arc::new(Mutex::new(Vec::new()));
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            kept.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    (rx, log)
}

/// Waits (at most [`READ_GUARD`]) for a line containing `needle`; returns it.
pub fn wait_line(lines: &Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + READ_GUARD;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line containing {needle:?}: {e}"),
        }
    }
}
