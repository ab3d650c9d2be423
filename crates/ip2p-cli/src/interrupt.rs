//! Ctrl-C (SIGINT) and SIGTERM: the first asks the run to stop at the next step (the pipeline's
//! step callback answers Cancel) and to write nothing; a second ends the process at once, which
//! is safe because every output is written atomically (a killed process leaves the old file or
//! the new one, never half of one).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Exit status of a run stopped by a signal (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// The error a stopped run returns; `main` maps it to [`EXIT_INTERRUPTED`].
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted: stopped before writing any output")
    }
}

impl std::error::Error for Interrupted {}

/// Whether a stop was asked for; cheap to clone and to poll every step.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// Catch SIGINT and SIGTERM from now on (a thread with a small tokio runtime waits for
    /// them). If the handlers cannot be installed, the signals keep their default action.
    pub fn install() -> Self {
        let flag = Self::default();
        let set = flag.0.clone();
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(_) => return flag,
        };
        // Registered here, before returning, so no signal slips through to the default action.
        let Some(mut signals) = rt.block_on(async { Signals::new() }) else {
            return flag;
        };
        std::thread::spawn(move || {
            rt.block_on(async move {
                signals.next().await;
                set.store(true, Ordering::SeqCst);
                eprintln!(
                    "\ninterrupted: stopping after the current step, writing nothing (again to quit now)"
                );
                signals.next().await;
                std::process::exit(EXIT_INTERRUPTED.into());
            })
        });
        flag
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Interrupted)` once a stop was asked for.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.requested() {
            Err(Interrupted.into())
        } else {
            Ok(())
        }
    }
}

/// SIGINT and SIGTERM as one stream.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn new() -> Option<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Some(Self {
            int: signal(SignalKind::interrupt()).ok()?,
            term: signal(SignalKind::terminate()).ok()?,
        })
    }

    #[cfg(not(unix))]
    fn new() -> Option<Self> {
        Some(Self {})
    }

    #[cfg(unix)]
    async fn next(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }

    #[cfg(not(unix))]
    async fn next(&mut self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}
