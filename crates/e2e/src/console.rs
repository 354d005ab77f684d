//! The guest's serial console as seen from the host: a reader thread collects everything
//! QEMU prints (to a log file and an in-memory text buffer), and the shell protocol wraps
//! commands in unique markers so their output and exit status can be cut out of that text.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The text printed so far and whether the stream has ended.
#[derive(Debug, Default)]
struct ConsoleState {
    text: String,
    closed: bool,
}

/// Text collected from a stream by a reader thread; waiters are woken on every chunk.
#[derive(Debug, Default)]
pub struct ConsoleBuffer {
    state: Mutex<ConsoleState>,
    changed: Condvar,
}

/// Why a wait on the console ended without a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFailure {
    /// The timeout passed.
    Timeout,
    /// The stream ended (QEMU exited) first.
    Closed,
}

impl ConsoleBuffer {
    fn lock(&self) -> MutexGuard<'_, ConsoleState> {
        // A reader thread that panicked holding the lock leaves valid text behind.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn append(&self, chunk: &[u8]) {
        let text = String::from_utf8_lossy(chunk).replace('\r', "");
        self.lock().text.push_str(&text);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// A copy of everything collected so far.
    pub fn text(&self) -> String {
        self.lock().text.clone()
    }

    /// The last `lines` lines collected.
    pub fn tail(&self, lines: usize) -> String {
        tail_lines(&self.lock().text, lines)
    }

    /// Calls `check` on the whole text each time it grows until it returns `Some`, the
    /// stream ends, or `timeout` passes.
    pub fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, WaitFailure> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(found) = check(&state.text) {
                return Ok(found);
            }
            if state.closed {
                return Err(WaitFailure::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitFailure::Timeout);
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map_or_else(|poisoned| poisoned.into_inner().0, |(guard, _)| guard);
        }
    }
}

