//! Region names: which strings may name a shared memory region, on the guest side and the host
//! side.
//!
//! A guest writes the name into the factory page's `char name[GUEST_SHM_MAX_NAME]` field, NUL
//! terminated, so a name has at most [`MAX_NAME_LEN`] = 31 bytes. On the host the server uses a
//! region's (substituted) name as a file or socket name inside a per-VM directory, so a legal
//! name must never be able to leave that directory or be mistaken for something else. The rule,
//! checked for guest names, for names after `subst` and for `create` names:
//!
//! * 1 to 31 bytes;
//! * only ASCII letters, digits and `_` `.` `+` `-` (`[A-Za-z0-9_.+-]`): no `/`, no NUL, no
//!   whitespace or control characters, nothing outside ASCII;
//! * the first byte is not `.` (no hidden files, no `.` or `..`);
//! * no `..` anywhere.
//!
//! Everything else is [`GuestShmStatus::IllegalName`](crate::GuestShmStatus::IllegalName) for a
//! guest request, and a configuration error for a `create` line.
//!
//! One legal name is refused to guests too: [`RESERVED_GUEST_NAME`] (`factory`), whose region
//! socket would be the VM's factory socket. It stays legal as a host name and in `create`
//! lines.

use std::fmt;

use thiserror::Error;

use crate::guest_shm::{self, MAX_NAME};

/// Longest legal name in bytes: the factory `name` field minus its terminating NUL.
pub const MAX_NAME_LEN: usize = guest_shm::MAX_NAME - 1;

/// The one legal region name a guest cannot ask for: a VM's directory holds one socket per
/// region named `<guest name>.sock` next to its factory socket `factory.sock`, so a region the
/// guest called `factory` would have the factory's socket name. Guests get
/// [`GuestShmStatus::IllegalName`](crate::GuestShmStatus::IllegalName) for it whatever the rules
/// say (a name check, made before the rules).
pub const RESERVED_GUEST_NAME: &str = "factory";

/// Whether a guest cannot use `guest_name` (see [`RESERVED_GUEST_NAME`]).
pub fn is_reserved_guest_name(guest_name: &str) -> bool {
    guest_name == RESERVED_GUEST_NAME
}

/// Why a string is not a legal region name.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum NameError {
    /// region name is empty
    ///
    /// The name is empty.
    Empty,
    /// region name is {len} bytes long, the limit is {MAX_NAME_LEN:}
    ///
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// region name contains {byte} at byte {index}; allowed are A-Z a-z 0-9 _ . + -
    ///
    /// The name contains a byte outside `[A-Za-z0-9_.+-]`.
    ForbiddenByte {
        /// The offending byte.
        byte: NameByte,
        /// Its position in the name.
        index: usize,
    },
    /// region name starts with '.'
    ///
    /// The name starts with `.`.
    LeadingDot,
    /// region name contains '..'
    ///
    /// The name contains `..`.
    DotDot,
    /// the name {RESERVED_GUEST_NAME:} is reserved (its socket would be the VM's
    /// {RESERVED_GUEST_NAME:}.sock)
    ///
    /// The guest asked for [`RESERVED_GUEST_NAME`].
    Reserved,
    /// region name field is not NUL-terminated within {MAX_NAME:} bytes
    ///
    /// A factory `name` field holds no NUL within its 32 bytes.
    Unterminated,
}

/// A byte of a name as a message shows it: a printable one quoted (`'#'`), another in hex
/// (`byte 0xff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameByte(pub u8);

impl fmt::Display for NameByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self(byte) = *self;
        if byte.is_ascii_graphic() {
            write!(f, "{:?}", byte as char)
        } else {
            write!(f, "byte {byte:#04x}")
        }
    }
}

/// Whether `byte` may appear in a region name.
pub fn is_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'+' | b'-')
}

/// Checks `name` against the rules in the [module documentation](self).
pub fn validate(name: &str) -> Result<(), NameError> {
    validate_bytes(name.as_bytes())
}

fn validate_bytes(name: &[u8]) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name[0] == b'.' {
        return Err(NameError::LeadingDot);
    }
    if let Some(index) = name.iter().position(|&b| !is_name_byte(b)) {
        return Err(NameError::ForbiddenByte {
            byte: NameByte(name[index]),
            index,
        });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    if name.windows(2).any(|pair| pair == b"..") {
        return Err(NameError::DotDot);
    }
    Ok(())
}

/// A legal region name (see the [module documentation](self)).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionName(String);

impl RegionName {
    /// Checks `name` and wraps it.
    pub fn new(name: &str) -> Result<Self, NameError> {
        validate(name)?;
        Ok(Self(name.to_owned()))
    }

