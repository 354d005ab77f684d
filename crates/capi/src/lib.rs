//! `libivshm`: the C API of ivshm's message channels (`ivshm-channel`), for programs that will
//! never link a Rust crate. The header is `include/ivshm.h` (generated from this crate by
//! cbindgen; `tests/header.rs` checks it is current); `README.md` describes the API.
//!
//! Every entry point runs its body under [`status::guard`]: failures become a status code and
//! a thread-local message, a panic becomes `IVSHM_STATUS_INTERNAL` and never unwinds into C.
//! Every pointer is checked for NULL and every length against its limit before use; strings
//! are read only up to their limit (a name is never scanned past its 32nd byte).
//!
//! Handles are opaque: [`Region`] (`ivshm_region`) and [`ChannelHandle`] (`ivshm_channel`).
//! A channel keeps what it needs of its region alive, so a region may be closed before its
//! channels.

use std::ffi::{c_char, c_int, c_void};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use ivshm_channel::{
    ChannelError, ChannelOptions, Doorbell, FormatOptions, PeerStatus, Receiver, Sender, Spin,
};
use ivshm_client::{ConnectOptions, Peer, PeerDoorbell, PeerEvent};
use ivshm_guest::{DeviceDoorbell, DeviceSelector, MappedDevice, OpenOptions};

pub mod status;

pub use status::Status;
use status::{guard, guard_value, message_of, Failure};

/// The longest socket path or device name read (longer strings are refused unread).
pub const IVSHM_STRING_MAX: usize = 4096;

/// An open channel region: a host peer of an ivshm server, or a guest's ivshmem device.
/// Made by `ivshm_region_open_host` or `ivshm_region_open_guest`, freed by
/// `ivshm_region_close`.
pub struct Region {
    region: ivshm_channel::Region,
    doorbell: Arc<dyn Doorbell>,
    /// The host peer, for its server's messages (`None` in a guest).
    host: Option<Arc<PeerDoorbell>>,
    size: u64,
}

/// One end of a named channel. Made by `ivshm_channel_open`, freed by `ivshm_channel_close`.
///
/// Its halves have locks of their own: one thread may send while another receives; calls on
/// one half from several threads take turns.
pub struct ChannelHandle {
    tx: Mutex<Sender>,
    rx: Mutex<Receiver>,
    doorbell: Arc<dyn Doorbell>,
    vector: u16,
    max_message: usize,
}

/// What `ivshm_region_get_info` reports.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Our peer id (the server's id of this host peer, or the guest device's IVPosition).
    pub own_id: u16,
    /// Our doorbell vectors: a channel's `vector` option is below this.
    pub vectors: u16,
    /// The shared memory's size in bytes.
    pub size: u64,
    /// Channels the region's directory holds.
    pub channels: u32,
    /// Data bytes of each ring; the largest message is this minus 64.
    pub ring_size: u32,
}

/// How `ivshm_channel_open` opens a channel; `ivshm_channel_options_init` fills in the
/// defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelOpenOptions {
    /// Our doorbell vector for this channel (the other end rings it); default 0.
    pub vector: u16,
    /// How long a blocking call spins before it sleeps on the doorbell, in nanoseconds:
    /// 0 sleeps at once, -1 never sleeps (busy-polls); default 5000 (5 µs).
    pub spin_ns: i64,
    /// How long to wait for the region's directory lock, in milliseconds; default 1000.
    pub lock_timeout_ms: u32,
}

impl Default for ChannelOpenOptions {
    fn default() -> Self {
        let d = ChannelOptions::default();
        ChannelOpenOptions {
            vector: d.vector,
            spin_ns: match d.spin {
                Spin::Never => 0,
                Spin::For(t) => i64::try_from(t.as_nanos()).unwrap_or(i64::MAX),
                Spin::Forever => -1,
            },
            lock_timeout_ms: u32::try_from(d.lock_timeout.as_millis()).unwrap_or(u32::MAX),
        }
    }
}

/// The other end of a channel, as `ivshm_channel_peer` reports it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Nobody has opened the other end yet.
    NotJoined = 0,
    /// The peer is attached.
    Attached = 1,
    /// The peer closed its side (messages it sent before may still be queued).
    Closed = 2,
    /// The peer left the region.
    Gone = 3,
}

// ---- checking what C passes ----------------------------------------------------------------

