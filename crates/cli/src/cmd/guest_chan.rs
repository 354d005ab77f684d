//! `ivshm guest chan ...`: message channels over a guest's ivshmem device (its BAR2, with the
//! device as the doorbell: MSI-X interrupts through VFIO, polling in sysfs mode), with the same
//! flags and output as the host's `ivshm chan ...` ([`super::chan`]).
//!
//! The device is chosen with `--dev DEV` here (the other `ivshm guest` commands take it as
//! their first argument; `send` takes its messages there).

use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use ivshm_channel::conformance::{self, Capabilities};
use ivshm_channel::Region;
use ivshm_guest::{DeviceDoorbell, DeviceMemory, MappedDevice, Wakeups};

use super::chan::{self, End, ExchangeArgs, InitArgs, ListArgs, RecvArgs, SendArgs};
use super::guest::DeviceOptions;
use super::host::line;

/// Channel commands inside a guest.
#[derive(Subcommand, Debug)]
pub enum GuestChanCommand {
    /// Format the device's shared memory for channels (destroys the channels of a formatted one with --force).
    Init(GuestInitArgs),
    /// List the region's channels and their sides.
    List(GuestListArgs),
    /// Send messages on a channel: the arguments, or the lines of stdin.
    Send(GuestSendArgs),
    /// Receive messages from a channel and print one line each.
    Recv(GuestRecvArgs),
    /// Checked traffic both ways on channels (numbered, checksummed messages; for tests).
    #[command(hide = true)]
    Exchange(GuestExchangeArgs),
    /// The doorbell conformance suite and channel round trips between two devices of this guest
    /// on one region (for tests).
    #[command(hide = true)]
    Selftest(SelftestArgs),
}

/// The device a channel command uses.
#[derive(Args, Debug)]
pub struct ChanDeviceArgs {
    /// Device: PCI address (0000:00:03.0 or 00:03.0) or index from `ivshm guest list`;
    /// default: the only one.
    #[arg(long = "dev", value_name = "DEV")]
    dev: Option<String>,
    #[command(flatten)]
    options: DeviceOptions,
}

/// `ivshm guest chan init`.
#[derive(Args, Debug)]
pub struct GuestInitArgs {
    #[command(flatten)]
    device: ChanDeviceArgs,
    #[command(flatten)]
    init: InitArgs,
}

/// `ivshm guest chan list`.
#[derive(Args, Debug)]
pub struct GuestListArgs {
    #[command(flatten)]
    device: ChanDeviceArgs,
    #[command(flatten)]
    list: ListArgs,
}

/// `ivshm guest chan send`.
#[derive(Args, Debug)]
pub struct GuestSendArgs {
    #[command(flatten)]
    device: ChanDeviceArgs,
    #[command(flatten)]
    send: SendArgs,
}

/// `ivshm guest chan recv`.
#[derive(Args, Debug)]
pub struct GuestRecvArgs {
    #[command(flatten)]
    device: ChanDeviceArgs,
    #[command(flatten)]
    recv: RecvArgs,
}

/// `ivshm guest chan exchange`.
#[derive(Args, Debug)]
pub struct GuestExchangeArgs {
    #[command(flatten)]
    device: ChanDeviceArgs,
    #[command(flatten)]
    exchange: ExchangeArgs,
}

/// `ivshm guest chan selftest`.
#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// The two devices (on one server region), e.g. `--dev 0 --dev 1`.
    #[arg(long = "dev", value_name = "DEV", num_args = 1, required = true)]
    devs: Vec<String>,
    #[command(flatten)]
    options: DeviceOptions,
}

