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
//! ```
//!
//! Syntax, after the qvm configuration rules: everything from a `#` to the end of its line is a
//! comment; options and arguments are separated by whitespace; each option takes exactly one
//! argument, which must be on the same line (qvm ignores line breaks, but an argument on the next
//! line is almost always a missing argument, so this parser reports it). Keywords are
//! case-sensitive. The block may start with `vdev shmem` (or `vdev vdev-shmem.so`); another
//! `vdev` later is an error, since one call parses one block.
//!
//! | option | argument | notes |
//! |---|---|---|
//! | `allow` | fnmatch pattern | appended to the [`RuleList`] in order |
//! | `deny` | fnmatch pattern | appended to the [`RuleList`] in order |
//! | `create` | `NAME,SIZE` | pre-create region `NAME` of `SIZE` bytes; affected by a `subst` written *before* it only |
//! | `subst` | `[match],prefix` | at most one per block (see [`Subst`]) |
//! | `loc` | address | factory page address (MMIO mode); page aligned; needs `intr` |
//! | `intr` | `[controller:]line` | guest interrupt, e.g. `gic:39` |
//! | `sched` | priority 1..=255 | priority of the notification pulses |
//! | `name` | vdev instance name | a common vdev option (`/dev/qvm/<system>/<name>`) |
//!
//! Sizes and addresses are decimal, `0x` hex or `0d` decimal, with an optional `K`/`M`/`G`
//! suffix (powers of 1024). A `create` size must be at least 1 byte and at most the
//! 2³² − 1 pages a factory `size` register can hold; it need not be a page multiple (the region
//! gets whole pages, see [`crate::guest_shm::pages_for`]). `loc`, `intr`, `sched` and `name`
//! follow qvm's rule that a repeated option's last instance wins; a second `subst` is an error
//! ("Only one instance of the subst option may be specified per shmem vdev"). Unknown options,
//! missing or malformed arguments, illegal `create` names (before or after substitution),
//! two `create`s of the same host name and `loc` without `intr` are errors, each reported as a
//! [`ParseError`] with its line number, option and reason.
//!
//! `create` names are not checked against `allow`/`deny`: pre-creation is the operator's decision.

mod interrupt;

use std::fmt;

use thiserror::Error;

use crate::fnmatch::Pattern;
use crate::guest_shm::{MAX_REGION_BYTES, PAGE_SIZE};
use crate::name::RegionName;
use crate::number::{parse_number, parse_size};
use crate::rules::{Rule, RuleList};
use crate::subst::Subst;

pub use interrupt::{Interrupt, InterruptError};

/// A `vdev shmem` block that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {option}: {message}")]
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
    /// The `loc` option: guest-physical address of the factory page (MMIO mode).
    pub loc: Option<u64>,
    /// The `intr` option.
    pub intr: Option<Interrupt>,
    /// The `sched` option: priority of the notification pulses.
    pub sched: Option<u8>,
    /// The common `name` option: the vdev instance's name.
    pub name: Option<String>,
}

impl VdevShmem {
    /// Parses a block (see the [module documentation](self)).
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        Parser::default().parse(text)
    }

    /// Whether the guest sees the vdev as an MMIO device (`loc` and `intr` given) rather than
    /// as a PCI device.
    pub fn is_mmio(&self) -> bool {
        self.loc.is_some() && self.intr.is_some()
    }
}

/// Renders the block in canonical form: the `vdev shmem` line, then one option per line (rules
/// in order, `create`s not affected by `subst`, `subst`, the other `create`s, `loc`, `intr`,
/// `sched`, `name`). Sizes and addresses are written in hex. Parsing the output gives the same
/// value back.
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
        if let Some(loc) = self.loc {
            writeln!(f, "    loc {loc:#x}")?;
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
        Ok(())
    }
}

impl std::str::FromStr for VdevShmem {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// One whitespace-separated word and the line it is on.
#[derive(Debug, Clone, Copy)]
struct Token<'a> {
    text: &'a str,
    line: usize,
}

fn tokenize(text: &str) -> Vec<Token<'_>> {
    let mut tokens = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let code = line.split('#').next().unwrap_or_default();
        tokens.extend(code.split_whitespace().map(|word| Token {
            text: word,
            line: index + 1,
        }));
    }
    tokens
}

/// Parser state: the block so far and where some options were seen.
#[derive(Default)]
struct Parser {
    block: VdevShmem,
    subst_line: Option<usize>,
    loc_line: Option<usize>,
    /// Host names of `create`s with their lines, to report duplicates.
    created: Vec<(String, usize)>,
}

const OPTIONS: &str = "allow, deny, create, subst, loc, intr, sched, name";

