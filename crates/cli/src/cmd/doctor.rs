//! `ivshm doctor --domain FILE.xml`: checks a libvirt domain's `<shmem>` devices against the
//! running server before `virsh start` finds out. QEMU tells the server nothing when it cannot
//! connect (`Permission denied` happens before the server sees a connection) or when its device
//! has fewer vectors than the region (QEMU logs `Too many eventfd received` and drops
//! doorbells), so the checks happen here: the socket exists and belongs to a region, libvirt's
//! QEMU user can connect to it, `<msi vectors>` covers the region's vectors, the model fits,
//! and for `ivshmem-plain` the size matches a POSIX shm region of the same name.
//!
//! Regions are found through the control socket of `ivshm serve --config` (`--control`). A
//! single-region server has none: its vectors are learnt only with `--probe`, which joins the
//! region briefly as a peer (the other peers see a join and a leave).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ivshm_proto::control::{ControlRequest, ControlResult, RegionReport, VmReport};
use ivshm_server::access::{self, Identity};

use super::control::request_result;

/// `ivshm doctor` flags.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// The domain's XML (`virsh dumpxml NAME > FILE.xml`, or the file it is defined from).
    #[arg(long, value_name = "FILE")]
    pub domain: PathBuf,
    /// The control socket of the named-regions server.
    #[arg(
        long,
        value_name = "PATH",
        default_value = super::control::DEFAULT_CONTROL,
        value_parser = crate::args::socket_path
    )]
    pub control: PathBuf,
    /// libvirt's QEMU configuration, for the user and group QEMU runs as.
    #[arg(long, value_name = "FILE", default_value = access::LIBVIRT_QEMU_CONF)]
    pub qemu_conf: PathBuf,
    /// Check as this user (with its groups) instead of the one from --qemu-conf.
    #[arg(long, value_name = "USER")]
    pub qemu_user: Option<String>,
    /// For a socket the control socket does not know (a single-region `ivshm serve`): join
    /// it briefly as a peer to learn its vectors and size. Its peers see a join and a leave.
    #[arg(long)]
    pub probe: bool,
}

/// One `<shmem>` device of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shmem {
    /// `name` attribute.
    pub name: String,
    /// `<model type>`, if given.
    pub model: Option<String>,
    /// `<server path>`, if given.
    pub server: Option<PathBuf>,
    /// `<msi vectors>`, if given.
    pub msi_vectors: Option<u32>,
    /// `<size>` in bytes, if given.
    pub size: Option<u64>,
}

/// A parsed domain: its name and `<shmem>` devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// `<name>`.
    pub name: String,
    /// The devices, in document order.
    pub shmems: Vec<Shmem>,
}

/// libvirt's size units (`<size unit=...>`), in bytes.
fn unit_bytes(unit: &str) -> Option<u64> {
    Some(match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    })
}

/// The first child element of `node` named `tag`.
fn child<'a, 'input>(
    node: roxmltree::Node<'a, 'input>,
    tag: &str,
) -> Option<roxmltree::Node<'a, 'input>> {
    node.children()
        .find(|c| c.is_element() && c.has_tag_name(tag))
}

