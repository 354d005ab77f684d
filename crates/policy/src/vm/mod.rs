//! [`VmPolicy`]: one VM's shmem policy, and the decision for a guest's create/attach request.
//!
//! # Patterns see the guest's name, before substitution
//!
//! `allow`/`deny` patterns are matched against the name the guest wrote into the factory page,
//! not against the host name `subst` makes of it. Reasons, from QNX's text:
//!
//! * the restrictions list is described entirely from the guest's side: `allow test*` lets "the
//!   guest create or attach to any shared memory region whose name begins with test", and the
//!   examples (`test*`, `pluto`, `plutoplanet`) are names guest programs use;
//! * `subst` is described as what is "presented to the host", existing so that every guest can
//!   use the same names ("so you can use the same executables in the different guests"). Patterns
//!   in the guest's namespace can then be the same in every VM's configuration too;
//! * with `subst ,guest0`, a pattern applied after substitution would have to spell the prefix
//!   (`allow guest0mem` for the guest's `mem`), and `deny pluto` would silently never match.
//!
//! Because a name without `match` passes through `subst` unchanged, a guest could otherwise reach
//! another VM's host name (`guest0mem` from VM 1). Confine such guests with patterns in their
//! own namespace, e.g. `allow foo*` next to `subst foo,guest1`.
//!
//! # Order of checks in [`VmPolicy::decide`]
//!
//! 1. the guest name must be a legal region name ([`crate::name`]) and not the reserved
//!    `factory`, else `GSS_ILLEGAL_NAME`;
//! 2. the rules are evaluated on the guest name (the deciding rule is always reported);
//! 3. the host name (after `subst`) must be legal, in particular at most 31 bytes ("name + prefix
//!    must not exceed GUEST_SHM_MAX_NAME"), else `GSS_ILLEGAL_NAME`;
//! 4. a denying rule gives `GSS_NO_PERMISSION`, an allowing one `GSS_OK`.
//!
//! A name that cannot exist is thus reported as illegal even where the rules would deny it.
//!
//! # TOML form
//!
//! [`VmPolicy`] deserializes (via [`VmPolicyConfig`], unknown fields rejected) from:
//!
//! ```toml
//! rules = ["deny foo-secret", "allow foo*", "allow test*"]   # in order, first match decides
//! subst = "foo,guest0"              # [match],prefix
//! create = [{ name = "foomem", size = "0xf0000" }, { name = "foolog", size = 65536 }]
//! loc = 0x1b000000                  # integer, "0x1b000000", "mem:0x1b000000" or "pci:0:5"
//! intr = "gic:39"                   # or an integer line number
//! sched = 21
//! log = ["error,warning stderr"]    # the common vdev option, "FILTERS DESTINATION" each
//! ```
//!
//! `rules` is the QNX restrictions list in order (`"allow PATTERN"` / `"deny PATTERN"`), with
//! the same implicit final rule (`deny *` if any `allow` is present, else `allow *`). There is no
//! line order between `subst` and `create` in TOML: in this form `subst` applies to every
//! `create`. Sizes accept the QNX notations (`"0xf0000"`, `"960K"`) or a plain integer.
//!
//! Or paste the option lines of a QNX `vdev shmem` block verbatim (then no other policy field
//! may be given, and `subst` applies only to `create` lines after it, as on QNX), in a literal
//! string (`'''`), where a backslash stays a backslash as in the QNX file:
//!
//! ```toml
//! qnx = '''
//!     allow test*
//!     subst ,guest0
//!     create mem,0xf0000
//! '''
//! ```

mod config;
mod decision;

use serde::Deserialize;
use thiserror::Error;

use crate::guest_shm::{self, MAX_REGION_BYTES, PAGE_SIZE};
use crate::name::{NameError, RegionName};
use crate::options::{CreateOption, Interrupt, Location, LogOption, ParseError, VdevShmem};
use crate::rules::RuleList;
use crate::subst::Subst;
use crate::GuestShmStatus;

pub use config::{CreateConfig, VmPolicyConfig};
pub use decision::{Decision, IllegalName};

