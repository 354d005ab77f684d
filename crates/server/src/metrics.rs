//! Metrics in the Prometheus text exposition format (version 0.0.4), server-wide and per
//! region, and the minimal HTTP/1.1 the optional `/metrics` listener speaks.
//!
//! The same text comes from `ivshm stats --format prometheus` (through the control socket)
//! and from `GET /metrics` on the listener `ivshm serve --metrics ADDR` opens (served by the
//! server's one epoll loop, like every other socket). Names follow Prometheus' conventions:
//! an `ivshm_` prefix, counters end in `_total`, sizes are in bytes (`_bytes`), and every
//! family has its `# HELP` and `# TYPE` lines.
//!
//! The HTTP side is hand-written on purpose: it must live inside the epoll loop without an
//! async runtime, and it answers exactly one request shape. A request is read line by line up
//! to its blank line (at most [`MAX_REQUEST_LINES`] lines of at most the line buffer's length);
//! `GET /metrics` gets `200` with the text, other paths `404`, other methods `405`, anything
//! malformed `400`; the connection is closed after the answer. Slow or idle clients are
//! closed after [`REQUEST_TIMEOUT`] and at most [`MAX_CONNECTIONS`] are open at once (a new
//! one evicts the oldest), so no client can hold the loop or the listener.

use std::fmt::Write as _;
use std::time::Duration;

use ivshm_proto::control::{RegionReport, StatsReport, VmReport};

/// The content type of the exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Header lines (request line included) a request may have.
pub const MAX_REQUEST_LINES: usize = 64;
/// How long a client may take to send its request and read the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Metrics connections open at once; a new one closes the oldest.
pub const MAX_CONNECTIONS: usize = 16;

/// Opens a TCP listener on `address` for [`Server::serve_metrics`](crate::Server::serve_metrics)
/// (separate, so that a program can bind it before it sets anything else up).
pub fn bind(address: std::net::SocketAddr) -> Result<std::net::TcpListener, crate::ServerError> {
    std::net::TcpListener::bind(address).map_err(|error| crate::ServerError::Metrics {
        address: address.to_string(),
        error,
    })
}

/// What to tell the operator about a listener on `address`, if it is reachable from other
/// hosts: the metrics name every region and VM and count their peers, and the server runs as
/// root, so they are best kept on loopback (or a management network).
pub fn exposure_warning(address: std::net::SocketAddr) -> Option<String> {
    let ip = address.ip();
    if ip.is_loopback() {
        return None;
    }
    let reach = if ip.is_unspecified() {
        "every address of this host".to_string()
    } else {
        format!("{ip}")
    };
    Some(format!(
        "metrics on {address} can be read by any host that reaches {reach} (region and VM \
         names, peer counts), without authentication: prefer 127.0.0.1 or [::1] behind a \
         firewall or a scraping proxy, or restrict it (under systemd: IPAddressAllow=)"
    ))
}

/// Escapes a label value (`\`, `"` and newlines).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family being written.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out, name }
    }

    /// A sample with `labels` (name, value) pairs.
    fn sample(&mut self, labels: &[(&str, &str)], value: u64) {
        let name = self.name;
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let text: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
                .collect();
            let _ = writeln!(self.out, "{name}{{{}}} {value}", text.join(","));
        }
    }
}

/// A counter or gauge of [`StatsReport`] with its metric names and help.
struct StatField {
    server: &'static str,
    region: &'static str,
    kind: &'static str,
    help: &'static str,
    get: fn(&StatsReport) -> u64,
}

const STAT_FIELDS: &[StatField] = &[
    StatField {
        server: "ivshm_peers",
        region: "ivshm_region_peers",
        kind: "gauge",
        help: "Peers connected now.",
        get: |s| s.peers_connected,
    },
    StatField {
        server: "ivshm_joins_total",
        region: "ivshm_region_joins_total",
        kind: "counter",
        help: "Peers that completed joining.",
        get: |s| s.joins,
    },
    StatField {
        server: "ivshm_leaves_total",
        region: "ivshm_region_leaves_total",
        kind: "counter",
        help: "Peers that left by closing their connection (or as the server stopped).",
        get: |s| s.leaves,
    },
    StatField {
        server: "ivshm_drops_total",
        region: "ivshm_region_drops_total",
        kind: "counter",
        help: "Peers the server dropped (see ivshm_removals_total for why).",
        get: |s| s.drops,
    },
    StatField {
        server: "ivshm_doorbell_fds_total",
        region: "ivshm_region_doorbell_fds_total",
        kind: "counter",
        help: "Eventfds (doorbells) delivered to peers, their own and the other peers'.",
        get: |s| s.doorbell_fds,
    },
    StatField {
        server: "ivshm_messages_sent_total",
        region: "ivshm_region_messages_sent_total",
        kind: "counter",
        help: "Whole protocol v0 messages written to peers.",
        get: |s| s.messages_sent,
    },
];

