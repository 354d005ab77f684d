//! Driving the static `ivshm guest` tool inside a guest: a VFIO guest on an
//! `ivshmem-doorbell` device, ringing peers, waiting for doorbells in the background, and
//! hex reads and writes of the shared memory. Shared by the tests that run guests against a
//! server (`guest_vfio`, `named_regions`, and `ivshm-vmm`'s `qemu_cross`).

use std::path::PathBuf;
use std::time::Duration;

use crate::assets::GuestAssets;
use crate::background::BackgroundCommand;
use crate::qemu::{GuestBuilder, QemuError, QemuGuest};

/// A guest with `ivshmem-doorbell` on `socket` with `vectors` vectors, VFIO (q35 +
/// intel-iommu, modules loaded) for MSI-X in guest user space, and `/bin/ivshm`.
pub fn vfio_doorbell_guest(
    assets: &GuestAssets,
    name: &str,
    socket: impl Into<PathBuf>,
    vectors: u32,
) -> GuestBuilder {
    QemuGuest::builder(assets, name)
        .with_vfio()
        .with_ivshm_binary()
        .ivshmem_doorbell(socket, vectors)
}

/// Starts `ivshm guest wait {args} --timeout <limit in seconds>` in the background and
/// returns once it printed its `self id=<self_id> vectors=` line (its vectors are
/// connected), so that doorbells sent from now on reach it. Collect it with
/// [`finish_wait`].
pub fn start_wait(
    guest: &mut QemuGuest,
    name: &str,
    self_id: u16,
    args: &str,
    limit: Duration,
) -> Result<BackgroundCommand, QemuError> {
    let wait = guest.spawn_background(
        name,
        &format!(
            "ivshm guest wait {args} --timeout {}",
            limit.as_secs().max(1)
        ),
    )?;
    wait.wait_output(guest, &format!("self id={self_id} vectors="), limit)?;
    Ok(wait)
}

/// Waits (up to `limit`) for a [`start_wait`] command to end; fails unless it exited with
/// status 0, and returns its `doorbell ...` lines.
pub fn finish_wait(
    guest: &mut QemuGuest,
    wait: BackgroundCommand,
    limit: Duration,
) -> Result<Vec<String>, QemuError> {
    let command = wait.command().to_string();
    let done = wait.finish(guest, limit)?;
    if !done.success() {
        return Err(QemuError::CommandFailed {
            guest: guest.name().to_string(),
            command,
            status: done.status,
            output: done.output,
        });
    }
    Ok(doorbell_lines(&done.output)
        .into_iter()
        .map(String::from)
        .collect())
}

/// The `doorbell ...` lines of `ivshm guest wait` output.
pub fn doorbell_lines(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|line| line.starts_with("doorbell "))
        .collect()
}

/// Rings `peer`'s `vector` from the guest (`ivshm guest notify`, VFIO mode).
pub fn notify(
    guest: &mut QemuGuest,
    peer: u16,
    vector: u32,
    timeout: Duration,
) -> Result<(), QemuError> {
    guest.run_ok(
        &format!("ivshm guest notify --peer {peer} --vector {vector}"),
        timeout,
    )?;
    Ok(())
}

/// Writes `hex` (bytes as hex digits) to the shared memory at `offset` (`ivshm guest write`).
pub fn write_hex(
    guest: &mut QemuGuest,
    offset: u64,
    hex: &str,
    timeout: Duration,
) -> Result<(), QemuError> {
    guest.run_ok(
        &format!("ivshm guest write --offset {offset:#x} {hex}"),
        timeout,
    )?;
    Ok(())
}

/// Reads `len` bytes of shared memory at `offset` as hex digits (`ivshm guest read`). The
/// first `ivshm guest` command in a guest logs its VFIO binding first; the hex is the last
/// line.
pub fn read_hex(
    guest: &mut QemuGuest,
    offset: u64,
    len: usize,
    timeout: Duration,
) -> Result<String, QemuError> {
    let command = format!("ivshm guest read --offset {offset:#x} --len {len}");
    let output = guest.run_ok(&command, timeout)?;
    match output.trim().lines().last() {
        Some(hex) if hex.len() == 2 * len && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(hex.to_string())
        }
        _ => Err(guest.unexpected_output(&command, &output)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbell_lines_are_picked_out() {
        let output = "vfio: bound 0000:00:03.0\nself id=2 vectors=4\ndoorbell vector=2\n\
                      doorbell vector=0\nreceived 2\n";
        assert_eq!(
            doorbell_lines(output),
            ["doorbell vector=2", "doorbell vector=0"]
        );
        assert!(doorbell_lines("").is_empty());
    }
}
