//! `ivshm regions|region|vms|stats|reload`: the server's control socket (see
//! `docs/named-regions.md`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ivshm_proto::control::{
    ControlRequest, ControlResponse, ControlResult, CreateRegion, RegionReport, StatsReport,
    VmReport,
};
use ivshm_proto::factory::{decode_line, encode_line, MAX_LINE};

use crate::args;

/// The control socket's default path.
pub const DEFAULT_CONTROL: &str = "/run/ivshm/control.sock";

/// How long to wait for the server's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// `ivshm control ...`: talk to a running server's control socket.
#[derive(Subcommand, Debug)]
pub enum ControlCommand {
    /// List the server's regions: size, backend, vectors, peers, limit, id policy, origin.
    Regions(ControlArgs),
    /// Create or remove a region.
    #[command(subcommand)]
    Region(RegionCommand),
    /// List the VMs, the regions each sees (its name -> host name) and their peers.
    Vms(ControlArgs),
    /// Counters: joins, leaves, drops, doorbell fds handed out, refusals by status code,
    /// removals by reason; with --format prometheus, server-wide and per region.
    Stats(StatsArgs),
    /// Re-read the server's configuration file without dropping connected peers; prints one
    /// line per change (what happens to peers a change would orphan included).
    Reload(ControlArgs),
}

/// `ivshm control region ...`.
#[derive(Subcommand, Debug)]
pub enum RegionCommand {
    /// Create a region (by host name); it goes when its last peer leaves unless --persist.
    Create(CreateArgs),
    /// Remove a region: its sockets go now, the region when its last peer leaves.
    Remove(RemoveArgs),
}

/// What every control subcommand takes: the socket, and the output form.
#[derive(Args, Debug)]
pub struct ControlArgs {
    /// The server's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL, value_parser = args::socket_path)]
    pub control: PathBuf,
    /// Print the server's JSON answer (its `result` object) instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// How `ivshm stats` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatsFormat {
    /// `key=value` lines.
    Lines,
    /// The server's JSON answer (as --json).
    Json,
    /// The Prometheus text exposition format, server-wide and per region (what
    /// `ivshm serve --metrics` serves at /metrics).
    Prometheus,
}

/// `ivshm stats` flags.
#[derive(Args, Debug)]
pub struct StatsArgs {
    /// The socket.
    #[command(flatten)]
    pub control: ControlArgs,
    /// Output form.
    #[arg(long, value_enum, default_value_t = StatsFormat::Lines)]
    pub format: StatsFormat,
}

/// `ivshm control region create`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The socket and the output form.
    #[command(flatten)]
    pub control: ControlArgs,
    /// The region's host name.
    pub name: String,
    /// Size: bytes, 0x hex, or K/M/G/T suffixes.
    #[arg(long, value_parser = ivshm_mem::parse_size)]
    pub size: u64,
    /// Vectors per peer, 1..=64 (default: the server's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vectors: Option<u32>,
    /// Peers at once, 1..=65536 (default: the server's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub peer_limit: Option<u32>,
    /// `increasing` or `lowest-free` (default: the server's).
    #[arg(long)]
    pub id_policy: Option<String>,
    /// When the id of a peer that left may be given again (default: the server's): `safe`
    /// holds it back while a peer that saw it leave is connected (QEMU 7.2 guests abort when
    /// told of a new peer with such an id); `immediate` gives it at once (only for regions
    /// whose peers all handle reuse).
    #[arg(long, value_name = "RULE", value_parser = ["safe", "immediate"])]
    pub id_reuse: Option<String>,
    /// Keep the region after its last peer leaves.
    #[arg(long)]
    pub persist: bool,
}

/// `ivshm control region remove`.
#[derive(Args, Debug)]
pub struct RemoveArgs {
    /// The socket and the output form.
    #[command(flatten)]
    pub control: ControlArgs,
    /// The region's host name.
    pub name: String,
}

/// Runs the command and prints what it answers.
pub fn run(c: ControlCommand) -> anyhow::Result<()> {
    print!("{}", execute(c)?);
    Ok(())
}

