//! Issue 8 end to end: `ivshm-channel` channels between two q35 + intel-iommu guests (VFIO,
//! MSI-X doorbells in guest user space) and a host peer, all on one `ivshm serve` region.
//!
//! - Issue 9's C library in a guest, before any `ivshm guest` command: the example
//!   `examples/c/chat.c`, linked statically with `libivshm.a` (`ivshm_region_open_guest`: VFIO,
//!   MSI-X doorbells), receives and checks checksummed messages that the host's
//!   `ivshm chan send` sends in one guest while it sends them to the host's `ivshm chan recv`
//!   (checked here: checksum, sequence, whole text) in the other, both at once.
//! - "Two VMs talking in five commands" (README): one guest receives, the other sends.
//! - A third guest with two doorbell devices on the region runs the doorbell conformance suite
//!   between them (`ivshm guest chan selftest`: the real device, interrupts through VFIO).
//! - Each guest exchanges 10,000 numbered, checksummed messages of random sizes (1 B to 64 KiB)
//!   with the other guest and with the host, both directions at once, all three channels at
//!   once: none lost, duplicated, reordered or damaged.
//! - A guest killed (QEMU killed) in the middle of exchanges with the other guest and with the
//!   host: the server marks its channel sides gone and rings the survivors, so the other guest
//!   (which gets no leave event from its device) and the host peer both end with "peer N left
//!   the region" long before their per-message timeout.

use std::time::{Duration, Instant};

use ivshm_e2e::c_chat::{message, recv_text_messages, static_chat, verify};
use ivshm_e2e::guest_tool::vfio_doorbell_guest;
use ivshm_e2e::host::run_to_completion;
use ivshm_e2e::ivshm::ivshm_command;
use ivshm_e2e::{require_e2e, HostProcess, IvshmServer, QemuGuest, ScratchDir, Stream};

const BOOT: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(120);
/// Bound on 10,000 messages each way on two channels per guest under TCG.
const EXCHANGE: Duration = Duration::from_secs(1500);
/// How long the survivors may take to see a killed guest gone (their own per-message timeout
/// is far longer: only the marking can end them this soon).
const GONE: Duration = Duration::from_secs(180);
const VECTORS: u32 = 2;
/// Messages of examples/c/chat.c each way between a guest and the host: about 1.5 MB, three
/// times round a ring of 512 KiB, sizes from 4 bytes to 3 KB.
const C_MESSAGES: u64 = 1000;

/// The host `ivshm chan exchange` on `names`.
fn host_exchange(
    socket: &std::path::Path,
    names: &[&str],
    count: &str,
    timeout: &str,
) -> HostProcess {
    let mut command = ivshm_command(["chan", "exchange", "--socket"]).unwrap();
    command.arg(socket);
    for name in names {
        command.args(["--name", name]);
    }
    command.args(["--count", count, "--timeout", timeout]);
    HostProcess::spawn("host exchange", command).unwrap()
}

/// The `exchanged name=<name> ...` line of `output`, which must say `count` each way.
fn assert_exchanged(who: &str, output: &str, name: &str, count: u64) {
    let line = output
        .lines()
        .find(|l| l.starts_with(&format!("exchanged name={name} ")))
        .unwrap_or_else(|| panic!("{who}: no exchange on {name}:\n{output}"));
    assert!(
        line.contains(&format!(" sent={count} received={count} damaged=0 ")),
        "{who}: {line}"
    );
    eprintln!("{who}: {line}");
}

