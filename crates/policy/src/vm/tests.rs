use super::*;
use crate::fnmatch::Pattern;
use crate::rules::{ImplicitRule, Rule, RuleMatch};

fn policy(text: &str) -> VmPolicy {
    VmPolicy::parse_qnx(text).unwrap()
}

fn region(name: &str) -> RegionName {
    RegionName::new(name).unwrap()
}

fn status(policy: &VmPolicy, name: &str) -> GuestShmStatus {
    policy.decide(name).status
}

#[test]
fn seed_examples_decide_as_documented() {
    let first = policy("vdev shmem\n\tallow test*\n\tallow pluto\n");
    assert_eq!(status(&first, "testing"), GuestShmStatus::Ok);
    assert_eq!(status(&first, "pluto"), GuestShmStatus::Ok);
    assert_eq!(status(&first, "mars"), GuestShmStatus::NoPermission);

    let second = policy("vdev shmem\n\tdeny live*\n\tdeny pluto\n");
    assert_eq!(status(&second, "livefeed"), GuestShmStatus::NoPermission);
    assert_eq!(status(&second, "pluto"), GuestShmStatus::NoPermission);
    assert_eq!(status(&second, "mars"), GuestShmStatus::Ok);

    let third = policy("vdev shmem\n\tdeny pluto\n\tallow pluto*\n");
    assert_eq!(status(&third, "pluto"), GuestShmStatus::NoPermission);
    assert_eq!(status(&third, "plutoplanet"), GuestShmStatus::Ok);
    assert_eq!(status(&third, "mars"), GuestShmStatus::NoPermission);
}

#[test]
fn decision_reports_host_name_and_rule() {
    let vm0 = policy("subst foo,guest0\nallow foo*\n");
    let decision = vm0.decide("foomem");
    assert_eq!(decision.guest_name, "foomem");
    assert_eq!(decision.host_name, Some(region("guest0mem")));
    assert_eq!(
        decision.rule,
        Some(RuleMatch::Explicit {
            index: 0,
            rule: Rule::Allow(Pattern::new("foo*").unwrap())
        })
    );
    assert_eq!(decision.status, GuestShmStatus::Ok);
    assert!(decision.is_allowed());
    assert_eq!(decision.name_error, None);
    assert_eq!(
        decision.to_string(),
        "foomem -> guest0mem: GSS_OK (rule 1: allow foo*)"
    );
}

#[test]
fn patterns_see_the_guest_name_before_subst() {
    // `allow foo*` is written in the guest's namespace ...
    let vm1 = policy("subst foo,guest1\nallow foo*\n");
    assert_eq!(status(&vm1, "foomem"), GuestShmStatus::Ok);
    // ... and confines the guest: VM 0's host name is not reachable from VM 1.
    let decision = vm1.decide("guest0mem");
    assert_eq!(decision.status, GuestShmStatus::NoPermission);
    assert_eq!(decision.host_name, Some(region("guest0mem")));
    assert_eq!(
        decision.rule,
        Some(RuleMatch::Implicit(ImplicitRule::DenyAll))
    );
    assert_eq!(
        decision.to_string(),
        "guest0mem -> guest0mem: GSS_NO_PERMISSION (implicit deny * (allow rules are present))"
    );

    // A pattern spelled in host terms does not match the guest's name.
    let prefixed = policy("subst ,guest0\ndeny guest0secret\n");
    let decision = prefixed.decide("secret");
    assert_eq!(decision.status, GuestShmStatus::Ok);
    assert_eq!(decision.host_name, Some(region("guest0secret")));
}

#[test]
fn illegal_guest_names() {
    let open = VmPolicy::default();
    for name in [
        "",
        "a/b",
        "../x",
        ".hidden",
        "a..b",
        "sp ace",
        &"x".repeat(32),
    ] {
        let decision = open.decide(name);
        assert_eq!(decision.status, GuestShmStatus::IllegalName, "{name:?}");
        assert_eq!(decision.rule, None);
        assert_eq!(decision.host_name, None);
        assert!(matches!(decision.name_error, Some(IllegalName::Guest(_))));
    }
    assert_eq!(
        open.decide("a/b").to_string(),
        "a/b: GSS_ILLEGAL_NAME (guest name: region name contains '/' at byte 1; allowed are \
         A-Z a-z 0-9 _ . + -)"
    );
}

