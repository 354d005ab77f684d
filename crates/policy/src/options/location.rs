//! The `loc` option's argument, [`Location`].

use std::fmt;

use thiserror::Error;

use crate::guest_shm::PAGE_SIZE;
use crate::number::{parse_number, parse_size, NumberError};

/// Why a `loc` argument is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum LocationError {
    /// address: {0}
    ///
    /// The address is not a number.
    Address(NumberError),
    /// {0:#x} is not aligned to the {PAGE_SIZE:}-byte factory page
    ///
    /// The address is not aligned to the factory page.
    Unaligned(u64),
    /// {0:?}: the factory page is one {PAGE_SIZE:}-byte page; give only its address (mem:ADDRESS)
    ///
    /// `mem:ADDRESS,...`: a length or flags.
    Extra(String),
    /// io: locations are x86 I/O ports; the shmem factory page is memory (use mem:ADDRESS or
    /// pci:BUS:DEV)
    ///
    /// `io:PORT`.
    Io,
    /// pci:VID/DID names a host device to pass through; place the shmem vdev with
    /// pci:BUS:DEV[.FUNC]
    ///
    /// `pci:VID/DID`.
    PciIds,
    /// {text:?} is not pci:BUS:DEV[.FUNC] with bus 0..=255, device 0..=31, function 0..=7
    ///
    /// A malformed `pci:BUS:DEV[.FUNC]`.
    PciAddress {
        /// The text after `pci:`.
        text: String,
    },
    /// unknown location type {0:?}: use mem:ADDRESS, an address, or pci:BUS:DEV[.FUNC]
    ///
    /// Another resource type.
    UnknownType(String),
}

/// A PCI function address (bus, device, function).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PciAddress {
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..=31.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

impl PciAddress {
    /// Parses `BUS:DEV[.FUNC]` (numbers in decimal or `0x` hex).
    pub fn parse(text: &str) -> Result<Self, LocationError> {
        let bad = || LocationError::PciAddress {
            text: text.to_owned(),
        };
        let (bus, rest) = text.split_once(':').ok_or_else(bad)?;
        let (device, function) = match rest.split_once('.') {
            Some((device, function)) => (device, Some(function)),
            None => (rest, None),
        };
        let number =
            |t: &str, max: u64| parse_number(t, max).ok().and_then(|n| u8::try_from(n).ok());
        Ok(Self {
            bus: number(bus, 255).ok_or_else(bad)?,
            device: number(device, 31).ok_or_else(bad)?,
            function: match function {
                Some(f) => number(f, 7).ok_or_else(bad)?,
                None => 0,
            },
        })
    }
}

/// Prints `BUS:DEV.FUNC`.
impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}.{}", self.bus, self.device, self.function)
    }
}

/// The `loc` option's argument: where the guest finds the vdev (QNX's "guest resource types").
///
/// QNX's common `loc` option takes a location with a resource type: `mem:ADDRESS` (a
/// guest-physical address, the default type, so a bare number means the same), `io:PORT` (x86
/// I/O space) or `pci:...` (a PCI function). For the shmem vdev:
///
/// | written | meaning |
/// |---|---|
/// | `loc 0x1b000000`, `loc mem:0x1b000000` | MMIO mode: the factory page at that guest-physical address (needs `intr`) |
/// | `loc pci:BUS:DEV[.FUNC]` | PCI mode, the function at that bus/device/function |
/// | `loc` (no argument) | PCI mode, placed by the VMM ("if addr isn't specified, the vdev appears as a PCI device") |
///
/// Refused with a reason: `io:` (the factory page is memory), `pci:VID/DID` (that names a host
/// device to pass through; the shmem vdev has its own ids), a length or access flags after the
/// address (the factory page is one 4 KiB page), an address that is not page aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    /// MMIO mode: the factory page at this guest-physical address (page aligned).
    Mem(u64),
    /// PCI mode: at this function, or wherever the VMM puts it (`None`, a bare `loc`).
    Pci(Option<PciAddress>),
}

