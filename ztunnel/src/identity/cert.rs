//! Keys, CSRs and issued credentials.
//!
//! Workload keys are generated on the node (ECDSA P-256), stay in memory and
//! never leave the process: only the CSR goes to the CA. Nothing here prints a
//! key; `Credential`'s Debug omits it on purpose.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _};

use super::node_id::PeerId;
use crate::tls::verify::{peer_id, validity};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a key: {0}")]
    Key(rcgen::Error),
    #[error("building the CSR: {0}")]
    Csr(rcgen::Error),
    #[error("the CA returned no certificate")]
    EmptyChain,
    #[error("the CA returned a certificate for `{found}`, not `{want}`")]
    WrongIdentity { found: String, want: String },
    #[error("the CA returned a certificate that is not for our key")]
    KeyMismatch,
    #[error("the CA returned a certificate we cannot read: {0}")]
    Unreadable(String),
    #[error("rustls refused the key: {0}")]
    Rustls(rustls::Error),
}

/// A fresh ECDSA P-256 key.
pub fn new_key() -> Result<KeyPair, CertError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CertError::Key)
}

/// A CSR whose only SAN is `identity`'s URI, signed by `key`.
pub fn csr_pem(key: &KeyPair, identity: &PeerId) -> Result<String, CertError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity.to_string().try_into().map_err(CertError::Csr)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.serialize_request(key).and_then(|csr| csr.pem()).map_err(CertError::Csr)
}

/// An identity's key and the chain the CA issued for it.
#[derive(Clone)]
pub struct Credential {
    pub identity: PeerId,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// What rustls presents (key + chain).
    pub certified: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
    /// Fingerprint of the root the chain leads to.
    pub root: String,
    /// PKCS#8 DER of the key: kept only so node credentials can be persisted.
    key_der: Arc<Vec<u8>>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_after", &humantime::format_rfc3339_seconds(self.not_after))
            .finish_non_exhaustive()
    }
}

impl Credential {
    /// Checks that the chain is for `identity` and `key`, and makes it usable.
    pub fn new(
        identity: PeerId,
        key: &KeyPair,
        chain: Vec<CertificateDer<'static>>,
        root: String,
    ) -> Result<Self, CertError> {
        let leaf = chain.first().ok_or(CertError::EmptyChain)?;
        let found = peer_id(leaf).map_err(|e| CertError::Unreadable(e.to_string()))?;
        if found != identity {
            return Err(CertError::WrongIdentity { found: found.to_string(), want: identity.to_string() });
        }
        let (_, x) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| CertError::Unreadable(e.to_string()))?;
        if x.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertError::KeyMismatch);
        }
        let serial = x.raw_serial_as_string();
        let (nb, na) = validity(leaf).ok_or_else(|| CertError::Unreadable("validity".into()))?;
        let key_der = key.serialize_der();
        let certified = certified_key(&chain, &key_der)?;
        Ok(Self {
            identity,
            chain,
            certified,
            not_before: UNIX_EPOCH + Duration::from_secs(nb),
            not_after: UNIX_EPOCH + Duration::from_secs(na),
            serial,
            root,
            key_der: Arc::new(key_der),
        })
    }

    /// Loads a credential from PEM (a node's bootstrap credential on disk).
    pub fn from_pem(
        identity: PeerId,
        key_pem: &str,
        chain_pem: &str,
        root: String,
    ) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(CertError::Key)?;
        let chain = certs_from_pem(chain_pem).map_err(CertError::Unreadable)?;
        Self::new(identity, &key, chain, root)
    }

    pub fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now >= self.not_before && now < self.not_after
    }

    pub fn chain_pem(&self) -> String {
        certs_to_pem(&self.chain)
    }

    /// The key in PEM, for writing a node credential back to its 0600 file.
    pub fn key_pem(&self) -> String {
        pem_block("PRIVATE KEY", &self.key_der)
    }
}

fn certified_key(chain: &[CertificateDer<'static>], key_der: &[u8]) -> Result<Arc<CertifiedKey>, CertError> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.to_vec()));
    let provider = crate::tls::provider();
    let signing = provider.key_provider.load_private_key(key).map_err(CertError::Rustls)?;
    Ok(Arc::new(CertifiedKey::new(chain.to_vec(), signing)))
}

/// Every certificate in a PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("reading PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in PEM".into());
    }
    Ok(certs)
}

pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| pem_block("CERTIFICATE", c)).collect()
}

fn pem_block(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der.to_vec()), config)
}

/// A short SHA-256 fingerprint (first 8 bytes, hex) for operators.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips() {
        let key = new_key().unwrap();
        let cert = CertificateParams::new(vec!["x.test".to_owned()]).unwrap().self_signed(&key).unwrap();
        let pem = certs_to_pem(&[cert.der().clone()]);
        assert_eq!(pem, cert.pem().replace("\r\n", "\n"));
        assert_eq!(certs_from_pem(&pem).unwrap()[0], *cert.der());
        assert!(certs_from_pem("nothing").is_err());
    }

    #[test]
    fn csrs_carry_only_the_identity() {
        let key = new_key().unwrap();
        let id: PeerId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let csr = csr_pem(&key, &id).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        assert_eq!(parsed.params.subject_alt_names.len(), 1);
        assert!(
            matches!(&parsed.params.subject_alt_names[0], SanType::URI(u) if u.as_str() == id.to_string())
        );
    }
}
