//! A ping-pong protocol over shared memory and doorbells, used by `ivshm guest bench` to count
//! round trips (none may be lost) and to compare interrupt delivery with shared-memory polling
//! in the same run.
//!
//! Two peers share a 16-byte **control block** at an agreed offset in shared memory (three
//! 32-bit words, 4-byte aligned): `ready` (+0), `ping` (+4), `pong` (+8). The *responder* starts
//! first; the *pinger* drives:
//!
//! 1. The responder zeroes `ping`/`pong` and stores [`READY_MAGIC`] in `ready`. The pinger polls
//!    for it, then clears `ready` (so a stale block never starts a later run).
//! 2. **Doorbell phase**, round trip `i` = 1..=N: the pinger stores `i` in `ping` and rings the
//!    responder's vector; the responder, woken by its doorbell, copies `ping` to `pong` and rings
//!    the pinger's vector back; the pinger checks `pong == i`. A missing doorbell is a timeout, a
//!    wrong echo a mismatch: either fails the run, so a completed run lost nothing.
//! 3. The pinger sends [`SWITCH_TO_POLLING`] the same way; both switch to polling.
//! 4. **Polling phase**, `i` = 1..=N: the pinger stores `POLLING_FLAG | i` in `ping` and spins until
//!    `pong` equals it; the responder spins on `ping` and copies each new value to `pong`.
//! 5. The pinger stores [`DONE`]; the responder echoes it and returns.
//!
//! Any peer that maps the memory and can ring/receive doorbells (a guest, or a host peer) can
//! take either role.

use crate::doorbell::DoorbellError;
use ivshm_mem::SharedView;
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// `ready` value stored by a responder that is waiting for a pinger ("IVPP").
pub const READY_MAGIC: u32 = 0x4956_5050;
/// Flag on `ping` values of the polling phase.
pub const POLLING_FLAG: u32 = 0x8000_0000;
/// `ping` value that ends the doorbell phase.
pub const SWITCH_TO_POLLING: u32 = 0xffff_fffe;
/// `ping` value that ends the run.
pub const DONE: u32 = 0xffff_ffff;
/// Bytes the control block occupies.
pub const CONTROL_BLOCK_SIZE: usize = 16;
/// Most round trips per phase (sequence numbers must stay below the flag and markers).
pub const MAX_ROUND_TRIPS: u32 = POLLING_FLAG - 1;

/// Ringing a peer and waiting for own doorbells; implemented by [`crate::MappedDevice`].
pub trait Doorbells {
    /// Rings `vector` of `peer`.
    fn ring(&self, peer: u16, vector: u16) -> Result<(), DoorbellError>;
    /// Waits for own `vector`; returns the (coalesced) count.
    fn wait_rung(&self, vector: u16, timeout: Duration) -> Result<u64, DoorbellError>;
}

impl Doorbells for crate::MappedDevice {
    fn ring(&self, peer: u16, vector: u16) -> Result<(), DoorbellError> {
        self.notify(peer, vector)
    }

    fn wait_rung(&self, vector: u16, timeout: Duration) -> Result<u64, DoorbellError> {
        self.wait(vector, timeout)
    }
}

/// Who talks to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingPongConfig {
    /// The other side's peer ID.
    pub peer: u16,
    /// Vector rung in both directions.
    pub vector: u16,
    /// Round trips per phase (1..=[`MAX_ROUND_TRIPS`]).
    pub round_trips: u32,
    /// Longest wait for any single step.
    pub timeout: Duration,
}