impl Location {
    /// Parses a `loc` argument (QNX number notation: decimal, `0x` hex, `0d` decimal, an optional
    /// `K`/`M`/`G`).
    pub fn parse(text: &str) -> Result<Self, LocationError> {
        let (kind, rest) = match text.split_once(':') {
            Some((kind, rest)) if kind.bytes().all(|b| b.is_ascii_alphabetic()) => {
                (Some(kind), rest)
            }
            _ => (None, text),
        };
        match kind {
            None | Some("mem") => {
                if rest.contains(',') || rest.contains('=') {
                    return Err(LocationError::Extra(rest.to_owned()));
                }
                let address = parse_size(rest, u64::MAX).map_err(LocationError::Address)?;
                Self::mem(address)
            }
            Some("pci") if rest.contains('/') => Err(LocationError::PciIds),
            Some("pci") => Ok(Location::Pci(Some(PciAddress::parse(rest)?))),
            Some("io") => Err(LocationError::Io),
            Some(other) => Err(LocationError::UnknownType(other.to_owned())),
        }
    }

    /// An MMIO location, checked to be page aligned.
    pub fn mem(address: u64) -> Result<Self, LocationError> {
        if address % PAGE_SIZE as u64 != 0 {
            return Err(LocationError::Unaligned(address));
        }
        Ok(Location::Mem(address))
    }

    /// The factory page's address in MMIO mode.
    pub fn mmio_address(&self) -> Option<u64> {
        match self {
            Location::Mem(address) => Some(*address),
            Location::Pci(_) => None,
        }
    }

    /// The requested PCI function in PCI mode, if one was given.
    pub fn pci_address(&self) -> Option<PciAddress> {
        match self {
            Location::Mem(_) => None,
            Location::Pci(address) => *address,
        }
    }
}

/// Prints the option's argument (`mem:0x1b000000`, `pci:0:5.0`), or nothing for a bare `loc`.
impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Mem(address) => write!(f, "mem:{address:#x}"),
            Location::Pci(Some(address)) => write!(f, "pci:{address}"),
            Location::Pci(None) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_forms() {
        assert_eq!(
            Location::parse("0x1b000000"),
            Ok(Location::Mem(0x1b00_0000))
        );
        assert_eq!(
            Location::parse("mem:0x1b000000"),
            Ok(Location::Mem(0x1b00_0000))
        );
        assert_eq!(Location::parse("mem:256M"), Ok(Location::Mem(256 << 20)));
        assert_eq!(
            Location::parse("mem:0x1001"),
            Err(LocationError::Unaligned(0x1001))
        );
        assert_eq!(
            Location::parse("mem:0x1000,0x1000"),
            Err(LocationError::Extra("0x1000,0x1000".into()))
        );
        assert!(matches!(
            Location::parse("mem:"),
            Err(LocationError::Address(_))
        ));
    }

    #[test]
    fn pci_forms() {
        let at = |bus, device, function| {
            Ok(Location::Pci(Some(PciAddress {
                bus,
                device,
                function,
            })))
        };
        assert_eq!(Location::parse("pci:0:5"), at(0, 5, 0));
        assert_eq!(Location::parse("pci:0:12.3"), at(0, 12, 3));
        assert_eq!(Location::parse("pci:0x1:0x1f.7"), at(1, 31, 7));
        for bad in [
            "pci:0:32",
            "pci:0:1.8",
            "pci:256:0",
            "pci:0",
            "pci:",
            "pci:a:b",
        ] {
            assert!(
                matches!(Location::parse(bad), Err(LocationError::PciAddress { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            Location::parse("pci:0x1c05/0x0001"),
            Err(LocationError::PciIds)
        );
    }

    #[test]
    fn other_types_are_refused() {
        assert_eq!(Location::parse("io:0x2f8"), Err(LocationError::Io));
        assert_eq!(
            Location::parse("isa:4"),
            Err(LocationError::UnknownType("isa".into()))
        );
    }

    #[test]
    fn display_round_trips() {
        for text in ["mem:0x1b000000", "pci:0:5.0", "pci:2:31.7"] {
            let location = Location::parse(text).unwrap();
            assert_eq!(location.to_string(), text);
            assert_eq!(Location::parse(&location.to_string()), Ok(location));
        }
        assert_eq!(Location::Pci(None).to_string(), "");
    }
}
