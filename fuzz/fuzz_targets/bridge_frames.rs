//! The socket bridge's frames and session state machine on arbitrary channel messages, as a
//! hostile bridge on the other side of the channel could send them.
//!
//! The first input byte picks this side's role; the rest is cut into messages, each led by
//! one length byte. Every message that decodes as a frame encodes to bytes that decode to the
//! same frame. The session gets a valid `HELLO` first, then every message; whatever they say it
//! must never panic, never hold more connections than its `max_connections`, never buffer more
//! of a connection than its window, and its control frames must decode.

#![no_main]

use std::time::{Duration, Instant};

use ivshm_bridge::frame::{Frame, Role};
use ivshm_bridge::session::{Action, Params, Session};
use libfuzzer_sys::fuzz_target;

const WINDOW: u32 = 4096;
const MAX_CONNECTIONS: u32 = 4;

fn params(role: Role) -> Params {
    Params {
        role,
        window: WINDOW,
        max_data: 1024,
        max_connections: MAX_CONNECTIONS,
        keepalive: Duration::from_secs(1),
        session: 7,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let (role, peer_role) = if pick & 1 == 0 {
        (Role::Listen, Role::Connect)
    } else {
        (Role::Connect, Role::Listen)
    };
    let now = Instant::now();
    let mut s = Session::new(params(role), 1 << 16, now);
    let mut peer = Session::new(params(peer_role), 1 << 16, now);
    let mut buf = Vec::new();
    peer.next_control(&mut buf, now);
    if let Some(d) = s.on_message(&buf, now).expect("a valid HELLO") {
        s.direct_written(d.slot, 0, &buf[d.offset..]);
    }
    while let Some((&len, tail)) = rest.split_first() {
        let (msg, tail) = tail.split_at(usize::from(len).min(tail.len()));
        rest = tail;
        if let Ok(frame) = Frame::decode(msg) {
            let encoded = frame.to_vec();
            assert_eq!(Frame::decode(&encoded), Ok(frame));
        }
        if role == Role::Listen && pick & 2 != 0 {
            let _ = s.accept("fuzz");
        }
        match s.on_message(msg, now) {
            Ok(Some(d)) => {
                // The socket takes half of the payload; the rest is buffered.
                let payload = &msg[d.offset..];
                let half = payload.len() / 2;
                s.direct_written(d.slot, half, &payload[half..]);
            }
            Ok(None) => {}
            Err(_) => return,
        }
        while let Some(a) = s.next_action() {
            match a {
                Action::Connect(slot) => s.connected(slot),
                Action::Flush(slot) => {
                    let n = s.pending(slot).0.len() / 2;
                    s.wrote(slot, n);
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        while s.next_control(&mut out, now) {
            assert!(Frame::decode(&out).is_ok(), "{out:?}");
        }
        assert!(s.connections() <= MAX_CONNECTIONS as usize);
        for slot in s.slots().collect::<Vec<_>>() {
            let (a, b) = s.pending(slot);
            assert!(a.len() + b.len() <= WINDOW as usize);
        }
    }
});
