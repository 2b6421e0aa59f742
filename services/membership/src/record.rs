//! The records stored in etcd, as JSON: a member (one worker rank or one draft service) and a
//! session's KV placement. Readers ignore fields they do not know, so records can grow.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Worker,
    Draft,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Worker => "worker",
            Kind::Draft => "draft",
        }
    }
}

/// A member's load, refreshed while it runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Live sessions (KV or head caches) it holds.
    pub active_sessions: u32,
    /// Requests waiting for it (0 where the service does not queue).
    pub queue_depth: u32,
}

/// One member: a worker rank or a draft service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub kind: Kind,
    /// The worker group (its ranks share it) or the draft service's name.
    pub group: String,
    pub rank: u32,
    /// Ranks in the group (1 without tensor parallelism).
    pub tp: u32,
    /// The gRPC address clients use (`host:port`); for a worker group, rank 0's.
    pub addr: String,
    /// The model name clients use.
    pub model: String,
    pub device: String,
    /// Bytes of session cache it may hold.
    pub capacity_bytes: u64,
    pub healthy: bool,
    pub pid: u32,
    #[serde(default)]
    pub load: Load,
    /// Unix seconds when it registered.
    #[serde(default)]
    pub started_at: u64,
    /// A worker's prefix cache summary: the keys (`eagle_proto::prefix::pack`, 16 hex digits
    /// each, run together) of the blocks it holds, most recently used first, bounded;
    /// coordinators route by it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefixes: String,
}

/// Where a multi-turn session's KV cache lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The worker group holding it.
    pub group: String,
    /// The group's address when the placement was made.
    pub addr: String,
    /// The worker's own session id for it.
    pub worker_session: String,
    /// Tokens in the cache (the last turn's prompt and what it generated).
    pub cached_tokens: u32,
}