/// Reads the NUL-terminated string at `ptr`, at most `max` bytes before the NUL.
///
/// # Safety
/// `ptr` is NULL or points to readable bytes up to a NUL or at least `max + 1` bytes; nothing
/// past the first NUL or past byte `max` is read.
unsafe fn c_string<'a>(ptr: *const c_char, max: usize, what: &str) -> Result<&'a str, Failure> {
    if ptr.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    let mut len = 0;
    loop {
        if len > max {
            return Err(Failure::invalid(format!(
                "{what} is longer than {max} bytes"
            )));
        }
        // SAFETY: bytes 0..len were not NUL and len <= max, so by the caller's contract byte
        // `len` is readable; `c_char` has no alignment requirement.
        if unsafe { ptr.add(len).read() } == 0 {
            break;
        }
        len += 1;
    }
    // SAFETY: the `len` bytes before the NUL were just read through `ptr`, so they are readable
    // for the call; the caller keeps them unchanged for the call (the C contract of a `const
    // char *` argument).
    let bytes = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) };
    std::str::from_utf8(bytes).map_err(|_| Failure::invalid(format!("{what} is not UTF-8")))
}

/// Reads a channel name: 1 to 31 bytes of UTF-8, scanned no further than its 32nd byte.
///
/// # Safety
/// As [`c_string`].
unsafe fn channel_name<'a>(ptr: *const c_char) -> Result<&'a str, Failure> {
    let max = ivshm_channel::layout::NAME_MAX;
    // SAFETY: the caller's contract is c_string's.
    let name = unsafe { c_string(ptr, max, "the channel name") }.map_err(|f| {
        let status = if ptr.is_null() {
            Status::InvalidArgument
        } else {
            Status::BadName
        };
        Failure::new(status, f.message)
    })?;
    if name.is_empty() {
        return Err(Failure::new(Status::BadName, "the channel name is empty"));
    }
    Ok(name)
}

/// The timeout of a `timeout_ms` argument: negative waits for ever, 0 does not wait.
fn timeout(ms: i32) -> Option<Duration> {
    u64::try_from(ms).ok().map(Duration::from_millis)
}

/// The object behind a handle pointer.
///
/// # Safety
/// `ptr` is NULL or a pointer this library returned and that was not freed.
unsafe fn handle<'a, T>(ptr: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: by the caller's contract, a non-NULL `ptr` points to a live `T` we allocated.
    unsafe { ptr.as_ref() }.ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
}

/// Checks an out-pointer and clears what it points to.
///
/// # Safety
/// `out` is NULL or valid for writing a `T`.
unsafe fn out_ptr<'a, T>(out: *mut T, clear: T, what: &str) -> Result<&'a mut T, Failure> {
    if out.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and by the caller's contract valid for a write of `T`; `write` does
    // not read (or drop) what was there, which may be uninitialised.
    unsafe { out.write(clear) };
    // SAFETY: just initialised; the caller lends it to us for the call.
    Ok(unsafe { &mut *out })
}

/// Locks one half of a channel; a lock poisoned by a panic is reported, not used.
fn lock<'a, T>(m: &'a Mutex<T>, what: &str) -> Result<MutexGuard<'a, T>, Failure> {
    m.lock().map_err(|_| {
        Failure::new(
            Status::Internal,
            format!("an earlier call on this channel's {what} failed inside the library"),
        )
    })
}

// ---- messages ------------------------------------------------------------------------------

/// The message of status `code` (an `ivshm_status` value): a static NUL-terminated string,
/// never NULL (unknown codes get "unknown ivshm status code").
#[no_mangle]
pub extern "C" fn ivshm_strerror(code: c_int) -> *const c_char {
    guard_value(c"internal error".as_ptr(), || {
        Status::from_code(code).map_or(c"unknown ivshm status code".as_ptr(), |s| {
            s.message().as_ptr()
        })
    })
}

/// The message of the last failed call on the calling thread (what failed and why, with the
/// library's details), or "" if none failed. Never NULL. The string stays valid until the next
/// failed call on this thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn ivshm_last_error() -> *const c_char {
    guard_value(c"".as_ptr(), status::last_error)
}

