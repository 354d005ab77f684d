//! [`Region`]: a channel region (header, directory, rings) over some shared memory, and the
//! directory operations: format, open a channel by name, list, close, mark a departed peer.
//!
//! Directory changes (allocating an entry, joining one, freeing one) happen under the
//! region's directory lock, a word in the header taken with compare-and-exchange; the data
//! path never takes it. Side words change by compare-and-exchange without the lock (closing,
//! marking a departed peer).

use std::sync::Arc;
use std::time::Duration;

use ivshm_mem::SharedView;

use crate::channel::{attached_word, gone_word, Channel, Endpoint, Side, Spin};
use crate::doorbell::Doorbell;
use crate::error::{Corruption, RegionError};
use crate::layout::{
    side_parts, Geometry, RawHeader, ENTRY_SIZE, E_GENERATION, E_NAME, E_RING_AB_OFFSET,
    E_RING_AB_SIZE, E_RING_BA_OFFSET, E_RING_BA_SIZE, E_SIDE_A, E_SIDE_B, E_STATE, HEADER_SIZE,
    H_CHANNEL_COUNT, H_DIRECTORY_OFFSET, H_ENTRY_SIZE, H_FLAGS, H_HEADER_SIZE, H_LAYOUT_SIZE,
    H_LOCK, H_MAGIC, H_RINGS_OFFSET, H_RING_CONTROL_SIZE, H_RING_SIZE, H_VERSION, LOCK_HELD, MAGIC,
    MAGIC_FORMATTING, NAME_FIELD, NAME_MAX, SIDE_ATTACHED, SIDE_CLOSED, SIDE_EMPTY, SIDE_GONE,
    STATE_ACTIVE, STATE_FREE,
};
use crate::ring::{self, Consumer, Producer};
use crate::shm::Shm;
use crate::sync::{Deadline, Ordering};
use crate::wait::Hub;

/// Memory that holds a channel region: anything that gives a [`SharedView`] of it.
///
/// # Safety
/// Every call of [`RegionMemory::view`] must return a view of the same address range, 64-byte
/// aligned, valid for reads and writes for as long as the value lives (the channel keeps the
/// address while it holds the value), with no Rust references into it.
pub unsafe trait RegionMemory: Send + Sync + 'static {
    /// The memory.
    fn view(&self) -> SharedView<'_>;
}

// SAFETY: a `Mapping`'s address and length never change while it lives, `mmap` returns
// page-aligned memory, and it only hands out `SharedView`s (no references).
unsafe impl RegionMemory for ivshm_mem::Mapping {
    fn view(&self) -> SharedView<'_> {
        ivshm_mem::Mapping::view(self)
    }
}

/// How to format a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatOptions {
    /// Directory entries (default 64).
    pub channels: u32,
    /// Largest ring size wanted (default 1 MiB); the largest power of two that lets all
    /// channels fit the region, at most this, is used.
    pub ring_size_max: u32,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            channels: 64,
            ring_size_max: 1 << 20,
        }
    }
}

/// How to open a channel.
#[derive(Debug, Clone, Copy)]
pub struct ChannelOptions {
    /// Our doorbell vector for this channel (the peer rings it): 0..min(vectors, 256).
    pub vector: u16,
    /// Spin budget of blocking calls.
    pub spin: Spin,
    /// How long to wait for the directory lock (default 1 s).
    pub lock_timeout: Duration,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        ChannelOptions {
            vector: 0,
            spin: Spin::default(),
            lock_timeout: Duration::from_secs(1),
        }
    }
}

/// One side of a channel, as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SideInfo {
    /// `empty`, `attached`, `closed` or `gone`.
    pub state: &'static str,
    /// Peer id.
    pub peer: u16,
    /// Doorbell vector.
    pub vector: u8,
}

/// A directory entry in use, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    /// Entry index.
    pub index: u32,
    /// Name bytes (not necessarily UTF-8: shown escaped).
    pub name: Vec<u8>,
    /// Side A (creator).
    pub a: SideInfo,
    /// Side B (joiner).
    pub b: SideInfo,
}

#[derive(Debug)]
pub(crate) struct RegionInner {
    pub(crate) shm: Shm,
    pub(crate) geo: Geometry,
    pub(crate) doorbell: Arc<dyn Doorbell>,
    hubs: Vec<Hub>,
    /// Keeps the memory mapped (the address is in `shm`); only its drop matters.
    _memory: Option<Box<dyn RegionMemoryDebug>>,
}

