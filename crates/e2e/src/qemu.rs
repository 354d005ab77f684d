//! Booting a test guest under QEMU (TCG) and driving its shell over the serial console.
//!
//! ```no_run
//! use std::time::Duration;
//! use ivshm_e2e::QemuGuest;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let assets = ivshm_e2e::GuestAssets::locate()?;
//! let mut guest = QemuGuest::builder(&assets, "example")
//!     .ivshmem_plain("/dev/shm/example", 1 << 20)
//!     .boot(Duration::from_secs(180))?;
//! let uname = guest.run_ok("uname -r", Duration::from_secs(30))?;
//! println!("{uname}");
//! guest.poweroff(Duration::from_secs(60))?;
//! # Ok(())
//! # }
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::assets::{GuestAssets, VFIO_MODULES};
use crate::binaries::{self, BuildError};
use crate::console::{self, CommandOutput, ConsoleBuffer, WaitFailure};
use crate::initramfs::{InitramfsError, InitramfsSpec, ERROR_MARKER, READY_MARKER};
use crate::{orphan, workspace};

/// How many console lines failure messages show.
const TAIL_LINES: usize = 40;

/// Something went wrong with a guest. Messages include the serial log path and its tail.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum QemuError {
    /// {0}
    ///
    /// Building the initramfs failed.
    Initramfs(InitramfsError),
    /// {0}
    ///
    /// Building the static `ivshm` for the guest failed.
    Build(BuildError),
    /// guest {guest}: {what}: {error}
    ///
    /// Starting QEMU, writing the log or talking to its console failed.
    Io {
        /// The guest's name.
        guest: String,
        /// What was being done.
        what: String,
        /// The underlying error.
        error: std::io::Error,
    },
    /// guest {guest}: timed out after {timeout:?} waiting for {what}
    ///
    /// A wait timed out.
    /// Then, after a line break, `{context}`. A doc comment cannot hold the line break, so
    /// `#[displaydoc]` gives the message.
    #[displaydoc("guest {guest}: timed out after {timeout:?} waiting for {what}\n{context}")]
    Timeout {
        /// The guest's name.
        guest: String,
        /// What was awaited.
        what: String,
        /// How long was waited.
        timeout: Duration,
        /// Log path and tail.
        context: String,
    },
    /// guest {guest}: QEMU exited ({status}) while waiting for {what}
    ///
    /// QEMU exited while something was awaited.
    /// Then, after a line break, `{context}`. A doc comment cannot hold the line break, so
    /// `#[displaydoc]` gives the message.
    #[displaydoc("guest {guest}: QEMU exited ({status}) while waiting for {what}\n{context}")]
    Exited {
        /// The guest's name.
        guest: String,
        /// What was awaited.
        what: String,
        /// QEMU's exit status, if known.
        status: String,
        /// Log path and tail.
        context: String,
    },
    /// guest {guest}: boot step failed: {errors}
    ///
    /// `/init` reported a failed boot step (e.g. `insmod`).
    /// Then, after a line break, `{context}`. A doc comment cannot hold the line break, so
    /// `#[displaydoc]` gives the message.
    #[displaydoc("guest {guest}: boot step failed: {errors}\n{context}")]
    BootStep {
        /// The guest's name.
        guest: String,
        /// The error lines `/init` printed.
        errors: String,
        /// Log path and tail.
        context: String,
    },
    /// guest {guest}: `{command}` exited with status {status}; output:
    ///
    /// A command run with [`QemuGuest::run_ok`] exited non-zero.
    /// Then, after a line break, `{output}`. A doc comment cannot hold the line break, so
    /// `#[displaydoc]` gives the message.
    #[displaydoc("guest {guest}: `{command}` exited with status {status}; output:\n{output}")]
    CommandFailed {
        /// The guest's name.
        guest: String,
        /// The command.
        command: String,
        /// Its exit status.
        status: i32,
        /// What it printed.
        output: String,
    },
    /// guest {guest}: unexpected output from `{command}`: {output:?}
    ///
    /// Output from the guest did not have the expected form.
    UnexpectedOutput {
        /// The guest's name.
        guest: String,
        /// The command.
        command: String,
        /// What it printed.
        output: String,
    },
}

