//! The layout is implementable from its specification alone: `tests/c/channel_peer.c` is a
//! second implementation of `docs/channel-spec.md`, in C11 (`<stdatomic.h>`), written from the
//! document without the Rust code, and these tests run it against this library over a local
//! bus (memfd + eventfds inherited by the C process): it formats a blank region the library
//! then opens (every header field validated), joins a channel the library created, or creates
//! one the library joins, echoes messages of every size from 1 byte to the ring's
//! largest (wrapping around the ring many times, records inline and aligned), waking and being
//! woken through the event words and the doorbells only (no spinning on either side), then
//! closes its side, which the library sees after the last message.
//!
//! The C compiler is `$CC`, else `cc` (the one Rust links with).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ivshm_channel::local::LocalBus;
use ivshm_channel::traffic::Stream;
use ivshm_channel::{Channel, ChannelError, ChannelOptions, FormatOptions, Region, Side, Spin};

const MESSAGES: u64 = 3000;
const LONG: Option<Duration> = Some(Duration::from_secs(60));

/// The C peer, compiled once per test binary (with every warning an error).
fn c_peer() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/channel_peer.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("channel_peer");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let status = Command::new(&cc)
            .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&out)
            .arg(&source)
            .status()
            .unwrap_or_else(|e| panic!("running the C compiler {cc}: {e}"));
        assert!(status.success(), "{cc} failed on {}", source.display());
        out
    })
}

/// A bus of two peers (0: this process, 1: the C peer) and our region, formatted.
fn bus_and_region() -> (LocalBus, Region) {
    let bus = LocalBus::new(4 << 20, 2, 1).unwrap();
    let fmt = FormatOptions {
        channels: 8,
        ring_size_max: 64 << 10,
    };
    let region =
        Region::open_or_format(bus.map().unwrap(), Arc::new(bus.doorbell(0).unwrap()), fmt)
            .unwrap();
    (bus, region)
}

fn spawn_c_peer(bus: &LocalBus, name: &str) -> std::process::Child {
    c_peer_command(bus, &["echo", name, &MESSAGES.to_string()])
        .spawn()
        .unwrap()
}

fn c_peer_command(bus: &LocalBus, args: &[&str]) -> Command {
    let mut cmd = Command::new(c_peer());
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    bus.pass_to(&mut cmd, 1).unwrap();
    cmd
}

/// Message `i`: the edges first (1 byte, the largest inline payload and one more, the largest
/// message), then numbered, checksummed messages of log-uniform sizes up to the largest
/// (`ivshm_channel::traffic`).
fn message(i: u64, max: usize, buf: &mut Vec<u8>) {
    match i {
        0..=3 => {
            let len = [1, 56, 57, max][i as usize];
            buf.clear();
            buf.resize(len, 0xa0 + i as u8);
        }
        _ => Stream::of("c-peer", Side::A, max).message(i, buf),
    }
}

/// Sends `MESSAGES` messages and receives each back, from two threads at once; then the C
/// peer's close is seen after the last echo.
fn echo_through(ch: Channel) {
    let max = ch.max_message();
    assert_eq!(max, (64 << 10) - 64);
    let (mut tx, mut rx) = ch.split();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut m = Vec::new();
            for i in 0..MESSAGES {
                message(i, max, &mut m);
                tx.send(&m, LONG)
                    .unwrap_or_else(|e| panic!("send {i}: {e}"));
            }
            // Keep our side open until the echoes are in.
            tx
        });
        let (mut buf, mut want) = (Vec::new(), Vec::new());
        for i in 0..MESSAGES {
            rx.recv(&mut buf, LONG)
                .unwrap_or_else(|e| panic!("echo {i}: {e}"));
            message(i, max, &mut want);
            assert!(buf == want, "echo {i} differs");
        }
        assert!(
            matches!(rx.recv(&mut buf, LONG), Err(ChannelError::PeerClosed)),
            "the C peer's close must be seen after its last message"
        );
    });
}

fn finish(child: std::process::Child, side: &str) {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "C peer: {}\n{stdout}{stderr}",
        out.status
    );
    let slept: u64 = stdout
        .strip_prefix(&format!("side={side}\nechoed {MESSAGES} slept="))
        .and_then(|rest| rest.strip_suffix('\n'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("C peer's output: {stdout}"));
    // Woken by our doorbell rings, not by spinning: it slept at least before the first message.
    assert!(slept > 0, "the C peer never slept");
    eprintln!("C peer ({side}): {MESSAGES} messages echoed, slept {slept} times");
}

#[test]
fn a_c_implementation_joins_a_channel_this_library_created() {
    let (bus, region) = bus_and_region();
    let opts = ChannelOptions {
        spin: Spin::Never,
        ..ChannelOptions::default()
    };
    let ch = region.channel("made-in-rust", opts).unwrap();
    assert_eq!(ch.side(), Side::A);
    let child = spawn_c_peer(&bus, "made-in-rust");
    echo_through(ch);
    finish(child, "b");
    // Both sides closed: the entry is free again.
    assert!(region.channels().unwrap().is_empty());
}

#[test]
fn this_library_joins_a_channel_a_c_implementation_created() {
    // The C peer formats the blank region; this library validates every header field.
    let bus = LocalBus::new(4 << 20, 2, 1).unwrap();
    let out = c_peer_command(&bus, &["format", "8", "65536"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let region = Region::open(bus.map().unwrap(), Arc::new(bus.doorbell(0).unwrap()))
        .expect("a region the C peer formatted");
    let geo = region.geometry();
    assert_eq!((geo.channels, geo.ring_size), (8, 65536));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "formatted channels=8 ring_size=65536 layout_size={}\n",
            geo.layout_size()
        )
    );
    let child = spawn_c_peer(&bus, "made-in-c");
    // Wait for the C peer's entry: side A attached by peer 1, side B empty.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !region.channels().unwrap().iter().any(|c| {
        c.name == b"made-in-c" && c.a.state == "attached" && c.a.peer == 1 && c.b.state == "empty"
    }) {
        assert!(
            Instant::now() < deadline,
            "the C peer did not create its channel"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let ch = region
        .channel("made-in-c", ChannelOptions::default())
        .unwrap();
    assert_eq!(ch.side(), Side::B);
    assert_eq!(ch.peer(), Some(1));
    echo_through(ch);
    finish(child, "a");
    assert!(region.channels().unwrap().is_empty());
}