/// `RegionMemory` objects kept alive by a region.
trait RegionMemoryDebug: Send + Sync {}
impl<T: RegionMemory> RegionMemoryDebug for T {}
impl std::fmt::Debug for dyn RegionMemoryDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegionMemory")
    }
}

/// A channel region opened by one peer: the header's geometry (validated once, kept
/// privately), the memory and the doorbell. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Region {
    inner: Arc<RegionInner>,
}

fn shm_of(memory: &dyn RegionMemoryView) -> Result<Shm, RegionError> {
    let view = memory.view_dyn();
    if view.as_ptr() as usize % 64 != 0 {
        return Err(RegionError::Misaligned);
    }
    // SAFETY: per the `RegionMemory` contract the range stays valid, aligned and free of
    // references while the memory object lives; the region keeps it alive as long as `shm`
    // is used (both live in `RegionInner`).
    Ok(unsafe { Shm::new(view.as_ptr(), view.len()) })
}

trait RegionMemoryView {
    fn view_dyn(&self) -> SharedView<'_>;
}
impl<T: RegionMemory> RegionMemoryView for T {
    fn view_dyn(&self) -> SharedView<'_> {
        self.view()
    }
}

/// Reads the header once.
fn read_header(shm: &Shm) -> Result<RawHeader, Corruption> {
    let u32_at = |o| shm.load(o, Ordering::Relaxed);
    let u64_at = |o: usize| -> Result<u64, Corruption> {
        Ok(u64::from(u32_at(o)?) | (u64::from(u32_at(o + 4)?) << 32))
    };
    Ok(RawHeader {
        magic: shm.load(H_MAGIC, Ordering::Acquire)?,
        version: u32_at(H_VERSION)?,
        layout_size: u64_at(H_LAYOUT_SIZE)?,
        header_size: u32_at(H_HEADER_SIZE)?,
        channel_count: u32_at(H_CHANNEL_COUNT)?,
        entry_size: u32_at(H_ENTRY_SIZE)?,
        ring_size: u32_at(H_RING_SIZE)?,
        directory_offset: u64_at(H_DIRECTORY_OFFSET)?,
        rings_offset: u64_at(H_RINGS_OFFSET)?,
        ring_control_size: u32_at(H_RING_CONTROL_SIZE)?,
        flags: u32_at(H_FLAGS)?,
    })
}

/// Writes the header, magic last (release).
fn write_header(shm: &Shm, h: &RawHeader) -> Result<(), Corruption> {
    let put = |o, v| shm.store(o, v, Ordering::Relaxed);
    let put64 = |o: usize, v: u64| -> Result<(), Corruption> {
        put(o, v as u32)?;
        put(o + 4, (v >> 32) as u32)?;
        Ok(())
    };
    put(H_VERSION, h.version)?;
    put64(H_LAYOUT_SIZE, h.layout_size)?;
    put(H_HEADER_SIZE, h.header_size)?;
    put(H_CHANNEL_COUNT, h.channel_count)?;
    put(H_ENTRY_SIZE, h.entry_size)?;
    put(H_RING_SIZE, h.ring_size)?;
    put64(H_DIRECTORY_OFFSET, h.directory_offset)?;
    put64(H_RINGS_OFFSET, h.rings_offset)?;
    put(H_RING_CONTROL_SIZE, h.ring_control_size)?;
    put(H_FLAGS, h.flags)?;
    put(H_LOCK, 0)?;
    shm.store(H_MAGIC, h.magic, Ordering::Release)?;
    Ok(())
}

fn side_info(word: u32) -> SideInfo {
    let (state, peer, vector) = side_parts(word);
    SideInfo {
        state: match state {
            SIDE_EMPTY => "empty",
            SIDE_ATTACHED => "attached",
            SIDE_CLOSED => "closed",
            SIDE_GONE => "gone",
            _ => "invalid",
        },
        peer,
        vector,
    }
}

/// A name as the 32-byte field holds it.
fn name_field(name: &str) -> Result<[u8; NAME_FIELD], RegionError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > NAME_MAX || bytes.contains(&0) {
        return Err(RegionError::BadName { name: name.into() });
    }
    let mut field = [0u8; NAME_FIELD];
    field[..bytes.len()].copy_from_slice(bytes);
    Ok(field)
}

/// The directory lock, released on drop.
struct DirLock<'a> {
    shm: &'a Shm,
    word: u32,
}

impl Drop for DirLock<'_> {
    fn drop(&mut self) {
        let _ = self.shm.compare_exchange(H_LOCK, self.word, 0);
    }
}

