//! The wall clock that certificates are issued, checked and renewed against.
//!
//! In the tunnel this is `SystemTime::now()`. In this crate's unit tests it
//! follows tokio's clock instead (from the real time at first use), so that a
//! test with paused time (`#[tokio::test(start_paused = true)]`) moves
//! certificate validity, renewal deadlines and the CA's issuing time together
//! and runs a minute of certificate life in no real time at all. Outside a
//! paused runtime it reads the real time, as before.

use std::time::SystemTime;

/// Now, by the wall clock.
pub fn now() -> SystemTime {
    #[cfg(not(test))]
    return SystemTime::now();
    #[cfg(test)]
    test_clock::now()
}

#[cfg(test)]
mod test_clock {
    use std::{sync::OnceLock, time::SystemTime};

    /// The real wall time, and tokio's clock, at first use.
    static START: OnceLock<(SystemTime, tokio::time::Instant)> = OnceLock::new();

    pub fn now() -> SystemTime {
        let (wall, at) = *START.get_or_init(|| (SystemTime::now(), tokio::time::Instant::now()));
        // tokio's clock is the real monotonic clock, except in a paused
        // runtime: there it starts at the real instant the runtime was made
        // and moves only when the test lets time pass.
        wall + tokio::time::Instant::now().saturating_duration_since(at)
    }
}
