//! [`Channel`]: one endpoint of a named channel, and its two halves [`Sender`] and
//! [`Receiver`].
//!
//! **Waiting.** A blocking call first spins for the endpoint's [`Spin`] budget, looking at the
//! ring; then it arms the ring (tells the other side to ring our doorbell at the next change,
//! with a full fence) and sleeps on its doorbell vector. A sender rings the other side only when
//! it asked for it, so a busy channel makes no system calls. `timeout`: `None` waits without a
//! limit; `Some(Duration::ZERO)` never waits and returns [`ChannelError::WouldBlock`] (with the
//! ring armed: the doorbell will ring when the other side makes progress); any other value waits
//! at most that long ([`ChannelError::Timeout`]); huge values mean forever.
//!
//! **Your own poll loop.** Put [`Channel::poll_fd`] in it; after `WouldBlock`, sleep until it is
//! readable, call [`Channel::take_doorbell`], and try again. Do not block on the same vector from
//! other threads at the same time (the poll loop consumes the rings).
//!
//! **Threads.** [`Channel::split`] gives a [`Sender`] and a [`Receiver`] that may live in
//! different threads: both block on the endpoint's one vector, shared fairly (see `wait.rs`).

use std::os::fd::BorrowedFd;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::doorbell::Doorbell;
use crate::error::{ChannelError, Corruption};
use crate::layout::{side_parts, side_word, SIDE_ATTACHED, SIDE_CLOSED, SIDE_EMPTY, SIDE_GONE};
use crate::region::RegionInner;
use crate::ring::{Consumer, Producer, Record, Slot};
use crate::shm::Word;
use crate::sync::{fence, keep_spinning, Deadline, Ordering};

/// How long a blocking call spins before it sleeps on the doorbell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spin {
    /// Sleep at once (no spinning): the cheapest on CPU, a doorbell round trip per wait.
    Never,
    /// Spin this long, then sleep.
    For(Duration),
    /// Never sleep: busy-poll (lowest latency, one CPU per waiting thread).
    Forever,
}

impl Default for Spin {
    /// 5 µs.
    fn default() -> Self {
        Spin::For(Duration::from_micros(5))
    }
}

impl Spin {
    fn budget(self) -> Option<Duration> {
        match self {
            Spin::Never => Some(Duration::ZERO),
            Spin::For(d) => Some(d),
            Spin::Forever => None,
        }
    }
}

/// Which side of the channel an endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The creator (sends on the A→B ring).
    A,
    /// The joiner (sends on the B→A ring).
    B,
}

/// The state shared by the two halves of one endpoint; the side is closed when it drops.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) region: Arc<RegionInner>,
    pub(crate) name: String,
    /// Region offset of the directory entry.
    pub(crate) entry: usize,
    pub(crate) side: Side,
    /// Our side word in the entry.
    pub(crate) own: Word,
    /// The peer's side word in the entry.
    pub(crate) peer: Word,
    /// Our side word as we wrote it.
    pub(crate) own_word: u32,
    pub(crate) vector: u16,
    pub(crate) spin: Spin,
    /// Set once the channel is found corrupt: every later call fails with it.
    pub(crate) failed: OnceLock<Corruption>,
}

/// The other side's state, from its side word.
enum PeerState {
    NotYet,
    Attached { peer: u16, vector: u16 },
    Closed { peer: u16 },
    Gone { peer: u16 },
}

/// The other end of a channel ([`Channel::peer_status`]), with its peer id once it joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerStatus {
    /// Nobody has joined yet.
    NotJoined,
    /// This peer is attached.
    Attached(u16),
    /// This peer closed its side (messages it sent before may still be queued).
    Closed(u16),
    /// This peer left the region (its side was marked gone).
    Gone(u16),
}

impl Endpoint {
    fn doorbell(&self) -> &dyn Doorbell {
        &*self.region.doorbell
    }

    /// Records a corruption (first one wins) and returns the channel's error.
    #[cold]
    #[inline(never)]
    fn fail(&self, what: Corruption) -> ChannelError {
        let what = self.failed.get_or_init(|| what).clone();
        ChannelError::ChannelCorrupt {
            channel: self.name.clone(),
            what,
        }
    }

