//! `ztunnel-cni install|uninstall`: putting the plugin into the node's CNI
//! configuration, and taking exactly that out again.
//!
//! Install, in the order that never lets the runtime call a plugin that is
//! not all there: the binary into the CNI bin directory, the plugin's
//! kubeconfig into the configuration directory ([`kubeconfig`]), and last
//! our entry as the final plugin of the primary network configuration.
//!
//! The primary configuration is the one the container runtime uses: the
//! lexicographically first `*.conf`, `*.conflist` or `*.json` in the
//! directory that it can load (containerd, CRI-O and the kubelet's old
//! dockershim all sort the names and take the first valid one, skipping
//! files they cannot parse). Our entry goes into its `plugins` list as text
//! ([`conflist`]), so every other byte stays as it was, and uninstall gives
//! the original bytes back.
//!
//! Everything is idempotent: installing twice changes nothing the second
//! time (so running install again, e.g. when the service account token
//! rotates, rewrites only what changed), and uninstall takes out only what
//! install put in.
//!
//! A chain that already holds another mesh's plugin (`istio-cni`, ...) is
//! reported: a warning by default, because a node migrating between meshes
//! has both for a while and the namespace labels decide which mesh takes a
//! pod; an error with `strict`, for clusters that want a guarantee. With
//! `strict` the refusal comes before anything is written.

pub mod conflist;
pub mod files;
pub mod kubeconfig;

use std::{
    fmt, fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use tracing::debug;

use self::{
    conflist::{ConfError, PLUGIN_TYPE},
    kubeconfig::{ApiServer, KubeconfigError},
};

/// The kubeconfig's file name in the configuration directory unless told
/// otherwise. No `.conf`/`.conflist`/`.json` ending, so no runtime reads it
/// as a network.
pub const DEFAULT_KUBECONFIG_NAME: &str = "ztunnel-cni.kubeconfig";

const KUBECONFIG_MODE: u32 = 0o600;
const BINARY_MODE: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot read the CNI configuration directory {dir}: {source}")]
    ReadDir { dir: PathBuf, source: io::Error },
    #[error(
        "no network configuration in {dir} that the runtime would use (has the primary CNI plugin written one yet?){skipped}"
    )]
    NoPrimary { dir: PathBuf, skipped: String },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("{path} {source}")]
    Conf { path: PathBuf, source: ConfError },
    #[error(
        "{path} is a symbolic link; ztunnel-cni edits only regular files (replacing it would cut the link)"
    )]
    Symlink { path: PathBuf },
    #[error(
        "{path} already chains {plugins:?}, another mesh's plugin; with --strict ztunnel-cni does not add itself"
    )]
    ForeignMesh { path: PathBuf, plugins: Vec<String> },
    #[error(
        "turning {from} into {to} would hand the runtime's choice to {winner}, which sorts before it; rename or remove it"
    )]
    LosesPrecedence { from: PathBuf, to: PathBuf, winner: PathBuf },
    #[error("cannot turn {from} into a list: {to} exists already")]
    TargetExists { from: PathBuf, to: PathBuf },
    #[error("cannot install the plugin binary {from} as {to}: {source}")]
    Binary { from: PathBuf, to: PathBuf, source: io::Error },
    #[error(transparent)]
    Kubeconfig(#[from] KubeconfigError),
    #[error("the kubeconfig must be a file directly in the configuration directory {dir}, not {path}")]
    KubeconfigOutside { dir: PathBuf, path: PathBuf },
}

/// Where things live on the node, as this process sees them.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The CNI configuration directory (e.g. the host's /etc/cni/net.d
    /// mounted at /host/etc/cni/net.d).
    pub conf_dir: PathBuf,
    /// The CNI binary directory (the host's /opt/cni/bin).
    pub bin_dir: PathBuf,
    /// The kubeconfig's file name in `conf_dir`.
    pub kubeconfig_name: String,
}

