use super::*;
use crate::ids::{IdPolicy, IdReuse};
use ivshm_policy::GuestShmStatus;

fn parse_ok(text: &str) -> NamedConfig {
    parse(text, Path::new("test.toml")).unwrap().named.unwrap()
}

fn parse_err(text: &str) -> FileConfigError {
    parse(text, Path::new("test.toml")).unwrap_err()
}

#[test]
fn full_example_parses() {
    let named = parse_ok(
        r#"
root = "/tmp/ivshm-root"
control_mode = "0600"

[defaults]
vectors = 8
pow2 = "off"
id_reuse = "immediate"
dir_mode = 0o750
socket_mode = "0660"

[[region]]
name = "shared"
size = "1M"
peer_limit = 2
id_policy = "increasing"
id_reuse = "safe"

[vm.vm0]
rules = ["deny pluto", "allow pluto*"]
subst = ",guest0"
create = [{ name = "mem", size = "0xf0000" }]

[vm.vm1]
qnx = """
    subst ,guest1
    create mem,0xf0000
"""
"#,
    );
    assert_eq!(named.root, PathBuf::from("/tmp/ivshm-root"));
    assert_eq!(
        named.control.as_ref().unwrap().path,
        PathBuf::from("/tmp/ivshm-root/control.sock")
    );
    assert_eq!(named.defaults.vectors, 8);
    assert_eq!(named.defaults.peer_limit, 16);
    assert_eq!(named.defaults.id_policy, IdPolicy::LowestFree);
    assert_eq!(named.defaults.id_reuse, IdReuse::Immediate);
    assert_eq!(named.defaults.pow2, Pow2Policy::Off);
    assert_eq!(named.directory.dir_mode, 0o750);
    assert_eq!(named.directory.socket_mode, 0o660);
    assert_eq!(named.regions.len(), 1);
    assert_eq!(named.regions[0].size, 1 << 20);
    assert_eq!(named.regions[0].peer_limit, 2);
    assert_eq!(named.regions[0].vectors, 8);
    assert_eq!(named.regions[0].id_policy, IdPolicy::Increasing);
    assert_eq!(named.regions[0].id_reuse, IdReuse::Safe);
    let vm0 = &named.vms[0];
    assert_eq!(vm0.name.as_str(), "vm0");
    assert_eq!(
        vm0.policy.decide("pluto").status,
        GuestShmStatus::NoPermission
    );
    assert_eq!(vm0.policy.decide("plutoplanet").status, GuestShmStatus::Ok);
    assert_eq!(vm0.policy.pre_created()[0].0.as_str(), "guest0mem");
    let vm1 = &named.vms[1];
    assert_eq!(vm1.policy.pre_created()[0].0.as_str(), "guest1mem");
    assert_eq!(vm1.policy.pre_created()[0].1, 0xf0000);
    assert_eq!(named.source, Some(PathBuf::from("test.toml")));
}

#[test]
fn toml_syntax_errors_name_file_and_line() {
    let e = parse_err("root = \"/tmp\"\n\n[defaults]\nvectors = \n");
    assert_eq!(e.path, PathBuf::from("test.toml"));
    assert_eq!(e.line, Some(4));
    let e = parse_err("root = \"/tmp\"\n[defaults]\ncolour = 1\n");
    assert_eq!(e.line, Some(3));
    assert!(e.message.contains("unknown field"), "{e}");
    assert!(e.to_string().starts_with("test.toml:3: "), "{e}");
}

#[test]
fn qnx_block_errors_are_reported_at_their_file_line() {
    let e = parse_err(
        "root = \"/tmp\"\n\n[vm.q]\nqnx = \"\"\"\n    allow test*\n    bogus 1\n\"\"\"\n",
    );
    assert_eq!(e.line, Some(6), "{e}");
    assert_eq!(e.option.as_deref(), Some("vm.q.qnx: bogus"));
    // Without a newline after the opening quotes the block starts on the quotes' line.
    let e = parse_err("[vm.q]\nqnx = \"\"\"allow a\ncreate x\n\"\"\"\n");
    assert_eq!(e.line, Some(3), "{e}");
    let e = parse_err("[vm.q]\nqnx = \"allow a\"\nsched = 3\n");
    assert!(e.message.contains("excludes"), "{e}");
}