impl Parser {
    fn parse(mut self, text: &str) -> Result<VdevShmem, ParseError> {
        let tokens = tokenize(text);
        let mut rest = tokens.as_slice();
        if let Some((first, after)) = rest.split_first() {
            if first.text == "vdev" {
                let kind = after
                    .first()
                    .filter(|t| t.line == first.line)
                    .ok_or_else(|| {
                        ParseError::new(
                            first.line,
                            "vdev",
                            "missing device type (expected `vdev shmem`)",
                        )
                    })?;
                if !matches!(kind.text, "shmem" | "vdev-shmem.so") {
                    return Err(ParseError::new(
                        kind.line,
                        "vdev",
                        format!("this is a `vdev {}` block, not `vdev shmem`", kind.text),
                    ));
                }
                rest = &after[1..];
            }
        }
        while let Some((option, after)) = rest.split_first() {
            if option.text == "vdev" {
                return Err(ParseError::new(
                    option.line,
                    "vdev",
                    "a second vdev starts here; give one `vdev shmem` block at a time",
                ));
            }
            if !is_known_option(option.text) {
                return Err(ParseError::new(
                    option.line,
                    option.text,
                    format!("unknown option; vdev shmem takes {OPTIONS}"),
                ));
            }
            let argument = after
                .first()
                .filter(|t| t.line == option.line)
                .ok_or_else(|| {
                    ParseError::new(
                        option.line,
                        option.text,
                        "missing argument (it must be on the same line as the option)",
                    )
                })?;
            self.option(option, argument.text)?;
            rest = &after[1..];
        }
        if let (Some(line), None) = (self.loc_line, &self.block.intr) {
            return Err(ParseError::new(
                line,
                "loc",
                "loc needs an intr option too: with loc the vdev is an MMIO device and the guest \
                 interrupt must be given",
            ));
        }
        Ok(self.block)
    }

    fn option(&mut self, option: &Token<'_>, argument: &str) -> Result<(), ParseError> {
        let line = option.line;
        let fail = |message: String| ParseError::new(line, option.text, message);
        match option.text {
            "allow" | "deny" => {
                let pattern = Pattern::new(argument).map_err(|e| fail(e.to_string()))?;
                let rule = if option.text == "allow" {
                    Rule::Allow(pattern)
                } else {
                    Rule::Deny(pattern)
                };
                self.block.rules.push(rule);
            }
            "create" => {
                let create = self.create(argument).map_err(fail)?;
                let host_name = create.host_name(self.block.subst.as_ref());
                if let Some((_, first)) = self.created.iter().find(|(name, _)| *name == host_name) {
                    return Err(fail(format!(
                        "region {host_name:?} is already created on line {first}"
                    )));
                }
                self.created.push((host_name, line));
                self.block.creates.push(create);
            }
            "subst" => {
                if let Some(first) = self.subst_line {
                    return Err(fail(format!(
                        "only one subst is allowed per shmem vdev (the first is on line {first})"
                    )));
                }
                let subst = Subst::parse(argument).map_err(|e| fail(e.to_string()))?;
                self.block.subst = Some(subst);
                self.subst_line = Some(line);
            }
            "loc" => {
                let loc = parse_size(argument, u64::MAX).map_err(|e| fail(e.to_string()))?;
                if loc % PAGE_SIZE as u64 != 0 {
                    return Err(fail(format!(
                        "{argument} is not aligned to the {PAGE_SIZE}-byte factory page"
                    )));
                }
                self.block.loc = Some(loc);
                self.loc_line = Some(line);
            }
            "intr" => {
                let intr = Interrupt::parse(argument).map_err(|e| fail(e.to_string()))?;
                self.block.intr = Some(intr);
            }
            "sched" => {
                let priority = parse_number(argument, 255).map_err(|e| fail(e.to_string()))?;
                let priority = u8::try_from(priority)
                    .ok()
                    .filter(|&p| p >= 1)
                    .ok_or_else(|| fail(format!("priority {argument} is not in 1..=255")))?;
                self.block.sched = Some(priority);
            }
            "name" => {
                if argument.contains('/') {
                    return Err(fail(format!("vdev name {argument:?} must not contain '/'")));
                }
                self.block.name = Some(argument.to_owned());
            }
            _ => return Err(fail(format!("unknown option; vdev shmem takes {OPTIONS}"))),
        }
        Ok(())
    }

    fn create(&self, argument: &str) -> Result<CreateOption, String> {
        let (name, size) = argument
            .split_once(',')
            .ok_or_else(|| format!("expected NAME,SIZE, got {argument:?}"))?;
        let name = RegionName::new(name).map_err(|e| e.to_string())?;
        let size = parse_size(size, MAX_REGION_BYTES).map_err(|e| format!("size: {e}"))?;
        if size == 0 {
            return Err("size: a region needs at least one byte".to_owned());
        }
        let create = CreateOption {
            name,
            size,
            subst_applies: self.block.subst.is_some(),
        };
        if let Some(subst) = self.block.subst.as_ref() {
            let host_name = create.host_name(Some(subst));
            crate::name::validate(&host_name).map_err(|e| {
                format!("after `subst {subst}` the host name would be {host_name:?}: {e}")
            })?;
        }
        Ok(create)
    }
}

fn is_known_option(word: &str) -> bool {
    matches!(
        word,
        "allow" | "deny" | "create" | "subst" | "loc" | "intr" | "sched" | "name"
    )
}

#[cfg(test)]
mod tests;
