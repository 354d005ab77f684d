//! The C API against `ivshm serve` (host peers):
//!
//! - examples/c/chat.c, compiled with `cc` against include/ivshm.h and libivshm.a, exchanges
//!   checksummed messages with the Rust CLI both ways: chat.c sends and `ivshm chan recv`
//!   prints what arrives (checked here: checksum, sequence, whole text); `ivshm chan send`
//!   sends and chat.c receives and checks (a damaged message makes it fail, naming it);
//! - the entry points called as C calls them (through the rlib, same code): NULL pointers, bad
//!   names (too long, unterminated past the limit, not UTF-8, empty), lengths, the receive
//!   buffer growth, waits, timeouts, the poll fd, the peer's state, status messages, a hostile
//!   record length (`CHANNEL_CORRUPT`, the region's other channel unharmed), a departed peer
//!   marked from the server's messages.

mod common;

use std::ffi::{c_char, CStr};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::ptr::{null, null_mut};

use common::{compile_static, ivshm, message, recv_text_messages, serve, verify, STEP};
use ivshm::*;
use ivshm_test_support::process::{HostProcess, Stream};
use ivshm_test_support::socket_path;

/// chat.c, built once into the test's temporary directory.
fn chat() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chat-static");
            compile_static(&common::crate_dir().join("examples/c/chat.c"), &out);
            out
        })
        .clone()
}

const COUNT: u64 = 2000;

#[test]
fn c_sends_and_ivshm_chan_recv_checks_every_message() {
    let socket = socket_path("capi-c-send");
    let _server = serve(&socket, "4M");
    let mut c = Command::new(chat());
    c.arg("send")
        .arg(&socket)
        .args(["c-to-rust", &COUNT.to_string()]);
    let mut sender = HostProcess::spawn("chat send", c).unwrap();
    let out = common::run_ok({
        let mut r = Command::new(ivshm());
        r.args(["chan", "recv", "--socket"])
            .arg(&socket)
            .args(["--name", "c-to-rust", "--count", &COUNT.to_string()])
            .args(["--timeout", "120", "--format", "text"]);
        r
    });
    sender.wait_success(STEP).unwrap();
    let messages = recv_text_messages(&out);
    assert_eq!(messages.len() as u64, COUNT, "{out:.400}");
    for (seq, m) in messages.iter().enumerate() {
        verify(seq as u64, m);
    }
    assert_eq!(
        sender.lines(Stream::Stdout).last().map(String::as_str),
        Some(format!("sent {COUNT} messages").as_str())
    );
}

