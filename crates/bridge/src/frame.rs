//! The bridge's wire format: one frame per channel message (`docs/bridge.md` is the
//! specification; a test checks its tables against the constants here, their one home).
//!
//! Every frame starts with a 16-byte header (type, flags, connection id, argument; offsets
//! `H_*`), followed by the type's payload. [`Frame::decode`] checks everything a frame carries on its
//! own (type, reserved bytes, lengths, ranges); whether it fits the state of the session or
//! the connection is [`crate::session`]'s business.

use thiserror::Error;

/// Bytes of the frame header.
pub const HEADER_LEN: usize = 16;
/// Header offset of the type byte.
pub const H_TYPE: usize = 0;
/// Header offset of the flags byte (0).
pub const H_FLAGS: usize = 1;
/// Header offset of the first reserved field (2 bytes, 0).
pub const H_RESERVED: usize = 2;
/// Header offset of the connection id (4 bytes).
pub const H_CONN: usize = 4;
/// Header offset of the argument (4 bytes).
pub const H_ARG: usize = 8;
/// Header offset of the second reserved field (4 bytes, 0).
pub const H_RESERVED2: usize = 12;

/// `HELLO` payload offset of the magic (4 bytes).
pub const HELLO_MAGIC: usize = 0;
/// `HELLO` payload offset of the version (2 bytes).
pub const HELLO_VERSION: usize = 4;
/// `HELLO` payload offset of the role (1 byte).
pub const HELLO_ROLE: usize = 6;
/// `HELLO` payload offset of the reserved byte (0).
pub const HELLO_RESERVED: usize = 7;
/// `HELLO` payload offset of the window (4 bytes).
pub const HELLO_WINDOW: usize = 8;
/// `HELLO` payload offset of `max_data` (4 bytes).
pub const HELLO_MAX_DATA: usize = 12;
/// `HELLO` payload offset of `max_connections` (4 bytes).
pub const HELLO_MAX_CONNECTIONS: usize = 16;
/// `HELLO` payload offset of `keepalive_ms` (4 bytes).
pub const HELLO_KEEPALIVE_MS: usize = 20;
/// `HELLO` payload offset of the session number (8 bytes).
pub const HELLO_SESSION: usize = 24;

/// `HELLO`'s magic bytes.
pub const MAGIC: [u8; 4] = *b"IVBR";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Bytes of `HELLO`'s payload (version 1).
pub const HELLO_LEN: usize = 32;
/// Longest origin description an `OPEN` carries.
pub const ORIGIN_MAX: usize = 256;
/// Shortest keepalive interval a `HELLO` may announce (milliseconds).
pub const KEEPALIVE_MIN_MS: u32 = 100;
/// Longest keepalive interval a `HELLO` may announce (milliseconds): one hour.
pub const KEEPALIVE_MAX_MS: u32 = 3_600_000;

/// Frame type numbers.
pub mod kind {
    /// Session start: parameters of the sender.
    pub const HELLO: u8 = 1;
    /// The listening side accepted a connection.
    pub const OPEN: u8 = 2;
    /// The connecting side connected.
    pub const OPENED: u8 = 3;
    /// Bytes of a connection.
    pub const DATA: u8 = 4;
    /// More bytes the sender of `CREDIT` will accept on a connection.
    pub const CREDIT: u8 = 5;
    /// The sender will send no more `DATA` on the connection (half-close).
    pub const SHUT: u8 = 6;
    /// The sender is done with the connection (both directions ended).
    pub const CLOSE: u8 = 7;
    /// The sender aborted the connection.
    pub const RESET: u8 = 8;
    /// Keepalive.
    pub const PING: u8 = 9;
}

/// `HELLO`'s role byte.
pub mod role {
    /// The sender listens (accepts connections and sends `OPEN`).
    pub const LISTEN: u8 = 1;
    /// The sender connects (receives `OPEN` and connects).
    pub const CONNECT: u8 = 2;
}

/// `RESET`'s reason codes (the argument). Receivers accept unknown codes.
pub mod reason {
    /// The local socket was reset or failed.
    pub const SOCKET: u32 = 1;
    /// Connecting was refused.
    pub const REFUSED: u32 = 2;
    /// Connecting failed otherwise.
    pub const CONNECT_FAILED: u32 = 3;
    /// The other side broke the protocol on this connection.
    pub const PROTOCOL: u32 = 4;
    /// The connection limit was reached.
    pub const LIMIT: u32 = 5;
    /// The bridge is stopping.
    pub const STOPPING: u32 = 6;
}

