//! `ivshmem-client`: drop-in replacement for QEMU 7.2's `contrib/ivshmem-client` debug tool.
//!
//! It behaves like QEMU's program message by message, so it prints the same lines in the same
//! order: the flags (`-h`, `-v`, `-S PATH`) and usage; the stdin commands (`help`, `?`, `dump`,
//! `int all`, `int PEER VECTOR`, `int PEER all`, and, as QEMU reads `int PEER` followed by
//! anything that is not a number, every vector of PEER), read 127 bytes at a time and split at
//! newlines and `;`, with the `cmd> ` prompt after each read; the notification and `dump`
//! lines, with this process's fd numbers, which are QEMU's (socket, shared memory, then the
//! eventfds in the order they arrive); every `-v` line (`connect to client PATH`, `our_id=N`,
//! `shm_fd=N`, `new peer id = N`, `  new vector V (fd=N) for peer id P`, `delete peer id = P`,
//! `notify peer P on vector V, fd N`, `received event on fd N vector V: K`, `invalid vector V on
//! peer P`, `cannot connect to PATH: ...`); the server's disconnection (`disconnected from
//! server`, then a new connection attempt every second) and the reaction to a message QEMU's
//! client refuses (a leave of an unknown peer, a 65th vector: the same disconnection).
//!
//! That is why it is written on the wire codec ([`ivshm_proto`]) and not on the `ivshm_client`
//! library, whose peer table validates and reports joins its own way.
//!
//! Deliberately different (reasons in `docs/cli.md`, "Drop-in programs"): at the end of its
//! input, or when reading stdin fails, it stops reading stdin and goes on serving doorbells,
//! where QEMU's prints `cmd> ` in a busy loop (or reconnects over and over); a message with
//! several fds ends the connection.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use ivshm_client::{connect_socket, doorbell, ClientError};
use ivshm_proto::fd_passing::{FdPassingError, MessageReader, Received};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::Errno;

use ivshm_cli::dropin::{self, getopt::Getopt, strerror};

const DEFAULT_SOCKET: &str = "/tmp/ivshmem_socket";
/// QEMU's client keeps at most this many vectors per peer (`IVSHMEM_CLIENT_MAX_VECTORS`).
const MAX_VECTORS: usize = ivshm_proto::v0::MAX_VECTORS;
/// QEMU reads stdin into a 128-byte buffer, one byte kept for the terminating NUL.
const STDIN_READ: usize = 127;

/// Parsed command line.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    verbose: bool,
    socket: PathBuf,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Run(Args),
    /// `-h`: usage, exit 0.
    Help,
    /// Bad option: getopt's message, usage, exit 1.
    Usage(String),
}

/// getopt("hvS:") semantics ([`dropin::getopt`]).
fn parse_args(args: &[String]) -> Parsed {
    let mut out = Args {
        verbose: false,
        socket: PathBuf::from(DEFAULT_SOCKET),
    };
    for option in Getopt::new(args, "hvS:") {
        match option {
            Ok(('h', _)) => return Parsed::Help,
            Ok(('v', _)) => out.verbose = true,
            Ok(('S', Some(path))) => out.socket = PathBuf::from(path),
            Ok((c, _)) => return Parsed::Usage(format!("invalid option -- '{c}'")),
            Err(e) => return Parsed::Usage(e.to_string()),
        }
    }
    Parsed::Run(out)
}

fn usage(name: &str) -> String {
    format!(
        "{name} [opts]\n  -h: show this help\n  -v: verbose mode\n  -S <unix_sock_path>: path to the unix socket\n     to connect to.\n     default={DEFAULT_SOCKET}\n"
    )
}

const CMDLINE_HELP: &str = "dump: dump peers (including us)\n\
int <peer> <vector>: notify one vector on a peer\n\
int <peer> all: notify all vectors of a peer\n\
int all: notify all vectors of all peers (excepting us)\n";

/// One interactive command, as QEMU's client tells them apart.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Help,
    /// `?`: QEMU prints the help, then (as `?` is not `help`) `invalid command, type help`.
    Question,
    Dump,
    IntAll,
    /// `int PEER VECTOR` (`sscanf("int %d %d") == 2`).
    IntPeerVector(i32, i32),
    /// `int PEER` and anything that is not a number (`sscanf("int %d all") == 1`).
    IntPeerAll(i32),
    Invalid,
}

