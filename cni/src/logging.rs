//! Logs go to the configured file, else stderr; never stdout, which carries
//! the plugin's result to the runtime.

use std::{fs::OpenOptions, path::Path, sync::Mutex};

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the process's subscriber. A log file that cannot be opened is
/// not a reason to fail a pod: the logs then go to stderr (which the runtime
/// keeps with the error), with a line saying why.
pub fn init(level: &str, file: Option<&Path>) {
    let filter =
        EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new(crate::config::DEFAULT_LOG_LEVEL));
    let builder = fmt().with_env_filter(filter).with_ansi(false).with_target(false);
    let opened = file.map(|path| (path, OpenOptions::new().create(true).append(true).open(path)));
    match opened {
        Some((_, Ok(log))) => {
            let _ = builder.with_writer(Mutex::new(log)).try_init();
        }
        Some((path, Err(e))) => {
            let _ = builder.with_writer(std::io::stderr).try_init();
            tracing::warn!("cannot open log file {}: {e}; logging to stderr", path.display());
        }
        None => {
            let _ = builder.with_writer(std::io::stderr).try_init();
        }
    }
}