/// Which side of the bridge a `HELLO` comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts connections, sends `OPEN`.
    Listen,
    /// Receives `OPEN`, connects.
    Connect,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Listen => role::LISTEN,
            Role::Connect => role::CONNECT,
        }
    }

    /// `listen` or `connect`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Listen => "listen",
            Role::Connect => "connect",
        }
    }
}

/// Why a connection was reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// [`reason::SOCKET`].
    Socket,
    /// [`reason::REFUSED`].
    Refused,
    /// [`reason::CONNECT_FAILED`].
    ConnectFailed,
    /// [`reason::PROTOCOL`].
    Protocol,
    /// [`reason::LIMIT`].
    Limit,
    /// [`reason::STOPPING`].
    Stopping,
    /// A code this build does not know.
    Other(u32),
}

impl Reason {
    /// The wire code.
    pub fn code(self) -> u32 {
        match self {
            Reason::Socket => reason::SOCKET,
            Reason::Refused => reason::REFUSED,
            Reason::ConnectFailed => reason::CONNECT_FAILED,
            Reason::Protocol => reason::PROTOCOL,
            Reason::Limit => reason::LIMIT,
            Reason::Stopping => reason::STOPPING,
            Reason::Other(c) => c,
        }
    }

    /// The reason of a wire code.
    pub fn from_code(code: u32) -> Reason {
        match code {
            reason::SOCKET => Reason::Socket,
            reason::REFUSED => Reason::Refused,
            reason::CONNECT_FAILED => Reason::ConnectFailed,
            reason::PROTOCOL => Reason::Protocol,
            reason::LIMIT => Reason::Limit,
            reason::STOPPING => Reason::Stopping,
            c => Reason::Other(c),
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Socket => f.write_str("the socket was reset or failed"),
            Reason::Refused => f.write_str("connection refused"),
            Reason::ConnectFailed => f.write_str("connecting failed"),
            Reason::Protocol => f.write_str("protocol error"),
            Reason::Limit => f.write_str("connection limit reached"),
            Reason::Stopping => f.write_str("the bridge is stopping"),
            Reason::Other(c) => write!(f, "reason {c}"),
        }
    }
}

/// A `HELLO`'s parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The sender's role.
    pub role: Role,
    /// Bytes the sender accepts on each new connection before it sends `CREDIT` (≥ 1).
    pub window: u32,
    /// The largest `DATA` payload the sender accepts (≥ 1).
    pub max_data: u32,
    /// Connections the sender handles at once (≥ 1).
    pub max_connections: u32,
    /// The sender sends a frame at least this often (milliseconds,
    /// [`KEEPALIVE_MIN_MS`]..=[`KEEPALIVE_MAX_MS`]).
    pub keepalive_ms: u32,
    /// A random number naming the sender's session in logs.
    pub session: u64,
}

/// One frame, borrowing its payload from the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// [`kind::HELLO`].
    Hello(Hello),
    /// [`kind::OPEN`]: `origin` describes the accepted peer (for logs; not trusted, any bytes).
    Open {
        /// Connection id (≠ 0).
        conn: u32,
        /// Up to [`ORIGIN_MAX`] bytes.
        origin: &'a [u8],
    },
    /// [`kind::OPENED`].
    Opened {
        /// Connection id.
        conn: u32,
    },
    /// [`kind::DATA`].
    Data {
        /// Connection id.
        conn: u32,
        /// At least one byte.
        data: &'a [u8],
    },
    /// [`kind::CREDIT`].
    Credit {
        /// Connection id.
        conn: u32,
        /// Bytes granted (≥ 1).
        bytes: u32,
    },
    /// [`kind::SHUT`].
    Shut {
        /// Connection id.
        conn: u32,
    },
    /// [`kind::CLOSE`].
    Close {
        /// Connection id.
        conn: u32,
    },
    /// [`kind::RESET`].
    Reset {
        /// Connection id.
        conn: u32,
        /// Why.
        reason: Reason,
    },
    /// [`kind::PING`].
    Ping,
}