/// Pause between looks at a word another party must change (formatting, the lock).
fn backoff(turn: u32) {
    #[cfg(loom)]
    {
        let _ = turn;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    {
        if turn < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Region {
    /// Opens the channel region in `memory`; refuses memory that is not formatted, a version
    /// this build does not know, or a header that does not describe a valid layout.
    pub fn open(
        memory: impl RegionMemory,
        doorbell: Arc<dyn Doorbell>,
    ) -> Result<Region, RegionError> {
        let shm = shm_of(&memory)?;
        Self::from_shm(shm, Some(Box::new(memory)), doorbell, None)
    }

    /// Opens the region, formatting it first with `format` if it is blank (magic 0). Two
    /// parties that do this at once get one format (the first to claim the magic word).
    pub fn open_or_format(
        memory: impl RegionMemory,
        doorbell: Arc<dyn Doorbell>,
        format: FormatOptions,
    ) -> Result<Region, RegionError> {
        let shm = shm_of(&memory)?;
        Self::from_shm(shm, Some(Box::new(memory)), doorbell, Some(format))
    }

    /// Formats `memory` (destroying any channels in it) and opens it.
    pub fn format(
        memory: impl RegionMemory,
        doorbell: Arc<dyn Doorbell>,
        format: FormatOptions,
    ) -> Result<Region, RegionError> {
        let shm = shm_of(&memory)?;
        shm.store(H_MAGIC, 0, Ordering::Release)
            .map_err(|e| RegionError::Corrupt(e.into()))?;
        Self::from_shm(shm, Some(Box::new(memory)), doorbell, Some(format))
    }

    /// A region over loom's model of memory (`--cfg loom` only), formatted.
    #[cfg(loom)]
    #[doc(hidden)]
    pub fn model(
        len: usize,
        doorbell: Arc<dyn Doorbell>,
        format: FormatOptions,
    ) -> Result<Region, RegionError> {
        Self::from_shm(Shm::model(len), None, doorbell, Some(format))
    }

    /// Another peer's handle on the same model memory (`--cfg loom` only).
    #[cfg(loom)]
    #[doc(hidden)]
    pub fn model_peer(&self, doorbell: Arc<dyn Doorbell>) -> Result<Region, RegionError> {
        Self::from_shm(self.inner.shm.clone(), None, doorbell, None)
    }

    fn from_shm(
        shm: Shm,
        memory: Option<Box<dyn RegionMemoryDebug>>,
        doorbell: Arc<dyn Doorbell>,
        format: Option<FormatOptions>,
    ) -> Result<Region, RegionError> {
        let size = shm.len() as u64;
        if let Some(f) = format {
            Self::format_if_blank(&shm, f)?;
        }
        let header = read_header(&shm)?;
        if header.magic == 0 {
            return Err(RegionError::NotFormatted);
        }
        let geo = Geometry::validate(&header, size)?;
        let hubs = (0..doorbell.vectors()).map(|_| Hub::default()).collect();
        Ok(Region {
            inner: Arc::new(RegionInner {
                shm,
                geo,
                doorbell,
                hubs,
                _memory: memory,
            }),
        })
    }

    fn format_if_blank(shm: &Shm, f: FormatOptions) -> Result<(), RegionError> {
        let size = shm.len() as u64;
        let geo =
            Geometry::fit(size, f.channels, f.ring_size_max).ok_or(RegionError::DoesNotFit {
                channels: f.channels,
                size,
            })?;
        let corrupt = |e: ivshm_mem::OutOfBounds| RegionError::Corrupt(e.into());
        match shm
            .compare_exchange(H_MAGIC, 0, MAGIC_FORMATTING)
            .map_err(corrupt)?
        {
            Ok(_) => {
                // Ours: clear header and directory, then publish.
                let dir_end = geo.entry_offset(geo.channels) as usize;
                shm.zero(4, dir_end - 4).map_err(corrupt)?;
                write_header(shm, &geo.header())?;
                Ok(())
            }
            Err(MAGIC) => Ok(()),
            Err(MAGIC_FORMATTING) => {
                // Someone else formats: wait for the magic (bounded).
                let deadline = Deadline::after(Some(Duration::from_secs(2)));
                let mut turn = 0u32;
                loop {
                    if shm.load(H_MAGIC, Ordering::Acquire).map_err(corrupt)? == MAGIC {
                        return Ok(());
                    }
                    if deadline.expired() {
                        return Err(RegionError::FormatInProgress);
                    }
                    backoff(turn);
                    turn = turn.saturating_add(1);
                }
            }
            // Something else: `open` reports the bad magic.
            Err(_) => Ok(()),
        }
    }

    /// The validated geometry.
    pub fn geometry(&self) -> Geometry {
        self.inner.geo
    }

    /// Our peer id (the doorbell's).
    pub fn own_id(&self) -> u16 {
        self.inner.doorbell.own_id()
    }

    /// Opens the channel `name`: joins it if another peer created it and waits for a partner,
    /// else creates it and waits for one. Two peers that open one name get the two ends of one
    /// channel, whoever comes first; no configuration is needed beyond the name.
    pub fn channel(&self, name: &str, opts: ChannelOptions) -> Result<Channel, RegionError> {
        let field = name_field(name)?;
        let vectors = self.inner.doorbell.vectors();
        if opts.vector >= vectors || opts.vector > 255 {
            return Err(RegionError::BadVector {
                vector: opts.vector,
                vectors,
            });
        }
        let me = attached_word(self.own_id(), opts.vector);
        let inner = &self.inner;
        let shm = &inner.shm;
        let geo = inner.geo;
        let _lock = self.lock(opts.lock_timeout)?;
        let mut free = None;
        for index in 0..geo.channels {
            let e = geo.entry_offset(index) as usize;
            let state = shm.load(e + E_STATE, Ordering::Acquire)?;
            if state != STATE_ACTIVE {
                if state == STATE_FREE && free.is_none() {
                    free = Some(index);
                }
                continue;
            }
            let a = shm.load(e + E_SIDE_A, Ordering::Acquire)?;
            let b = shm.load(e + E_SIDE_B, Ordering::Acquire)?;
            let (sa, pa, _) = side_parts(a);
            let (sb, pb, _) = side_parts(b);
            if sa != SIDE_ATTACHED && sb != SIDE_ATTACHED {
                // Nobody uses it any more (both closed or gone, or garbage): reclaim.
                shm.store(e + E_STATE, STATE_FREE, Ordering::Release)?;
                if free.is_none() {
                    free = Some(index);
                }
                continue;
            }
            let mut stored = [0u8; NAME_FIELD];
            shm.read(e + E_NAME, &mut stored)?;
            if stored != field {
                continue;
            }
            match (sa, sb) {
                (SIDE_ATTACHED, SIDE_EMPTY) => {
                    shm.store(e + E_SIDE_B, me, Ordering::Release)?;
                    return self.endpoint(name, index, Side::B, me, opts);
                }
                (SIDE_ATTACHED, SIDE_ATTACHED) => {
                    return Err(RegionError::Busy {
                        name: name.into(),
                        a: pa,
                        b: pb,
                    })
                }
                // One side closed or left: the channel is winding down; a new one is made.
                _ => {}
            }
        }
        let index = free.ok_or(RegionError::DirectoryFull {
            channels: geo.channels,
        })?;
        let e = geo.entry_offset(index) as usize;
        let generation = shm.load(e + E_GENERATION, Ordering::Relaxed)?;
        shm.store(
            e + E_GENERATION,
            generation.wrapping_add(1),
            Ordering::Relaxed,
        )?;
        shm.write(e + E_NAME, &field)?;
        shm.store(e + E_SIDE_A, me, Ordering::Relaxed)?;
        shm.store(e + E_SIDE_B, 0, Ordering::Relaxed)?;
        for (b_to_a, off_field, size_field) in [
            (false, E_RING_AB_OFFSET, E_RING_AB_SIZE),
            (true, E_RING_BA_OFFSET, E_RING_BA_SIZE),
        ] {
            let ring = geo.ring_offset(index, b_to_a);
            shm.store(e + off_field, ring as u32, Ordering::Relaxed)?;
            shm.store(e + off_field + 4, (ring >> 32) as u32, Ordering::Relaxed)?;
            shm.store(e + size_field, geo.ring_size, Ordering::Relaxed)?;
            ring::init(&shm.ring(ring as usize, geo.ring_size)?);
        }
        shm.store(e + E_STATE, STATE_ACTIVE, Ordering::Release)?;
        self.endpoint(name, index, Side::A, me, opts)
    }

    /// Builds our endpoint of entry `index`, after checking that the entry's ring fields are
    /// the ones version 1 prescribes.
    fn endpoint(
        &self,
        name: &str,
        index: u32,
        side: Side,
        own_word: u32,
        opts: ChannelOptions,
    ) -> Result<Channel, RegionError> {
        let inner = &self.inner;
        let shm = &inner.shm;
        let geo = inner.geo;
        let e = geo.entry_offset(index) as usize;
        let mut rings = [0usize; 2];
        for (i, (b_to_a, off_field, size_field)) in [
            (false, E_RING_AB_OFFSET, E_RING_AB_SIZE),
            (true, E_RING_BA_OFFSET, E_RING_BA_SIZE),
        ]
        .into_iter()
        .enumerate()
        {
            let want = geo.ring_offset(index, b_to_a);
            let lo = shm.load(e + off_field, Ordering::Relaxed)?;
            let hi = shm.load(e + off_field + 4, Ordering::Relaxed)?;
            let size = shm.load(e + size_field, Ordering::Relaxed)?;
            if u64::from(lo) | (u64::from(hi) << 32) != want || size != geo.ring_size {
                return Err(RegionError::Corrupt(Corruption::EntryChanged {
                    what: "ring offset or size",
                }));
            }
            rings[i] = want as usize;
        }
        let ab = shm.ring(rings[0], geo.ring_size)?;
        let ba = shm.ring(rings[1], geo.ring_size)?;
        let (tx, rx) = match side {
            Side::A => (ab, ba),
            Side::B => (ba, ab),
        };
        let (side_a, side_b) = (shm.word(e + E_SIDE_A)?, shm.word(e + E_SIDE_B)?);
        let (own, peer) = match side {
            Side::A => (side_a, side_b),
            Side::B => (side_b, side_a),
        };
        let end = Endpoint {
            region: inner.clone(),
            name: name.into(),
            entry: e,
            side,
            own,
            peer,
            own_word,
            vector: opts.vector,
            spin: opts.spin,
            failed: Default::default(),
        };
        Ok(Channel::new(end, Producer::new(tx), Consumer::new(rx)))
    }

    fn lock(&self, timeout: Duration) -> Result<DirLock<'_>, RegionError> {
        let shm = &self.inner.shm;
        let word = LOCK_HELD | u32::from(self.own_id());
        let deadline = Deadline::after(Some(timeout));
        let mut turn = 0u32;
        loop {
            match shm.compare_exchange(H_LOCK, 0, word)? {
                Ok(_) => return Ok(DirLock { shm, word }),
                Err(holder) => {
                    if deadline.expired() {
                        return Err(RegionError::DirectoryLocked {
                            holder: holder as u16,
                        });
                    }
                }
            }
            backoff(turn);
            turn = turn.saturating_add(1);
        }
    }

    /// The entries in use.
    pub fn channels(&self) -> Result<Vec<ChannelInfo>, RegionError> {
        let shm = &self.inner.shm;
        let geo = self.inner.geo;
        let mut out = Vec::new();
        for index in 0..geo.channels {
            let e = geo.entry_offset(index) as usize;
            if shm.load(e + E_STATE, Ordering::Acquire)? != STATE_ACTIVE {
                continue;
            }
            let mut name = [0u8; NAME_FIELD];
            shm.read(e + E_NAME, &mut name)?;
            let len = name.iter().position(|&b| b == 0).unwrap_or(NAME_MAX);
            out.push(ChannelInfo {
                index,
                name: name[..len].to_vec(),
                a: side_info(shm.load(e + E_SIDE_A, Ordering::Acquire)?),
                b: side_info(shm.load(e + E_SIDE_B, Ordering::Acquire)?),
            });
        }
        Ok(out)
    }

    /// Marks every channel side that `peer` had attached as gone (call it when the server
    /// reports that `peer` left), frees the directory lock if `peer` held it, and rings the
    /// surviving sides so that their waits return [`crate::ChannelError::PeerGone`]. Returns
    /// how many sides were marked. The same as [`mark_departed`], with our doorbell ringing.
    pub fn peer_left(&self, peer: u16) -> Result<usize, RegionError> {
        let departure = mark_shm(&self.inner.shm, self.inner.geo, peer)?;
        for &(p, v) in &departure.to_ring {
            // Best effort: a survivor that cannot be rung sees the mark at its next look.
            let _ = self.inner.doorbell.ring(p, v);
        }
        Ok(departure.marked)
    }
}

/// What [`mark_departed`] did in a region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Departure {
    /// Side words changed from attached to gone.
    pub marked: usize,
    /// Whether the departed peer held the directory lock (it is free now).
    pub lock_freed: bool,
    /// The surviving endpoints of the marked channels, as (peer, vector): ring them so that
    /// sleepers wake and see the mark.
    pub to_ring: Vec<(u16, u16)>,
}

/// Marks the channel sides of a peer that left, in `memory` as another party (the ivshm
/// server) sees it, without a doorbell and without the directory lock: the caller rings
/// [`Departure::to_ring`] itself. `Ok(None)` when the memory does not start with a formatted
/// channel region header (magic `ICHN`); an error when the header is not a valid layout.
///
/// Bounded and non-blocking whatever the memory holds: the header is read once and validated
/// against `memory`'s length, then each directory entry's state and side words are read once
/// (at most 65,536 entries); side words change only by compare-and-exchange from the exact
/// word read, and the lock only from `0x80000000 | peer` to 0. Nothing else is written.
pub fn mark_departed(memory: SharedView<'_>, peer: u16) -> Result<Option<Departure>, RegionError> {
    if memory.as_ptr() as usize % 64 != 0 {
        return Err(RegionError::Misaligned);
    }
    // SAFETY: `memory` is valid for reads and writes of its length for the lifetime of the
    // borrow, which outlives `shm` (a local of this function); a `SharedView` never hands out
    // Rust references to the bytes.
    let shm = unsafe { Shm::new(memory.as_ptr(), memory.len()) };
    let header = read_header(&shm)?;
    if header.magic != MAGIC {
        return Ok(None);
    }
    let geo = Geometry::validate(&header, shm.len() as u64)?;
    mark_shm(&shm, geo, peer).map(Some)
}

/// The marking of [`mark_departed`] over validated geometry.
fn mark_shm(shm: &Shm, geo: Geometry, peer: u16) -> Result<Departure, RegionError> {
    let mut departure = Departure::default();
    for index in 0..geo.channels {
        let e = geo.entry_offset(index) as usize;
        if shm.load(e + E_STATE, Ordering::Acquire)? != STATE_ACTIVE {
            continue;
        }
        for (mine, other) in [(E_SIDE_A, E_SIDE_B), (E_SIDE_B, E_SIDE_A)] {
            let word = shm.load(e + mine, Ordering::Acquire)?;
            let (state, p, _) = side_parts(word);
            if state != SIDE_ATTACHED || p != peer {
                continue;
            }
            if shm
                .compare_exchange(e + mine, word, gone_word(word))?
                .is_ok()
            {
                departure.marked += 1;
                let (so, po, vo) = side_parts(shm.load(e + other, Ordering::Acquire)?);
                if so == SIDE_ATTACHED && po != peer {
                    departure.to_ring.push((po, u16::from(vo)));
                }
            }
        }
    }
    departure.lock_freed = shm
        .compare_exchange(H_LOCK, LOCK_HELD | u32::from(peer), 0)?
        .is_ok();
    crate::sync::fence(Ordering::SeqCst);
    departure.to_ring.sort_unstable();
    departure.to_ring.dedup();
    Ok(departure)
}

impl RegionInner {
    pub(crate) fn hub(&self, vector: u16) -> &Hub {
        // `vector` was checked against the doorbell's vectors when the channel was opened.
        &self.hubs[usize::from(vector)]
    }

    /// Frees entry `entry` if no side is attached any more (best effort, bounded wait for the
    /// lock; a later open reclaims it otherwise).
    pub(crate) fn free_if_unused(&self, entry: usize) {
        let shm = &self.shm;
        let word = LOCK_HELD | u32::from(self.doorbell.own_id());
        let mut turn = 0;
        while !matches!(shm.compare_exchange(H_LOCK, 0, word), Ok(Ok(_))) {
            if turn > 100 {
                return;
            }
            backoff(turn);
            turn += 1;
        }
        let _unlock = DirLock { shm, word };
        let attached = |o| {
            shm.load(entry + o, Ordering::Acquire)
                .map_or(true, |w| side_parts(w).0 == SIDE_ATTACHED)
        };
        if !attached(E_SIDE_A) && !attached(E_SIDE_B) {
            let _ = shm.store(entry + E_STATE, STATE_FREE, Ordering::Release);
        }
    }
}

impl From<ivshm_mem::OutOfBounds> for RegionError {
    fn from(e: ivshm_mem::OutOfBounds) -> Self {
        RegionError::Corrupt(e.into())
    }
}

const _: () = assert!(ENTRY_SIZE as usize >= E_RING_BA_SIZE + 4 && HEADER_SIZE as usize > H_LOCK);
const _: () = assert!(SIDE_CLOSED < SIDE_GONE);