/// `ivshm chan send` of `lines` (one message each) on `name`; returns chat.c's receiver after
/// it ended, and whether it succeeded.
fn rust_sends(name: &str, lines: &[String], count: u64) -> (bool, HostProcess) {
    let socket = socket_path("capi-c-recv");
    let _server = serve(&socket, "4M");
    let mut c = Command::new(chat());
    c.arg("recv").arg(&socket).args([name, &count.to_string()]);
    let mut receiver = HostProcess::spawn("chat recv", c).unwrap();
    let mut send = Command::new(ivshm());
    send.args(["chan", "send", "--socket"])
        .arg(&socket)
        .args(["--name", name, "--timeout", "120"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut sender = send.spawn().unwrap();
    let mut stdin = sender.stdin.take().unwrap();
    for l in lines {
        writeln!(stdin, "{l}").unwrap();
    }
    drop(stdin);
    let ok = receiver.wait_exit(STEP).unwrap().success();
    // The sender ends once the receiver joined (or its timeout passed).
    let _ = sender.wait();
    (ok, receiver)
}

#[test]
fn ivshm_chan_send_and_c_receives_and_checks_every_message() {
    let lines: Vec<String> = (0..COUNT).map(message).collect();
    let (ok, receiver) = rust_sends("rust-to-c", &lines, COUNT);
    assert!(ok, "{}", receiver.failure_context());
    let bytes: usize = lines.iter().map(String::len).sum();
    assert_eq!(
        receiver.lines(Stream::Stdout).last().map(String::as_str),
        Some(format!("received {COUNT} messages, {bytes} bytes, all verified").as_str())
    );
}

#[test]
fn the_c_receiver_names_a_damaged_message() {
    let mut lines: Vec<String> = (0..10).map(message).collect();
    // The first payload letter of message 5 changed: its checksum no longer matches.
    let mut bytes = lines[5].clone().into_bytes();
    let i = bytes.iter().position(|&b| b == b' ').unwrap() + 1;
    bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
    lines[5] = String::from_utf8(bytes).unwrap();
    let (ok, receiver) = rust_sends("damaged", &lines, 10);
    assert!(!ok, "the receiver accepted a damaged message");
    let err = receiver.output(Stream::Stderr);
    assert!(
        err.contains("message 5 (") && err.contains("fails its checksum"),
        "{err}"
    );
}

#[test]
fn chat_takes_a_guest_device_as_ivshm_guest_chan_does() {
    // The guest path itself runs in a QEMU guest (crates/e2e/tests/guest_channels.rs); here, on
    // the host, the arguments reach ivshm_region_open_guest and its errors come back.
    for (args, status, want) in [
        (
            &["guest", "send", "--dev", "what", "c", "1"][..],
            1,
            "chat: open region: invalid argument (device \"what\": `what` is not a PCI address",
        ),
        (
            &["guest", "recv", "--dev", "00:1f.7", "c", "1"],
            1,
            "opening the ivshmem device: no recognised shared-memory device at 0000:00:1f.7",
        ),
        (
            &["guest", "send", "c"],
            2,
            "usage: chat send|recv SOCKET NAME COUNT",
        ),
        (
            &["guest", "send", "--dev", "0", "c", "x"],
            2,
            "COUNT must be a number",
        ),
    ] {
        let out = Command::new(chat()).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(status), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn installed_with_scripts_install_capi_pkg_config_builds_the_example() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let prefix = tmp.join(format!("capi-prefix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&prefix);
    let mut install = Command::new(common::crate_dir().join("../../scripts/install-capi"));
    install
        .arg("--from")
        .arg(common::library_dir())
        .arg(&prefix);
    common::run_ok(install);
    for file in [
        "lib/libivshm.a",
        "include/ivshm.h",
        "lib/pkgconfig/ivshm.pc",
    ] {
        assert!(prefix.join(file).is_file(), "{file} not installed");
    }
    // libivshm.so.X.Y.Z, with SONAME libivshm.so.X, and the symlinks libivshm.so.X (what
    // programs load) and libivshm.so (what -livshm finds).
    let lib_dir = prefix.join("lib");
    let real = format!("libivshm.so.{}", env!("CARGO_PKG_VERSION"));
    let soname = format!("libivshm.so.{}", env!("CARGO_PKG_VERSION_MAJOR"));
    let meta = std::fs::symlink_metadata(lib_dir.join(&real)).unwrap();
    assert!(meta.is_file(), "{real} is not a regular file");
    for (link, target) in [(soname.as_str(), real.as_str()), ("libivshm.so", &soname)] {
        assert_eq!(
            std::fs::read_link(lib_dir.join(link)).ok(),
            Some(PathBuf::from(target)),
            "{link} does not link to {target}"
        );
    }
    assert_eq!(
        dynamic_entries(&lib_dir.join(&real), "SONAME"),
        std::slice::from_ref(&soname)
    );
    // cc $(pkg-config --cflags --libs ivshm), as the README says.
    let pkg_config_path = prefix.join("lib/pkgconfig");
    let flags = common::run_ok({
        let mut c = Command::new("pkg-config");
        c.args(["--cflags", "--libs", "ivshm"])
            .env("PKG_CONFIG_PATH", &pkg_config_path);
        c
    });
    assert!(
        flags.contains(&format!("-I{}", prefix.join("include").display()))
            && flags.contains(&format!("-L{}", lib_dir.display()))
            && flags.contains("-livshm"),
        "{flags}"
    );
    let program = tmp.join(format!("chat-pkg-config-{}", std::process::id()));
    common::run_ok({
        let mut cc = Command::new("sh");
        cc.arg("-c")
            .arg(r#"cc -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror "$1" $(pkg-config --cflags --libs ivshm) -o "$2""#)
            .arg("sh")
            .arg(common::crate_dir().join("examples/c/chat.c"))
            .arg(&program)
            .env("PKG_CONFIG_PATH", &pkg_config_path);
        cc
    });
    // Linked with the shared library: it records the SONAME, not the name it was linked by,
    // loads the installed library through the SONAME's symlink, and talks to the CLI.
    let needed = dynamic_entries(&program, "NEEDED");
    assert!(
        needed.contains(&soname) && !needed.iter().any(|n| n == "libivshm.so"),
        "{needed:?}"
    );
    let ldd = common::run_ok({
        let mut c = Command::new("ldd");
        c.arg(&program).env("LD_LIBRARY_PATH", &lib_dir);
        c
    });
    let loads = format!("{soname} => {}", lib_dir.join(&soname).display());
    assert!(ldd.lines().any(|l| l.trim().starts_with(&loads)), "{ldd}");
    let socket = socket_path("capi-pkg-config");
    let _server = serve(&socket, "4M");
    let mut c = Command::new(&program);
    c.arg("send")
        .arg(&socket)
        .args(["pkg-config", "100"])
        .env("LD_LIBRARY_PATH", &lib_dir);
    let mut sender = HostProcess::spawn("chat send (shared)", c).unwrap();
    let out = common::run_ok({
        let mut r = Command::new(ivshm());
        r.args(["chan", "recv", "--socket"]).arg(&socket).args([
            "--name",
            "pkg-config",
            "--count",
            "100",
            "--timeout",
            "120",
        ]);
        r
    });
    sender.wait_success(STEP).unwrap();
    let data = recv_text_messages(&out);
    assert_eq!(data.len(), 100, "{out:.400}");
    for (seq, d) in data.iter().enumerate() {
        verify(seq as u64, d);
    }
    let _ = std::fs::remove_dir_all(&prefix);
    let _ = std::fs::remove_file(&program);
}

/// The values of an ELF file's dynamic-section entries of `tag` (`SONAME`, `NEEDED`), as
/// `readelf -d` prints them: `0x... (NEEDED)  Shared library: [libc.so.6]`.
fn dynamic_entries(file: &Path, tag: &str) -> Vec<String> {
    let out = common::run_ok({
        let mut c = Command::new("readelf");
        c.arg("-d").arg(file);
        c
    });
    let marker = format!("({tag})");
    out.lines()
        .filter(|l| l.contains(&marker))
        .filter_map(|l| {
            let (_, value) = l.rsplit_once('[')?;
            Some(value.strip_suffix(']')?.to_string())
        })
        .collect()
}

// ---- the entry points, called as C calls them -------------------------------------------------

fn last_error() -> String {
    // SAFETY: ivshm_last_error returns a NUL-terminated string, valid until the next failure on
    // this thread.
    unsafe { CStr::from_ptr(ivshm_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A host region on a fresh server (kept alive by the returned process).
fn host_region(tag: &str) -> (HostProcess, *mut Region) {
    let socket = socket_path(tag);
    let server = serve(&socket, "1M");
    let path = std::ffi::CString::new(socket.to_str().unwrap()).unwrap();
    let mut region = null_mut();
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    let st = unsafe { ivshm_region_open_host(path.as_ptr(), &mut region) };
    assert_eq!(st, Status::Ok, "{}", last_error());
    (server, region)
}

#[test]
fn a_host_region_marks_a_peer_that_left_from_its_server_messages() {
    // A server that does not mark departures itself, as other servers do not.
    let socket = socket_path("capi-events");
    let _server = common::serve_with(&socket, "1M", &["--no-mark-channel-departures"]);
    let path = std::ffi::CString::new(socket.to_str().unwrap()).unwrap();
    let mut region = null_mut();
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    let st = unsafe { ivshm_region_open_host(path.as_ptr(), &mut region) };
    assert_eq!(st, Status::Ok, "{}", last_error());
    let ch = open(region, c"leaver").unwrap();
    let mut other = Command::new(ivshm());
    other
        .args(["chan", "recv", "--socket"])
        .arg(&socket)
        .args(["--name", "leaver"]);
    let mut other = HostProcess::spawn("ivshm chan recv", other).unwrap();
    other
        .wait_line_containing(Stream::Stdout, "channel name=leaver", STEP)
        .unwrap();
    other.signal(ivshm_test_support::process::Signal::KILL);
    let _ = other.wait_exit(STEP);
    // SAFETY: live handles and valid out-pointers.
    unsafe {
        let fd = ivshm_region_server_fd(region);
        assert!(fd >= 0);
        let mut total = 0;
        let deadline = std::time::Instant::now() + STEP;
        while total == 0 {
            assert!(std::time::Instant::now() < deadline, "no leave reported");
            poll_readable(fd, 1000);
            let mut marked = 99usize;
            assert_eq!(ivshm_region_process_events(region, &mut marked), Status::Ok);
            total += marked;
        }
        assert_eq!(total, 1, "one side marked");
        let mut state = PeerState::Attached;
        assert_eq!(ivshm_channel_peer(ch, &mut state, null_mut()), Status::Ok);
        assert_eq!(state, PeerState::Gone);
        let mut len = 0;
        assert_eq!(
            ivshm_channel_recv(ch, null_mut(), 0, &mut len, 1000),
            Status::PeerGone
        );
        ivshm_channel_close(ch);
        ivshm_region_close(region);
    }
}

#[test]
fn a_hostile_record_length_gets_channel_corrupt_not_a_crash() {
    use ivshm_channel::layout::{E_RING_AB_OFFSET, H_DIRECTORY_OFFSET, REC_LEN, RING_CONTROL_SIZE};
    let socket = socket_path("capi-hostile");
    let _server = serve(&socket, "1M");
    let path = std::ffi::CString::new(socket.to_str().unwrap()).unwrap();
    let mut region = null_mut();
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    let st = unsafe { ivshm_region_open_host(path.as_ptr(), &mut region) };
    assert_eq!(st, Status::Ok, "{}", last_error());
    // The first channel of the directory, and a bystander.
    let a = open(region, c"victim").unwrap();
    let b = open(region, c"victim").unwrap();
    let x = open(region, c"bystander").unwrap();
    let y = open(region, c"bystander").unwrap();
    // SAFETY: live handles, buffers of the lengths given, valid out-pointers.
    unsafe {
        assert_eq!(
            ivshm_channel_send(a, c"hello".as_ptr().cast(), 5, -1),
            Status::Ok
        );
    }
    // Another peer of the server rewrites the published record's length (the first record of
    // the A→B ring, after its control block) to more than the ring holds.
    let hostile =
        ivshm_client::Peer::connect(&socket, ivshm_client::ConnectOptions::default()).unwrap();
    let mapping = hostile.map().unwrap();
    let view = mapping.view();
    let directory = view.read_u64(H_DIRECTORY_OFFSET).unwrap() as usize;
    let ring = view.read_u64(directory + E_RING_AB_OFFSET).unwrap() as usize;
    let record = ring + RING_CONTROL_SIZE as usize;
    assert_eq!(
        view.read_u32(record + REC_LEN).unwrap(),
        5,
        "the record sent"
    );
    view.write_u32(record + REC_LEN, 0xffff_fff0).unwrap();
    // SAFETY: as above.
    unsafe {
        let mut buf = [0u8; 64];
        let mut len = 0;
        let st = ivshm_channel_recv(b, buf.as_mut_ptr().cast(), buf.len(), &mut len, 1000);
        assert_eq!(st, Status::ChannelCorrupt, "{}", last_error());
        assert!(!last_error().is_empty());
        // Failed for good.
        assert_eq!(
            ivshm_channel_recv(b, buf.as_mut_ptr().cast(), buf.len(), &mut len, 0),
            Status::ChannelCorrupt
        );
        // The other channel of the region keeps working.
        assert_eq!(
            ivshm_channel_send(x, c"still".as_ptr().cast(), 5, -1),
            Status::Ok
        );
        assert_eq!(
            ivshm_channel_recv(y, buf.as_mut_ptr().cast(), buf.len(), &mut len, 5000),
            Status::Ok
        );
        assert_eq!(&buf[..len], b"still");
        for ch in [a, b, x, y] {
            ivshm_channel_close(ch);
        }
        ivshm_region_close(region);
    }
}

/// Opens `name` on `region` with the default options.
fn open(region: *const Region, name: &CStr) -> Result<*mut ChannelHandle, Status> {
    let mut ch = null_mut();
    // SAFETY: a live region, a NUL-terminated name, NULL options, a valid out-pointer.
    match unsafe { ivshm_channel_open(region, name.as_ptr(), null(), &mut ch) } {
        Status::Ok => Ok(ch),
        st => {
            assert!(ch.is_null());
            Err(st)
        }
    }
}

#[test]
fn every_status_has_a_message_and_unknown_codes_are_named() {
    let mut seen = std::collections::HashSet::new();
    for code in 0..=20 {
        // SAFETY: a static NUL-terminated string.
        let m = unsafe { CStr::from_ptr(ivshm_strerror(code)) }
            .to_str()
            .unwrap();
        assert!(!m.is_empty() && m != "unknown ivshm status code", "{code}");
        assert!(seen.insert(m), "{m} twice");
    }
    for code in [-1, 21, i32::MAX, i32::MIN] {
        // SAFETY: as above.
        let m = unsafe { CStr::from_ptr(ivshm_strerror(code)) };
        assert_eq!(m.to_str().unwrap(), "unknown ivshm status code");
    }
    // SAFETY: as above.
    let v = unsafe { CStr::from_ptr(ivshm_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn null_pointers_and_bad_paths_are_refused() {
    let mut region = std::ptr::dangling_mut::<Region>();
    // SAFETY: NULL and valid pointers only.
    unsafe {
        assert_eq!(
            ivshm_region_open_host(null(), &mut region),
            Status::InvalidArgument
        );
        assert!(region.is_null(), "*out is cleared on failure");
        assert_eq!(
            ivshm_region_open_host(c"/nonexistent/ivshm.sock".as_ptr(), null_mut()),
            Status::InvalidArgument
        );
        assert_eq!(
            ivshm_region_open_host(c"/nonexistent/ivshm.sock".as_ptr(), &mut region),
            Status::Connect
        );
        assert!(
            last_error().contains("/nonexistent/ivshm.sock"),
            "{}",
            last_error()
        );
        // Not UTF-8.
        assert_eq!(
            ivshm_region_open_host(c"/tmp/\xff.sock".as_ptr(), &mut region),
            Status::InvalidArgument
        );
        // Longer than IVSHM_STRING_MAX: refused without reading to the end.
        let long = vec![b'a' as c_char; IVSHM_STRING_MAX + 100];
        assert_eq!(
            ivshm_region_open_host(long.as_ptr(), &mut region),
            Status::InvalidArgument
        );
        assert!(
            last_error().contains("longer than 4096"),
            "{}",
            last_error()
        );
        assert_eq!(
            ivshm_region_open_guest(c"not a device".as_ptr(), &mut region),
            Status::InvalidArgument
        );
        let mut info = RegionInfo::default();
        assert_eq!(
            ivshm_region_get_info(null(), &mut info),
            Status::InvalidArgument
        );
        assert_eq!(ivshm_region_server_fd(null()), -1);
        assert_eq!(
            ivshm_region_process_events(null(), null_mut()),
            Status::InvalidArgument
        );
        ivshm_region_close(null_mut());
        ivshm_channel_close(null_mut());
        let mut len = 7usize;
        assert_eq!(
            ivshm_channel_max_message(null(), &mut len),
            Status::InvalidArgument
        );
        assert_eq!(
            ivshm_channel_send(null(), c"x".as_ptr().cast(), 1, 0),
            Status::InvalidArgument
        );
        assert_eq!(
            ivshm_channel_recv(null(), null_mut(), 0, &mut len, 0),
            Status::InvalidArgument
        );
        assert_eq!(
            ivshm_channel_wait(null(), 0, null_mut()),
            Status::InvalidArgument
        );
        assert_eq!(ivshm_channel_fd(null()), -1);
        assert_eq!(
            ivshm_channel_take_doorbell(null(), null_mut()),
            Status::InvalidArgument
        );
        assert_eq!(
            ivshm_channel_peer(null(), null_mut(), null_mut()),
            Status::InvalidArgument
        );
        assert_eq!(
            ivshm_channel_options_init(null_mut()),
            Status::InvalidArgument
        );
    }
}

#[test]
fn channel_names_are_checked_without_reading_past_their_limit() {
    let (_server, region) = host_region("capi-names");
    // SAFETY: a live region; names are NUL-terminated or longer than the limit.
    unsafe {
        let mut ch = std::ptr::dangling_mut::<ChannelHandle>();
        assert_eq!(
            ivshm_channel_open(region, null(), null(), &mut ch),
            Status::InvalidArgument
        );
        assert!(ch.is_null());
        assert_eq!(open(region, c""), Err(Status::BadName));
        assert_eq!(open(region, &c"x".repeat_to(32)), Err(Status::BadName));
        assert_eq!(open(region, c"caf\xe9"), Err(Status::BadName));
        // 32 bytes and no NUL: the scan stops at the 32nd byte (the array is exactly 32 bytes).
        let unterminated = [b'n' as c_char; 32];
        assert_eq!(
            ivshm_channel_open(region, unterminated.as_ptr(), null(), &mut ch),
            Status::BadName
        );
        assert!(last_error().contains("longer than 31"), "{}", last_error());
        let mut options = ChannelOpenOptions {
            spin_ns: -2,
            ..ChannelOpenOptions::default()
        };
        assert_eq!(
            ivshm_channel_open(region, c"ok".as_ptr(), &options, &mut ch),
            Status::InvalidArgument
        );
        options = ChannelOpenOptions {
            vector: 2,
            ..ChannelOpenOptions::default()
        };
        assert_eq!(
            ivshm_channel_open(region, c"ok".as_ptr(), &options, &mut ch),
            Status::BadVector
        );
        let full = c"x".repeat_to(31);
        let a = open(region, &full).unwrap();
        ivshm_channel_close(a);
        ivshm_region_close(region);
    }
}

/// `c"x".repeat_to(n)`: a name of `n` bytes.
trait RepeatTo {
    fn repeat_to(&self, n: usize) -> std::ffi::CString;
}

impl RepeatTo for CStr {
    fn repeat_to(&self, n: usize) -> std::ffi::CString {
        std::ffi::CString::new(self.to_bytes().repeat(n)).unwrap()
    }
}

#[test]
fn send_receive_wait_and_poll_between_two_handles() {
    let (_server, a_region) = host_region("capi-calls");
    let info = {
        let mut info = RegionInfo::default();
        // SAFETY: a live region and a valid out-pointer.
        let st = unsafe { ivshm_region_get_info(a_region, &mut info) };
        assert_eq!(st, Status::Ok);
        assert_eq!((info.vectors, info.size, info.channels), (2, 1 << 20, 64));
        info
    };
    assert!(info.ring_size >= 4096);
    // Both ends in this process through one region handle: a channel's two sides may belong to
    // one peer.
    let a = open(a_region, c"calls").unwrap();
    let b = open(a_region, c"calls").unwrap();
    // SAFETY: live handles, buffers of the lengths given, valid out-pointers.
    unsafe {
        let mut max = 0usize;
        assert_eq!(ivshm_channel_max_message(a, &mut max), Status::Ok);
        assert_eq!(max, info.ring_size as usize - 64);
        let mut state = PeerState::Gone;
        let mut peer = 99u16;
        assert_eq!(ivshm_channel_peer(a, &mut state, &mut peer), Status::Ok);
        assert_eq!((state, peer), (PeerState::Attached, info.own_id));

        // Nothing queued: would block with timeout 0, times out with a timeout.
        let mut buf = [0u8; 64];
        let mut len = 5usize;
        assert_eq!(
            ivshm_channel_recv(b, buf.as_mut_ptr().cast(), buf.len(), &mut len, 0),
            Status::WouldBlock
        );
        assert_eq!(len, 0);
        assert_eq!(ivshm_channel_wait(b, 20, null_mut()), Status::Timeout);

        // Lengths: empty, over the limit, NULL data.
        assert_eq!(
            ivshm_channel_send(a, buf.as_ptr().cast(), 0, 0),
            Status::Empty
        );
        let big = vec![7u8; max + 1];
        assert_eq!(
            ivshm_channel_send(a, big.as_ptr().cast(), big.len(), 0),
            Status::TooLarge
        );
        assert_eq!(ivshm_channel_send(a, null(), 3, 0), Status::InvalidArgument);
        assert_eq!(
            ivshm_channel_send(a, buf.as_ptr().cast(), usize::MAX, 0),
            Status::InvalidArgument
        );

        // A message larger than the buffer stays queued; the length needed is reported.
        let msg = (0..1000u32).map(|i| i as u8).collect::<Vec<_>>();
        assert_eq!(
            ivshm_channel_send(a, msg.as_ptr().cast(), msg.len(), -1),
            Status::Ok
        );
        let mut waited = 0usize;
        assert_eq!(ivshm_channel_wait(b, 5000, &mut waited), Status::Ok);
        assert_eq!(waited, 1000);
        assert_eq!(
            ivshm_channel_recv(b, buf.as_mut_ptr().cast(), buf.len(), &mut len, 0),
            Status::BufferTooSmall
        );
        assert_eq!(len, 1000);
        assert_eq!(
            ivshm_channel_recv(b, null_mut(), 1, &mut len, 0),
            Status::InvalidArgument
        );
        assert_eq!(
            ivshm_channel_recv(b, null_mut(), 0, &mut len, 0),
            Status::BufferTooSmall
        );
        assert_eq!(
            ivshm_channel_recv(b, buf.as_mut_ptr().cast(), buf.len(), null_mut(), 0),
            Status::InvalidArgument
        );
        let mut big_buf = vec![0u8; len];
        assert_eq!(
            ivshm_channel_recv(b, big_buf.as_mut_ptr().cast(), big_buf.len(), &mut len, 0),
            Status::Ok
        );
        assert_eq!((len, &big_buf[..]), (1000, &msg[..]));

        // The poll fd: readable once the other end sent to a receiver that would block.
        let fd = ivshm_channel_fd(a);
        assert!(fd >= 0);
        assert_eq!(
            ivshm_channel_recv(a, buf.as_mut_ptr().cast(), buf.len(), &mut len, 0),
            Status::WouldBlock
        );
        assert_eq!(
            ivshm_channel_send(b, c"pong".as_ptr().cast(), 4, -1),
            Status::Ok
        );
        assert_eq!(poll_readable(fd, 5000), 1, "the fd became readable");
        let mut rung = false;
        assert_eq!(ivshm_channel_take_doorbell(a, &mut rung), Status::Ok);
        assert!(rung);
        assert_eq!(
            ivshm_channel_recv(a, buf.as_mut_ptr().cast(), buf.len(), &mut len, 0),
            Status::Ok
        );
        assert_eq!(&buf[..len], b"pong");

        // Close one end: the other gets what was sent, then PEER_CLOSED.
        assert_eq!(
            ivshm_channel_send(a, c"bye".as_ptr().cast(), 3, -1),
            Status::Ok
        );
        ivshm_channel_close(a);
        ivshm_region_close(a_region);
        assert_eq!(
            ivshm_channel_recv(b, buf.as_mut_ptr().cast(), buf.len(), &mut len, 1000),
            Status::Ok
        );
        assert_eq!(&buf[..len], b"bye");
        assert_eq!(
            ivshm_channel_recv(b, buf.as_mut_ptr().cast(), buf.len(), &mut len, 1000),
            Status::PeerClosed
        );
        assert_eq!(ivshm_channel_peer(b, &mut state, null_mut()), Status::Ok);
        assert_eq!(state, PeerState::Closed);
        ivshm_channel_close(b);
    }
}

#[test]
fn one_thread_sends_while_another_receives_on_one_handle() {
    let (_server, region) = host_region("capi-threads");
    let a = open(region, c"duplex").unwrap() as usize;
    let b = open(region, c"duplex").unwrap() as usize;
    const N: u32 = 2000;
    std::thread::scope(|s| {
        // Each handle sends from one thread and receives in another at once.
        for (from, to) in [(a, b), (b, a)] {
            s.spawn(move || {
                for i in 0..N {
                    let m = i.to_le_bytes();
                    // SAFETY: a live handle (closed after the scope), 4 readable bytes.
                    let st = unsafe {
                        ivshm_channel_send(
                            from as *const ChannelHandle,
                            m.as_ptr().cast(),
                            4,
                            30_000,
                        )
                    };
                    assert_eq!(st, Status::Ok, "{}", last_error());
                }
            });
            s.spawn(move || {
                let mut buf = [0u8; 4];
                for i in 0..N {
                    let mut len = 0;
                    // SAFETY: a live handle, a 4-byte buffer, a valid out-pointer.
                    let st = unsafe {
                        ivshm_channel_recv(
                            to as *const ChannelHandle,
                            buf.as_mut_ptr().cast(),
                            4,
                            &mut len,
                            30_000,
                        )
                    };
                    assert_eq!(st, Status::Ok, "{}", last_error());
                    assert_eq!(u32::from_le_bytes(buf), i);
                }
            });
        }
    });
    // SAFETY: live handles, not used after.
    unsafe {
        ivshm_channel_close(a as *mut ChannelHandle);
        ivshm_channel_close(b as *mut ChannelHandle);
        ivshm_region_close(region);
    }
}

/// poll(2) of `fd` for POLLIN, as a C poll loop does: how many fds are ready.
fn poll_readable(fd: i32, timeout_ms: i32) -> usize {
    // SAFETY: the channel's fd, open while its handle is (the caller holds the handle).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let t = rustix::event::Timespec {
        tv_sec: i64::from(timeout_ms / 1000),
        tv_nsec: i64::from(timeout_ms % 1000) * 1_000_000,
    };
    rustix::event::poll(&mut fds, Some(&t)).unwrap()
}
