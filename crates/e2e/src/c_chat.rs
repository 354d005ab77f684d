//! The C library's example program, `crates/capi/examples/c/chat.c`: built statically against
//! `libivshm.a` to run inside a guest ([`static_chat`]), and the checked message stream it
//! sends and expects ([`message`], [`verify`]), for the Rust side of a test (the host's
//! `ivshm chan send` sends [`message`]s, [`recv_text_messages`] and [`verify`] check what
//! `ivshm chan recv` printed). The crate `ivshm-capi`'s own tests use the same functions.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::binaries::{static_libivshm, static_target_dir, BuildError};
use crate::workspace;

/// The C dialect and warnings every C program of the project is compiled with (the example
/// and the tests: warnings are errors).
pub const C_FLAGS: &[&str] = &[
    "-std=c11",
    "-D_POSIX_C_SOURCE=200809L",
    "-Wall",
    "-Wextra",
    "-Werror",
];

/// The example's source.
pub fn source() -> PathBuf {
    workspace::root().join("crates/capi/examples/c/chat.c")
}

/// The directory of `ivshm.h`.
pub fn include_dir() -> PathBuf {
    workspace::root().join("crates/capi/include")
}

/// What a program linked with `cc -static` and the `+crt-static` `libivshm.a` needs besides
/// libc and libgcc, which `cc -static` adds itself (`rustc --print native-static-libs` of that
/// build: `-lutil -lrt -lpthread -lm -ldl -lc -lgcc_eh -lgcc -lc`).
pub const STATIC_LIBS: [&str; 5] = ["-lutil", "-lrt", "-lpthread", "-lm", "-ldl"];

/// chat.c compiled with `cc -static` (warnings are errors) against `ivshm.h` and the guest
/// build's `libivshm.a` ([`static_libivshm`]), stripped: `<target>/static/c/chat`. Built once
/// per process; written under a temporary name and renamed, so concurrent test processes never
/// see half a program.
pub fn static_chat() -> Result<PathBuf, BuildError> {
    static BUILT: OnceLock<Result<PathBuf, BuildError>> = OnceLock::new();
    BUILT.get_or_init(build_static_chat).clone()
}

fn build_static_chat() -> Result<PathBuf, BuildError> {
    let library = static_libivshm()?;
    let dir = static_target_dir().join("c");
    std::fs::create_dir_all(&dir).map_err(|e| BuildError::Io {
        what: format!("mkdir {}", dir.display()),
        message: e.to_string(),
    })?;
    let out = dir.join("chat");
    let tmp = dir.join(format!("chat.{}.tmp", std::process::id()));
    let mut cc = Command::new("cc");
    cc.args(["-static", "-s"])
        .args(C_FLAGS)
        .arg("-I")
        .arg(include_dir())
        .arg(source())
        .arg(&library)
        .args(STATIC_LIBS)
        .arg("-o")
        .arg(&tmp);
    let command = format!("{cc:?}");
    eprintln!("e2e: building: {command}");
    let output = cc.output().map_err(|e| BuildError::Io {
        what: command.clone(),
        message: e.to_string(),
    })?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(BuildError::Compile {
            command,
            status: output.status.to_string(),
            // The linker's notes on getaddrinfo and getpwuid_r in a static program are expected
            // (the program calls neither); they are shown only when the build fails.
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    std::fs::rename(&tmp, &out).map_err(|e| BuildError::Io {
        what: format!("rename {} to {}", tmp.display(), out.display()),
        message: e.to_string(),
    })?;
    Ok(out)
}

/// 32-bit FNV-1a, chat.c's checksum.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(2_166_136_261u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    })
}

/// Message `seq` of chat.c's stream: `"<seq> <payload> <fnv1a hex>"`, the payload being
/// `1 + (seq * 7919) % 3000` letters, letter `j` being `'a' + (seq * 31 + j * 17) % 26` (see
/// the comment at the top of chat.c).
pub fn message(seq: u64) -> String {
    let payload: String = (0..1 + (seq * 7919) % 3000)
        .map(|j| char::from(b'a' + ((seq * 31 + j * 17) % 26) as u8))
        .collect();
    let text = format!("{seq} {payload}");
    let sum = fnv1a(text.as_bytes());
    format!("{text} {sum:08x}")
}

/// Checks a received message of chat.c's stream: its checksum, then that it is message `seq`
/// (not lost, duplicated, reordered or damaged). Panics naming the message otherwise.
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

/// The messages in the output of `ivshm chan recv --format text` (or `ivshm guest chan recv`):
/// the text of each `message len=N data=TEXT` line, whose N is checked against the text.
pub fn recv_text_messages(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("message len="))
        .map(|m| {
            let (len, data) = m
                .split_once(" data=")
                .unwrap_or_else(|| panic!("a message line without data: {m:.60}"));
            assert_eq!(len.parse::<usize>().ok(), Some(data.len()), "{m:.60}");
            data
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_their_checksum_and_are_verified() {
        let m = message(0);
        assert!(m.starts_with("0 a") && m.len() == 2 + 1 + 9, "{m}");
        for seq in [0, 1, 2999, 3000, 123_456] {
            verify(seq, &message(seq));
        }
        // FNV-1a's published test vector: "a".
        assert_eq!(fnv1a(b"a"), 0xe40c_292c);
    }

    #[test]
    #[should_panic(expected = "fails its checksum")]
    fn a_damaged_message_fails_its_checksum() {
        let mut m = message(5).into_bytes();
        m[2] = if m[2] == b'a' { b'b' } else { b'a' };
        verify(5, &String::from_utf8(m).unwrap());
    }

    #[test]
    #[should_panic(expected = "not the one sent")]
    fn a_message_out_of_place_is_named() {
        verify(3, &message(4));
    }

    #[test]
    fn recv_output_is_parsed() {
        let out = "channel name=x side=b\nmessage len=3 data=a b\nmessage len=1 data=z\nend\n";
        assert_eq!(recv_text_messages(out), ["a b", "z"]);
    }
}