impl From<InitramfsError> for QemuError {
    fn from(error: InitramfsError) -> Self {
        Self::Initramfs(error)
    }
}

impl From<BuildError> for QemuError {
    fn from(error: BuildError) -> Self {
        Self::Build(error)
    }
}

/// The emulated machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// QEMU's default i440FX `pc` machine.
    Pc,
    /// `q35` with an emulated `intel-iommu` and `intel_iommu=on` on the kernel command line,
    /// as VFIO in the guest needs.
    Q35Iommu,
}

/// An `ivshmem` device to give the guest.
#[derive(Debug, Clone)]
enum IvshmemConfig {
    Plain { mem_path: PathBuf, size: u64 },
    Doorbell { socket: PathBuf, vectors: u32 },
}

/// Configures and starts a [`QemuGuest`]; made by [`QemuGuest::builder`].
#[derive(Debug, Clone)]
pub struct GuestBuilder {
    assets: GuestAssets,
    name: String,
    memory_mib: u32,
    machine: Machine,
    kernel_args: Vec<String>,
    devices: Vec<IvshmemConfig>,
    initramfs: InitramfsSpec,
    with_ivshm: bool,
    qemu_args: Vec<String>,
}

impl GuestBuilder {
    /// Guest RAM in MiB (default 256).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// The machine type (default [`Machine::Pc`]).
    pub fn machine(mut self, machine: Machine) -> Self {
        self.machine = machine;
        self
    }

    /// Appends a kernel command-line argument.
    pub fn kernel_arg(mut self, arg: impl Into<String>) -> Self {
        self.kernel_args.push(arg.into());
        self
    }

    /// Adds an `ivshmem-plain` device backed by `memory-backend-file` at `mem_path`
    /// (`share=on`) of `size` bytes (a power of two). QEMU creates the file if needed.
    pub fn ivshmem_plain(mut self, mem_path: impl Into<PathBuf>, size: u64) -> Self {
        self.devices.push(IvshmemConfig::Plain {
            mem_path: mem_path.into(),
            size,
        });
        self
    }

    /// Adds an `ivshmem-doorbell` device connected to the server at `socket`, with `vectors`
    /// MSI-X vectors. The server must be listening before [`spawn`](Self::spawn).
    pub fn ivshmem_doorbell(mut self, socket: impl Into<PathBuf>, vectors: u32) -> Self {
        self.devices.push(IvshmemConfig::Doorbell {
            socket: socket.into(),
            vectors,
        });
        self
    }

    /// Puts the statically linked `ivshm` at `/bin/ivshm` in the guest (built on first use,
    /// see [`binaries::static_ivshm`]).
    pub fn with_ivshm_binary(mut self) -> Self {
        self.with_ivshm = true;
        self
    }

    /// Loads the VFIO modules at boot and switches to [`Machine::Q35Iommu`].
    pub fn with_vfio(mut self) -> Self {
        for module in VFIO_MODULES {
            self.initramfs.module(self.assets.module(module));
        }
        self.machine = Machine::Q35Iommu;
        self
    }

    /// Adds a kernel module (a `.ko` on the host) to load at boot.
    pub fn module(mut self, host_path: impl Into<PathBuf>) -> Self {
        self.initramfs.module(host_path);
        self
    }

    /// Copies a host file into the guest at `guest_path` with permissions `mode`.
    pub fn file(mut self, guest_path: &str, host_path: impl Into<PathBuf>, mode: u32) -> Self {
        self.initramfs.file(guest_path, host_path, mode);
        self
    }

    /// Adds a shell command for `/init` to run before the shell starts.
    pub fn init_command(mut self, line: impl Into<String>) -> Self {
        self.initramfs.init_command(line);
        self
    }

