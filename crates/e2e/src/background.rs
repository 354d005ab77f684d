//! Commands run in the background of a guest's shell, e.g. a guest program that waits for a
//! doorbell while the test does other things (in the same guest or elsewhere).
//!
//! [`QemuGuest::spawn_background`] starts `( ( (command); save $? ) & )` with stdin `/dev/null` and
//! stdout and stderr going to a file in the guest's `/tmp`; when the command ends, its exit
//! status goes to a second file. The double fork makes the command a child of `/init`, not
//! of the console shell, which busybox would otherwise end when the job ends (see
//! [`crate::initramfs::InitramfsSpec::init_script`]). [`BackgroundCommand::wait_output`] and
//! [`BackgroundCommand::finish`] poll those files with a loop inside the guest (one console
//! round trip per call), so the shell stays free for other commands in between.
//!
//! ```no_run
//! # use std::time::Duration;
//! # fn example(guest: &mut ivshm_e2e::QemuGuest) -> Result<(), ivshm_e2e::QemuError> {
//! let limit = Duration::from_secs(60);
//! let wait = guest.spawn_background("wait", "ivshm guest wait --count 1 --timeout 120")?;
//! wait.wait_output(guest, "self id=", limit)?; // listening now
//! // ... ring the guest ...
//! let done = wait.finish(guest, limit)?;
//! assert!(done.success() && done.output.contains("doorbell vector="));
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use crate::console::CommandOutput;
use crate::qemu::{QemuError, QemuGuest};

/// The guest directory holding the output and status files of background commands.
const GUEST_DIR: &str = "/tmp/ivshm-e2e-background";
/// How often the guest-side loops look at the files.
const POLL: Duration = Duration::from_millis(200);
/// Added to a guest-side wait for the console round trip of the command doing the waiting.
const CONSOLE_SLACK: Duration = Duration::from_secs(60);

/// A command running in the background of a guest's shell; made by
/// [`QemuGuest::spawn_background`]. Dropping it leaves the command running.
#[derive(Debug)]
#[must_use = "collect the exit status with BackgroundCommand::finish"]
pub struct BackgroundCommand {
    command: String,
    /// Its stdout and stderr in the guest.
    output_path: String,
    /// Its exit status in the guest, written (atomically, by rename) when it ends.
    status_path: String,
}

/// `text` as one single-quoted shell word.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `name` with everything but ASCII letters, digits, `-` and `_` replaced by `_`.
fn file_name_part(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A guest shell loop that sleeps until `done` (a shell condition) holds, for at most `limit`.
fn guest_wait_loop(done: &str, limit: Duration) -> String {
    let rounds = limit.as_millis().div_ceil(POLL.as_millis()).max(1);
    format!(
        "i=0; until {done} || [ $i -ge {rounds} ]; do sleep {:.1}; i=$((i+1)); done",
        POLL.as_secs_f64()
    )
}

impl QemuGuest {
    /// Starts `command` (a shell command line, may span lines) in the background of the
    /// guest's shell and returns at once. `name` (made file-name safe, and made unique per
    /// guest) names its output file. Its stdin is `/dev/null`; stdout and stderr are kept.
    pub fn spawn_background(
        &mut self,
        name: &str,
        command: &str,
    ) -> Result<BackgroundCommand, QemuError> {
        let base = format!(
            "{GUEST_DIR}/{}-{}",
            self.next_background_id(),
            file_name_part(name)
        );
        let background = BackgroundCommand {
            command: command.to_string(),
            output_path: format!("{base}.out"),
            status_path: format!("{base}.status"),
        };
        let BackgroundCommand {
            output_path: out,
            status_path: status,
            ..
        } = &background;
        self.run_ok(
            &format!(
                "mkdir -p {GUEST_DIR} && rm -f {status} {status}.part && : >{out} && \
                 ( ( ( {command}\n) </dev/null >{out} 2>&1; \
                 echo $? >{status}.part; mv {status}.part {status} ) & )"
            ),
            CONSOLE_SLACK,
        )?;
        Ok(background)
    }
}

impl BackgroundCommand {
    /// The command line.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Waits (up to `limit`) until the command's output so far contains `needle` (one line's
    /// worth of text) and returns that output. Fails at once if the command ended without
    /// printing it.
    pub fn wait_output(
        &self,
        guest: &mut QemuGuest,
        needle: &str,
        limit: Duration,
    ) -> Result<String, QemuError> {
        let (out, status) = (&self.output_path, &self.status_path);
        let found = format!("grep -qF -e {} {out}", shell_quote(needle));
        let wait = guest_wait_loop(&format!("{found} || [ -e {status} ]"), limit);
        let output = guest.run(&format!("{wait}; cat {out}"), limit + CONSOLE_SLACK)?;
        if output.output.contains(needle) {
            return Ok(output.output);
        }
        let ended = guest.run(&format!("cat {status}"), CONSOLE_SLACK)?;
        let what = format!("{needle:?} in the output of background `{}`", self.command);
        Err(if ended.success() {
            QemuError::UnexpectedOutput {
                guest: guest.name().to_string(),
                command: format!(
                    "{} (ended with status {} before printing {needle:?})",
                    self.command,
                    ended.output.trim()
                ),
                output: output.output,
            }
        } else {
            guest.timeout_error(&what, limit, &output.output)
        })
    }

    /// Waits (up to `limit`) for the command to end and returns its exit status and
    /// everything it printed.
    pub fn finish(
        self,
        guest: &mut QemuGuest,
        limit: Duration,
    ) -> Result<CommandOutput, QemuError> {
        let status_path = &self.status_path;
        let wait = guest_wait_loop(&format!("[ -e {status_path} ]"), limit);
        let status = guest.run(&format!("{wait}; cat {status_path}"), limit + CONSOLE_SLACK)?;
        let output = guest.run(&format!("cat {}", self.output_path), CONSOLE_SLACK)?;
        if !status.success() {
            let what = format!("background `{}` to end", self.command);
            return Err(guest.timeout_error(&what, limit, &output.output));
        }
        let status = status
            .output
            .trim()
            .parse()
            .map_err(|_| guest.unexpected_output(&self.command, &status.output))?;
        Ok(CommandOutput {
            output: output.output,
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_single_quotes() {
        assert_eq!(shell_quote("self id=1"), "'self id=1'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn names_become_file_name_safe() {
        assert_eq!(file_name_part("b-wait_1"), "b-wait_1");
        assert_eq!(file_name_part("../x y"), "___x_y");
    }

    #[test]
    fn wait_loop_is_bounded() {
        let wait = guest_wait_loop("[ -e /x ]", Duration::from_secs(2));
        assert_eq!(
            wait,
            "i=0; until [ -e /x ] || [ $i -ge 10 ]; do sleep 0.2; i=$((i+1)); done"
        );
    }

    proptest::proptest! {
        #[test]
        fn quoted_words_have_no_bare_quotes(text in ".*") {
            let quoted = shell_quote(&text);
            let inner = &quoted[1..quoted.len() - 1];
            // Every quote inside closes, escapes and reopens: '\''
            proptest::prop_assert_eq!(inner.matches('\'').count(), 3 * text.matches('\'').count());
            proptest::prop_assert_eq!(inner.replace(r"'\''", "'"), text);
        }
    }
}
