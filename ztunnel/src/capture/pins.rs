//! Where capture state lives in bpffs, and how a pinned link is replaced
//! without a gap.
//!
//! ```text
//! <pin_dir>/v<MAP_ABI_VERSION>/maps/<MAP>                 maps shared by every tunnel generation
//! <pin_dir>/v<MAP_ABI_VERSION>/links/<program>            cgroup links (connect4, connect6, sockops)
//! <pin_dir>/v<MAP_ABI_VERSION>/links/delivery/<cgroup id>  the delivery program, per tunnel cgroup
//! <pin_dir>/v<MAP_ABI_VERSION>/links/netns/<ns>/<name>    one sk_lookup link per enrolled pod
//! ```
//!
//! A link stays attached as long as it is pinned, so a tunnel that exits (or
//! crashes) leaves capture in place and enrolled workloads fail closed until
//! the next one starts. The next one swaps its programs into the pinned links
//! (`link_swap`), so one program or the other runs, never both (and a tunnel
//! whose successor failed before taking over swaps its own back). Only where
//! no link is pinned for the same target (first start, a moved cgroup root, a
//! pod's new namespace) does it attach a link of its own and pin it over the
//! old one, new before old so that nothing goes uncaptured in between.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::links::FdLink;
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
use ztunnel_ebpf_common::MAP_ABI_VERSION;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("cannot mount bpffs at {path}: {source}")]
    Mount { path: PathBuf, source: nix::Error },
    #[error("{path} is not on a bpf filesystem; set capture.bpf_pin_dir to a directory under a bpffs mount")]
    NotBpffs { path: PathBuf },
    #[error("bpffs {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot pin link at {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |source| PinError::Io { path: path.to_owned(), source }
}

pub(crate) const BPFFS_MOUNT: &str = "/sys/fs/bpf";

pub(crate) fn on_bpffs(p: &Path) -> bool {
    statfs(p).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Makes sure `pin_dir` is on bpffs, mounting bpffs at /sys/fs/bpf when the
/// directory is under it and nothing is mounted there (as on hosts that do not
/// mount it at boot).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), PinError> {
    let probe = existing_ancestor(pin_dir);
    if on_bpffs(&probe) {
        return Ok(());
    }
    let mount_point = Path::new(BPFFS_MOUNT);
    if pin_dir.starts_with(mount_point) && !on_bpffs(mount_point) {
        fs::create_dir_all(mount_point).map_err(io_err(mount_point))?;
        nix::mount::mount(Some("bpf"), mount_point, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|source| PinError::Mount { path: mount_point.to_owned(), source })?;
        tracing::info!(path = BPFFS_MOUNT, "mounted bpffs");
        return Ok(());
    }
    if on_bpffs(&existing_ancestor(pin_dir)) {
        Ok(())
    } else {
        Err(PinError::NotBpffs { path: pin_dir.to_owned() })
    }
}

pub(crate) fn existing_ancestor(p: &Path) -> PathBuf {
    p.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/")).to_owned()
}

/// The pin layout of one tunnel installation.
#[derive(Debug, Clone)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(pin_dir: &Path) -> Self {
        Self { root: pin_dir.join(format!("v{MAP_ABI_VERSION}")) }
    }

    /// Creates the directories.
    pub fn create(&self) -> Result<(), PinError> {
        for dir in [self.root.join("maps"), self.root.join("links").join("netns")] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(())
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.root.join("links").join(program)
    }

    /// The delivery program's link for the tunnel cgroup `cgroup_id`: one
    /// per tunnel cgroup, so that a successor in another cgroup (a new pod)
    /// does not detach the running tunnel's while both serve.
    pub fn delivery_link(&self, cgroup_id: u64) -> PathBuf {
        self.root.join("links").join("delivery").join(cgroup_id.to_string())
    }

    /// Unpins every delivery link but `keep`'s (tunnels that are gone).
    pub fn remove_delivery_links_except(&self, keep: u64) -> Result<(), PinError> {
        // Builds before per-cgroup pins kept a single one.
        remove_if_exists(&self.link(ztunnel_ebpf_common::program_name::DELIVERY_SOCKOPS))?;
        let dir = self.root.join("links").join("delivery");
        let Ok(entries) = fs::read_dir(&dir) else { return Ok(()) };
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            if entry.file_name().to_string_lossy() != keep.to_string() {
                remove_if_exists(&entry.path())?;
            }
        }
        Ok(())
    }

    pub fn netns_dir(&self) -> PathBuf {
        self.root.join("links").join("netns")
    }

    pub fn netns_link(&self, namespace: &str, name: &str) -> PathBuf {
        self.netns_dir().join(pin_name(namespace)).join(pin_name(name))
    }

    /// Pins `link` at `path`, replacing whatever link was pinned there. The new
    /// link is attached before the old one is let go.
    pub fn replace_link(&self, path: &Path, link: FdLink) -> Result<(), PinError> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let staging = staging_path(path);
        remove_if_exists(&staging)?;
        // Dropping the returned PinnedLink only closes our fd: the pin keeps
        // the link attached.
        link.pin(&staging).map_err(|source| PinError::Pin { path: staging.clone(), source })?;
        remove_if_exists(path)?;
        fs::rename(&staging, path).map_err(io_err(path))
    }

    /// Unpins (and so detaches) the link at `path`, if any.
    pub fn remove_link(&self, path: &Path) -> Result<(), PinError> {
        remove_if_exists(path)?;
        if let Some(dir) = path.parent() {
            // Leave no empty per-namespace directories behind.
            let _ = fs::remove_dir(dir);
        }
        Ok(())
    }

    /// The (namespace, name) of every pinned per-pod link, including staging
    /// leftovers of a tunnel that died mid-replacement.
    pub fn netns_links(&self) -> Result<Vec<(String, String)>, PinError> {
        let mut out = Vec::new();
        let dir = self.netns_dir();
        let Ok(namespaces) = fs::read_dir(&dir) else {
            return Ok(out);
        };
        for ns in namespaces {
            let ns = ns.map_err(io_err(&dir))?;
            let ns_path = ns.path();
            for link in fs::read_dir(&ns_path).map_err(io_err(&ns_path))? {
                let link = link.map_err(io_err(&ns_path))?;
                out.push((
                    unpin_name(&ns.file_name().to_string_lossy()),
                    unpin_name(&link.file_name().to_string_lossy()),
                ));
            }
        }
        Ok(out)
    }

    /// Removes everything pinned under the installation: every link detaches
    /// and every map is freed once no program uses it.
    pub fn remove_all(pin_dir: &Path) -> Result<bool, PinError> {
        if !pin_dir.exists() {
            return Ok(false);
        }
        fs::remove_dir_all(pin_dir).map_err(io_err(pin_dir))?;
        Ok(true)
    }
}

/// bpffs refuses names with a dot ("reserved for future use"); namespaces and
/// workload names may have them, `~` they may not, so the mapping is 1:1.
fn pin_name(s: &str) -> String {
    s.replace('.', "~")
}

fn unpin_name(s: &str) -> String {
    s.replace('~', ".")
}

const STAGING_SUFFIX: &str = "~new";

fn staging_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(STAGING_SUFFIX);
    path.with_file_name(name)
}

fn remove_if_exists(path: &Path) -> Result<(), PinError> {
    // bpffs answers unlink() of some missing names with EPERM, not ENOENT.
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PinError::Io { path: path.to_owned(), source: e }),
    }
}

/// Whether a pinned per-pod link name (as `netns_links` returns it) is a
/// staging leftover.
pub fn is_staging(name: &str) -> bool {
    name.ends_with(&unpin_name(STAGING_SUFFIX))
}
