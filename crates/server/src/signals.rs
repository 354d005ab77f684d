//! Signals as readable fds for the event loop (a self-pipe per purpose, via `signal-hook`).
//!
//! `SIGINT` and `SIGTERM` make the stop pipe readable, `SIGHUP` the status pipe (the server
//! re-reads its configuration file if it has one, then logs its regions and peers). `SIGPIPE` is ignored by the Rust runtime already, and every send uses
//! `MSG_NOSIGNAL` anyway. The handlers are removed on drop.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::pipe::{pipe_with, PipeFlags};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::SigId;
use thiserror::Error;

use crate::server::{Control, ControlAction};

/// Installing the handlers failed.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum SignalError {
    /// creating a signal pipe: {0}
    ///
    /// A pipe could not be created.
    Pipe(rustix::io::Errno),
    /// installing a signal handler: {0}
    ///
    /// `sigaction` failed.
    Register(std::io::Error),
}

/// The read ends of the signal pipes, with the handlers that feed them.
#[derive(Debug)]
pub struct SignalPipes {
    stop: OwnedFd,
    status: OwnedFd,
    ids: Vec<SigId>,
}

impl SignalPipes {
    /// Installs handlers for `SIGINT`, `SIGTERM` (stop) and `SIGHUP` (reload, log status).
    pub fn install() -> Result<SignalPipes, SignalError> {
        let (stop, stop_write) =
            pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).map_err(SignalError::Pipe)?;
        let (status, status_write) =
            pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).map_err(SignalError::Pipe)?;
        let mut pipes = SignalPipes {
            stop,
            status,
            ids: Vec::new(),
        };
        let stop_write2 = stop_write.try_clone().map_err(SignalError::Register)?;
        for (signal, fd) in [
            (SIGINT, stop_write),
            (SIGTERM, stop_write2),
            (SIGHUP, status_write),
        ] {
            let id = signal_hook::low_level::pipe::register(signal, fd)
                .map_err(SignalError::Register)?;
            pipes.ids.push(id);
        }
        Ok(pipes)
    }

    /// Readable after `SIGINT` or `SIGTERM`.
    pub fn stop_fd(&self) -> BorrowedFd<'_> {
        self.stop.as_fd()
    }

    /// Readable after `SIGHUP`.
    pub fn status_fd(&self) -> BorrowedFd<'_> {
        self.status.as_fd()
    }

    /// The controls to pass to [`Server::run_until`](crate::Server::run_until).
    pub fn controls(&self) -> [Control<'_>; 2] {
        [
            Control {
                fd: self.stop_fd(),
                action: ControlAction::Stop,
            },
            Control {
                fd: self.status_fd(),
                action: ControlAction::Reload,
            },
        ]
    }
}

impl Drop for SignalPipes {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
