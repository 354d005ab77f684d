//! `ivshm-channel` against arbitrary region contents.
//!
//! The first byte chooses the mode:
//! - even: the rest of the input is the whole region (up to 16 KiB, zero-padded): marking a
//!   departed peer as the server does (`mark_departed`, on memory it never validated) and
//!   opening it must either refuse it or validate it, and then listing, opening a channel,
//!   sending and receiving on it must not panic or touch memory outside the region;
//! - odd: a formatted region with two connected channels; the rest is a list of operations:
//!   write bytes at an offset of the region (a hostile peer), send, receive, read through the
//!   message guard, close and reopen, mark a peer as gone. Every call must return (no waiting:
//!   timeouts are zero) and never panic; the second channel, never written by the input, must
//!   deliver every message intact.

#![no_main]

use std::sync::Arc;
use std::time::Duration;

use ivshm_channel::{
    Channel, ChannelError, ChannelOptions, Doorbell, DoorbellError, FormatOptions, Region,
    RegionMemory, Spin,
};
use ivshm_mem::SharedView;
use libfuzzer_sys::fuzz_target;

const SIZE: usize = 16 << 10;
const ZERO: Option<Duration> = Some(Duration::ZERO);

/// One cache line: heap memory of these is 64-byte aligned, as a region must be, whatever the
/// allocator (glibc's malloc returns 16 KiB blocks 64-aligned only one time in four; a
/// misaligned one would make `Region::open` refuse and the input test nothing).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Heap memory standing in for a shared region.
struct Heap {
    ptr: *mut u8,
    lines: Box<[Line]>,
}

// SAFETY: only accessed through SharedView (atomics and raw copies).
unsafe impl Send for Heap {}
// SAFETY: as above.
unsafe impl Sync for Heap {}

impl Heap {
    fn new(bytes: &[u8]) -> Heap {
        let mut lines = vec![Line([0; 64]); SIZE / 64].into_boxed_slice();
        for (i, b) in bytes.iter().take(SIZE).enumerate() {
            lines[i / 64].0[i % 64] = *b;
        }
        let ptr = lines.as_mut_ptr().cast::<u8>();
        Heap { ptr, lines }
    }
}

// SAFETY: the boxed slice never moves or shrinks while `Heap` lives and is 64-byte aligned
// (`Line`); nothing holds a reference into it once `ptr` is taken.
unsafe impl RegionMemory for Heap {
    fn view(&self) -> SharedView<'_> {
        let _ = &self.lines;
        // SAFETY: `ptr` points at SIZE bytes owned by `self.lines` for as long as `self` lives.
        unsafe { SharedView::from_raw_parts(self.ptr, SIZE) }
    }
}

#[derive(Debug)]
struct NoBell(u16);

