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

/// The control socket's default path.
pub const DEFAULT_CONTROL: &str = "/run/ivshm/control.sock";

/// How long to wait for the server's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Subcommand, Debug)]
pub enum ControlCommand {
    /// List the server's regions: size, backend, vectors, peers, limit, id policy, origin.
    Regions(ListArgs),
    /// Create or remove a region.
    #[command(subcommand)]
    Region(RegionCommand),
    /// List the VMs, the regions each sees (its name -> host name) and their peers.
    Vms(ListArgs),
    /// Counters: joins, leaves, drops, doorbell fds handed out, refusals by status code.
    Stats(ListArgs),
    /// Re-read the server's configuration file without dropping connected peers.
    Reload(ControlArgs),
}

#[derive(Subcommand, Debug)]
pub enum RegionCommand {
    /// Create a region (by host name); it goes when its last peer leaves unless --persist.
    Create(CreateArgs),
    /// Remove a region: its sockets go now, the region when its last peer leaves.
    Remove(RemoveArgs),
}

#[derive(Args, Debug)]
pub struct ControlArgs {
    /// The server's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Print the server's JSON answer instead of lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The region's host name.
    pub name: String,
    /// Size: bytes, 0x hex, or K/M/G/T suffixes.
    #[arg(long, value_parser = parse_size_arg)]
    pub size: u64,
    /// Vectors per peer (default: the server's).
    #[arg(long)]
    pub vectors: Option<u32>,
    /// Peers at once (default: the server's).
    #[arg(long)]
    pub peer_limit: Option<u32>,
    /// `increasing` or `lowest-free` (default: the server's).
    #[arg(long)]
    pub id_policy: Option<String>,
    /// Keep the region after its last peer leaves.
    #[arg(long)]
    pub persist: bool,
    /// Print the server's JSON answer.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RemoveArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The region's host name.
    pub name: String,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    ivshm_mem::parse_size(s).map_err(|e| e.to_string())
}

pub fn run(c: ControlCommand) -> anyhow::Result<()> {
    let (socket, request, json) = match c {
        ControlCommand::Regions(a) => (a.control.control, ControlRequest::Regions, a.json),
        ControlCommand::Vms(a) => (a.control.control, ControlRequest::Vms, a.json),
        ControlCommand::Stats(a) => (a.control.control, ControlRequest::Stats, a.json),
        ControlCommand::Reload(a) => (a.control, ControlRequest::Reload, false),
        ControlCommand::Region(RegionCommand::Create(a)) => (
            a.control.control,
            ControlRequest::Create(CreateRegion {
                name: a.name,
                size: a.size,
                vectors: a.vectors,
                peer_limit: a.peer_limit,
                id_policy: a.id_policy,
                persist: a.persist,
            }),
            a.json,
        ),
        ControlCommand::Region(RegionCommand::Remove(a)) => (
            a.control.control,
            ControlRequest::Remove { name: a.name },
            false,
        ),
    };
    let result = request_result(&socket, &request)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{}", render(&result));
    }
    Ok(())
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
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the control socket {}", socket.display()))?;
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
    if r.persist {
        flags.push_str(" persist");
    }
    if r.detached {
        flags.push_str(" detached");
    }
    format!(
        "region {} size={} backend={} vectors={} peers={}/{} ids={} origin={} peer-ids=[{}]{flags}\n",
        r.name,
        r.size,
        r.backend,
        r.vectors,
        r.peers.len(),
        r.peer_limit,
        r.id_policy,
        r.origin,
        ids(&r.peers)
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
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server with one open VM under a fresh root.
    fn server(tag: &str) -> (ivshm_server::ServerHandle, PathBuf) {
        let root = std::env::temp_dir().join(format!("ivshm-cli-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mut named = ivshm_server::NamedConfig::new(&root);
        named.defaults.vectors = 1;
        named.vms.push(ivshm_server::VmConfig {
            name: ivshm_policy::RegionName::new("vm0").unwrap(),
            policy: ivshm_policy::VmPolicy::default(),
            directory: ivshm_server::named::DirectoryConfig::default(),
        });
        let config = ivshm_server::ServerConfig {
            regions: Vec::new(),
            max_queued_messages: 1024,
            named: Some(named),
        };
        (ivshm_server::ServerHandle::spawn(config).unwrap(), root)
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
             ids=lowest-free origin=control peer-ids=[] persist\n"
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
        let err = request_result(&control, &ControlRequest::Reload).unwrap_err();
        assert!(err
            .to_string()
            .contains("not started from a configuration file"));
        assert!(request(&root.join("nope.sock"), &ControlRequest::Stats).is_err());
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
            origin: "config".into(),
            persist: false,
            detached: false,
            peers: vec![0, 2],
            sockets: vec![],
        };
        assert_eq!(
            render(&ControlResult::Regions {
                regions: vec![region]
            }),
            "region guest0mem size=1048576 backend=memfd vectors=16 peers=2/16 ids=lowest-free \
             origin=config peer-ids=[0,2]\n"
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
