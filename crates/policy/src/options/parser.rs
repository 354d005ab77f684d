//! The tokenizer and parser behind [`VdevShmem::parse`](super::VdevShmem::parse).

use crate::fnmatch::Pattern;
use crate::guest_shm::MAX_REGION_BYTES;
use crate::name::RegionName;
use crate::number::{parse_number, parse_size};
use crate::rules::Rule;
use crate::subst::Subst;

use super::{CreateOption, Interrupt, Location, LogOption, ParseError, VdevShmem};

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
pub(super) struct Parser {
    block: VdevShmem,
    subst_line: Option<usize>,
    loc_line: Option<usize>,
    /// Host names of `create`s with their lines, to report duplicates.
    created: Vec<(String, usize)>,
}

const OPTIONS: &str = "allow, deny, create, subst, loc, intr, sched, name, log";

/// How many words follow an option on its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arguments {
    /// Exactly one.
    One,
    /// Exactly two (`log FILTERS DESTINATION`).
    Two,
    /// One, or none when the line ends or the next word is an option (`loc`).
    Optional,
}

fn arguments(option: &str) -> Option<Arguments> {
    match option {
        "allow" | "deny" | "create" | "subst" | "intr" | "sched" | "name" => Some(Arguments::One),
        "log" => Some(Arguments::Two),
        "loc" => Some(Arguments::Optional),
        _ => None,
    }
}

impl Parser {
    pub(super) fn parse(mut self, text: &str) -> Result<VdevShmem, ParseError> {
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
            let Some(kind) = arguments(option.text) else {
                return Err(unknown_option(option));
            };
            let on_line: Vec<&str> = after
                .iter()
                .take_while(|t| t.line == option.line)
                .map(|t| t.text)
                .collect();
            let taken = match kind {
                Arguments::Optional => {
                    usize::from(on_line.first().is_some_and(|w| arguments(w).is_none()))
                }
                Arguments::One => 1,
                Arguments::Two => 2,
            };
            if on_line.len() < taken {
                let what = if kind == Arguments::Two {
                    "missing argument: log takes a severity list and a destination, e.g. \
                     `log error,warning stderr` (on the same line as the option)"
                } else {
                    "missing argument (it must be on the same line as the option)"
                };
                return Err(ParseError::new(option.line, option.text, what));
            }
            self.option(option, &on_line[..taken])?;
            rest = &after[taken..];
        }
        if let (Some(line), None) = (self.loc_line, &self.block.intr) {
            return Err(ParseError::new(
                line,
                "loc",
                "a memory loc needs an intr option too: with loc ADDRESS the vdev is an MMIO \
                 device and the guest interrupt must be given",
            ));
        }
        Ok(self.block)
    }

    fn option(&mut self, option: &Token<'_>, words: &[&str]) -> Result<(), ParseError> {
        let line = option.line;
        let fail = |message: String| ParseError::new(line, option.text, message);
        let argument = words.first().copied().unwrap_or_default();
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
                let loc = if words.is_empty() {
                    Location::Pci(None)
                } else {
                    Location::parse(argument).map_err(|e| fail(e.to_string()))?
                };
                self.loc_line = matches!(loc, Location::Mem(_)).then_some(line);
                self.block.loc = Some(loc);
            }
            "log" => {
                let log = LogOption::parse(argument, words.get(1).copied().unwrap_or_default())
                    .map_err(|e| fail(e.to_string()))?;
                self.block.log.push(log);
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

fn unknown_option(option: &Token<'_>) -> ParseError {
    let message = if option.text == "hostvector" {
        "hostvector applies only to interrupt-controller (PIC) vdevs, not to vdev shmem".to_owned()
    } else {
        format!("unknown option; vdev shmem takes {OPTIONS}")
    };
    ParseError::new(option.line, option.text, message)
}