/// The commands in one read of stdin: up to the first NUL (QEMU handles a C string), split at
/// `\n`, `\r` and `;`, empty pieces skipped.
fn parse_commands(input: &[u8]) -> Vec<Command> {
    let text = input.split(|&b| b == 0).next().unwrap_or(&[]);
    text.split(|&b| matches!(b, b'\n' | b'\r' | b';'))
        .filter(|t| !t.is_empty())
        .map(parse_command)
        .collect()
}

fn parse_command(token: &[u8]) -> Command {
    match token {
        b"?" => return Command::Question,
        b"help" => return Command::Help,
        b"dump" => return Command::Dump,
        b"int all" => return Command::IntAll,
        _ => {}
    }
    // In a scanf format, the blank after "int" matches any white space, none included.
    let Some(rest) = token.strip_prefix(b"int") else {
        return Command::Invalid;
    };
    let Some((peer, rest)) = scan_int(rest) else {
        return Command::Invalid;
    };
    match scan_int(rest) {
        Some((vector, _)) => Command::IntPeerVector(peer, vector),
        None => Command::IntPeerAll(peer),
    }
}

/// The C locale's `isspace`.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// glibc's `%d`: white space, an optional sign, decimal digits; the value as `strtol` gives it
/// (clamped to 64 bits), stored into an `int` (cut to its low 32 bits). Returns the rest.
fn scan_int(s: &[u8]) -> Option<(i32, &[u8])> {
    let start = s.iter().position(|&b| !is_c_space(b))?;
    let s = &s[start..];
    let (negative, digits_at) = match s.first() {
        Some(b'-') => (true, 1),
        Some(b'+') => (false, 1),
        _ => (false, 0),
    };
    let digits = s[digits_at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 {
        return None;
    }
    let end = digits_at + digits;
    let mut magnitude: i128 = 0;
    for &b in &s[digits_at..end] {
        magnitude = (magnitude * 10 + i128::from(b - b'0')).min(i128::from(u64::MAX));
    }
    let value = if negative { -magnitude } else { magnitude };
    let long = value.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    Some((long as i32, &s[end..]))
}

/// Prints on stdout at once (QEMU's lines reach a terminal as they happen); a closed stdout is
/// not an error.
fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes());
    let _ = o.flush();
}

/// A peer as QEMU's client keeps it: its id and the eventfds of its vectors, in arrival order.
#[derive(Debug)]
struct PeerEntry {
    id: i64,
    vectors: Vec<OwnedFd>,
}

/// One connection to the server and what it has told us.
#[derive(Debug)]
struct Client {
    verbose: bool,
    sock: OwnedFd,
    reader: MessageReader,
    /// The shared memory: kept open (as QEMU's client does), never mapped.
    _shm: OwnedFd,
    local: PeerEntry,
    /// The other peers, in the order the server announced them.
    peers: Vec<PeerEntry>,
}

/// A failure that ends the connection (QEMU's `-1` returns).
#[derive(Debug)]
struct Failed;

/// A `-v` line.
fn debug(verbose: bool, line: std::fmt::Arguments<'_>) {
    if verbose {
        out(&format!("{line}\n"));
    }
}

/// Receives one whole message, waiting for it; prints QEMU's `cannot read message: ...` when
/// the connection fails or ends (`Success`: the server closed it, as QEMU reads a stale errno).
fn read_message(
    verbose: bool,
    sock: &OwnedFd,
    reader: &mut MessageReader,
) -> Result<(i64, Option<OwnedFd>), Failed> {
    loop {
        let why = match reader.receive(sock.as_fd()) {
            Ok(Received::Message { value, fd }) => return Ok((value, fd)),
            Ok(Received::WouldBlock) => {
                let mut fds = [PollFd::new(sock, PollFlags::IN)];
                match poll(&mut fds, None) {
                    Ok(_) | Err(Errno::INTR) => continue,
                    Err(e) => strerror(e),
                }
            }
            Ok(Received::Closed) | Err(FdPassingError::TruncatedMessage(_)) => {
                dropin::strerror_code(0)
            }
            Err(FdPassingError::Io(e)) => strerror(e),
            Err(e) => e.to_string(),
        };
        debug(verbose, format_args!("cannot read message: {why}"));
        return Err(Failed);
    }
}