#[test]
fn host_name_too_long_after_subst_is_illegal() {
    let vm = policy("subst ,guest0\n");
    let name = "n".repeat(25); // 6 + 25 = 31 bytes: fits
    assert_eq!(status(&vm, &name), GuestShmStatus::Ok);
    let name = "n".repeat(26); // 32 bytes: too long
    let decision = vm.decide(&name);
    assert_eq!(decision.status, GuestShmStatus::IllegalName);
    assert_eq!(decision.host_name, None);
    // The rules were still consulted, for reporting.
    assert_eq!(
        decision.rule,
        Some(RuleMatch::Implicit(ImplicitRule::AllowAll))
    );
    assert_eq!(
        decision.name_error,
        Some(IllegalName::Host {
            host_name: format!("guest0{name}"),
            error: NameError::TooLong { len: 32 }
        })
    );
    // Illegal wins over a denial.
    let denying = policy("subst ,guest0\ndeny n*\n");
    assert_eq!(status(&denying, &name), GuestShmStatus::IllegalName);
}

#[test]
fn substitution_can_create_dot_dot() {
    let vm = policy("subst foo,.x\n");
    let decision = vm.decide("a.foo");
    assert_eq!(decision.status, GuestShmStatus::IllegalName);
    assert!(matches!(
        decision.name_error,
        Some(IllegalName::Host {
            error: NameError::DotDot,
            ..
        })
    ));
}

#[test]
fn factory_field_decisions() {
    let vm = policy("allow test*");
    let mut field = [0u8; 32];
    field[..7].copy_from_slice(b"testing");
    assert_eq!(vm.decide_factory_field(&field).status, GuestShmStatus::Ok);

    let decision = vm.decide_factory_field(&[b'a'; 32]);
    assert_eq!(decision.status, GuestShmStatus::IllegalName);
    assert_eq!(decision.guest_name, "a".repeat(32));
    assert_eq!(
        decision.name_error,
        Some(IllegalName::Guest(NameError::Unterminated))
    );

    let decision = vm.decide_factory_field(b"t\xffst\0");
    assert_eq!(decision.status, GuestShmStatus::IllegalName);
    assert_eq!(decision.guest_name, "t\u{fffd}st");
}

#[test]
fn pre_created_applies_subst_only_after_it() {
    let vm = policy(
        "vdev shmem\n create early,4K\n subst foo,guest0\n create foomem,0xf0000\n create bar,1M\n",
    );
    assert_eq!(
        vm.pre_created(),
        vec![
            (region("early"), 4096),
            (region("guest0mem"), 0xf0000),
            (region("bar"), 1 << 20),
        ]
    );
    assert_eq!(vm.pre_created_regions()[1].name, region("foomem"));
    // The guest's later `foomem` attaches to the pre-created host region.
    assert_eq!(vm.decide("foomem").host_name, Some(region("guest0mem")));
}

#[test]
fn seed_vm_configurations() {
    let vm0 = policy("vdev shmem\n    subst foo,guest0\n    create foomem,0xf0000\n");
    let vm1 = policy("vdev shmem\n    subst foo,guest1\n");
    assert_eq!(vm0.pre_created(), vec![(region("guest0mem"), 0xf0000)]);
    assert!(vm1.pre_created().is_empty());
    assert_eq!(vm0.decide("foomem").host_name, Some(region("guest0mem")));
    assert_eq!(vm1.decide("foomem").host_name, Some(region("guest1mem")));

    let vm0 = policy("vdev shmem\n    subst ,guest0\n    create mem,0xf0000\n");
    assert_eq!(vm0.pre_created(), vec![(region("guest0mem"), 0xf0000)]);
    assert_eq!(vm0.decide("mem").host_name, Some(region("guest0mem")));
}

#[test]
fn placement_options_are_carried() {
    let vm = policy("loc 0x1b000000 intr gic:39 sched 21 log error,warning stderr");
    assert_eq!(vm.loc(), Some(&Location::Mem(0x1b00_0000)));
    assert_eq!(vm.mmio_loc(), Some(0x1b00_0000));
    assert_eq!(vm.log()[0].to_string(), "error,warning stderr");
    assert_eq!(
        vm.intr().map(ToString::to_string).as_deref(),
        Some("gic:39")
    );
    assert_eq!(vm.sched(), Some(21));
    assert!(vm.is_mmio());
    assert!(!VmPolicy::default().is_mmio());
}