/// Runs one `ivshm guest chan` command.
pub fn run(c: GuestChanCommand) -> anyhow::Result<()> {
    match c {
        GuestChanCommand::Init(a) => with_end(&a.device, |end| chan::init(end, &a.init)),
        GuestChanCommand::List(a) => with_end(&a.device, |end| chan::list(end, &a.list)),
        GuestChanCommand::Send(a) => with_end(&a.device, |end| {
            let region = end.open()?;
            chan::send(end, &region, &a.send)
        }),
        GuestChanCommand::Recv(a) => with_end(&a.device, |end| {
            let region = end.open()?;
            chan::recv(end, &region, &a.recv)
        }),
        GuestChanCommand::Exchange(a) => with_end(&a.device, |end| {
            let region = end.open()?;
            chan::run_exchange(end, &region, &a.exchange)
        }),
        GuestChanCommand::Selftest(a) => selftest(&a),
    }
}

/// Opens the device, runs `f` on it as a channel end, closes it (restoring the driver with
/// `--restore-driver`).
pub(crate) fn with_end(
    d: &ChanDeviceArgs,
    f: impl FnOnce(&End<DeviceMemory>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let device = Arc::new(d.options.open(d.dev.as_deref(), None)?);
    let result = end_of(&device).and_then(|end| f(&end));
    close(&d.options, device, result)
}

/// The device as a channel end.
fn end_of(device: &Arc<MappedDevice>) -> anyhow::Result<End<DeviceMemory>> {
    let doorbell = DeviceDoorbell::new(device.clone()).context("reading the device's id")?;
    if let Wakeups::Polling { interval } = doorbell.wakeups() {
        tracing::info!(
            "no interrupts in this access mode: waits poll every {} µs",
            interval.as_micros()
        );
    }
    Ok(End {
        memory: doorbell.memory(),
        doorbell: Arc::new(doorbell),
        size: device.shared_memory().len() as u64,
    })
}

/// Closes `device` once nothing else holds it, after `result`.
fn close(
    options: &DeviceOptions,
    device: Arc<MappedDevice>,
    result: anyhow::Result<()>,
) -> anyhow::Result<()> {
    match Arc::try_unwrap(device) {
        Ok(device) => options.close_after(device, result),
        Err(_) => result,
    }
}

/// Two devices of this guest on one region: the doorbell conformance suite between them (the
/// checks that apply: a guest's device cannot tell unknown peers, and polling wakes up
/// without a ring), then 200 blocking round trips on a channel between them.
fn selftest(a: &SelftestArgs) -> anyhow::Result<()> {
    let [first, second] = a.devs.as_slice() else {
        anyhow::bail!("selftest needs two devices: --dev A --dev B");
    };
    let da = Arc::new(a.options.open(Some(first), None)?);
    let db = Arc::new(a.options.open(Some(second), None)?);
    let result = (|| {
        let (ea, eb) = (end_of(&da)?, end_of(&db)?);
        let wakeups = DeviceDoorbell::new(da.clone())?.wakeups();
        let caps = Capabilities {
            exact_wakeups: wakeups == Wakeups::Interrupts,
            knows_peers: false,
        };
        for end in [&ea, &eb] {
            line(format_args!(
                "self id={} vectors={} size={}",
                end.doorbell.own_id(),
                end.doorbell.vectors(),
                end.size
            ))?;
        }
        let name = format!("selftest-{}-{}", ea.doorbell.own_id(), eb.doorbell.own_id());
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> anyhow::Result<()> {
            conformance::run_with(&*ea.doorbell, &*eb.doorbell, caps);
            let ra = ea.open()?;
            let rb = Region::open(eb.memory.clone(), eb.doorbell.clone())?;
            conformance::channel_round_trips(&ra, &rb, &name);
            Ok(())
        }))
        .map_err(|_| anyhow::anyhow!("the doorbell conformance suite failed (above)"))??;
        line(format_args!(
            "selftest passed doorbells={}",
            match wakeups {
                Wakeups::Interrupts => "interrupts",
                Wakeups::Polling { .. } => "polling",
            }
        ))
    })();
    let result = close(&a.options, db, result);
    close(&a.options, da, result)
}