    #[inline(always)]
    fn check_failed(&self) -> Result<(), ChannelError> {
        match self.failed.get() {
            Some(what) => Err(self.failed_error(what)),
            None => Ok(()),
        }
    }

    #[cold]
    #[inline(never)]
    fn failed_error(&self, what: &Corruption) -> ChannelError {
        ChannelError::ChannelCorrupt {
            channel: self.name.clone(),
            what: what.clone(),
        }
    }

    #[inline(always)]
    fn peer_state(&self) -> Result<PeerState, ChannelError> {
        let word = self.peer.load(Ordering::Acquire);
        let (state, peer, vector) = side_parts(word);
        Ok(match state {
            SIDE_EMPTY => PeerState::NotYet,
            SIDE_ATTACHED => PeerState::Attached {
                peer,
                vector: vector.into(),
            },
            SIDE_CLOSED => PeerState::Closed { peer },
            SIDE_GONE => PeerState::Gone { peer },
            _ => return Err(self.fail(Corruption::SideWord { word })),
        })
    }

    /// Ok while the peer may still send or receive (attached, or not joined yet).
    #[inline(always)]
    fn peer_alive(&self) -> Result<(), ChannelError> {
        match self.peer_state()? {
            PeerState::NotYet | PeerState::Attached { .. } => Ok(()),
            PeerState::Closed { .. } => Err(ChannelError::PeerClosed),
            PeerState::Gone { peer } => Err(ChannelError::PeerGone { peer }),
        }
    }

    /// Ok while our side word is still the one we wrote.
    fn check_own(&self) -> Result<(), ChannelError> {
        let word = self.own.load(Ordering::Acquire);
        if word == self.own_word {
            Ok(())
        } else {
            Err(ChannelError::Detached)
        }
    }

    /// The other end, as [`Channel::peer_status`] says.
    fn peer_status(&self) -> Result<PeerStatus, ChannelError> {
        Ok(match self.peer_state()? {
            PeerState::NotYet => PeerStatus::NotJoined,
            PeerState::Attached { peer, .. } => PeerStatus::Attached(peer),
            PeerState::Closed { peer } => PeerStatus::Closed(peer),
            PeerState::Gone { peer } => PeerStatus::Gone(peer),
        })
    }

    /// Rings the peer's vector, if a peer is attached.
    #[inline(never)]
    fn ring_peer(&self) -> Result<(), ChannelError> {
        if let PeerState::Attached { peer, vector } = self.peer_state()? {
            self.doorbell().ring(peer, vector)?;
        }
        Ok(())
    }

    /// Sleeps on our vector until rung or `deadline` (see `wait.rs`); `arm` is called after the
    /// generation was taken and returns true when there is no need to sleep.
    fn sleep(
        &self,
        deadline: Deadline,
        arm: impl FnOnce() -> Result<bool, ChannelError>,
    ) -> Result<(), ChannelError> {
        let hub = self.region.hub(self.vector);
        let seen = hub.generation();
        if arm()? {
            return Ok(());
        }
        hub.wait(self.doorbell(), self.vector, seen, deadline)?;
        Ok(())
    }

    fn close(&self) {
        let closed = (self.own_word & !(0xf << 24)) | (SIDE_CLOSED << 24);
        // Only if it is still ours (someone may have marked it gone).
        if self.own.compare_exchange(self.own_word, closed).is_ok() {
            fence(Ordering::SeqCst);
            // Best effort: a peer that cannot be rung finds out at its next look.
            let _ = self.ring_peer();
        }
        self.region.free_if_unused(self.entry);
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.close();
    }
}

/// The sending half of an endpoint.
#[derive(Debug)]
pub struct Sender {
    end: Arc<Endpoint>,
    ring: Producer,
}

/// The receiving half of an endpoint.
#[derive(Debug)]
pub struct Receiver {
    end: Arc<Endpoint>,
    ring: Consumer,
}

/// One endpoint of a named channel: a [`Sender`] on our ring and a [`Receiver`] on the peer's.
///
/// Made by [`crate::Region::channel`]. Dropping it (or both halves after
/// [`Channel::split`]) closes our side: the peer's receiver gets [`ChannelError::PeerClosed`]
/// after the messages already sent.
#[derive(Debug)]
pub struct Channel {
    tx: Sender,
    rx: Receiver,
}

