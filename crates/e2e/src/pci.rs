//! Guest-side PCI helpers run through the guest shell: finding `ivshmem` devices in sysfs,
//! reading their BAR addresses, and accessing registers and shared memory with busybox
//! `devmem`.

use std::time::Duration;

use crate::qemu::{QemuError, QemuGuest};

/// PCI vendor id of `ivshmem` devices (Red Hat / Qumranet).
pub const IVSHMEM_VENDOR: u16 = 0x1af4;
/// PCI device id of `ivshmem-plain` and `ivshmem-doorbell`.
pub const IVSHMEM_DEVICE: u16 = 0x1110;

/// Offsets of the `ivshmem` registers in BAR0.
pub mod regs {
    /// Interrupt mask (unused by MSI-X devices).
    pub const INTR_MASK: u64 = 0;
    /// Interrupt status.
    pub const INTR_STATUS: u64 = 4;
    /// The device's own peer id (read-only).
    pub const IV_POSITION: u64 = 8;
    /// Write `(peer << 16) | vector` to ring a peer.
    pub const DOORBELL: u64 = 12;
}

/// One line of a sysfs `resource` file: a BAR's physical range and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// First physical address (0 when the BAR is unused).
    pub start: u64,
    /// Last physical address.
    pub end: u64,
    /// The kernel's resource flags.
    pub flags: u64,
}

impl Bar {
    /// The size in bytes (0 when the BAR is unused).
    pub fn size(&self) -> u64 {
        if self.start == 0 && self.end == 0 {
            0
        } else {
            self.end.wrapping_sub(self.start).wrapping_add(1)
        }
    }
}

/// A sysfs `resource` file could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad sysfs resource line {line:?}")]
pub struct ResourceParseError {
    /// The offending line.
    pub line: String,
}

fn parse_hex(text: &str) -> Option<u64> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))?;
    u64::from_str_radix(digits, 16).ok()
}

/// Parses a sysfs `resource` file: one `0x<start> 0x<end> 0x<flags>` line per resource,
/// BAR0 first.
pub fn parse_resource(text: &str) -> Result<Vec<Bar>, ResourceParseError> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let bad = || ResourceParseError {
                line: line.to_string(),
            };
            let [start, end, flags] = fields.as_slice() else {
                return Err(bad());
            };
            Ok(Bar {
                start: parse_hex(start).ok_or_else(bad)?,
                end: parse_hex(end).ok_or_else(bad)?,
                flags: parse_hex(flags).ok_or_else(bad)?,
            })
        })
        .collect()
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

/// An `ivshmem` PCI device as seen from inside a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IvshmemDevice {
    /// The PCI address, e.g. `0000:00:04.0`.
    pub bdf: String,
    /// The resources from sysfs (at least three: BAR0 registers, BAR1 MSI-X for the doorbell
    /// variant, BAR2 memory); private so the length is always checked.
    bars: Vec<Bar>,
}

impl IvshmemDevice {
    /// Lists every `ivshmem` device (vendor `0x1af4`, device `0x1110`) in the guest's sysfs,
    /// sorted by address, without enabling them (e.g. before binding to `vfio-pci`).
    pub fn discover(guest: &mut QemuGuest, timeout: Duration) -> Result<Vec<Self>, QemuError> {
        let list = format!(
            "for d in /sys/bus/pci/devices/*; do \
             if [ \"$(cat $d/vendor)\" = {IVSHMEM_VENDOR:#06x} ] && [ \"$(cat $d/device)\" = {IVSHMEM_DEVICE:#06x} ]; \
             then echo ${{d##*/}}; fi; done"
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
                parse_resource(&text).map_err(|_| guest.unexpected_output(&command, &text))?;
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
    pub fn bars(&self) -> &[Bar] {
        &self.bars
    }

    /// Physical address of BAR0 (the registers).
    pub fn registers(&self) -> u64 {
        self.bars[0].start
    }

    /// Physical address of BAR2 (the shared memory).
    pub fn shared_memory(&self) -> u64 {
        self.bars[2].start
    }

    /// Size of BAR2 in bytes.
    pub fn shared_memory_size(&self) -> u64 {
        self.bars[2].size()
    }

    /// Reads the IVPosition register: the device's own peer id.
    pub fn read_ivposition(
        &self,
        guest: &mut QemuGuest,
        timeout: Duration,
    ) -> Result<u32, QemuError> {
        let value = devmem_read(guest, self.registers() + regs::IV_POSITION, 32, timeout)?;
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
        let value = (u64::from(peer) << 16) | u64::from(vector);
        devmem_write(guest, self.registers() + regs::DOORBELL, 32, value, timeout)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_a_doorbell_device_resource_file() {
        let text = "0x00000000febf1000 0x00000000febf10ff 0x0000000000040200\n\
                    0x00000000febf2000 0x00000000febf2fff 0x0000000000040200\n\
                    0x00000000fe000000 0x00000000fe0fffff 0x000000000014220c\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
        let bars = parse_resource(text).unwrap();
        assert_eq!(bars.len(), 4);
        assert_eq!(bars[0].start, 0xfebf_1000);
        assert_eq!(bars[0].size(), 256);
        assert_eq!(bars[2].size(), 1 << 20);
        assert_eq!(bars[3].size(), 0);
    }

    #[test]
    fn rejects_malformed_lines() {
        assert!(parse_resource("0x1 0x2\n").is_err());
        assert!(parse_resource("1 2 3\n").is_err());
        assert!(parse_resource("0x1 0x2 0xzz\n").is_err());
    }

    proptest! {
        #[test]
        fn round_trips_formatted_lines(bars in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 0..14)) {
            let text: String = bars.iter().map(|(s, e, f)| format!("{s:#018x} {e:#018x} {f:#018x}\n")).collect();
            let parsed = parse_resource(&text).unwrap();
            let expected: Vec<Bar> = bars.iter().map(|&(start, end, flags)| Bar { start, end, flags }).collect();
            prop_assert_eq!(parsed, expected);
        }

        #[test]
        fn never_panics_on_arbitrary_text(text in "\\PC*") {
            let _ = parse_resource(&text);
        }
    }
}