impl Layout {
    /// Takes the kubeconfig as the operator gave it: a file name, or a path
    /// directly inside `conf_dir`.
    pub fn new(conf_dir: PathBuf, bin_dir: PathBuf, kubeconfig: &Path) -> Result<Self, InstallError> {
        let outside =
            || InstallError::KubeconfigOutside { dir: conf_dir.clone(), path: kubeconfig.to_owned() };
        let name = match kubeconfig.parent() {
            Some(parent) if parent.as_os_str().is_empty() || parent == conf_dir => kubeconfig.file_name(),
            _ => None,
        };
        let name = name.and_then(|n| n.to_str()).filter(|n| *n != "..").ok_or_else(outside)?.to_owned();
        Ok(Self { conf_dir, bin_dir, kubeconfig_name: name })
    }

    fn kubeconfig_path(&self) -> PathBuf {
        self.conf_dir.join(&self.kubeconfig_name)
    }

    fn binary_path(&self) -> PathBuf {
        self.bin_dir.join(PLUGIN_TYPE)
    }
}

/// What install writes into the plugin's entry, and where it gets what it
/// writes.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub layout: Layout,
    /// The configuration directory as the host, and so the plugin, sees it:
    /// the plugin's entry names the kubeconfig by this path.
    pub host_conf_dir: PathBuf,
    pub socket: PathBuf,
    pub timeout: Option<String>,
    pub log_level: Option<String>,
    pub log_file: Option<PathBuf>,
    pub api_server: Option<ApiServer>,
    pub service_account_dir: PathBuf,
    /// The binary to install (this very program, normally).
    pub binary: PathBuf,
    pub strict: bool,
}

impl InstallOptions {
    /// Our entry, exactly as it goes into the list. Fixed key order, so the
    /// same options give the same text and a second install sees no change.
    pub fn entry(&self) -> String {
        let json = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let path = |p: &Path| json(&p.to_string_lossy());
        let mut fields = vec![
            ("type", json(PLUGIN_TYPE)),
            ("socket", path(&self.socket)),
            ("kubeconfig", path(&self.host_conf_dir.join(&self.layout.kubeconfig_name))),
        ];
        if let Some(t) = &self.timeout {
            fields.push(("timeout", json(t)));
        }
        if let Some(l) = &self.log_level {
            fields.push(("log_level", json(l)));
        }
        if let Some(f) = &self.log_file {
            fields.push(("log_file", path(f)));
        }
        let fields: Vec<String> = fields.into_iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
        format!("{{{}}}", fields.join(", "))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    /// The configuration that now chains our plugin.
    pub conf_file: PathBuf,
    /// The single-plugin file it was made from, when install converted one.
    pub converted_from: Option<PathBuf>,
    pub binary_changed: bool,
    pub kubeconfig_changed: bool,
    pub conf_changed: bool,
    pub foreign_mesh_plugins: Vec<String>,
}

impl InstallReport {
    pub fn changed_anything(&self) -> bool {
        self.binary_changed || self.kubeconfig_changed || self.conf_changed
    }
}

impl fmt::Display for InstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = |changed| if changed { "written" } else { "unchanged" };
        write!(f, "chained into {} ({})", self.conf_file.display(), state(self.conf_changed))?;
        if let Some(from) = &self.converted_from {
            write!(f, ", converted from {}", from.display())?;
        }
        write!(f, "; binary {}; kubeconfig {}", state(self.binary_changed), state(self.kubeconfig_changed))?;
        if !self.foreign_mesh_plugins.is_empty() {
            write!(
                f,
                "; WARNING: the chain also holds {:?}; two meshes must not take the same pod, keep each namespace in one",
                self.foreign_mesh_plugins
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UninstallReport {
    /// Configurations our entry was taken out of.
    pub edited: Vec<PathBuf>,
    /// Converted lists turned back into the files they came from: (list, original).
    pub restored: Vec<(PathBuf, PathBuf)>,
    pub removed_kubeconfig: bool,
    pub removed_binary: bool,
}

impl fmt::Display for UninstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |paths: Vec<String>| if paths.is_empty() { "none".to_owned() } else { paths.join(", ") };
        write!(
            f,
            "entry removed from: {}",
            list(self.edited.iter().map(|p| p.display().to_string()).collect())
        )?;
        for (list, original) in &self.restored {
            write!(f, "; {} restored as {}", list.display(), original.display())?;
        }
        write!(f, "; kubeconfig {}", if self.removed_kubeconfig { "removed" } else { "absent" })?;
        write!(f, "; binary {}", if self.removed_binary { "removed" } else { "absent" })
    }
}

/// A file the runtime would consider, with what loading it gave.
struct Candidate {
    path: PathBuf,
    text: Result<String, io::Error>,
    is_symlink: bool,
}

impl Candidate {
    fn name(&self) -> &[u8] {
        self.path.file_name().map_or(&[], |n| n.as_bytes())
    }

