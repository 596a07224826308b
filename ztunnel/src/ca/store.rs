//! The CA's directory: roots and intermediates by generation, the trust
//! bundle, and which generation signs.
//!
//! ```text
//! <dir>/ (0700)
//!   trust-domain                the trust domain, e.g. cluster.local
//!   active                      the generation that signs, e.g. 1
//!   trust-bundle.pem            every root nodes must trust (two during a rotation)
//!   gen-1/root-cert.pem
//!   gen-1/root-key.pem          0600; needed only to create the intermediate: move it offline
//!   gen-1/intermediate-cert.pem
//!   gen-1/intermediate-key.pem  0600; the signing key
//! ```
//!
//! A root rotation is three commands with a wait between each (see the
//! runbook): `begin` adds generation N+1 and its root to the bundle;
//! `activate` makes N+1 sign; `finish` drops the older roots from the bundle.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls_pki_types::CertificateDer;

use crate::{
    identity::{
        cert::{certs_from_pem, certs_to_pem, fingerprint, new_key},
        spiffe::TrustDomain,
    },
    tls::verify::TrustBundle,
};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(
        "{path} is not empty (it holds a CA, or other files); pass --force to replace the CA (every issued certificate stops being trusted)"
    )]
    Exists { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("creating a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Rotation(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CaError + '_ {
    move |source| CaError::Io { path: path.to_owned(), source }
}

/// How long CA certificates live.
#[derive(Debug, Clone, Copy)]
pub struct CaLifetimes {
    pub root: Duration,
    pub intermediate: Duration,
}

impl Default for CaLifetimes {
    fn default() -> Self {
        Self { root: Duration::from_secs(10 * 365 * 86400), intermediate: Duration::from_secs(365 * 86400) }
    }
}

/// The CA state a signer needs: the active generation's intermediate and
/// the trust bundle. Never the root key.
pub struct CaState {
    pub trust_domain: TrustDomain,
    pub generation: u32,
    pub issuer: Issuer<'static, KeyPair>,
    /// The signing certificate, then any intermediates above it up to (not
    /// including) the root: what follows a leaf in the chain it is given.
    pub chain: Vec<CertificateDer<'static>>,
    /// Fingerprint of the active generation's root.
    pub signing_root: String,
    pub bundle: TrustBundle,
}

impl CaState {
    /// A CA that exists only in memory: for a single tunnel with no CA
    /// directory. Its certificates are trusted by that tunnel alone.
    pub fn ephemeral(trust_domain: &TrustDomain) -> Result<Self, CaError> {
        let now = SystemTime::now();
        let lifetimes = CaLifetimes::default();
        let root_key = new_key().map_err(|e| CaError::Rotation(e.to_string()))?;
        let mut root = ca_params(&format!("ztunnel ephemeral root CA {trust_domain}"), now, lifetimes.root)?;
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root, root_key);
        let key = new_key().map_err(|e| CaError::Rotation(e.to_string()))?;
        let mut params = ca_params(
            &format!("ztunnel ephemeral intermediate CA {trust_domain}"),
            now,
            lifetimes.intermediate,
        )?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.use_authority_key_identifier_extension = true;
        let intermediate = params.signed_by(&key, &root_issuer)?;
        let bundle =
            TrustBundle::new(vec![root_cert.der().clone()]).map_err(|e| CaError::Rotation(e.to_string()))?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            generation: 1,
            issuer: Issuer::new(params, key),
            chain: vec![intermediate.der().clone()],
            signing_root: fingerprint(root_cert.der()),
            bundle,
        })
    }
}

pub struct CaDir {
    path: PathBuf,
}

impl CaDir {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_owned() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn generation_dir(&self, generation: u32) -> PathBuf {
        self.path.join(format!("gen-{generation}"))
    }

