//! `ivshmem-client`: drop-in replacement for QEMU's `contrib/ivshmem-client` debug tool.
//!
//! Same flags (`-h`, `-v`, `-S PATH`), same interactive stdin commands (`help`/`?`, `dump`,
//! `int <peer> <vector>`, `int <peer> all`, `int all`; several per line separated by `;`) and
//! the same output lines. While the server is absent it retries every second, as QEMU's does.
//!
//! Differences from QEMU's program: end of input on stdin stops reading it (QEMU spins), and
//! `?` prints the help only (QEMU also prints "invalid command").

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::time::Duration;

use ivshm_client::{ClientError, ConnectOptions, Event, Peer};
use rustix::event::{poll, PollFd, PollFlags};

#[path = "dropin/mod.rs"]
mod dropin;
use dropin::getopt::Getopt;

const DEFAULT_SOCKET: &str = "/tmp/ivshmem_socket";

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
    /// Bad option: usage, exit 1.
    Usage,
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
            Ok(_) | Err(_) => return Parsed::Usage,
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

/// One interactive command.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Help,
    Dump,
    IntAll,
    IntPeerAll(i64),
    IntPeerVector(i64, i64),
    Invalid,
}

/// Splits stdin input into commands on `\n`, `\r` and `;`, skipping empty ones.
fn parse_commands(input: &str) -> Vec<Command> {
    input
        .split(['\n', '\r', ';'])
        .filter(|t| !t.is_empty())
        .map(parse_command)
        .collect()
}

fn parse_command(token: &str) -> Command {
    match token {
        "?" | "help" => return Command::Help,
        "dump" => return Command::Dump,
        "int all" => return Command::IntAll,
        _ => {}
    }
    // Like sscanf("int %d %d") / sscanf("int %d all"): extra trailing text is ignored.
    let Some(rest) = token.strip_prefix("int") else {
        return Command::Invalid;
    };
    let mut words = rest.split_whitespace();
    let Some(peer) = words.next().and_then(|w| w.parse::<i64>().ok()) else {
        return Command::Invalid;
    };
    match words.next() {
        Some(w) if w.starts_with("all") => Command::IntPeerAll(peer),
        Some(w) => match leading_int(w) {
            Some(v) => Command::IntPeerVector(peer, v),
            None => Command::Invalid,
        },
        None => Command::Invalid,
    }
}

/// The integer at the start of `w` (like `%d`).
fn leading_int(w: &str) -> Option<i64> {
    let end = w
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && (c == '-' || c == '+'))))
        .map_or(w.len(), |(i, _)| i);
    w[..end].parse().ok()
}

fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes());
    let _ = o.flush();
}

fn prompt() {
    out("cmd> ");
}

fn dump(peer: &Peer) {
    let fd_of = |fd: Option<BorrowedFd<'_>>| fd.map_or(-1, |f| f.as_raw_fd());
    let mut text = format!("our_id = {}\n", peer.id());
    for v in 0..peer.vectors() {
        text += &format!(
            "  vector {v} is enabled (fd={})\n",
            fd_of(peer.own_vector_fd(v))
        );
    }
    for id in peer.peer_ids() {
        text += &format!("peer_id = {id}\n");
        for v in 0..peer.peer_vectors(id).unwrap_or(0) {
            text += &format!(
                "  vector {v} is enabled (fd={})\n",
                fd_of(peer.peer_vector_fd(id, v))
            );
        }
    }
    out(&text);
}

fn ring(peer: &Peer, id: u16, vector: usize) {
    if let Err(e) = peer.notify(id, vector) {
        tracing::debug!("notify peer {id} vector {vector}: {e}");
        if !matches!(e, ClientError::UnknownVector { .. }) {
            eprintln!("could not notify peer {id} vector {vector}: {e}");
        }
    }
}

fn vectors_of(peer: &Peer, id: u16) -> usize {
    if id == peer.id() {
        peer.vectors()
    } else {
        peer.peer_vectors(id).unwrap_or(0)
    }
}

/// Finds a peer (ourselves included) by the number the user typed.
fn find_peer(peer: &Peer, id: i64) -> Option<u16> {
    let id = u16::try_from(id).ok()?;
    (id == peer.id() || peer.peer_ids().contains(&id)).then_some(id)
}