/// examples/c/chat.c in guest `a` (`/bin/chat`, the guest's only device) receives and checks
/// [`C_MESSAGES`] that the host's `ivshm chan send` sends, while in guest `b` (`--dev 0`) it
/// sends as many to the host's `ivshm chan recv`, whose output is checked here.
fn c_programs_in_guests_exchange_with_the_host_cli(
    a: &mut QemuGuest,
    b: &mut QemuGuest,
    socket: &std::path::Path,
) {
    let started = Instant::now();
    let count = C_MESSAGES.to_string();
    let c_recv = a
        .spawn_background("chat-recv", &format!("chat guest recv demo {count}"))
        .unwrap();
    // The library opened the device (bound it to vfio-pci: an MSI-X vector's eventfd to poll)
    // and the channel; the region is the server's, formatted by `ivshm chan init`.
    let opened = c_recv.wait_output(a, "channel demo: ", STEP).unwrap();
    assert!(
        opened.contains(" 2 vectors, 16777216 bytes, 8 channels of 524288-byte rings\n")
            && opened.contains("\nchannel demo: doorbell fd to poll"),
        "{opened}"
    );
    let mut host_recv = ivshm_command(["chan", "recv", "--socket"]).unwrap();
    host_recv
        .arg(socket)
        .args(["--name", "c-to-host", "--count", &count])
        .args(["--timeout", "600", "--format", "text"]);
    let mut host_recv = HostProcess::spawn("host recv from C", host_recv).unwrap();
    let c_send = b
        .spawn_background(
            "chat-send",
            &format!("chat guest send --dev 0 c-to-host {count}"),
        )
        .unwrap();
    let mut host_send = ivshm_command(["chan", "send", "--socket"]).unwrap();
    host_send
        .arg(socket)
        .args(["--name", "demo", "--timeout", "600"]);
    let mut host_send = HostProcess::spawn_with_stdin("host send to C", host_send).unwrap();
    let lines: Vec<String> = (0..C_MESSAGES).map(message).collect();
    {
        use std::io::Write;
        let stdin = host_send.stdin().unwrap();
        for line in &lines {
            writeln!(stdin, "{line}").unwrap();
        }
    }
    host_send.close_stdin();

    let received = c_recv.finish(a, EXCHANGE).unwrap();
    let bytes: usize = lines.iter().map(String::len).sum();
    assert!(
        received.success()
            && received.output.contains(&format!(
                "\nreceived {C_MESSAGES} messages, {bytes} bytes, all verified"
            )),
        "chat recv in guest A: {}",
        received.output
    );
    host_send.wait_success(STEP).unwrap();
    let sent = c_send.finish(b, EXCHANGE).unwrap();
    assert!(
        sent.success()
            && sent
                .output
                .contains("\nchannel c-to-host: doorbell fd to poll")
            && sent
                .output
                .contains(&format!("\nsent {C_MESSAGES} messages")),
        "chat send in guest B: {}",
        sent.output
    );
    host_recv.wait_success(STEP).unwrap();
    let out = host_recv.lines(Stream::Stdout).join("\n");
    let messages = recv_text_messages(&out);
    assert_eq!(messages.len() as u64, C_MESSAGES, "{out:.400}");
    for (seq, m) in messages.iter().enumerate() {
        verify(seq as u64, m);
    }
    eprintln!(
        "chat.c in the guests, {C_MESSAGES} messages ({bytes} bytes) each way with the host CLI: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The `self id=<ID>` of a guest's device.
fn guest_id(guest: &mut QemuGuest) -> u16 {
    let list = guest.run_ok("ivshm guest chan list", STEP).unwrap();
    list.lines()
        .find_map(|l| l.strip_prefix("self id="))
        .and_then(|l| l.split(' ').next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no self line:\n{list}"))
}

#[test]
fn channels_and_c_programs_between_two_guests_and_a_host_peer_and_a_guest_killed_midway() {
    let assets = require_e2e!();
    let dir = ScratchDir::new().unwrap();
    let socket = dir.join("ivshm.sock");
    let _server = IvshmServer::start(&socket, &["--vectors", "2", "--size", "16M"], STEP).unwrap();
    let mut init = ivshm_command(["chan", "init", "--socket"]).unwrap();
    init.arg(&socket)
        .args(["--channels", "8", "--ring-size", "1M"]);
    let formatted = run_to_completion("ivshm chan init", init, STEP).unwrap();
    assert_eq!(
        formatted.last().map(String::as_str),
        Some("region channels=8 ring_size=524288 max_message=524224 layout_size=8400896")
    );

    let chat = static_chat().unwrap();
    let mut a = vfio_doorbell_guest(&assets, "chan-a", &socket, VECTORS)
        .file("/bin/chat", &chat, 0o755)
        .spawn()
        .unwrap();
    let mut b = vfio_doorbell_guest(&assets, "chan-b", &socket, VECTORS)
        .file("/bin/chat", &chat, 0o755)
        .spawn()
        .unwrap();
    let mut c = vfio_doorbell_guest(&assets, "chan-c", &socket, VECTORS)
        .ivshmem_doorbell(&socket, VECTORS)
        .spawn()
        .unwrap();
    for guest in [&mut a, &mut b, &mut c] {
        guest.wait_ready(BOOT).unwrap();
    }

    // The doorbell conformance suite in C, between its two devices (in the background).
    let selftest = c
        .spawn_background("selftest", "ivshm guest chan selftest --dev 0 --dev 1")
        .unwrap();

    // The C library in both guests, before any `ivshm guest` command touched their devices.
    c_programs_in_guests_exchange_with_the_host_cli(&mut a, &mut b, &socket);

    // Two VMs talking in five commands (README): A receives, B sends.
    let recv = a
        .spawn_background("hello", "ivshm guest chan recv --name hello --count 1")
        .unwrap();
    recv.wait_output(&mut a, "channel name=hello side=", STEP)
        .unwrap();
    let sent = b
        .run_ok("ivshm guest chan send --name hello 'hi from vm2'", STEP)
        .unwrap();
    assert!(sent.contains("\nsent len=11"), "{sent}");
    let got = recv.finish(&mut a, STEP).unwrap();
    assert!(
        got.success() && got.output.contains("\nmessage len=11 data=hi from vm2"),
        "{}",
        got.output
    );

    // 10,000 checked messages each way on all three channels at once; each send and receive
    // may wait 60 s (a missed wake-up would show as a stall of that length: with `-smp 1`
    // guests QEMU 7.2 dropped the guests' fences, see crates/channel's README).
    let started = Instant::now();
    let mut host = host_exchange(&socket, &["g1-host", "g2-host"], "10000", "60");
    let ea = a
        .spawn_background(
            "exchange",
            "ivshm guest chan exchange --name g1-g2 --name g1-host --count 10000 --timeout 60",
        )
        .unwrap();
    let eb = b
        .spawn_background(
            "exchange",
            "ivshm guest chan exchange --name g1-g2 --name g2-host --count 10000 --timeout 60",
        )
        .unwrap();
    let done_a = ea.finish(&mut a, EXCHANGE).unwrap();
    assert!(done_a.success(), "guest A: {}", done_a.output);
    let done_b = eb.finish(&mut b, EXCHANGE).unwrap();
    assert!(done_b.success(), "guest B: {}", done_b.output);
    host.wait_success(EXCHANGE).unwrap();
    let host_out = host.lines(Stream::Stdout).join("\n");
    assert_exchanged("guest A", &done_a.output, "g1-g2", 10_000);
    assert_exchanged("guest A", &done_a.output, "g1-host", 10_000);
    assert_exchanged("guest B", &done_b.output, "g1-g2", 10_000);
    assert_exchanged("guest B", &done_b.output, "g2-host", 10_000);
    assert_exchanged("host", &host_out, "g1-host", 10_000);
    assert_exchanged("host", &host_out, "g2-host", 10_000);
    eprintln!(
        "three channels, 10,000 messages each way: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let tested = selftest.finish(&mut c, EXCHANGE).unwrap();
    assert!(
        tested.success()
            && tested
                .output
                .contains("selftest passed doorbells=interrupts"),
        "{}",
        tested.output
    );
    c.poweroff(STEP).unwrap();

    // B is killed in the middle of exchanges with A and with the host.
    let b_id = guest_id(&mut b);
    let mut host = host_exchange(&socket, &["doomed-bh"], "100000000", "3000");
    host.wait_line(Stream::Stdout, "the channel line", STEP, |l| {
        l.starts_with("channel name=doomed-bh side=")
    })
    .unwrap();
    let ka = a
        .spawn_background(
            "doomed",
            "ivshm guest chan exchange --name doomed-ab --count 100000000 --timeout 3000",
        )
        .unwrap();
    let kb = b
        .spawn_background(
            "doomed",
            "ivshm guest chan exchange --name doomed-ab --name doomed-bh --count 100000000 --timeout 3000",
        )
        .unwrap();
    ka.wait_output(&mut a, "channel name=doomed-ab side=", STEP)
        .unwrap();
    kb.wait_output(&mut b, "channel name=doomed-bh side=", STEP)
        .unwrap();
    // Messages flow for a while, then B's QEMU is killed.
    std::thread::sleep(Duration::from_secs(5));
    drop(b);
    let killed = Instant::now();
    let left = format!("peer {b_id} left the region");
    let ended_a = ka.finish(&mut a, GONE).unwrap();
    assert!(
        !ended_a.success() && ended_a.output.contains(&left),
        "guest A: {}",
        ended_a.output
    );
    let status = host.wait_exit(GONE).unwrap();
    let host_err = host.output(Stream::Stderr);
    assert!(
        !status.success() && host_err.contains(&left),
        "host: {host_err}"
    );
    eprintln!(
        "guest B killed: A and the host saw it gone within {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    a.poweroff(STEP).unwrap();
}
