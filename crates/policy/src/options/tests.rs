use super::*;
use crate::fnmatch::Pattern;
use crate::rules::Rule;

fn pattern(text: &str) -> Pattern {
    Pattern::new(text).unwrap()
}

fn name(text: &str) -> RegionName {
    RegionName::new(text).unwrap()
}

fn error(text: &str) -> ParseError {
    VdevShmem::parse(text).unwrap_err()
}

#[test]
fn seed_restriction_examples_parse_in_order() {
    let block = VdevShmem::parse("vdev shmem\n\tallow test*\n\tallow pluto\n").unwrap();
    assert_eq!(
        block.rules.rules(),
        &[Rule::Allow(pattern("test*")), Rule::Allow(pattern("pluto"))]
    );

    let block = VdevShmem::parse("vdev shmem\n\tdeny live*\n\tdeny pluto\n").unwrap();
    assert_eq!(
        block.rules.rules(),
        &[Rule::Deny(pattern("live*")), Rule::Deny(pattern("pluto"))]
    );

    let block = VdevShmem::parse("vdev shmem\n\tdeny pluto\n\tallow pluto*\n").unwrap();
    assert_eq!(
        block.rules.rules(),
        &[Rule::Deny(pattern("pluto")), Rule::Allow(pattern("pluto*"))]
    );
}

#[test]
fn seed_subst_examples_parse() {
    let vm0 =
        VdevShmem::parse("vdev shmem\n    subst foo,guest0\n    create foomem,0xf0000\n").unwrap();
    assert_eq!(vm0.subst, Some(Subst::parse("foo,guest0").unwrap()));
    assert_eq!(
        vm0.creates,
        vec![CreateOption {
            name: name("foomem"),
            size: 0xf0000,
            subst_applies: true
        }]
    );
    assert_eq!(vm0.creates[0].host_name(vm0.subst.as_ref()), "guest0mem");

    let vm0 = VdevShmem::parse("vdev shmem\n    subst ,guest0\n    create mem,0xf0000\n").unwrap();
    assert_eq!(vm0.creates[0].host_name(vm0.subst.as_ref()), "guest0mem");
}

#[test]
fn subst_affects_only_later_creates() {
    let block =
        VdevShmem::parse("create foomem,4096\nsubst foo,guest0\ncreate foobar,8K\n").unwrap();
    let hosts: Vec<String> = block
        .creates
        .iter()
        .map(|c| c.host_name(block.subst.as_ref()))
        .collect();
    assert_eq!(hosts, ["foomem", "guest0bar"]);
    assert!(!block.creates[0].subst_applies);
    assert!(block.creates[1].subst_applies);
}

#[test]
fn command_line_form_with_several_options_per_line() {
    let block =
        VdevShmem::parse("vdev shmem allow test* deny pluto sched 21 loc 0x1b000000 intr gic:39")
            .unwrap();
    assert_eq!(block.rules.rules().len(), 2);
    assert_eq!(block.sched, Some(21));
    assert_eq!(block.loc, Some(Location::Mem(0x1b00_0000)));
    assert_eq!(
        block.intr,
        Some(Interrupt {
            controller: Some("gic".into()),
            line: 39
        })
    );
    assert!(block.is_mmio());
}

#[test]
fn header_is_optional_and_comments_are_ignored() {
    let text = "# shared memory for the cluster\n\n  allow cluster*   # the cluster regions\n\
                #deny everything\n  name shmem_0\n";
    let block = VdevShmem::parse(text).unwrap();
    assert_eq!(block.rules.rules(), &[Rule::Allow(pattern("cluster*"))]);
    assert_eq!(block.name.as_deref(), Some("shmem_0"));
    assert!(!block.is_mmio());
    // `#` starts a comment anywhere, even inside a word.
    let block = VdevShmem::parse("allow a#b").unwrap();
    assert_eq!(block.rules.rules(), &[Rule::Allow(pattern("a"))]);
    assert_eq!(VdevShmem::parse("").unwrap(), VdevShmem::default());
    assert_eq!(
        VdevShmem::parse("vdev shmem").unwrap(),
        VdevShmem::default()
    );
    assert_eq!(
        VdevShmem::parse("vdev vdev-shmem.so\r\nallow a*\r\n")
            .unwrap()
            .rules
            .rules()
            .len(),
        1
    );
}