/// A per-region gauge: name, help, and how to read it from a report.
type RegionGauge = (&'static str, &'static str, fn(&RegionReport) -> u64);

/// The exposition text for the server's counters `stats`, its `regions` and its `vms` (none
/// for a single-region server). Label values come from the configuration (region and VM
/// names, fixed code and reason names) or from region names the policy let a factory create
/// (bounded by `max_regions`): the number of series is bounded.
pub fn render_prometheus(
    stats: &StatsReport,
    regions: &[RegionReport],
    vms: &[VmReport],
) -> String {
    let mut out = String::new();
    for field in STAT_FIELDS {
        let help = field.help;
        let mut f = Family::new(&mut out, field.server, field.kind, help);
        f.sample(&[], (field.get)(stats));
        let help = format!("{} Per region.", field.help);
        let mut f = Family::new(&mut out, field.region, field.kind, &help);
        for r in regions {
            f.sample(&[("region", &r.name)], (field.get)(&r.counters.stats));
        }
    }
    let mut f = Family::new(
        &mut out,
        "ivshm_refusals_total",
        "counter",
        "Refused v0 connections and factory requests, by GSS status code.",
    );
    for (code, n) in &stats.refusals {
        f.sample(&[("code", code)], *n);
    }
    let mut f = Family::new(
        &mut out,
        "ivshm_region_refusals_total",
        "counter",
        "Refused v0 connections, by GSS status code. Per region.",
    );
    for r in regions {
        for (code, n) in &r.counters.stats.refusals {
            f.sample(&[("region", &r.name), ("code", code)], *n);
        }
    }
    let mut f = Family::new(
        &mut out,
        "ivshm_removals_total",
        "counter",
        "Peers removed, by reason (closed is a normal leave).",
    );
    for (reason, n) in &stats.removals {
        f.sample(&[("reason", reason)], *n);
    }
    let mut f = Family::new(
        &mut out,
        "ivshm_region_removals_total",
        "counter",
        "Peers removed, by reason. Per region.",
    );
    for r in regions {
        for (reason, n) in &r.counters.stats.removals {
            f.sample(&[("region", &r.name), ("reason", reason)], *n);
        }
    }
    let mut f = Family::new(
        &mut out,
        "ivshm_factory_requests_total",
        "counter",
        "Factory requests answered.",
    );
    f.sample(&[], stats.factory_requests);
    let mut f = Family::new(&mut out, "ivshm_regions", "gauge", "Regions served now.");
    f.sample(&[], regions.len() as u64);
    let per_region: [RegionGauge; 6] = [
        (
            "ivshm_region_size_bytes",
            "Size of the region's shared memory.",
            |r| r.size,
        ),
        (
            "ivshm_region_vectors",
            "Vectors (eventfds) per peer.",
            |r| u64::from(r.vectors),
        ),
        ("ivshm_region_peer_limit", "Peers admitted at once.", |r| {
            u64::from(r.peer_limit)
        }),
        (
            "ivshm_region_held_ids",
            "Ids held back now: their holders left while peers still connected were there.",
            |r| r.held_ids.len() as u64,
        ),
        (
            "ivshm_region_queued_messages",
            "Messages queued for the region's peers now.",
            |r| r.counters.queued_messages,
        ),
        (
            "ivshm_region_max_peer_queue_messages",
            "The longest queue of one of the region's peers now.",
            |r| r.counters.max_peer_queue,
        ),
    ];
    for (name, help, get) in per_region {
        let mut f = Family::new(&mut out, name, "gauge", help);
        for r in regions {
            f.sample(&[("region", &r.name)], get(r));
        }
    }
    render_vms(&mut out, vms);
    out
}

