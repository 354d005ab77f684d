//! The docs are tests: every command block of `README.md`, `docs/*.md` and `crates/*/README.md`
//! either runs as written and prints what the doc shows, or says why it does not run.
//! The convention (also in `docs/development.md`, "Docs that are tests"):
//!
//! - ```` ```console ```` blocks run: `$ command` lines, `> ` continuation lines, an optional
//!   `? STATUS` line, then the expected output (stdout and stderr together), compared by
//!   [trycmd](https://docs.rs/trycmd), where `[..]` stands for any text within a line and `...`
//!   alone on a line for any lines (ids, paths, fd numbers, times). Commands run from the
//!   repository's root, as `ivshm`, `ivshmem-server` and `ivshmem-client` (this build's), in a
//!   private mount namespace per doc with empty `/run`, `/tmp` and `/dev/shm`, so the doc's
//!   own paths (`/run/ivshm/control.sock`, `/tmp/ivshm.sock`) work and touch nothing else.
//! - A ```` ```sh ```` block must say why it is not run, in an HTML comment on the line before:
//!   - `<!-- docs-test: fixture -->`: each line is started (by `sh -c`) in the doc's namespace
//!     before its console blocks run, in the order of the doc, and waited for until it prints
//!     `listening on` on stderr or a line on stdout (it stays up while they run: a server the
//!     examples talk to, a listener) or ends with status 0 (`mkdir -p /run/ivshm`);
//!   - `<!-- docs-test: e2e -->`: the commands need a guest or KVM; each one must be run by an
//!     end-to-end test: some string literal in `crates/e2e/{tests,src}/*.rs` (or the tests of
//!     `crates/vmm`) starts with the command line, where a `{...}` placeholder of the test
//!     stands for one or more words;
//!   - `<!-- docs-test: not run: REASON -->`: anything else (installs a package, needs
//!     systemd, runs the whole test suite, elides parts of a command line).
//! - Other blocks carry their language (`text`, `toml`, `rust`, `xml`, `json`); a fence
//!   without one is refused (trycmd would take it for commands).
//!
//! Running the console blocks needs root, `unshare` and `nsenter` (util-linux); without them
//! the test prints `SKIPPED:` and passes, unless `IVSHM_E2E=1` (`scripts/test`) requires it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ivshm_test_support::process::{HostProcess, Stream};

/// How long one command of a console block may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fixture may take to listen.
const FIXTURE_TIMEOUT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The docs whose blocks are checked, relative to the repository's root.
fn docs() -> Vec<PathBuf> {
    let repo = repo();
    let mut docs = vec![PathBuf::from("README.md")];
    let mut add_dir = |dir: &str, pick: &dyn Fn(&Path) -> Option<PathBuf>| {
        let mut found: Vec<PathBuf> = std::fs::read_dir(repo.join(dir))
            .unwrap()
            .filter_map(|e| pick(&e.unwrap().path()))
            .collect();
        found.sort();
        docs.extend(found);
    };
    add_dir("docs", &|p| {
        (p.extension().is_some_and(|e| e == "md"))
            .then(|| PathBuf::from("docs").join(p.file_name().unwrap()))
    });
    add_dir("crates", &|p| {
        p.join("README.md").is_file().then(|| {
            PathBuf::from("crates")
                .join(p.file_name().unwrap())
                .join("README.md")
        })
    });
    docs
}

/// Why a ```` ```sh ```` block does not run as a console block.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Marker {
    Fixture,
    E2e,
    NotRun(String),
}

/// A fenced block of a doc.
#[derive(Debug)]
struct Block {
    /// `file:line` of its opening fence.
    place: String,
    /// The first word of its info string (`""` for none).
    lang: String,
    /// The rest of the info string (`ignore`, ...).
    attributes: Vec<String>,
    /// The `<!-- docs-test: ... -->` comment on the line before, if any.
    marker: Option<Result<Marker, String>>,
    /// Its lines.
    lines: Vec<String>,
}

