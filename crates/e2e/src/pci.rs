//! Guest-side PCI helpers run through the guest shell: finding `ivshmem` devices in sysfs,
//! reading their BAR addresses, and accessing registers and shared memory with busybox
//! `devmem`.

use std::time::Duration;

use crate::qemu::{QemuError, QemuGuest};

use ivshm_proto::ivshmem::{self as abi, doorbell_value, REG_DOORBELL, REG_IV_POSITION};
use ivshm_proto::pci_resource::parse_resource_file;
/// One line of a sysfs `resource` file (a BAR's range and flags), as [`ShellDevice::bars`] returns.
pub use ivshm_proto::pci_resource::Resource;

fn parse_hex(text: &str) -> Option<u64> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))?;
    u64::from_str_radix(digits, 16).ok()
}

/// Reads `width` bits (8, 16, 32 or 64) at physical address `address` with `devmem`.
pub fn devmem_read(
    guest: &mut QemuGuest,
    address: u64,
    width: u32,
    timeout: Duration,
) -> Result<u64, QemuError> {
    let command = format!("devmem {address:#x} {width}");
    let output = guest.run_ok(&command, timeout)?;
    parse_hex(output.trim()).ok_or_else(|| guest.unexpected_output(&command, &output))
}

/// Writes `value` as `width` bits (8, 16, 32 or 64) at physical address `address` with `devmem`.
pub fn devmem_write(
    guest: &mut QemuGuest,
    address: u64,
    width: u32,
    value: u64,
    timeout: Duration,
) -> Result<(), QemuError> {
    guest.run_ok(&format!("devmem {address:#x} {width} {value:#x}"), timeout)?;
    Ok(())
}

/// An `ivshmem` PCI device inside a QEMU guest, reached through the guest's shell: found in
/// its sysfs, registers and memory accessed with busybox `devmem` (for a guest program's view,
/// run `ivshm guest` there, which uses `ivshm_guest::MappedDevice`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellDevice {
    /// The PCI address, e.g. `0000:00:04.0`.
    pub bdf: String,
    /// The resources from sysfs (at least three: BAR0 registers, BAR1 MSI-X for the doorbell
    /// variant, BAR2 memory); private so the length is always checked.
    bars: Vec<Resource>,
}

impl ShellDevice {
    /// Lists every `ivshmem` device (vendor `0x1af4`, device `0x1110`) in the guest's sysfs,
    /// sorted by address, without enabling them (e.g. before binding to `vfio-pci`).
    pub fn discover(guest: &mut QemuGuest, timeout: Duration) -> Result<Vec<Self>, QemuError> {
        let list = format!(
            "for d in /sys/bus/pci/devices/*; do \
             if [ \"$(cat $d/vendor)\" = {vendor:#06x} ] && [ \"$(cat $d/device)\" = {device:#06x} ]; \
             then echo ${{d##*/}}; fi; done",
            vendor = abi::VENDOR_ID,
            device = abi::DEVICE_ID,
        );
        let output = guest.run_ok(&list, timeout)?;
        let mut bdfs: Vec<String> = output
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        bdfs.sort();
        let mut devices = Vec::new();
        for bdf in bdfs {
            let command = format!("cat /sys/bus/pci/devices/{bdf}/resource");
            let text = guest.run_ok(&command, timeout)?;
            let bars =
                parse_resource_file(&text).map_err(|_| guest.unexpected_output(&command, &text))?;
            if bars.len() < 3 {
                return Err(guest.unexpected_output(&command, &text));
            }
            devices.push(Self { bdf, bars });
        }
        Ok(devices)
    }

    /// [`discover`](Self::discover), then enables each device (`echo 1 > .../enable`) so its
    /// BARs decode and `devmem` reaches them.
    pub fn find_all(guest: &mut QemuGuest, timeout: Duration) -> Result<Vec<Self>, QemuError> {
        let devices = Self::discover(guest, timeout)?;
        for device in &devices {
            device.enable(guest, timeout)?;
        }
        Ok(devices)
    }

    /// Enables the device's memory decoding through sysfs.
    pub fn enable(&self, guest: &mut QemuGuest, timeout: Duration) -> Result<(), QemuError> {
        guest.run_ok(
            &format!("echo 1 > /sys/bus/pci/devices/{}/enable", self.bdf),
            timeout,
        )?;
        Ok(())
    }

    /// Binds the device to `vfio-pci` (the guest must have been built
    /// [`with_vfio`](crate::GuestBuilder::with_vfio)) and returns its VFIO group device,
    /// e.g. `/dev/vfio/3`.
    pub fn bind_vfio(&self, guest: &mut QemuGuest, timeout: Duration) -> Result<String, QemuError> {
        let bdf = &self.bdf;
        let command = format!(
            "echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override && \
             echo {bdf} > /sys/bus/pci/drivers_probe && \
             group=$(basename $(readlink /sys/bus/pci/devices/{bdf}/iommu_group)) && \
             [ -c /dev/vfio/$group ] && echo /dev/vfio/$group"
        );
        let output = guest.run_ok(&command, timeout)?;
        let group = output.trim();
        if group.starts_with("/dev/vfio/") {
            Ok(group.to_string())
        } else {
            Err(guest.unexpected_output(&command, &output))
        }
    }