/// What went wrong in a run.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum PingPongError {
    /// the {CONTROL_BLOCK_SIZE:}-byte control block at offset {offset:#x} does not fit in {size}
    /// bytes of shared memory or is not 4-byte aligned
    ///
    /// The control block does not fit in shared memory.
    BadOffset {
        /// Its offset.
        offset: usize,
        /// Shared memory size.
        size: usize,
    },
    /// round trips must be 1..={MAX_ROUND_TRIPS:}, not {0}
    ///
    /// Round trips out of range.
    BadCount(u32),
    /// no responder marked the control block ready within {0:?}: start `ivshm guest bench --respond`
    /// on the other side first
    ///
    /// No responder showed up.
    NoResponder(Duration),
    /// round trip {round_trip} of the {phase} phase got no answer: {error}
    ///
    /// A doorbell did not arrive: it was lost (or the peer died).
    Lost {
        /// Which phase.
        phase: &'static str,
        /// Sequence number (1-based).
        round_trip: u32,
        /// The wait error.
        error: DoorbellError,
    },
    /// round trip {round_trip}: expected echo {expected:#x}, found {found:#x}
    ///
    /// The echo did not match.
    Mismatch {
        /// Sequence number.
        round_trip: u32,
        /// Expected value.
        expected: u32,
        /// Value found in `pong`.
        found: u32,
    },
    /// round trip {round_trip}: {count} doorbells arrived for one ring
    ///
    /// More doorbells than sent arrived.
    Extra {
        /// Sequence number.
        round_trip: u32,
        /// How many arrived.
        count: u64,
    },
    /// polling phase: no change within {0:?}
    ///
    /// A polling step timed out.
    PollTimeout(Duration),
    /// ringing the peer failed: {0}
    ///
    /// Ringing failed.
    Ring(DoorbellError),
}

/// The pinger's measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingReport {
    /// Doorbell round trips completed (all of them: a lost one fails the run).
    pub doorbell_round_trips: u32,
    /// Time for all doorbell round trips.
    pub doorbell_elapsed: Duration,
    /// Polling round trips completed.
    pub polling_round_trips: u32,
    /// Time for all polling round trips.
    pub polling_elapsed: Duration,
}

impl PingReport {
    /// Mean doorbell round trip.
    pub fn doorbell_mean(&self) -> Duration {
        self.doorbell_elapsed / self.doorbell_round_trips.max(1)
    }

    /// Mean polling round trip.
    pub fn polling_mean(&self) -> Duration {
        self.polling_elapsed / self.polling_round_trips.max(1)
    }

    /// Doorbell round trip time over polling round trip time (how much slower interrupts are).
    pub fn ratio(&self) -> f64 {
        let polling = self.polling_mean().as_secs_f64();
        if polling == 0.0 {
            f64::INFINITY
        } else {
            self.doorbell_mean().as_secs_f64() / polling
        }
    }
}

/// What the responder answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RespondReport {
    /// Doorbells answered (including the phase switch).
    pub doorbells: u32,
    /// Polling values echoed (excluding [`DONE`]).
    pub polls: u32,
}

struct ControlBlock<'a> {
    ready: &'a AtomicU32,
    ping: &'a AtomicU32,
    pong: &'a AtomicU32,
}

impl<'a> ControlBlock<'a> {
    fn new(memory: SharedView<'a>, offset: usize) -> Result<ControlBlock<'a>, PingPongError> {
        let bad = || PingPongError::BadOffset {
            offset,
            size: memory.len(),
        };
        let end = offset.checked_add(CONTROL_BLOCK_SIZE).ok_or_else(bad)?;
        if end > memory.len() {
            return Err(bad());
        }
        Ok(ControlBlock {
            ready: memory.atomic_u32(offset).map_err(|_| bad())?,
            ping: memory.atomic_u32(offset + 4).map_err(|_| bad())?,
            pong: memory.atomic_u32(offset + 8).map_err(|_| bad())?,
        })
    }
}

/// Spins until `word` satisfies `done`, or `timeout` passes; returns the value seen.
fn spin_until(word: &AtomicU32, timeout: Duration, done: impl Fn(u32) -> bool) -> Option<u32> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let value = word.load(Ordering::SeqCst);
        if done(value) {
            return Some(value);
        }
        spins = spins.wrapping_add(1);
        if spins % 4096 == 0 && start.elapsed() > timeout {
            return None;
        }
        std::hint::spin_loop();
    }
}

fn check_config(config: &PingPongConfig) -> Result<(), PingPongError> {
    if config.round_trips == 0 || config.round_trips > MAX_ROUND_TRIPS {
        return Err(PingPongError::BadCount(config.round_trips));
    }
    Ok(())
}

/// Drains doorbells left over from an earlier run.
fn drain(doorbells: &impl Doorbells, vector: u16) {
    while let Ok(count) = doorbells.wait_rung(vector, Duration::ZERO) {
        tracing::debug!(vector, count, "drained a stale doorbell");
    }
}

