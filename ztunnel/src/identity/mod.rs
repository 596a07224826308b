//! Workload identity.

pub mod cert;
pub mod node_credentials;
pub mod node_id;
pub mod spiffe;