/// A message that is not a valid frame (the session that receives it is reset).
#[derive(Debug, Clone, PartialEq, Eq, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum FrameError {
    /// a frame of {len} bytes is shorter than the {HEADER_LEN:}-byte header
    ///
    /// Shorter than the header.
    Short {
        /// Message length.
        len: usize,
    },
    /// unknown frame type {0}
    ///
    /// Unknown type byte.
    UnknownType(u8),
    /// frame type {kind}: flags or reserved header bytes are not zero
    ///
    /// Flags or reserved header bytes are not zero.
    Reserved {
        /// The type.
        kind: u8,
    },
    /// frame type {kind}: payload of {len} bytes, allowed {min}..={max}
    ///
    /// The payload length does not fit the type.
    Length {
        /// The type.
        kind: u8,
        /// Payload bytes found.
        len: usize,
        /// Least allowed.
        min: usize,
        /// Most allowed.
        max: usize,
    },
    /// frame type {kind}: connection id {conn} is not allowed
    ///
    /// A session frame names a connection, or a connection frame names connection 0.
    Conn {
        /// The type.
        kind: u8,
        /// The id found.
        conn: u32,
    },
    /// frame type {kind}: argument {arg} is not allowed
    ///
    /// The argument is out of range for the type.
    Arg {
        /// The type.
        kind: u8,
        /// The argument found.
        arg: u32,
    },
    /// HELLO without the IVBR magic (not an ivshm bridge on the other side?)
    ///
    /// `HELLO` without the magic bytes.
    Magic,
    /// HELLO of protocol version {0}; this bridge speaks version {VERSION:}
    ///
    /// `HELLO` of another protocol version.
    Version(u16),
    /// HELLO: {field} {value} is out of range
    ///
    /// A `HELLO` field is out of range.
    HelloField {
        /// Which field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | (u64::from(u32_at(b, o + 4)) << 32)
}

/// The header of a frame of `kind` on connection `conn` with argument `arg`.
pub fn header(kind: u8, conn: u32, arg: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[H_TYPE] = kind;
    h[H_CONN..H_CONN + 4].copy_from_slice(&conn.to_le_bytes());
    h[H_ARG..H_ARG + 4].copy_from_slice(&arg.to_le_bytes());
    h
}

impl Frame<'_> {
    /// Parses one message. Everything is checked that the frame alone can tell.
    pub fn decode(msg: &[u8]) -> Result<Frame<'_>, FrameError> {
        let Some((head, payload)) = msg.split_at_checked(HEADER_LEN) else {
            return Err(FrameError::Short { len: msg.len() });
        };
        let kind = head[H_TYPE];
        if !(kind::HELLO..=kind::PING).contains(&kind) {
            return Err(FrameError::UnknownType(kind));
        }
        if head[H_FLAGS] != 0 || u16_at(head, H_RESERVED) != 0 || u32_at(head, H_RESERVED2) != 0 {
            return Err(FrameError::Reserved { kind });
        }
        let conn = u32_at(head, H_CONN);
        let arg = u32_at(head, H_ARG);
        let length = |min: usize, max: usize| {
            if (min..=max).contains(&payload.len()) {
                Ok(())
            } else {
                Err(FrameError::Length {
                    kind,
                    len: payload.len(),
                    min,
                    max,
                })
            }
        };
        // Session frames name no connection; connection frames name one.
        let session_frame = matches!(kind, kind::HELLO | kind::PING);
        if session_frame != (conn == 0) {
            return Err(FrameError::Conn { kind, conn });
        }
        // Only CREDIT and RESET carry an argument.
        if arg != 0 && !matches!(kind, kind::CREDIT | kind::RESET) {
            return Err(FrameError::Arg { kind, arg });
        }
        Ok(match kind {
            kind::HELLO => {
                length(HELLO_LEN, HELLO_LEN)?;
                Frame::Hello(decode_hello(payload)?)
            }
            kind::OPEN => {
                length(0, ORIGIN_MAX)?;
                Frame::Open {
                    conn,
                    origin: payload,
                }
            }
            kind::OPENED => {
                length(0, 0)?;
                Frame::Opened { conn }
            }
            kind::DATA => {
                length(1, usize::MAX)?;
                Frame::Data {
                    conn,
                    data: payload,
                }
            }
            kind::CREDIT => {
                length(0, 0)?;
                if arg == 0 {
                    return Err(FrameError::Arg { kind, arg });
                }
                Frame::Credit { conn, bytes: arg }
            }
            kind::SHUT => {
                length(0, 0)?;
                Frame::Shut { conn }
            }
            kind::CLOSE => {
                length(0, 0)?;
                Frame::Close { conn }
            }
            kind::RESET => {
                length(0, 0)?;
                Frame::Reset {
                    conn,
                    reason: Reason::from_code(arg),
                }
            }
            _ => {
                length(0, 0)?;
                Frame::Ping
            }
        })
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (kind, conn, arg, payload): (u8, u32, u32, &[u8]) = match *self {
            Frame::Hello(h) => {
                out.extend_from_slice(&header(kind::HELLO, 0, 0));
                encode_hello(&h, out);
                return;
            }
            Frame::Open { conn, origin } => (kind::OPEN, conn, 0, origin),
            Frame::Opened { conn } => (kind::OPENED, conn, 0, &[]),
            Frame::Data { conn, data } => (kind::DATA, conn, 0, data),
            Frame::Credit { conn, bytes } => (kind::CREDIT, conn, bytes, &[]),
            Frame::Shut { conn } => (kind::SHUT, conn, 0, &[]),
            Frame::Close { conn } => (kind::CLOSE, conn, 0, &[]),
            Frame::Reset { conn, reason } => (kind::RESET, conn, reason.code(), &[]),
            Frame::Ping => (kind::PING, 0, 0, &[]),
        };
        out.extend_from_slice(&header(kind, conn, arg));
        out.extend_from_slice(payload);
    }

    /// The encoded frame.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