/// The library's version ("0.1.0"), a static string.
#[no_mangle]
pub extern "C" fn ivshm_version() -> *const c_char {
    const VERSION: &std::ffi::CStr = match std::ffi::CStr::from_bytes_with_nul(
        concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes(),
    ) {
        Ok(v) => v,
        Err(_) => c"unknown",
    };
    VERSION.as_ptr()
}

// ---- regions -------------------------------------------------------------------------------

fn boxed_region(
    memory: impl ivshm_channel::RegionMemory,
    doorbell: Arc<dyn Doorbell>,
    host: Option<Arc<PeerDoorbell>>,
    size: u64,
) -> Result<*mut Region, Failure> {
    let region =
        ivshm_channel::Region::open_or_format(memory, doorbell.clone(), FormatOptions::default())
            .map_err(|e| {
            let f = Failure::from(e);
            Failure::new(
                f.status,
                format!("opening the channel region: {}", f.message),
            )
        })?;
    Ok(Box::into_raw(Box::new(Region {
        region,
        doorbell,
        host,
        size,
    })))
}

/// Opens the channel region of the ivshm server at `socket_path` as a host peer (formatting
/// the region with the defaults, 64 channels and rings of up to 1 MiB, if it is blank) and
/// stores the handle in `*out` (NULL on failure).
///
/// Errors: `IVSHM_STATUS_INVALID_ARGUMENT` (NULL, a path over 4096 bytes or not UTF-8),
/// `IVSHM_STATUS_CONNECT` (no server there, or the handshake failed within 5 s),
/// `IVSHM_STATUS_REGION` (the shared memory holds something else than a channel layout).
///
/// # Safety
/// `socket_path` is NULL or a NUL-terminated string; `out` is NULL or valid for writing a
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn ivshm_region_open_host(
    socket_path: *const c_char,
    out: *mut *mut Region,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr(out, std::ptr::null_mut(), "out") }?;
        // SAFETY: the caller's contract.
        let path = unsafe { c_string(socket_path, IVSHM_STRING_MAX, "socket_path") }?;
        let peer = Peer::connect(Path::new(path), ConnectOptions::default()).map_err(|e| {
            Failure::new(
                Status::Connect,
                format!(
                    "cannot join the ivshmem server at {path}: {}",
                    message_of(&e)
                ),
            )
        })?;
        let memory = peer.map().map_err(|e| {
            Failure::new(
                Status::Connect,
                format!("mapping the shared region: {}", message_of(&e)),
            )
        })?;
        let size = peer.shm_size();
        let doorbell = Arc::new(PeerDoorbell::new(peer).map_err(|e| {
            Failure::new(
                Status::Connect,
                format!("setting up the doorbells: {}", message_of(&e)),
            )
        })?);
        *out = boxed_region(memory, doorbell.clone(), Some(doorbell), size)?;
        Ok(())
    })
}

/// Opens the channel region of this guest's ivshmem device `device` (a PCI address such as
/// "0000:00:03.0" or "00:03.0", or an index as `ivshm guest list` prints them; NULL: the only
/// one), as `ivshm guest chan` does: through VFIO with MSI-X interrupts for a doorbell device,
/// else through sysfs (waits then poll every 200 µs). Formats a blank region with the
/// defaults. Stores the handle in `*out` (NULL on failure).
///
/// Errors: `IVSHM_STATUS_INVALID_ARGUMENT` (a bad device name), `IVSHM_STATUS_CONNECT` (no
/// such device, or it cannot be opened: permissions, IOMMU, another driver),
/// `IVSHM_STATUS_REGION`.
///
/// # Safety
/// `device` is NULL or a NUL-terminated string; `out` is NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn ivshm_region_open_guest(
    device: *const c_char,
    out: *mut *mut Region,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr(out, std::ptr::null_mut(), "out") }?;
        let selector = if device.is_null() {
            DeviceSelector::Only
        } else {
            // SAFETY: the caller's contract.
            let text = unsafe { c_string(device, IVSHM_STRING_MAX, "device") }?;
            text.parse()
                .map_err(|e| Failure::invalid(format!("device {text:?}: {}", message_of(&e))))?
        };
        let mapped = MappedDevice::open(selector, &OpenOptions::default()).map_err(|e| {
            Failure::new(
                Status::Connect,
                format!("opening the ivshmem device: {}", message_of(&e)),
            )
        })?;
        let size = mapped.shared_memory().len() as u64;
        let doorbell = DeviceDoorbell::new(Arc::new(mapped)).map_err(|e| {
            Failure::new(
                Status::Connect,
                format!("reading the device's id: {}", message_of(&e)),
            )
        })?;
        let memory = doorbell.memory();
        *out = boxed_region(memory, Arc::new(doorbell), None, size)?;
        Ok(())
    })
}