/// Every kind of mistake is reported with the file, the line it is on and the option
/// (`table.key`), as `FILE:LINE: OPTION: message`.
#[test]
fn every_error_names_file_line_and_option() {
    let cases: &[(&str, usize, &str, &str)] = &[
        // TOML-level: syntax, unknown keys, wrong types (the option is read off the text).
        ("[defaults]\nvectors = \n", 2, "defaults.vectors", "string values"),
        ("[defaults]\ncolour = 1\n", 2, "defaults.colour", "unknown field"),
        ("[vm.a]\n[vm.a.x]\n", 2, "vm.a.x", "unknown field `x`"),
        ("control_mode = \"0999\"\n", 1, "control_mode", "octal file mode"),
        ("[defaults]\ndir_mode = 0o17777\n", 2, "defaults.dir_mode", "not a file mode"),
        ("[defaults]\nid_policy = \"x\"\n", 2, "defaults.id_policy", "lowest-free"),
        ("[defaults]\nid_reuse = \"never\"\n", 2, "defaults.id_reuse", "\"safe\" or \"immediate\""),
        (
            "[[region]]\nname = \"a\"\nsize = 1\nid_reuse = 1\n",
            4,
            "region[0].id_reuse",
            "string",
        ),
        ("[defaults]\npow2 = \"x\"\n", 2, "defaults.pow2", "round-up"),
        ("[defaults]\nmax_size = \"1Q\"\n", 2, "defaults.max_size", "unknown suffix"),
        ("[[region]]\nname = \"a\"\nsize = -1\n", 3, "region[0].size", "negative"),
        ("[[region]]\nname = \"a\"\nsize = true\n", 3, "region[0].size", "a size in bytes"),
        (
            "[[region]]\nname = \"a\"\nsize = 1\n[[region]]\nname = \"b\"\nsize = \"x\"\n",
            6,
            "region[1].size",
            "invalid size",
        ),
        ("[vm.a]\nrules = \"allow x\"\n", 2, "vm.a.rules", "expected a sequence"),
        ("[vm.a]\nintr = []\n", 2, "vm.a.intr", "expected an interrupt"),
        // Checked after reading: the value's own line.
        ("max_queued_messages = 0\n", 1, "max_queued_messages", "at least 1"),
        ("\n[defaults]\nvectors = 65\n", 3, "defaults.vectors", "at most 64"),
        ("[defaults]\npeer_limit = 0\n", 2, "defaults.peer_limit", "peer limit 0"),
        ("[defaults]\nbackend = \"dir\"\n", 2, "defaults.backend", "needs dir"),
        ("[defaults]\nbackend = \"disk\"\n", 2, "defaults.backend", "unknown backend"),
        ("[defaults]\ngroup = \"\"\n", 2, "defaults.group", "empty group"),
        ("control_group = \"\"\n", 1, "control_group", "empty group"),
        ("[[region]]\nname = \"../a\"\nsize = 1\n", 2, "region[0].name", "starts with '.'"),
        ("[[region]]\nname = \"a\"\nsize = 0\n", 3, "region[0].size", "greater than zero"),
        ("[[region]]\nname = \"a\"\nsize = 1\nvectors = 65\n", 4, "region[0].vectors", "64"),
        ("[[region]]\nname = \"a\"\nsize = 1\npeer_limit = 0\n", 4, "region[0].peer_limit", "0"),
        ("[[region]]\nname = \"a\"\nsize = 1\nbackend = \"dir\"\n", 4, "region[0].backend", "dir"),
        (
            "[[region]]\nname = \"a\"\nsize = 1\n[[region]]\nname = \"a\"\nsize = 2\n",
            5,
            "region[1].name",
            "configured twice (first as region[0])",
        ),
        ("[vm.\"a/b\"]\n", 1, "vm.a/b", "VM name"),
        ("root = \"/r\"\n[vm.\"control.sock\"]\n", 2, "vm.control.sock", "control socket"),
        ("[vm.a]\ngroup = \"\"\n", 2, "vm.a.group", "empty group"),
        ("[vm.a]\nsubst = \",g\"\nrules = [\"allow x\", \"permit y\"]\n", 3, "vm.a.rules", "unknown keyword"),
        ("[vm.a]\nsubst = \"x\"\n", 2, "vm.a.subst", "no comma"),
        // A pattern pasted from a shell command line (`allow test\*`) can never match.
        (
            "[vm.a]\nrules = ['allow test\\*']\n",
            2,
            "vm.a.rules",
            "write the wildcard bare",
        ),
        (
            "[vm.a]\nqnx = '''\nallow pluto\nallow test\\*\n'''\n",
            4,
            "vm.a.qnx: allow",
            "write the wildcard bare",
        ),
        ("[vm.a]\nloc = 4096\n", 2, "vm.a.loc", "loc needs intr"),
        ("[vm.a]\nintr = 3\nloc = 4097\n", 3, "vm.a.loc", "not aligned"),
        ("[vm.a]\nsched = 0\n", 2, "vm.a.sched", "1..=255"),
        ("[vm.a]\nloc = \"io:0x2f8\"\n", 2, "vm.a.loc", "I/O ports"),
        (
            "[vm.a]\nlog = [\"error stderr\",\n  \"error file\"]\n",
            3,
            "vm.a.log",
            "unknown destination",
        ),
        ("[vm.a]\nlog = [\"error\"]\n", 2, "vm.a.log", "FILTER[,FILTER...] DESTINATION"),
        ("[vm.a]\nqnx = \"hostvector 3\"\n", 2, "vm.a.qnx: hostvector", "PIC"),
        ("[vm.a]\ncreate = [{ name = \"m\", size = 0 }]\n", 2, "vm.a.create", "size 0"),
        (
            "[vm.a]\nsubst = \",g\"\ncreate = [{ name = \"m\", size = 1 }, { name = \"m\", size = 2 }]\n",
            3,
            "vm.a.create",
            "created twice",
        ),
        ("[vm.a]\nqnx = \"allow a\"\nsched = 3\n", 2, "vm.a.qnx", "excludes"),
        ("[vm.a]\nqnx = \"\"\"\nallow x\nbogus 1\n\"\"\"\n", 4, "vm.a.qnx: bogus", "unknown"),
    ];
    for &(text, line, option, fragment) in cases {
        let e = parse_err(text);
        let shown = e.to_string();
        assert_eq!(e.path, PathBuf::from("test.toml"), "{text:?}: {shown}");
        assert_eq!(e.line, Some(line), "line of {text:?}: {shown}");
        assert_eq!(
            e.option.as_deref(),
            Some(option),
            "option of {text:?}: {shown}"
        );
        assert!(e.message.contains(fragment), "message of {text:?}: {shown}");
        assert!(
            shown.starts_with(&format!("test.toml:{line}: {option}: ")),
            "{shown}"
        );
    }
}