/// PCI mode takes `intr` (the line INTA# is routed to), `loc pci:BUS:DEV[.FUNC]` or a bare
/// `loc`; none of them is MMIO mode.
#[test]
fn pci_mode_options_are_carried() {
    let vm = policy("intr ioapic:5");
    assert_eq!(vm.intr().unwrap().line, 5);
    assert!(!vm.is_mmio());
    assert_eq!(vm.mmio_loc(), None);
    let vm = policy("loc pci:0:7 intr 11");
    assert_eq!(
        vm.loc().and_then(Location::pci_address).map(|a| a.device),
        Some(7)
    );
    assert!(!vm.is_mmio());
    let vm = policy(
        "vdev shmem
  loc
  allow a*",
    );
    assert_eq!(vm.loc(), Some(&Location::Pci(None)));
    assert!(!vm.is_mmio());
}

#[test]
fn toml_form() {
    let vm: VmPolicy = toml::from_str(
        r#"
        rules = ["deny pluto", "allow foo*", "allow pluto*"]
        subst = "foo,guest0"
        create = [{ name = "foomem", size = "0xf0000" }, { name = "log", size = 65536 }]
        loc = 0x1b000000
        intr = "gic:39"
        sched = 21
        "#,
    )
    .unwrap();
    // rules keep their order
    assert_eq!(
        vm.rules()
            .rules()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["deny pluto", "allow foo*", "allow pluto*"]
    );
    assert_eq!(status(&vm, "pluto"), GuestShmStatus::NoPermission);
    assert_eq!(status(&vm, "plutoplanet"), GuestShmStatus::Ok);
    assert_eq!(status(&vm, "mars"), GuestShmStatus::NoPermission);
    // subst applies to every create in the TOML form
    assert_eq!(
        vm.pre_created(),
        vec![(region("guest0mem"), 0xf0000), (region("log"), 65536)]
    );
    assert_eq!(vm.mmio_loc(), Some(0x1b00_0000));
    assert_eq!(vm.intr().unwrap().line, 39);
    assert_eq!(vm.sched(), Some(21));

    let minimal: VmPolicy = toml::from_str("").unwrap();
    assert_eq!(minimal, VmPolicy::default());
    let string_loc: VmPolicy = toml::from_str("loc = \"64K\"\nintr = 5").unwrap();
    assert_eq!(string_loc.mmio_loc(), Some(0x10000));
    let mem_loc: VmPolicy = toml::from_str("loc = \"mem:0x1b000000\"\nintr = 5").unwrap();
    assert_eq!(mem_loc.mmio_loc(), Some(0x1b00_0000));
    let pci: VmPolicy =
        toml::from_str("loc = \"pci:0:5.0\"\nintr = 9\nlog = [\"info slog\"]").unwrap();
    assert!(!pci.is_mmio());
    assert_eq!(pci.log().len(), 1);
}

#[test]
fn toml_errors() {
    let err = |text: &str| match toml::from_str::<VmPolicy>(text) {
        Ok(policy) => panic!("{text:?} was accepted: {policy:?}"),
        Err(e) => e.to_string(),
    };
    assert!(err("rules = [\"allow a\"]\npermit = [\"b\"]").contains("unknown field `permit`"));
    assert!(err("allow = [\"a\"]").contains("unknown field `allow`"));
    assert!(err("rules = [\"permit a\"]").contains("unknown keyword"));
    assert!(err("rules = [\"allow\"]").contains("expected"));
    assert!(err("qnx = \"allow a\"\nsched = 3").contains("excludes"));
    assert!(err("qnx = \"allow a\\nbogus 1\"").contains("line 2: bogus"));
    assert!(err("create = [{ name = \"a\", size = 1, color = 2 }]").contains("unknown field"));
    assert!(err("rules = [\"allow a b\"]").contains("cannot appear"));
    assert!(err("create = [{ name = \"../x\", size = 1 }]").contains("starts with '.'"));
    assert!(err("create = [{ name = \"x\", size = \"lots\" }]").contains("invalid size \"lots\""));
    assert!(err("create = [{ name = \"x\", size = 0 }]").contains("size 0"));
    assert!(err("create = [{ name = \"x\", size = -1 }]").contains("negative"));
    assert!(err("create = [{ name = \"x\", size = 1.5 }]").contains("a size in bytes"));
    assert!(err("loc = true").contains("a location: an address"));
    assert!(err("subst = \"guest0\"").contains("no comma"));
    assert!(err("loc = 4096").contains("loc needs intr"));
    assert!(err("loc = 4097\nintr = 1").contains("not aligned"));
    assert!(err("sched = 0").contains("1..=255"));
    assert!(err("sched = 256").contains("sched"));
    assert!(err("subst = \"foo,bar\"\ncreate = [{ name = \"foomem\", size = 1 }, { name = \"barmem\", size = 1 }]")
        .contains("created twice"));
    assert!(err(&format!(
        "subst = \",guest0\"\ncreate = [{{ name = \"{}\", size = 1 }}]",
        "m".repeat(26)
    ))
    .contains("host name would be"));
}