#[test]
fn sizes_in_qnx_notations() {
    let block = VdevShmem::parse(
        "create a,983040\ncreate b,0xf0000\ncreate c,960K\ncreate d,1M\ncreate e,0d4096\ncreate f,1g",
    )
    .unwrap();
    let sizes: Vec<u64> = block.creates.iter().map(|c| c.size).collect();
    assert_eq!(sizes, [983040, 0xf0000, 960 << 10, 1 << 20, 4096, 1 << 30]);
}

#[test]
fn repeated_loc_intr_sched_name_keep_the_last() {
    let block = VdevShmem::parse(
        "sched 10 sched 12\nloc 0x1000 loc 0x2000 intr 5 intr gic:6\nname a name b",
    )
    .unwrap();
    assert_eq!(block.sched, Some(12));
    assert_eq!(block.loc, Some(Location::Mem(0x2000)));
    assert_eq!(block.intr.unwrap().line, 6);
    assert_eq!(block.name.as_deref(), Some("b"));
}

#[test]
fn errors_name_line_option_and_reason() {
    assert_eq!(
        error("vdev shmem\n  allow a*\n  permit b\n"),
        ParseError {
            line: 3,
            option: "permit".into(),
            message: "unknown option; vdev shmem takes allow, deny, create, subst, loc, intr, \
                      sched, name, log"
                .into()
        }
    );
    let e = error("allow\ndeny b");
    assert_eq!((e.line, e.option.as_str()), (1, "allow"));
    assert!(e.message.contains("missing argument"), "{e}");

    let e = error("vdev shmem\nsubst foo,guest0\n\nsubst ,guest1\n");
    assert_eq!((e.line, e.option.as_str()), (4, "subst"));
    assert!(e.message.contains("only one subst"), "{e}");
    assert!(e.message.contains("line 2"), "{e}");

    let e = error("loc 0x1b000000\nsched 3");
    assert_eq!((e.line, e.option.as_str()), (1, "loc"));
    assert!(e.message.contains("intr"), "{e}");

    assert_eq!(
        error("x\ny\nallow a b").to_string(),
        "line 1: x: unknown option; vdev shmem takes allow, deny, create, subst, loc, intr, \
         sched, name, log"
    );
}

#[test]
fn create_errors() {
    let e = error("\ncreate foomem");
    assert_eq!((e.line, e.option.as_str()), (2, "create"));
    assert!(e.message.contains("NAME,SIZE"), "{e}");

    let e = error("create ../etc,4096");
    assert!(e.message.contains("starts with '.'"), "{e}");

    let e = error("create a/b,4096");
    assert!(e.message.contains("'/'"), "{e}");

    let e = error("create mem,0");
    assert!(e.message.contains("at least one byte"), "{e}");

    let e = error("create mem,12Q");
    assert!(e.message.starts_with("size:"), "{e}");

    let e = error("create mem,0x1000000000000");
    assert!(e.message.contains("too large"), "{e}");

    let long = "m".repeat(26);
    let e = error(&format!("subst ,guest0\ncreate {long},4K"));
    assert_eq!((e.line, e.option.as_str()), (2, "create"));
    assert!(e.message.contains("guest0mmmm"), "{e}");
    assert!(e.message.contains("32 bytes long"), "{e}");

    let e = error("create a,4K\nsubst x,y\ncreate b,4K\ncreate a,8K");
    assert_eq!((e.line, e.option.as_str()), (4, "create"));
    assert!(e.message.contains("already created on line 1"), "{e}");

    // Different guest names that substitute to the same host name collide too.
    let e = error("create guest0mem,4K\nsubst foo,guest0\ncreate foomem,4K");
    assert_eq!(e.line, 3);
}

#[test]
fn argument_errors() {
    for (text, option, needle) in [
        ("allow #b", "allow", "missing argument"),
        ("deny a\\", "deny", "backslash"),
        ("subst guest0", "subst", "no comma"),
        ("subst foo,", "subst", "prefix"),
        ("loc 0x1b000010 intr 3", "loc", "aligned"),
        ("loc nowhere intr 3", "loc", "not a number"),
        ("loc mem:0x1000,0x1000 intr 3", "loc", "only its address"),
        ("loc io:0x2f8", "loc", "I/O ports"),
        ("loc pci:0x1c05/0x0001", "loc", "pass through"),
        ("loc pci:0:32", "loc", "device 0..=31"),
        ("log error", "log", "severity list and a destination"),
        ("log error\nstderr", "log", "same line"),
        ("log loud stderr", "log", "unknown severity"),
        ("log error file", "log", "unknown destination"),
        ("hostvector 32", "hostvector", "interrupt-controller"),
        ("intr gic:x", "intr", "interrupt line"),
        ("sched 0", "sched", "1..=255"),
        ("sched 256", "sched", "too large"),
        ("sched high", "sched", "not a number"),
        ("name a/b", "name", "'/'"),
    ] {
        let e = error(text);
        assert_eq!(e.option, option, "{text}: {e}");
        assert!(e.message.contains(needle), "{text}: {e}");
    }
}

