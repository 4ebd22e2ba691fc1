//! A watchdog for multi-threaded tests: a livelock or a deadlock fails the
//! run within a bounded time, with a message naming the test, instead of
//! stalling CI until its global timeout.
//!
//! ```
//! use hugepunch::testing::watchdog::Watchdog;
//!
//! // A `#[test]` function:
//! fn two_threads_race() {
//!     let _watchdog = Watchdog::arm("two_threads_race");
//!     // ... spawn, drive, join, assert ...
//! } // the guard is dropped here (or while a failing test unwinds): disarmed
//! # two_threads_race();
//! ```
//!
//! or [`Watchdog::start`] with a limit of its own, or, for a body that is an
//! expression, [`with_watchdog`].
//!
//! # Why it aborts the process
//!
//! A thread stuck in a livelock cannot be cancelled or joined, and when the
//! stuck thread is the test's own (a `join`, a `std::thread::scope` or a
//! wait that never returns), nothing can make that test panic. So when the
//! limit passes, the watchdog writes
//! `watchdog: <test> did not finish within 120s (livelock or deadlock?)`
//! straight to the process's stderr — not through `eprintln!`, which the
//! test harness captures and an abort would lose — and calls
//! [`std::process::abort`]. The test binary then ends with SIGABRT and
//! `cargo test` fails at once; the results of other tests of the same
//! binary still running at that moment are lost, which is the price of
//! failing fast.
//!
//! # The limit
//!
//! [`Watchdog::limit`] is 120 s: far above what any multi-threaded test of
//! the workspace takes on a loaded 2-core machine in a debug build (the
//! slowest takes a few seconds), far below CI's own timeout. Slow
//! instrumented runs (sanitizers, valgrind) raise it with the environment
//! variable `HUGEPUNCH_WATCHDOG_SECS` (whole seconds).
//!
//! Every test crate of the workspace uses this one (`hugepunch::testing`,
//! feature `test-util`).

use std::io::Write;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

/// The default limit (see the module documentation).
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(120);

/// The environment variable that overrides [`DEFAULT_LIMIT`], in seconds.
pub const LIMIT_ENV: &str = "HUGEPUNCH_WATCHDOG_SECS";

/// Aborts the process, naming the test, unless dropped within its limit.
/// Dropping it (at the end of the test, or while a failing test unwinds)
/// disarms it and joins its thread.
#[must_use = "the watchdog is disarmed as soon as it is dropped"]
pub struct Watchdog {
    /// Dropping the sender wakes the watchdog thread with `Disconnected`.
    disarm: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// [`DEFAULT_LIMIT`], or `HUGEPUNCH_WATCHDOG_SECS` when set to a number.
    pub fn limit() -> Duration {
        std::env::var(LIMIT_ENV)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(DEFAULT_LIMIT, Duration::from_secs)
    }

    /// Arm a watchdog for the test `test` with [`Watchdog::limit`].
    pub fn arm(test: &str) -> Watchdog {
        Watchdog::start(test, Watchdog::limit())
    }

    /// Arm a watchdog for the test `test`: if it is not dropped within
    /// `limit`, print the message and abort the process.
    pub fn start(test: &str, limit: Duration) -> Watchdog {
        let (disarm, armed) = mpsc::channel::<()>();
        let test = test.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("watchdog:{test}"))
            .spawn(move || match armed.recv_timeout(limit) {
                // Disarmed (the guard was dropped), or a spurious message.
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {}
                Err(RecvTimeoutError::Timeout) => {
                    let msg = format!(
                        "\nwatchdog: {test} did not finish within {limit:?} (livelock or deadlock?); \
                         aborting the test process ({LIMIT_ENV} raises the limit)\n"
                    );
                    // Straight to the file descriptor: the harness's
                    // output capture would lose an `eprintln!`.
                    let _ = std::io::stderr().lock().write_all(msg.as_bytes());
                    std::process::abort();
                }
            })
            .expect("spawn the watchdog thread");
        Watchdog {
            disarm: Some(disarm),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.disarm.take());
        if let Some(t) = self.thread.take() {
            // It wakes at once (the channel is disconnected); it cannot
            // have panicked.
            let _ = t.join();
        }
    }
}

/// Run `f` under a [`Watchdog`] named `test` with `limit`; return what it
/// returns (a panic in `f` passes through, disarming the watchdog).
pub fn with_watchdog<T>(test: &str, limit: Duration, f: impl FnOnce() -> T) -> T {
    let _watchdog = Watchdog::start(test, limit);
    f()
}