/// Parses a domain XML (only what `<shmem>` checks need).
pub fn parse_domain(xml: &str) -> anyhow::Result<Domain> {
    let doc = roxmltree::Document::parse(xml).context("not well-formed XML")?;
    let root = doc.root_element();
    anyhow::ensure!(
        root.has_tag_name("domain"),
        "the root element is <{}>, not a libvirt <domain>",
        root.tag_name().name()
    );
    let name = child(root, "name")
        .and_then(|n| n.text())
        .unwrap_or("(unnamed)")
        .trim()
        .to_string();
    let mut shmems = Vec::new();
    if let Some(devices) = child(root, "devices") {
        for node in devices
            .children()
            .filter(|c| c.is_element() && c.has_tag_name("shmem"))
        {
            let shmem_name = node
                .attribute("name")
                .context("a <shmem> without a name attribute")?
                .to_string();
            let msi_vectors = match child(node, "msi").and_then(|m| m.attribute("vectors")) {
                Some(v) => Some(v.parse().with_context(|| {
                    format!("<shmem name='{shmem_name}'>: <msi vectors='{v}'> is not a number")
                })?),
                None => None,
            };
            let size = match child(node, "size") {
                Some(s) => {
                    let unit = s.attribute("unit").unwrap_or("b");
                    let factor = unit_bytes(unit).with_context(|| {
                        format!("<shmem name='{shmem_name}'>: unknown size unit {unit:?}")
                    })?;
                    let value: u64 = s.text().unwrap_or("").trim().parse().with_context(|| {
                        format!("<shmem name='{shmem_name}'>: <size> is not a number")
                    })?;
                    Some(value.checked_mul(factor).with_context(|| {
                        format!("<shmem name='{shmem_name}'>: <size> is too large")
                    })?)
                }
                None => None,
            };
            shmems.push(Shmem {
                name: shmem_name,
                model: child(node, "model")
                    .and_then(|m| m.attribute("type"))
                    .map(String::from),
                server: child(node, "server")
                    .and_then(|s| s.attribute("path"))
                    .map(PathBuf::from),
                msi_vectors,
                size,
            });
        }
    }
    Ok(Domain { name, shmems })
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// As it should be.
    Ok,
    /// Works, but worth knowing.
    Note,
    /// Will fail (or lose doorbells): fix before starting the domain.
    Error,
}

/// One finding about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How bad.
    pub severity: Severity,
    /// What, and how to fix it.
    pub text: String,
}

fn finding(severity: Severity, text: impl Into<String>) -> Finding {
    Finding {
        severity,
        text: text.into(),
    }
}

/// What the server says about its regions (from the control socket, or a probe).
#[derive(Debug, Default)]
pub struct ServerView {
    /// Every region.
    pub regions: Vec<RegionReport>,
    /// Every VM.
    pub vms: Vec<VmReport>,
    /// Why there is no control socket information, if there is none.
    pub control_error: Option<String>,
}

impl ServerView {
    /// The region served on `socket` and how (`VM x's name.sock` or the region's own socket).
    fn region_for(&self, socket: &Path) -> Option<(&RegionReport, String)> {
        let same = |s: &str| Path::new(s) == socket;
        for vm in &self.vms {
            for r in &vm.regions {
                if same(&r.socket) {
                    let region = self.regions.iter().find(|x| x.name == r.host_name)?;
                    return Some((region, format!("VM {}'s {}", vm.name, r.guest_name)));
                }
            }
        }
        self.regions
            .iter()
            .find(|r| r.sockets.iter().any(|s| same(s)))
            .map(|r| (r, "its own socket".to_string()))
    }
}

/// Vectors and size learnt by joining a socket as a peer.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Vectors per peer.
    pub vectors: u32,
    /// Region size.
    pub size: u64,
}