    /// Like [`find_all`](Self::find_all) but expects exactly one device.
    pub fn find_one(guest: &mut QemuGuest, timeout: Duration) -> Result<Self, QemuError> {
        let mut devices = Self::find_all(guest, timeout)?;
        if devices.len() == 1 {
            Ok(devices.remove(0))
        } else {
            let found = devices
                .iter()
                .map(|d| d.bdf.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            Err(guest.unexpected_output(
                "find ivshmem devices",
                &format!("expected one, found [{found}]"),
            ))
        }
    }

    /// The resources from sysfs `resource`, BAR0 first.
    pub fn bars(&self) -> &[Resource] {
        &self.bars
    }

    /// Physical address of BAR0 (the registers).
    pub fn registers(&self) -> u64 {
        self.bars[usize::from(abi::REGISTERS_BAR)].start
    }

    /// Physical address of BAR2 (the shared memory).
    pub fn shared_memory(&self) -> u64 {
        self.bars[usize::from(abi::SHARED_MEMORY_BAR)].start
    }

    /// Size of BAR2 in bytes.
    pub fn shared_memory_size(&self) -> u64 {
        self.bars[usize::from(abi::SHARED_MEMORY_BAR)].size()
    }

    /// Reads the IVPosition register: the device's own peer id.
    pub fn read_ivposition(
        &self,
        guest: &mut QemuGuest,
        timeout: Duration,
    ) -> Result<u32, QemuError> {
        let value = devmem_read(guest, self.registers() + REG_IV_POSITION, 32, timeout)?;
        u32::try_from(value)
            .map_err(|_| guest.unexpected_output("devmem IVPosition", &format!("{value:#x}")))
    }

    /// Rings `vector` of `peer` through the Doorbell register.
    pub fn ring_doorbell(
        &self,
        guest: &mut QemuGuest,
        peer: u16,
        vector: u16,
        timeout: Duration,
    ) -> Result<(), QemuError> {
        let value = u64::from(doorbell_value(peer, vector));
        devmem_write(guest, self.registers() + REG_DOORBELL, 32, value, timeout)
    }

    /// Reads a 32-bit word of shared memory at byte `offset`.
    pub fn read_shared_u32(
        &self,
        guest: &mut QemuGuest,
        offset: u64,
        timeout: Duration,
    ) -> Result<u32, QemuError> {
        let value = devmem_read(guest, self.shared_memory() + offset, 32, timeout)?;
        u32::try_from(value)
            .map_err(|_| guest.unexpected_output("devmem shared memory", &format!("{value:#x}")))
    }

    /// Writes a 32-bit word of shared memory at byte `offset` (little-endian in memory).
    pub fn write_shared_u32(
        &self,
        guest: &mut QemuGuest,
        offset: u64,
        value: u32,
        timeout: Duration,
    ) -> Result<(), QemuError> {
        devmem_write(
            guest,
            self.shared_memory() + offset,
            32,
            u64::from(value),
            timeout,
        )
    }

    /// Writes `bytes` (a multiple of 4 long) to shared memory at `offset`, one `devmem` per
    /// 32-bit little-endian word, all in one shell command.
    pub fn write_shared(
        &self,
        guest: &mut QemuGuest,
        offset: u64,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<(), QemuError> {
        if bytes.len() % 4 != 0 {
            return Err(guest.unexpected_output("write_shared", "length must be a multiple of 4"));
        }
        let base = self.shared_memory() + offset;
        let command = bytes
            .chunks_exact(4)
            .enumerate()
            .map(|(i, word)| {
                let value = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                format!("devmem {:#x} 32 {value:#x}", base + 4 * i as u64)
            })
            .collect::<Vec<_>>()
            .join(" && ");
        guest.run_ok(&command, timeout)?;
        Ok(())
    }

    /// Reads `len` bytes (a multiple of 4) of shared memory at `offset` with `devmem`.
    pub fn read_shared(
        &self,
        guest: &mut QemuGuest,
        offset: u64,
        len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, QemuError> {
        if len % 4 != 0 {
            return Err(guest.unexpected_output("read_shared", "length must be a multiple of 4"));
        }
        let base = self.shared_memory() + offset;
        let command = (0..len / 4)
            .map(|i| format!("devmem {:#x} 32", base + 4 * i as u64))
            .collect::<Vec<_>>()
            .join(" && ");
        let output = guest.run_ok(&command, timeout)?;
        let mut bytes = Vec::with_capacity(len);
        for line in output.lines().filter(|l| !l.trim().is_empty()) {
            let word = parse_hex(line.trim())
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| guest.unexpected_output(&command, &output))?;
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        if bytes.len() != len {
            return Err(guest.unexpected_output(&command, &output));
        }
        Ok(bytes)
    }
}