const MARKER_PREFIX: &str = "<!-- docs-test:";

fn parse_marker(line: &str) -> Option<Result<Marker, String>> {
    let rest = line.trim().strip_prefix(MARKER_PREFIX)?;
    let Some(body) = rest.trim().strip_suffix("-->") else {
        return Some(Err(format!("unterminated marker {line:?}")));
    };
    let body = body.trim();
    Some(match body {
        "fixture" => Ok(Marker::Fixture),
        "e2e" => Ok(Marker::E2e),
        _ => match body.strip_prefix("not run:") {
            Some(reason) if !reason.trim().is_empty() => Ok(Marker::NotRun(reason.trim().into())),
            _ => Err(format!(
                "unknown marker {line:?}: expected fixture, e2e or not run: REASON"
            )),
        },
    })
}

/// The fenced blocks of `doc` (relative to the repository's root).
fn blocks(doc: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(repo().join(doc)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        let ticks = trimmed.chars().take_while(|&c| c == '`').count();
        if ticks < 3 {
            i += 1;
            continue;
        }
        let fence = &trimmed[..ticks];
        let info: Vec<String> = trimmed[ticks..]
            .trim()
            .split(',')
            .map(|s| s.trim().to_string())
            .collect();
        let marker = lines[..i]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| parse_marker(l));
        let start = i;
        i += 1;
        let mut body = Vec::new();
        while i < lines.len() && !lines[i].trim_start().starts_with(fence) {
            body.push(lines[i].to_string());
            i += 1;
        }
        i += 1;
        out.push(Block {
            place: format!("{}:{}", doc.display(), start + 1),
            lang: info[0].clone(),
            attributes: info[1..].to_vec(),
            marker,
            lines: body,
        });
    }
    out
}

/// The command lines of a ```` ```sh ```` block: comments and blank lines dropped, a trailing
/// `# comment` cut, `\` continuations joined.
fn commands(block: &Block) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in &block.lines {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = match line.find("  #").or_else(|| line.find(" # ")) {
            Some(at) => line[..at].trim_end(),
            None => line,
        };
        match line.strip_suffix('\\') {
            Some(head) => {
                pending.push_str(head.trim_end());
                pending.push(' ');
            }
            None => {
                pending.push_str(line);
                out.push(std::mem::take(&mut pending));
            }
        }
    }
    out
}

const COMMAND_LANGS: &[&str] = &["sh", "bash", "shell", "console"];

/// How an indented code block that holds commands starts (synopses such as `ivshm serve
/// [--socket PATH]` are indented blocks too, and stay so).
const COMMAND_STARTS: &[&str] = &[
    "$ ",
    "qemu-system",
    "cargo ",
    "scripts/",
    "IVSHM_",
    "RUSTFLAGS",
    "sudo ",
    "echo ",
];

/// Indented code blocks (four spaces after a blank line, outside fences) that hold commands:
/// they escape the check, so they must be fenced.
fn indented_commands(doc: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join(doc)).unwrap();
    let mut problems = Vec::new();
    let mut in_fence = false;
    let mut previous_blank = true;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        } else if !in_fence && previous_blank {
            if let Some(code) = line.strip_prefix("    ") {
                if COMMAND_STARTS.iter().any(|s| code.starts_with(s)) {
                    problems.push(format!(
                        "{}:{}: commands in an indented block escape the docs test: fence them \
                         (```console, or ```sh with a marker)",
                        doc.display(),
                        n + 1
                    ));
                }
            }
        }
        previous_blank = line.trim().is_empty();
    }
    problems
}