/// Checks one device. `probe` joins a socket the server view does not know.
pub fn check_shmem(
    shmem: &Shmem,
    view: &ServerView,
    qemu: Option<&Identity>,
    probe: &mut dyn FnMut(&Path) -> Option<Result<Probe, String>>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let model = shmem.model.as_deref();
    match (model, &shmem.server) {
        (None, _) => out.push(finding(
            Severity::Error,
            "no <model>: write <model type='ivshmem-doorbell'/> (with a <server>) or \
             <model type='ivshmem-plain'/> (memory only); QEMU 7.2 has no legacy 'ivshmem'",
        )),
        (Some("ivshmem-plain"), Some(_)) => out.push(finding(
            Severity::Error,
            "ivshmem-plain has no server: use <model type='ivshmem-doorbell'/> to connect to \
             the ivshm server, or drop <server>",
        )),
        (Some("ivshmem-doorbell"), None) => out.push(finding(
            Severity::Error,
            "ivshmem-doorbell needs <server path='...'/>: the socket of an ivshm region",
        )),
        (Some("ivshmem-doorbell" | "ivshmem-plain"), _) => {}
        (Some(other), _) => out.push(finding(
            Severity::Error,
            format!("model {other:?}: use ivshmem-doorbell (server) or ivshmem-plain"),
        )),
    }
    if model == Some("ivshmem-plain") && shmem.server.is_none() {
        check_plain(shmem, view, &mut out);
        return out;
    }
    let Some(socket) = &shmem.server else {
        return out;
    };
    match std::fs::symlink_metadata(socket) {
        Err(_) => {
            out.push(finding(
                Severity::Error,
                format!(
                    "no socket at {}: is the server running (systemctl status ivshm)? For \
                     named regions: does the VM's policy let it see the region (ivshm policy \
                     check)?",
                    socket.display()
                ),
            ));
            return out;
        }
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                out.push(finding(
                    Severity::Error,
                    format!("{} is not a socket", socket.display()),
                ));
                return out;
            }
        }
    }
    match qemu {
        Some(who) => match access::can_connect(socket, who) {
            Ok(()) => out.push(finding(
                Severity::Ok,
                format!("{} can connect to {}", who.label, socket.display()),
            )),
            Err(blocked) => out.push(finding(
                Severity::Error,
                format!(
                    "{} cannot connect: {blocked}; virsh start fails with 'Permission denied'. \
                     Give the socket QEMU's group: --socket-group with --socket-mode 0660 \
                     (ivshm serve), or group = \"...\" with dir_mode 0750 and socket_mode 0660 \
                     (configuration, then systemctl reload ivshm)",
                    who.label
                ),
            )),
        },
        None => out.push(finding(
            Severity::Note,
            "libvirt's QEMU user is unknown (no /etc/libvirt/qemu.conf, no libvirt-qemu or \
             qemu user): permissions not checked (--qemu-user USER checks as USER)",
        )),
    }
    let (vectors, size, what, reuses_ids) = match view.region_for(socket) {
        Some((region, via)) => (
            region.vectors,
            region.size,
            format!("region {} ({via})", region.name),
            region.id_reuse == "immediate",
        ),
        None => match probe(socket) {
            Some(Ok(p)) => (
                p.vectors,
                p.size,
                "the region on this socket (probed)".into(),
                false,
            ),
            Some(Err(e)) => {
                out.push(finding(
                    Severity::Error,
                    format!("joining {} failed: {e}", socket.display()),
                ));
                return out;
            }
            None => {
                let why = view
                    .control_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                out.push(finding(
                    Severity::Note,
                    format!(
                        "no region of the control socket serves {}{why}: its vectors are \
                         unknown; --probe joins it briefly to find out",
                        socket.display()
                    ),
                ));
                return out;
            }
        },
    };
    out.push(finding(
        Severity::Ok,
        format!("{what}: {size} bytes, {vectors} vector(s) per peer"),
    ));
    let msi = shmem.msi_vectors.unwrap_or(1);
    let given = match shmem.msi_vectors {
        Some(n) => format!("<msi vectors='{n}'>"),
        None => "no <msi vectors> (QEMU's default: 1)".to_string(),
    };
    if msi < vectors {
        out.push(finding(
            Severity::Error,
            format!(
                "{given} but {what} has {vectors} vectors: QEMU logs 'Too many eventfd \
                 received, device has {msi} vectors' and doorbells on vectors {msi}..{} are \
                 lost. Fix: <msi vectors='{vectors}' ioeventfd='on'/>",
                vectors - 1
            ),
        ));
    } else if msi > vectors {
        out.push(finding(
            Severity::Note,
            format!("{given}: vectors above {vectors} stay unused (the region has {vectors})"),
        ));
    } else {
        out.push(finding(Severity::Ok, format!("{given} matches")));
    }
    if reuses_ids {
        out.push(finding(
            Severity::Note,
            format!(
                "{what} gives a departed peer's id to the next peer at once \
                 (id-reuse=immediate): QEMU 7.2 (Debian 12's) aborts when a peer id it saw \
                 leave joins again, as happens when host commands come and go while the \
                 domain runs. Set id_reuse = \"safe\" (the default) for it"
            ),
        ));
    }
    if let Some(given_size) = shmem.size {
        if given_size != size {
            out.push(finding(
                Severity::Note,
                format!(
                    "<size> {given_size} bytes is ignored with a server: the region has {size}"
                ),
            ));
        }
    }
    out
}