#[test]
fn an_empty_file_is_a_server_with_no_vms() {
    let named = parse_ok("");
    assert_eq!(named.root, PathBuf::from(DEFAULT_ROOT));
    assert!(named.vms.is_empty());
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = parse(&text, Path::new("p.toml"));
        }

        #[test]
        fn config_like_text_never_panics(
            lines in proptest::collection::vec(
                prop_oneof![
                    Just("[vm.a]".to_string()),
                    Just("[[region]]".to_string()),
                    Just("[defaults]".to_string()),
                    Just("qnx = \"\"\"".to_string()),
                    Just("\"\"\"".to_string()),
                    "[a-z_]{1,10} = (\"[ -~]{0,12}\"|[0-9]{1,12}|\\[\"[ -~]{0,10}\"\\])",
                    "(allow|deny|create|subst|loc|intr|sched) [ -~]{0,12}",
                ],
                0..12,
            )
        ) {
            let _ = parse(&lines.join("\n"), Path::new("p.toml"));
        }
    }
}

#[test]
fn the_shipped_examples_parse() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/ivshm.toml");
    let config = load(&path).unwrap();
    let named = config.named.unwrap();
    let names: Vec<&str> = named.vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["monitor", "qnx", "vm0", "vm1"]);
    let vm = |n: &str| {
        &named
            .vms
            .iter()
            .find(|v| v.name.as_str() == n)
            .unwrap()
            .policy
    };
    assert_eq!(vm("vm0").pre_created()[0].0.as_str(), "guest0mem");
    assert_eq!(vm("vm1").pre_created()[0].0.as_str(), "guest1mem");
    assert_eq!(
        vm("vm1").decide("secret-x").status,
        GuestShmStatus::NoPermission
    );
    let qnx = vm("qnx");
    assert_eq!(
        qnx.decide("testing").host_name.unwrap().as_str(),
        "qnx-testing"
    );
    assert_eq!(
        qnx.decide("test-secret").status,
        GuestShmStatus::NoPermission
    );
    assert_eq!(qnx.decide("mars").status, GuestShmStatus::NoPermission);
    assert_eq!(
        qnx.pre_created(),
        vec![(RegionName::new("qnx-testbuf").unwrap(), 65536)]
    );
    assert!(qnx.is_mmio());
    assert_eq!(named.regions[0].peer_limit, 4);
    assert_eq!(named.defaults.max_size, 256 << 20);
    assert_eq!(named.defaults.id_policy, IdPolicy::LowestFree);
    assert_eq!(named.defaults.id_reuse, IdReuse::Safe);
    let monitor = named
        .vms
        .iter()
        .find(|v| v.name.as_str() == "monitor")
        .unwrap();
    assert_eq!(monitor.directory.socket_mode, 0o600);
    assert_eq!(monitor.directory.dir_mode, 0o750);
    assert_eq!(
        crate::named::guest_name_for(vm("monitor"), "guest0mem").as_deref(),
        Some("guest0mem")
    );
}