    /// Creates a CA: generation 1's root and intermediate, and the bundle.
    pub fn init(
        &self,
        trust_domain: &TrustDomain,
        force: bool,
        lifetimes: CaLifetimes,
    ) -> Result<(), CaError> {
        let active = self.path.join("active");
        // Anything already there (even a half-made CA without `active`) is
        // kept unless --force says otherwise.
        let occupied = fs::read_dir(&self.path).is_ok_and(|mut d| d.next().is_some());
        if occupied && !force {
            return Err(CaError::Exists { path: self.path.clone() });
        }
        if force && self.path.exists() {
            for entry in fs::read_dir(&self.path).map_err(io_err(&self.path))? {
                let p = entry.map_err(io_err(&self.path))?.path();
                if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("gen-")) {
                    fs::remove_dir_all(&p).map_err(io_err(&p))?;
                }
            }
        }
        create_private_dir(&self.path)?;
        write_public(&self.path.join("trust-domain"), format!("{trust_domain}\n").as_bytes())?;
        let root = self.create_generation(1, trust_domain, lifetimes)?;
        write_public(&self.path.join("trust-bundle.pem"), certs_to_pem(&[root]).as_bytes())?;
        write_public(&active, b"1\n")
    }

    /// Makes generation `n`: a root and an intermediate signed by it.
    fn create_generation(
        &self,
        n: u32,
        td: &TrustDomain,
        lifetimes: CaLifetimes,
    ) -> Result<CertificateDer<'static>, CaError> {
        let dir = self.generation_dir(n);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        create_private_dir(&dir)?;
        let now = SystemTime::now();
        let root_key = new_key().map_err(|e| CaError::Rotation(e.to_string()))?;
        let mut root = ca_params(&format!("ztunnel root CA {td} generation {n}"), now, lifetimes.root)?;
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root, root_key);

        let intermediate_key = new_key().map_err(|e| CaError::Rotation(e.to_string()))?;
        let mut intermediate = ca_params(
            &format!("ztunnel intermediate CA {td} generation {n}"),
            now,
            lifetimes.intermediate.min(lifetimes.root),
        )?;
        intermediate.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        intermediate.use_authority_key_identifier_extension = true;
        let intermediate_cert = intermediate.signed_by(&intermediate_key, &root_issuer)?;

        write_private(&dir.join("root-key.pem"), root_issuer.key().serialize_pem().as_bytes())?;
        write_public(&dir.join("root-cert.pem"), root_cert.pem().as_bytes())?;
        write_private(&dir.join("intermediate-key.pem"), intermediate_key.serialize_pem().as_bytes())?;
        write_public(&dir.join("intermediate-cert.pem"), intermediate_cert.pem().as_bytes())?;
        Ok(root_cert.der().clone())
    }

    fn read(&self, name: &str) -> Result<String, CaError> {
        let p = self.path.join(name);
        fs::read_to_string(&p).map_err(io_err(&p))
    }

    pub fn trust_domain(&self) -> Result<TrustDomain, CaError> {
        let p = self.path.join("trust-domain");
        self.read("trust-domain")?.trim().parse().map_err(|e: crate::identity::spiffe::SpiffeError| {
            CaError::Invalid { path: p, reason: e.to_string() }
        })
    }

    pub fn active(&self) -> Result<u32, CaError> {
        let p = self.path.join("active");
        self.read("active")?
            .trim()
            .parse()
            .map_err(|e| CaError::Invalid { path: p, reason: format!("not a generation number: {e}") })
    }

    fn generations(&self) -> Result<Vec<u32>, CaError> {
        let mut out: Vec<u32> = fs::read_dir(&self.path)
            .map_err(io_err(&self.path))?
            .filter_map(|e| e.ok()?.file_name().to_string_lossy().strip_prefix("gen-")?.parse().ok())
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    pub fn bundle(&self) -> Result<TrustBundle, CaError> {
        let p = self.path.join("trust-bundle.pem");
        TrustBundle::from_pem(&self.read("trust-bundle.pem")?)
            .map_err(|e| CaError::Invalid { path: p, reason: e.to_string() })
    }

    fn root_of(&self, generation: u32) -> Result<CertificateDer<'static>, CaError> {
        let p = self.generation_dir(generation).join("root-cert.pem");
        let pem = fs::read_to_string(&p).map_err(io_err(&p))?;
        let mut certs =
            certs_from_pem(&pem).map_err(|reason| CaError::Invalid { path: p.clone(), reason })?;
        Ok(certs.remove(0))
    }

    /// Loads what signing needs. The root key is not read.
    pub fn load(&self) -> Result<CaState, CaError> {
        let trust_domain = self.trust_domain()?;
        let generation = self.active()?;
        let dir = self.generation_dir(generation);
        let cert_path = dir.join("intermediate-cert.pem");
        let key_path = dir.join("intermediate-key.pem");
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| CaError::Invalid { path: key_path, reason: e.to_string() })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| CaError::Invalid { path: cert_path.clone(), reason: e.to_string() })?;
        // The signing certificate first; an imported CA may add the
        // intermediates between it and the root.
        let chain =
            certs_from_pem(&cert_pem).map_err(|reason| CaError::Invalid { path: cert_path, reason })?;
        let root = self.root_of(generation)?;
        let bundle = self.bundle()?;
        let signing_root = fingerprint(&root);
        if !bundle.fingerprints().contains(&signing_root) {
            return Err(CaError::Invalid {
                path: self.path.join("trust-bundle.pem"),
                reason: format!("the active generation {generation}'s root is not in the trust bundle"),
            });
        }
        Ok(CaState { trust_domain, generation, issuer, chain, signing_root, bundle })
    }

    /// A token that changes whenever the directory's state does (for reloads).
    pub fn version(&self) -> String {
        ["active", "trust-bundle.pem"]
            .iter()
            .map(|f| fs::read_to_string(self.path.join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("|")
    }

    /// Rotation step 1: a new generation whose root joins the bundle. The
    /// active generation keeps signing.
    pub fn rotate_begin(&self, lifetimes: CaLifetimes) -> Result<u32, CaError> {
        let active = self.active()?;
        let newest = self.generations()?.into_iter().max().unwrap_or(active);
        if newest > active {
            return Err(CaError::Rotation(format!(
                "generation {newest} is already staged; run `ztunnel ca rotate activate` (or remove {})",
                self.generation_dir(newest).display()
            )));
        }
        let next = active + 1;
        let root = self.create_generation(next, &self.trust_domain()?, lifetimes)?;
        let mut roots = self.bundle()?.roots().to_vec();
        roots.push(root);
        write_public(&self.path.join("trust-bundle.pem"), certs_to_pem(&roots).as_bytes())?;
        Ok(next)
    }

    /// Rotation step 2: the newest generation signs from now on.
    pub fn rotate_activate(&self) -> Result<u32, CaError> {
        let active = self.active()?;
        let newest = self.generations()?.into_iter().max().unwrap_or(active);
        if newest == active {
            return Err(CaError::Rotation(format!(
                "generation {active} is already active; nothing staged (run `begin` first)"
            )));
        }
        if !self.bundle()?.fingerprints().contains(&fingerprint(&self.root_of(newest)?)) {
            return Err(CaError::Rotation(format!("generation {newest}'s root is not in the trust bundle")));
        }
        write_public(&self.path.join("active"), format!("{newest}\n").as_bytes())?;
        Ok(newest)
    }

    /// Rotation step 3: only the active generation's root stays trusted.
    /// Returns how many roots were removed.
    pub fn rotate_finish(&self) -> Result<usize, CaError> {
        let active = self.active()?;
        let newest = self.generations()?.into_iter().max().unwrap_or(active);
        if newest != active {
            return Err(CaError::Rotation(format!(
                "generation {newest} is staged but not active: `activate` it (and let certificates renew) before finishing"
            )));
        }
        let keep = self.root_of(active)?;
        let before = self.bundle()?.roots().len();
        write_public(&self.path.join("trust-bundle.pem"), certs_to_pem(&[keep]).as_bytes())?;
        Ok(before - 1)
    }
}

fn ca_params(common_name: &str, now: SystemTime, lifetime: Duration) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ztunnel");
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.not_before = (now - Duration::from_secs(3600)).into();
    p.not_after = expiry(now, lifetime)?.into();
    p.serial_number = Some(random_serial().map_err(CaError::Rotation)?);
    p.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

/// 16 random bytes, top bit clear (serials are positive). Fails rather than
/// hand out a predictable (or repeated) serial when the system has no
/// randomness to give.
pub fn random_serial() -> Result<SerialNumber, String> {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| "the system's random number generator failed".to_owned())?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

/// `now + lifetime`, refused when it would not be a time.
fn expiry(now: SystemTime, lifetime: Duration) -> Result<SystemTime, CaError> {
    now.checked_add(lifetime)
        .filter(|t| t.duration_since(SystemTime::UNIX_EPOCH).is_ok_and(|d| d.as_secs() < 253_402_300_799))
        .ok_or_else(|| CaError::Rotation(format!("a lifetime of {lifetime:?} ends after the year 9999")))
}

pub fn create_private_dir(path: &Path) -> Result<(), CaError> {
    fs::create_dir_all(path).map_err(io_err(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err(path))
}

/// Writes a private key: mode 0600 from the first byte (never readable by
/// others, not even briefly), replacing atomically.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), CaError> {
    write_with_mode(path, data, 0o600)
}

pub fn write_public(path: &Path, data: &[u8]) -> Result<(), CaError> {
    write_with_mode(path, data, 0o644)
}

fn write_with_mode(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f =
        fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io_err(&tmp))?;
    // The mode exactly, whatever the umask: certificates must stay readable
    // by the tunnel's other users, keys by nobody else.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| f.write_all(data))
        .and_then(|()| f.sync_all())
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn init_makes_a_hierarchy_with_private_keys_0600_and_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let ca = CaDir::new(&dir);
        let td: TrustDomain = "mesh.example".parse().unwrap();
        ca.init(&td, false, CaLifetimes::default()).unwrap();
        assert_eq!(mode(&dir), 0o700);
        for key in ["gen-1/root-key.pem", "gen-1/intermediate-key.pem"] {
            assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
        }
        assert_eq!(mode(&dir.join("gen-1/root-cert.pem")), 0o644);
        let state = ca.load().unwrap();
        assert_eq!(state.trust_domain, td);
        assert_eq!(state.bundle.roots().len(), 1);

        let before = fs::read(dir.join("gen-1/root-key.pem")).unwrap();
        let err = ca.init(&td, false, CaLifetimes::default()).unwrap_err();
        assert!(matches!(err, CaError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(fs::read(dir.join("gen-1/root-key.pem")).unwrap(), before, "nothing was touched");

        ca.init(&td, true, CaLifetimes::default()).unwrap();
        assert_ne!(fs::read(dir.join("gen-1/root-key.pem")).unwrap(), before, "--force replaces the CA");
    }

    #[test]
    fn rotation_steps_go_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CaDir::new(tmp.path());
        ca.init(&"cluster.local".parse().unwrap(), false, CaLifetimes::default()).unwrap();
        let first_root = ca.load().unwrap().signing_root;
        assert!(ca.rotate_activate().is_err(), "nothing staged yet");
        assert!(ca.rotate_finish().unwrap() == 0, "finishing with one root removes nothing");

        assert_eq!(ca.rotate_begin(CaLifetimes::default()).unwrap(), 2);
        let staged = ca.load().unwrap();
        assert_eq!(staged.generation, 1, "the old generation still signs");
        assert_eq!(staged.bundle.roots().len(), 2, "both roots are trusted");
        assert!(ca.rotate_begin(CaLifetimes::default()).is_err(), "one rotation at a time");
        assert!(ca.rotate_finish().is_err(), "cannot drop roots before activating");

        assert_eq!(ca.rotate_activate().unwrap(), 2);
        let active = ca.load().unwrap();
        assert_ne!(active.signing_root, first_root);
        assert_eq!(active.bundle.roots().len(), 2);

        assert_eq!(ca.rotate_finish().unwrap(), 1);
        let done = ca.load().unwrap();
        assert_eq!(done.bundle.fingerprints(), vec![done.signing_root.clone()]);
    }
}
