//! The factory protocol on a VM directory's `factory.sock`, and the JSON-lines framing that it
//! shares with the [control protocol](crate::control).
//!
//! # Framing
//!
//! One JSON object per line (`\n`-terminated, UTF-8), at most [`MAX_LINE`] bytes including the
//! newline. A client writes a request line and reads one response line; it may send further
//! requests on the same connection. Every response carries `"version": 1` ([`VERSION`]). A line
//! that is too long, not JSON, or not a known request gets a response with an error and the
//! connection stays usable (a too-long line is discarded up to its newline).
//!
//! # Requests and responses
//!
//! ```text
//! → {"op":"create","name":"mem","size":983040}
//! ← {"version":1,"status":"GSS_OK","code":0,"message":"...","region":{"guest_name":"mem",
//!     "host_name":"guest0mem","size":1048576,"vectors":16,"peer_limit":16,
//!     "id_policy":"lowest-free","peers":0,"socket":"/run/ivshm/vm0/mem.sock"}}
//! → {"op":"find","name":"nope"}
//! ← {"version":1,"status":"GSS_DOES_NOT_EXIST","code":6,"message":"..."}
//! ```
//!
//! `create` creates the region or attaches to an existing one (size in bytes; the first creator
//! decides the actual size, which the response reports); `find` only attaches. `status` and
//! `code` are QNX's `guest_shm` status codes (`GSS_*`). The region is joined by connecting to
//! `socket` and speaking protocol [`v0`](crate::v0); the factory keeps no state of its own.

use std::collections::VecDeque;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::guest_shm::GuestShmStatus;

/// The protocol version every response carries.
pub const VERSION: u32 = 1;

/// Longest accepted line in bytes, newline included.
pub const MAX_LINE: usize = 64 * 1024;

/// A line that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum LineError {
    /// line longer than {MAX_LINE:} bytes
    ///
    /// The line is longer than [`MAX_LINE`].
    TooLong,
    /// invalid message: {0}
    ///
    /// Not valid JSON for the expected message.
    Invalid(String),
}

/// Encodes a message as one JSON line (with its newline).
pub fn encode_line<T: Serialize>(message: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail (no maps with non-string keys, no I/O).
    let mut line = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    line
}

/// Decodes one line (with or without its newline).
pub fn decode_line<T: DeserializeOwned>(line: &[u8]) -> Result<T, LineError> {
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong);
    }
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    serde_json::from_slice(line).map_err(|e| LineError::Invalid(e.to_string()))
}

/// Splits a byte stream into lines, bounding memory: a line longer than [`MAX_LINE`] is dropped
/// (up to its newline) and reported as [`LineError::TooLong`] in its place, so answers keep the
/// order of the requests.
#[derive(Debug, Default)]
pub struct LineBuffer {
    /// Complete lines (and dropped ones) not yet taken, in order.
    ready: VecDeque<Result<Vec<u8>, LineError>>,
    /// The incomplete line at the end of the stream so far.
    partial: Vec<u8>,
    /// Dropping the rest of an oversized line.
    skipping: bool,
}

impl LineBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        for chunk in bytes.split_inclusive(|&b| b == b'\n') {
            let complete = chunk.last() == Some(&b'\n');
            if self.skipping {
                self.skipping = !complete;
                continue;
            }
            if self.partial.len() + chunk.len() > MAX_LINE {
                self.partial.clear();
                self.ready.push_back(Err(LineError::TooLong));
                self.skipping = !complete;
                continue;
            }
            self.partial.extend_from_slice(chunk);
            if complete {
                self.ready.push_back(Ok(std::mem::take(&mut self.partial)));
            }
        }
    }

    /// The next complete line (newline included), or an error in place of an oversized one.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, LineError>> {
        self.ready.pop_front()
    }

    /// Bytes of the incomplete line waiting for its end (at most [`MAX_LINE`]).
    pub fn pending_len(&self) -> usize {
        self.partial.len()
    }
}

/// A factory request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum FactoryRequest {
    /// Create the region, or attach to it if it exists.
    Create {
        /// The name the guest knows the region by (before `subst`).
        name: String,
        /// Requested size in bytes (ignored when the region exists; 0 only attaches).
        size: u64,
    },
    /// Attach to an existing region.
    Find {
        /// The guest's name for the region.
        name: String,
    },
}