/// ivshmem-plain: libvirt maps `/dev/shm/NAME`; a region with the POSIX shm backend of that name
/// shares it.
fn check_plain(shmem: &Shmem, view: &ServerView, out: &mut Vec<Finding>) {
    let backend = format!("shm /{}", shmem.name);
    let Some(region) = view.regions.iter().find(|r| r.backend == backend) else {
        out.push(finding(
            Severity::Note,
            format!(
                "ivshmem-plain maps /dev/shm/{}; no region of this server uses it (a region \
                 shares it with --backend shm --shm-name {}); no doorbells either way",
                shmem.name, shmem.name
            ),
        ));
        return;
    };
    match shmem.size {
        Some(size) if size == region.size => out.push(finding(
            Severity::Ok,
            format!(
                "region {} shares /dev/shm/{} ({size} bytes)",
                region.name, shmem.name
            ),
        )),
        Some(size) => out.push(finding(
            Severity::Error,
            format!(
                "<size> is {size} bytes but region {} (/dev/shm/{}) has {}: QEMU refuses or \
                 maps the wrong size. Fix: <size unit='b'>{}</size>",
                region.name, shmem.name, region.size, region.size
            ),
        )),
        None => out.push(finding(
            Severity::Error,
            format!(
                "no <size>: libvirt's default (4 MiB) may not be region {}'s {} bytes. Fix: \
                 <size unit='b'>{}</size>",
                region.name, region.size, region.size
            ),
        )),
    }
}

/// What the control socket says, or why it says nothing.
fn server_view(control: &Path) -> ServerView {
    let regions = request_result(control, &ControlRequest::Regions);
    let vms = request_result(control, &ControlRequest::Vms);
    match (regions, vms) {
        (Ok(ControlResult::Regions { regions }), Ok(ControlResult::Vms { vms })) => ServerView {
            regions,
            vms,
            control_error: None,
        },
        (Err(e), _) | (_, Err(e)) => ServerView {
            control_error: Some(crate::report::one_line(&e)),
            ..ServerView::default()
        },
        _ => ServerView {
            control_error: Some("unexpected answers from the control socket".into()),
            ..ServerView::default()
        },
    }
}