fn decode_hello(p: &[u8]) -> Result<Hello, FrameError> {
    if p[HELLO_MAGIC..HELLO_MAGIC + 4] != MAGIC {
        return Err(FrameError::Magic);
    }
    let version = u16_at(p, HELLO_VERSION);
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let role = match p[HELLO_ROLE] {
        role::LISTEN => Role::Listen,
        role::CONNECT => Role::Connect,
        r => {
            return Err(FrameError::HelloField {
                field: "role",
                value: r.into(),
            })
        }
    };
    if p[HELLO_RESERVED] != 0 {
        return Err(FrameError::HelloField {
            field: "reserved byte",
            value: p[HELLO_RESERVED].into(),
        });
    }
    let field = |field: &'static str, o: usize, min: u32, max: u32| {
        let value = u32_at(p, o);
        if (min..=max).contains(&value) {
            Ok(value)
        } else {
            Err(FrameError::HelloField {
                field,
                value: value.into(),
            })
        }
    };
    Ok(Hello {
        role,
        window: field("window", HELLO_WINDOW, 1, u32::MAX)?,
        max_data: field("max_data", HELLO_MAX_DATA, 1, u32::MAX)?,
        max_connections: field("max_connections", HELLO_MAX_CONNECTIONS, 1, u32::MAX)?,
        keepalive_ms: field(
            "keepalive_ms",
            HELLO_KEEPALIVE_MS,
            KEEPALIVE_MIN_MS,
            KEEPALIVE_MAX_MS,
        )?,
        session: u64_at(p, HELLO_SESSION),
    })
}