/// Fills `*info` with the region's peer id, vectors, size and layout.
///
/// # Safety
/// `region` is NULL or a live region handle; `info` is NULL or valid for writing an
/// `ivshm_region_info`.
#[no_mangle]
pub unsafe extern "C" fn ivshm_region_get_info(
    region: *const Region,
    info: *mut RegionInfo,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let info = unsafe { out_ptr(info, RegionInfo::default(), "info") }?;
        // SAFETY: the caller's contract.
        let r = unsafe { handle(region, "region") }?;
        let geometry = r.region.geometry();
        *info = RegionInfo {
            own_id: r.doorbell.own_id(),
            vectors: r.doorbell.vectors(),
            size: r.size,
            channels: geometry.channels,
            ring_size: geometry.ring_size,
        };
        Ok(())
    })
}

/// The fd of a host region's server socket, for the caller's poll loop: when it is readable,
/// call `ivshm_region_process_events`. -1 in a guest (the device reports no departures; the
/// server marks them in the region), or for a NULL handle.
///
/// # Safety
/// `region` is NULL or a live region handle.
#[no_mangle]
pub unsafe extern "C" fn ivshm_region_server_fd(region: *const Region) -> c_int {
    guard_value(-1, || {
        // SAFETY: the caller's contract.
        let Ok(r) = (unsafe { handle(region, "region") }) else {
            return -1;
        };
        r.host
            .as_ref()
            .map_or(-1, |h| h.peer().socket_fd().as_raw_fd())
    })
}

/// Reads what the server sent a host region without blocking and marks the channel sides of
/// peers that left, so that their other ends get `IVSHM_STATUS_PEER_GONE` instead of waiting
/// (an `ivshm serve` with a memfd region marks them itself; other servers do not). Stores how
/// many sides were marked in `*marked` (may be NULL). A guest region returns
/// `IVSHM_STATUS_UNSUPPORTED`; a server that went away, `IVSHM_STATUS_CONNECT`.
///
/// # Safety
/// `region` is NULL or a live region handle; `marked` is NULL or valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn ivshm_region_process_events(
    region: *const Region,
    marked: *mut usize,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let r = unsafe { handle(region, "region") }?;
        let mut count = 0;
        if !marked.is_null() {
            // SAFETY: the caller's contract.
            unsafe { out_ptr(marked, 0, "marked") }?;
        }
        let host = r.host.as_ref().ok_or_else(|| {
            Failure::new(
                Status::Unsupported,
                "a guest region has no server socket (departures are marked by the server)",
            )
        })?;
        let events = host.process_server_messages().map_err(|e| {
            Failure::new(
                Status::Connect,
                format!("reading the server's messages: {}", message_of(&e)),
            )
        })?;
        for id in PeerEvent::departed(&events) {
            count += r.region.peer_left(id)?;
        }
        if !marked.is_null() {
            // SAFETY: checked above (not NULL, valid for writing by the caller's contract).
            unsafe { marked.write(count) };
        }
        Ok(())
    })
}

/// Closes a region handle (NULL is ignored). Channels opened on it stay usable: each keeps
/// what it needs of the region until it is closed.
///
/// # Safety
/// `region` is NULL or a live region handle, not used after this call.
#[no_mangle]
pub unsafe extern "C" fn ivshm_region_close(region: *mut Region) {
    guard_value((), || {
        if !region.is_null() {
            // SAFETY: by the caller's contract, a live handle from Box::into_raw, freed once.
            drop(unsafe { Box::from_raw(region) });
        }
    });
}

// ---- channels ------------------------------------------------------------------------------

/// Fills `*options` with the defaults (vector 0, spin 5 µs, directory lock wait 1 s).
///
/// # Safety
/// `options` is NULL or valid for writing an `ivshm_channel_options`.
#[no_mangle]
pub unsafe extern "C" fn ivshm_channel_options_init(options: *mut ChannelOpenOptions) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        unsafe { out_ptr(options, ChannelOpenOptions::default(), "options") }?;
        Ok(())
    })
}