#[test]
fn qnx_file_errors_name_that_file_and_line() {
    let dir = std::env::temp_dir().join(format!("ivshm-qnx-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("bad.vdev"),
        "vdev shmem\n    allow a\n    create x\n",
    )
    .unwrap();
    std::fs::write(dir.join("c.toml"), "[vm.q]\nqnx_file = \"bad.vdev\"\n").unwrap();
    let e = load(&dir.join("c.toml")).unwrap_err();
    assert_eq!(e.path, dir.join("bad.vdev"));
    assert_eq!(e.line, Some(3));
    std::fs::write(dir.join("c.toml"), "[vm.q]\nqnx_file = \"missing.vdev\"\n").unwrap();
    let e = load(&dir.join("c.toml")).unwrap_err();
    assert_eq!(
        (e.path.clone(), e.line),
        (dir.join("c.toml"), Some(2)),
        "{e}"
    );
    std::fs::write(
        dir.join("c.toml"),
        "[vm.q]\nqnx_file = \"bad.vdev\"\nsched = 1\n",
    )
    .unwrap();
    assert!(load(&dir.join("c.toml"))
        .unwrap_err()
        .message
        .contains("excludes"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// Every socket the server may bind must fit in a socket address: the control socket, and in
/// each VM directory a region socket with the longest region name (31 bytes + `.sock`).
#[test]
fn socket_paths_too_long_for_a_socket_address_are_refused_at_load() {
    // root + "/" + 31-byte VM name + "/" + 31-byte region name + ".sock": 107 bytes with a
    // 38-byte root fits, 108 with a 39-byte one does not.
    let vm = "v".repeat(31);
    let fits = format!("root = \"/{}\"\n\n[vm.{vm}]\n", "r".repeat(37));
    assert_eq!(parse_ok(&fits).vms.len(), 1);
    let err = parse_err(&format!("root = \"/{}\"\n\n[vm.{vm}]\n", "r".repeat(38)));
    assert_eq!(err.line, Some(3), "{err}");
    assert_eq!(err.option.as_deref(), Some(&*format!("vm.{vm}")), "{err}");
    assert!(
        err.message
            .contains("is 71 bytes long: a region socket in it (a name of up to 31 bytes"),
        "{err}"
    );
    assert!(
        err.message
            .contains("could be 108 bytes, more than the 107"),
        "{err}"
    );

    let long_root = format!("/{}", "r".repeat(100));
    let err = parse_err(&format!("root = \"{long_root}\"\n"));
    assert_eq!(err.option.as_deref(), Some("root"), "{err}");
    assert!(
        err.message.contains("/control.sock is 114 bytes long"),
        "{err}"
    );
    let err = parse_err(&format!(
        "root = \"/r\"\ncontrol = \"{long_root}/c.sock\"\n"
    ));
    assert_eq!(err.option.as_deref(), Some("control"), "{err}");
    assert!(err.message.contains("at most 107 bytes"), "{err}");
}

/// A QNX block with a backslash pasted into `qnx = """..."""`: TOML's escape error at the
/// backslash's line says to use `'''`; between `'''` the block reaches the QNX parser as
/// written (whose own error then explains `test\*`).
#[test]
fn a_backslash_in_a_basic_string_block_recommends_a_literal_string() {
    let basic = "[vm.a]\nqnx = \"\"\"\nallow pluto\nallow test\\*\n\"\"\"\n";
    let e = parse_err(basic);
    assert_eq!(e.line, Some(4), "{e}");
    assert!(e.message.contains("missing escaped value"), "{e}");
    assert!(e.message.contains("qnx = '''...'''"), "{e}");
    let e = parse_err("[vm.a]\nsubst = \"\\u12\"\n");
    assert!(e.message.contains("'''"), "{e}");
    let literal = basic.replace("\"\"\"", "'''");
    let e = parse_err(&literal);
    assert_eq!(e.line, Some(4), "{e}");
    assert!(e.message.contains("write the wildcard bare"), "{e}");
    assert!(!e.message.contains("'''"), "{e}");
    // Other TOML errors get no such advice.
    assert!(!parse_err("[vm.a]\nrules = [\n").message.contains("'''"));
}

/// An error about one element of a multi-line list names the element's line, not the line
/// of `rules =` or `create =`.
#[test]
fn errors_in_multi_line_lists_name_the_elements_line() {
    let rules = "[vm.a]\nrules = [\n  \"allow x\",\n  \"bogus y\",\n  \"deny z\",\n]\n";
    let e = parse_err(rules);
    assert_eq!(e.line, Some(4), "{e}");
    assert_eq!(e.option.as_deref(), Some("vm.a.rules"), "{e}");
    assert!(e.message.contains("bogus"), "{e}");
    let create = "[vm.a]\ncreate = [\n  { name = \"ok\", size = 4096 },\n  \
                  { name = \"bad\", size = \"12Q\" },\n]\n";
    let e = parse_err(create);
    assert_eq!(e.line, Some(4), "{e}");
    assert_eq!(e.option.as_deref(), Some("vm.a.create"), "{e}");
    let zero = "[vm.a]\ncreate = [\n  { name = \"ok\", size = 4096 },\n  \
                { name = \"empty\", size = 0 },\n]\n";
    let e = parse_err(zero);
    assert_eq!(e.line, Some(4), "{e}");
    assert!(e.message.contains("empty"), "{e}");
    // A list that is not a list is still refused at its line.
    let e = parse_err("[vm.a]\n\nrules = \"allow x\"\n");
    assert_eq!(e.line, Some(3), "{e}");
}

#[test]
fn marking_channel_departures_is_on_unless_switched_off() {
    let path = Path::new("test.toml");
    assert!(parse("", path).unwrap().mark_channel_departures);
    assert!(
        !parse("mark_channel_departures = false\n", path)
            .unwrap()
            .mark_channel_departures
    );
    parse("mark_channel_departures = 1\n", path).unwrap_err();
}

#[test]
fn vm_quotas_and_the_unused_timeout_are_read_with_their_defaults() {
    use crate::named::{DEFAULT_MAX_REGIONS_PER_VM, DEFAULT_UNUSED_TIMEOUT};
    use std::time::Duration;
    let plain = parse_ok("[vm.a]\n");
    assert_eq!(plain.vms[0].limits.max_regions, DEFAULT_MAX_REGIONS_PER_VM);
    assert_eq!(plain.vms[0].limits.max_bytes, None);
    assert_eq!(plain.defaults.unused_timeout, Some(DEFAULT_UNUSED_TIMEOUT));
    let named = parse_ok(
        "[defaults]\nmax_regions_per_vm = 4\nmax_bytes_per_vm = \"1G\"\nunused_timeout = 90\n\
         [vm.a]\n[vm.b]\nmax_regions = 9\nmax_bytes = \"4K\"\n",
    );
    assert_eq!(
        (
            named.vms[0].limits.max_regions,
            named.vms[0].limits.max_bytes
        ),
        (4, Some(1 << 30))
    );
    assert_eq!(
        (
            named.vms[1].limits.max_regions,
            named.vms[1].limits.max_bytes
        ),
        (9, Some(4096))
    );
    assert_eq!(named.defaults.unused_timeout, Some(Duration::from_secs(90)));
    for (text, time) in [
        ("\"300ms\"", Some(Duration::from_millis(300))),
        ("\"2m\"", Some(Duration::from_secs(120))),
        ("\"1h\"", Some(Duration::from_secs(3600))),
        ("\"off\"", None),
    ] {
        let named = parse_ok(&format!("[defaults]\nunused_timeout = {text}\n"));
        assert_eq!(named.defaults.unused_timeout, time, "{text}");
    }
    for bad in ["\"5x\"", "\"m\"", "-1", "\"99999999999999999999h\""] {
        let e = parse_err(&format!(
            "[defaults]\nvectors = 1\nunused_timeout = {bad}\n"
        ));
        assert_eq!(e.line, Some(3), "{bad}: {e}");
        assert!(e.to_string().contains("unused_timeout"), "{bad}: {e}");
    }
}