    fn is_list(&self) -> bool {
        self.name().ends_with(b".conflist")
    }

    /// Whether the runtime would load it, and if not, why.
    fn validity(&self) -> Result<(), String> {
        let text = self.text.as_ref().map_err(|e| e.to_string())?;
        let parsed = if self.is_list() {
            conflist::parse_list(text).map(|_| ())
        } else {
            conflist::parse_single(text).map(|_| ())
        };
        parsed.map_err(|e| e.to_string())
    }
}

/// The extension as Go's `filepath.Ext` (which the runtimes use) sees it:
/// from the last dot, so a file named `.conf` counts too.
fn runtime_extension(name: &[u8]) -> &[u8] {
    name.iter().rposition(|&b| b == b'.').map_or(&[], |dot| &name[dot..])
}

/// The runtime's candidates in `dir`, in its order, without `skip`.
fn candidates(dir: &Path, skip: &str) -> Result<Vec<Candidate>, InstallError> {
    let read_dir = |source| InstallError::ReadDir { dir: dir.to_owned(), source };
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir)? {
        let entry = entry.map_err(read_dir)?;
        let file_type = entry.file_type().map_err(read_dir)?;
        let name = entry.file_name();
        if file_type.is_dir()
            || name.as_bytes() == skip.as_bytes()
            || !matches!(runtime_extension(name.as_bytes()), b".conf" | b".conflist" | b".json")
        {
            continue;
        }
        let path = entry.path();
        found.push(Candidate { text: fs::read_to_string(&path), path, is_symlink: file_type.is_symlink() });
    }
    found.sort_by(|a, b| a.name().cmp(b.name()));
    Ok(found)
}

/// The configuration the runtime uses: the first candidate it can load.
fn primary(candidates: &[Candidate], dir: &Path) -> Result<usize, InstallError> {
    let mut skipped = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        match c.validity() {
            Ok(()) => {
                for (path, why) in &skipped {
                    debug!("skipped {path}, as the runtime does: {why}");
                }
                return Ok(i);
            }
            Err(why) => skipped.push((c.path.display().to_string(), why)),
        }
    }
    let skipped = skipped.iter().map(|(p, why)| format!("; skipped {p}: {why}")).collect();
    Err(InstallError::NoPrimary { dir: dir.to_owned(), skipped })
}

enum ConfPlan {
    Unchanged { path: PathBuf },
    Rewrite { path: PathBuf, text: String, mode: u32 },
    Convert { from: PathBuf, to: PathBuf, text: String, mode: u32 },
}

struct Planned {
    plan: ConfPlan,
    foreign: Vec<String>,
}

fn mode_of(path: &Path) -> Result<u32, InstallError> {
    files::current_mode(path)
        .map_err(|source| InstallError::Read { path: path.to_owned(), source })?
        .ok_or_else(|| InstallError::Read { path: path.to_owned(), source: io::ErrorKind::NotFound.into() })
}

