//! No flag value may make a program panic. Every flag of every `ivshm` command that takes a
//! value other than a string or a path (numbers, sizes, offsets, seconds, counts, vectors, ids,
//! modes: found by walking `Cli::command()`, so a new flag is covered without touching this
//! file) is run with extreme values (0, -1, 1e300, NaN, inf, 2^63, 2^64-1, 2^64, huge sizes,
//! an empty value, ...) against live servers and a fake sysfs tree, so that a value that
//! parses is also used: each run must exit with status 2 and clap's message, or behave (any
//! other exit status, or still running after a while, like a server that serves), and never
//! panic (status 101, "panicked") or die of a signal. The drop-in programs' numeric options
//! (`ivshmem-server -l -n`, `ivshmem-client`'s `int` commands) get the same values.

use std::any::TypeId;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::CommandFactory;
use ivshm_cli::cli::Cli;
use ivshm_server::{RegionConfig, ServerConfig, ServerHandle};
use ivshm_test_support::sysfs::{doorbell_resource, FakeFunction, FakeSysfs};

/// Values no flag may panic on.
const EXTREMES: &[&str] = &[
    "0",
    "1",
    "-1",
    "1.5",
    "1e-300",
    "1e300",
    "-1e300",
    "2e19",
    "NaN",
    "inf",
    "-inf",
    "65536",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "16E",
    "16383P",
    "17179869184G",
    "0x",
    "0xffffffffffffffff",
    "",
    "all",
];

/// How long a run may take before it counts as running fine (a server serving, a listener
/// listening, a benchmark measuring) and is killed.
const RUN_LIMIT: Duration = Duration::from_secs(3);

/// Value types that are not numbers: a string or a path is never parsed as one here.
fn is_text(parser: &clap::builder::ValueParser) -> bool {
    let id = parser.type_id();
    id == TypeId::of::<String>() || id == TypeId::of::<PathBuf>() || id == TypeId::of::<OsString>()
}

/// One leaf command (no subcommands) and its path from `ivshm`.
struct Leaf {
    path: Vec<String>,
    command: clap::Command,
}

fn leaves(command: &clap::Command, path: &[String], out: &mut Vec<Leaf>) {
    let mut subcommands = command.get_subcommands().peekable();
    if subcommands.peek().is_none() {
        out.push(Leaf {
            path: path.to_vec(),
            command: command.clone(),
        });
        return;
    }
    for sub in subcommands {
        let mut p = path.to_vec();
        p.push(sub.get_name().to_string());
        leaves(sub, &p, out);
    }
}

/// Whether `arg` takes a value this test sweeps.
fn swept(arg: &clap::Arg) -> bool {
    arg.get_action().takes_values() && !is_text(arg.get_value_parser())
}

/// What the commands run against: live servers, a fake sysfs tree, files.
struct World {
    dir: PathBuf,
    region_socket: PathBuf,
    control_socket: PathBuf,
    config: PathBuf,
    sysfs: FakeSysfs,
    _region: ServerHandle,
    _named: ServerHandle,
}

impl World {
    fn new(tag: &str) -> World {
        let dir = std::env::temp_dir().join(format!("ivshm-flags-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cwd")).unwrap();
        let region_socket = dir.join("region.sock");
        let mut region = RegionConfig::new(&region_socket);
        region.vectors = 2;
        region.memory.size = 64 << 10;
        let region = ServerHandle::spawn(ServerConfig::single(region)).unwrap();
        let root = dir.join("named");
        std::fs::create_dir_all(&root).unwrap();
        let config = dir.join("ivshm.toml");
        std::fs::write(
            &config,
            format!(
                "root = {:?}\n[defaults]\nvectors = 1\n[vm.vm0]\n",
                root.to_str().unwrap()
            ),
        )
        .unwrap();
        let named = ServerHandle::spawn(ivshm_server::config_file::load(&config).unwrap()).unwrap();
        let sysfs = FakeSysfs::new();
        let function = FakeFunction {
            resource: doorbell_resource(64 << 10),
            ..FakeFunction::doorbell("0000:00:04.0")
        };
        sysfs.add_with_bar_files(&function, 3, 64 << 10);
        World {
            control_socket: root.join("control.sock"),
            dir,
            region_socket,
            config,
            sysfs,
            _region: region,
            _named: named,
        }
    }

