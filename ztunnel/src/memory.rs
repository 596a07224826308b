//! Handing freed heap back to the kernel. glibc's allocator keeps what a
//! burst freed (a flood of connections, a relist of thousands of objects)
//! in its per-thread arenas: resident memory would stay at the burst's peak
//! for the life of the process. `malloc_trim` returns the free pages of
//! every arena; it is called after a configuration is applied and every
//! [`TRIM_EVERY`] from the controller's loop, never on a connection's path.

use std::time::{Duration, Instant};

/// How often the controller trims without a reason to.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Trims at most every [`TRIM_EVERY`], unless `now` is asked.
#[derive(Debug)]
pub struct Trimmer {
    last: Instant,
}

impl Default for Trimmer {
    fn default() -> Self {
        Self { last: Instant::now() }
    }
}

impl Trimmer {
    /// Trims when the last trim is older than [`TRIM_EVERY`].
    pub fn tick(&mut self) {
        if self.last.elapsed() >= TRIM_EVERY {
            self.now();
        }
    }

    /// Trims after a configuration change was applied (a relist frees a
    /// whole copy of the cluster), at most once a second: changes can come
    /// ten times a second.
    pub fn after_change(&mut self) {
        if self.last.elapsed() >= Duration::from_secs(1) {
            self.now();
        }
    }

    fn now(&mut self) {
        self.last = Instant::now();
        trim();
    }
}

/// Returns the allocator's free pages to the kernel (glibc only; a no-op
/// elsewhere).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is
    // thread-safe and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
