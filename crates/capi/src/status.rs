//! Status codes, their messages, the thread-local message of the last failure, and the guard
//! every entry point runs its body in (no panic crosses into C).

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use ivshm_channel::{ChannelError, RegionError};

/// What a call returns: `IVSHM_STATUS_OK` (0) or the reason it failed (a positive code;
/// `ivshm_strerror` names it, `ivshm_last_error` says more about the last failure on the
/// calling thread).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// A pointer is NULL, a length or a value is out of range, or a string is not UTF-8.
    InvalidArgument = 1,
    /// The channel name is empty, longer than 31 bytes or not UTF-8.
    BadName = 2,
    /// The server or the device could not be reached or opened.
    Connect = 3,
    /// The region holds no valid channel layout (or another party is still formatting it).
    Region = 4,
    /// The region's channel directory has no free entry.
    DirectoryFull = 5,
    /// Both sides of the named channel are taken.
    Busy = 6,
    /// Another peer holds the region's directory lock and did not release it in time.
    DirectoryLocked = 7,
    /// The doorbell vector is not one of ours.
    BadVector = 8,
    /// The message is larger than the channel carries (messages are never split).
    TooLarge = 9,
    /// Messages carry at least one byte.
    Empty = 10,
    /// Nothing to receive, or no room to send, and the timeout was 0. The doorbell is armed:
    /// wait for the channel's fd, call `ivshm_channel_take_doorbell`, try again.
    WouldBlock = 11,
    /// The timeout passed.
    Timeout = 12,
    /// The receive buffer is smaller than the next message (which stays queued; the needed
    /// length is reported).
    BufferTooSmall = 13,
    /// The other end closed its side (every message it sent before was delivered).
    PeerClosed = 14,
    /// The other end left the region (its VM or process is gone).
    PeerGone = 15,
    /// Our own side was closed or marked gone by someone else.
    Detached = 16,
    /// The channel's shared memory breaks the protocol: the channel is failed for good (other
    /// channels of the region keep working).
    ChannelCorrupt = 17,
    /// The doorbell (eventfd, device register or interrupt) failed.
    Doorbell = 18,
    /// The call is not supported by this kind of region.
    Unsupported = 19,
    /// A bug in the library (a panic, caught at the boundary); the handle used may be unusable.
    Internal = 20,
}

/// Every status, in code order (for `ivshm_strerror` and the tests; not in the header).
const ALL: [Status; 21] = [
    Status::Ok,
    Status::InvalidArgument,
    Status::BadName,
    Status::Connect,
    Status::Region,
    Status::DirectoryFull,
    Status::Busy,
    Status::DirectoryLocked,
    Status::BadVector,
    Status::TooLarge,
    Status::Empty,
    Status::WouldBlock,
    Status::Timeout,
    Status::BufferTooSmall,
    Status::PeerClosed,
    Status::PeerGone,
    Status::Detached,
    Status::ChannelCorrupt,
    Status::Doorbell,
    Status::Unsupported,
    Status::Internal,
];

impl Status {
    /// The short message `ivshm_strerror` returns.
    pub fn message(self) -> &'static CStr {
        match self {
            Status::Ok => c"success",
            Status::InvalidArgument => c"invalid argument",
            Status::BadName => c"invalid channel name (1 to 31 bytes of UTF-8)",
            Status::Connect => c"cannot reach the server or open the device",
            Status::Region => c"the region holds no valid channel layout",
            Status::DirectoryFull => c"the channel directory is full",
            Status::Busy => c"both sides of the channel are taken",
            Status::DirectoryLocked => c"the channel directory is locked by another peer",
            Status::BadVector => c"the doorbell vector is not one of ours",
            Status::TooLarge => c"the message is larger than the channel carries",
            Status::Empty => c"messages carry at least one byte",
            Status::WouldBlock => c"the operation would block",
            Status::Timeout => c"timed out",
            Status::BufferTooSmall => c"the buffer is smaller than the message",
            Status::PeerClosed => c"the other end closed the channel",
            Status::PeerGone => c"the other end left the region",
            Status::Detached => c"our side of the channel was closed by someone else",
            Status::ChannelCorrupt => c"the channel's shared memory is corrupt",
            Status::Doorbell => c"the doorbell failed",
            Status::Unsupported => c"not supported by this region",
            Status::Internal => c"internal error in the ivshm library",
        }
    }

    /// The status of `code`, if it is one.
    pub fn from_code(code: c_int) -> Option<Status> {
        usize::try_from(code).ok().and_then(|i| ALL.get(i).copied())
    }
}