fn join_probe(socket: &Path) -> Result<Probe, String> {
    let options = ivshm_client::ConnectOptions {
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let peer = ivshm_client::Peer::connect(socket, options).map_err(|e| e.to_string())?;
    Ok(Probe {
        vectors: u32::try_from(peer.vectors()).unwrap_or(u32::MAX),
        size: peer.shm_size(),
    })
}

/// The report and whether anything will fail.
pub fn report(args: &DoctorArgs) -> anyhow::Result<(String, bool)> {
    let xml = std::fs::read_to_string(&args.domain)
        .with_context(|| format!("reading {}", args.domain.display()))?;
    let domain = parse_domain(&xml).with_context(|| format!("{}", args.domain.display()))?;
    let qemu = match &args.qemu_user {
        Some(user) => Some(Identity::user(user)?),
        None => Identity::libvirt_qemu(&args.qemu_conf),
    };
    let view = server_view(&args.control);
    let mut probe = |socket: &Path| args.probe.then(|| join_probe(socket));
    let mut text = format!(
        "domain {}: {} shmem device(s)\n",
        domain.name,
        domain.shmems.len()
    );
    let mut failing = 0;
    for shmem in &domain.shmems {
        text.push_str(&format!(
            "shmem {}: model={} server={} msi-vectors={}\n",
            shmem.name,
            shmem.model.as_deref().unwrap_or("-"),
            shmem
                .server
                .as_deref()
                .map_or("-".into(), |p| p.display().to_string()),
            shmem.msi_vectors.map_or("-".to_string(), |v| v.to_string())
        ));
        for f in check_shmem(shmem, &view, qemu.as_ref(), &mut probe) {
            let tag = match f.severity {
                Severity::Ok => "ok",
                Severity::Note => "note",
                Severity::Error => {
                    failing += 1;
                    "FAIL"
                }
            };
            text.push_str(&format!("  {tag}: {}\n", f.text));
        }
    }
    text.push_str(&if failing == 0 {
        "summary: nothing here will fail\n".to_string()
    } else {
        format!("summary: {failing} problem(s) will fail or lose doorbells; fix them first\n")
    });
    Ok((text, failing > 0))
}

/// Runs `ivshm doctor`: exit status 0 when nothing will fail, 2 when something will.
pub fn run(args: &DoctorArgs) -> anyhow::Result<()> {
    let (text, failing) = report(args)?;
    print!("{text}");
    if failing {
        std::process::exit(2);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "<domain type='kvm'><name>guest</name><devices>
        <shmem name='ivshmem0'>
          <model type='ivshmem-doorbell'/>
          <server path='/run/ivshm/vm0/mem.sock'/>
          <msi vectors='2' ioeventfd='on'/>
        </shmem>
        <shmem name='plain'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>
        <shmem name='bare'/>
      </devices></domain>";

    #[test]
    fn parses_shmem_devices() {
        let d = parse_domain(DOMAIN).unwrap();
        assert_eq!(d.name, "guest");
        assert_eq!(d.shmems.len(), 3);
        assert_eq!(
            d.shmems[0],
            Shmem {
                name: "ivshmem0".into(),
                model: Some("ivshmem-doorbell".into()),
                server: Some("/run/ivshm/vm0/mem.sock".into()),
                msi_vectors: Some(2),
                size: None,
            }
        );
        assert_eq!(d.shmems[1].size, Some(4 << 20));
        assert_eq!(d.shmems[2].model, None);
    }

    #[test]
    fn bad_xml_is_an_error_not_a_panic() {
        for bad in [
            "",
            "<domain>",
            "<network/>",
            "<domain><devices><shmem/></devices></domain>",
            "<domain><devices><shmem name='a'><msi vectors='x'/></shmem></devices></domain>",
            "<domain><devices><shmem name='a'><size unit='parsec'>1</size></shmem></devices></domain>",
            "<domain><devices><shmem name='a'><size unit='T'>99999999999</size></shmem></devices></domain>",
        ] {
            assert!(parse_domain(bad).is_err(), "{bad:?}");
        }
    }

    fn no_probe(_: &Path) -> Option<Result<Probe, String>> {
        None
    }

    #[test]
    fn model_mistakes_are_failures() {
        let view = ServerView::default();
        let bare = Shmem {
            name: "b".into(),
            model: None,
            server: None,
            msi_vectors: None,
            size: None,
        };
        let f = check_shmem(&bare, &view, None, &mut no_probe);
        assert_eq!(f[0].severity, Severity::Error);
        let doorbell_without_server = Shmem {
            model: Some("ivshmem-doorbell".into()),
            ..bare.clone()
        };
        let f = check_shmem(&doorbell_without_server, &view, None, &mut no_probe);
        assert!(f[0].text.contains("needs <server"), "{f:?}");
        let missing = Shmem {
            model: Some("ivshmem-doorbell".into()),
            server: Some("/nonexistent/ivshm/x.sock".into()),
            ..bare
        };
        let f = check_shmem(&missing, &view, None, &mut no_probe);
        assert!(f[0].text.starts_with("no socket at /nonexistent"), "{f:?}");
    }

    #[test]
    fn plain_sizes_are_compared_with_the_shm_region() {
        let view = ServerView {
            regions: vec![RegionReport {
                name: "r".into(),
                size: 1 << 20,
                backend: "shm /plain".into(),
                vectors: 1,
                peer_limit: 16,
                id_policy: "increasing".into(),
                id_reuse: "safe".into(),
                held_ids: vec![],
                origin: "standalone".into(),
                persist: false,
                detached: false,
                peers: vec![],
                sockets: vec![],
                counters: Default::default(),
            }],
            ..ServerView::default()
        };
        let plain = Shmem {
            name: "plain".into(),
            model: Some("ivshmem-plain".into()),
            server: None,
            msi_vectors: None,
            size: Some(4 << 20),
        };
        let f = check_shmem(&plain, &view, None, &mut no_probe);
        assert_eq!(f[0].severity, Severity::Error, "{f:?}");
        assert!(f[0].text.contains("<size unit='b'>1048576</size>"));
        let right = Shmem {
            size: Some(1 << 20),
            ..plain
        };
        assert_eq!(
            check_shmem(&right, &view, None, &mut no_probe)[0].severity,
            Severity::Ok
        );
    }
}
