//! Running a server on its own thread, for tests, benchmarks and embedding.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use rustix::event::{eventfd, EventfdFlags};

use crate::config::ServerConfig;
use crate::region::RegionInfo;
use crate::server::{Control, ControlAction, Server};
use crate::stats::{Stats, StatsSnapshot};
use crate::ServerError;

/// A server running on a thread of its own. Dropping the handle shuts the server down.
#[derive(Debug)]
pub struct ServerHandle {
    stop: Arc<OwnedFd>,
    reload: Arc<OwnedFd>,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
    stats: Arc<Stats>,
    regions: Vec<RegionInfo>,
}

impl ServerHandle {
    /// Creates the server (memory, sockets: when this returns, peers can connect) and runs
    /// its loop on a new thread.
    pub fn spawn(config: ServerConfig) -> Result<ServerHandle, ServerError> {
        let server = Server::new(config)?;
        let stop = Arc::new(
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                .map_err(ServerError::Epoll)?,
        );
        let reload = Arc::new(
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                .map_err(ServerError::Epoll)?,
        );
        let stats = server.stats();
        let regions = server.regions();
        let thread_stop = stop.clone();
        let thread_reload = reload.clone();
        let thread = std::thread::Builder::new()
            .name("ivshm-server".into())
            .spawn(move || {
                let mut server = server;
                let controls = [
                    Control {
                        fd: thread_stop.as_fd(),
                        action: ControlAction::Stop,
                    },
                    Control {
                        fd: thread_reload.as_fd(),
                        action: ControlAction::Reload,
                    },
                ];
                let result = server.run_until(&controls);
                drop(server);
                result
            })
            .map_err(ServerError::Thread)?;
        Ok(ServerHandle {
            stop,
            reload,
            thread: Some(thread),
            stats,
            regions,
        })
    }

    /// The first region's socket path.
    pub fn socket_path(&self) -> &Path {
        self.regions
            .first()
            .map_or(Path::new(""), |r| r.socket.as_path())
    }

    /// Facts about every region.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// Asks the server to re-read its configuration file, as `SIGHUP` does (it happens
    /// asynchronously; the outcome is logged). Without a file the server only logs its status.
    pub fn reload(&self) -> Result<(), ServerError> {
        rustix::io::write(self.reload.as_fd(), &1u64.to_ne_bytes())
            .map(|_| ())
            .map_err(ServerError::Epoll)
    }

    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Stops the loop and waits until the server is gone (peer sockets closed, socket files
    /// and non-kept shm objects removed). Returns the final counters.
    pub fn shutdown(mut self) -> Result<StatsSnapshot, ServerError> {
        self.stop_and_join()?;
        Ok(self.stats.snapshot())
    }

    fn stop_and_join(&mut self) -> Result<(), ServerError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        rustix::io::write(self.stop.as_fd(), &1u64.to_ne_bytes()).map_err(ServerError::Epoll)?;
        thread.join().map_err(|_| ServerError::Panicked)?
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            tracing::error!(error = %e, "server thread ended with an error");
        }
    }
}