impl Client {
    /// QEMU's `ivshmem_client_connect`: connect, then version, our id and the shared memory.
    fn connect(path: &std::path::Path, verbose: bool) -> Result<Client, Failed> {
        debug(
            verbose,
            format_args!("connect to client {}", path.display()),
        );
        if ivshm_proto::check_socket_path(path).is_err() {
            debug(verbose, format_args!("could not copy unix socket path"));
            return Err(Failed);
        }
        let sock = connect_socket(path).map_err(|e| {
            let why = match e {
                ClientError::Connect { error, .. } => strerror(error),
                other => other.to_string(),
            };
            debug(
                verbose,
                format_args!("cannot connect to {}: {why}", path.display()),
            );
            Failed
        })?;
        let mut reader = MessageReader::new();
        match read_message(verbose, &sock, &mut reader) {
            Ok((0, None)) => {}
            _ => {
                debug(verbose, format_args!("cannot read from server"));
                return Err(Failed);
            }
        }
        let id = match read_message(verbose, &sock, &mut reader) {
            Ok((id, None)) if id >= 0 => id,
            _ => {
                debug(verbose, format_args!("cannot read from server (2)"));
                return Err(Failed);
            }
        };
        debug(verbose, format_args!("our_id={id}"));
        let shm = match read_message(verbose, &sock, &mut reader) {
            Ok((-1, Some(fd))) => fd,
            _ => {
                debug(verbose, format_args!("cannot read from server (3)"));
                return Err(Failed);
            }
        };
        debug(verbose, format_args!("shm_fd={}", shm.as_raw_fd()));
        Ok(Client {
            verbose,
            sock,
            reader,
            _shm: shm,
            local: PeerEntry {
                id,
                vectors: Vec::new(),
            },
            peers: Vec::new(),
        })
    }

    /// The peer (ourselves included) with id `id`.
    fn find(&self, id: i64) -> Option<&PeerEntry> {
        if id == self.local.id {
            return Some(&self.local);
        }
        self.peers.iter().find(|p| p.id == id)
    }

    /// QEMU's `ivshmem_client_handle_server_msg`: one message, a new vector or a leave.
    fn handle_server_message(&mut self) -> Result<(), Failed> {
        let verbose = self.verbose;
        let (id, fd) = read_message(verbose, &self.sock, &mut self.reader)?;
        let Some(fd) = fd else {
            return match self.peers.iter().position(|p| p.id == id) {
                Some(at) => {
                    debug(verbose, format_args!("delete peer id = {id}"));
                    self.peers.remove(at);
                    Ok(())
                }
                None => {
                    debug(
                        verbose,
                        format_args!("receive delete for invalid peer {id}"),
                    );
                    Err(Failed)
                }
            };
        };
        let peer = if id == self.local.id {
            &mut self.local
        } else if let Some(at) = self.peers.iter().position(|p| p.id == id) {
            &mut self.peers[at]
        } else {
            self.peers.push(PeerEntry {
                id,
                vectors: Vec::new(),
            });
            debug(verbose, format_args!("new peer id = {id}"));
            let last = self.peers.len() - 1;
            &mut self.peers[last]
        };
        debug(
            verbose,
            format_args!(
                "  new vector {} (fd={}) for peer id {}",
                peer.vectors.len(),
                fd.as_raw_fd(),
                peer.id
            ),
        );
        if peer.vectors.len() >= MAX_VECTORS {
            // QEMU's line has no newline.
            if verbose {
                out("Too many vectors received, failing");
            }
            return Err(Failed);
        }
        peer.vectors.push(fd);
        Ok(())
    }

    /// QEMU's `ivshmem_client_notify`.
    fn notify(&self, peer: &PeerEntry, vector: u32) {
        let Some(fd) = usize::try_from(vector)
            .ok()
            .and_then(|v| peer.vectors.get(v))
        else {
            debug(
                self.verbose,
                format_args!("invalid vector {vector} on peer {}", peer.id),
            );
            return;
        };
        debug(
            self.verbose,
            format_args!(
                "notify peer {} on vector {vector}, fd {}",
                peer.id,
                fd.as_raw_fd()
            ),
        );
        if let Err(e) = doorbell::ring(fd.as_fd()) {
            eprintln!("could not write to {}: {}", fd.as_raw_fd(), strerror(e));
        }
    }

    fn notify_all_vectors(&self, peer: &PeerEntry) {
        for vector in 0..peer.vectors.len() {
            self.notify(peer, u32::try_from(vector).unwrap_or(u32::MAX));
        }
    }

    fn dump(&self) {
        let mut text = String::new();
        for (label, peer) in std::iter::once(("our_id", &self.local))
            .chain(self.peers.iter().map(|p| ("peer_id", p)))
        {
            text += &format!("{label} = {}\n", peer.id);
            for (v, fd) in peer.vectors.iter().enumerate() {
                text += &format!("  vector {v} is enabled (fd={})\n", fd.as_raw_fd());
            }
        }
        out(&text);
    }