#[test]
fn from_vdev_rechecks_hand_built_blocks() {
    let block = VdevShmem {
        loc: Some(Location::Mem(0x1000)),
        ..VdevShmem::default()
    };
    assert_eq!(
        VmPolicy::from_vdev(block),
        Err(VmPolicyError::LocWithoutIntr)
    );
    let block = VdevShmem {
        creates: vec![CreateOption {
            name: region("a"),
            size: 0,
            subst_applies: false,
        }],
        ..VdevShmem::default()
    };
    assert!(matches!(
        VmPolicy::try_from(block),
        Err(VmPolicyError::BadCreateSize { size: 0, .. })
    ));
    assert!(matches!(
        VmPolicy::parse_qnx("bogus 1"),
        Err(VmPolicyError::Parse(ParseError { line: 1, .. }))
    ));
}

#[test]
fn module_doc_toml_example_parses() {
    let vm: VmPolicy = toml::from_str(
        r#"
rules = ["deny foo-secret", "allow foo*", "allow test*"]   # in order, first match decides
subst = "foo,guest0"              # [match],prefix
create = [{ name = "foomem", size = "0xf0000" }, { name = "foolog", size = 65536 }]
loc = 0x1b000000                  # integer or string such as "0x1b000000"
intr = "gic:39"                   # or an integer line number
sched = 21
"#,
    )
    .unwrap();
    assert_eq!(status(&vm, "foo-secret"), GuestShmStatus::NoPermission);
    assert_eq!(status(&vm, "foo-public"), GuestShmStatus::Ok);
    assert_eq!(status(&vm, "testing"), GuestShmStatus::Ok);
    assert_eq!(
        vm.pre_created(),
        vec![(region("guest0mem"), 0xf0000), (region("guest0log"), 65536)]
    );
    assert!(vm.is_mmio());
}

#[test]
fn toml_rules_keep_order_and_qnx_semantics() {
    let toml_status =
        |text: &str, name: &str| status(&toml::from_str::<VmPolicy>(text).unwrap(), name);
    // The seed's three examples, in TOML.
    let first = r#"rules = ["allow test*", "allow pluto"]"#;
    assert_eq!(toml_status(first, "testing"), GuestShmStatus::Ok);
    assert_eq!(toml_status(first, "pluto"), GuestShmStatus::Ok);
    assert_eq!(toml_status(first, "mars"), GuestShmStatus::NoPermission);
    let second = r#"rules = ["deny live*", "deny pluto"]"#;
    assert_eq!(
        toml_status(second, "livefeed"),
        GuestShmStatus::NoPermission
    );
    assert_eq!(toml_status(second, "pluto"), GuestShmStatus::NoPermission);
    assert_eq!(toml_status(second, "mars"), GuestShmStatus::Ok);
    let third = r#"rules = ["deny pluto", "allow pluto*"]"#;
    assert_eq!(toml_status(third, "pluto"), GuestShmStatus::NoPermission);
    assert_eq!(toml_status(third, "plutoplanet"), GuestShmStatus::Ok);
    assert_eq!(toml_status(third, "mars"), GuestShmStatus::NoPermission);
    // Order matters: an allow before a deny wins.
    let reversed = r#"rules = ["allow pluto*", "deny pluto"]"#;
    assert_eq!(toml_status(reversed, "pluto"), GuestShmStatus::Ok);
}

#[test]
fn toml_qnx_block_is_the_qnx_policy() {
    let block =
        "\n    allow test*\n    create early,4K\n    subst ,guest0\n    create mem,0xf0000\n";
    let from_toml: VmPolicy = toml::from_str(&format!("qnx = \"\"\"{block}\"\"\"")).unwrap();
    assert_eq!(from_toml, policy(block));
    // subst applies only to the create after it, as on QNX.
    assert_eq!(
        from_toml.pre_created(),
        vec![(region("early"), 4096), (region("guest0mem"), 0xf0000)]
    );
}
