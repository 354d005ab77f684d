//! The option lines of a QNX `vdev shmem` block, as written in a qvm configuration file.
//!
//! ```text
//! vdev shmem                 # optional: the block may start with its vdev line
//!     allow test*            # one option per line ...
//!     deny pluto allow pluto*   # ... or several on a line
//!     subst foo,guest0
//!     create foomem,0xf0000
//!     loc 0x1b000000 intr gic:39
//!     sched 21
//!     log error,warning stderr
//! ```
//!
//! Syntax, after the qvm configuration rules: everything from a `#` to the end of its line is a
//! comment; options and arguments are separated by whitespace; each option takes exactly one
//! argument, which must be on the same line (qvm ignores line breaks, but an argument on the next
//! line is almost always a missing argument, so this parser reports it); `log` takes two words
//! and `loc` may stand alone (a bare `loc`: PCI mode). Keywords are
//! case-sensitive. The block may start with `vdev shmem` (or `vdev vdev-shmem.so`); another
//! `vdev` later is an error, since one call parses one block.
//!
//! | option | argument | notes |
//! |---|---|---|
//! | `allow` | fnmatch pattern | appended to the [`RuleList`] in order |
//! | `deny` | fnmatch pattern | appended to the [`RuleList`] in order |
//! | `create` | `NAME,SIZE` | pre-create region `NAME` of `SIZE` bytes; affected by a `subst` written *before* it only |
//! | `subst` | `[match],prefix` | at most one per block (see [`Subst`]) |
//! | `loc` | [`Location`]: `ADDR` or `mem:ADDR`, `pci:BUS:DEV[.FUNC]`, or nothing | `mem`: the factory page address (MMIO mode; page aligned; needs `intr`); `pci:`/bare: PCI mode |
//! | `intr` | `[controller:]line` | guest interrupt, e.g. `gic:39`; in PCI mode the line INTA# is routed to (assigned by the VMM when omitted) |
//! | `sched` | priority 1..=255 | priority of the notification pulses |
//! | `name` | vdev instance name | a common vdev option (`/dev/qvm/<system>/<name>`) |
//! | `log` | `FILTER[,FILTER...] DESTINATION` | a common vdev option ([`LogOption`]), repeatable |
//!
//! The common option `hostvector` applies to interrupt-controller vdevs only and is refused
//! with that reason.
//!
//! Sizes and addresses are decimal, `0x` hex or `0d` decimal, with an optional `K`/`M`/`G`
//! suffix (powers of 1024). A `create` size must be at least 1 byte and at most the
//! 2³² − 1 pages a factory `size` register can hold; it need not be a page multiple (the region
//! gets whole pages, see [`crate::guest_shm::pages_for`]: every server and device model in this
//! project rounds it up). `loc`, `intr`, `sched` and `name`
//! follow qvm's rule that a repeated option's last instance wins; a second `subst` is an error
//! ("Only one instance of the subst option may be specified per shmem vdev"). Unknown options,
//! missing or malformed arguments, illegal `create` names (before or after substitution),
//! two `create`s of the same host name and an MMIO `loc` without `intr` are errors, each reported as a
//! [`ParseError`] with its line number, option and reason.
//!
//! `create` names are not checked against `allow`/`deny`: pre-creation is the operator's decision.

mod interrupt;
mod location;
mod log;
mod parser;

use std::fmt;

use thiserror::Error;

use crate::name::RegionName;
use crate::rules::RuleList;
use crate::subst::Subst;

pub use interrupt::{Interrupt, InterruptError};
pub use location::{Location, LocationError, PciAddress};
pub use log::{LogDestination, LogError, LogOption, LogSeverity};

/// line {line}: {option}: {message}
///
/// A `vdev shmem` block that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// The option (keyword) being parsed, or the unknown word.
    pub option: String,
    /// What is wrong.
    pub message: String,
}

impl ParseError {
    fn new(line: usize, option: &str, message: impl Into<String>) -> Self {
        Self {
            line,
            option: option.to_owned(),
            message: message.into(),
        }
    }
}

/// One `create NAME,SIZE` option.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CreateOption {
    /// The region name as written (the guest's name, before any substitution).
    pub name: RegionName,
    /// Size in bytes as written.
    pub size: u64,
    /// Whether the block's `subst` applies, i.e. the `create` comes after the `subst` line.
    /// Only meaningful when the block has a `subst`.
    pub subst_applies: bool,
}

impl CreateOption {
    /// The region's name on the host: substituted when `subst_applies`, as written otherwise.
    /// The result is not checked (the parser checks it for parsed blocks).
    pub fn host_name(&self, subst: Option<&Subst>) -> String {
        match subst {
            Some(subst) if self.subst_applies => subst.apply(self.name.as_str()),
            _ => self.name.as_str().to_owned(),
        }
    }
}

/// The parsed options of one `vdev shmem` block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VdevShmem {
    /// `allow` and `deny` options in the order written.
    pub rules: RuleList,
    /// The `subst` option.
    pub subst: Option<Subst>,
    /// `create` options in the order written; in a parsed block the ones `subst` applies to
    /// come after all the others (rendering writes them in that order).
    pub creates: Vec<CreateOption>,
    /// The `loc` option: where the vdev appears (the factory page's address in MMIO mode, or
    /// PCI mode).
    pub loc: Option<Location>,
    /// The `intr` option.
    pub intr: Option<Interrupt>,
    /// The `sched` option: priority of the notification pulses.
    pub sched: Option<u8>,
    /// The common `name` option: the vdev instance's name.
    pub name: Option<String>,
    /// The common `log` options in the order written.
    pub log: Vec<LogOption>,
}

impl VdevShmem {
    /// Parses a block (see the [module documentation](self)).
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        parser::Parser::default().parse(text)
    }

    /// Whether the guest sees the vdev as an MMIO device (a memory `loc` and `intr` given)
    /// rather than as a PCI device.
    pub fn is_mmio(&self) -> bool {
        matches!(self.loc, Some(Location::Mem(_))) && self.intr.is_some()
    }
}

/// Renders the block in canonical form: the `vdev shmem` line, then one option per line (rules
/// in order, `create`s not affected by `subst`, `subst`, the other `create`s, `loc`, `intr`,
/// `sched`, `name`, `log`s). Sizes and addresses are written in hex. Parsing the output gives
/// the same value back.
impl fmt::Display for VdevShmem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "vdev shmem")?;
        for rule in self.rules.rules() {
            writeln!(f, "    {rule}")?;
        }
        let write_create = |f: &mut fmt::Formatter<'_>, create: &CreateOption| {
            writeln!(f, "    create {},{:#x}", create.name, create.size)
        };
        let applies = |create: &&CreateOption| self.subst.is_some() && create.subst_applies;
        for create in self.creates.iter().filter(|c| !applies(c)) {
            write_create(f, create)?;
        }
        if let Some(subst) = &self.subst {
            writeln!(f, "    subst {subst}")?;
        }
        for create in self.creates.iter().filter(applies) {
            write_create(f, create)?;
        }
        match &self.loc {
            Some(Location::Pci(None)) => writeln!(f, "    loc")?,
            Some(loc) => writeln!(f, "    loc {loc}")?,
            None => {}
        }
        if let Some(intr) = &self.intr {
            writeln!(f, "    intr {intr}")?;
        }
        if let Some(sched) = self.sched {
            writeln!(f, "    sched {sched}")?;
        }
        if let Some(name) = &self.name {
            writeln!(f, "    name {name}")?;
        }
        for log in &self.log {
            writeln!(f, "    log {log}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for VdevShmem {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests;