/// Why a [`VmPolicy`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum VmPolicyError {
    /// {0}
    ///
    /// The QNX option block did not parse.
    Parse(ParseError),
    /// create {name}: after subst the host name would be {host_name:?}: {error}
    ///
    /// A `create` name is illegal after substitution.
    IllegalCreateName {
        /// The name as configured.
        name: RegionName,
        /// The substituted name.
        host_name: String,
        /// What is wrong with it.
        error: NameError,
    },
    /// region {host_name:?} is created twice
    ///
    /// Two `create` entries make the same host region.
    DuplicateCreate {
        /// The host name.
        host_name: String,
    },
    /// create {name}: size {size} is not in 1..={MAX_REGION_BYTES:}
    ///
    /// A `create` size is zero or too large.
    BadCreateSize {
        /// The name as configured.
        name: RegionName,
        /// The size in bytes.
        size: u64,
    },
    /// loc {loc:#x} is not aligned to the {PAGE_SIZE:} byte factory page
    ///
    /// A memory `loc` is not page aligned.
    UnalignedLoc {
        /// The address.
        loc: u64,
    },
    /// loc needs intr: in MMIO mode the guest interrupt must be given
    ///
    /// A memory `loc` is given without `intr`.
    LocWithoutIntr,
    /// sched priority must be in 1..=255
    ///
    /// `sched` is 0.
    BadSched,
    /// qnx = '''...''' excludes rules, subst, create, loc, intr, sched and log: write them in the
    /// block
    ///
    /// The TOML form has `qnx` next to other policy fields.
    QnxWithFields,
}

impl From<ParseError> for VmPolicyError {
    fn from(error: ParseError) -> Self {
        Self::Parse(error)
    }
}

/// A region to create when the VM starts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PreCreatedRegion {
    /// The name as configured (the guest's name).
    pub name: RegionName,
    /// The host name (after `subst` where it applies).
    pub host_name: RegionName,
    /// Size in bytes as configured.
    pub size: u64,
}

/// One VM's shmem policy: restrictions list, `subst`, pre-created regions and the device
/// options (`loc`, `intr`, `sched`, `log`) that the server reports and device models use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "VmPolicyConfig")]
pub struct VmPolicy {
    rules: RuleList,
    subst: Option<Subst>,
    pre_created: Vec<PreCreatedRegion>,
    loc: Option<Location>,
    intr: Option<Interrupt>,
    sched: Option<u8>,
    log: Vec<LogOption>,
}

impl VmPolicy {
    /// Parses a QNX `vdev shmem` block (see [`crate::options`]) into a policy.
    pub fn parse_qnx(text: &str) -> Result<Self, VmPolicyError> {
        Self::from_vdev(VdevShmem::parse(text)?)
    }

    /// Builds a policy from parsed options, checking them again (the fields are public, so a
    /// [`VdevShmem`] may have been built by hand).
    pub fn from_vdev(block: VdevShmem) -> Result<Self, VmPolicyError> {
        let pre_created = pre_create(&block.creates, block.subst.as_ref())?;
        check_placement(block.loc.as_ref(), block.intr.as_ref(), block.sched)?;
        Ok(Self {
            rules: block.rules,
            subst: block.subst,
            pre_created,
            loc: block.loc,
            intr: block.intr,
            sched: block.sched,
            log: block.log,
        })
    }

    /// Builds a policy from its TOML form: `rules` in order; `subst` applies to every `create`;
    /// or the verbatim QNX block in `qnx`, which excludes every other field.
    pub fn from_config(config: VmPolicyConfig) -> Result<Self, VmPolicyError> {
        if let Some(block) = &config.qnx {
            let only_qnx = VmPolicyConfig {
                qnx: Some(block.clone()),
                ..VmPolicyConfig::default()
            };
            if config != only_qnx {
                return Err(VmPolicyError::QnxWithFields);
            }
            return Self::parse_qnx(block);
        }
        let rules = RuleList::new(config.rules);
        let creates: Vec<CreateOption> = config
            .create
            .into_iter()
            .map(|create| CreateOption {
                name: create.name,
                size: create.size,
                subst_applies: true,
            })
            .collect();
        Self::from_vdev(VdevShmem {
            rules,
            subst: config.subst,
            creates,
            loc: config.loc,
            intr: config.intr,
            sched: config.sched,
            name: None,
            log: config.log,
        })
    }

    /// Decides a guest's create/attach request for `guest_name` (see the
    /// [module documentation](self) for the order of checks).
    pub fn decide(&self, guest_name: &str) -> Decision {
        match RegionName::new(guest_name) {
            Ok(name) => self.decide_legal(name),
            Err(error) => Decision::illegal_guest_name(guest_name.to_owned(), error),
        }
    }

    /// [`decide`](Self::decide) for the raw bytes of a factory page's 32-byte `name` field.
    pub fn decide_factory_field(&self, field: &[u8]) -> Decision {
        match RegionName::from_factory_field(field) {
            Ok(name) => self.decide_legal(name),
            Err(error) => {
                let window = &field[..field.len().min(guest_shm::MAX_NAME)];
                let end = window.iter().position(|&b| b == 0).unwrap_or(window.len());
                let shown = String::from_utf8_lossy(&window[..end]).into_owned();
                Decision::illegal_guest_name(shown, error)
            }
        }
    }

