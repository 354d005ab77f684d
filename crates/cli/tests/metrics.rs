//! Metrics as an operator scrapes them: `ivshm serve --config --metrics 127.0.0.1:0` answers
//! `GET /metrics` over HTTP from its epoll loop; the body is parsed as the Prometheus text
//! format (every family has HELP and TYPE, counters end in `_total`, sizes in `_bytes`) and
//! holds per-region and server-wide counts of what the test did: joins, leaves, a refusal at
//! the peer limit (`GSS_CLIENT_MAX`), a peer dropped for writing (`sent_data`), doorbell fds,
//! region sizes; and per VM its peers, factory requests and refusals by code. `ivshm stats
//! --format prometheus` prints the same text. Hostile clients (idle connections, a request
//! that never ends, a request too long, a stream of blank lines) stop neither scrapes nor
//! peers, and cost the server no memory. An address other than loopback is warned about.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ivshm_test_support::process::{HostProcess, Signal, Stream};
use ivshm_test_support::v0::RawPeer;
use ivshm_test_support::WAIT_GUARD as GUARD;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ivshm-metrics-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One HTTP exchange: status code, headers (lower-case names) and body.
fn http(address: &str, request: &[u8]) -> (u16, BTreeMap<String, String>, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(GUARD)).unwrap();
    stream.write_all(request).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .strip_prefix("HTTP/1.1 ")
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(": ").unwrap();
            (k.to_ascii_lowercase(), v.to_string())
        })
        .collect();
    (status, headers, body.to_string())
}

fn scrape(address: &str) -> String {
    let (status, headers, body) = http(address, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(status, 200);
    assert_eq!(
        headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert_eq!(
        headers["content-length"].parse::<usize>().unwrap(),
        body.len()
    );
    body
}

/// Parses the exposition text: samples by `name{labels}` (labels as written), checking the
/// format's rules on the way.
fn parse_exposition(text: &str) -> BTreeMap<String, u64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps: Vec<String> = Vec::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helps.push(rest.split(' ').next().unwrap().to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            assert!(
                helps.last().map(String::as_str) == Some(name),
                "HELP before TYPE: {name}"
            );
            assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    && name.starts_with("ivshm_"),
                "{name}"
            );
            types.insert(name.to_string(), kind.to_string());
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            assert!(types.contains_key(name), "{name} has no TYPE");
            samples.insert(series.to_string(), value.parse().unwrap());
        }
    }
    assert!(types.keys().any(|n| n.ends_with("_bytes")));
    samples
}