    /// Appends raw QEMU arguments.
    pub fn qemu_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.qemu_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest kernel.
    pub fn kernel(&self) -> &Path {
        &self.assets.kernel
    }

    /// Guest RAM in MiB.
    pub fn memory(&self) -> u32 {
        self.memory_mib
    }

    /// The machine type.
    pub fn machine_type(&self) -> Machine {
        self.machine
    }

    /// The kernel command line: the serial console, quiet, no reboot on panic, no IO-APIC
    /// timer check (under TCG on a loaded host the check can fail and panic the boot: "timer
    /// doesn't work through Interrupt-remapped IO-APIC"), what the machine needs and the added
    /// arguments.
    pub fn kernel_command_line(&self) -> String {
        let mut kernel_args = vec![
            "console=ttyS0",
            "panic=-1",
            "quiet",
            "loglevel=1",
            "no_timer_check",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        if self.machine == Machine::Q35Iommu {
            kernel_args.push("intel_iommu=on".into());
        }
        kernel_args.extend(self.kernel_args.iter().cloned());
        kernel_args.join(" ")
    }

    /// The QEMU command line (without the program) for the given initramfs.
    fn qemu_arguments(&self, initramfs: &Path) -> Vec<String> {
        let mut args: Vec<String> = vec!["-accel".into(), "tcg".into()];
        match self.machine {
            Machine::Pc => args.extend(["-machine".into(), "pc".into()]),
            Machine::Q35Iommu => {
                args.extend(["-machine", "q35", "-device", "intel-iommu"].map(String::from));
            }
        }
        args.extend([
            "-m".to_string(),
            self.memory_mib.to_string(),
            // One vCPU, but `maxcpus=2`: QEMU 7.2's TCG translates a machine that can never
            // have a second CPU without its parallel flag and then drops every guest memory
            // barrier (`mfence` does nothing; fixed upstream in 8.1), so two guests' fenced
            // store-then-load handshakes over shared memory (a channel's wake-up decision)
            // could both miss: a lost wake-up that real hardware never shows.
            "-smp".into(),
            "1,maxcpus=2".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-monitor".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            self.assets.kernel.display().to_string(),
            "-initrd".into(),
            initramfs.display().to_string(),
            "-append".into(),
            self.kernel_command_line(),
        ]);
        for (index, device) in self.devices.iter().enumerate() {
            match device {
                IvshmemConfig::Plain { mem_path, size } => args.extend([
                    "-object".into(),
                    format!(
                        "memory-backend-file,id=ivshm-mem{index},size={size},share=on,mem-path={}",
                        mem_path.display()
                    ),
                    "-device".into(),
                    format!("ivshmem-plain,memdev=ivshm-mem{index}"),
                ]),
                IvshmemConfig::Doorbell { socket, vectors } => args.extend([
                    "-chardev".into(),
                    format!("socket,id=ivshm-chr{index},path={}", socket.display()),
                    "-device".into(),
                    format!("ivshmem-doorbell,chardev=ivshm-chr{index},vectors={vectors}"),
                ]),
            }
        }
        args.extend(self.qemu_args.iter().cloned());
        args
    }

    /// Builds the initramfs and starts QEMU; does not wait for the boot to finish (use
    /// [`QemuGuest::wait_ready`]). Starting several guests and then waiting boots them in
    /// parallel.
    pub fn spawn(self) -> Result<QemuGuest, QemuError> {
        let initramfs = self.build_initramfs()?;
        QemuGuest::start(&self, &initramfs)
    }

    /// Builds (or finds cached) the guest's initramfs; returns its path. For a VM started by
    /// something other than this builder (libvirt: [`crate::libvirt`]).
    pub fn build_initramfs(&self) -> Result<PathBuf, QemuError> {
        let mut initramfs = self.initramfs.clone();
        if self.with_ivshm {
            initramfs.file("/bin/ivshm", binaries::static_ivshm()?, 0o755);
        }
        Ok(initramfs.build(&self.assets.cache_dir)?)
    }

    /// [`spawn`](Self::spawn) then [`QemuGuest::wait_ready`].
    pub fn boot(self, timeout: Duration) -> Result<QemuGuest, QemuError> {
        let mut guest = self.spawn()?;
        guest.wait_ready(timeout)?;
        Ok(guest)
    }
}

/// Starts all `builders`, then waits for each to be ready: the boots overlap.
pub fn boot_all(
    builders: Vec<GuestBuilder>,
    timeout: Duration,
) -> Result<Vec<QemuGuest>, QemuError> {
    let mut guests = builders
        .into_iter()
        .map(GuestBuilder::spawn)
        .collect::<Result<Vec<_>, _>>()?;
    for guest in &mut guests {
        guest.wait_ready(timeout)?;
    }
    Ok(guests)
}

/// A command sent to the guest shell whose output has not been collected yet; see
/// [`QemuGuest::start_command`].
#[derive(Debug)]
#[must_use = "collect the output with QemuGuest::finish_command"]
pub struct PendingCommand {
    id: u64,
    /// Console offset when it was sent; its output comes after.
    from: usize,
    command: String,
}

/// A virtual machine that this harness did not start itself (e.g. a libvirt domain), behind a
/// [`QemuGuest`] made with [`QemuGuest::attach`].
pub trait ExternalVm: std::fmt::Debug + Send {
    /// Waits until the VM has ended or `deadline` passes (`Ok(None)`); returns how it ended.
    fn wait_until(&mut self, deadline: Instant) -> std::io::Result<Option<ExitStatus>>;
    /// Ends the VM at once and makes its console reach end of file (for drop).
    fn kill(&mut self);
}

/// Where console input goes: QEMU's stdin, or a socket.
pub trait ConsoleInput: Write + Send + std::fmt::Debug {}

impl<T: Write + Send + std::fmt::Debug> ConsoleInput for T {}

/// The process behind a guest.
#[derive(Debug)]
enum Vm {
    /// QEMU, started by [`GuestBuilder::spawn`].
    Qemu(Child),
    /// Something else, attached with [`QemuGuest::attach`].
    External(Box<dyn ExternalVm>),
}

/// A running QEMU guest with a busybox shell on its serial console. QEMU is killed on drop.
#[derive(Debug)]
pub struct QemuGuest {
    name: String,
    vm: Vm,
    stdin: Box<dyn ConsoleInput>,
    console: Arc<ConsoleBuffer>,
    qemu_stderr: Arc<ConsoleBuffer>,
    readers: Vec<JoinHandle<()>>,
    log_path: PathBuf,
    /// Byte offset in the console text up to which output has been consumed.
    cursor: usize,
    next_command: u64,
    exit_status: Option<ExitStatus>,
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl QemuGuest {
    /// A builder for a guest named `name` (used in messages and the log file name).
    pub fn builder(assets: &GuestAssets, name: &str) -> GuestBuilder {
        GuestBuilder {
            assets: assets.clone(),
            name: name.to_string(),
            memory_mib: 256,
            machine: Machine::Pc,
            kernel_args: Vec::new(),
            devices: Vec::new(),
            initramfs: InitramfsSpec::new(&assets.busybox),
            with_ivshm: false,
            qemu_args: Vec::new(),
        }
    }

    /// Creates the serial log of guest `name`: its path and the open file.
    fn create_log(name: &str) -> Result<(PathBuf, File), QemuError> {
        let io = |what: &str| {
            let guest = name.to_string();
            let what = what.to_string();
            move |error| QemuError::Io { guest, what, error }
        };
        let log_dir = workspace::log_dir();
        std::fs::create_dir_all(&log_dir).map_err(io("creating the log directory"))?;
        let log_path = log_dir.join(format!("{name}-{}.log", unique_suffix()));
        let log = File::create(&log_path).map_err(io("creating the serial log"))?;
        Ok((log_path, log))
    }

    /// A guest whose VM was started elsewhere (`vm`), driven through its serial console:
    /// `console_in` takes what is typed, `console_out` gives what it prints. Nothing is read
    /// before this call, so attach before the guest boots (e.g. start it paused). The VM is
    /// ended on drop like a QEMU this harness started.
    pub fn attach(
        name: &str,
        vm: Box<dyn ExternalVm>,
        console_in: Box<dyn ConsoleInput>,
        console_out: impl Read + Send + 'static,
    ) -> Result<Self, QemuError> {
        let (log_path, log) = Self::create_log(name)?;
        eprintln!("e2e: guest {name}: serial log {}", log_path.display());
        let console = Arc::new(ConsoleBuffer::default());
        let qemu_stderr = Arc::new(ConsoleBuffer::default());
        let mut guest = Self {
            name: name.to_string(),
            vm: Vm::External(vm),
            stdin: console_in,
            console: Arc::clone(&console),
            qemu_stderr,
            readers: Vec::new(),
            log_path,
            cursor: 0,
            next_command: 1,
            exit_status: None,
        };
        let reader = console::spawn_reader(console_out, console, Some(log)).map_err(|error| {
            QemuError::Io {
                guest: name.to_string(),
                what: "starting a reader".into(),
                error,
            }
        })?;
        guest.readers.push(reader);
        Ok(guest)
    }

    fn start(builder: &GuestBuilder, initramfs: &Path) -> Result<Self, QemuError> {
        let name = builder.name.clone();
        let io = |what: &str| {
            let guest = name.clone();
            let what = what.to_string();
            move |error| QemuError::Io { guest, what, error }
        };
        let (log_path, log) = Self::create_log(&name)?;
        let stderr_log = log.try_clone().map_err(io("duplicating the serial log"))?;

        let args = builder.qemu_arguments(initramfs);
        eprintln!(
            "e2e: guest {name}: serial log {}\ne2e: guest {name}: {} {}",
            log_path.display(),
            builder.assets.qemu.display(),
            args.join(" ")
        );
        let mut command = Command::new(&builder.assets.qemu);
        command
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = orphan::spawn(command).map_err(io("starting QEMU"))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(QemuError::Io {
                guest: name,
                what: "taking QEMU's pipes".into(),
                error: std::io::Error::other("pipe missing"),
            });
        };
        let console = Arc::new(ConsoleBuffer::default());
        let qemu_stderr = Arc::new(ConsoleBuffer::default());
        let mut guest = Self {
            name: name.clone(),
            vm: Vm::Qemu(child),
            stdin: Box::new(stdin),
            console: Arc::clone(&console),
            qemu_stderr: Arc::clone(&qemu_stderr),
            readers: Vec::new(),
            log_path,
            cursor: 0,
            next_command: 1,
            exit_status: None,
        };
        // On error from here on, `guest` is dropped, which kills QEMU.
        guest.readers.push(
            console::spawn_reader(stdout, console, Some(log)).map_err(io("starting a reader"))?,
        );
        guest.readers.push(
            console::spawn_reader(stderr, qemu_stderr, Some(stderr_log))
                .map_err(io("starting a reader"))?,
        );
        Ok(guest)
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The serial console log file (QEMU's stderr is appended to it too).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the console printed so far.
    pub fn console_text(&self) -> String {
        self.console.text()
    }

    /// The log path, the last console lines and QEMU's stderr, for failure messages.
    pub fn failure_context(&self) -> String {
        let stderr = self.qemu_stderr.tail(TAIL_LINES);
        format!(
            "serial log: {}\n--- last console lines ---\n{}\n--- QEMU stderr ---\n{}",
            self.log_path.display(),
            self.console.tail(TAIL_LINES),
            if stderr.is_empty() {
                "(empty)"
            } else {
                &stderr
            }
        )
    }

    fn wait_failure(&mut self, failure: WaitFailure, what: &str, timeout: Duration) -> QemuError {
        match failure {
            WaitFailure::Timeout => QemuError::Timeout {
                guest: self.name.clone(),
                what: what.to_string(),
                timeout,
                context: self.failure_context(),
            },
            WaitFailure::Closed => {
                let status = self
                    .wait_exit(Duration::from_secs(5))
                    .map_or_else(|_| "status unknown".into(), |s| s.to_string());
                QemuError::Exited {
                    guest: self.name.clone(),
                    what: what.to_string(),
                    status,
                    context: self.failure_context(),
                }
            }
        }
    }

    /// Waits until `/init` prints its ready marker (the shell is starting); fails if `/init`
    /// reported a failed boot step before it.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), QemuError> {
        let from = self.cursor;
        let end = self
            .console
            .wait_until(timeout, |text| {
                console::find_marker_line(text, from, READY_MARKER)
            })
            .map_err(|f| self.wait_failure(f, "the guest's ready marker", timeout))?;
        let text = self.console.text();
        let errors: Vec<&str> = text[from..end]
            .lines()
            .filter(|line| line.starts_with(ERROR_MARKER))
            .collect();
        self.cursor = end;
        if errors.is_empty() {
            Ok(())
        } else {
            Err(QemuError::BootStep {
                guest: self.name.clone(),
                errors: errors.join("; "),
                context: self.failure_context(),
            })
        }
    }

    /// Waits until a line ending with `marker` appears on the console after everything consumed
    /// so far, and consumes up to it.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<(), QemuError> {
        let from = self.cursor;
        let end = self
            .console
            .wait_until(timeout, |text| {
                console::find_marker_line(text, from, marker)
            })
            .map_err(|f| self.wait_failure(f, &format!("console line {marker:?}"), timeout))?;
        self.cursor = end;
        Ok(())
    }