/// Sends the command's request and returns what the command prints.
pub fn execute(c: ControlCommand) -> anyhow::Result<String> {
    let (args, request) = match c {
        ControlCommand::Regions(a) => (a, ControlRequest::Regions),
        ControlCommand::Vms(a) => (a, ControlRequest::Vms),
        ControlCommand::Stats(a) if a.format == StatsFormat::Prometheus => {
            return prometheus(&a.control.control);
        }
        ControlCommand::Stats(mut a) => {
            a.control.json |= a.format == StatsFormat::Json;
            (a.control, ControlRequest::Stats)
        }
        ControlCommand::Reload(a) => (a, ControlRequest::Reload),
        ControlCommand::Region(RegionCommand::Create(a)) => (
            a.control,
            ControlRequest::Create(CreateRegion {
                name: a.name,
                size: a.size,
                vectors: a.vectors,
                peer_limit: a.peer_limit,
                id_policy: a.id_policy,
                id_reuse: a.id_reuse,
                persist: a.persist,
            }),
        ),
        ControlCommand::Region(RegionCommand::Remove(a)) => {
            (a.control, ControlRequest::Remove { name: a.name })
        }
    };
    let result = request_result(&args.control, &request)?;
    output(&result, args.json)
}

/// The server's counters, regions and VMs in the Prometheus text format.
pub fn prometheus(control: &Path) -> anyhow::Result<String> {
    let ControlResult::Stats { stats } = request_result(control, &ControlRequest::Stats)? else {
        bail!("the server answered the stats request with something else");
    };
    let ControlResult::Regions { regions } = request_result(control, &ControlRequest::Regions)?
    else {
        bail!("the server answered the regions request with something else");
    };
    let ControlResult::Vms { vms } = request_result(control, &ControlRequest::Vms)? else {
        bail!("the server answered the vms request with something else");
    };
    Ok(ivshm_server::metrics::render_prometheus(
        &stats, &regions, &vms,
    ))
}

/// What a command prints for `result`: [`render`]ed lines, or with `--json` the result as
/// pretty JSON (one object, newline-terminated).
pub fn output(result: &ControlResult, json: bool) -> anyhow::Result<String> {
    if json {
        Ok(format!("{}\n", serde_json::to_string_pretty(result)?))
    } else {
        Ok(render(result))
    }
}

/// Sends one request and returns the successful result (an error for a failed one).
pub fn request_result(socket: &Path, message: &ControlRequest) -> anyhow::Result<ControlResult> {
    let response = request(socket, message)?;
    if !response.ok {
        bail!(
            "{}",
            response
                .error
                .unwrap_or_else(|| "the server refused the request".into())
        );
    }
    response.result.context("the server's answer has no result")
}

/// Sends one request line and reads one response line.
pub fn request(socket: &Path, request: &ControlRequest) -> anyhow::Result<ControlResponse> {
    let mut stream = UnixStream::connect(socket).map_err(|error| {
        anyhow::anyhow!(
            "connecting to the control socket {}: {error}{}",
            socket.display(),
            connect_hint(&error)
        )
    })?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.write_all(&encode_line(request))?;
    let mut line = Vec::new();
    BufReader::new(stream.take_limit())
        .read_until(b'\n', &mut line)
        .context("reading the server's answer")?;
    if line.is_empty() {
        bail!("the server closed the control connection without answering");
    }
    Ok(decode_line(&line)?)
}

/// What to do when the control socket cannot be reached, by the reason.
fn connect_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::NotFound => {
            "; no server listens there. Only `ivshm serve --config FILE` has a control socket \
             (<root>/control.sock, default /run/ivshm/control.sock, or `control = PATH` in the \
             file): start one, or give its path with --control PATH"
        }
        std::io::ErrorKind::ConnectionRefused => {
            "; the socket file is there but no server listens on it (a server that was killed?): \
             start `ivshm serve --config FILE`, or give the running server's control socket with \
             --control PATH"
        }
        std::io::ErrorKind::PermissionDenied => {
            "; the control socket is root's only unless the configuration's control_mode and \
             control_group say otherwise: run this as root or as a member of control_group"
        }
        _ => "",
    }
}

/// A reader bounded to one maximal line.
trait TakeLimit {
    fn take_limit(self) -> std::io::Take<UnixStream>;
}

impl TakeLimit for UnixStream {
    fn take_limit(self) -> std::io::Take<UnixStream> {
        std::io::Read::take(self, MAX_LINE as u64)
    }
}

/// The human form of a result: one `key=value` line per item.
pub fn render(result: &ControlResult) -> String {
    match result {
        ControlResult::Regions { regions } => regions.iter().map(region_line).collect(),
        ControlResult::Created { region } => format!("created {}", region_line(region)),
        ControlResult::Vms { vms } => vms.iter().map(vm_lines).collect(),
        ControlResult::Stats { stats } => stats_lines(stats),
        ControlResult::Removed { message } => format!("{message}\n"),
        ControlResult::Reloaded { changes } => changes.iter().map(|c| format!("{c}\n")).collect(),
    }
}

fn ids(ids: &[u16]) -> String {
    let list: Vec<String> = ids.iter().map(u16::to_string).collect();
    list.join(",")
}

