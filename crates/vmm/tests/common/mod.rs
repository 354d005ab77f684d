//! What the `ivshm-vmm` integration tests share: a real in-process `ivshm-server` with named
//! regions for two VMs.

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
