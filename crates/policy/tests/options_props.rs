//! Property tests for the `vdev shmem` option parser: valid blocks survive render → parse, layout
//! (line breaks, indentation, comments) does not change the result, and no input panics.

use ivshm_policy::guest_shm::MAX_REGION_BYTES;
use ivshm_policy::options::{
    CreateOption, Interrupt, Location, LogDestination, LogOption, LogSeverity, PciAddress,
    VdevShmem,
};
use ivshm_policy::{Pattern, RegionName, Rule, RuleList, Subst, VmPolicy};
use proptest::prelude::*;

fn pattern() -> impl Strategy<Value = Pattern> {
    "[a-z0-9*?!^\\[\\]:.\\\\-]{1,10}"
        .prop_filter_map("not a writable pattern", |text| Pattern::new(&text).ok())
}

fn rule() -> impl Strategy<Value = Rule> {
    (any::<bool>(), pattern()).prop_map(|(allow, pattern)| {
        if allow {
            Rule::Allow(pattern)
        } else {
            Rule::Deny(pattern)
        }
    })
}

fn subst() -> impl Strategy<Value = Subst> {
    ("[a-z0-9]{0,4}", "[a-z0-9_+-]{1,8}")
        .prop_filter_map("not a usable subst", |(m, p)| Subst::new(&m, &p).ok())
}

fn region_name() -> impl Strategy<Value = RegionName> {
    "[a-zA-Z0-9_+-][a-zA-Z0-9_.+-]{0,14}"
        .prop_filter_map("not a legal name", |text| RegionName::new(&text).ok())
}

fn create() -> impl Strategy<Value = CreateOption> {
    (region_name(), 1..=MAX_REGION_BYTES, any::<bool>()).prop_map(|(name, size, subst_applies)| {
        CreateOption {
            name,
            size,
            subst_applies,
        }
    })
}

fn log_option() -> impl Strategy<Value = LogOption> {
    (
        prop::collection::vec(prop::sample::select(LogSeverity::ALL.to_vec()), 1..4),
        prop::sample::select(vec![
            LogDestination::Stdout,
            LogDestination::Stderr,
            LogDestination::Slog,
            LogDestination::None,
        ]),
    )
        .prop_map(|(severities, destination)| LogOption {
            severities,
            destination,
        })
}

/// A PCI location: at a function, or a bare `loc`.
fn pci_location() -> impl Strategy<Value = Location> {
    prop::option::of((any::<u8>(), 0u8..32, 0u8..8)).prop_map(|address| {
        Location::Pci(address.map(|(bus, device, function)| PciAddress {
            bus,
            device,
            function,
        }))
    })
}

fn interrupt() -> impl Strategy<Value = Interrupt> {
    (prop::option::of("[a-z][a-z0-9_]{0,6}"), any::<u32>())
        .prop_map(|(controller, line)| Interrupt { controller, line })
}

prop_compose! {
    /// A block the parser must accept: creates whose host names are illegal or repeated are
    /// dropped, `subst_applies` is false without a `subst` (and the creates it applies to come
    /// last), and a memory `loc` comes with `intr`.
    fn valid_block()(
        rules in prop::collection::vec(rule(), 0..6),
        subst in prop::option::of(subst()),
        creates in prop::collection::vec(create(), 0..5),
        loc_page in prop::option::of(0u64..(1 << 40)),
        pci in prop::option::of(pci_location()),
        log in prop::collection::vec(log_option(), 0..3),
        intr in prop::option::of(interrupt()),
        mmio_intr in interrupt(),
        sched in prop::option::of(1u8..=255),
        name in prop::option::of("[a-z][a-z0-9_]{0,8}"),
    ) -> VdevShmem {
        let mut hosts: Vec<String> = Vec::new();
        let mut kept = Vec::new();
        for mut create in creates {
            create.subst_applies &= subst.is_some();
            let host = create.host_name(subst.as_ref());
            if RegionName::new(&host).is_ok() && !hosts.contains(&host) {
                hosts.push(host);
                kept.push(create);
            }
        }
        // In a parsed block the creates before the subst line come first.
        kept.sort_by_key(|create| create.subst_applies);
        let loc = loc_page.map(|page| Location::Mem(page * 4096)).or(pci);
        let mmio = matches!(loc, Some(Location::Mem(_)));
        let intr = if mmio { intr.or(Some(mmio_intr)) } else { intr };
        VdevShmem {
            rules: RuleList::new(rules),
            subst,
            creates: kept,
            loc,
            intr,
            sched,
            name,
            log,
        }
    }
}

/// Rewrites the canonical rendering with a different layout: options joined by spaces or line
/// breaks, random indentation, blank lines and comments. Option/argument pairs stay together.
fn relayout(rendered: &str, choices: &[u8]) -> String {
    let mut out = String::new();
    let mut choice = choices.iter().copied().cycle();
    for line in rendered.lines() {
        let line = line.trim();
        match choice.next().unwrap_or(0) % 5 {
            0 => out.push(' '),
            1 => out.push_str("\n\t"),
            2 => out.push_str("  # a comment\n  "),
            3 => out.push_str("\n\n# vdev deny *\n"),
            _ => out.push('\n'),
        }
        out.push_str(line);
    }
    out.push('\n');
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn rendered_blocks_parse_back_to_the_same(block in valid_block()) {
        let rendered = block.to_string();
        let parsed = VdevShmem::parse(&rendered);
        prop_assert_eq!(parsed.as_ref(), Ok(&block), "rendered:\n{}", rendered);
        // Every valid block is also a valid policy.
        prop_assert!(VmPolicy::from_vdev(block).is_ok());
    }

    #[test]
    fn layout_does_not_matter(block in valid_block(), choices in prop::collection::vec(any::<u8>(), 1..16)) {
        let text = relayout(&block.to_string(), &choices);
        let parsed = VdevShmem::parse(&text);
        prop_assert_eq!(parsed.as_ref(), Ok(&block), "text:\n{}", text);
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = VdevShmem::parse(&text);
        let _ = VmPolicy::parse_qnx(&text);
    }

    #[test]
    fn option_soup_never_panics(words in prop::collection::vec(prop::sample::select(vec![
        "vdev", "shmem", "allow", "deny", "create", "subst", "loc", "intr", "sched", "name",
        "log", "error,warning", "stderr", "none", "mem:0x1000", "pci:0:5", "pci:1:2.3", "io:4",
        "a*", "[!", "\\", "foo,guest0", ",", "mem,0x1000", "mem,", ",4K", "0x1b000000", "gic:3",
        ":", "0", "255", "256", "#", "\n", "\r\n", "x,y,z", "99999999999999999999G", "0d", "0x",
    ]), 0..24)) {
        let text = words.join(" ");
        if let Ok(block) = VdevShmem::parse(&text) {
            // Whatever parses renders to something that parses to the same, and is a policy.
            prop_assert_eq!(VdevShmem::parse(&block.to_string()), Ok(block.clone()));
            prop_assert!(VmPolicy::from_vdev(block).is_ok());
        }
    }

    #[test]
    fn decide_never_panics(block in valid_block(), name in "\\PC{0,40}") {
        let policy = VmPolicy::from_vdev(block).unwrap();
        let decision = policy.decide(&name);
        prop_assert_eq!(decision.name_error.is_some(), decision.status == ivshm_policy::GuestShmStatus::IllegalName);
        let _ = policy.decide_factory_field(name.as_bytes());
    }
}
