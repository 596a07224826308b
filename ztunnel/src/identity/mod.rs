//! Workload identity.

pub mod ca_address;
pub mod ca_client;
pub mod cert;
pub mod manager;
pub mod node_credentials;
pub mod node_id;
pub mod runtime;
pub mod spiffe;