#[test]
fn every_command_block_runs_or_says_why_not() {
    let mut problems = Vec::new();
    for doc in docs() {
        for block in blocks(&doc) {
            let place = &block.place;
            match (&*block.lang, &block.marker) {
                (_, Some(Err(e))) => problems.push(format!("{place}: {e}")),
                ("", _) => problems.push(format!(
                    "{place}: a fence without a language; say `text` for output or a picture, \
                     `console` for commands the docs test runs, `sh` with a marker for others"
                )),
                ("console", marker) => {
                    if !block.attributes.is_empty() {
                        problems.push(format!(
                            "{place}: console blocks run as written; for one that cannot, use \
                             `sh` and a `{MARKER_PREFIX} ... -->` marker saying why"
                        ));
                    }
                    if marker.is_some() {
                        problems.push(format!("{place}: a console block needs no marker"));
                    }
                    // trycmd takes a command's output up to the line before the next `$` or
                    // the fence, less one newline: an empty line must end each output.
                    let mut previous: Option<&str> = None;
                    for line in block.lines.iter().map(String::as_str).chain([""]) {
                        let ends_output = line.starts_with("$ ") || line.is_empty();
                        if let Some(p) = previous {
                            let is_output = !p.is_empty()
                                && !p.starts_with("$ ")
                                && !p.starts_with("> ")
                                && !p.starts_with("? ");
                            if is_output && ends_output && !line.is_empty() {
                                problems.push(format!(
                                    "{place}: leave an empty line after the output of each \
                                     command (before {line:?})"
                                ));
                            }
                        }
                        previous = Some(line);
                    }
                    if block.lines.last().is_some_and(|l| {
                        !l.is_empty() && !l.starts_with("$ ") && !l.starts_with("> ")
                    }) {
                        problems.push(format!(
                            "{place}: leave an empty line after the last command's output"
                        ));
                    }
                }
                (lang, None) if COMMAND_LANGS.contains(&lang) => problems.push(format!(
                    "{place}: a `{lang}` block that is not run: make it a `console` block, or \
                     say why on the line before (`{MARKER_PREFIX} fixture -->`, `{MARKER_PREFIX} \
                     e2e -->`, `{MARKER_PREFIX} not run: REASON -->`)"
                )),
                (lang, Some(Ok(_))) if !COMMAND_LANGS.contains(&lang) => problems.push(format!(
                    "{place}: a marker on a `{lang}` block (markers are for command blocks)"
                )),
                _ => {}
            }
        }
    }
    for doc in docs() {
        problems.extend(indented_commands(&doc));
    }
    assert!(
        problems.is_empty(),
        "doc blocks that break the convention (crates/cli/tests/docs.rs):\n{}",
        problems.join("\n")
    );
}

/// The string literals of the end-to-end tests, with each `{...}` placeholder as one word.
fn e2e_strings() -> Vec<String> {
    let repo = repo();
    let mut text = String::new();
    for dir in ["crates/e2e/tests", "crates/e2e/src", "crates/vmm/tests"] {
        for entry in std::fs::read_dir(repo.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                text.push_str(&std::fs::read_to_string(path).unwrap());
            }
        }
    }
    // Literals, with a Rust line continuation (`\` then spaces) joined into one space.
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find('"') {
        rest = &rest[start + 1..];
        let mut literal = String::new();
        let mut chars = rest.char_indices();
        let mut end = rest.len();
        while let Some((at, c)) = chars.next() {
            match c {
                '"' => {
                    end = at;
                    break;
                }
                '\\' => match chars.next() {
                    Some((_, '\n')) => {
                        literal.push(' ');
                        while let Some((_, c)) = chars.clone().next() {
                            if c.is_whitespace() {
                                chars.next();
                            } else {
                                break;
                            }
                        }
                    }
                    Some((_, c)) => literal.push(c),
                    None => {}
                },
                c => literal.push(c),
            }
        }
        out.push(literal.split_whitespace().collect::<Vec<_>>().join(" "));
        rest = &rest[(end + 1).min(rest.len())..];
    }
    out
}

