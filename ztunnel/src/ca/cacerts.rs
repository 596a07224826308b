//! Istio's `cacerts` plug-in layout: the form the CA's signing key takes in
//! a cluster (the Secret `ztunnel-ca`, mounted read-only at
//! `ca serve --plugin-ca-dir`), and what `ca import` takes from an operator
//! who brings their own root or intermediate.
//!
//! ```text
//! ca-cert.pem     the signing certificate (an intermediate CA)
//! ca-key.pem      its private key
//! root-cert.pem   every root nodes trust (two during a rotation)
//! cert-chain.pem  ca-cert.pem, the intermediates above it, then the root
//! trust-domain    ztunnel's addition: the trust domain (cluster.local if absent)
//! ```
//!
//! The root's private key is never part of it.

use std::{
    fs, io,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{Issuer, KeyPair};
use rustls_pki_types::CertificateDer;

use super::store::{CaDir, CaError, CaState, create_private_dir, write_private, write_public};
use crate::{
    identity::{cert::certs_from_pem, node_id::PeerId, spiffe::TrustDomain},
    tls::verify::{TrustBundle, root_of},
};

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const TRUST_DOMAIN: &str = "trust-domain";

/// The Secret the CA Deployment mounts (deploy/kubernetes/base/ca-deployment.yaml).
pub const SECRET_NAME: &str = "ztunnel-ca";
pub const SECRET_NAMESPACE: &str = "ztunnel-system";

#[derive(Debug, thiserror::Error)]
pub enum CacertsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{dir}: trust-domain says {found}, --trust-domain says {given}: certificates must name one trust domain"
    )]
    TrustDomainMismatch { dir: PathBuf, found: String, given: String },
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// The files of a `cacerts` directory, read but not yet checked.
#[derive(Clone)]
pub struct Cacerts {
    /// Where they came from (for messages).
    pub source: PathBuf,
    pub trust_domain: TrustDomain,
    pub ca_cert: String,
    pub ca_key: String,
    pub root_cert: String,
    /// Empty when the directory has none (then the chain is ca-cert.pem).
    pub cert_chain: String,
}

impl std::fmt::Debug for Cacerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cacerts")
            .field("source", &self.source)
            .field("trust_domain", &self.trust_domain.as_str())
            .finish_non_exhaustive()
    }
}

fn read(dir: &Path, name: &str) -> Result<String, CacertsError> {
    let path = dir.join(name);
    fs::read_to_string(&path).map_err(|source| CacertsError::Io { path, source })
}