/// Opens the channel `name` (1 to 31 bytes of UTF-8) of `region`: joins it if another peer
/// created it, else creates it; the other end may open it before or after. `options` may be
/// NULL for the defaults. Stores the handle in `*out` (NULL on failure). A channel nobody
/// joined is freed with what it holds when its creator closes it: before closing, a sender
/// waits until `ivshm_channel_peer` reports the other end.
///
/// Errors: `IVSHM_STATUS_INVALID_ARGUMENT` (NULL, a negative spin other than -1),
/// `IVSHM_STATUS_BAD_NAME`, `IVSHM_STATUS_BAD_VECTOR`, `IVSHM_STATUS_BUSY` (both sides taken),
/// `IVSHM_STATUS_DIRECTORY_FULL`, `IVSHM_STATUS_DIRECTORY_LOCKED`, `IVSHM_STATUS_REGION`.
///
/// # Safety
/// `region` is NULL or a live region handle; `name` is NULL or a NUL-terminated string;
/// `options` is NULL or points to an `ivshm_channel_options`; `out` is NULL or valid for
/// writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn ivshm_channel_open(
    region: *const Region,
    name: *const c_char,
    options: *const ChannelOpenOptions,
    out: *mut *mut ChannelHandle,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr(out, std::ptr::null_mut(), "out") }?;
        // SAFETY: the caller's contract.
        let r = unsafe { handle(region, "region") }?;
        // SAFETY: the caller's contract.
        let name = unsafe { channel_name(name) }?;
        let given = if options.is_null() {
            ChannelOpenOptions::default()
        } else {
            // SAFETY: the caller's contract: a readable `ivshm_channel_options` (plain integers,
            // any bit pattern valid); read unaligned in case C packed it.
            unsafe { options.read_unaligned() }
        };
        let spin = match given.spin_ns {
            -1 => Spin::Forever,
            0 => Spin::Never,
            ns if ns > 0 => Spin::For(Duration::from_nanos(ns.unsigned_abs())),
            ns => {
                return Err(Failure::invalid(format!(
                    "spin_ns {ns}: 0 (sleep at once), -1 (busy-poll) or a positive budget"
                )))
            }
        };
        let opts = ChannelOptions {
            vector: given.vector,
            spin,
            lock_timeout: Duration::from_millis(given.lock_timeout_ms.into()),
        };
        let channel = r.region.channel(name, opts).map_err(|e| {
            let f = Failure::from(e);
            Failure::new(f.status, format!("opening channel {name:?}: {}", f.message))
        })?;
        let max_message = channel.max_message();
        let (tx, rx) = channel.split();
        *out = Box::into_raw(Box::new(ChannelHandle {
            tx: Mutex::new(tx),
            rx: Mutex::new(rx),
            doorbell: r.doorbell.clone(),
            vector: opts.vector,
            max_message,
        }));
        Ok(())
    })
}

/// Closes our side of a channel and frees the handle (NULL is ignored). The other end
/// receives what was sent before, then `IVSHM_STATUS_PEER_CLOSED`.
///
/// # Safety
/// `channel` is NULL or a live channel handle, not used after this call (by any thread).
#[no_mangle]
pub unsafe extern "C" fn ivshm_channel_close(channel: *mut ChannelHandle) {
    guard_value((), || {
        if !channel.is_null() {
            // SAFETY: by the caller's contract, a live handle from Box::into_raw, freed once.
            drop(unsafe { Box::from_raw(channel) });
        }
    });
}

/// Stores the largest message the channel carries (bytes) in `*len`.
///
/// # Safety
/// `channel` is NULL or a live channel handle; `len` is NULL or valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn ivshm_channel_max_message(
    channel: *const ChannelHandle,
    len: *mut usize,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let len = unsafe { out_ptr(len, 0, "len") }?;
        // SAFETY: the caller's contract.
        *len = unsafe { handle(channel, "channel") }?.max_message;
        Ok(())
    })
}