/// The last `lines` lines of `text`.
pub fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts a thread copying `stream` into `buffer` and `log` (each chunk also goes to the log
/// file as is) until end of file.
pub fn spawn_reader(
    mut stream: impl Read + Send + 'static,
    buffer: Arc<ConsoleBuffer>,
    mut log: Option<File>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("e2e-console".into())
        .spawn(move || {
            let mut chunk = [0u8; 4096];
            loop {
                match stream.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        if let Some(file) = log.as_mut() {
                            // The log is a convenience; losing it must not stop the test.
                            let _ = file.write_all(&chunk[..n]);
                        }
                        buffer.append(&chunk[..n]);
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            buffer.close();
        })
}

/// What a command run in the guest printed (stdout and stderr together) and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Everything the command printed, `\r` removed.
    pub output: String,
    /// The shell's `$?` after the command.
    pub status: i32,
}

impl CommandOutput {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

fn begin_marker(id: u64) -> String {
    format!("@@IVSHM-BEGIN-{id}@@")
}

fn end_marker(id: u64) -> String {
    format!("@@IVSHM-END-{id}@@")
}

/// The lines sent to the guest shell to run `command` as command number `id`.
///
/// The markers are split by quotes in what is sent (`'@@IVSHM-B''EGIN-1@@'`), so an echo of
/// the input can never be mistaken for the markers the shell prints. The command's stdin is
/// `/dev/null` so it cannot eat the next command, and stderr goes with stdout.
pub fn wrap_command(command: &str, id: u64) -> String {
    format!(
        "echo '@@IVSHM-B''EGIN-{id}@@'\n\
         {{ {command}\n\
         }} </dev/null 2>&1\n\
         echo \"@@IVSHM-E\"\"ND-{id}@@ $?\"\n"
    )
}

/// Finds the output of command `id` in `text` at or after byte `from`; returns it and the
/// byte offset just after its end marker line.
pub fn find_command_output(text: &str, from: usize, id: u64) -> Option<(CommandOutput, usize)> {
    let text_from = text.get(from..)?;
    let begin = format!("{}\n", begin_marker(id));
    let begin_at = text_from.find(&begin)? + begin.len();
    let after_begin = &text_from[begin_at..];
    let end = format!("{} ", end_marker(id));
    let end_at = after_begin.find(&end)?;
    let after_end = &after_begin[end_at + end.len()..];
    let newline = after_end.find('\n')?;
    let status = after_end[..newline].trim().parse().ok()?;
    let output = after_begin[..end_at].to_string();
    let consumed = from + begin_at + end_at + end.len() + newline + 1;
    Some((CommandOutput { output, status }, consumed))
}

/// Removes ANSI escape sequences (`ESC [ ... final` and two-byte `ESC x`), which firmware and
/// the kernel print on the console (e.g. clearing the screen).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// Finds a line ending with `marker` (ignoring trailing whitespace and ANSI escape sequences;
/// firmware output may precede it on the same line) at or after byte `from`; returns the byte
/// offset just after that line.
pub fn find_marker_line(text: &str, from: usize, marker: &str) -> Option<usize> {
    let text_from = text.get(from..)?;
    let mut offset = 0;
    for line in text_from.split_inclusive('\n') {
        offset += line.len();
        if line.ends_with('\n') && strip_ansi(line).trim_end().ends_with(marker) {
            return Some(from + offset);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wrapped_command_never_contains_its_markers() {
        let wrapped = wrap_command("ls /", 7);
        assert!(!wrapped.contains(&begin_marker(7)));
        assert!(!wrapped.contains(&end_marker(7)));
    }

    #[test]
    fn finds_output_and_status() {
        let text = "junk\n@@IVSHM-BEGIN-3@@\nhello\nworld\n@@IVSHM-END-3@@ 1\nmore";
        let (out, end) = find_command_output(text, 0, 3).unwrap();
        assert_eq!(out.output, "hello\nworld\n");
        assert_eq!(out.status, 1);
        assert_eq!(&text[end..], "more");
    }

    #[test]
    fn output_without_final_newline_is_kept() {
        let text = "@@IVSHM-BEGIN-1@@\nabc@@IVSHM-END-1@@ 0\n";
        let (out, _) = find_command_output(text, 0, 1).unwrap();
        assert_eq!(out.output, "abc");
        assert!(out.success());
    }

    #[test]
    fn incomplete_output_is_not_found() {
        assert!(find_command_output("@@IVSHM-BEGIN-1@@\nabc\n", 0, 1).is_none());
        assert!(find_command_output("@@IVSHM-BEGIN-1@@\nabc@@IVSHM-END-1@@ 0", 0, 1).is_none());
        assert!(find_command_output("@@IVSHM-BEGIN-2@@\n@@IVSHM-END-2@@ 0\n", 0, 1).is_none());
    }

    #[test]
    fn marker_line_must_be_a_whole_line() {
        assert_eq!(find_marker_line("a\nREADY\nb", 0, "READY"), Some(8));
        assert_eq!(find_marker_line("echo READY now\n", 0, "READY"), None);
        assert_eq!(
            find_marker_line("ROM..\u{1b}c\u{1b}[2JREADY\n", 0, "READY"),
            Some(17)
        );
        assert_eq!(find_marker_line("READY", 0, "READY"), None);
        assert_eq!(find_marker_line("READY\nREADY\n", 6, "READY"), Some(12));
        assert_eq!(
            find_marker_line("\u{1b}c\u{1b}[?7l\u{1b}[2JREADY\n", 0, "READY"),
            Some(17)
        );
    }

    #[test]
    fn strips_escape_sequences() {
        assert_eq!(strip_ansi("\u{1b}[2J\u{1b}[0mSeaBIOS\u{1b}c!"), "SeaBIOS!");
    }

    #[test]
    fn buffer_wait_sees_appended_text_and_close() {
        let buffer = Arc::new(ConsoleBuffer::default());
        let writer = Arc::clone(&buffer);
        let thread = std::thread::spawn(move || {
            writer.append(b"one\r\ntwo\r\n");
            writer.close();
        });
        let found = buffer.wait_until(Duration::from_secs(10), |t| t.find("two").map(|_| t.len()));
        assert_eq!(found, Ok(8));
        thread.join().unwrap();
        let never = buffer.wait_until(Duration::from_secs(10), |t| t.find("three"));
        assert_eq!(never, Err(WaitFailure::Closed));
    }

    proptest! {
        #[test]
        fn round_trips_any_printable_output(
            noise in "[ -~\n]{0,40}",
            output in "[ -~\n]{0,200}",
            status in 0i32..256,
            id in 0u64..1000,
        ) {
            let text = format!("{noise}\n{}\n{output}{} {status}\nrest", begin_marker(id), end_marker(id));
            let (found, end) = find_command_output(&text, 0, id).unwrap();
            prop_assert_eq!(found.output, output);
            prop_assert_eq!(found.status, status);
            prop_assert_eq!(&text[end..], "rest");
        }
    }
}
