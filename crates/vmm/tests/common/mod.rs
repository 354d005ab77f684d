//! What the `ivshm-vmm` integration tests share: a real in-process `ivshm-server` with named
//! regions for three VMs, and a look at the scheduling of this process's threads.

use std::path::PathBuf;
use std::time::Duration;

use ivshm_server::{config_file, ServerHandle};
use ivshm_vmm::guest_shm::ServerFactory;

/// Every factory request and region join must finish within this (a failure guard).
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Largest region a factory creates, in 4 KiB pages (larger: `GSS_NOMEM`).
pub const MAX_PAGES: u32 = 256;

/// The policy of VM `vm0`: everything but `secret*`.
pub const VM0_POLICY: &str = "deny secret*\nallow *";
/// The policy of VM `vm1`: everything, and region `premade` (2 pages) created at VM start.
pub const VM1_POLICY: &str = "create premade,0x2000";
/// The policy of VM `vm2`: everything, with host names `vm2-` + the guest's name (so a guest
/// name of more than 27 bytes is too long after `subst`).
pub const VM2_POLICY: &str = "subst ,vm2-";

/// The real server with named regions: VM directories `vm0`, `vm1` and `vm2` with the policies
/// above, each with its `factory.sock`; regions default to 16 vectors, 16 peers, lowest-free
/// ids, and at most [`MAX_PAGES`] pages.
pub struct NamedServer {
    base: PathBuf,
    server: Option<ServerHandle>,
}

impl NamedServer {
    /// Starts a server in a fresh directory named after `tag`.
    pub fn start(tag: &str) -> NamedServer {
        NamedServer::start_with(tag, "", "")
    }

    /// Starts a server with `defaults` added to its `[defaults]` table and `extra` (tables
    /// such as `[[region]]` or `[vm.NAME]`) added to its file.
    pub fn start_with(tag: &str, defaults: &str, extra: &str) -> NamedServer {
        let base = std::env::temp_dir().join(format!("ivshm-vmm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let root = base.join("root");
        let text = format!(
            "root = {:?}\n[defaults]\nmax_size = {}\n{defaults}\n\
             [vm.vm0]\nqnx = \"\"\"\n{VM0_POLICY}\n\"\"\"\n\
             [vm.vm1]\nqnx = \"\"\"\n{VM1_POLICY}\n\"\"\"\n\
             [vm.vm2]\nqnx = \"\"\"\n{VM2_POLICY}\n\"\"\"\n{extra}\n",
            root.display().to_string(),
            u64::from(MAX_PAGES) * 4096,
        );
        let path = base.join("ivshm.toml");
        std::fs::write(&path, &text).unwrap();
        let config = config_file::parse(&text, &path).unwrap();
        NamedServer {
            server: Some(ServerHandle::spawn(config).unwrap()),
            base,
        }
    }

    /// The socket root: `<root>/control.sock`, `<root>/<vm>/factory.sock`,
    /// `<root>/<vm>/<guest name>.sock`.
    pub fn root(&self) -> PathBuf {
        self.base.join("root")
    }

    /// The `factory.sock` of `vm`.
    pub fn factory_socket(&self, vm: &str) -> PathBuf {
        self.root().join(vm).join("factory.sock")
    }

    /// A factory for `vm`.
    pub fn factory(&self, vm: &str) -> ServerFactory {
        ServerFactory::new(self.factory_socket(vm), TIMEOUT)
    }
}

impl Drop for NamedServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = s.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Whether this process may run a thread `SCHED_FIFO` (root, `CAP_SYS_NICE` or an
/// `RLIMIT_RTPRIO`), tried on a scratch thread.
pub fn realtime_allowed() -> bool {
    std::thread::spawn(|| ivshm_vmm::sched::set_current_thread_priority(1).is_ok())
        .join()
        .unwrap()
}

/// Waits (bounded by [`TIMEOUT`]) until some thread of this process named `name` runs
/// `SCHED_FIFO` at real-time priority `priority` (`/proc/self/task/*/stat`: field 40
/// `rt_priority`, field 41 `policy`).
pub fn wait_for_thread_priority(name: &str, priority: u32) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let mut seen = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let path = task.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
            // Fields after the `(comm)` one start with field 3 (state).
            let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| fields.get(i).map(|f| (*f).to_owned());
            let (rt_priority, policy) = (field(37), field(38));
            if policy.as_deref() == Some("1") && rt_priority == Some(priority.to_string()) {
                return;
            }
            seen.push((rt_priority, policy));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no thread {name} runs SCHED_FIFO at {priority}: (rt_priority, policy) {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
