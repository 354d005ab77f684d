//! libvirt end to end: test guests booted as libvirt domains (`virsh create`), with QEMU
//! running as libvirt's unprivileged user and `<shmem>` devices, driven through the same
//! serial-console shell as [`QemuGuest`].
//!
//! [`Libvirt::shared`] uses the libvirt daemon that runs already (a service manager's), or
//! starts `virtlogd` and `libvirtd` by hand and stops exactly those when the last user is
//! done. A `libvirtd` started here runs in a private mount namespace (`unshare --mount`) that
//! changes nothing on the host but three views:
//!
//! - `/dev/kvm` is an empty root-only file. On a host whose `/dev/kvm` is root-only, libvirt
//!   finds its capability cache (probed with KVM) invalid at every `virsh create` and probes
//!   QEMU again for about 50 s; with no usable KVM in sight the cache stays valid. The test
//!   domains are TCG (`type='qemu'`) anyway.
//! - `/etc/libvirt/qemu.conf` is the host's file plus `namespaces = []`: libvirt's per-domain
//!   `/dev` cannot move that stand-in `/dev/kvm`. QEMU still runs as the configured user.
//! - `/var/cache/libvirt/qemu` is a private directory, so the host's capability cache is not
//!   touched.
//!
//! A domain is named `ivshm-e2e-<pid>-<n>`, transient, and destroyed on drop; leftovers of a
//! killed test run are destroyed when the daemon is first used.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::assets::e2e_required;
use crate::orphan;
use crate::qemu::{ExternalVm, GuestBuilder, Machine, QemuError, QemuGuest};

/// The libvirt connection the tests use.
pub const URI: &str = "qemu:///system";
/// Prefix of every test domain's name.
pub const DOMAIN_PREFIX: &str = "ivshm-e2e-";
/// The user libvirt runs QEMU as on Debian.
pub const QEMU_USER: &str = "libvirt-qemu";
/// Bound on waiting for a daemon to answer.
const DAEMON_START: Duration = Duration::from_secs(120);

/// Something about libvirt failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum LibvirtError {
    /// {0} (run scripts/install-deps)
    ///
    /// A program or user libvirt needs is not there.
    Missing(String),
    /// {what}: {error}
    ///
    /// Running a program failed.
    Io {
        /// What was done.
        what: String,
        /// Why it failed.
        error: std::io::Error,
    },
    /// virsh {args}: exit status {status}: {output}
    ///
    /// A `virsh` command failed.
    Virsh {
        /// Its arguments.
        args: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        output: String,
    },
    /// {0}
    ///
    /// A daemon did not come up.
    Daemon(String),
    /// {0}
    ///
    /// The guest's console or initramfs.
    Guest(QemuError),
}