fn read_optional(dir: &Path, name: &str) -> Result<Option<String>, CacertsError> {
    match read(dir, name) {
        Ok(s) => Ok(Some(s)),
        Err(CacertsError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Cacerts {
    /// Reads `dir`. The trust domain: the directory's `trust-domain` file,
    /// else `given`, else cluster.local; both present must agree.
    pub fn read(dir: &Path, given: Option<&TrustDomain>) -> Result<Self, CacertsError> {
        let found = match read_optional(dir, TRUST_DOMAIN)? {
            Some(s) => Some(s.trim().parse::<TrustDomain>().map_err(|e| CacertsError::Invalid {
                path: dir.join(TRUST_DOMAIN),
                reason: e.to_string(),
            })?),
            None => None,
        };
        let trust_domain = match (found, given) {
            (Some(f), Some(g)) if &f != g => {
                return Err(CacertsError::TrustDomainMismatch {
                    dir: dir.to_owned(),
                    found: f.to_string(),
                    given: g.to_string(),
                });
            }
            (Some(f), _) => f,
            (None, Some(g)) => g.clone(),
            (None, None) => "cluster.local".parse().map_err(|e: crate::identity::spiffe::SpiffeError| {
                CacertsError::Invalid { path: dir.join(TRUST_DOMAIN), reason: e.to_string() }
            })?,
        };
        Ok(Self {
            source: dir.to_owned(),
            trust_domain,
            ca_cert: read(dir, CA_CERT)?,
            ca_key: read(dir, CA_KEY)?,
            root_cert: read(dir, ROOT_CERT)?,
            cert_chain: read_optional(dir, CERT_CHAIN)?.unwrap_or_default(),
        })
    }

    /// The active generation of a CA directory (`ca init`), as `cacerts`.
    pub fn from_ca_dir(ca: &CaDir) -> Result<Self, CacertsError> {
        let generation = ca.active()?;
        let gen_dir = ca.path().join(format!("gen-{generation}"));
        let bundle = ca.bundle()?;
        let ca_cert = read(&gen_dir, "intermediate-cert.pem")?;
        let root = read(&gen_dir, "root-cert.pem")?;
        Ok(Self {
            source: ca.path().to_owned(),
            trust_domain: ca.trust_domain()?,
            cert_chain: format!("{}{}", ensure_newline(&ca_cert), ensure_newline(&root)),
            ca_cert,
            ca_key: read(&gen_dir, "intermediate-key.pem")?,
            root_cert: bundle.to_pem(),
        })
    }

    fn invalid(&self, file: &str, reason: impl Into<String>) -> CacertsError {
        CacertsError::Invalid { path: self.source.join(file), reason: reason.into() }
    }

    /// Checks the material and makes what the signer needs: the key is
    /// ca-cert.pem's, ca-cert.pem is a CA, and it leads (through
    /// cert-chain.pem's intermediates) to a root in root-cert.pem.
    pub fn state(&self) -> Result<CaState, CacertsError> {
        let key = KeyPair::from_pem(&self.ca_key).map_err(|e| self.invalid(CA_KEY, e.to_string()))?;
        let ca_cert = certs_from_pem(&self.ca_cert).map_err(|e| self.invalid(CA_CERT, e))?;
        let [signing] = ca_cert.as_slice() else {
            return Err(self.invalid(CA_CERT, format!("holds {} certificates, expected one", ca_cert.len())));
        };
        let (_, parsed) =
            x509_parser::parse_x509_certificate(signing).map_err(|e| self.invalid(CA_CERT, e.to_string()))?;
        if !parsed.is_ca() {
            return Err(self.invalid(CA_CERT, "not a CA certificate (basicConstraints CA:FALSE or absent)"));
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(self.invalid(CA_KEY, "is not the key of ca-cert.pem"));
        }
        let issuer =
            Issuer::from_ca_cert_pem(&self.ca_cert, key).map_err(|e| self.invalid(CA_CERT, e.to_string()))?;
        let bundle =
            TrustBundle::from_pem(&self.root_cert).map_err(|e| self.invalid(ROOT_CERT, e.to_string()))?;
        let chain = self.chain(signing, &bundle)?;
        let signing_root = probe_root(&issuer, &chain, &bundle, &self.trust_domain).ok_or_else(|| {
            self.invalid(
                CA_CERT,
                "does not lead to a root in root-cert.pem (through the intermediates of cert-chain.pem), \
                 or is not valid now",
            )
        })?;
        Ok(CaState {
            trust_domain: self.trust_domain.clone(),
            generation: 1,
            issuer,
            chain,
            signing_root,
            bundle,
        })
    }

    /// ca-cert.pem and the intermediates of cert-chain.pem above it (the
    /// roots left out: peers have those).
    fn chain(
        &self,
        signing: &CertificateDer<'static>,
        bundle: &TrustBundle,
    ) -> Result<Vec<CertificateDer<'static>>, CacertsError> {
        if self.cert_chain.trim().is_empty() {
            return Ok(vec![signing.clone()]);
        }
        let listed = certs_from_pem(&self.cert_chain).map_err(|e| self.invalid(CERT_CHAIN, e))?;
        if listed.first() != Some(signing) {
            return Err(self.invalid(CERT_CHAIN, "must start with ca-cert.pem"));
        }
        Ok(listed.into_iter().filter(|c| !bundle.roots().contains(c)).collect())
    }

    /// The Secret manifest the CA Deployment mounts.
    pub fn secret_manifest(&self) -> String {
        let mut data = serde_yaml_ng::Mapping::new();
        for (k, v) in [
            (CA_CERT, self.ca_cert.as_str()),
            (CA_KEY, self.ca_key.as_str()),
            (ROOT_CERT, self.root_cert.as_str()),
            (CERT_CHAIN, self.cert_chain.as_str()),
        ] {
            if !v.is_empty() {
                data.insert(k.into(), ensure_newline(v).into());
            }
        }
        data.insert(TRUST_DOMAIN.into(), format!("{}\n", self.trust_domain).into());
        let secret = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": SECRET_NAME,
                "namespace": SECRET_NAMESPACE,
                "labels": { "app.kubernetes.io/part-of": "ztunnel", "app.kubernetes.io/component": "ca" },
            },
            "type": "Opaque",
            "stringData": data,
        });
        format!(
            "# The CA's signing key for `ztunnel ca serve --kubernetes` (Istio's cacerts layout).\n\
             # Apply it, then delete this file: it holds a private key.\n{}",
            serde_yaml_ng::to_string(&secret).unwrap_or_default()
        )
    }

    /// Writes [`Self::secret_manifest`] to `path`, mode 0600 from the first
    /// byte; never over an existing file.
    pub fn write_secret(&self, path: &Path) -> Result<(), CacertsError> {
        use io::Write as _;
        let io_err = |source| CacertsError::Io { path: path.to_owned(), source };
        let mut f =
            fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io_err)?;
        f.write_all(self.secret_manifest().as_bytes()).and_then(|()| f.sync_all()).map_err(io_err)
    }

    /// Makes `ca` a CA directory signing with this material (generation 1;
    /// no root key: rotations of an imported CA start from a new root made
    /// by `ca rotate begin`, or from a new import). Checked first.
    pub fn import_into(&self, ca: &CaDir, force: bool) -> Result<CaState, CacertsError> {
        let state = self.state()?;
        let dir = ca.path();
        let occupied = fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
        if occupied && !force {
            return Err(CaError::Exists { path: dir.to_owned() }.into());
        }
        let signing_root = state
            .bundle
            .roots()
            .iter()
            .find(|r| crate::identity::cert::fingerprint(r) == state.signing_root)
            .cloned()
            .ok_or_else(|| self.invalid(ROOT_CERT, "the signing root vanished"))?;
        let gen_dir = dir.join("gen-1");
        if force && gen_dir.exists() {
            fs::remove_dir_all(&gen_dir)
                .map_err(|source| CacertsError::Io { path: gen_dir.clone(), source })?;
        }
        create_private_dir(dir)?;
        create_private_dir(&gen_dir)?;
        let pem = crate::identity::cert::certs_to_pem;
        write_private(&gen_dir.join("intermediate-key.pem"), ensure_newline(&self.ca_key).as_bytes())?;
        write_public(&gen_dir.join("intermediate-cert.pem"), pem(&state.chain).as_bytes())?;
        write_public(&gen_dir.join("root-cert.pem"), pem(&[signing_root]).as_bytes())?;
        write_public(&dir.join("trust-bundle.pem"), state.bundle.to_pem().as_bytes())?;
        write_public(&dir.join("trust-domain"), format!("{}\n", self.trust_domain).as_bytes())?;
        write_public(&dir.join("active"), b"1\n")?;
        Ok(ca.load()?)
    }
}