    /// The value `leaf`'s argument `id` gets when it is not the one under test: `Some` for
    /// the arguments every run needs (required ones, and where the command runs: sockets,
    /// the fake sysfs) and for the ones that keep a run short; `None` for the rest.
    fn baseline(&self, leaf: &[String], id: &str, run: usize) -> Option<String> {
        let leaf: Vec<&str> = leaf.iter().map(String::as_str).collect();
        let path = |p: &Path| p.to_str().unwrap().to_string();
        let value = match (leaf.as_slice(), id) {
            // A server of its own per run (it keeps serving until the run is over).
            (["serve"], "socket") => path(&self.dir.join(format!("serve-{run}.sock"))),
            (_, "socket") => path(&self.region_socket),
            (_, "control") => path(&self.control_socket),
            (_, "config") => path(&self.config),
            (["guest", ..], "sysfs") => path(&self.sysfs.sysfs()),
            (["guest", ..], "mode") => "sysfs".into(),
            (["bench", "doorbell"], "rounds") => "20".into(),
            (["bench", "doorbell"], "warmup") => "2".into(),
            (["bench", "join"], "peers") => "2".into(),
            // The hidden reference server of `bench join`: on the region's socket its bind
            // fails at once, so a run never waits for joiners.
            (["bench", "join-reference"], "peers" | "vectors") => "1".into(),
            (_, "vm") => "vm0".into(),
            (_, "peer") => "0".into(),
            (_, "vector") => "0".into(),
            (_, "offset") => "0".into(),
            (_, "len") => "1".into(),
            (_, "size") => "4096".into(),
            (_, "name" | "names") => format!("r{run}"),
            (["guest", "chan", "selftest"], "devs") => "0".into(),
            (_, "data") => "00".into(),
            _ => return None,
        };
        Some(value)
    }

    /// `ivshm <leaf> ...` with `value` for the argument `under_test` and the baselines for
    /// the others.
    fn argv(&self, leaf: &Leaf, under_test: &clap::Arg, value: &str, run: usize) -> Vec<String> {
        let mut options = Vec::new();
        let mut positionals = BTreeMap::new();
        for arg in leaf.command.get_arguments() {
            let id = arg.get_id().as_str();
            let given = if arg.get_id() == under_test.get_id() {
                Some(value.to_string())
            } else {
                let baseline = self.baseline(&leaf.path, id, run);
                assert!(
                    baseline.is_some() || !arg.is_required_set(),
                    "ivshm {}: required argument {id} has no baseline value here: add one",
                    leaf.path.join(" ")
                );
                baseline
            };
            let Some(given) = given else { continue };
            match (arg.get_long(), arg.get_index()) {
                (Some(long), _) => options.push(format!("--{long}={given}")),
                (None, Some(index)) => {
                    positionals.insert(index, given);
                }
                (None, None) => panic!("argument {id} has neither a long name nor a position"),
            }
        }
        let mut argv = leaf.path.clone();
        argv.extend(options);
        if !positionals.is_empty() {
            // After `--` a value such as `-1` is a value, not an option.
            argv.push("--".into());
            argv.extend(positionals.into_values());
        }
        argv
    }
}

/// How a run ended.
#[derive(Debug)]
enum Ended {
    Exited(ExitStatus, String),
    StillRunning(String),
}

/// Runs `program argv` in `cwd` (stdin `input`, if any), killing it after [`RUN_LIMIT`].
fn run(program: &str, argv: &[String], cwd: &Path, input: Option<&str>) -> Ended {
    let mut child: Child = Command::new(program)
        .args(argv)
        .current_dir(cwd)
        .env("RUST_LOG", "error")
        .env("RUST_BACKTRACE", "1")
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // A group of its own, so that what it started (the `ivshm serve` of `ivshm bench`)
        // is killed with it: a SIGKILL gives it no chance to stop its children itself.
        .process_group(0)
        .spawn()
        .unwrap();
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        let _ = stdin.write_all(text.as_bytes());
    }
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let group = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let text = reader.join().unwrap();
    match status {
        Some(status) => Ended::Exited(status, text),
        None => Ended::StillRunning(text),
    }
}

