//! The tokenizer and parser behind [`VdevShmem::parse`](super::VdevShmem::parse).

use crate::fnmatch::Pattern;
use crate::guest_shm::{MAX_REGION_BYTES, PAGE_SIZE};
use crate::name::RegionName;
use crate::number::{parse_number, parse_size};
use crate::rules::Rule;
use crate::subst::Subst;

use super::{CreateOption, Interrupt, ParseError, VdevShmem};

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

const OPTIONS: &str = "allow, deny, create, subst, loc, intr, sched, name";

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