    /// Sends raw text to the serial console (a shell line needs its own `\n`).
    pub fn send(&mut self, text: &str) -> Result<(), QemuError> {
        let name = self.name.clone();
        self.stdin
            .write_all(text.as_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(|error| QemuError::Io {
                guest: name,
                what: "writing to the serial console".into(),
                error,
            })
    }

    /// Runs a shell command in the guest and returns what it printed (stdout and stderr) and
    /// its exit status. The command may span lines; its stdin is `/dev/null`. Keep each line
    /// under 4000 bytes (the guest tty's line limit).
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<CommandOutput, QemuError> {
        let pending = self.start_command(command)?;
        self.finish_command(pending, timeout)
    }

    /// Sends a command without waiting for it, e.g. one that blocks until the host acts
    /// (ring a doorbell, then [`finish_command`](Self::finish_command)). Commands sent while
    /// another runs are queued by the guest shell and run in order.
    pub fn start_command(&mut self, command: &str) -> Result<PendingCommand, QemuError> {
        let id = self.next_command;
        self.next_command += 1;
        let from = self.cursor;
        self.send(&console::wrap_command(command, id))?;
        Ok(PendingCommand {
            id,
            from,
            command: command.to_string(),
        })
    }

    /// Waits for a command sent with [`start_command`](Self::start_command) to finish.
    pub fn finish_command(
        &mut self,
        pending: PendingCommand,
        timeout: Duration,
    ) -> Result<CommandOutput, QemuError> {
        let PendingCommand { id, from, command } = pending;
        let (output, end) = self
            .console
            .wait_until(timeout, |text| console::find_command_output(text, from, id))
            .map_err(|f| self.wait_failure(f, &format!("the output of `{command}`"), timeout))?;
        self.cursor = self.cursor.max(end);
        Ok(output)
    }

    /// [`run`](Self::run), failing unless the exit status is 0; returns the output.
    pub fn run_ok(&mut self, command: &str, timeout: Duration) -> Result<String, QemuError> {
        let result = self.run(command, timeout)?;
        if result.success() {
            Ok(result.output)
        } else {
            Err(QemuError::CommandFailed {
                guest: self.name.clone(),
                command: command.to_string(),
                status: result.status,
                output: result.output,
            })
        }
    }

    /// An error for output of `command` that had an unexpected form.
    pub fn unexpected_output(&self, command: &str, output: &str) -> QemuError {
        QemuError::UnexpectedOutput {
            guest: self.name.clone(),
            command: command.to_string(),
            output: output.to_string(),
        }
    }

    /// Waits up to `timeout` for QEMU to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, QemuError> {
        if let Some(status) = self.exit_status {
            return Ok(status);
        }
        let deadline = Instant::now() + timeout;
        let polled = match &mut self.vm {
            Vm::Qemu(child) => orphan::wait_until(child, deadline),
            Vm::External(vm) => vm.wait_until(deadline),
        }
        .map_err(|error| QemuError::Io {
            guest: self.name.clone(),
            what: "waiting for QEMU".into(),
            error,
        })?;
        let Some(status) = polled else {
            return Err(QemuError::Timeout {
                guest: self.name.clone(),
                what: "QEMU to exit".into(),
                timeout,
                context: self.failure_context(),
            });
        };
        self.exit_status = Some(status);
        Ok(status)
    }

