//! Metrics as an operator scrapes them: `ivshm serve --config --metrics 127.0.0.1:0` answers
//! `GET /metrics` over HTTP from its epoll loop; the body is parsed as the Prometheus text
//! format (every family has HELP and TYPE, counters end in `_total`, sizes in `_bytes`) and
//! holds per-region and server-wide counts of what the test did: joins, leaves, a refusal at
//! the peer limit (`GSS_CLIENT_MAX`), a peer dropped for writing (`sent_data`), doorbell fds,
//! region sizes. `ivshm stats --format prometheus` prints the same text. Hostile clients (idle
//! connections, a request that never ends, a request too long) do not stop scrapes or peers.

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
