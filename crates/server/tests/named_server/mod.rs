//! A server started from a configuration file in a fresh directory, and its factory and control
//! clients (shared by the named-region and the attack tests).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ivshm_policy::GuestShmStatus;
use ivshm_proto::control::{ControlRequest, ControlResponse, ControlResult};
use ivshm_proto::factory::{decode_line, encode_line, FactoryRequest, FactoryResponse};
use ivshm_server::{config_file, ServerHandle};

use ivshm_test_support::WAIT_GUARD;

const LIMIT: Duration = WAIT_GUARD;

/// A server started from a configuration file in a fresh directory.
pub struct Setup {
    /// The socket root (`<base>/root`, made by the server).
    pub root: PathBuf,
    /// The configuration file (`<base>/ivshm.toml`).
    pub config: PathBuf,
    /// The running server.
    pub server: Option<ServerHandle>,
}

impl Setup {
    /// A server started from `body` (the root is prepended).
    pub fn new(tag: &str, body: &str) -> Setup {
        let mut setup = Setup::unstarted(tag);
        setup.write_config(body);
        setup.start().unwrap();
        setup
    }

    /// A fresh directory with no configuration and no server yet (to plant things first).
    pub fn unstarted(tag: &str) -> Setup {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let base = std::env::temp_dir().join(format!("ivshm-nr-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        Setup {
            root: base.join("root"),
            config: base.join("ivshm.toml"),
            server: None,
        }
    }

    /// Starts the server from the configuration file.
    pub fn start(&mut self) -> Result<(), ivshm_server::ServerError> {
        let loaded = config_file::load(&self.config).unwrap();
        self.server = Some(ServerHandle::spawn(loaded)?);
        Ok(())
    }

    pub fn write_config(&self, body: &str) {
        let text = format!("root = {:?}\n{body}", self.root.display().to_string());
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.root.join(vm)
    }

    pub fn factory(&self, vm: &str, request: &FactoryRequest) -> FactoryResponse {
        let line = exchange(&self.vm_dir(vm).join("factory.sock"), &encode_line(request));
        decode_line(&line).unwrap()
    }

    pub fn create(&self, vm: &str, name: &str, size: u64) -> FactoryResponse {
        self.factory(
            vm,
            &FactoryRequest::Create {
                name: name.into(),
                size,
            },
        )
    }

    pub fn control(&self, request: &ControlRequest) -> ControlResult {
        let line = exchange(&self.root.join("control.sock"), &encode_line(request));
        let response: ControlResponse = decode_line(&line).unwrap();
        assert!(
            response.ok,
            "control {request:?} failed: {:?}",
            response.error
        );
        assert_eq!(response.version, 1);
        response.result.unwrap()
    }

    pub fn control_error(&self, request: &ControlRequest) -> String {
        let line = exchange(&self.root.join("control.sock"), &encode_line(request));
        let response: ControlResponse = decode_line(&line).unwrap();
        assert!(!response.ok);
        response.error.unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().unwrap();
        }
        if let Some(base) = self.config.parent() {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}

/// Writes one request line, reads one response line (with a timeout).
pub fn exchange(socket: &Path, request: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream.write_all(request).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).unwrap();
    assert!(line.ends_with(b"\n"), "no response line: {line:?}");
    line
}

pub fn status(response: &FactoryResponse) -> GuestShmStatus {
    assert_eq!(response.version, 1);
    response.status
}