/// What the configuration change will be, decided before anything is written.
fn plan_conf(opts: &InstallOptions) -> Result<Planned, InstallError> {
    let dir = &opts.layout.conf_dir;
    let found = candidates(dir, &opts.layout.kubeconfig_name)?;
    let chosen = &found[primary(&found, dir)?];
    let path = chosen.path.clone();
    if chosen.is_symlink {
        return Err(InstallError::Symlink { path });
    }
    let text = chosen.text.as_deref().map_err(|e| InstallError::Read {
        path: path.clone(),
        source: io::Error::new(e.kind(), e.to_string()),
    })?;
    let conf_error = |source| InstallError::Conf { path: path.clone(), source };
    let entry = opts.entry();
    let mode = mode_of(&path)?;

    if chosen.is_list() {
        let list = conflist::parse_list(text).map_err(conf_error)?;
        let foreign = list.foreign_mesh_plugins();
        // A list we made from a .conf is made again from its original, so
        // that the original comes back byte for byte however often the
        // entry changes.
        let new_text = match conflist::original_of_converted(text) {
            Some((from, original)) => {
                let single = conflist::parse_single(&original).map_err(conf_error)?;
                let remade = conflist::converted(&original, &single, &from, &entry);
                (remade != text).then_some(remade)
            }
            None => conflist::with_entry_last(text, &entry).map_err(conf_error)?,
        };
        let plan = match new_text {
            None => ConfPlan::Unchanged { path },
            Some(text) => ConfPlan::Rewrite { path, text, mode },
        };
        return Ok(Planned { plan, foreign });
    }

    // A single-plugin .conf/.json becomes a .conflist: the runtime reads a
    // .conf as a list of that one plugin anyway (libcni's ConfListFromConf),
    // and only a list can chain. The list takes the .conf's place in the
    // runtime's choice only if it sorts first among the files the runtime
    // can load once the .conf is gone: `10-x.conflist` sorts after
    // `10-x.conf`, so a loadable `10-x.conf.json` or `10-x.conf2.conf` in
    // between would take over. That is checked, not assumed. The .conf is
    // removed only after the list is in place, so the runtime sees one or
    // the other, never neither.
    let single = conflist::parse_single(text).map_err(conf_error)?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = file_name.rsplit_once('.').map_or(file_name.as_str(), |(stem, _)| stem);
    let to = dir.join(format!("{stem}.conflist"));
    // The list may be there already: ours, made from an earlier version of
    // this file, when the primary plugin has since written its .conf again
    // (as some do on every start). Made again from the new .conf, it takes
    // the .conf's place once more. Anything else there is not ours to replace.
    if to.symlink_metadata().is_ok() && !is_converted_from(&to, &file_name) {
        return Err(InstallError::TargetExists { from: path, to });
    }
    let to_name = to.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default();
    if let Some(winner) =
        found.iter().find(|c| c.path != path && c.name() < to_name.as_slice() && c.validity().is_ok())
    {
        return Err(InstallError::LosesPrecedence { from: path, to, winner: winner.path.clone() });
    }
    let foreign = if conflist::FOREIGN_MESH_PLUGINS.contains(&single.plugin_type.as_str()) {
        vec![single.plugin_type.clone()]
    } else {
        Vec::new()
    };
    let text = conflist::converted(text, &single, &file_name, &entry);
    Ok(Planned { plan: ConfPlan::Convert { from: path, to, text, mode }, foreign })
}

