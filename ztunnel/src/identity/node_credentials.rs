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

const KEY: &str = "node-key.pem";
const CERT: &str = "node-cert.pem";
/// Present once both staged files are complete.
const COMMITTED: &str = "node-credential.committed";

fn staged(name: &str) -> String {
    format!("{name}.next")
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
        self.recover()?;
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

    /// Replaces the credential so that a crash at any point leaves either
    /// the old key and certificate or the new ones, never a key with another
    /// key's certificate (which would keep the tunnel from starting): both
    /// are staged, a marker commits them, and the renames that follow are
    /// finished by the next `load` if they were cut short.
    pub fn write(&self, cred: &Credential, bundle_pem: &str) -> Result<(), NodeCredentialError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|source| NodeCredentialError::Read { path: self.dir.clone(), source })?;
        self.stage(cred.key_pem().as_bytes(), cred.chain_pem().as_bytes())?;
        self.recover()?;
        write_private(&self.dir.join("trust-bundle.pem"), bundle_pem.as_bytes())?;
        Ok(())
    }

    fn stage(&self, key_pem: &[u8], chain_pem: &[u8]) -> Result<(), NodeCredentialError> {
        write_private(&self.dir.join(staged(KEY)), key_pem)?;
        write_private(&self.dir.join(staged(CERT)), chain_pem)?;
        write_private(&self.dir.join(COMMITTED), b"")?;
        Ok(())
    }

    /// Finishes a committed replacement, or drops an uncommitted one.
    fn recover(&self) -> Result<(), NodeCredentialError> {
        let io = |path: PathBuf| move |source| NodeCredentialError::Read { path, source };
        let marker = self.dir.join(COMMITTED);
        let committed = marker.exists();
        for name in [KEY, CERT] {
            let from = self.dir.join(staged(name));
            if !from.exists() {
                continue;
            }
            if committed {
                std::fs::rename(&from, self.dir.join(name)).map_err(io(from.clone()))?;
            } else {
                std::fs::remove_file(&from).map_err(io(from.clone()))?;
            }
        }
        if committed {
            std::fs::remove_file(&marker).map_err(io(marker.clone()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap_or_default()
    }

    #[test]
    fn a_replacement_cut_short_leaves_a_matching_pair() {
        let dir = tempfile::tempdir().unwrap();
        let files = NodeCredentialFiles::new(dir.path());
        std::fs::write(dir.path().join(KEY), "old key").unwrap();
        std::fs::write(dir.path().join(CERT), "old cert").unwrap();

        // Cut short before the commit: the old pair stays.
        write_private(&dir.path().join(staged(KEY)), b"new key").unwrap();
        files.recover().unwrap();
        assert_eq!((read(dir.path(), KEY), read(dir.path(), CERT)), ("old key".into(), "old cert".into()));
        assert!(!dir.path().join(staged(KEY)).exists());

        // Cut short after the commit, between the two renames: the new pair.
        files.stage(b"new key", b"new cert").unwrap();
        std::fs::rename(dir.path().join(staged(KEY)), dir.path().join(KEY)).unwrap();
        files.recover().unwrap();
        assert_eq!((read(dir.path(), KEY), read(dir.path(), CERT)), ("new key".into(), "new cert".into()));
        assert!(!dir.path().join(COMMITTED).exists());
    }
}
