//! What the tests of tests/c_api.rs need: `ivshm serve`, compiling C against the library, the example's
//! messages (from `ivshm_e2e::c_chat`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ivshm_test_support::fds::wait_listening;
use ivshm_test_support::process::HostProcess;

/// chat.c's message stream and the parser of `ivshm chan recv` output (shared with the QEMU
/// end-to-end test that runs chat.c in a guest).
pub use ivshm_e2e::c_chat::{message, recv_text_messages, verify};

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
        .args(ivshm_e2e::c_chat::C_FLAGS)
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
