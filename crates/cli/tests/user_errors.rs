//! User errors (a bad configuration file, a bad flag, a missing file, a server that is not
//! there) print their message and exit 1 (clap's flag errors: 2), never a backtrace, for all
//! three programs, also when `RUST_BACKTRACE` and `RUST_LIB_BACKTRACE` ask for backtraces.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ivshm-user-errors-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `program args` in `dir` with backtraces asked for (`setting` for both variables).
fn run(program: &str, args: &[&str], dir: &Path, setting: &str) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("RUST_BACKTRACE", setting)
        .env("RUST_LIB_BACKTRACE", setting)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// Asserts exit status `code`, `message` on stderr and no backtrace or panic.
fn assert_user_error(program: &str, args: &[&str], dir: &Path, code: i32, message: &str) {
    for setting in ["1", "full"] {
        let out = run(program, args, dir, setting);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let what = format!("{program} {args:?} (RUST_BACKTRACE={setting}): {stderr}");
        assert_eq!(out.status.code(), Some(code), "{what}");
        assert!(stderr.contains(message), "no {message:?} in {what}");
        let lower = stderr.to_lowercase();
        assert!(!lower.contains("backtrace"), "backtrace printed by {what}");
        assert!(!lower.contains("panicked"), "panic in {what}");
        assert!(
            !stderr.contains(" at /"),
            "source locations printed by {what}"
        );
    }
}

#[test]
fn ivshm_prints_user_errors_without_a_backtrace() {
    let ivshm = env!("CARGO_BIN_EXE_ivshm");
    let dir = scratch("ivshm");
    std::fs::write(
        dir.join("bad.toml"),
        "root = \"/x\"\n[vm.a]\nrules = [\"bogus y\"]\n",
    )
    .unwrap();
    let bad = ["policy", "check", "--config", "bad.toml", "--vm", "a", "x"];
    assert_user_error(
        ivshm,
        &bad,
        &dir,
        1,
        "bad.toml:3: vm.a.rules: rule \"bogus y\"",
    );
    let missing = ["serve", "--config", "missing.toml"];
    assert_user_error(ivshm, &missing, &dir, 1, "missing.toml: cannot read");
    let flag = ["listen", "--count", "many"];
    assert_user_error(ivshm, &flag, &dir, 2, "invalid value 'many' for '--count");
    let no_server = ["peers", "--socket", "nobody.sock"];
    assert_user_error(
        ivshm,
        &no_server,
        &dir,
        1,
        "cannot join the ivshmem server at nobody.sock",
    );
    let no_control = ["stats", "--control", "nobody.sock"];
    assert_user_error(
        ivshm,
        &no_control,
        &dir,
        1,
        "connecting to the control socket",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_drop_in_programs_print_user_errors_without_a_backtrace() {
    let server = env!("CARGO_BIN_EXE_ivshmem-server");
    let client = env!("CARGO_BIN_EXE_ivshmem-client");
    let dir = scratch("dropins");
    let bad_size = ["-F", "-l", "4Q"];
    assert_user_error(
        server,
        &bad_size,
        &dir,
        1,
        "Parameter 'shm_size' expects a non-negative number below 2^64",
    );
    // QEMU's words (its -v adds the reason for the socket on stdout).
    let no_dir = ["-F", "-S", "s.sock", "-m", "missing-dir"];
    assert_user_error(
        server,
        &no_dir,
        &dir,
        1,
        "cannot open shm file missing-dir: No such file or directory\ncannot bind\n",
    );
    let no_socket_dir = ["-F", "-S", "missing-dir/s.sock", "-m", "."];
    assert_user_error(server, &no_socket_dir, &dir, 1, "cannot bind\n");
    assert_user_error(client, &["-x"], &dir, 1, "-S <unix_sock_path>");
    let _ = std::fs::remove_dir_all(dir);
}