/// Sends the `len` bytes at `data` as one message (1 byte up to the channel's largest, see
/// `ivshm_channel_max_message`), whole and in order. When the ring is full it waits for room:
/// `timeout_ms` < 0 for as long as it takes, 0 not at all (`IVSHM_STATUS_WOULD_BLOCK`), else
/// that many milliseconds (`IVSHM_STATUS_TIMEOUT`).
///
/// Errors: `IVSHM_STATUS_INVALID_ARGUMENT` (NULL `data` with `len` > 0), `IVSHM_STATUS_EMPTY`,
/// `IVSHM_STATUS_TOO_LARGE`, `IVSHM_STATUS_WOULD_BLOCK`, `IVSHM_STATUS_TIMEOUT`,
/// `IVSHM_STATUS_PEER_CLOSED`, `IVSHM_STATUS_PEER_GONE`, `IVSHM_STATUS_DETACHED`,
/// `IVSHM_STATUS_CHANNEL_CORRUPT`, `IVSHM_STATUS_DOORBELL`.
///
/// # Safety
/// `channel` is NULL or a live channel handle; `data` is NULL or readable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn ivshm_channel_send(
    channel: *const ChannelHandle,
    data: *const c_void,
    len: usize,
    timeout_ms: i32,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let c = unsafe { handle(channel, "channel") }?;
        if len == 0 {
            return Err(ChannelError::Empty.into());
        }
        if data.is_null() {
            return Err(Failure::invalid("data is NULL"));
        }
        if len > isize::MAX as usize {
            return Err(Failure::invalid(format!(
                "len {len} is larger than any buffer"
            )));
        }
        // SAFETY: non-NULL, and by the caller's contract readable for `len` bytes (<=
        // isize::MAX, checked) for the call (the caller's own memory, not the shared region).
        let msg = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
        lock(&c.tx, "sender")?.send(msg, timeout(timeout_ms))?;
        Ok(())
    })
}

/// Receives the next message into the `capacity` bytes at `buf` and stores its length in
/// `*len`. Waits for one as `ivshm_channel_send` waits for room (`timeout_ms`). A message
/// larger than `capacity` stays queued: `IVSHM_STATUS_BUFFER_TOO_SMALL`, with the length
/// needed in `*len` (`ivshm_channel_max_message` bytes always suffice).
///
/// Errors: `IVSHM_STATUS_INVALID_ARGUMENT` (NULL `len`, NULL `buf` with `capacity` > 0),
/// `IVSHM_STATUS_BUFFER_TOO_SMALL`, `IVSHM_STATUS_WOULD_BLOCK`, `IVSHM_STATUS_TIMEOUT`,
/// `IVSHM_STATUS_PEER_CLOSED` (after every message the peer sent), `IVSHM_STATUS_PEER_GONE`,
/// `IVSHM_STATUS_DETACHED`, `IVSHM_STATUS_CHANNEL_CORRUPT`, `IVSHM_STATUS_DOORBELL`.
///
/// # Safety
/// `channel` is NULL or a live channel handle; `buf` is NULL or writable for `capacity`
/// bytes; `len` is NULL or valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn ivshm_channel_recv(
    channel: *const ChannelHandle,
    buf: *mut c_void,
    capacity: usize,
    len: *mut usize,
    timeout_ms: i32,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let len = unsafe { out_ptr(len, 0, "len") }?;
        // SAFETY: the caller's contract.
        let c = unsafe { handle(channel, "channel") }?;
        if buf.is_null() && capacity > 0 {
            return Err(Failure::invalid("buf is NULL and capacity is not 0"));
        }
        if capacity > isize::MAX as usize {
            return Err(Failure::invalid(format!(
                "capacity {capacity} is larger than any buffer"
            )));
        }
        let mut empty = [];
        let dst: &mut [u8] = if capacity == 0 {
            &mut empty
        } else {
            // SAFETY: non-NULL, and by the caller's contract writable for `capacity` bytes
            // (<= isize::MAX, checked) for the call and not accessed by anyone else meanwhile
            // (the caller's private buffer; the library writes it with the message's bytes,
            // already copied out of the shared region and validated).
            unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), capacity) }
        };
        match lock(&c.rx, "receiver")?.recv_into(dst, timeout(timeout_ms)) {
            Ok(n) => {
                *len = n;
                Ok(())
            }
            Err(e) => {
                if let ChannelError::BufferTooSmall { needed, .. } = e {
                    *len = needed;
                }
                Err(e.into())
            }
        }
    })
}