impl Doorbell for NoBell {
    fn own_id(&self) -> u16 {
        self.0
    }
    fn vectors(&self) -> u16 {
        1
    }
    fn ring(&self, _: u16, _: u16) -> Result<(), DoorbellError> {
        Ok(())
    }
    fn wait(&self, _: u16, _: Option<Duration>) -> Result<bool, DoorbellError> {
        Ok(false)
    }
    fn take(&self, _: u16) -> Result<bool, DoorbellError> {
        Ok(false)
    }
    fn fd(&self, _: u16) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

fn opts() -> ChannelOptions {
    ChannelOptions {
        spin: Spin::Never,
        lock_timeout: Duration::ZERO,
        ..ChannelOptions::default()
    }
}

fn exercise(ch: &mut Channel, i: usize) {
    let mut buf = Vec::new();
    let _ = ch.send(&vec![i as u8; 1 + i % 700], ZERO);
    let _ = ch.recv(&mut buf, ZERO);
    if let Ok(m) = ch.receiver().recv_message(ZERO) {
        let mut part = [0u8; 16];
        let _ = m.read_at(m.len().saturating_sub(8), &mut part[..8]);
        let _ = m.to_vec();
    }
}

fn raw_region(data: &[u8]) {
    let heap = Heap::new(data);
    // What the ivshm server does when a peer leaves a region that may hold channels.
    let _ =
        ivshm_channel::mark_departed(heap.view(), u16::from(data.first().copied().unwrap_or(0)));
    let Ok(region) = Region::open(heap, Arc::new(NoBell(1))) else {
        return;
    };
    let _ = region.channels();
    let _ = region.peer_left(0);
    if let Ok(mut ch) = region.channel("f", opts()) {
        for i in 0..4 {
            exercise(&mut ch, i);
        }
    }
}

fn operations(data: &[u8]) {
    let heap = Heap::new(&[]);
    let base = heap.ptr;
    let fmt = FormatOptions {
        channels: 4,
        ring_size_max: 2048,
    };
    let a = Region::open_or_format(heap, Arc::new(NoBell(0)), fmt)
        .expect("formatting aligned heap memory");
    // A second handle (peer 1) on the same memory.
    struct Alias(*mut u8);
    // SAFETY: the memory is owned by `a`'s Heap, alive for this function.
    unsafe impl Send for Alias {}
    // SAFETY: as above.
    unsafe impl Sync for Alias {}
    // SAFETY: same address and length as the Heap, which outlives every use (dropped with `a`
    // after `b`, both at the end of this function, `b` declared later so dropped first).
    unsafe impl RegionMemory for Alias {
        fn view(&self) -> SharedView<'_> {
            // SAFETY: see the impl.
            unsafe { SharedView::from_raw_parts(self.0, SIZE) }
        }
    }
    // Nothing hostile has happened yet: the set-up must work (never a silently skipped input).
    let b = Region::open(Alias(base), Arc::new(NoBell(1))).expect("second handle");
    let open = |r: &Region, name| r.channel(name, opts()).expect("opening a channel");
    let (mut x, mut y) = (open(&a, "victim"), open(&b, "victim"));
    let (mut p, mut q) = (open(&a, "bystander"), open(&b, "bystander"));
    let view = Alias(base);
    let geo = a.geometry();
    // Offsets the input may write: the header, entry 0 and entry 0's rings (the bystander is
    // entry 1, untouched).
    let entry0 = geo.entry_offset(0) as usize;
    let rings0 = geo.ring_offset(0, false) as usize;
    let rings_len = 2 * geo.ring_stride() as usize;
    let mut buf = Vec::new();
    for (i, chunk) in data.chunks(6).enumerate() {
        let [op, a1, a2, rest @ ..] = chunk else {
            break;
        };
        let arg = usize::from(*a1) | (usize::from(*a2) << 8);
        match op % 8 {
            0 | 1 => {
                // Inside entry 0 or its rings only, never spilling into the bystander's.
                let (off, end) = if op % 2 == 0 {
                    (entry0 + arg % 128, entry0 + 128)
                } else {
                    (rings0 + arg % rings_len, rings0 + rings_len)
                };
                let n = rest.len().min(end - off);
                let _ = view.view().write(off, &rest[..n]);
            }
            2 => {
                let _ = x.send(&vec![*a1; 1 + arg % 2048], ZERO);
            }
            3 => match y.recv(&mut buf, ZERO) {
                Ok(n) => assert_eq!(n, buf.len()),
                Err(ChannelError::ChannelCorrupt { .. } | ChannelError::WouldBlock) => {}
                Err(_) => {}
            },
            4 => exercise(&mut y, arg),
            5 => exercise(&mut x, arg),
            6 => {
                let _ = a.peer_left(u16::from(*a1 % 3));
            }
            _ => {
                let _ = b.channels();
            }
        }
        // The bystander channel works throughout.
        let seq = u32::try_from(i).unwrap_or(u32::MAX);
        let m = seq.to_le_bytes().repeat(1 + i % 50);
        if p.send(&m, ZERO).is_ok() {
            q.recv(&mut buf, ZERO).expect("bystander message lost");
            assert_eq!(buf, m, "bystander message damaged");
        }
    }
    drop((x, y, p, q));
    drop(b);
    drop(a);
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => raw_region(rest),
        Some((_, rest)) => operations(rest),
        None => {}
    }
});
