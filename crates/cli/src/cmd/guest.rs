//! `ivshm guest` subcommands: inside a Linux guest, find ivshmem devices, map them, ring and
//! receive doorbells (see `ivshm-guest`).

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ivshm_guest::doorbell::deadline_after;
use ivshm_guest::{
    find_devices, AccessMode, DeviceSelector, DoorbellError, FoundDevice, MappedDevice,
    OpenOptions, PollDoorbells, SystemPaths,
};
use std::io::Write;

use super::bench::{self, PingPongArgs};
use super::host::{hex_decode, hex_encode};
use crate::args;
use std::time::{Duration, Instant};

/// Inside a Linux guest: list, inspect and use ivshmem devices.
#[derive(Subcommand, Debug)]
pub enum GuestCommand {
    /// List recognised shared-memory PCI devices, one line each.
    List(ListArgs),
    /// Show one device's PCI information and, when it can be mapped, its own peer ID.
    Info(InfoArgs),
    /// Ring vector V of peer N (one write to the Doorbell register).
    Notify(NotifyArgs),
    /// Wait for own doorbells; prints `self ...` once ready, then `doorbell vector=<V>` per doorbell.
    Wait(WaitArgs),
    /// Print shared-memory bytes as hex (or raw).
    Read(ReadArgs),
    /// Write hex bytes or a file's contents into shared memory.
    Write(WriteArgs),
    /// Doorbell round trips with a peer, next to shared-memory polling round trips in the same run.
    Bench(BenchArgs),
    /// Message channels over the device's shared memory (as `ivshm chan` on the host).
    #[command(subcommand)]
    Chan(super::guest_chan::GuestChanCommand),
    /// Carry the TCP or unix connections of an address over a channel of the device's region
    /// to a bridge on the other side (the host's `ivshm bridge`, or another VM's).
    Bridge(super::bridge::GuestBridgeArgs),
}

/// `list` arguments.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// sysfs root (for testing).
    #[arg(long, default_value = "/sys", hide = true)]
    sysfs: std::path::PathBuf,
}

/// Which device and how to open it.
#[derive(Args, Debug)]
pub struct DeviceArgs {
    /// Device: PCI address (0000:00:03.0 or 00:03.0) or index from `list`; default: the only one.
    #[arg(value_name = "DEV")]
    dev: Option<String>,
    #[command(flatten)]
    options: DeviceOptions,
}

/// How to open a device (every command that opens one takes these).
#[derive(Args, Debug)]
pub struct DeviceOptions {
    /// Access mode: vfio (interrupts) or sysfs (no interrupts); default: vfio for doorbell devices,
    /// sysfs for plain ones.
    #[arg(long, value_parser = parse_mode)]
    mode: Option<AccessMode>,
    /// VFIO: unbind another driver that owns the device (it is rebound with --restore-driver).
    #[arg(long)]
    take_over: bool,
    /// VFIO: on exit, unbind vfio-pci and rebind the driver the device had before ivshm bound
    /// it (recorded in /run/ivshm-guest by the process that bound it).
    #[arg(long)]
    restore_driver: bool,
    /// sysfs root (for testing).
    #[arg(long, default_value = "/sys", hide = true)]
    sysfs: std::path::PathBuf,
}

/// `info` arguments.
#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Only print what sysfs says; do not map the device to read its peer ID.
    #[arg(long)]
    no_open: bool,
}

/// `notify` arguments.
#[derive(Args, Debug)]
pub struct NotifyArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Target peer ID.
    #[arg(long, value_name = "ID")]
    peer: u16,
    /// Target vector.
    #[arg(long, value_name = "V")]
    vector: u16,
    /// Also increment the receiver's polling counter for this vector at this shared-memory
    /// offset (for a receiver in sysfs mode, see `wait --poll-offset`).
    #[arg(long, value_name = "OFFSET", value_parser = args::offset)]
    poll_offset: Option<usize>,
}

/// `wait` arguments.
#[derive(Args, Debug)]
pub struct WaitArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Own vector to wait on; default: all of them (VFIO mode).
    #[arg(long, value_name = "V")]
    vector: Option<u16>,
    /// Exit 0 after this many doorbell lines (without it: wait until interrupted, or until
    /// --timeout).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Exit 1 with an error if the count was not reached within this many seconds (without
    /// --count: wait this long, then exit 1; without it: no time limit).
    #[arg(long, value_name = "SECONDS", value_parser = args::seconds)]
    timeout: Option<Duration>,
    /// sysfs mode: poll 32-bit counters at this shared-memory offset (4 bytes per vector)
    /// instead of waiting for interrupts; senders use `notify --poll-offset`.
    #[arg(long, value_name = "OFFSET", value_parser = args::offset)]
    poll_offset: Option<usize>,
}

