//! The certificate authority: `ca init`, the signing service (`ca serve`),
//! node authorization, and root rotation.
//!
//! The hierarchy is root -> intermediate -> workload leaf. The root key is
//! only needed to make an intermediate (at `ca init` and `ca rotate begin`)
//! and can live offline otherwise; the signing service holds the intermediate;
//! node tunnels hold neither.

pub mod api;
pub mod cacerts;
pub mod kubernetes;
pub mod server;
pub mod signer;
pub mod store;