impl Channel {
    pub(crate) fn new(end: Endpoint, producer: Producer, consumer: Consumer) -> Channel {
        let end = Arc::new(end);
        Channel {
            tx: Sender {
                end: end.clone(),
                ring: producer,
            },
            rx: Receiver {
                end,
                ring: consumer,
            },
        }
    }

    /// The channel's name.
    pub fn name(&self) -> &str {
        &self.tx.end.name
    }

    /// Which side we are.
    pub fn side(&self) -> Side {
        self.tx.end.side
    }

    /// The largest message we can send (our ring's size minus 64).
    pub fn max_message(&self) -> usize {
        self.tx.max_message()
    }

    /// The peer's id once it joined (`None` before, or after it closed or left).
    pub fn peer(&self) -> Option<u16> {
        match self.tx.end.peer_state() {
            Ok(PeerState::Attached { peer, .. }) => Some(peer),
            _ => None,
        }
    }

    /// The other end, without waiting (one look at its side word). An error only for a side
    /// word that holds no valid state ([`ChannelError::ChannelCorrupt`]).
    pub fn peer_status(&self) -> Result<PeerStatus, ChannelError> {
        self.tx.end.peer_status()
    }

    /// Sends one message (see [`Sender::send`]).
    #[inline]
    pub fn send(&mut self, msg: &[u8], timeout: Option<Duration>) -> Result<(), ChannelError> {
        self.tx.send(msg, timeout)
    }

    /// Receives one message into `buf` (see [`Receiver::recv`]).
    #[inline]
    pub fn recv(
        &mut self,
        buf: &mut Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<usize, ChannelError> {
        self.rx.recv(buf, timeout)
    }

    /// The receiving half.
    pub fn receiver(&mut self) -> &mut Receiver {
        &mut self.rx
    }

    /// The sending half.
    pub fn sender(&mut self) -> &mut Sender {
        &mut self.tx
    }

    /// Splits the endpoint into its halves, e.g. for two threads.
    pub fn split(self) -> (Sender, Receiver) {
        (self.tx, self.rx)
    }

    /// The doorbell fd of our vector, for a poll loop (`None` if the doorbell has none).
    pub fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        self.tx.end.region.doorbell.fd(self.tx.end.vector)
    }

    /// Consumes pending rings of our vector without blocking (after the poll fd was readable).
    pub fn take_doorbell(&self) -> Result<bool, ChannelError> {
        Ok(self.tx.end.region.doorbell.take(self.tx.end.vector)?)
    }
}

impl Sender {
    /// The other end (see [`Channel::peer_status`]), for a channel split into its halves.
    pub fn peer_status(&self) -> Result<PeerStatus, ChannelError> {
        self.end.peer_status()
    }

    /// The largest message (our ring's size minus 64).
    pub fn max_message(&self) -> usize {
        self.ring.max_message() as usize
    }

    /// Sends `msg` (1 byte up to [`Sender::max_message`]), whole and in order. When the ring is
    /// full, waits for space as the module documentation says (`timeout`). Errors: the peer
    /// closed or left, the message is empty or too large (never split), the channel is corrupt.
    #[inline]
    pub fn send(&mut self, msg: &[u8], timeout: Option<Duration>) -> Result<(), ChannelError> {
        let slot = self.slot(msg.len(), timeout)?;
        if let Err(c) = self.ring.write(&slot, 0, msg) {
            self.ring.cancel(&slot);
            return Err(self.end.fail(c));
        }
        self.publish(&slot)
    }

    /// [`Sender::send`] without waiting: [`ChannelError::WouldBlock`] when the ring is full.
    pub fn try_send(&mut self, msg: &[u8]) -> Result<(), ChannelError> {
        self.send(msg, Some(Duration::ZERO))
    }