/// A token that changes whenever the material in `dir` does (the kubelet
/// swaps a mounted Secret's files when the Secret changes).
pub fn version(dir: &Path) -> String {
    [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN, TRUST_DOMAIN]
        .iter()
        .map(|f| fs::read_to_string(dir.join(f)).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("|")
}

/// Signs a throwaway leaf and finds the root it leads to: proves the key,
/// the certificate and the chain belong together.
fn probe_root(
    issuer: &Issuer<'static, KeyPair>,
    chain: &[CertificateDer<'static>],
    bundle: &TrustBundle,
    td: &TrustDomain,
) -> Option<String> {
    let key = crate::identity::cert::new_key().ok()?;
    let now = std::time::SystemTime::now();
    let mut p = rcgen::CertificateParams::default();
    p.not_before = (now - Duration::from_secs(60)).into();
    p.not_after = (now + Duration::from_secs(300)).into();
    let uri = PeerId::CaService { trust_domain: td.clone() }.to_string().try_into().ok()?;
    p.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    p.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = p.signed_by(&key, issuer).ok()?;
    let mut full = vec![leaf.der().clone()];
    full.extend(chain.iter().cloned());
    root_of(&full, bundle)
}

fn ensure_newline(s: &str) -> String {
    if s.ends_with('\n') { s.to_owned() } else { format!("{s}\n") }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyUsagePurpose};
    use rustls_pki_types::UnixTime;

    use super::*;
    use crate::{
        ca::{
            signer::{Placement, Signer, SignerPolicy},
            store::CaLifetimes,
        },
        identity::cert::{certs_to_pem, csr_pem, new_key},
        tls::verify::{Expect, verify_peer},
    };

    /// What the kubelet does with a Secret: one file per key.
    fn mount(manifest: &str, dir: &Path) {
        let secret: serde_yaml_ng::Value = serde_yaml_ng::from_str(
            manifest.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n").as_str(),
        )
        .unwrap();
        assert_eq!(secret["metadata"]["name"].as_str(), Some(SECRET_NAME));
        fs::create_dir_all(dir).unwrap();
        for (k, v) in secret["stringData"].as_mapping().unwrap() {
            fs::write(dir.join(k.as_str().unwrap()), v.as_str().unwrap()).unwrap();
        }
    }

    /// Signs a workload certificate with `state` and checks it against the
    /// state's bundle, as a peer would.
    fn signs_verifiable_leaves(state: CaState) {
        let bundle = state.bundle.clone();
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let placement = Placement::new(
            &state.trust_domain,
            &[serde_yaml_ng::from_str("name: web\nnamespace: shop\nservice_account: web\nnode: n1\n")
                .unwrap()],
            None,
        );
        let signer = Signer::new(state, placement, SignerPolicy::default());
        let csr = csr_pem(&new_key().unwrap(), &web.parse().unwrap()).unwrap();
        let issued = signer.sign("n1", &csr, Duration::from_secs(600)).unwrap();
        verify_peer(
            &issued.chain[0],
            &issued.chain[1..],
            &bundle,
            &Expect::Identity(web.parse().unwrap()),
            UnixTime::now(),
            Duration::ZERO,
        )
        .unwrap();
    }

    #[test]
    fn init_writes_a_0600_secret_that_the_ca_loads_from_its_mount() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CaDir::new(&tmp.path().join("ca"));
        ca.init(&"cluster.local".parse().unwrap(), false, CaLifetimes::default()).unwrap();
        let file = tmp.path().join("secret.yaml");
        Cacerts::from_ca_dir(&ca).unwrap().write_secret(&file).unwrap();
        assert_eq!(fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&file).unwrap();
        assert!(!text.contains(&fs::read_to_string(ca.path().join("gen-1/root-key.pem")).unwrap()));
        assert!(Cacerts::from_ca_dir(&ca).unwrap().write_secret(&file).is_err(), "never overwrites");

        let mounted = tmp.path().join("mounted");
        mount(&text, &mounted);
        let state = Cacerts::read(&mounted, None).unwrap().state().unwrap();
        assert_eq!(state.signing_root, ca.load().unwrap().signing_root);
        assert_eq!(state.trust_domain.as_str(), "cluster.local");
        signs_verifiable_leaves(state);
    }

    fn ca_cert(cn: &str, key: &KeyPair, issuer: Option<&Issuer<'static, KeyPair>>) -> rcgen::Certificate {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        match issuer {
            Some(i) => p.signed_by(key, i).unwrap(),
            None => p.self_signed(key).unwrap(),
        }
    }

    #[test]
    fn an_operators_own_root_and_two_level_intermediate_import_and_sign() {
        // root -> corp intermediate -> mesh intermediate (ca-cert.pem).
        let (root_key, corp_key, mesh_key) = (new_key().unwrap(), new_key().unwrap(), new_key().unwrap());
        let root = ca_cert("corp root", &root_key, None);
        let root_issuer = Issuer::from_ca_cert_der(root.der(), root_key).unwrap();
        let corp = ca_cert("corp intermediate", &corp_key, Some(&root_issuer));
        let corp_issuer = Issuer::from_ca_cert_der(corp.der(), corp_key).unwrap();
        let mesh = ca_cert("mesh intermediate", &mesh_key, Some(&corp_issuer));

        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("cacerts");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join(CA_CERT), mesh.pem()).unwrap();
        fs::write(src.join(CA_KEY), mesh_key.serialize_pem()).unwrap();
        fs::write(src.join(ROOT_CERT), root.pem()).unwrap();
        let chain = [mesh.der().clone(), corp.der().clone(), root.der().clone()];
        fs::write(src.join(CERT_CHAIN), certs_to_pem(&chain)).unwrap();

        let material = Cacerts::read(&src, Some(&"cluster.local".parse().unwrap())).unwrap();
        let state = material.state().unwrap();
        assert_eq!(state.chain.len(), 2, "the mesh and corp intermediates, not the root");
        signs_verifiable_leaves(state);

        let dir = CaDir::new(&tmp.path().join("ca"));
        let imported = material.import_into(&dir, false).unwrap();
        assert_eq!(imported.chain.len(), 2);
        assert!(!dir.path().join("gen-1/root-key.pem").exists(), "the root key never comes along");
        assert_eq!(
            fs::metadata(dir.path().join("gen-1/intermediate-key.pem")).unwrap().mode() & 0o777,
            0o600
        );
        signs_verifiable_leaves(dir.load().unwrap());
        assert!(matches!(material.import_into(&dir, false), Err(CacertsError::Ca(CaError::Exists { .. }))));

        // The wrong key, a chain that skips a level, a chain to another root.
        fs::write(src.join(CA_KEY), corp_issuer.key().serialize_pem()).unwrap();
        let Err(e) = Cacerts::read(&src, None).unwrap().state() else { panic!("accepted") };
        assert!(e.to_string().contains("ca-key.pem: is not the key of ca-cert.pem"), "{e}");
        fs::write(src.join(CA_KEY), mesh_key.serialize_pem()).unwrap();
        fs::write(src.join(CERT_CHAIN), certs_to_pem(&[mesh.der().clone(), root.der().clone()])).unwrap();
        let Err(e) = Cacerts::read(&src, None).unwrap().state() else { panic!("accepted") };
        assert!(e.to_string().contains("does not lead to a root in root-cert.pem"), "{e}");
        fs::write(src.join(CERT_CHAIN), certs_to_pem(&[corp.der().clone()])).unwrap();
        let Err(e) = Cacerts::read(&src, None).unwrap().state() else { panic!("accepted") };
        assert!(e.to_string().contains("must start with ca-cert.pem"), "{e}");

        // A trust-domain file that disagrees with the flag.
        fs::write(src.join(TRUST_DOMAIN), "other.example\n").unwrap();
        let e = Cacerts::read(&src, Some(&"cluster.local".parse().unwrap())).unwrap_err();
        assert!(matches!(e, CacertsError::TrustDomainMismatch { .. }), "{e}");
    }
}