fn region_line(r: &RegionReport) -> String {
    let mut flags = String::new();
    if !r.held_ids.is_empty() {
        flags.push_str(&format!(" held-ids=[{}]", ids(&r.held_ids)));
    }
    if r.persist {
        flags.push_str(" persist");
    }
    if r.detached {
        flags.push_str(" detached");
    }
    format!(
        "region {} size={} backend={} vectors={} peers={}/{} ids={}{} origin={} peer-ids=[{}]{flags} \
         (QEMU: vectors={}, libvirt: <msi vectors='{}'>, or more)\n",
        r.name,
        r.size,
        r.backend,
        r.vectors,
        r.peers.len(),
        r.peer_limit,
        r.id_policy,
        // Older servers do not say.
        if r.id_reuse.is_empty() {
            String::new()
        } else {
            format!(" id-reuse={}", r.id_reuse)
        },
        r.origin,
        ids(&r.peers),
        r.vectors,
        r.vectors
    )
}

fn vm_lines(vm: &VmReport) -> String {
    let mut out = format!(
        "vm {} dir={} factory={}\n",
        vm.name, vm.directory, vm.factory
    );
    for r in &vm.regions {
        out.push_str(&format!(
            "  {} -> {} socket={} peer-ids=[{}]\n",
            r.guest_name,
            r.host_name,
            r.socket,
            ids(&r.peers)
        ));
    }
    out
}