fn encode_hello(h: &Hello, out: &mut Vec<u8>) {
    let mut p = [0u8; HELLO_LEN];
    let mut put = |o: usize, b: &[u8]| p[o..o + b.len()].copy_from_slice(b);
    put(HELLO_MAGIC, &MAGIC);
    put(HELLO_VERSION, &VERSION.to_le_bytes());
    put(HELLO_ROLE, &[h.role.code()]);
    put(HELLO_WINDOW, &h.window.to_le_bytes());
    put(HELLO_MAX_DATA, &h.max_data.to_le_bytes());
    put(HELLO_MAX_CONNECTIONS, &h.max_connections.to_le_bytes());
    put(HELLO_KEEPALIVE_MS, &h.keepalive_ms.to_le_bytes());
    put(HELLO_SESSION, &h.session.to_le_bytes());
    out.extend_from_slice(&p);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> Hello {
        Hello {
            role: Role::Connect,
            window: 1 << 18,
            max_data: 65536,
            max_connections: 1024,
            keepalive_ms: 2000,
            session: 0x0123_4567_89ab_cdef,
        }
    }

    #[test]
    fn hello_bytes_are_as_documented() {
        let bytes = Frame::Hello(hello()).to_vec();
        assert_eq!(bytes.len(), HEADER_LEN + HELLO_LEN);
        assert_eq!(&bytes[..HEADER_LEN], &header(kind::HELLO, 0, 0));
        assert_eq!(&bytes[16..20], b"IVBR");
        assert_eq!(&bytes[20..22], &[1, 0]);
        assert_eq!(bytes[22], role::CONNECT);
        assert_eq!(&bytes[24..28], &(1u32 << 18).to_le_bytes());
        assert_eq!(&bytes[40..48], &0x0123_4567_89ab_cdefu64.to_le_bytes());
        assert_eq!(Frame::decode(&bytes), Ok(Frame::Hello(hello())));
    }

    #[test]
    fn header_is_little_endian() {
        let bytes = Frame::Credit {
            conn: 0x0102_0304,
            bytes: 0x0a0b_0c0d,
        }
        .to_vec();
        assert_eq!(
            bytes,
            [5, 0, 0, 0, 4, 3, 2, 1, 0x0d, 0x0c, 0x0b, 0x0a, 0, 0, 0, 0]
        );
    }

    #[test]
    fn bad_frames_are_named() {
        assert_eq!(Frame::decode(&[1; 15]), Err(FrameError::Short { len: 15 }));
        assert_eq!(
            Frame::decode(&header(0, 0, 0)),
            Err(FrameError::UnknownType(0))
        );
        assert_eq!(
            Frame::decode(&header(10, 0, 0)),
            Err(FrameError::UnknownType(10))
        );
        let mut h = header(kind::SHUT, 1, 0);
        h[13] = 1;
        assert_eq!(
            Frame::decode(&h),
            Err(FrameError::Reserved { kind: kind::SHUT })
        );
        assert_eq!(
            Frame::decode(&header(kind::PING, 3, 0)),
            Err(FrameError::Conn {
                kind: kind::PING,
                conn: 3
            })
        );
        assert_eq!(
            Frame::decode(&header(kind::DATA, 0, 0)),
            Err(FrameError::Conn {
                kind: kind::DATA,
                conn: 0
            })
        );
        assert!(matches!(
            Frame::decode(&header(kind::DATA, 1, 0)),
            Err(FrameError::Length { len: 0, .. })
        ));
        assert_eq!(
            Frame::decode(&header(kind::CREDIT, 1, 0)),
            Err(FrameError::Arg {
                kind: kind::CREDIT,
                arg: 0
            })
        );
        assert_eq!(
            Frame::decode(&header(kind::SHUT, 1, 7)),
            Err(FrameError::Arg {
                kind: kind::SHUT,
                arg: 7
            })
        );
        let mut bad = Frame::Hello(hello()).to_vec();
        bad[16] = b'X';
        assert_eq!(Frame::decode(&bad), Err(FrameError::Magic));
        let mut bad = Frame::Hello(hello()).to_vec();
        bad[20] = 2;
        assert_eq!(Frame::decode(&bad), Err(FrameError::Version(2)));
        let mut bad = Frame::Hello(Hello {
            keepalive_ms: 5,
            ..hello()
        })
        .to_vec();
        assert!(matches!(
            Frame::decode(&bad),
            Err(FrameError::HelloField {
                field: "keepalive_ms",
                value: 5
            })
        ));
        bad.truncate(40);
        assert!(matches!(
            Frame::decode(&bad),
            Err(FrameError::Length { len: 24, .. })
        ));
        assert_eq!(
            Frame::decode(
                &Frame::Reset {
                    conn: 9,
                    reason: Reason::Other(77)
                }
                .to_vec()
            ),
            Ok(Frame::Reset {
                conn: 9,
                reason: Reason::Other(77)
            })
        );
    }

    fn any_frame() -> impl Strategy<Value = (u8, u32, u32, Vec<u8>)> {
        (
            1u8..=9,
            1u32..,
            1u32..,
            proptest::collection::vec(any::<u8>(), 1..300),
        )
    }

    proptest! {
        /// Whatever a hostile peer sends: decoding never panics, and a frame that decodes
        /// encodes back to the same bytes (nothing is silently dropped or invented).
        #[test]
        fn decode_never_panics_and_round_trips(msg in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(frame) = Frame::decode(&msg) {
                prop_assert_eq!(frame.to_vec(), msg);
            }
        }

        /// Valid frames of every type survive encode and decode.
        #[test]
        fn valid_frames_round_trip((k, conn, arg, payload) in any_frame()) {
            let frame = match k {
                kind::HELLO => Frame::Hello(Hello { window: arg, ..hello() }),
                kind::OPEN => Frame::Open { conn, origin: &payload[..payload.len().min(ORIGIN_MAX)] },
                kind::OPENED => Frame::Opened { conn },
                kind::DATA => Frame::Data { conn, data: &payload },
                kind::CREDIT => Frame::Credit { conn, bytes: arg },
                kind::SHUT => Frame::Shut { conn },
                kind::CLOSE => Frame::Close { conn },
                kind::RESET => Frame::Reset { conn, reason: Reason::from_code(arg) },
                _ => Frame::Ping,
            };
            let bytes = frame.to_vec();
            prop_assert_eq!(Frame::decode(&bytes), Ok(frame));
        }
    }
}