/// `read` arguments.
#[derive(Args, Debug)]
pub struct ReadArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Offset in shared memory.
    #[arg(long, value_name = "OFFSET", value_parser = args::offset)]
    offset: usize,
    /// Bytes to read.
    #[arg(long, value_name = "LEN", value_parser = args::offset)]
    len: usize,
    /// Write the raw bytes instead of hex.
    #[arg(long)]
    raw: bool,
}

/// `write` arguments.
#[derive(Args, Debug)]
pub struct WriteArgs {
    /// Hex bytes (`deadbeef`) or `@FILE` for a file's contents.
    #[arg(value_name = "HEX|@FILE")]
    data: String,
    #[command(flatten)]
    device: DeviceArgs,
    /// Offset in shared memory.
    #[arg(long, value_name = "OFFSET", value_parser = args::offset)]
    offset: usize,
}

/// `bench` arguments.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    pingpong: PingPongArgs,
    /// Run on the host instead, as a v0 peer of the server at this socket (the guest↔host
    /// bench: e.g. `--socket S --respond --peer GUEST` here, `bench --peer HOST` in the guest).
    #[arg(long, value_name = "PATH", value_parser = args::socket_path)]
    socket: Option<std::path::PathBuf>,
}

fn parse_mode(s: &str) -> Result<AccessMode, String> {
    s.parse()
}

impl DeviceOptions {
    fn paths(&self) -> SystemPaths {
        SystemPaths {
            sysfs: self.sysfs.clone(),
            ..SystemPaths::default()
        }
    }

    fn find(&self, dev: Option<&str>) -> anyhow::Result<FoundDevice> {
        let selector = match dev {
            None => DeviceSelector::Only,
            Some(text) => text.parse()?,
        };
        Ok(ivshm_guest::find_device(&self.paths(), selector)?)
    }

    /// Opens device `dev` (`None`: the only one) in `mode` (`None`: `--mode`, else the kind's).
    pub(crate) fn open(
        &self,
        dev: Option<&str>,
        mode: Option<AccessMode>,
    ) -> anyhow::Result<MappedDevice> {
        let options = OpenOptions {
            paths: self.paths(),
            mode: mode.or(self.mode),
            take_over_driver: self.take_over,
        };
        let device = MappedDevice::open_found(self.find(dev)?, &options)?;
        tracing::debug!(?device, "opened");
        Ok(device)
    }

    /// Closes the device after a command's `result`, restoring the original driver if
    /// `--restore-driver` was given — also when the command failed (a timed-out `wait`, say).
    /// Returns the command's error first.
    pub(crate) fn close_after(
        &self,
        device: MappedDevice,
        result: anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let closed = if self.restore_driver {
            device
                .close_and_restore_driver()
                .context("restoring the original driver")
        } else {
            Ok(())
        };
        match (result, closed) {
            (Err(error), Err(close_error)) => {
                tracing::error!("{}", crate::report::one_line(&close_error));
                Err(error)
            }
            (result, closed) => result.and(closed),
        }
    }
}

impl DeviceArgs {
    fn find(&self) -> anyhow::Result<FoundDevice> {
        self.options.find(self.dev.as_deref())
    }

    fn open_with(&self, mode: Option<AccessMode>) -> anyhow::Result<MappedDevice> {
        self.options.open(self.dev.as_deref(), mode)
    }

    fn open(&self) -> anyhow::Result<MappedDevice> {
        self.open_with(None)
    }

    fn close_after(&self, device: MappedDevice, result: anyhow::Result<()>) -> anyhow::Result<()> {
        self.options.close_after(device, result)
    }
}

/// Runs one `ivshm guest` subcommand.
pub fn run(c: GuestCommand) -> anyhow::Result<()> {
    match c {
        GuestCommand::List(a) => list(&a),
        GuestCommand::Info(a) => info(&a),
        GuestCommand::Notify(a) => notify(&a),
        GuestCommand::Wait(a) => wait(&a),
        GuestCommand::Read(a) => read(&a),
        GuestCommand::Write(a) => write(&a),
        GuestCommand::Bench(a) => bench(&a),
        GuestCommand::Chan(c) => super::guest_chan::run(c),
        GuestCommand::Bridge(a) => super::bridge::run_guest(&a),
    }
}