/// The peak resident memory of process `pid` (`VmHWM`), in KiB.
fn peak_memory_kib(pid: u32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

fn serve(dir: &Path) -> (HostProcess, PathBuf, String) {
    let root = dir.join("root");
    let config = dir.join("ivshm.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\n[defaults]\nvectors = 2\n\
             [[region]]\nname = \"a\"\nsize = \"64K\"\npeer_limit = 1\n\
             [[region]]\nname = \"b\"\nsize = \"128K\"\n\
             [vm.vm0]\nrules = [\"allow *\"]\n",
            root.display().to_string()
        ),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    command
        .args(["serve", "--metrics", "127.0.0.1:0", "--config"])
        .arg(&config);
    let server = HostProcess::spawn("ivshm serve --metrics", command).unwrap();
    let line = server
        .wait_line_containing(Stream::Stderr, "metrics on http://", GUARD)
        .unwrap();
    let address = line
        .split("http://")
        .nth(1)
        .unwrap()
        .trim_end_matches("/metrics")
        .to_string();
    server
        .wait_line_containing(Stream::Stderr, "control.sock", GUARD)
        .unwrap();
    (server, root, address)
}

#[test]
fn scraped_metrics_count_what_happened_per_region_and_in_total() {
    let dir = temp_dir("scrape");
    let (mut server, root, address) = serve(&dir);
    let a = root.join("vm0").join("a.sock");
    let b = root.join("vm0").join("b.sock");

    let mut in_a = RawPeer::connect(&a);
    in_a.handshake(2, &[]);
    // a's limit is 1: the next one is refused (GSS_CLIENT_MAX).
    let mut refused = RawPeer::connect(&a);
    refused.expect_closed();
    let mut in_b = RawPeer::connect(&b);
    let first_b = in_b.handshake(2, &[]);
    // A second peer of b joins, then writes (a v0 peer must not): dropped for sent_data.
    let mut writer = RawPeer::connect(&b);
    writer.handshake(2, &[first_b.id]);
    in_b.expect_join(1, 2);
    rustix::net::send(&writer.sock, b"x", rustix::net::SendFlags::NOSIGNAL).unwrap();
    in_b.expect_leave(1);

    // The log has one line per join, refusal and removal, with region, VM and peer id.
    for needle in [
        "peer 0 joined region=a vm=vm0 peer=0 ",
        "refused a peer: the region has its limit of 1 peer(s) (GSS_CLIENT_MAX) region=a vm=vm0 peer=- ",
        "dropped peer 1: sent data",
    ] {
        let line = server
            .wait_line_containing(Stream::Stderr, needle, GUARD)
            .unwrap();
        if needle.starts_with("dropped") {
            assert!(line.contains("region=b vm=vm0 peer=1 "), "{line}");
        }
    }

    // Factory requests on vm0's factory socket: b is found, nope refused (no such region).
    let factory =
        std::os::unix::net::UnixStream::connect(root.join("vm0").join("factory.sock")).unwrap();
    let mut answers = std::io::BufReader::new(&factory);
    for (request, status) in [
        (r#"{"op":"find","name":"b"}"#, "\"GSS_OK\""),
        (r#"{"op":"find","name":"nope"}"#, "\"GSS_DOES_NOT_EXIST\""),
    ] {
        (&factory)
            .write_all(format!("{request}\n").as_bytes())
            .unwrap();
        let mut answer = String::new();
        std::io::BufRead::read_line(&mut answers, &mut answer).unwrap();
        assert!(answer.contains(status), "{answer}");
    }
    // Its log lines carry the same fields as the v0 ones (no peer: a factory client is none).
    let line = server
        .wait_line_containing(Stream::Stderr, "factory: no region nope", GUARD)
        .unwrap();
    assert!(
        line.contains("region=- vm=vm0 peer=- name=nope status=GSS_DOES_NOT_EXIST"),
        "{line}"
    );

    let samples = parse_exposition(&scrape(&address));
    let get = |series: &str| {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in {samples:?}"))
    };
    assert_eq!(get("ivshm_joins_total"), 3);
    assert_eq!(get("ivshm_region_joins_total{region=\"a\"}"), 1);
    assert_eq!(get("ivshm_region_joins_total{region=\"b\"}"), 2);
    assert_eq!(get("ivshm_peers"), 2);
    assert_eq!(get("ivshm_region_peers{region=\"b\"}"), 1);
    assert_eq!(
        get("ivshm_region_refusals_total{region=\"a\",code=\"GSS_CLIENT_MAX\"}"),
        1
    );
    assert_eq!(get("ivshm_refusals_total{code=\"GSS_CLIENT_MAX\"}"), 1);
    assert_eq!(
        get("ivshm_region_removals_total{region=\"b\",reason=\"sent_data\"}"),
        1
    );
    assert_eq!(get("ivshm_drops_total"), 1);
    assert_eq!(get("ivshm_region_drops_total{region=\"a\"}"), 0);
    // b: the first peer got its own 2, the second its own 2 and the first's 2, the first the
    // second's 2.
    assert_eq!(get("ivshm_region_doorbell_fds_total{region=\"b\"}"), 8);
    assert_eq!(get("ivshm_region_size_bytes{region=\"b\"}"), 128 << 10);
    assert_eq!(get("ivshm_region_vectors{region=\"a\"}"), 2);
    assert_eq!(get("ivshm_regions"), 2);
    assert!(samples.contains_key("ivshm_region_queued_messages{region=\"a\"}"));
    // Per VM: the peers that came through its directory, its factory requests and refusals.
    assert_eq!(get("ivshm_vms"), 1);
    assert_eq!(get("ivshm_vm_peers{vm=\"vm0\"}"), 2);
    assert_eq!(get("ivshm_vm_factory_requests_total{vm=\"vm0\"}"), 2);
    assert_eq!(
        get("ivshm_vm_factory_refusals_total{vm=\"vm0\",code=\"GSS_DOES_NOT_EXIST\"}"),
        1
    );
    assert_eq!(
        get("ivshm_vm_factory_refusals_total{vm=\"vm0\",code=\"GSS_NO_PERMISSION\"}"),
        0
    );
    assert_eq!(get("ivshm_factory_requests_total"), 2);
    assert_eq!(get("ivshm_refusals_total{code=\"GSS_DOES_NOT_EXIST\"}"), 1);

    // The same text from the control socket.
    let output = Command::new(env!("CARGO_BIN_EXE_ivshm"))
        .args(["stats", "--format", "prometheus", "--control"])
        .arg(root.join("control.sock"))
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8(output.stdout).unwrap(), scrape(&address));

    // Other requests.
    assert_eq!(http(&address, b"GET / HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(&address, b"POST /metrics HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(http(&address, b"garbage\r\n\r\n").0, 400);
    let (status, headers, body) = http(&address, b"HEAD /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200);
    assert!(body.is_empty());
    assert!(headers["content-length"].parse::<usize>().unwrap() > 0);

    drop((in_a, in_b, writer));
    server.signal(Signal::TERM);
    assert!(server.wait_exit(GUARD).unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_http_clients_stall_neither_scrapes_nor_peers() {
    let dir = temp_dir("hostile");
    let (mut server, root, address) = serve(&dir);
    // More idle connections than the listener keeps, and one that never ends its request.
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(&address).unwrap())
        .collect();
    let mut slow = TcpStream::connect(&address).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        .unwrap();
    // A request line longer than any line the server keeps.
    let mut long = TcpStream::connect(&address).unwrap();
    long.set_read_timeout(Some(GUARD)).unwrap();
    let _ = long.write_all(&vec![b'A'; 256 << 10]);
    let _ = long.write_all(b"\r\n\r\n");
    let mut answer = Vec::new();
    let _ = long.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400 "),
        "{answer}"
    );

    // Clients that stream blank lines (each one a line the server would keep) cost the
    // server no memory: it takes a bounded amount per event and keeps nothing once it has
    // answered. (Read per event in full, 256 KiB of them cost it 8 MiB.)
    let peak_before = peak_memory_kib(server.pid());
    for _ in 0..4 {
        let mut flood = TcpStream::connect(&address).unwrap();
        let _ = flood.write_all(b"GET /metrics HTTP/1.1\r\n");
        let blank_lines = vec![b'\n'; 64 << 10];
        for _ in 0..128 {
            if flood.write_all(&blank_lines).is_err() {
                break; // answered (400: too many lines) and closed
            }
        }
    }
    let grown = peak_memory_kib(server.pid()) - peak_before;
    assert!(
        grown < 4 << 10,
        "the server's peak memory grew by {grown} KiB"
    );

    // Scrapes and peers are still served at once.
    let samples = parse_exposition(&scrape(&address));
    assert_eq!(samples["ivshm_regions"], 2);
    let mut peer = RawPeer::connect(&root.join("vm0").join("b.sock"));
    peer.handshake(2, &[]);

    // The oldest idle connections made room for the newer ones: closed by the server.
    let mut first = idle.into_iter().next().unwrap();
    first.set_read_timeout(Some(GUARD)).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        first.read(&mut buf).unwrap_or(0),
        0,
        "evicted by the server"
    );
    // One that sends half a request is closed after the request timeout (10 s), with nothing
    // else happening in the meantime.
    let mut half = TcpStream::connect(&address).unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    half.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let started = std::time::Instant::now();
    assert_eq!(half.read(&mut buf).unwrap_or(0), 0, "closed by the server");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "closed by the timeout, not at once"
    );
    drop(slow);
    server.signal(Signal::TERM);
    assert!(server.wait_exit(GUARD).unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_metrics_address_is_checked_before_anything_is_served() {
    let dir = temp_dir("address");
    let socket = dir.join("ivshm.sock");
    // Taken: the start fails before a region is made or a socket bound.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_ivshm"))
        .args(["serve", "--size", "64K", "--metrics", &address, "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "metrics listener on {address}: Address already in use"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("serving"), "{stderr}");
    assert!(!socket.exists());
    // Host names are not looked up: the flag says what it takes.
    let output = Command::new(env!("CARGO_BIN_EXE_ivshm"))
        .args(["serve", "--metrics", "localhost:9464"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`localhost:9464` is not IP:PORT"),
        "{stderr}"
    );
    // Every address of the host: served, with a warning that says who can read it.
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivshm"));
    command
        .args([
            "serve",
            "--size",
            "64K",
            "--metrics",
            "0.0.0.0:0",
            "--socket",
        ])
        .arg(&socket);
    let mut server = HostProcess::spawn("ivshm serve --metrics 0.0.0.0:0", command).unwrap();
    let warning = server
        .wait_line_containing(Stream::Stderr, "can be read by any host", GUARD)
        .unwrap();
    assert!(warning.contains(" WARN "), "{warning}");
    assert!(warning.contains("every address of this host"), "{warning}");
    server.signal(Signal::TERM);
    assert!(server.wait_exit(GUARD).unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}