/// The per-VM families: peers through the VM's directory, its factory requests and their
/// refusals by code (a VM whose guests are refused shows up by name).
fn render_vms(out: &mut String, vms: &[VmReport]) {
    let mut f = Family::new(out, "ivshm_vms", "gauge", "VMs served now.");
    f.sample(&[], vms.len() as u64);
    let mut f = Family::new(
        out,
        "ivshm_vm_peers",
        "gauge",
        "Peers connected now through the VM's directory.",
    );
    for vm in vms {
        let peers: usize = vm.regions.iter().map(|r| r.peers.len()).sum();
        f.sample(&[("vm", &vm.name)], peers as u64);
    }
    let mut f = Family::new(
        out,
        "ivshm_vm_factory_requests_total",
        "counter",
        "Factory requests answered on the VM's factory socket.",
    );
    for vm in vms {
        f.sample(&[("vm", &vm.name)], vm.counters.factory_requests);
    }
    let mut f = Family::new(
        out,
        "ivshm_vm_factory_refusals_total",
        "counter",
        "Refused factory requests of the VM, by GSS status code.",
    );
    for vm in vms {
        for (code, n) in &vm.counters.refusals {
            f.sample(&[("vm", &vm.name), ("code", code)], *n);
        }
    }
}

/// What a complete request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpRequest {
    /// `GET /metrics` (or `HEAD`: the answer then has no body).
    Metrics {
        /// `HEAD` rather than `GET`.
        head: bool,
    },
    /// Another path.
    NotFound,
    /// Another method.
    MethodNotAllowed,
    /// Not a request this server understands.
    BadRequest,
}

/// A request being read line by line.
#[derive(Debug, Default)]
pub struct RequestReader {
    first: Option<Vec<u8>>,
    lines: usize,
}

impl RequestReader {
    /// Takes one line (its `\r\n` or `\n` included or not); returns the request once its
    /// blank line arrives, or at once when it cannot be valid (too many lines, a line too long).
    pub fn push(&mut self, line: Result<Vec<u8>, ()>) -> Option<HttpRequest> {
        let Ok(mut line) = line else {
            return Some(HttpRequest::BadRequest);
        };
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        self.lines += 1;
        if self.lines > MAX_REQUEST_LINES {
            return Some(HttpRequest::BadRequest);
        }
        if self.first.is_none() {
            self.first = Some(line);
            return None;
        }
        if !line.is_empty() {
            return None;
        }
        Some(parse_request_line(
            self.first.as_deref().unwrap_or_default(),
        ))
    }
}

/// Classifies a request line (`METHOD TARGET HTTP/1.x`).
pub fn parse_request_line(line: &[u8]) -> HttpRequest {
    let Ok(text) = std::str::from_utf8(line) else {
        return HttpRequest::BadRequest;
    };
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return HttpRequest::BadRequest;
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || !target.starts_with('/') {
        return HttpRequest::BadRequest;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => HttpRequest::Metrics { head: false },
        ("HEAD", "/metrics") => HttpRequest::Metrics { head: true },
        ("GET" | "HEAD", _) => HttpRequest::NotFound,
        _ => HttpRequest::MethodNotAllowed,
    }
}