    /// Reserves room for a `len`-byte message in the ring (waiting for space as
    /// [`Sender::send`] does) and returns a guard that writes the message in place: no copy
    /// through a buffer of yours. [`Reservation::commit`] publishes it; dropping the guard
    /// without committing publishes nothing. Bytes of the reservation that are not written are
    /// unspecified (whatever the ring held).
    pub fn reserve(
        &mut self,
        len: usize,
        timeout: Option<Duration>,
    ) -> Result<Reservation<'_>, ChannelError> {
        let slot = self.slot(len, timeout)?;
        Ok(Reservation {
            tx: self,
            slot: Some(slot),
        })
    }

    /// Validates `len` and reserves a slot for it, waiting if the ring is full.
    #[inline(always)]
    fn slot(&mut self, len: usize, timeout: Option<Duration>) -> Result<Slot, ChannelError> {
        let end = &*self.end;
        end.check_failed()?;
        if len == 0 {
            return Err(ChannelError::Empty);
        }
        let max = self.ring.max_message();
        if len > max as usize {
            return Err(ChannelError::TooLarge { len, max });
        }
        end.peer_alive()?;
        match self.ring.reserve(len as u32) {
            Ok(Some(slot)) => Ok(slot),
            Ok(None) => self.wait_for_slot(len as u32, timeout),
            Err(c) => Err(end.fail(c)),
        }
    }

    /// Publishes a written slot and rings the peer if it asked for it.
    #[inline(always)]
    fn publish(&mut self, slot: &Slot) -> Result<(), ChannelError> {
        if self.ring.commit(slot) {
            self.end.ring_peer()?;
        }
        Ok(())
    }

    /// The ring was full: spin, then sleep until a `len`-byte record fits (or the timeout).
    #[cold]
    #[inline(never)]
    fn wait_for_slot(&mut self, len: u32, timeout: Option<Duration>) -> Result<Slot, ChannelError> {
        let end = &*self.end;
        // The clock is read only once we have to wait (not on the fast path).
        let mut deadline = None;
        let budget = end.spin.budget();
        let (mut started, mut turns, mut looks) = (None, 0, 0u32);
        loop {
            // These checks cost loads and a clock read: while spinning, every 16th look only.
            looks = looks.wrapping_add(1);
            let full = looks % 16 == 1;
            // Non-blocking and the ring armed: look again at once.
            let mut again = false;
            if full {
                end.peer_alive()?;
                if timeout == Some(Duration::ZERO) {
                    if !self.ring.arm_space(len).map_err(|c| end.fail(c))? {
                        return Err(ChannelError::WouldBlock);
                    }
                    again = true;
                } else if deadline
                    .get_or_insert_with(|| Deadline::after(timeout))
                    .expired()
                {
                    return Err(ChannelError::Timeout);
                }
            }
            if !again && !keep_spinning(budget, &mut started, &mut turns) {
                let deadline = *deadline.get_or_insert_with(|| Deadline::after(timeout));
                if !full {
                    end.peer_alive()?;
                    if deadline.expired() {
                        return Err(ChannelError::Timeout);
                    }
                }
                end.check_own()?;
                let ring = &mut self.ring;
                end.sleep(deadline, || {
                    if ring.arm_space(len).map_err(|c| end.fail(c))? {
                        return Ok(true);
                    }
                    end.peer_alive()?;
                    Ok(false)
                })?;
            }
            if let Some(slot) = self.ring.reserve(len).map_err(|c| end.fail(c))? {
                return Ok(slot);
            }
        }
    }
}

/// Room for one message in the ring, reserved by [`Sender::reserve`]: write the message in
/// place with [`Reservation::write_at`], then [`Reservation::commit`] it. Dropped without
/// committing, it publishes nothing.
///
/// The guard never lends a Rust reference into the ring (the peer may write there at any
/// time): writes are raw copies from your buffers, bounds-checked against the reserved length.
#[derive(Debug)]
pub struct Reservation<'a> {
    tx: &'a mut Sender,
    slot: Option<Slot>,
}