    /// Reads a name from the bytes of a factory page's `name` field: the bytes before the first
    /// NUL, which must come within [`guest_shm::MAX_NAME`] bytes.
    pub fn from_factory_field(field: &[u8]) -> Result<Self, NameError> {
        let window = &field[..field.len().min(guest_shm::MAX_NAME)];
        let end = window
            .iter()
            .position(|&b| b == 0)
            .ok_or(NameError::Unterminated)?;
        let name = &window[..end];
        validate_bytes(name)?;
        // Legal names are ASCII, so this cannot fail; map it anyway instead of panicking.
        let text = std::str::from_utf8(name).map_err(|e| NameError::ForbiddenByte {
            byte: NameByte(name[e.valid_up_to()]),
            index: e.valid_up_to(),
        })?;
        Ok(Self(text.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as the factory page's `name` field: the bytes, then NUL padding to 32 bytes.
    pub fn to_factory_field(&self) -> [u8; guest_shm::MAX_NAME] {
        let mut field = [0u8; guest_shm::MAX_NAME];
        field[..self.0.len()].copy_from_slice(self.0.as_bytes());
        field
    }

    /// Consumes the wrapper.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for RegionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for RegionName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for RegionName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> serde::Deserialize<'de> for RegionName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::new(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for name in [
            "a",
            "foomem",
            "guest0mem",
            "TEST1",
            "a.b",
            "x_y-z+1",
            "-dash",
            "0",
            "virtio0",
            "tee_shmem",
        ] {
            assert_eq!(validate(name), Ok(()), "{name}");
        }
        assert_eq!(validate(&"a".repeat(31)), Ok(()));
    }

    #[test]
    fn rejects_empty_and_too_long() {
        assert_eq!(validate(""), Err(NameError::Empty));
        assert_eq!(
            validate(&"a".repeat(32)),
            Err(NameError::TooLong { len: 32 })
        );
    }

    #[test]
    fn rejects_bytes_that_could_escape_or_confuse() {
        for (name, byte, index) in [
            ("a/b", b'/', 1),
            ("/etc", b'/', 0),
            ("a b", b' ', 1),
            ("a\0b", 0, 1),
            ("a\nb", b'\n', 1),
            ("a:b", b':', 1),
            ("a@b", b'@', 1),
            ("a*", b'*', 1),
            ("a\\b", b'\\', 1),
            ("\u{e9}", 0xc3, 0),
        ] {
            assert_eq!(
                validate(name),
                Err(NameError::ForbiddenByte {
                    byte: NameByte(byte),
                    index
                }),
                "{name:?}"
            );
        }
    }

    #[test]
    fn rejects_dots_that_could_escape() {
        assert_eq!(validate("."), Err(NameError::LeadingDot));
        assert_eq!(validate(".."), Err(NameError::LeadingDot));
        assert_eq!(validate(".hidden"), Err(NameError::LeadingDot));
        assert_eq!(validate("a..b"), Err(NameError::DotDot));
        assert_eq!(validate("a.."), Err(NameError::DotDot));
        assert_eq!(validate("a.b.c"), Ok(()));
    }

    #[test]
    fn factory_field_round_trip() {
        let name = RegionName::new("foomem").unwrap();
        let field = name.to_factory_field();
        assert_eq!(&field[..7], b"foomem\0");
        assert!(field[6..].iter().all(|&b| b == 0));
        assert_eq!(RegionName::from_factory_field(&field), Ok(name));

        let longest = RegionName::new(&"z".repeat(31)).unwrap();
        assert_eq!(
            RegionName::from_factory_field(&longest.to_factory_field()),
            Ok(longest)
        );
    }

    #[test]
    fn factory_field_must_be_terminated_and_legal() {
        assert_eq!(
            RegionName::from_factory_field(&[b'a'; 32]),
            Err(NameError::Unterminated)
        );
        // A NUL after the 32-byte field does not count.
        let mut long = vec![b'a'; 40];
        long[35] = 0;
        assert_eq!(
            RegionName::from_factory_field(&long),
            Err(NameError::Unterminated)
        );
        assert_eq!(
            RegionName::from_factory_field(b"\0garbage"),
            Err(NameError::Empty)
        );
        assert_eq!(
            RegionName::from_factory_field(b"../x\0"),
            Err(NameError::LeadingDot)
        );
        assert_eq!(
            RegionName::from_factory_field(b"a\xffb\0"),
            Err(NameError::ForbiddenByte {
                byte: NameByte(0xff),
                index: 1
            })
        );
    }

    #[test]
    fn errors_explain_themselves() {
        assert_eq!(
            validate("a/b").unwrap_err().to_string(),
            "region name contains '/' at byte 1; allowed are A-Z a-z 0-9 _ . + -"
        );
        assert_eq!(
            validate("a\nb").unwrap_err().to_string(),
            "region name contains byte 0x0a at byte 1; allowed are A-Z a-z 0-9 _ . + -"
        );
    }
}