    fn execute(&self, command: &Command) {
        let find = |id: i32| {
            let peer = self.find(i64::from(id));
            if peer.is_none() {
                out(&format!("cannot find peer_id = {id}\n"));
            }
            peer
        };
        match *command {
            Command::Help => out(CMDLINE_HELP),
            Command::Question => {
                out(CMDLINE_HELP);
                out("invalid command, type help\n");
            }
            Command::Dump => self.dump(),
            Command::IntAll => {
                for peer in &self.peers {
                    self.notify_all_vectors(peer);
                }
            }
            Command::IntPeerVector(id, vector) => {
                if let Some(peer) = find(id) {
                    // QEMU passes the int as an unsigned.
                    self.notify(peer, vector as u32);
                }
            }
            Command::IntPeerAll(id) => {
                if let Some(peer) = find(id) {
                    self.notify_all_vectors(peer);
                }
            }
            Command::Invalid => out("invalid command, type help\n"),
        }
    }

    /// QEMU's `ivshmem_client_handle_event` for the vectors that `poll` found readable.
    fn handle_doorbells(&self, readable: &[usize]) -> Result<(), Failed> {
        for &v in readable {
            let Some(fd) = self.local.vectors.get(v) else {
                continue;
            };
            match doorbell::drain(fd.as_fd()) {
                Ok(Some(count)) => {
                    debug(
                        self.verbose,
                        format_args!(
                            "received event on fd {} vector {v}: {count}",
                            fd.as_raw_fd()
                        ),
                    );
                    out(&format!(
                        "receive notification from peer_id={} vector={v}\n",
                        self.local.id
                    ));
                }
                Ok(None) => {}
                Err(_) => {
                    debug(
                        self.verbose,
                        format_args!("ivshmem_client_handle_event() failed"),
                    );
                    return Err(Failed);
                }
            }
        }
        Ok(())
    }
}

/// Reads one chunk of stdin and runs its commands; `false` when stdin is done: at the end of
/// the input (QEMU would print `cmd> ` for ever from then on) or after a read error (QEMU would
/// drop the connection and connect again, over and over).
fn handle_stdin(client: &Client) -> bool {
    let mut buf = [0u8; STDIN_READ];
    let n = loop {
        match rustix::io::read(std::io::stdin().as_fd(), &mut buf) {
            Ok(n) => break n,
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) => return true,
            Err(_) => {
                eprintln!("ivshmem_client_handle_stdin_command() failed");
                return false;
            }
        }
    };
    if n == 0 {
        return false;
    }
    for command in parse_commands(&buf[..n]) {
        client.execute(&command);
    }
    out("cmd> ");
    true
}