/// Whether the test string `literal` runs `command`: it starts with the command's words, where a
/// word of the literal that starts with `{` (a format placeholder, `{id}`, `{args}`,
/// `{offset:#x}`) stands for one or more words.
fn covers(literal: &str, command: &str) -> bool {
    fn matches(test: &[&str], doc: &[&str]) -> bool {
        match (test.first(), doc.first()) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(t), Some(_)) if t.starts_with('{') => {
                (1..=doc.len()).any(|n| matches(&test[1..], &doc[n..]))
            }
            (Some(t), Some(d)) => t == d && matches(&test[1..], &doc[1..]),
        }
    }
    let test: Vec<&str> = literal.split_whitespace().collect();
    let doc: Vec<&str> = command.split_whitespace().collect();
    // The program's name is never a placeholder: a string that starts with one (a log line's
    // `"{who}: {line}"`) would cover every command.
    test.first().is_some_and(|first| !first.starts_with('{')) && matches(&test, &doc)
}

#[test]
fn e2e_marked_commands_are_run_by_the_end_to_end_tests() {
    let literals = e2e_strings();
    let mut missing = Vec::new();
    for doc in docs() {
        for block in blocks(&doc) {
            if block.marker != Some(Ok(Marker::E2e)) {
                continue;
            }
            for command in commands(&block) {
                // Inside a guest the program is /bin/ivshm or ivshm on PATH.
                let bare = command.trim_start_matches("/bin/");
                if !literals
                    .iter()
                    .any(|l| covers(l.trim_start_matches("/bin/"), bare))
                {
                    missing.push(format!("{}: {command}", block.place));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "commands marked e2e that no end-to-end test runs (make a test run the command as \
         written, or change the doc to what the test runs):\n{}",
        missing.join("\n")
    );
}

/// Whether the console blocks can run here: root, `unshare` and `nsenter`.
fn namespaces_available() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not root (a private mount namespace per doc needs it)".into());
    }
    for tool in ["unshare", "nsenter"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(format!("no {tool} (util-linux)"));
        }
    }
    Ok(())
}

/// A doc's private mount namespace, held by a process that sleeps in it, with empty `/run`,
/// `/tmp` and `/dev/shm`; and the wrappers that run our programs in it.
struct Namespace {
    holder: HostProcess,
    bin: PathBuf,
}