    /// A number not used before by this guest's commands (for unique names in the guest).
    pub(crate) fn next_background_id(&mut self) -> u64 {
        let id = self.next_command;
        self.next_command += 1;
        id
    }

    /// A timeout error for `what`, with the `output` seen so far and the failure context.
    pub(crate) fn timeout_error(&self, what: &str, timeout: Duration, output: &str) -> QemuError {
        QemuError::Timeout {
            guest: self.name.clone(),
            what: what.to_string(),
            timeout,
            context: format!("output so far: {output:?}\n{}", self.failure_context()),
        }
    }

    /// Powers the guest off (`poweroff -f`) and waits for QEMU to exit.
    pub fn poweroff(&mut self, timeout: Duration) -> Result<ExitStatus, QemuError> {
        self.send("poweroff -f\n")?;
        self.wait_exit(timeout)
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        let reaped = self.exit_status.is_some();
        match &mut self.vm {
            Vm::Qemu(child) => orphan::kill_and_join(child, reaped, &mut self.readers),
            Vm::External(vm) => {
                if !reaped {
                    vm.kill();
                }
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assets() -> GuestAssets {
        GuestAssets {
            kernel: "/k/vmlinuz".into(),
            modules_dir: "/k/modules".into(),
            busybox: "/bin/busybox".into(),
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            cache_dir: "/k".into(),
        }
    }

    fn position(args: &[String], wanted: &str) -> usize {
        args.iter().position(|a| a == wanted).unwrap()
    }

    #[test]
    fn command_line_has_devices_and_kernel() {
        let args = QemuGuest::builder(&assets(), "t")
            .ivshmem_plain("/dev/shm/x", 1 << 20)
            .ivshmem_doorbell("/tmp/s.sock", 2)
            .qemu_arguments(Path::new("/i.cpio"));
        assert!(args.contains(
            &"memory-backend-file,id=ivshm-mem0,size=1048576,share=on,mem-path=/dev/shm/x".into()
        ));
        assert!(args.contains(&"ivshmem-plain,memdev=ivshm-mem0".into()));
        assert!(args.contains(&"socket,id=ivshm-chr1,path=/tmp/s.sock".into()));
        assert!(args.contains(&"ivshmem-doorbell,chardev=ivshm-chr1,vectors=2".into()));
        assert_eq!(args[position(&args, "-kernel") + 1], "/k/vmlinuz");
        assert_eq!(args[position(&args, "-initrd") + 1], "/i.cpio");
        assert_eq!(args[position(&args, "-accel") + 1], "tcg");
    }

    #[test]
    fn vfio_selects_q35_with_iommu_before_other_devices() {
        let args = QemuGuest::builder(&assets(), "t")
            .ivshmem_doorbell("/tmp/s.sock", 1)
            .with_vfio()
            .qemu_arguments(Path::new("/i.cpio"));
        assert_eq!(args[position(&args, "-machine") + 1], "q35");
        assert!(
            position(&args, "intel-iommu")
                < position(&args, "ivshmem-doorbell,chardev=ivshm-chr0,vectors=1")
        );
        assert!(args[position(&args, "-append") + 1].contains("intel_iommu=on"));
    }
}
