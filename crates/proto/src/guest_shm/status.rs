//! `enum guest_shm_status` from QNX's `guest_shm.h`: what a create/attach request returns in the
//! factory page's `status` register.

use std::fmt;

/// The `GSS_*` status codes, with the numeric values of `enum guest_shm_status` (declaration
/// order, starting at 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GuestShmStatus {
    /// `GSS_OK`: the region was created or attached.
    Ok = 0,
    /// `GSS_UNKNOWN_FAILURE`: creation failed for an unknown reason.
    UnknownFailure = 1,
    /// `GSS_NOMEM`: not enough memory to create the region.
    NoMem = 2,
    /// `GSS_CLIENT_MAX`: the region already has the maximum number of clients
    /// ([`super::MAX_CLIENTS`]).
    ClientMax = 3,
    /// `GSS_ILLEGAL_NAME`: the region name is not acceptable.
    IllegalName = 4,
    /// `GSS_NO_PERMISSION`: the guest may not create or attach to this region.
    NoPermission = 5,
    /// `GSS_DOES_NOT_EXIST`: a `find` for a named region found nothing.
    DoesNotExist = 6,
}

impl GuestShmStatus {
    /// Every code, in numeric order.
    pub const ALL: [Self; 7] = [
        Self::Ok,
        Self::UnknownFailure,
        Self::NoMem,
        Self::ClientMax,
        Self::IllegalName,
        Self::NoPermission,
        Self::DoesNotExist,
    ];

    /// The value a guest reads from the `status` register.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// The code with this register value, if there is one.
    pub const fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            0 => Self::Ok,
            1 => Self::UnknownFailure,
            2 => Self::NoMem,
            3 => Self::ClientMax,
            4 => Self::IllegalName,
            5 => Self::NoPermission,
            6 => Self::DoesNotExist,
            _ => return None,
        })
    }

    /// The QNX identifier, e.g. `"GSS_NO_PERMISSION"`.
    pub const fn qnx_name(self) -> &'static str {
        match self {
            Self::Ok => "GSS_OK",
            Self::UnknownFailure => "GSS_UNKNOWN_FAILURE",
            Self::NoMem => "GSS_NOMEM",
            Self::ClientMax => "GSS_CLIENT_MAX",
            Self::IllegalName => "GSS_ILLEGAL_NAME",
            Self::NoPermission => "GSS_NO_PERMISSION",
            Self::DoesNotExist => "GSS_DOES_NOT_EXIST",
        }
    }

    /// The code with this QNX identifier (`"GSS_OK"`, ...), if there is one.
    pub fn from_qnx_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|status| status.qnx_name() == name)
    }

    /// A one-line explanation, after the header's documentation.
    pub const fn description(self) -> &'static str {
        match self {
            Self::Ok => "the region was created or attached",
            Self::UnknownFailure => "the request failed for an unknown reason",
            Self::NoMem => "there was not enough memory to create the region",
            Self::ClientMax => "the region already has the maximum number of clients",
            Self::IllegalName => "the region name is illegal",
            Self::NoPermission => "the guest is not permitted to use this region",
            Self::DoesNotExist => "no shared memory region with this name exists",
        }
    }

    /// Whether this is `GSS_OK`.
    pub const fn is_ok(self) -> bool {
        matches!(self, Self::Ok)
    }
}

/// Prints the QNX identifier (`GSS_OK`, `GSS_NO_PERMISSION`, ...).
impl fmt::Display for GuestShmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.qnx_name())
    }
}

impl From<GuestShmStatus> for u32 {
    fn from(status: GuestShmStatus) -> Self {
        status.as_u32()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_qnx_name_inverts_qnx_name() {
        for status in GuestShmStatus::ALL {
            assert_eq!(
                GuestShmStatus::from_qnx_name(status.qnx_name()),
                Some(status)
            );
        }
        assert_eq!(GuestShmStatus::from_qnx_name("GSS_MAYBE"), None);
        assert_eq!(GuestShmStatus::from_qnx_name("gss_ok"), None);
    }

    #[test]
    fn values_follow_the_header_enum_order() {
        assert_eq!(GuestShmStatus::Ok.as_u32(), 0);
        assert_eq!(GuestShmStatus::UnknownFailure.as_u32(), 1);
        assert_eq!(GuestShmStatus::NoMem.as_u32(), 2);
        assert_eq!(GuestShmStatus::ClientMax.as_u32(), 3);
        assert_eq!(GuestShmStatus::IllegalName.as_u32(), 4);
        assert_eq!(GuestShmStatus::NoPermission.as_u32(), 5);
        assert_eq!(GuestShmStatus::DoesNotExist.as_u32(), 6);
    }

    #[test]
    fn from_u32_inverts_as_u32_and_rejects_unknown_values() {
        for status in GuestShmStatus::ALL {
            assert_eq!(GuestShmStatus::from_u32(status.as_u32()), Some(status));
            assert_eq!(u32::from(status), status.as_u32());
        }
        assert_eq!(GuestShmStatus::from_u32(7), None);
        assert_eq!(GuestShmStatus::from_u32(u32::MAX), None);
    }

    #[test]
    fn display_is_the_qnx_name() {
        assert_eq!(GuestShmStatus::Ok.to_string(), "GSS_OK");
        assert_eq!(GuestShmStatus::NoMem.to_string(), "GSS_NOMEM");
        assert_eq!(
            GuestShmStatus::NoPermission.to_string(),
            "GSS_NO_PERMISSION"
        );
        assert_eq!(
            GuestShmStatus::DoesNotExist.to_string(),
            "GSS_DOES_NOT_EXIST"
        );
        assert!(GuestShmStatus::Ok.is_ok());
        assert!(!GuestShmStatus::IllegalName.is_ok());
    }
}