impl Namespace {
    fn new(tag: &str) -> Namespace {
        let script = "mount -t tmpfs docs-run /run && mount -t tmpfs docs-tmp /tmp && \
                      mount -t tmpfs docs-shm /dev/shm && echo ready && exec sleep 3600";
        let mut command = Command::new("unshare");
        command.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
        ]);
        let holder = HostProcess::spawn(&format!("namespace for {tag}"), command).unwrap();
        holder
            .wait_line_containing(Stream::Stdout, "ready", FIXTURE_TIMEOUT)
            .unwrap();
        let bin = std::env::temp_dir().join(format!(
            "ivshm-docs-{}-{}",
            tag.replace(['/', '.'], "-"),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&bin);
        std::fs::create_dir_all(&bin).unwrap();
        let ns = Namespace { holder, bin };
        for program in PROGRAMS {
            let wrapper = ns.bin.join(program.0);
            std::fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\nexec nsenter --target {} --mount --wd=\"$PWD\" -- {} \"$@\"\n",
                    ns.holder.pid(),
                    program.1
                ),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        ns
    }

    /// `line` run by `sh -c` in the namespace from the repository's root, with our programs
    /// ([`PROGRAMS`]) as the first word replaced by this build's.
    fn command(&self, line: &str) -> Command {
        let line = match PROGRAMS
            .iter()
            .find(|(name, _)| line.split_whitespace().next() == Some(name))
        {
            Some((name, path)) => format!("exec {path}{}", &line[name.len()..]),
            None => line.to_string(),
        };
        let mut command = Command::new("nsenter");
        command
            .args(["--target", &self.holder.pid().to_string(), "--mount"])
            .arg(format!("--wd={}", repo().display()))
            .arg("--")
            .args(["sh", "-c", &line])
            .current_dir(repo())
            .env_remove("RUST_LOG");
        command
    }

    /// Starts fixture `line` and returns once it is ready: it ended with status 0 (`mkdir`),
    /// or it prints `listening on` on stderr or any line on stdout (a server, a listener).
    fn start_fixture(&self, place: &str, line: &str) -> HostProcess {
        let mut fixture =
            HostProcess::spawn(&format!("{place}: {line}"), self.command(line)).unwrap();
        let deadline = std::time::Instant::now() + FIXTURE_TIMEOUT;
        loop {
            if fixture.output(Stream::Stderr).contains("listening on")
                || !fixture.output(Stream::Stdout).is_empty()
            {
                // A program that prints before it listens (`ivshmem-server -v`): its socket too.
                if let Some(socket) = socket_of(line) {
                    let seen = Path::new(&format!("/proc/{}/root", self.holder.pid()))
                        .join(socket.trim_start_matches('/'));
                    while !seen.exists() {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "{place}: fixture {line:?}: no socket {socket}"
                        );
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                return fixture;
            }
            if let Ok(status) = fixture.wait_exit(Duration::from_millis(20)) {
                // Ended: a set-up command such as `mkdir -p`.
                assert!(
                    status.success(),
                    "{place}: fixture {line:?} failed: {}",
                    fixture.failure_context()
                );
                return fixture;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{place}: fixture {line:?} not ready: {}",
                fixture.failure_context()
            );
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.holder.terminate(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.bin);
    }
}

/// The socket a fixture's command line names (`--socket PATH` or `-S PATH`), if any.
fn socket_of(line: &str) -> Option<&str> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "--socket" || w[0] == "-S")
        .map(|w| w[1])
}

/// The programs a console block or a fixture may run, and where they are.
const PROGRAMS: [(&str, &str); 3] = [
    ("ivshm", env!("CARGO_BIN_EXE_ivshm")),
    ("ivshmem-server", env!("CARGO_BIN_EXE_ivshmem-server")),
    ("ivshmem-client", env!("CARGO_BIN_EXE_ivshmem-client")),
];

#[test]
fn console_blocks_print_what_the_docs_show() {
    if let Err(why) = namespaces_available() {
        assert!(
            std::env::var_os("IVSHM_E2E").is_none(),
            "the docs' console blocks cannot run: {why}"
        );
        eprintln!("SKIPPED: console_blocks_print_what_the_docs_show: {why}");
        return;
    }
    for doc in docs() {
        let blocks = blocks(&doc);
        if !blocks.iter().any(|b| b.lang == "console") {
            continue;
        }
        let ns = Namespace::new(&doc.display().to_string());
        let mut fixtures = Vec::new();
        for block in blocks
            .iter()
            .filter(|b| b.marker == Some(Ok(Marker::Fixture)))
        {
            for line in commands(block) {
                fixtures.push(ns.start_fixture(&block.place, &line));
            }
        }
        let cases = trycmd::TestCases::new();
        for (name, _) in PROGRAMS {
            cases.register_bin(name, ns.bin.join(name));
        }
        cases
            .env("RUST_LOG", "warn")
            .timeout(COMMAND_TIMEOUT)
            .case(repo().join(&doc));
        // trycmd runs with the working directory of the test: the repository's root.
        std::env::set_current_dir(repo()).unwrap();
        cases.run();
        drop(fixtures);
    }
}

#[test]
fn a_test_string_covers_a_command_only_from_its_program_name() {
    assert!(covers(
        "ivshm guest chan recv {name} {count}",
        "ivshm guest chan recv demo 10"
    ));
    assert!(!covers("{bin} x", "ivshm x"));
    assert!(!covers("{who}: {line}", "chat guest recv demox 100"));
    assert!(!covers(
        "ivshm guest chan send",
        "ivshm guest chan recv demo 10"
    ));
}
