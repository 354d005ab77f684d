//! [`Decision`]: the outcome of a guest's create/attach request.

use std::fmt;

use crate::name::{NameError, RegionName};
use crate::rules::RuleMatch;
use crate::GuestShmStatus;

/// Why a name was refused as `GSS_ILLEGAL_NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IllegalName {
    /// The guest's name itself is illegal.
    Guest(NameError),
    /// The name after `subst` is illegal (typically too long).
    Host {
        /// The substituted name.
        host_name: String,
        /// What is wrong with it.
        error: NameError,
    },
}

impl fmt::Display for IllegalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Guest(error) => write!(f, "guest name: {error}"),
            Self::Host { host_name, error } => write!(f, "host name {host_name:?}: {error}"),
        }
    }
}

/// The outcome of [`VmPolicy::decide`](super::VmPolicy::decide).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The name the guest asked for (lossily decoded if it was not text).
    pub guest_name: String,
    /// The host name after `subst`, when both names are legal.
    pub host_name: Option<RegionName>,
    /// The rule that decided; `None` when the guest name was illegal and no rule was consulted.
    pub rule: Option<RuleMatch>,
    /// What the guest reads from the factory `status` register: `GSS_OK`, `GSS_NO_PERMISSION`
    /// or `GSS_ILLEGAL_NAME`.
    pub status: GuestShmStatus,
    /// Why the name is illegal; set exactly when `status` is `GSS_ILLEGAL_NAME`.
    pub name_error: Option<IllegalName>,
}

impl Decision {
    pub(super) fn illegal_guest_name(guest_name: String, error: NameError) -> Self {
        Self {
            guest_name,
            host_name: None,
            rule: None,
            status: GuestShmStatus::IllegalName,
            name_error: Some(IllegalName::Guest(error)),
        }
    }

    /// Whether the request is granted.
    pub fn is_allowed(&self) -> bool {
        self.status.is_ok()
    }
}

/// One line for `ivshm policy check`, e.g.
/// `foomem -> guest0mem: GSS_OK (rule 1: allow foo*)` or
/// `a/b: GSS_ILLEGAL_NAME (guest name: region name contains '/' ...)`.
impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.guest_name)?;
        if let Some(host) = &self.host_name {
            write!(f, " -> {host}")?;
        }
        write!(f, ": {}", self.status)?;
        match (&self.name_error, &self.rule) {
            (Some(error), _) => write!(f, " ({error})"),
            (None, Some(rule)) => write!(f, " ({rule})"),
            (None, None) => Ok(()),
        }
    }
}