impl Reservation<'_> {
    /// The message's length.
    pub fn len(&self) -> usize {
        self.slot.as_ref().map_or(0, |s| s.len as usize)
    }

    /// Always false (messages carry at least one byte).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Copies `src` into the message at byte `offset`; `false` (nothing written) if that range
    /// is not inside the message.
    pub fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<bool, ChannelError> {
        let Some(slot) = &self.slot else {
            return Ok(false);
        };
        match offset.checked_add(src.len()) {
            Some(end) if end <= slot.len as usize => {}
            _ => return Ok(false),
        }
        self.tx
            .ring
            .write(slot, offset as u32, src)
            .map_err(|c| self.tx.end.fail(c))?;
        Ok(true)
    }

    /// Publishes the message (rings the peer if it waits for one).
    pub fn commit(mut self) -> Result<(), ChannelError> {
        match self.slot.take() {
            Some(slot) => self.tx.publish(&slot),
            None => Ok(()),
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.tx.ring.cancel(&slot);
        }
    }
}

impl Receiver {
    /// The other end (see [`Channel::peer_status`]), for a channel split into its halves.
    pub fn peer_status(&self) -> Result<PeerStatus, ChannelError> {
        self.end.peer_status()
    }

    /// Waits for the next message (as the module documentation says) and returns it,
    /// validated, as a guard that reads it from the ring.
    pub fn recv_message(&mut self, timeout: Option<Duration>) -> Result<Message<'_>, ChannelError> {
        let record = self.next_record(timeout)?;
        Ok(Message {
            rx: self,
            record,
            released: false,
        })
    }

    /// Receives the next message into `buf` (replacing its contents; its capacity grows to the
    /// message if needed and is kept, so a reused vector allocates only for a larger message
    /// than before; the length is at most the ring's size, a bound fixed when the region was
    /// formatted and checked against the mapping) and returns its length.
    #[inline]
    pub fn recv(
        &mut self,
        buf: &mut Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<usize, ChannelError> {
        let record = self.next_record(timeout)?;
        let len = record.len as usize;
        buf.clear();
        buf.reserve(len);
        self.ring
            .read_uninit(&record, &mut buf.spare_capacity_mut()[..len])
            .map_err(|c| self.end.fail(c))?;
        // SAFETY: `read_uninit` initialised the first `len` bytes of the spare capacity.
        unsafe { buf.set_len(len) };
        self.release(&record)?;
        Ok(len)
    }

    /// Receives the next message into `buf` and returns its length;
    /// [`ChannelError::BufferTooSmall`] leaves a message that does not fit in the ring.
    #[inline]
    pub fn recv_into(
        &mut self,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<usize, ChannelError> {
        let record = self.next_record(timeout)?;
        let len = record.len as usize;
        let Some(dst) = buf.get_mut(..len) else {
            return Err(ChannelError::BufferTooSmall {
                needed: len,
                got: buf.len(),
            });
        };
        self.ring
            .read(&record, 0, dst)
            .map_err(|c| self.end.fail(c))?;
        self.release(&record)?;
        Ok(len)
    }

    /// [`Receiver::recv`] without waiting: [`ChannelError::WouldBlock`] when nothing is queued.
    pub fn try_recv(&mut self, buf: &mut Vec<u8>) -> Result<usize, ChannelError> {
        self.recv(buf, Some(Duration::ZERO))
    }

    #[inline(always)]
    fn release(&mut self, record: &Record) -> Result<(), ChannelError> {
        if self.ring.release(record) {
            self.end.ring_peer()?;
        }
        Ok(())
    }

    /// When the peer closed or left: the last record it published, or the error.
    fn closed_or_gone(&self) -> Result<Option<Result<Record, ChannelError>>, ChannelError> {
        let end = &*self.end;
        match end.peer_alive() {
            Ok(()) => Ok(None),
            // The peer publishes before it closes: look once more after seeing it closed.
            Err(e) => Ok(Some(match self.ring.peek().map_err(|c| end.fail(c))? {
                Some(r) => Ok(r),
                None => Err(e),
            })),
        }
    }

    /// The next record: at once if there is one, else after waiting.
    #[inline(always)]
    fn next_record(&mut self, timeout: Option<Duration>) -> Result<Record, ChannelError> {
        let end = &*self.end;
        end.check_failed()?;
        match self.ring.peek() {
            Ok(Some(r)) => Ok(r),
            Ok(None) => self.wait_for_record(timeout),
            Err(c) => Err(end.fail(c)),
        }
    }

    /// The ring was empty: spin, then sleep until a record comes (or the timeout).
    #[cold]
    #[inline(never)]
    fn wait_for_record(&mut self, timeout: Option<Duration>) -> Result<Record, ChannelError> {
        let end = &*self.end;
        let mut deadline = None;
        let budget = end.spin.budget();
        let (mut started, mut turns, mut looks) = (None, 0, 0u32);
        loop {
            // These checks cost loads and a clock read: while spinning, every 16th look only.
            looks = looks.wrapping_add(1);
            let full = looks % 16 == 1;
            // Non-blocking and the ring armed: look again at once.
            let mut again = false;
            if full {
                if let Some(r) = self.closed_or_gone()? {
                    return r;
                }
                if timeout == Some(Duration::ZERO) {
                    if !self.ring.arm_data().map_err(|c| end.fail(c))? {
                        return Err(ChannelError::WouldBlock);
                    }
                    again = true;
                } else if deadline
                    .get_or_insert_with(|| Deadline::after(timeout))
                    .expired()
                {
                    return Err(ChannelError::Timeout);
                }
            }
            if !again && !keep_spinning(budget, &mut started, &mut turns) {
                let deadline = *deadline.get_or_insert_with(|| Deadline::after(timeout));
                if !full {
                    if let Some(r) = self.closed_or_gone()? {
                        return r;
                    }
                    if deadline.expired() {
                        return Err(ChannelError::Timeout);
                    }
                }
                end.check_own()?;
                let ring = &self.ring;
                end.sleep(deadline, || {
                    if ring.arm_data().map_err(|c| end.fail(c))? {
                        return Ok(true);
                    }
                    // After the fence: a close we miss here rings us.
                    Ok(!matches!(
                        end.peer_state()?,
                        PeerState::NotYet | PeerState::Attached { .. }
                    ))
                })?;
            }
            if let Some(r) = self.ring.peek().map_err(|c| end.fail(c))? {
                return Ok(r);
            }
        }
    }
}

/// A received message still in the ring, lent to the caller.
///
/// What the guard guarantees: its length and position were read once and validated when it was
/// made; every read stays inside this message's bytes in the ring (offsets are checked against
/// the private length); an honest sender does not reuse those bytes until the guard is dropped
/// (or [`Message::release`]d). What it cannot guarantee: a hostile peer may rewrite the bytes at
/// any time, so two reads of one range may differ: read each range once (into your own buffer)
/// and validate what you read.
#[derive(Debug)]
pub struct Message<'a> {
    rx: &'a mut Receiver,
    record: Record,
    released: bool,
}

