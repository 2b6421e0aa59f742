//! eagle-proto: the wire formats of eagle-serve.
//!
//! - [`v1`]: the public `eagle.v1.Generation` API.
//! - [`common`], [`worker`], [`draft`]: the internal services a coordinator drives.
//! - [`wire`]: conversions between wire messages and engine types (features, trees, sampling).
//! - [`status`]: the one place engine errors become gRPC status codes.
//! - [`serve`], [`tls`]: what every server shares (binding, health, shutdown, mutual TLS).
//! - [`prefix`]: the prefix block keys the worker's cache and the coordinator's routing share.

pub mod prefix;
pub mod serve;
pub mod sessions;
pub mod status;
pub mod tls;
pub mod wire;

/// Generated code, nested as the proto packages are (cross-package references need it).
pub mod eagle {
    pub mod v1 {
        tonic::include_proto!("eagle.v1");
    }
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("eagle.common.v1");
        }
    }
    pub mod worker {
        pub mod v1 {
            tonic::include_proto!("eagle.worker.v1");
        }
    }
    pub mod draft {
        pub mod v1 {
            tonic::include_proto!("eagle.draft.v1");
        }
    }
}

pub use eagle::common::v1 as common;
pub use eagle::draft::v1 as draft;
pub use eagle::v1;
pub use eagle::worker::v1 as worker;

/// Every service's descriptors, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("eagle_descriptor");