/// Waits until a message can be received (without taking it) and stores its length in `*len`
/// (may be NULL); `timeout_ms` as for `ivshm_channel_recv`. Errors as `ivshm_channel_recv`'s
/// except `IVSHM_STATUS_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `channel` is NULL or a live channel handle; `len` is NULL or valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn ivshm_channel_wait(
    channel: *const ChannelHandle,
    timeout_ms: i32,
    len: *mut usize,
) -> Status {
    guard(|| {
        if !len.is_null() {
            // SAFETY: the caller's contract.
            unsafe { out_ptr(len, 0, "len") }?;
        }
        // SAFETY: the caller's contract.
        let c = unsafe { handle(channel, "channel") }?;
        // A receive into no room: it waits like a receive and leaves the message queued.
        match lock(&c.rx, "receiver")?.recv_into(&mut [], timeout(timeout_ms)) {
            Err(ChannelError::BufferTooSmall { needed, .. }) => {
                if !len.is_null() {
                    // SAFETY: checked above.
                    unsafe { len.write(needed) };
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
            Ok(n) => Err(Failure::new(
                Status::Internal,
                format!("a receive into no room returned {n} bytes"),
            )),
        }
    })
}

/// The file descriptor that becomes readable when the other end rings this channel's vector,
/// for the caller's own poll loop (`POLLIN`); -1 if the doorbell has none (a guest device in
/// sysfs mode: poll with a timeout instead) or for NULL. The fd belongs to the library: do not
/// read or close it. The loop: call send or receive with timeout 0; on
/// `IVSHM_STATUS_WOULD_BLOCK` (the doorbell is then armed) poll the fd, call
/// `ivshm_channel_take_doorbell`, retry. Channels on one vector share one fd.
///
/// # Safety
/// `channel` is NULL or a live channel handle.
#[no_mangle]
pub unsafe extern "C" fn ivshm_channel_fd(channel: *const ChannelHandle) -> c_int {
    guard_value(-1, || {
        // SAFETY: the caller's contract.
        let Ok(c) = (unsafe { handle(channel, "channel") }) else {
            return -1;
        };
        c.doorbell.fd(c.vector).map_or(-1, |fd| fd.as_raw_fd())
    })
}

/// Consumes the pending rings of the channel's vector without blocking (after its fd was
/// readable). Stores whether there were any in `*rung` (may be NULL).
///
/// # Safety
/// `channel` is NULL or a live channel handle; `rung` is NULL or valid for writing a `bool`.
#[no_mangle]
pub unsafe extern "C" fn ivshm_channel_take_doorbell(
    channel: *const ChannelHandle,
    rung: *mut bool,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let c = unsafe { handle(channel, "channel") }?;
        let took = c.doorbell.take(c.vector).map_err(ChannelError::from)?;
        if !rung.is_null() {
            // SAFETY: the caller's contract.
            unsafe { out_ptr(rung, took, "rung") }?;
        }
        Ok(())
    })
}

/// Looks once at the other end: stores its state in `*state` and its peer id in `*peer` (0
/// while nobody joined; either pointer may be NULL). Fails only with
/// `IVSHM_STATUS_CHANNEL_CORRUPT` (the other end's side word holds no valid state).
///
/// # Safety
/// `channel` is NULL or a live channel handle; `state` and `peer` are NULL or valid for
/// writing their types.
#[no_mangle]
pub unsafe extern "C" fn ivshm_channel_peer(
    channel: *const ChannelHandle,
    state: *mut PeerState,
    peer: *mut u16,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let c = unsafe { handle(channel, "channel") }?;
        // Whichever half is free: a thread blocked in send or receive holds its half.
        let status = match c.tx.try_lock() {
            Ok(tx) => tx.peer_status(),
            Err(TryLockError::WouldBlock) => lock(&c.rx, "receiver")?.peer_status(),
            Err(TryLockError::Poisoned(_)) => lock(&c.tx, "sender")?.peer_status(),
        }?;
        let (s, id) = match status {
            PeerStatus::NotJoined => (PeerState::NotJoined, 0),
            PeerStatus::Attached(p) => (PeerState::Attached, p),
            PeerStatus::Closed(p) => (PeerState::Closed, p),
            PeerStatus::Gone(p) => (PeerState::Gone, p),
        };
        if !state.is_null() {
            // SAFETY: the caller's contract.
            unsafe { out_ptr(state, s, "state") }?;
        }
        if !peer.is_null() {
            // SAFETY: the caller's contract.
            unsafe { out_ptr(peer, id, "peer") }?;
        }
        Ok(())
    })
}
