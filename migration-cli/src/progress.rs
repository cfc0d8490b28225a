//! A progress bar that shows itself only once an operation has taken over a second.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use migration_core::precopy::{Progress, ProgressFn};

/// How long an operation runs before its progress bar appears.
const SHOW_AFTER: Duration = Duration::from_secs(1);

/// A progress callback for a migration: a hidden bar that draws on stderr after a
/// second. Returns the callback and the bar (to finish it).
pub fn migration(label: &str) -> (ProgressFn, ProgressBar) {
    let bar = ProgressBar::hidden();
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(label.to_owned());
    let started = Instant::now();
    let shown = std::sync::atomic::AtomicBool::new(false);
    let b = bar.clone();
    let callback = move |p: &Progress| {
        if !shown.load(std::sync::atomic::Ordering::Relaxed) && started.elapsed() > SHOW_AFTER {
            shown.store(true, std::sync::atomic::Ordering::Relaxed);
            b.set_draw_target(ProgressDrawTarget::stderr());
        }
        b.set_length(p.round_total);
        b.set_position(p.round_done);
        b.set_message(format!("{:?} round {}", p.phase, p.round));
    };
    (Box::new(callback), bar)
}

/// A spinner for a step with no progress callback (snapshot, restore): drawn on
/// stderr only if the step is still running after a second; cleared when dropped.
#[derive(Debug)]
pub struct Spinner {
    bar: ProgressBar,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Spinner {
    /// Starts timing `what`.
    pub fn start(what: &str) -> Self {
        let bar = ProgressBar::hidden();
        bar.set_message(what.to_owned());
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, d) = (bar.clone(), done.clone());
        // Best effort: without the thread there is simply no spinner.
        let _ = std::thread::Builder::new()
            .name("vmsnap-spinner".into())
            .spawn(move || {
                std::thread::sleep(SHOW_AFTER);
                if !d.load(std::sync::atomic::Ordering::Relaxed) {
                    b.set_draw_target(ProgressDrawTarget::stderr());
                    b.enable_steady_tick(Duration::from_millis(100));
                }
            });
        Self { bar, done }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        self.bar.finish_and_clear();
    }
}