fn stats_lines(s: &StatsReport) -> String {
    let mut out = format!(
        "joins={} leaves={} drops={} connected={} doorbell-fds={} messages={} factory-requests={}\n",
        s.joins,
        s.leaves,
        s.drops,
        s.peers_connected,
        s.doorbell_fds,
        s.messages_sent,
        s.factory_requests
    );
    let refusals: Vec<String> = s.refusals.iter().map(|(k, v)| format!("{k}={v}")).collect();
    out.push_str(&format!("refusals {}\n", refusals.join(" ")));
    if !s.removals.is_empty() {
        let removals: Vec<String> = s.removals.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!("removals {}\n", removals.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server with one open VM under a fresh root, started from a configuration file in that
    /// root (so that it can reload).
    fn server(tag: &str) -> (ivshm_server::ServerHandle, PathBuf) {
        let root = std::env::temp_dir().join(format!("ivshm-cli-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let file = root.join("ivshm.toml");
        std::fs::write(
            &file,
            format!(
                "root = {:?}\n[defaults]\nvectors = 1\n[vm.vm0]\n",
                root.display().to_string()
            ),
        )
        .unwrap();
        let config = ivshm_server::config_file::load(&file).unwrap();
        (ivshm_server::ServerHandle::spawn(config).unwrap(), root)
    }

    /// The commands as a user types them (after `ivshm`).
    #[derive(clap::Parser, Debug)]
    struct Typed {
        #[command(subcommand)]
        command: ControlCommand,
    }

    fn typed(control: &Path, words: &str, json: bool) -> String {
        use clap::Parser;
        let mut argv = vec!["ivshm".to_string()];
        argv.extend(words.split_whitespace().map(String::from));
        argv.extend(["--control".to_string(), control.display().to_string()]);
        if json {
            argv.push("--json".into());
        }
        let parsed = Typed::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        execute(parsed.command).unwrap()
    }

    /// Every subcommand takes `--json` and prints the server's result object, which parses back
    /// into the result of the kind asked for; without it, the lines of [`render`].
    #[test]
    fn every_subcommand_prints_lines_or_json() {
        let (server, root) = server("json");
        let control = root.join("control.sock");
        let json = |words: &str| -> ControlResult {
            let text = typed(&control, words, true);
            assert!(text.ends_with("}\n"), "{words}: {text}");
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{words}: {e}: {text}"))
        };
        let created = json(
            "region create a --size 64K --peer-limit 3 --id-policy increasing --id-reuse immediate",
        );
        let ControlResult::Created { region } = &created else {
            panic!("{created:?}")
        };
        assert_eq!(
            (
                region.size,
                region.peer_limit,
                region.id_policy.as_str(),
                region.id_reuse.as_str(),
                region.persist
            ),
            (65536, 3, "increasing", "immediate", false)
        );
        let text = typed(&control, "region create b --size 4096 --persist", false);
        assert!(text.starts_with("created region b size=4096 "), "{text}");
        assert!(
            text.ends_with(" persist (QEMU: vectors=1, libvirt: <msi vectors='1'>, or more)\n"),
            "{text}"
        );

        let ControlResult::Regions { regions } = json("regions") else {
            panic!("regions")
        };
        let names: Vec<&str> = regions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            typed(&control, "regions", false).lines().count(),
            2,
            "one line per region"
        );

        let ControlResult::Vms { vms } = json("vms") else {
            panic!("vms")
        };
        assert_eq!(vms.len(), 1);
        let seen: Vec<&str> = vms[0]
            .regions
            .iter()
            .map(|r| r.guest_name.as_str())
            .collect();
        assert_eq!(seen, ["a", "b"]);
        assert!(typed(&control, "vms", false).starts_with("vm vm0 dir="));

        let ControlResult::Stats { stats } = json("stats") else {
            panic!("stats")
        };
        assert_eq!(
            stats.refusals.len(),
            6,
            "one counter per refusal code: {stats:?}"
        );
        assert!(typed(&control, "stats", false).contains("\nrefusals GSS_CLIENT_MAX=0 "));

        let ControlResult::Removed { message } = json("region remove a") else {
            panic!("remove")
        };
        assert_eq!(message, "removed region a");
        assert_eq!(
            typed(&control, "region remove b", false),
            "removed region b\n"
        );

        let ControlResult::Reloaded { changes } = json("reload") else {
            panic!("reload")
        };
        assert_eq!(changes, ["nothing changed"]);
        assert_eq!(typed(&control, "reload", false), "nothing changed\n");
        server.shutdown().unwrap();
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn commands_against_an_in_process_server() {
        let (server, root) = server("cmds");
        let control = root.join("control.sock");
        let created = request_result(
            &control,
            &ControlRequest::Create(CreateRegion {
                name: "scratch".into(),
                size: 65536,
                persist: true,
                ..CreateRegion::default()
            }),
        )
        .unwrap();
        assert_eq!(
            render(&created),
            "created region scratch size=65536 backend=memfd vectors=1 peers=0/16 \
             ids=lowest-free id-reuse=safe origin=control peer-ids=[] persist (QEMU: vectors=1, \
             libvirt: <msi vectors='1'>, or more)\n"
        );
        let regions = request_result(&control, &ControlRequest::Regions).unwrap();
        assert!(render(&regions).starts_with("region scratch size=65536 "));
        let vms = render(&request_result(&control, &ControlRequest::Vms).unwrap());
        assert!(
            vms.contains(&format!(
                "  scratch -> scratch socket={} peer-ids=[]\n",
                root.join("vm0/scratch.sock").display()
            )),
            "{vms}"
        );
        let removed = request_result(
            &control,
            &ControlRequest::Remove {
                name: "scratch".into(),
            },
        )
        .unwrap();
        assert_eq!(render(&removed), "removed region scratch\n");
        let err = request_result(
            &control,
            &ControlRequest::Remove {
                name: "scratch".into(),
            },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "no region named \"scratch\"");
        request(&root.join("nope.sock"), &ControlRequest::Stats).unwrap_err();
        server.shutdown().unwrap();
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn regions_render_as_key_value_lines() {
        let region = RegionReport {
            name: "guest0mem".into(),
            size: 1 << 20,
            backend: "memfd".into(),
            vectors: 16,
            peer_limit: 16,
            id_policy: "lowest-free".into(),
            id_reuse: "safe".into(),
            held_ids: vec![1, 3],
            origin: "config".into(),
            persist: false,
            detached: false,
            peers: vec![0, 2],
            sockets: vec![],
            counters: Default::default(),
        };
        assert_eq!(
            render(&ControlResult::Regions {
                regions: vec![region.clone()]
            }),
            "region guest0mem size=1048576 backend=memfd vectors=16 peers=2/16 ids=lowest-free \
             id-reuse=safe origin=config peer-ids=[0,2] held-ids=[1,3] (QEMU: vectors=16, \
             libvirt: <msi vectors='16'>, or more)\n"
        );
        // An older server says nothing of reuse; nothing held: no held-ids.
        let older = RegionReport {
            id_reuse: String::new(),
            held_ids: vec![],
            ..region
        };
        assert_eq!(
            render(&ControlResult::Regions {
                regions: vec![older]
            }),
            "region guest0mem size=1048576 backend=memfd vectors=16 peers=2/16 ids=lowest-free \
             origin=config peer-ids=[0,2] (QEMU: vectors=16, libvirt: <msi vectors='16'>, \
             or more)\n"
        );
        let mut stats = StatsReport::default();
        stats.refusals.insert("GSS_CLIENT_MAX".into(), 1);
        assert_eq!(
            render(&ControlResult::Stats { stats }),
            "joins=0 leaves=0 drops=0 connected=0 doorbell-fds=0 messages=0 factory-requests=0\n\
             refusals GSS_CLIENT_MAX=1\n"
        );
    }
}
