//! The control protocol on the server's `control.sock` (root-only by default): list and manage
//! regions, list VMs, read counters, reload the configuration. JSON lines, framed as described
//! in [`factory`](crate::factory) ([`encode_line`](crate::factory::encode_line),
//! [`decode_line`](crate::factory::decode_line), [`LineBuffer`](crate::factory::LineBuffer)).
//!
//! ```text
//! → {"op":"regions"}
//! ← {"version":1,"ok":true,"result":{"kind":"regions","regions":[{"name":"guest0mem",...}]}}
//! → {"op":"create","name":"scratch","size":65536}
//! → {"op":"remove","name":"scratch"}
//! → {"op":"vms"}   {"op":"stats"}   {"op":"reload"}
//! ← {"version":1,"ok":false,"error":"no region named \"x\""}
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::factory::VERSION;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ControlRequest {
    /// List regions.
    Regions,
    /// List VMs, the regions each sees and their peers.
    Vms,
    /// The counters.
    Stats,
    /// Re-read the configuration file.
    Reload,
    /// Create a region (host name) at run time.
    Create(CreateRegion),
    /// Remove a region: its sockets go at once; the region itself when its last peer leaves.
    Remove {
        /// The host name.
        name: String,
    },
}

/// Parameters of [`ControlRequest::Create`]; unset fields take the server's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRegion {
    /// The host name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Vectors per peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vectors: Option<u32>,
    /// Peers at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_limit: Option<u32>,
    /// `"increasing"` or `"lowest-free"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_policy: Option<String>,
    /// `"safe"` or `"immediate"`: when the id of a peer that left may be given again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_reuse: Option<String>,
    /// Keep the region after its last peer leaves.
    #[serde(default)]
    pub persist: bool,
}

/// The answer to a control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlResponse {
    /// [`VERSION`].
    pub version: u32,
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ControlResult>,
}

impl ControlResponse {
    /// A success.
    pub fn ok(result: ControlResult) -> Self {
        Self {
            version: VERSION,
            ok: true,
            error: None,
            result: Some(result),
        }
    }

    /// A failure.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            version: VERSION,
            ok: false,
            error: Some(message.into()),
            result: None,
        }
    }
}

/// The payload of a successful response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ControlResult {
    /// Every region.
    Regions {
        /// In host-name order (standalone regions first).
        regions: Vec<RegionReport>,
    },
    /// Every VM.
    Vms {
        /// In name order.
        vms: Vec<VmReport>,
    },
    /// The counters.
    Stats {
        /// Now.
        stats: StatsReport,
    },
    /// A region was created.
    Created {
        /// It (boxed: a region report is much larger than the other results).
        region: Box<RegionReport>,
    },
    /// A region was removed, or will be when its last peer leaves.
    Removed {
        /// What happened, for humans.
        message: String,
    },
    /// The configuration was re-read.
    Reloaded {
        /// What changed and what was kept, one sentence each.
        changes: Vec<String>,
    },
}

/// One region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionReport {
    /// Host name.
    pub name: String,
    /// Actual size in bytes.
    pub size: u64,
    /// The backing object, for humans (`memfd`, `/dev/shm/...`).
    pub backend: String,
    /// Vectors per peer.
    pub vectors: u32,
    /// Peers at once.
    pub peer_limit: u32,
    /// `"increasing"` or `"lowest-free"`.
    pub id_policy: String,
    /// `"safe"` (an id whose holder left is held back while a peer that saw the leave is
    /// connected) or `"immediate"`. Empty from older servers.
    #[serde(default)]
    pub id_reuse: String,
    /// The ids held back now, ascending. Empty from older servers.
    #[serde(default)]
    pub held_ids: Vec<u16>,
    /// Who made it: `"standalone"`, `"config"`, `"factory"` or `"control"`.
    pub origin: String,
    /// Kept after its last peer leaves.
    pub persist: bool,
    /// Removed (no sockets any more); goes when its last peer leaves.
    pub detached: bool,
    /// Ids of the connected peers.
    pub peers: Vec<u16>,
    /// Its v0 sockets.
    pub sockets: Vec<String>,
    /// This region's counters (the server-wide ones, counted for this region only), and its
    /// queue depths now. Absent from older servers.
    #[serde(default)]
    pub counters: RegionCounters,
}