    fn decide_legal(&self, name: RegionName) -> Decision {
        if crate::name::is_reserved_guest_name(name.as_str()) {
            return Decision::illegal_guest_name(name.into_string(), NameError::Reserved);
        }
        let rule = self.rules.evaluate(name.as_str());
        let host_text = self.host_name_of(name.as_str());
        let (host_name, status, name_error) = match RegionName::new(&host_text) {
            Ok(host) => {
                let status = if rule.permits() {
                    GuestShmStatus::Ok
                } else {
                    GuestShmStatus::NoPermission
                };
                (Some(host), status, None)
            }
            Err(error) => (
                None,
                GuestShmStatus::IllegalName,
                Some(IllegalName::Host {
                    host_name: host_text,
                    error,
                }),
            ),
        };
        Decision {
            guest_name: name.into_string(),
            host_name,
            rule: Some(rule),
            status,
            name_error,
        }
    }

    /// The host name for a guest name: `subst` applied if there is one. Not checked.
    pub fn host_name_of(&self, guest_name: &str) -> String {
        match &self.subst {
            Some(subst) => subst.apply(guest_name),
            None => guest_name.to_owned(),
        }
    }

    /// Regions to create at VM start: `(host name, size in bytes)`, in configuration order.
    /// `subst` is applied only to `create` options written after it (all of them in the TOML
    /// form).
    pub fn pre_created(&self) -> Vec<(RegionName, u64)> {
        self.pre_created
            .iter()
            .map(|region| (region.host_name.clone(), region.size))
            .collect()
    }

    /// The pre-created regions with their configured names too.
    pub fn pre_created_regions(&self) -> &[PreCreatedRegion] {
        &self.pre_created
    }

    /// The restrictions list.
    pub fn rules(&self) -> &RuleList {
        &self.rules
    }

    /// The `subst` option.
    pub fn subst(&self) -> Option<&Subst> {
        self.subst.as_ref()
    }

    /// The `loc` option: where the vdev appears.
    pub fn loc(&self) -> Option<&Location> {
        self.loc.as_ref()
    }

    /// The factory page's address in MMIO mode (a memory `loc` with `intr`).
    pub fn mmio_loc(&self) -> Option<u64> {
        self.loc
            .as_ref()
            .and_then(Location::mmio_address)
            .filter(|_| self.intr.is_some())
    }

    /// The `intr` option.
    pub fn intr(&self) -> Option<&Interrupt> {
        self.intr.as_ref()
    }

    /// The `sched` option.
    pub fn sched(&self) -> Option<u8> {
        self.sched
    }

    /// The common `log` options, in the order written.
    pub fn log(&self) -> &[LogOption] {
        &self.log
    }

    /// Whether the guest sees an MMIO device (a memory `loc` and `intr`) instead of a PCI
    /// device.
    pub fn is_mmio(&self) -> bool {
        self.mmio_loc().is_some()
    }
}

impl TryFrom<VmPolicyConfig> for VmPolicy {
    type Error = VmPolicyError;

    fn try_from(config: VmPolicyConfig) -> Result<Self, Self::Error> {
        Self::from_config(config)
    }
}

impl TryFrom<VdevShmem> for VmPolicy {
    type Error = VmPolicyError;

    fn try_from(block: VdevShmem) -> Result<Self, Self::Error> {
        Self::from_vdev(block)
    }
}

fn pre_create(
    creates: &[CreateOption],
    subst: Option<&Subst>,
) -> Result<Vec<PreCreatedRegion>, VmPolicyError> {
    let mut regions: Vec<PreCreatedRegion> = Vec::with_capacity(creates.len());
    for create in creates {
        if create.size == 0 || create.size > MAX_REGION_BYTES {
            return Err(VmPolicyError::BadCreateSize {
                name: create.name.clone(),
                size: create.size,
            });
        }
        let host_text = create.host_name(subst);
        let host_name =
            RegionName::new(&host_text).map_err(|error| VmPolicyError::IllegalCreateName {
                name: create.name.clone(),
                host_name: host_text.clone(),
                error,
            })?;
        if regions.iter().any(|region| region.host_name == host_name) {
            return Err(VmPolicyError::DuplicateCreate {
                host_name: host_text,
            });
        }
        regions.push(PreCreatedRegion {
            name: create.name.clone(),
            host_name,
            size: create.size,
        });
    }
    Ok(regions)
}

fn check_placement(
    loc: Option<&Location>,
    intr: Option<&Interrupt>,
    sched: Option<u8>,
) -> Result<(), VmPolicyError> {
    if let Some(loc) = loc.and_then(Location::mmio_address) {
        if loc % guest_shm::PAGE_SIZE as u64 != 0 {
            return Err(VmPolicyError::UnalignedLoc { loc });
        }
        if intr.is_none() {
            return Err(VmPolicyError::LocWithoutIntr);
        }
    }
    if sched == Some(0) {
        return Err(VmPolicyError::BadSched);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