impl From<QemuError> for LibvirtError {
    fn from(error: QemuError) -> Self {
        Self::Guest(error)
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LibvirtError {
    let what = what.into();
    move |error| LibvirtError::Io { what, error }
}

fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The uid and gid of `user` from `/etc/passwd`.
pub fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 4 && fields[0] == user)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

/// Checks that libvirt can be used here: root, `virsh`, `libvirtd`, `virtlogd`, `unshare`
/// and the [`QEMU_USER`].
pub fn check_available() -> Result<(), LibvirtError> {
    if !rustix::process::geteuid().is_root() {
        return Err(LibvirtError::Missing(
            "libvirt tests need root (qemu:///system)".into(),
        ));
    }
    for program in ["virsh", "libvirtd", "virtlogd", "unshare"] {
        if find_program(program).is_none() {
            return Err(LibvirtError::Missing(format!("{program} not found")));
        }
    }
    if user_ids(QEMU_USER).is_none() {
        return Err(LibvirtError::Missing(format!("no user {QEMU_USER}")));
    }
    Ok(())
}

/// For tests: `true` when libvirt can be used; `false` after a loud `SKIPPED:` line when it
/// cannot and `IVSHM_E2E` is not `1`; a panic when it cannot and `IVSHM_E2E=1`.
pub fn available_for_test(test_name: &str) -> bool {
    match check_available() {
        Ok(()) => true,
        Err(err) if e2e_required() => panic!("libvirt end-to-end test {test_name}: {err}"),
        Err(err) => {
            eprintln!("SKIPPED: {test_name}: {err} (set IVSHM_E2E=1 to make this an error)");
            false
        }
    }
}

/// Runs `virsh -c qemu:///system ARGS`; returns stdout, or the failure with everything printed.
pub fn virsh(args: &[&str]) -> Result<String, LibvirtError> {
    let output = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io_error("running virsh"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(LibvirtError::Virsh {
            args: args.join(" "),
            status: output.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}

/// Whether something accepts connections on the unix socket at `path`.
fn accepting(path: &str) -> bool {
    UnixStream::connect(path).is_ok()
}

/// A daemon started by hand, stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
struct StartedDaemon {
    name: &'static str,
    child: Child,
}

impl Drop for StartedDaemon {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        match orphan::wait_until(&mut self.child, deadline) {
            Ok(Some(_)) => eprintln!("e2e: libvirt: stopped the {} started here", self.name),
            _ => {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Access to libvirt for the tests; see the module docs.
#[derive(Debug)]
pub struct Libvirt {
    /// What was started here, stopped in reverse order on drop (libvirtd before virtlogd).
    started: Vec<StartedDaemon>,
    /// The private files of a libvirtd started here.
    private: Option<PathBuf>,
}

/// True from the moment daemons are started here until the [`Libvirt`] that started them has
/// stopped them and removed their files. Its drop runs in the last user's thread, outside
/// [`Libvirt::shared`]'s lock: a test that finds no live instance waits for this to clear
/// before it looks for a daemon, or it would take the one being stopped for a running one, or
/// start one whose private files the old drop then removes.
static HAND_STARTED: AtomicBool = AtomicBool::new(false);

impl Drop for Libvirt {
    fn drop(&mut self) {
        let hand_started = !self.started.is_empty();
        while let Some(daemon) = self.started.pop() {
            drop(daemon);
        }
        if let Some(dir) = &self.private {
            let _ = std::fs::remove_dir_all(dir);
        }
        if hand_started {
            HAND_STARTED.store(false, Ordering::Release);
        }
    }
}

impl Libvirt {
    /// The libvirt access every test in this process shares: started on first use, stopped
    /// when the last [`Arc`] is dropped.
    pub fn shared() -> Result<Arc<Libvirt>, LibvirtError> {
        static SHARED: Mutex<Weak<Libvirt>> = Mutex::new(Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(libvirt) = slot.upgrade() {
            return Ok(libvirt);
        }
        // The daemons of the previous instance are still being stopped (its last user dropped
        // it a moment ago); their drop waits at most 30 s per daemon.
        let deadline = Instant::now() + Duration::from_secs(90);
        while HAND_STARTED.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                return Err(LibvirtError::Daemon(
                    "the daemons started for earlier tests were not stopped within 90s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let libvirt = Arc::new(Self::connect_or_start()?);
        *slot = Arc::downgrade(&libvirt);
        Ok(libvirt)
    }

    /// Uses a running libvirtd, or starts virtlogd and libvirtd by hand.
    fn connect_or_start() -> Result<Libvirt, LibvirtError> {
        check_available()?;
        let mut libvirt = Libvirt {
            started: Vec::new(),
            private: None,
        };
        if virsh(&["version"]).is_ok() {
            eprintln!("e2e: libvirt: using the libvirtd that runs already");
        } else {
            if !accepting("/run/libvirt/virtlogd-sock") {
                let mut command = Command::new("virtlogd");
                command.stdin(Stdio::null());
                let child = orphan::spawn(command).map_err(io_error("starting virtlogd"))?;
                libvirt.started.push(StartedDaemon {
                    name: "virtlogd",
                    child,
                });
                HAND_STARTED.store(true, Ordering::Release);
                wait_for("virtlogd", || accepting("/run/libvirt/virtlogd-sock"))?;
            }
            libvirt.start_libvirtd()?;
            wait_for("libvirtd", || virsh(&["version"]).is_ok())?;
        }
        destroy_leftovers();
        Ok(libvirt)
    }

    fn start_libvirtd(&mut self) -> Result<(), LibvirtError> {
        static STARTS: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ivshm-e2e-libvirtd-{}-{}",
            std::process::id(),
            STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cache")).map_err(io_error("private libvirt files"))?;
        self.private = Some(dir.clone());
        let fake_kvm = dir.join("kvm");
        std::fs::write(&fake_kvm, b"").map_err(io_error("the stand-in /dev/kvm"))?;
        std::fs::set_permissions(&fake_kvm, std::fs::Permissions::from_mode(0o600))
            .map_err(io_error("the stand-in /dev/kvm"))?;
        let host_conf = std::fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default();
        let mut conf: String = host_conf
            .lines()
            .filter(|line| !line.trim_start().starts_with("namespaces"))
            .map(|line| format!("{line}\n"))
            .collect();
        conf.push_str("# ivshm e2e: no per-domain /dev (the stand-in /dev/kvm cannot move)\nnamespaces = []\n");
        let qemu_conf = dir.join("qemu.conf");
        std::fs::write(&qemu_conf, conf).map_err(io_error("the private qemu.conf"))?;
        let mut script = String::from("set -e\n");
        if Path::new("/dev/kvm").exists() {
            script.push_str(&format!("mount --bind '{}' /dev/kvm\n", fake_kvm.display()));
        }
        script.push_str(&format!(
            "mount --bind '{}' /etc/libvirt/qemu.conf\n",
            qemu_conf.display()
        ));
        if Path::new("/var/cache/libvirt/qemu").is_dir() {
            script.push_str(&format!(
                "mount --bind '{}' /var/cache/libvirt/qemu\n",
                dir.join("cache").display()
            ));
        }
        script.push_str("exec libvirtd\n");
        let mut command = Command::new("unshare");
        command
            .args([
                "--mount",
                "--propagation",
                "slave",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null());
        let child = orphan::spawn(command).map_err(io_error("starting libvirtd"))?;
        eprintln!(
            "e2e: libvirt: started libvirtd (pid {}) in a private mount namespace",
            child.id()
        );
        self.started.push(StartedDaemon {
            name: "libvirtd",
            child,
        });
        HAND_STARTED.store(true, Ordering::Release);
        Ok(())
    }
}

/// Polls `ready` every 100 ms up to [`DAEMON_START`].
fn wait_for(name: &str, mut ready: impl FnMut() -> bool) -> Result<(), LibvirtError> {
    let deadline = Instant::now() + DAEMON_START;
    while !ready() {
        if Instant::now() >= deadline {
            return Err(LibvirtError::Daemon(format!(
                "{name} did not answer within {DAEMON_START:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Destroys test domains left by a test process that was killed.
fn destroy_leftovers() {
    let Ok(names) = virsh(&["list", "--name"]) else {
        return;
    };
    for name in names.lines().map(str::trim) {
        if name.starts_with(DOMAIN_PREFIX) {
            eprintln!("e2e: libvirt: destroying leftover domain {name}");
            let _ = virsh(&["destroy", name]);
        }
    }
}

fn unique_domain_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{DOMAIN_PREFIX}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// XML-escapes text for an element or an attribute value.
pub fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The domain XML of a test guest: `builder`'s kernel, memory and machine, the initramfs
/// `initrd`, the serial console on a unix socket `console` that QEMU listens on, and the
/// device elements `devices` (e.g. `<shmem>`) verbatim.
pub fn domain_xml(
    name: &str,
    builder: &GuestBuilder,
    kernel: &Path,
    initrd: &Path,
    console: &Path,
    devices: &str,
) -> String {
    let machine = match builder.machine_type() {
        Machine::Pc => "pc",
        Machine::Q35Iommu => "q35",
    };
    let iommu = if builder.machine_type() == Machine::Q35Iommu {
        "    <iommu model='intel'/>\n"
    } else {
        ""
    };
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='unix'>
      <source mode='bind' path='{console}'/>
      <target port='0'/>
    </serial>
{iommu}{devices}
    <memballoon model='none'/>
  </devices>
</domain>
",
        memory = builder.memory(),
        kernel = xml_escape(&kernel.display().to_string()),
        initrd = xml_escape(&initrd.display().to_string()),
        cmdline = xml_escape(&builder.kernel_command_line()),
        console = xml_escape(&console.display().to_string()),
    )
}

/// A running transient domain; destroyed on drop (through [`QemuGuest`]'s drop when attached).
#[derive(Debug)]
pub struct Domain {
    name: String,
    qemu_pid: Option<u32>,
    console: Option<UnixStream>,
    _libvirt: Arc<Libvirt>,
}

impl Domain {
    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pid of the domain's QEMU, from libvirt's pid file.
    pub fn qemu_pid(&self) -> Option<u32> {
        self.qemu_pid
    }

    fn destroy(&mut self) {
        if let Some(console) = &self.console {
            let _ = console.shutdown(std::net::Shutdown::Both);
        }
        let _ = virsh(&["destroy", &self.name]);
    }
}

impl ExternalVm for Domain {
    /// The domain ends when its QEMU process has exited and libvirt has let the transient
    /// domain go (after restoring the files it relabelled). libvirt does not pass QEMU's exit
    /// status on: an end is reported as status 0.
    fn wait_until(&mut self, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
        loop {
            let qemu_alive = self
                .qemu_pid
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            let alive = qemu_alive || virsh(&["domstate", &self.name]).is_ok();
            if !alive {
                return Ok(Some(ExitStatus::from_raw(0)));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        self.destroy();
    }
}

/// What a booted libvirt guest is made of.
#[derive(Debug)]
pub struct LibvirtGuest {
    /// The guest, driven through its console like any other.
    pub guest: QemuGuest,
    /// The domain's name.
    pub domain: String,
    /// The pid of its QEMU.
    pub qemu_pid: Option<u32>,
    /// The domain XML it was created from.
    pub xml: String,
}

/// Creates a transient domain (`virsh create --paused`) for `builder`'s guest with the extra
/// device elements `devices`, attaches to its console, resumes it and waits for the guest's
/// shell (`boot` bounds the wait). Kernel and initramfs are copied into `dir` (libvirt
/// relabels them for QEMU's user), which must be reachable by that user.
pub fn boot(
    libvirt: &Arc<Libvirt>,
    builder: &GuestBuilder,
    dir: &Path,
    devices: &str,
    boot: Duration,
) -> Result<LibvirtGuest, LibvirtError> {
    let name = unique_domain_name();
    let initramfs = builder.build_initramfs()?;
    let kernel = dir.join(format!("{name}.vmlinuz"));
    let initrd = dir.join(format!("{name}.cpio"));
    std::fs::copy(builder.kernel(), &kernel).map_err(io_error("copying the kernel"))?;
    std::fs::copy(&initramfs, &initrd).map_err(io_error("copying the initramfs"))?;
    let console_path = dir.join(format!("{name}.console"));
    let xml = domain_xml(&name, builder, &kernel, &initrd, &console_path, devices);
    let xml_path = dir.join(format!("{name}.xml"));
    std::fs::File::create(&xml_path)
        .and_then(|mut f| f.write_all(xml.as_bytes()))
        .map_err(io_error("writing the domain XML"))?;
    eprintln!(
        "e2e: libvirt: virsh create {} --paused ({})",
        xml_path.display(),
        builder.name()
    );
    virsh(&["create", &xml_path.display().to_string(), "--paused"])?;
    let mut domain = Domain {
        name: name.clone(),
        qemu_pid: None,
        console: None,
        _libvirt: Arc::clone(libvirt),
    };
    // From here on a failure destroys the domain (drop of `domain`, or of the guest).
    domain.qemu_pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid"))
        .ok()
        .and_then(|pid| pid.trim().parse().ok());
    let console = UnixStream::connect(&console_path).map_err(io_error(format!(
        "connecting to the serial console {}",
        console_path.display()
    )))?;
    let reader = console
        .try_clone()
        .map_err(io_error("duplicating the console"))?;
    let writer = console
        .try_clone()
        .map_err(io_error("duplicating the console"))?;
    domain.console = Some(console);
    let qemu_pid = domain.qemu_pid;
    let mut guest = QemuGuest::attach(builder.name(), Box::new(domain), Box::new(writer), reader)?;
    virsh(&["resume", &name])?;
    guest.wait_ready(boot)?;
    Ok(LibvirtGuest {
        guest,
        domain: name,
        qemu_pid,
        xml,
    })
}

/// The real user id of process `pid` (from `/proc/<pid>/status`).
pub fn process_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
}

/// The `<shmem>` elements of the fenced ```xml blocks of a Markdown text (a README's libvirt
/// section), in order.
pub fn shmem_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_start() == "```xml" => current = Some(String::new()),
            Some(text) if line.trim_start() == "```" => {
                if text.contains("<shmem") {
                    blocks.push(std::mem::take(text));
                }
                current = None;
            }
            Some(text) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_shmem_blocks_in_markdown() {
        let md = "text\n```xml\n<shmem name='a'>\n</shmem>\n```\n```xml\n<disk/>\n```\n```sh\n<shmem>\n```\n";
        assert_eq!(shmem_blocks(md), ["<shmem name='a'>\n</shmem>\n"]);
    }

    #[test]
    fn escapes_xml() {
        assert_eq!(xml_escape("a<b>&'\""), "a&lt;b&gt;&amp;&apos;&quot;");
    }

    #[test]
    fn passwd_lookup() {
        assert_eq!(user_ids("root"), Some((0, 0)));
        assert_eq!(user_ids("no-such-user-ivshm"), None);
    }
}