/// The factory's answer.
///
/// On the wire the status is two fields, `"status"` (the `GSS_*` name) and `"code"` (its
/// number); a response whose two do not name the same known status does not decode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "WireResponse", try_from = "WireResponse")]
pub struct FactoryResponse {
    /// [`VERSION`].
    pub version: u32,
    /// The status.
    pub status: GuestShmStatus,
    /// A sentence for humans.
    pub message: String,
    /// The region, when `status` is `GSS_OK` (and, for `GSS_CLIENT_MAX`, the full region).
    pub region: Option<RegionOffer>,
}

impl FactoryResponse {
    /// A response of this protocol [`VERSION`].
    pub fn new(status: GuestShmStatus, message: String, region: Option<RegionOffer>) -> Self {
        FactoryResponse {
            version: VERSION,
            status,
            message,
            region,
        }
    }

    /// A refusal: `status` and why, no region.
    pub fn refusal(status: GuestShmStatus, message: String) -> Self {
        Self::new(status, message, None)
    }
}

/// A [`FactoryResponse`] as it is written.
#[derive(Serialize, Deserialize)]
struct WireResponse {
    version: u32,
    status: String,
    code: u32,
    message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    region: Option<RegionOffer>,
}

/// status {status:?} with code {code} is not a GSS_* status
///
/// A response whose `status` and `code` fields do not name one known status.
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub struct UnknownStatus {
    /// The `status` field.
    pub status: String,
    /// The `code` field.
    pub code: u32,
}

impl From<FactoryResponse> for WireResponse {
    fn from(response: FactoryResponse) -> Self {
        WireResponse {
            version: response.version,
            status: response.status.qnx_name().to_string(),
            code: response.status.as_u32(),
            message: response.message,
            region: response.region,
        }
    }
}

impl TryFrom<WireResponse> for FactoryResponse {
    type Error = UnknownStatus;

    fn try_from(wire: WireResponse) -> Result<Self, Self::Error> {
        let status = GuestShmStatus::from_u32(wire.code)
            .filter(|status| status.qnx_name() == wire.status)
            .ok_or(UnknownStatus {
                status: wire.status,
                code: wire.code,
            })?;
        Ok(FactoryResponse {
            version: wire.version,
            status,
            message: wire.message,
            region: wire.region,
        })
    }
}

