//! Issue 4 end to end: `ivshm serve --config` with per-VM directories filtered by QNX-style
//! policy. Two QEMU guests in different VMs join one region through their own directories
//! (guest A as `shared`, guest B as `common` via `subst common,shared`), exchange data and
//! doorbells (VFIO + MSI-X in the guests, `ivshm guest`), and ring a host peer that joined
//! through a third VM's directory. Also: the directories hold only what each policy allows,
//! `ivshm policy check` exit statuses, and `ivshm regions` on the control socket.

use std::time::Duration;

use ivshm_e2e::guest_tool::{
    finish_wait, notify, read_hex, start_wait, vfio_doorbell_guest, write_hex,
};
use ivshm_e2e::host::run_to_completion;
use ivshm_e2e::ivshm::{ivshm_command, read_shared};
use ivshm_e2e::{require_e2e, HostProcess, IvshmListener, ScratchDir, Stream};

const BOOT: Duration = Duration::from_secs(240);
const HOST: Duration = Duration::from_secs(60);
const COMMAND: Duration = Duration::from_secs(60);
/// Bound on every background `ivshm guest wait` (it ends itself).
const GUEST_WAIT: Duration = Duration::from_secs(120);
/// How long such a command may take to end.
const FINISH: Duration = Duration::from_secs(GUEST_WAIT.as_secs() + 60);
const SIZE: u64 = 1 << 20;
const VECTORS: u32 = 2;

const CONFIG: &str = r#"
[defaults]
vectors = 2

[[region]]
name = "shared"
size = "1M"

[vm.alpha]
rules = ["allow shared"]

[vm.beta]
qnx = """
    subst common,shared
    allow common
    allow private*
    create private,1M
"""

[vm.monitor]
rules = ["allow shared"]
"#;

fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Runs `ivshm policy check` and returns its exit code and stdout.
fn policy_check(config: &std::path::Path, vm: &str, name: &str) -> (Option<i32>, String) {
    let mut command = ivshm_command(["policy", "check", "--config"]).unwrap();
    command.arg(config).args(["--vm", vm, name]);
    let mut process = HostProcess::spawn("ivshm policy check", command).unwrap();
    let status = process.wait_exit(HOST).unwrap();
    (status.code(), process.lines(Stream::Stdout).join("\n"))
}

#[test]
fn two_guests_in_different_vms_share_a_region_through_their_directories() {
    let assets = require_e2e!();
    let dir = ScratchDir::new().unwrap();
    let root = dir.join("root");
    let config = dir.join("ivshm.toml");
    std::fs::write(
        &config,
        format!("root = {:?}\n{CONFIG}", root.display().to_string()),
    )
    .unwrap();

    // The operator checks the rules offline first.
    let (code, out) = policy_check(&config, "beta", "common");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("host name: shared") && out.contains("status: GSS_OK (0)"),
        "{out}"
    );
    let (code, out) = policy_check(&config, "alpha", "private");
    assert_eq!(code, Some(15), "{out}");
    assert!(out.contains("status: GSS_NO_PERMISSION (5)"), "{out}");

    let mut command = ivshm_command(["serve", "--config"]).unwrap();
    command.arg(&config);
    let mut server = HostProcess::spawn("ivshm serve --config", command).unwrap();
    let control = root.join("control.sock");
    let control_line = format!("listening on {}", control.display());
    server
        .wait_line(Stream::Stderr, "the control socket", HOST, |l| {
            l.contains(&control_line)
        })
        .unwrap();

    // Each directory holds what its VM's policy allows, under the VM's names.
    assert_eq!(
        listing(&root.join("alpha")),
        ["factory.sock", "shared.sock"]
    );
    assert_eq!(
        listing(&root.join("beta")),
        ["common.sock", "factory.sock", "private.sock"]
    );
    assert_eq!(
        listing(&root.join("monitor")),
        ["factory.sock", "shared.sock"]
    );

    let host_socket = root.join("monitor").join("shared.sock");
    let listener = IvshmListener::start(&host_socket, HOST).unwrap();
    assert_eq!(listener.id(), 0, "lowest-free ids start at 0");
    assert_eq!((listener.vectors(), listener.size()), (VECTORS, SIZE));
    let host_id = listener.id();

    let guest = |name: &str, socket: std::path::PathBuf| {
        vfio_doorbell_guest(&assets, name, socket, VECTORS)
            .spawn()
            .unwrap()
    };
    let mut a = guest("named-alpha", root.join("alpha").join("shared.sock"));
    let (id_a, _) = listener.wait_join(HOST).unwrap();
    let mut b = guest("named-beta", root.join("beta").join("common.sock"));
    let (id_b, _) = listener.wait_join(HOST).unwrap();
    assert_eq!((id_a, id_b), (1, 2));
    a.wait_ready(BOOT).unwrap();
    b.wait_ready(BOOT).unwrap();

    // The control socket sees one region with three peers; the private one has none.
    let mut regions = ivshm_command(["regions", "--control"]).unwrap();
    regions.arg(&control);
    let lines = run_to_completion("ivshm regions", regions, HOST).unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("region shared size=1048576 ") && l.contains(" peers=3/16 ")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("region private ") && l.contains(" peers=0/16 ")),
        "{lines:?}"
    );

    // Data both ways between the guests, and to the host.
    let data_a = "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf";
    write_hex(&mut a, 0x1000, data_a, COMMAND).unwrap();
    assert_eq!(read_hex(&mut b, 0x1000, 16, COMMAND).unwrap(), data_a);
    let data_b = "b0b1b2b3b4b5b6b7b8b9babbbcbdbebf";
    write_hex(&mut b, 0x2000, data_b, COMMAND).unwrap();
    assert_eq!(read_hex(&mut a, 0x2000, 16, COMMAND).unwrap(), data_b);
    let host_view = read_shared(&host_socket, 0x1000, 16, HOST).unwrap();
    assert_eq!(ivshm_e2e::ivshm::encode_hex(&host_view), data_a);

    // Doorbells: A rings B, B rings A, each rings the host.
    let wait_b = start_wait(&mut b, "b-wait", id_b, "--count 1", GUEST_WAIT).unwrap();
    notify(&mut a, id_b, 1, COMMAND).unwrap();
    let doorbells = finish_wait(&mut b, wait_b, FINISH).unwrap();
    assert_eq!(doorbells, ["doorbell vector=1"]);
    let wait_a = start_wait(&mut a, "a-wait", id_a, "--count 1", GUEST_WAIT).unwrap();
    notify(&mut b, id_a, 0, COMMAND).unwrap();
    let doorbells = finish_wait(&mut a, wait_a, FINISH).unwrap();
    assert_eq!(doorbells, ["doorbell vector=0"]);
    notify(&mut a, host_id, 1, COMMAND).unwrap();
    listener.wait_doorbell(1, HOST).unwrap();
    notify(&mut b, host_id, 0, COMMAND).unwrap();
    listener.wait_doorbell(0, HOST).unwrap();

    assert!(a.poweroff(COMMAND).unwrap().success());
    listener.wait_leave(id_a, HOST).unwrap();
    assert!(b.poweroff(COMMAND).unwrap().success());
    listener.wait_leave(id_b, HOST).unwrap();
    let status = server.terminate(HOST).unwrap();
    assert!(status.success(), "ivshm serve exit status {status}");
    assert!(
        !control.exists(),
        "the server removes its sockets on SIGTERM"
    );
    assert!(!root.join("alpha").join("shared.sock").exists());
}
