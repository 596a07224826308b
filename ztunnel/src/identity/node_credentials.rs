//! A node's credential for reaching the CA, on disk:
//!
//! ```text
//! <dir>/node-key.pem      0600
//! <dir>/node-cert.pem     leaf (spiffe://<td>/ztunnel/node/<node>) + intermediate
//! <dir>/trust-bundle.pem  the roots, to verify the CA and the first peers
//! ```
//!
//! `ztunnel ca node-credential` writes the bootstrap copy; the tunnel renews
//! it through the CA like any identity and writes the renewal back, so a
//! restart after a long uptime still has a valid credential.

use std::path::{Path, PathBuf};

use super::{cert::Credential, node_id::PeerId};
use crate::{
    ca::store::{CaError, write_private},
    tls::verify::TrustBundle,
};

#[derive(Debug, thiserror::Error)]
pub enum NodeCredentialError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Write(#[from] CaError),
}

pub struct NodeCredentialFiles {
    dir: PathBuf,
}

impl NodeCredentialFiles {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }

    fn read(&self, name: &str) -> Result<String, NodeCredentialError> {
        let path = self.dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| NodeCredentialError::Read { path, source })
    }

    pub fn load(&self, identity: PeerId) -> Result<(Credential, TrustBundle), NodeCredentialError> {
        let bundle_path = self.dir.join("trust-bundle.pem");
        let bundle = TrustBundle::from_pem(&self.read("trust-bundle.pem")?)
            .map_err(|e| NodeCredentialError::Invalid { path: bundle_path, reason: e.to_string() })?;
        let cert_path = self.dir.join("node-cert.pem");
        let chain_pem = self.read("node-cert.pem")?;
        let invalid = |reason: String| NodeCredentialError::Invalid { path: cert_path.clone(), reason };
        let chain = crate::identity::cert::certs_from_pem(&chain_pem).map_err(invalid)?;
        // Which root it leads to matters in a rotation: a credential under a
        // root that no longer signs is renewed early.
        let root = crate::tls::verify::root_of(&chain, &bundle)
            .ok_or_else(|| invalid("the credential does not lead to a root of the trust bundle".into()))?;
        let cred = Credential::from_pem(identity, &self.read("node-key.pem")?, &chain_pem, root)
            .map_err(|e| invalid(e.to_string()))?;
        Ok((cred, bundle))
    }

    pub fn write(&self, cred: &Credential, bundle_pem: &str) -> Result<(), NodeCredentialError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|source| NodeCredentialError::Read { path: self.dir.clone(), source })?;
        write_private(&self.dir.join("node-key.pem"), cred.key_pem().as_bytes())?;
        write_private(&self.dir.join("node-cert.pem"), cred.chain_pem().as_bytes())?;
        write_private(&self.dir.join("trust-bundle.pem"), bundle_pem.as_bytes())?;
        Ok(())
    }
}
