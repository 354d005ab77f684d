//! PCI addresses (`domain:bus:device.function`) as sysfs names them.

use std::fmt;
use std::str::FromStr;

/// A PCI function's address, e.g. `0000:00:03.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// PCI segment (domain); usually 0.
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, 0..=31.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

/// `{text}` is not a PCI address (expected DOMAIN:BUS:DEV.FN like 0000:00:03.0, or BUS:DEV.FN like
/// 00:03.0)
///
/// A string that is not a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub struct AddressParseError {
    /// The rejected text.
    pub text: String,
}

impl FromStr for PciAddress {
    type Err = AddressParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_address(s).ok_or_else(|| AddressParseError { text: s.to_owned() })
    }
}

fn parse_address(s: &str) -> Option<PciAddress> {
    let (rest, function) = s.rsplit_once('.')?;
    let mut parts: Vec<&str> = rest.split(':').collect();
    let device = parts.pop()?;
    let bus = parts.pop()?;
    let domain = match parts.as_slice() {
        [] => "0",
        [d] => d,
        _ => return None,
    };
    let hex = |t: &str, max_digits: usize| -> Option<u32> {
        if t.is_empty() || t.len() > max_digits || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(t, 16).ok()
    };
    let address = PciAddress {
        domain: hex(domain, 8)?,
        bus: u8::try_from(hex(bus, 2)?).ok()?,
        device: u8::try_from(hex(device, 2)?).ok().filter(|d| *d < 32)?,
        function: u8::try_from(hex(function, 1)?).ok().filter(|f| *f < 8)?,
    };
    Some(address)
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_short_forms() {
        let full: PciAddress = "0000:00:03.0".parse().unwrap();
        let short: PciAddress = "00:03.0".parse().unwrap();
        assert_eq!(full, short);
        assert_eq!(full.to_string(), "0000:00:03.0");
        let other: PciAddress = "0001:1f:1a.7".parse().unwrap();
        assert_eq!(
            other,
            PciAddress {
                domain: 1,
                bus: 0x1f,
                device: 0x1a,
                function: 7
            }
        );
        assert_eq!(other.to_string(), "0001:1f:1a.7");
    }

    #[test]
    fn rejects_malformed_addresses() {
        for bad in [
            "",
            "3",
            "00:03",
            "00:20.0",
            "00:03.8",
            "x0:03.0",
            "0:0:00:03.0",
            "000:100:03.0",
            "00:03.0.1",
        ] {
            assert!(
                bad.parse::<PciAddress>().is_err(),
                "{bad} should be rejected"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,40}") {
            let _ = text.parse::<PciAddress>();
        }

        #[test]
        fn display_round_trips(domain in 0u32..=0xffff, bus: u8, device in 0u8..32, function in 0u8..8) {
            let address = PciAddress { domain, bus, device, function };
            proptest::prop_assert_eq!(address.to_string().parse::<PciAddress>().unwrap(), address);
        }
    }
}