impl Message<'_> {
    /// Payload bytes.
    pub fn len(&self) -> usize {
        self.record.len as usize
    }

    /// Always false (messages carry at least one byte).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Copies `dst.len()` bytes from payload byte `offset` into `dst`; `false` (nothing copied)
    /// if that range is not inside the message.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<bool, ChannelError> {
        match offset.checked_add(dst.len()) {
            Some(end) if end <= self.len() => {}
            _ => return Ok(false),
        }
        let end = &*self.rx.end;
        self.rx
            .ring
            .read(&self.record, offset as u32, dst)
            .map_err(|c| end.fail(c))?;
        Ok(true)
    }

    /// Copies the whole payload into a new vector.
    pub fn to_vec(&self) -> Result<Vec<u8>, ChannelError> {
        let mut v = vec![0; self.len()];
        self.read_at(0, &mut v)?;
        Ok(v)
    }

    /// Frees the message's space for the sender (also done on drop, ignoring errors).
    pub fn release(mut self) -> Result<(), ChannelError> {
        self.released = true;
        let record = self.record;
        self.rx.release(&record)
    }
}

impl Drop for Message<'_> {
    fn drop(&mut self) {
        if !self.released {
            let record = self.record;
            let _ = self.rx.release(&record);
        }
    }
}

/// Writes our side word for a newly attached endpoint.
pub(crate) fn attached_word(peer: u16, vector: u16) -> u32 {
    side_word(SIDE_ATTACHED, peer, vector as u8)
}

/// Gone-marking: the word a side gets when its peer left.
pub(crate) fn gone_word(word: u32) -> u32 {
    (word & 0x00ff_ffff) | (SIDE_GONE << 24)
}