fn execute(peer: &Peer, command: Command) {
    match command {
        Command::Help => out(CMDLINE_HELP),
        Command::Dump => dump(peer),
        Command::IntAll => {
            for id in peer.peer_ids() {
                for v in 0..vectors_of(peer, id) {
                    ring(peer, id, v);
                }
            }
        }
        Command::IntPeerAll(id) => match find_peer(peer, id) {
            Some(id) => {
                for v in 0..vectors_of(peer, id) {
                    ring(peer, id, v);
                }
            }
            None => out(&format!("cannot find peer_id = {id}\n")),
        },
        Command::IntPeerVector(id, v) => match find_peer(peer, id) {
            Some(id) => match usize::try_from(v) {
                Ok(v) => ring(peer, id, v),
                Err(_) => tracing::debug!("invalid vector {v} on peer {id}"),
            },
            None => out(&format!("cannot find peer_id = {id}\n")),
        },
        Command::Invalid => out("invalid command, type help\n"),
    }
}

/// Why the session with one server ended.
enum Ended {
    Disconnected,
}

/// Serves one connection: stdin commands, doorbells, peer changes, until the server goes.
fn session(peer: &mut Peer, stdin_open: &mut bool) -> anyhow::Result<Ended> {
    let stdin = std::io::stdin();
    loop {
        let stdin_ready = {
            let peer_fd = peer.poll_fd();
            let mut fds = vec![PollFd::new(&peer_fd, PollFlags::IN)];
            if *stdin_open {
                fds.push(PollFd::new(&stdin, PollFlags::IN));
            }
            match poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => anyhow::bail!("select error: {e}"),
            }
            fds.get(1).is_some_and(|f| !f.revents().is_empty())
        };
        if stdin_ready {
            let mut buf = [0u8; 4096];
            match rustix::io::read(stdin.as_fd(), &mut buf) {
                Ok(0) => {
                    tracing::debug!("end of input on stdin");
                    *stdin_open = false;
                }
                Ok(n) => {
                    for command in parse_commands(&String::from_utf8_lossy(&buf[..n])) {
                        execute(peer, command);
                    }
                    prompt();
                }
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Err(e) => anyhow::bail!("reading stdin: {e}"),
            }
        }
        while let Some(event) = peer.wait(Some(Duration::ZERO))? {
            match event {
                Event::Doorbell { vector } => out(&format!(
                    "receive notification from peer_id={} vector={vector}\n",
                    peer.id()
                )),
                Event::Peer(e) => tracing::debug!("{e:?}"),
                Event::ServerGone => return Ok(Ended::Disconnected),
                Event::Reconnected { .. } => {}
            }
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
        Parsed::Usage => {
            eprint!("{}", usage(name));
            std::process::exit(1);
        }
    };
    init_logging(args.verbose);
    out(CMDLINE_HELP);
    prompt();
    let mut stdin_open = true;
    loop {
        let mut peer = match Peer::connect(&args.socket, ConnectOptions::default()) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!("cannot connect to {}: {e}", args.socket.display());
                eprintln!("cannot connect to server, retry in 1 second");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        out(&format!(
            "listen on server socket {}\n",
            peer.socket_fd().as_raw_fd()
        ));
        match session(&mut peer, &mut stdin_open) {
            Ok(Ended::Disconnected) => out("disconnected from server\n"),
            Err(e) => {
                eprintln!("ivshmem-client: {e:#}");
                out("disconnected from server\n");
            }
        }
    }
}

fn init_logging(verbose: bool) {
    dropin::init_logging(if verbose { "debug" } else { "warn" });
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(parse_args(&s(&["-x"])), Parsed::Usage);
        assert_eq!(parse_args(&s(&["-S"])), Parsed::Usage);
    }

    #[test]
    fn commands_like_qemu() {
        assert_eq!(
            parse_commands("help\n?;dump\r\nint all;int 3 1;int 2 all;int x;bogus\n"),
            vec![
                Command::Help,
                Command::Help,
                Command::Dump,
                Command::IntAll,
                Command::IntPeerVector(3, 1),
                Command::IntPeerAll(2),
                Command::Invalid,
                Command::Invalid,
            ]
        );
        assert_eq!(parse_command("int 1 2 extra"), Command::IntPeerVector(1, 2));
        assert_eq!(parse_command("int  -1 0"), Command::IntPeerVector(-1, 0));
        assert_eq!(parse_command("int 1"), Command::Invalid);
    }
}