/// The whole HTTP/1.1 response to `request`, `metrics` being the exposition text.
pub fn response(request: &HttpRequest, metrics: impl FnOnce() -> String) -> Vec<u8> {
    let (status, content_type, body, head) = match request {
        HttpRequest::Metrics { head } => ("200 OK", CONTENT_TYPE, metrics(), *head),
        HttpRequest::NotFound => (
            "404 Not Found",
            "text/plain",
            "only /metrics is here\n".into(),
            false,
        ),
        HttpRequest::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
            false,
        ),
        HttpRequest::BadRequest => (
            "400 Bad Request",
            "text/plain",
            "bad request\n".into(),
            false,
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ivshm_proto::control::RegionCounters;

    fn region(name: &str) -> RegionReport {
        RegionReport {
            name: name.into(),
            size: 1 << 20,
            backend: "memfd".into(),
            vectors: 2,
            peer_limit: 16,
            id_policy: "increasing".into(),
            id_reuse: "safe".into(),
            held_ids: vec![2, 5],
            origin: "config".into(),
            persist: false,
            detached: false,
            peers: vec![0, 1],
            sockets: vec![],
            counters: RegionCounters {
                stats: StatsReport {
                    joins: 3,
                    peers_connected: 2,
                    refusals: [("GSS_CLIENT_MAX".to_string(), 1)].into(),
                    removals: [("closed".to_string(), 1)].into(),
                    ..StatsReport::default()
                },
                queued_messages: 4,
                max_peer_queue: 3,
            },
        }
    }

    #[test]
    fn every_family_has_help_and_type_and_counters_end_in_total() {
        let vm = VmReport {
            name: "vm0".into(),
            directory: "/run/ivshm/vm0".into(),
            factory: "/run/ivshm/vm0/factory.sock".into(),
            regions: vec![ivshm_proto::control::VmRegionReport {
                guest_name: "mem".into(),
                host_name: "a\"b".into(),
                socket: "/run/ivshm/vm0/mem.sock".into(),
                peers: vec![0, 1],
            }],
            counters: StatsReport {
                factory_requests: 5,
                refusals: [("GSS_NO_PERMISSION".to_string(), 2)].into(),
                ..StatsReport::default()
            },
        };
        let text = render_prometheus(&StatsReport::default(), &[region("a\"b")], &[vm]);
        let mut declared = std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                declared.insert(name.to_string(), kind.to_string());
                assert!(
                    text.contains(&format!("# HELP {name} ")),
                    "{name} has no HELP"
                );
                assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(
                    declared.contains_key(name),
                    "{name} sampled before its TYPE"
                );
            }
        }
        assert!(
            text.contains("ivshm_region_joins_total{region=\"a\\\"b\"} 3\n"),
            "{text}"
        );
        assert!(text.contains(
            "ivshm_region_refusals_total{region=\"a\\\"b\",code=\"GSS_CLIENT_MAX\"} 1\n"
        ));
        assert!(text.contains("ivshm_region_size_bytes{region=\"a\\\"b\"} 1048576\n"));
        assert!(text.contains("ivshm_region_queued_messages{region=\"a\\\"b\"} 4\n"));
        assert!(text.contains("ivshm_region_held_ids{region=\"a\\\"b\"} 2\n"));
        assert!(text.contains("ivshm_vms 1\n"), "{text}");
        assert!(text.contains("ivshm_vm_peers{vm=\"vm0\"} 2\n"));
        assert!(text.contains("ivshm_vm_factory_requests_total{vm=\"vm0\"} 5\n"));
        assert!(text.contains(
            "ivshm_vm_factory_refusals_total{vm=\"vm0\",code=\"GSS_NO_PERMISSION\"} 2\n"
        ));
    }

    #[test]
    fn only_loopback_listeners_go_unwarned() {
        for quiet in ["127.0.0.1:9464", "[::1]:9464", "127.0.0.2:1"] {
            assert_eq!(exposure_warning(quiet.parse().unwrap()), None, "{quiet}");
        }
        let any = exposure_warning("0.0.0.0:9464".parse().unwrap()).unwrap();
        assert!(any.contains("every address of this host"), "{any}");
        let one = exposure_warning("[2001:db8::1]:9464".parse().unwrap()).unwrap();
        assert!(one.contains("any host that reaches 2001:db8::1"), "{one}");
    }

    #[test]
    fn requests_are_read_to_their_blank_line() {
        let mut r = RequestReader::default();
        assert_eq!(r.push(Ok(b"GET /metrics HTTP/1.1\r\n".to_vec())), None);
        assert_eq!(r.push(Ok(b"Host: x\r\n".to_vec())), None);
        assert_eq!(
            r.push(Ok(b"\r\n".to_vec())),
            Some(HttpRequest::Metrics { head: false })
        );
        for (line, want) in [
            ("GET /other HTTP/1.1", HttpRequest::NotFound),
            ("POST /metrics HTTP/1.1", HttpRequest::MethodNotAllowed),
            ("GET /metrics", HttpRequest::BadRequest),
            ("GET metrics HTTP/1.1", HttpRequest::BadRequest),
            (
                "GET /metrics?x=1 HTTP/1.0",
                HttpRequest::Metrics { head: false },
            ),
            (
                "HEAD /metrics HTTP/1.1",
                HttpRequest::Metrics { head: true },
            ),
        ] {
            assert_eq!(parse_request_line(line.as_bytes()), want, "{line}");
        }
        let mut r = RequestReader::default();
        let mut answer = None;
        for _ in 0..=MAX_REQUEST_LINES {
            answer = answer.or(r.push(Ok(b"X-Header: y".to_vec())));
        }
        assert_eq!(answer, Some(HttpRequest::BadRequest));
        assert_eq!(
            RequestReader::default().push(Err(())),
            Some(HttpRequest::BadRequest)
        );
    }

    #[test]
    fn responses_carry_length_and_close() {
        let r = response(&HttpRequest::Metrics { head: false }, || "x 1\n".into());
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Length: 4\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\nx 1\n"));
        let head = String::from_utf8(response(&HttpRequest::Metrics { head: true }, || {
            "x 1\n".into()
        }))
        .unwrap();
        assert!(head.ends_with("\r\n\r\n"));
    }
}