/// QEMU's `ivshmem_client_poll_events`: stdin, then one server message, then the doorbells,
/// per wake-up, until something fails.
fn serve(client: &mut Client, stdin_open: &mut bool) {
    let stdin = std::io::stdin();
    loop {
        let (stdin_ready, socket_ready, doorbells) = {
            let mut fds = Vec::with_capacity(2 + client.local.vectors.len());
            fds.push(PollFd::new(&client.sock, PollFlags::IN));
            for fd in &client.local.vectors {
                fds.push(PollFd::new(fd, PollFlags::IN));
            }
            if *stdin_open {
                fds.push(PollFd::new(&stdin, PollFlags::IN));
            }
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => {
                    eprintln!("select error: {}", strerror(e));
                    return;
                }
            }
            let ready = |f: &PollFd<'_>| !f.revents().is_empty();
            let vectors = client.local.vectors.len();
            let doorbells: Vec<usize> = (0..vectors).filter(|&v| ready(&fds[1 + v])).collect();
            let stdin_ready = *stdin_open && ready(&fds[1 + vectors]);
            (stdin_ready, ready(&fds[0]), doorbells)
        };
        if stdin_ready {
            *stdin_open = handle_stdin(client);
        }
        let handled = if socket_ready {
            let verbose = client.verbose;
            client.handle_server_message().inspect_err(|_| {
                debug(
                    verbose,
                    format_args!("ivshmem_client_handle_server_msg() failed"),
                );
            })
        } else {
            Ok(())
        };
        if handled
            .and_then(|()| client.handle_doorbells(&doorbells))
            .is_err()
        {
            eprintln!("ivshmem_client_handle_fds() failed");
            return;
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let name = argv.first().map_or("ivshmem-client", String::as_str);
    let args = match parse_args(argv.get(1..).unwrap_or(&[])) {
        Parsed::Run(a) => a,
        Parsed::Help => {
            eprint!("{}", usage(name));
            std::process::exit(0);
        }
        Parsed::Usage(message) => {
            eprintln!("{name}: {message}");
            eprint!("{}", usage(name));
            std::process::exit(1);
        }
    };
    // QEMU's program prints only its own lines: logs only when RUST_LOG asks for them.
    dropin::init_logging("off");
    out(CMDLINE_HELP);
    out("cmd> ");
    let mut stdin_open = true;
    loop {
        let Ok(mut client) = Client::connect(&args.socket, args.verbose) else {
            eprintln!("cannot connect to server, retry in 1 second");
            std::thread::sleep(Duration::from_secs(1));
            continue;
        };
        out(&format!(
            "listen on server socket {}\n",
            client.sock.as_raw_fd()
        ));
        serve(&mut client, &mut stdin_open);
        out("disconnected from server\n");
        debug(args.verbose, format_args!("close client"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags_like_getopt() {
        assert_eq!(
            parse_args(&s(&[])),
            Parsed::Run(Args {
                verbose: false,
                socket: PathBuf::from("/tmp/ivshmem_socket")
            })
        );
        assert_eq!(
            parse_args(&s(&["-v", "-S", "/x"])),
            Parsed::Run(Args {
                verbose: true,
                socket: PathBuf::from("/x")
            })
        );
        assert_eq!(
            parse_args(&s(&["-vS/y"])),
            Parsed::Run(Args {
                verbose: true,
                socket: PathBuf::from("/y")
            })
        );
        assert_eq!(parse_args(&s(&["-h"])), Parsed::Help);
        assert_eq!(
            parse_args(&s(&["-x"])),
            Parsed::Usage("invalid option -- 'x'".into())
        );
        assert_eq!(
            parse_args(&s(&["-S"])),
            Parsed::Usage("option requires an argument -- 'S'".into())
        );
    }

    #[test]
    fn commands_like_qemu() {
        use Command::*;
        assert_eq!(
            parse_commands(b"help\n?;dump\r\nint all;int 3 1;int 2 all;int x;bogus\n"),
            vec![
                Help,
                Question,
                Dump,
                IntAll,
                IntPeerVector(3, 1),
                IntPeerAll(2),
                Invalid,
                Invalid
            ]
        );
        assert_eq!(parse_command(b"int 1 2 extra"), IntPeerVector(1, 2));
        assert_eq!(parse_command(b"int  -1 0"), IntPeerVector(-1, 0));
        assert_eq!(parse_command(b"int1 2"), IntPeerVector(1, 2));
        assert_eq!(parse_command(b"int 1 2x"), IntPeerVector(1, 2));
        assert_eq!(parse_command(b"int +1\t+2"), IntPeerVector(1, 2));
        // "int %d all" matches as soon as the peer is read: anything may follow.
        assert_eq!(parse_command(b"int 1"), IntPeerAll(1));
        assert_eq!(parse_command(b"int 1 foo"), IntPeerAll(1));
        assert_eq!(parse_command(b"int 1 -"), IntPeerAll(1));
        assert_eq!(parse_command(b"int 0x10 1"), IntPeerAll(0));
        for bad in [
            &b"int"[..],
            b"int ",
            b"int x",
            b"intx 1",
            b" int 1 0",
            b"dump ",
            b"int all ",
        ] {
            assert_eq!(parse_command(bad), Invalid, "{bad:?}");
        }
        // Numbers are cut to an int the way scanf stores strtol's long.
        assert_eq!(parse_command(b"int 4294967297 0"), IntPeerVector(1, 0));
        assert_eq!(
            parse_command(b"int 99999999999999999999 0"),
            IntPeerVector(-1, 0)
        );
        assert_eq!(parse_command(b"int 0 -1"), IntPeerVector(0, -1));
        // A C string ends at its first NUL.
        assert_eq!(parse_commands(b"dump\0int all\n"), vec![Dump]);
        assert_eq!(parse_commands(b"\n;\r\n"), vec![]);
    }

    proptest! {
        #[test]
        fn scan_int_reads_what_it_prints(n in any::<i32>(), pad in "[ \t]{0,3}") {
            let text = format!("{pad}{n} rest");
            let (value, rest) = scan_int(text.as_bytes()).unwrap();
            prop_assert_eq!(value, n);
            prop_assert_eq!(rest, &b" rest"[..]);
        }

        #[test]
        fn command_parser_never_panics(input in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_commands(&input);
        }
    }
}
