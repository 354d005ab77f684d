//! Property: whatever the server sends, the handshake and the peer table never panic and
//! never leak an fd; a finished handshake refuses more messages; no more own vectors are kept
//! than asked for.
//!
//! Its own test binary with a single test, so counting `/proc/self/fd` is not disturbed by
//! other tests running in parallel.

use std::os::fd::OwnedFd;

use ivshm_client::handshake::{Handshake, HandshakeError, Step};
use ivshm_test_support::fds::open_fds;
use proptest::prelude::*;
use rustix::event::{eventfd, EventfdFlags};

fn efd() -> OwnedFd {
    eventfd(0, EventfdFlags::CLOEXEC).unwrap()
}

fn message() -> impl Strategy<Value = (i64, bool)> {
    (
        prop_oneof![
            Just(-1i64),
            Just(0i64),
            0i64..4,
            any::<i64>(),
            65530i64..65540
        ],
        any::<bool>(),
    )
}

proptest! {
    #[test]
    fn no_sequence_leaks_an_fd(msgs in proptest::collection::vec(message(), 0..60)) {
        let before = open_fds();
        {
            let mut handshake = Handshake::new(2);
            let mut table = None;
            for (value, with_fd) in msgs {
                let fd = with_fd.then(efd);
                match &mut table {
                    // After the handshake, the peer table takes the messages.
                    Some(t) => {
                        let _ = ivshm_client::PeerTable::apply(t, value, fd);
                    }
                    None => match handshake.feed(value, fd) {
                        Ok(Step::Complete(e)) => {
                            prop_assert!(e.table.own_vector_count() <= 2);
                            prop_assert_eq!(
                                handshake.feed(0, None).unwrap_err(),
                                HandshakeError::Finished
                            );
                            table = Some(e.table);
                        }
                        Ok(Step::Continue) => {}
                        Err(_) => {
                            prop_assert_eq!(
                                handshake.feed(0, None).unwrap_err(),
                                HandshakeError::Finished
                            );
                            break;
                        }
                    },
                }
            }
        }
        prop_assert_eq!(open_fds(), before);
    }
}
