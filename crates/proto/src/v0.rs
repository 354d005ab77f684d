//! QEMU ivshmem protocol version 0: the server → peer messages.
//!
//! Every message is exactly 8 bytes, a little-endian signed 64-bit integer, optionally carrying
//! one file descriptor. Only the server sends; anything a peer writes (or EOF) makes the server
//! drop that peer. The meaning of a message depends on its value and on whether an fd came with
//! it (QEMU's `docs/specs/ivshmem-spec.rst`, and its `contrib/ivshmem-server` for the order):
//!
//! | value | fd | meaning |
//! |---|---|---|
//! | `0` (first message) | no | protocol version |
//! | `0..=65535` (second message) | no | the receiving peer's own id |
//! | `-1` | yes | the shared-memory fd |
//! | `0..=65535` | yes | one more eventfd of that peer (the N-th fd for an id is vector N-1) |
//! | `0..=65535` | no | that peer left |
//!
//! A value below `-1` or above `65535` is invalid, as is `-1` without an fd.

use thiserror::Error;

/// The protocol version this crate speaks (`IVSHMEM_PROTOCOL_VERSION` in QEMU).
pub const PROTOCOL_VERSION: i64 = 0;
/// Size of every message on the wire.
pub const MESSAGE_LEN: usize = 8;
/// The value that announces the shared-memory fd.
pub const SHM_MARKER: i64 = -1;
/// The largest peer id (ids are 16 bits: the doorbell register carries them in bits 31..16).
pub const MAX_PEER_ID: u16 = u16::MAX;
/// The most interrupt vectors per peer that QEMU's server and client accept.
pub const MAX_VECTORS: usize = 64;

/// Encodes one message value as it goes on the wire.
pub fn encode(value: i64) -> [u8; MESSAGE_LEN] {
    value.to_le_bytes()
}

/// Decodes the 8 bytes of one message.
pub fn decode(bytes: [u8; MESSAGE_LEN]) -> i64 {
    i64::from_le_bytes(bytes)
}

/// What a message received after the handshake's first two messages means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// `-1` with an fd: the shared memory.
    SharedMemory,
    /// `id` with an fd: one more interrupt eventfd of peer `id` (ours when `id` is our own id).
    PeerVector {
        /// The peer.
        id: u16,
    },
    /// `id` without an fd: peer `id` has gone.
    PeerGone {
        /// The peer.
        id: u16,
    },
}

/// A message that breaks protocol version 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum ProtocolError {
    /// server speaks ivshmem protocol version {0}, only version 0 is supported
    ///
    /// The first message was not version 0 (or carried an fd).
    UnsupportedVersion(i64),
    /// message {value} unexpectedly carried a file descriptor
    ///
    /// A message that should not carry an fd did.
    UnexpectedFd {
        /// The message's value.
        value: i64,
    },
    /// server sent invalid own peer id {0}
    ///
    /// The second message (own id) was not a peer id.
    InvalidOwnId(i64),
    /// shared-memory message (-1) arrived without a file descriptor
    ///
    /// `-1` came without an fd.
    MissingShmFd,
    /// server sent invalid message {0}
    ///
    /// A value outside `-1..=65535`.
    InvalidValue(i64),
}

/// Checks the first message of a connection: the protocol version.
pub fn parse_version(value: i64, has_fd: bool) -> Result<(), ProtocolError> {
    if has_fd {
        return Err(ProtocolError::UnexpectedFd { value });
    }
    if value != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion(value));
    }
    Ok(())
}

/// Parses the second message of a connection: the receiving peer's own id.
pub fn parse_own_id(value: i64, has_fd: bool) -> Result<u16, ProtocolError> {
    if has_fd {
        return Err(ProtocolError::UnexpectedFd { value });
    }
    u16::try_from(value).map_err(|_| ProtocolError::InvalidOwnId(value))
}

/// Classifies any later message.
pub fn classify(value: i64, has_fd: bool) -> Result<Message, ProtocolError> {
    if value == SHM_MARKER {
        return if has_fd {
            Ok(Message::SharedMemory)
        } else {
            Err(ProtocolError::MissingShmFd)
        };
    }
    let id = u16::try_from(value).map_err(|_| ProtocolError::InvalidValue(value))?;
    Ok(if has_fd {
        Message::PeerVector { id }
    } else {
        Message::PeerGone { id }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wire_bytes_are_little_endian() {
        assert_eq!(encode(0), [0; 8]);
        assert_eq!(encode(-1), [0xff; 8]);
        assert_eq!(encode(0x0102), [2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode(65535), [0xff, 0xff, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn handshake_messages() {
        assert_eq!(parse_version(0, false), Ok(()));
        assert_eq!(
            parse_version(1, false),
            Err(ProtocolError::UnsupportedVersion(1))
        );
        assert_eq!(
            parse_version(0, true),
            Err(ProtocolError::UnexpectedFd { value: 0 })
        );
        assert_eq!(parse_own_id(7, false), Ok(7));
        assert_eq!(parse_own_id(65535, false), Ok(65535));
        assert_eq!(
            parse_own_id(65536, false),
            Err(ProtocolError::InvalidOwnId(65536))
        );
        assert_eq!(
            parse_own_id(-1, false),
            Err(ProtocolError::InvalidOwnId(-1))
        );
    }

    #[test]
    fn classification_matches_qemu() {
        assert_eq!(classify(-1, true), Ok(Message::SharedMemory));
        assert_eq!(classify(-1, false), Err(ProtocolError::MissingShmFd));
        assert_eq!(classify(3, true), Ok(Message::PeerVector { id: 3 }));
        assert_eq!(classify(3, false), Ok(Message::PeerGone { id: 3 }));
        assert_eq!(classify(-2, true), Err(ProtocolError::InvalidValue(-2)));
        assert_eq!(
            classify(65536, false),
            Err(ProtocolError::InvalidValue(65536))
        );
        assert_eq!(
            classify(i64::MIN, false),
            Err(ProtocolError::InvalidValue(i64::MIN))
        );
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(v in any::<i64>()) {
            prop_assert_eq!(decode(encode(v)), v);
        }

        #[test]
        fn classify_accepts_exactly_qemus_range(v in any::<i64>(), fd in any::<bool>()) {
            let ok = classify(v, fd).is_ok();
            let qemu_accepts = (0..=65535).contains(&v) || (v == -1 && fd);
            prop_assert_eq!(ok, qemu_accepts);
        }
    }
}
