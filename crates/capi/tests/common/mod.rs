//! What the tests of tests/c_api.rs need: `ivshm serve`, compiling C against the library, the example's
//! messages.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ivshm_test_support::fds::wait_listening;
use ivshm_test_support::process::HostProcess;

/// Bound on each program the tests run.
pub const STEP: Duration = Duration::from_secs(120);

/// The crate's directory.
pub fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The host `ivshm` (built once per test process).
pub fn ivshm() -> PathBuf {
    ivshm_e2e::binaries::host_ivshm().expect("building the host ivshm")
}

/// `ivshm serve` with a memfd region of `size` and 2 vectors on `socket`.
pub fn serve(socket: &Path, size: &str) -> HostProcess {
    serve_with(socket, size, &[])
}

/// [`serve`] with more flags.
pub fn serve_with(socket: &Path, size: &str, flags: &[&str]) -> HostProcess {
    let mut command = Command::new(ivshm());
    command
        .args(["serve", "--size", size, "--vectors", "2", "--socket"])
        .arg(socket)
        .args(flags)
        .env("RUST_LOG", "warn");
    let server = HostProcess::spawn("ivshm serve", command).unwrap();
    wait_listening(socket);
    server
}

/// The directory holding this build's `libivshm.a` and `libivshm.so` (cargo builds the
/// library with all its crate types next to the test binaries, in `target/<profile>/deps`).
pub fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    assert!(
        deps.join("libivshm.a").is_file(),
        "no libivshm.a in {}",
        deps.display()
    );
    deps
}

/// The system libraries a program linked with `libivshm.a` needs
/// (`rustc --print native-static-libs`; the same list as `Libs.private` in ivshm.pc).
pub const STATIC_LIBS: [&str; 7] = [
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

/// Compiles `source` with `cc` (warnings are errors) against include/ivshm.h and the static
/// library into `out`.
pub fn compile_static(source: &Path, out: &Path) {
    let mut command = Command::new("cc");
    command
        .args([
            "-std=c11",
            "-D_POSIX_C_SOURCE=200809L",
            "-Wall",
            "-Wextra",
            "-Werror",
        ])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg(source)
        .arg(library_dir().join("libivshm.a"))
        .args(STATIC_LIBS)
        .arg("-o")
        .arg(out);
    run_ok(command);
}

/// Runs `command` to its end; panics with its output unless it succeeds.
pub fn run_ok(mut command: Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// 32-bit FNV-1a.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(2_166_136_261u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    })
}

/// Message `seq` of examples/c/chat.c: `"<seq> <payload> <fnv1a hex>"` (see its comment).
pub fn message(seq: u64) -> String {
    let payload: String = (0..1 + (seq * 7919) % 3000)
        .map(|j| char::from(b'a' + ((seq * 31 + j * 17) % 26) as u8))
        .collect();
    let text = format!("{seq} {payload}");
    let sum = fnv1a(text.as_bytes());
    format!("{text} {sum:08x}")
}

/// Checks a received message of chat.c's stream: its checksum, then that it is message `seq`.
pub fn verify(seq: u64, got: &str) {
    let (text, sum) = got
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("message {seq} has no checksum: {got:.40}"));
    assert_eq!(
        u32::from_str_radix(sum, 16).ok(),
        Some(fnv1a(text.as_bytes())),
        "message {seq} ({} bytes) fails its checksum",
        got.len()
    );
    assert!(
        got == message(seq),
        "message {seq} is not the one sent (lost, duplicated or reordered): {got:.40}"
    );
}