fn or_none<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "none".to_owned(), |v| v.to_string())
}

fn list(a: &ListArgs) -> anyhow::Result<()> {
    let devices = find_devices(&SystemPaths {
        sysfs: a.sysfs.clone(),
        ..SystemPaths::default()
    })?;
    let mut out = std::io::stdout().lock();
    for (index, d) in devices.iter().enumerate() {
        let f = &d.function;
        writeln!(
            out,
            "{index} {} {:04x}:{:04x} {}{} driver={} iommu_group={} vectors={} size={}",
            f.address,
            f.vendor,
            f.device,
            d.kind,
            if d.kind.is_supported() {
                ""
            } else {
                " (recognised, not supported)"
            },
            or_none(f.driver.as_deref()),
            or_none(f.iommu_group),
            d.msix_vectors(),
            f.bar(2).map_or(0, |r| r.size()),
        )?;
    }
    if devices.is_empty() {
        eprintln!("no ivshmem, QNX guest_shm or Jailhouse ivshmem-v2 device found");
    }
    Ok(())
}

fn info(a: &InfoArgs) -> anyhow::Result<()> {
    let found = a.device.find()?;
    let f = &found.function;
    let mut out = std::io::stdout().lock();
    writeln!(out, "address={}", f.address)?;
    writeln!(out, "kind={}", found.kind)?;
    writeln!(
        out,
        "vendor={:#06x} device={:#06x} revision={}",
        f.vendor, f.device, f.revision
    )?;
    writeln!(out, "class={:#08x}", f.class)?;
    writeln!(
        out,
        "subsystem_vendor={:#06x} subsystem_device={:#06x}",
        f.subsystem_vendor, f.subsystem_device
    )?;
    for (bar, r) in f
        .resources
        .iter()
        .enumerate()
        .take(6)
        .filter(|(_, r)| r.is_present())
    {
        writeln!(
            out,
            "bar{bar} start={:#x} size={} flags={:#x}",
            r.start,
            r.size(),
            r.flags
        )?;
    }
    match (&f.msix, &f.capability_error) {
        (Some(m), _) => writeln!(out, "msix vectors={} enabled={}", m.table_size, m.enabled)?,
        (None, Some(e)) => writeln!(out, "msix unknown ({e})")?,
        (None, None) => writeln!(out, "msix none")?,
    }
    writeln!(out, "driver={}", or_none(f.driver.as_deref()))?;
    writeln!(out, "iommu_group={}", or_none(f.iommu_group))?;
    out.flush()?;
    if a.no_open {
        return Ok(());
    }
    // Reading IVPosition needs no interrupts: sysfs unless a mode was asked for.
    let device = match a
        .device
        .open_with(Some(a.device.options.mode.unwrap_or(AccessMode::Sysfs)))
    {
        Ok(device) => device,
        Err(error) => {
            writeln!(out, "id=unknown")?;
            tracing::warn!(
                "cannot map the device to read its id: {}",
                crate::report::one_line(&error)
            );
            return Ok(());
        }
    };
    let result = (|| {
        writeln!(out, "id={}", device.id()?)?;
        writeln!(out, "size={}", device.shared_memory().len())?;
        writeln!(out, "mode={}", device.mode())?;
        Ok(())
    })();
    a.device.close_after(device, result)
}

fn notify(a: &NotifyArgs) -> anyhow::Result<()> {
    let device = a.device.open()?;
    let result = ring(a, &device);
    a.device.close_after(device, result)
}

fn ring(a: &NotifyArgs, device: &MappedDevice) -> anyhow::Result<()> {
    // The register write first: it validates the vector, so a refused one changes nothing.
    device.notify(a.peer, a.vector)?;
    if let Some(offset) = a.poll_offset {
        PollDoorbells::ring(device.shared_memory(), offset, a.vector)?;
    }
    Ok(())
}

fn wait(a: &WaitArgs) -> anyhow::Result<()> {
    let mut device = a.device.open()?;
    let result = wait_for_doorbells(a, &mut device);
    a.device.close_after(device, result)
}