/// A region's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionCounters {
    /// Its counters, as [`StatsReport`] has them for the server (`factory_requests` is 0:
    /// factory requests belong to VMs, not regions).
    pub stats: StatsReport,
    /// Messages queued for its peers now, in total.
    pub queued_messages: u64,
    /// The longest queue of one of its peers now.
    pub max_peer_queue: u64,
}

/// One VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReport {
    /// Its name.
    pub name: String,
    /// Its directory.
    pub directory: String,
    /// Its factory socket.
    pub factory: String,
    /// The regions it sees.
    pub regions: Vec<VmRegionReport>,
    /// Its factory's counters, as [`StatsReport`] has them for the server: `factory_requests`
    /// and `refusals` (of its factory requests); the v0 counters are 0 (they belong to
    /// regions). Absent from older servers.
    #[serde(default)]
    pub counters: StatsReport,
}

/// A region as one VM sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRegionReport {
    /// The VM's name for it.
    pub guest_name: String,
    /// The host name.
    pub host_name: String,
    /// The socket in the VM's directory.
    pub socket: String,
    /// Peers that joined through this socket.
    pub peers: Vec<u16>,
}

/// The server's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Peers that joined.
    pub joins: u64,
    /// Peers that left by closing their socket.
    pub leaves: u64,
    /// Peers the server dropped.
    pub drops: u64,
    /// Peers connected now.
    pub peers_connected: u64,
    /// Eventfds handed out to peers (own and others' doorbells).
    pub doorbell_fds: u64,
    /// Whole v0 messages sent.
    pub messages_sent: u64,
    /// Factory requests answered.
    pub factory_requests: u64,
    /// Refusals (of v0 connections and factory requests) by `GSS_*` name.
    pub refusals: BTreeMap<String, u64>,
    /// Peers removed, by reason (`closed`, `sent_data`, `stopped_reading`, `held_fds`,
    /// `send_failed`, `read_failed`, `poll_failed`, `server_stopping`). Absent from older
    /// servers.
    #[serde(default)]
    pub removals: BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::factory::{decode_line, encode_line};
    use proptest::prelude::*;

    #[test]
    fn requests_have_the_documented_form() {
        let parse = |line: &str| decode_line::<ControlRequest>(line.as_bytes());
        assert_eq!(parse(r#"{"op":"regions"}"#), Ok(ControlRequest::Regions));
        assert_eq!(parse(r#"{"op":"reload"}"#), Ok(ControlRequest::Reload));
        assert_eq!(
            parse(r#"{"op":"create","name":"a","size":4096,"persist":true}"#),
            Ok(ControlRequest::Create(CreateRegion {
                name: "a".into(),
                size: 4096,
                persist: true,
                ..CreateRegion::default()
            }))
        );
        assert_eq!(
            parse(r#"{"op":"remove","name":"a"}"#),
            Ok(ControlRequest::Remove { name: "a".into() })
        );
        parse(r#"{"op":"remove","name":"a","x":1}"#).unwrap_err();
        parse(r#"{"op":"explode"}"#).unwrap_err();
        assert_eq!(
            encode_line(&ControlRequest::Stats),
            b"{\"op\":\"stats\"}\n".to_vec()
        );
    }

    #[test]
    fn responses_round_trip() {
        let mut refusals = BTreeMap::new();
        refusals.insert("GSS_CLIENT_MAX".to_string(), 2);
        for response in [
            ControlResponse::ok(ControlResult::Stats {
                stats: StatsReport {
                    joins: 3,
                    refusals,
                    ..StatsReport::default()
                },
            }),
            ControlResponse::error("no region named \"x\""),
            ControlResponse::ok(ControlResult::Reloaded {
                changes: vec!["added VM vm2".into()],
            }),
        ] {
            let line = encode_line(&response);
            assert_eq!(decode_line::<ControlResponse>(&line), Ok(response));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_lines_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_line::<ControlRequest>(&bytes);
            let _ = decode_line::<ControlResponse>(&bytes);
        }

        #[test]
        fn json_like_lines_never_panic(text in r#"\{("[a-z_]{1,8}":("[a-z -]{0,8}"|[0-9]{1,20}|true|null|\{\}|\[\]),?){0,5}\}"#) {
            let _ = decode_line::<ControlRequest>(text.as_bytes());
            let _ = decode_line::<crate::factory::FactoryRequest>(text.as_bytes());
        }
    }
}