/// One doorbell round trip: store `value` in `ping`, ring, wait, check the echo.
fn doorbell_round_trip(
    block: &ControlBlock<'_>,
    doorbells: &impl Doorbells,
    config: &PingPongConfig,
    round_trip: u32,
    value: u32,
) -> Result<(), PingPongError> {
    block.ping.store(value, Ordering::SeqCst);
    fence(Ordering::SeqCst);
    doorbells
        .ring(config.peer, config.vector)
        .map_err(PingPongError::Ring)?;
    let count = doorbells
        .wait_rung(config.vector, config.timeout)
        .map_err(|error| PingPongError::Lost {
            phase: "doorbell",
            round_trip,
            error,
        })?;
    if count != 1 {
        return Err(PingPongError::Extra { round_trip, count });
    }
    let found = block.pong.load(Ordering::SeqCst);
    if found != value {
        return Err(PingPongError::Mismatch {
            round_trip,
            expected: value,
            found,
        });
    }
    Ok(())
}

/// Runs the pinger side (see the module docs) against a responder already started.
pub fn run_pinger(
    memory: SharedView<'_>,
    offset: usize,
    doorbells: &impl Doorbells,
    config: &PingPongConfig,
) -> Result<PingReport, PingPongError> {
    check_config(config)?;
    let block = ControlBlock::new(memory, offset)?;
    spin_until_ready(&block, config.timeout)?;
    block.ready.store(0, Ordering::SeqCst);
    drain(doorbells, config.vector);

    let start = Instant::now();
    for i in 1..=config.round_trips {
        doorbell_round_trip(&block, doorbells, config, i, i)?;
    }
    let doorbell_elapsed = start.elapsed();
    doorbell_round_trip(
        &block,
        doorbells,
        config,
        config.round_trips + 1,
        SWITCH_TO_POLLING,
    )?;

    let start = Instant::now();
    for i in 1..=config.round_trips {
        let value = POLLING_FLAG | i;
        block.ping.store(value, Ordering::SeqCst);
        spin_until(block.pong, config.timeout, |v| v == value)
            .ok_or(PingPongError::PollTimeout(config.timeout))?;
    }
    let polling_elapsed = start.elapsed();
    block.ping.store(DONE, Ordering::SeqCst);
    spin_until(block.pong, config.timeout, |v| v == DONE)
        .ok_or(PingPongError::PollTimeout(config.timeout))?;
    Ok(PingReport {
        doorbell_round_trips: config.round_trips,
        doorbell_elapsed,
        polling_round_trips: config.round_trips,
        polling_elapsed,
    })
}