fn wait_for_doorbells(a: &WaitArgs, device: &mut MappedDevice) -> anyhow::Result<()> {
    if let Some(offset) = a.poll_offset {
        device.set_poll_area(offset)?;
    }
    device.check_can_wait()?;
    if let Some(v) = a.vector {
        // With no vectors at all, `wait` itself explains why (no interrupts in this mode).
        if device.vectors() > 0 && v >= device.vectors() {
            return Err(DoorbellError::VectorOutOfRange {
                vector: v,
                vectors: device.vectors(),
            }
            .into());
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "self id={} vectors={} size={}",
        device.id()?,
        device.vectors(),
        device.shared_memory().len()
    )?;
    out.flush()?;
    let deadline = a.timeout.map(deadline_after);
    let mut lines = 0u64;
    while a.count.is_none_or(|k| lines < k) {
        // Without --timeout wait in long slices forever.
        let slice = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(3600),
        };
        let rung = match a.vector {
            Some(v) => device.wait(v, slice).map(|count| vec![(v, count)]),
            None => device.wait_any(slice),
        };
        let rung = match rung {
            Ok(r) => r,
            Err(DoorbellError::Timeout { .. }) if deadline.is_none() => continue,
            Err(DoorbellError::Timeout { .. }) => {
                bail!(
                    "timed out after {:?}: {lines} of {} doorbell(s) received",
                    a.timeout.unwrap_or_default(),
                    a.count
                        .map_or_else(|| "unlimited".to_owned(), |k| k.to_string())
                )
            }
            Err(e) => return Err(e.into()),
        };
        for (vector, count) in rung {
            tracing::debug!(vector, count, "doorbell");
            writeln!(out, "doorbell vector={vector}")?;
            out.flush()?;
            lines += 1;
            if a.count.is_some_and(|k| lines >= k) {
                break;
            }
        }
    }
    Ok(())
}

/// Checks that `len` bytes at `offset` lie inside `size` bytes of shared memory.
fn check_range(offset: usize, len: usize, size: usize) -> anyhow::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => bail!("offset {offset} + length {len} is beyond the {size}-byte shared memory"),
    }
}

fn read(a: &ReadArgs) -> anyhow::Result<()> {
    let device = a.device.open()?;
    let result = print_memory(a, device.shared_memory());
    a.device.close_after(device, result)
}

fn print_memory(a: &ReadArgs, memory: ivshm_guest::SharedView<'_>) -> anyhow::Result<()> {
    check_range(a.offset, a.len, memory.len())?;
    let mut out = std::io::stdout().lock();
    // Bounded chunks: `--len` may be as large as the whole BAR.
    let mut buf = vec![0u8; a.len.min(1 << 16)];
    let mut done = 0;
    while done < a.len {
        let chunk_len = buf.len().min(a.len - done);
        let chunk = &mut buf[..chunk_len];
        memory.read(a.offset + done, chunk)?;
        if a.raw {
            out.write_all(chunk)?;
        } else {
            out.write_all(hex_encode(chunk).as_bytes())?;
        }
        done += chunk_len;
    }
    if !a.raw {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn write(a: &WriteArgs) -> anyhow::Result<()> {
    let data = match a.data.strip_prefix('@') {
        Some(file) => std::fs::read(file).with_context(|| format!("reading {file}"))?,
        None => hex_decode(&a.data)?,
    };
    let device = a.device.open()?;
    let memory = device.shared_memory();
    let result = check_range(a.offset, data.len(), memory.len())
        .and_then(|()| Ok(memory.write(a.offset, &data)?));
    a.device.close_after(device, result)
}

fn bench(a: &BenchArgs) -> anyhow::Result<()> {
    if let Some(socket) = &a.socket {
        return bench::pingpong_as_host_peer(&a.pingpong, socket);
    }
    let device = a.device.open()?;
    let result = (|| {
        device.check_can_wait()?;
        bench::run_pingpong(
            &a.pingpong,
            device.id()?,
            device.vectors(),
            device.shared_memory(),
            &device,
        )
    })();
    a.device.close_after(device, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_against_the_shared_memory() {
        check_range(0, 16, 16).unwrap();
        check_range(16, 0, 16).unwrap();
        let err = check_range(8, 9, 16).unwrap_err().to_string();
        assert!(err.contains("beyond the 16-byte shared memory"), "{err}");
        assert!(check_range(usize::MAX, 2, 16).is_err());
    }
}
