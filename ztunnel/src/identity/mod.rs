//! Workload identity.

pub mod spiffe;