/// Installs the binary, the kubeconfig and our entry; see the module doc.
pub fn install(opts: &InstallOptions) -> Result<InstallReport, InstallError> {
    let planned = plan_conf(opts)?;
    let conf_file = match &planned.plan {
        ConfPlan::Unchanged { path } | ConfPlan::Rewrite { path, .. } => path.clone(),
        ConfPlan::Convert { to, .. } => to.clone(),
    };
    // Without strict, the report carries the warning.
    if opts.strict && !planned.foreign.is_empty() {
        return Err(InstallError::ForeignMesh { path: conf_file, plugins: planned.foreign });
    }

    // Everything that can fail without writing comes before the first write.
    let api_server = opts.api_server.as_ref().ok_or(KubeconfigError::NoApiServer)?;
    let kubeconfig_text = kubeconfig::render(api_server, &opts.service_account_dir)?;

    let binary = opts.layout.binary_path();
    let binary_changed = files::copy_atomic(&opts.binary, &binary, BINARY_MODE)
        .map_err(|source| InstallError::Binary { from: opts.binary.clone(), to: binary.clone(), source })?;

    let kubeconfig_path = opts.layout.kubeconfig_path();
    let kubeconfig_changed =
        files::write_atomic(&kubeconfig_path, kubeconfig_text.as_bytes(), KUBECONFIG_MODE)
            .map_err(|source| InstallError::Write { path: kubeconfig_path.clone(), source })?;

    let write = |path: &Path, text: &str, mode| {
        files::write_atomic(path, text.as_bytes(), mode)
            .map_err(|source| InstallError::Write { path: path.to_owned(), source })
    };
    let (conf_changed, converted_from) = match planned.plan {
        ConfPlan::Unchanged { .. } => (false, None),
        ConfPlan::Rewrite { path, text, mode } => (write(&path, &text, mode)?, None),
        ConfPlan::Convert { from, to, text, mode } => {
            write(&to, &text, mode)?;
            fs::remove_file(&from).map_err(|source| InstallError::Remove { path: from.clone(), source })?;
            (true, Some(from))
        }
    };
    Ok(InstallReport {
        conf_file,
        converted_from,
        binary_changed,
        kubeconfig_changed,
        conf_changed,
        foreign_mesh_plugins: planned.foreign,
    })
}

/// Takes out what install put in: our entry from every configuration that
/// has one (the primary may have changed since), a converted list back into
/// the file it came from, the kubeconfig and the binary.
pub fn uninstall(layout: &Layout) -> Result<UninstallReport, InstallError> {
    let mut report = UninstallReport::default();
    for candidate in candidates(&layout.conf_dir, &layout.kubeconfig_name)? {
        let Ok(text) = &candidate.text else { continue };
        let path = &candidate.path;
        if !candidate.is_list() || conflist::parse_list(text).map_or(true, |l| l.ours().is_none()) {
            continue;
        }
        let mode = mode_of(path)?;
        let write = |to: &Path, text: &str| {
            files::write_atomic(to, text.as_bytes(), mode)
                .map_err(|source| InstallError::Write { path: to.to_owned(), source })
        };
        let restorable = conflist::original_of_converted(text)
            .filter(|(from, _)| is_plain_conf_name(from))
            .map(|(from, original)| (layout.conf_dir.join(from), original))
            .filter(|(from, _)| from.symlink_metadata().is_err());
        match restorable {
            Some((original_path, original)) => {
                // The original first: it sorts before the list and takes
                // over at once; then the list goes.
                write(&original_path, &original)?;
                fs::remove_file(path)
                    .map_err(|source| InstallError::Remove { path: path.clone(), source })?;
                report.restored.push((path.clone(), original_path));
            }
            None => {
                let conf_error = |source| InstallError::Conf { path: path.clone(), source };
                if let Some(without) = conflist::without_entries(text).map_err(conf_error)? {
                    write(path, &without)?;
                    report.edited.push(path.clone());
                }
            }
        }
    }
    let remove = |path: PathBuf| {
        files::remove_if_present(&path).map_err(|source| InstallError::Remove { path: path.clone(), source })
    };
    report.removed_kubeconfig = remove(layout.kubeconfig_path())?;
    report.removed_binary = remove(layout.binary_path())?;
    Ok(report)
}

/// Whether `list` is a regular file we made from the file named `from`.
fn is_converted_from(list: &Path, from: &str) -> bool {
    let regular = list.symlink_metadata().is_ok_and(|m| m.file_type().is_file());
    regular
        && fs::read_to_string(list).is_ok_and(|text| {
            conflist::parse_list(&text).is_ok_and(|l| l.converted_from.as_deref() == Some(from))
        })
}

/// A name a converted list may give for its original: a file directly in
/// the directory with a single-plugin extension, nothing that climbs out.
fn is_plain_conf_name(name: &str) -> bool {
    !name.contains('/') && name != ".." && matches!(runtime_extension(name.as_bytes()), b".conf" | b".json")
}

#[cfg(test)]
mod tests;
