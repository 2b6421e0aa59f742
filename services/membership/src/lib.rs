//! eagle-membership: who serves what, and where a session's KV cache lives, kept in etcd.
//!
//! - `keys.rs`: the key layout under `/eagle/<cluster>/`.
//! - `record.rs`: the JSON records stored there (members, KV placements).
//! - `client.rs`: connecting to etcd, deadlines on every call, and the shared "etcd unreachable
//!   since ..." flag.
//! - `register.rs`: a member's leased registration, kept alive and re-made after outages.
//! - `view.rs`: the watched membership view (complete, healthy groups per model).
//! - `placement.rs`: KV placement records for multi-turn sessions, leased like the caches.
//! - `rendezvous.rs`: ranks of a tensor-parallel group finding each other.
//! - `service.rs`: the services' shared `--etcd` flags, joining, and etcd health reporting.
//!
//! Invariant: etcd is advisory for serving. Every call has a deadline, background loops retry
//! with backoff, and while etcd is away readers keep the last view they had.

pub mod client;
pub mod keys;
pub mod placement;
pub mod record;
pub mod register;
pub mod rendezvous;
pub mod service;
pub mod view;

pub use client::{connect, EtcdConfig, EtcdHealth, EtcdTls, MembershipError};
/// The etcd client type the functions here take (from the `etcd-client` crate).
pub use etcd_client::Client as EtcdClient;
pub use keys::Keys;
pub use placement::{PlacementStore, SessionLock};
pub use record::{Kind, Load, MemberRecord, Placement};
pub use register::{LoadProbe, PrefixProbe, Registration};
pub use rendezvous::rendezvous;
pub use service::{join, join_service, EtcdFlags, Joined, ServiceInfo, ETCD_HEALTH_SERVICE};
pub use view::{Group, Member, MembershipView};