#[test]
fn vdev_lines() {
    let e = error("vdev\nallow a");
    assert_eq!((e.line, e.option.as_str()), (1, "vdev"));
    let e = error("vdev virtio-net");
    assert!(e.message.contains("vdev virtio-net"), "{e}");
    let e = error("vdev shmem\nallow a\nvdev shmem\n");
    assert_eq!((e.line, e.option.as_str()), (3, "vdev"));
    // `vdev` is only a header as the very first word.
    let e = error("allow a vdev shmem");
    assert_eq!(e.option, "vdev");
}

#[test]
fn render_is_canonical_and_parses_back() {
    let text = "vdev shmem\n deny pluto allow pluto*\n create early,4096\n subst foo,guest0\n \
                create foomem,0xf0000\n intr gic:39\n loc 0x1b000000\n sched 21\n name shm0\n";
    let block = VdevShmem::parse(text).unwrap();
    let rendered = block.to_string();
    assert_eq!(
        rendered,
        "vdev shmem\n    deny pluto\n    allow pluto*\n    create early,0x1000\n    \
         subst foo,guest0\n    create foomem,0xf0000\n    loc mem:0x1b000000\n    intr gic:39\n    \
         sched 21\n    name shm0\n"
    );
    assert_eq!(VdevShmem::parse(&rendered).unwrap(), block);
}

/// QNX's `loc` forms: an address or `mem:ADDRESS` (MMIO mode, needs `intr`), `pci:BUS:DEV[.FUNC]`
/// and a bare `loc` (PCI mode, `intr` optional: the line INTA# is routed to).
#[test]
fn loc_forms() {
    let mmio = VdevShmem::parse("loc mem:0x1b000000 intr gic:39").unwrap();
    assert_eq!(mmio.loc, Some(Location::Mem(0x1b00_0000)));
    assert!(mmio.is_mmio());
    let e = error("loc mem:0x1b000000");
    assert!(e.message.contains("needs an intr"), "{e}");

    let pci = VdevShmem::parse("loc pci:0:5.1").unwrap();
    assert_eq!(
        pci.loc,
        Some(Location::Pci(Some(PciAddress {
            bus: 0,
            device: 5,
            function: 1
        })))
    );
    assert!(!pci.is_mmio());
    let pci_intr = VdevShmem::parse("loc pci:0:5 intr ioapic:11").unwrap();
    assert!(!pci_intr.is_mmio());
    assert_eq!(pci_intr.intr.unwrap().line, 11);

    // A bare `loc`: at the end of a line, or followed by another option on its line.
    for text in [
        "vdev shmem\n  loc\n  allow a*",
        "loc allow a*",
        "loc",
        "loc # PCI\n",
    ] {
        let block = VdevShmem::parse(text).unwrap();
        assert_eq!(block.loc, Some(Location::Pci(None)), "{text:?}");
        assert!(!block.is_mmio());
    }
    // A later `loc` replaces an earlier one, the MMIO requirement with it.
    let block = VdevShmem::parse("loc 0x1000\nloc pci:0:3").unwrap();
    assert_eq!(
        block.loc.and_then(|l| l.pci_address()).map(|a| a.device),
        Some(3)
    );
    let e = error("loc pci:0:3\nloc 0x1000");
    assert_eq!((e.line, e.option.as_str()), (2, "loc"));
    assert_eq!(
        VdevShmem::parse("loc allow a*").unwrap().to_string(),
        "vdev shmem\n    allow a*\n    loc\n"
    );
}

/// The common option `log FILTERS DESTINATION` takes two words and may be repeated.
#[test]
fn log_options() {
    let block = VdevShmem::parse("log fatal,error stderr\nlog warning,info slog allow a*").unwrap();
    assert_eq!(block.log.len(), 2);
    assert_eq!(block.log[0].to_string(), "fatal,error stderr");
    assert_eq!(block.log[1].destination, LogDestination::Slog);
    assert_eq!(block.rules.rules().len(), 1);
    let rendered = block.to_string();
    assert!(
        rendered.ends_with("    log fatal,error stderr\n    log warning,info slog\n"),
        "{rendered}"
    );
    assert_eq!(VdevShmem::parse(&rendered).unwrap(), block);
}