/// A failed call: its status and the message for `ivshm_last_error`.
#[derive(Debug)]
pub struct Failure {
    /// The status returned.
    pub status: Status,
    /// The full message.
    pub message: String,
}

impl Failure {
    /// A failure with `message`.
    pub fn new(status: Status, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }

    /// `InvalidArgument` with `message`.
    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(Status::InvalidArgument, message)
    }
}

/// The status of a channel error.
pub fn channel_status(e: &ChannelError) -> Status {
    match e {
        ChannelError::TooLarge { .. } => Status::TooLarge,
        ChannelError::Empty => Status::Empty,
        ChannelError::WouldBlock => Status::WouldBlock,
        ChannelError::Timeout => Status::Timeout,
        ChannelError::BufferTooSmall { .. } => Status::BufferTooSmall,
        ChannelError::PeerClosed => Status::PeerClosed,
        ChannelError::PeerGone { .. } => Status::PeerGone,
        ChannelError::Detached => Status::Detached,
        ChannelError::ChannelCorrupt { .. } => Status::ChannelCorrupt,
        ChannelError::Doorbell(_) => Status::Doorbell,
    }
}

impl From<ChannelError> for Failure {
    fn from(e: ChannelError) -> Failure {
        Failure::new(channel_status(&e), message_of(&e))
    }
}

impl From<RegionError> for Failure {
    fn from(e: RegionError) -> Failure {
        let status = match &e {
            RegionError::DirectoryFull { .. } => Status::DirectoryFull,
            RegionError::Busy { .. } => Status::Busy,
            RegionError::DirectoryLocked { .. } => Status::DirectoryLocked,
            RegionError::BadName { .. } => Status::BadName,
            RegionError::BadVector { .. } => Status::BadVector,
            _ => Status::Region,
        };
        Failure::new(status, message_of(&e))
    }
}

/// `e` and its sources, joined with `: `.
pub fn message_of(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

thread_local! {
    /// The message of the last failed call on this thread.
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// Records `message` as this thread's last error (NUL bytes in it become spaces).
fn set_last_error(message: &str) {
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    // `try_with`: during the thread's destruction the slot may be gone; the message is then lost.
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut slot) = slot.try_borrow_mut() {
            *slot = Some(text);
        }
    });
}

/// This thread's last error message, or an empty string; valid until the next failed call on
/// this thread.
pub fn last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|slot| match slot.try_borrow() {
            Ok(slot) => slot.as_ref().map_or(c"".as_ptr(), |m| m.as_ptr()),
            Err(_) => c"".as_ptr(),
        })
        .unwrap_or(c"".as_ptr())
}

/// Runs an entry point's body: its failure becomes its status (and this thread's last error),
/// a panic becomes [`Status::Internal`] instead of unwinding into C.
pub fn guard(body: impl FnOnce() -> Result<(), Failure>) -> Status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => Status::Ok,
        Ok(Err(failure)) => {
            set_last_error(&failure.message);
            failure.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_string());
            // Dropping the payload could panic in turn (a payload's own Drop): keep it away.
            std::mem::forget(panic);
            set_last_error(&format!("internal error in the ivshm library: {what}"));
            Status::Internal
        }
    }
}

/// [`guard`] for entry points that return a value instead of a status: `fallback` after a
/// panic.
pub fn guard_value<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|panic| {
        std::mem::forget(panic);
        set_last_error("internal error in the ivshm library (a panic)");
        fallback
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_their_place_and_have_messages() {
        for (i, s) in ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
            assert_eq!(Status::from_code(i as c_int), Some(*s));
            assert!(!s.message().to_bytes().is_empty());
        }
        assert_eq!(Status::from_code(-1), None);
        assert_eq!(Status::from_code(ALL.len() as c_int), None);
    }

    #[test]
    fn a_panic_becomes_internal_with_its_message() {
        let status = guard(|| panic!("boom"));
        assert_eq!(status, Status::Internal);
        // SAFETY: last_error returns a NUL-terminated string that lives until the next failure
        // on this thread.
        let message = unsafe { CStr::from_ptr(last_error()) };
        assert!(message.to_str().unwrap().contains("boom"), "{message:?}");
    }

    #[test]
    fn nul_bytes_in_a_message_are_kept_out_of_the_c_string() {
        let status = guard(|| Err(Failure::invalid("a\0b")));
        assert_eq!(status, Status::InvalidArgument);
        // SAFETY: as above.
        let message = unsafe { CStr::from_ptr(last_error()) };
        assert_eq!(message.to_bytes(), b"a b");
    }
}