/// Why a run is not acceptable, if it is not.
fn verdict(ended: &Ended) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    let stderr = match ended {
        Ended::Exited(_, text) | Ended::StillRunning(text) => text,
    };
    if stderr.contains("panicked") || stderr.contains("RUST_BACKTRACE") {
        return Some(format!("panicked: {stderr}"));
    }
    match ended {
        Ended::Exited(status, _) if status.code() == Some(101) => {
            Some(format!("status 101: {stderr}"))
        }
        Ended::Exited(status, _) if status.code().is_none() => {
            Some(format!("killed by signal {:?}: {stderr}", status.signal()))
        }
        Ended::Exited(status, _) if status.code() == Some(2) && stderr.trim().is_empty() => {
            Some("status 2 without a message".into())
        }
        _ => None,
    }
}

/// Runs `jobs` on a few threads; returns the failures.
fn run_all(jobs: Vec<(String, Vec<String>, Option<String>)>, cwd: &Path) -> Vec<String> {
    let jobs = Mutex::new(jobs);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let Some((program, argv, input)) = jobs.lock().unwrap().pop() else {
                    return;
                };
                let ended = run(&program, &argv, cwd, input.as_deref());
                if let Some(why) = verdict(&ended) {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{program} {argv:?}: {why}"));
                }
            });
        }
    });
    failures.into_inner().unwrap()
}

#[test]
fn no_value_of_any_numeric_ivshm_flag_makes_it_panic() {
    let world = World::new("ivshm");
    let mut root = Cli::command();
    root.build();
    let mut all = Vec::new();
    leaves(&root, &[], &mut all);
    let ivshm = env!("CARGO_BIN_EXE_ivshm").to_string();
    let runs = AtomicUsize::new(0);
    let mut jobs = Vec::new();
    let mut covered = Vec::new();
    for leaf in &all {
        for arg in leaf.command.get_arguments().filter(|a| swept(a)) {
            covered.push(format!("{} --{}", leaf.path.join(" "), arg.get_id()));
            for value in EXTREMES {
                let n = runs.fetch_add(1, Ordering::Relaxed);
                jobs.push((ivshm.clone(), world.argv(leaf, arg, value, n), None));
            }
        }
    }
    // The flags the issue names are among them (the walk found the command tree).
    for expected in [
        "listen --timeout",
        "bench doorbell --warmup",
        "bench doorbell --rounds",
        "serve --size",
        "read --len",
        "guest wait --timeout",
        "region create --vectors",
    ] {
        assert!(
            covered.iter().any(|c| c == expected),
            "{expected} not swept: {covered:?}"
        );
    }
    eprintln!(
        "{} runs over {} flags: {covered:?}",
        jobs.len(),
        covered.len()
    );
    let failures = run_all(jobs, &world.dir.join("cwd"));
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    std::fs::remove_dir_all(&world.dir).unwrap();
}

#[test]
fn no_value_of_a_numeric_drop_in_option_makes_it_panic() {
    let world = World::new("dropin");
    let cwd = world.dir.join("cwd");
    let server = env!("CARGO_BIN_EXE_ivshmem-server").to_string();
    let client = env!("CARGO_BIN_EXE_ivshmem-client").to_string();
    let mut jobs = Vec::new();
    for (n, value) in EXTREMES.iter().enumerate() {
        let socket = world.dir.join(format!("dropin-{n}.sock"));
        let socket = socket.to_str().unwrap().to_string();
        for option in ["-l", "-n"] {
            let argv = ["-F", "-S", &socket, "-m", ".", option, value];
            jobs.push((server.clone(), argv.map(String::from).to_vec(), None));
        }
        // The interactive commands take numbers too.
        let input = format!("int {value} 0\nint 0 {value}\nint {value} all\n");
        let argv = vec![
            "-S".to_string(),
            world.region_socket.to_str().unwrap().to_string(),
        ];
        jobs.push((client.clone(), argv, Some(input)));
    }
    let failures = run_all(jobs, &cwd);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    std::fs::remove_dir_all(&world.dir).unwrap();
}