fn spin_until_ready(block: &ControlBlock<'_>, timeout: Duration) -> Result<(), PingPongError> {
    let start = Instant::now();
    while block.ready.load(Ordering::SeqCst) != READY_MAGIC {
        if start.elapsed() > timeout {
            return Err(PingPongError::NoResponder(timeout));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Runs the responder side until the pinger says [`DONE`]. `config.round_trips` is not used;
/// `config.timeout` bounds each wait (the first one too, so start the pinger within it).
pub fn run_responder(
    memory: SharedView<'_>,
    offset: usize,
    doorbells: &impl Doorbells,
    config: &PingPongConfig,
) -> Result<RespondReport, PingPongError> {
    let block = ControlBlock::new(memory, offset)?;
    drain(doorbells, config.vector);
    block.ping.store(0, Ordering::SeqCst);
    block.pong.store(0, Ordering::SeqCst);
    block.ready.store(READY_MAGIC, Ordering::SeqCst);
    let mut report = RespondReport {
        doorbells: 0,
        polls: 0,
    };
    loop {
        doorbells
            .wait_rung(config.vector, config.timeout)
            .map_err(|error| PingPongError::Lost {
                phase: "doorbell",
                round_trip: report.doorbells + 1,
                error,
            })?;
        let value = block.ping.load(Ordering::SeqCst);
        block.pong.store(value, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        doorbells
            .ring(config.peer, config.vector)
            .map_err(PingPongError::Ring)?;
        report.doorbells += 1;
        if value == SWITCH_TO_POLLING {
            break;
        }
    }
    let mut last = SWITCH_TO_POLLING;
    loop {
        let value = spin_until(block.ping, config.timeout, |v| v != last)
            .ok_or(PingPongError::PollTimeout(config.timeout))?;
        block.pong.store(value, Ordering::SeqCst);
        last = value;
        if value == DONE {
            return Ok(report);
        }
        report.polls += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doorbell::{VectorEventfds, WaitedOn};

    /// Two in-process peers whose doorbells are eventfds: ringing peer P's vector V writes 1 to
    /// P's eventfd V, exactly what KVM/QEMU do for an ivshmem doorbell.
    struct Peer<'a> {
        own: &'a VectorEventfds,
        others: &'a [&'a VectorEventfds],
    }

    impl Doorbells for Peer<'_> {
        fn ring(&self, peer: u16, vector: u16) -> Result<(), DoorbellError> {
            let fd = self.others[usize::from(peer)].fd(vector)?;
            rustix::io::write(fd, &1u64.to_ne_bytes()).unwrap();
            Ok(())
        }

        fn wait_rung(&self, vector: u16, timeout: Duration) -> Result<u64, DoorbellError> {
            self.own.wait(vector, timeout)
        }
    }

    #[test]
    fn a_thousand_round_trips_complete_and_echo_every_value() {
        let mut backing = vec![0u64; 512];
        // SAFETY: `backing` outlives the view and both threads (scoped).
        let memory = unsafe { SharedView::from_raw_parts(backing.as_mut_ptr().cast(), 4096) };
        let fds0 = VectorEventfds::new(4).unwrap();
        let fds1 = VectorEventfds::new(4).unwrap();
        let all = [&fds0, &fds1];
        let timeout = Duration::from_secs(30);
        let (ping, respond) = std::thread::scope(|s| {
            let responder = s.spawn(|| {
                let me = Peer {
                    own: &fds1,
                    others: &all,
                };
                run_responder(
                    memory,
                    64,
                    &me,
                    &PingPongConfig {
                        peer: 0,
                        vector: 2,
                        round_trips: 1,
                        timeout,
                    },
                )
            });
            let me = Peer {
                own: &fds0,
                others: &all,
            };
            let ping = run_pinger(
                memory,
                64,
                &me,
                &PingPongConfig {
                    peer: 1,
                    vector: 2,
                    round_trips: 1000,
                    timeout,
                },
            );
            (ping, responder.join().unwrap())
        });
        let ping = ping.unwrap();
        assert_eq!(ping.doorbell_round_trips, 1000);
        assert_eq!(ping.polling_round_trips, 1000);
        assert_eq!(
            respond.unwrap(),
            RespondReport {
                doorbells: 1001,
                polls: 1000
            }
        );
        assert_eq!(
            memory.atomic_u32(64 + 8).unwrap().load(Ordering::SeqCst),
            DONE
        );
        assert_eq!(
            memory.atomic_u32(64).unwrap().load(Ordering::SeqCst),
            0,
            "ready was cleared"
        );
    }

    #[test]
    fn a_lost_doorbell_fails_the_run() {
        /// Never delivers anything.
        struct Deaf;
        impl Doorbells for Deaf {
            fn ring(&self, _: u16, _: u16) -> Result<(), DoorbellError> {
                Ok(())
            }
            fn wait_rung(&self, vector: u16, timeout: Duration) -> Result<u64, DoorbellError> {
                Err(DoorbellError::Timeout {
                    vector: WaitedOn(Some(vector)),
                    timeout,
                })
            }
        }
        let mut backing = vec![0u64; 8];
        // SAFETY: `backing` outlives the view.
        let memory = unsafe { SharedView::from_raw_parts(backing.as_mut_ptr().cast(), 64) };
        memory
            .atomic_u32(0)
            .unwrap()
            .store(READY_MAGIC, Ordering::SeqCst);
        let config = PingPongConfig {
            peer: 1,
            vector: 0,
            round_trips: 5,
            timeout: Duration::from_millis(10),
        };
        let err = run_pinger(memory, 0, &Deaf, &config).unwrap_err();
        assert!(
            matches!(err, PingPongError::Lost { round_trip: 1, .. }),
            "{err}"
        );
        assert!(matches!(
            run_pinger(memory, 0, &Deaf, &config),
            Err(PingPongError::NoResponder(_))
        ));
        assert!(matches!(
            run_pinger(memory, 60, &Deaf, &config),
            Err(PingPongError::BadOffset { .. })
        ));
        let zero = PingPongConfig {
            round_trips: 0,
            ..config
        };
        assert!(matches!(
            run_pinger(memory, 0, &Deaf, &zero),
            Err(PingPongError::BadCount(0))
        ));
    }
}