/// What a client needs to join a region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionOffer {
    /// The guest's name for the region.
    pub guest_name: String,
    /// The host's name (after `subst`).
    pub host_name: String,
    /// The actual size in bytes.
    pub size: u64,
    /// Interrupt vectors (eventfds) per peer.
    pub vectors: u32,
    /// Peers the region admits at once.
    pub peer_limit: u32,
    /// How peer ids are chosen: `"increasing"` (QEMU's) or `"lowest-free"`.
    pub id_policy: String,
    /// Peers connected now.
    pub peers: u32,
    /// Absolute path of the v0 socket to connect to.
    pub socket: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_have_the_documented_form() {
        let create: FactoryRequest =
            decode_line(br#"{"op":"create","name":"mem","size":983040}"#).unwrap();
        assert_eq!(
            create,
            FactoryRequest::Create {
                name: "mem".into(),
                size: 983040
            }
        );
        assert_eq!(
            encode_line(&create),
            b"{\"op\":\"create\",\"name\":\"mem\",\"size\":983040}\n"
        );
        let find: FactoryRequest = decode_line(b"{\"op\":\"find\",\"name\":\"x\"}\n").unwrap();
        assert_eq!(find, FactoryRequest::Find { name: "x".into() });
        decode_line::<FactoryRequest>(br#"{"op":"find","name":"x","extra":1}"#).unwrap_err();
        decode_line::<FactoryRequest>(br#"{"op":"destroy","name":"x"}"#).unwrap_err();
        decode_line::<FactoryRequest>(br#"{"op":"create","name":"x","size":-1}"#).unwrap_err();
    }

    #[test]
    fn responses_have_the_documented_form() {
        let refusal =
            FactoryResponse::refusal(GuestShmStatus::DoesNotExist, "no region nope".into());
        assert_eq!(
            encode_line(&refusal),
            b"{\"version\":1,\"status\":\"GSS_DOES_NOT_EXIST\",\"code\":6,\"message\":\"no region nope\"}\n"
        );
        assert_eq!(
            decode_line::<FactoryResponse>(&encode_line(&refusal)).unwrap(),
            refusal
        );
        // Name and number must agree on a known status.
        for bad in [
            br#"{"version":1,"status":"GSS_OK","code":6,"message":""}"#.as_slice(),
            br#"{"version":1,"status":"GSS_MAYBE","code":7,"message":""}"#,
            br#"{"version":1,"status":"GSS_OK","message":""}"#,
        ] {
            assert!(decode_line::<FactoryResponse>(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn responses_round_trip() {
        let response = FactoryResponse {
            version: VERSION,
            status: GuestShmStatus::Ok,
            message: "created".into(),
            region: Some(RegionOffer {
                guest_name: "mem".into(),
                host_name: "guest0mem".into(),
                size: 1 << 20,
                vectors: 16,
                peer_limit: 16,
                id_policy: "lowest-free".into(),
                peers: 0,
                socket: "/run/ivshm/vm0/mem.sock".into(),
            }),
        };
        let line = encode_line(&response);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(decode_line::<FactoryResponse>(&line).unwrap(), response);
    }

    #[test]
    fn line_buffer_splits_and_bounds() {
        let mut buffer = LineBuffer::new();
        buffer.push(b"{\"a\":1}\n{\"b\"");
        assert_eq!(buffer.next_line(), Some(Ok(b"{\"a\":1}\n".to_vec())));
        assert_eq!(buffer.next_line(), None);
        buffer.push(b":2}\n");
        assert_eq!(buffer.next_line(), Some(Ok(b"{\"b\":2}\n".to_vec())));
        // An oversized line is reported once and skipped to its newline.
        buffer.push(&vec![b'x'; MAX_LINE + 10]);
        assert_eq!(buffer.next_line(), Some(Err(LineError::TooLong)));
        assert!(buffer.pending_len() <= MAX_LINE);
        buffer.push(b"still the long line\nok\n");
        assert_eq!(buffer.next_line(), Some(Ok(b"ok\n".to_vec())));
        assert_eq!(buffer.next_line(), None);
        // Reported in its place, between the lines around it.
        let mut stream = b"a\n".to_vec();
        stream.extend(vec![b'x'; MAX_LINE + 1]);
        stream.extend_from_slice(b"\nb\n");
        buffer.push(&stream);
        assert_eq!(buffer.next_line(), Some(Ok(b"a\n".to_vec())));
        assert_eq!(buffer.next_line(), Some(Err(LineError::TooLong)));
        assert_eq!(buffer.next_line(), Some(Ok(b"b\n".to_vec())));
        assert_eq!(buffer.next_line(), None);
        assert_eq!(
            decode_line::<FactoryRequest>(&vec![b' '; MAX_LINE + 1]),
            Err(LineError::TooLong)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_lines_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_line::<FactoryRequest>(&bytes);
            let _ = decode_line::<FactoryResponse>(&bytes);
        }

        #[test]
        fn arbitrary_streams_never_panic_and_stay_bounded(
            chunks in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..64),
                    (0usize..3 * MAX_LINE).prop_map(|n| vec![b'y'; n]),
                ],
                0..6,
            )
        ) {
            let mut buffer = LineBuffer::new();
            for chunk in &chunks {
                buffer.push(chunk);
                while let Some(line) = buffer.next_line() {
                    if let Ok(line) = line {
                        prop_assert!(line.len() <= MAX_LINE);
                        prop_assert_eq!(line.last(), Some(&b'\n'));
                    }
                }
                prop_assert!(buffer.pending_len() <= MAX_LINE);
            }
        }

        #[test]
        fn create_requests_round_trip(name in "[ -~]{0,40}", size in any::<u64>()) {
            let request = FactoryRequest::Create { name, size };
            prop_assert_eq!(decode_line::<FactoryRequest>(&encode_line(&request)).unwrap(), request);
        }
    }
}
