//! [`GuestLog`]: what a KVM guest wrote to its ports (docs/guest-abi.md), collected by
//! the vCPU exit handler and judged with migration-testkit's `PortMonitor`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use migration_kvm::{ExitAction, ExitEvent, ExitHandler};
use migration_testkit::guest::{describe_error_code, Failure, PortEvent, PortMonitor, Verdict};

use crate::demo::Check;

/// One thing the guest did.
#[derive(Debug, Clone)]
enum Event {
    Port(PortEvent),
    Exit(String),
}

/// Port writes and unexpected exits of one VM's guest, in order.
#[derive(Debug, Default)]
pub struct GuestLog {
    events: Mutex<Vec<Event>>,
    wake: Condvar,
    /// Last progress value written (`u64::MAX`: none yet).
    last_progress: AtomicU64,
}

impl GuestLog {
    /// An empty log.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            last_progress: AtomicU64::new(u64::MAX),
            ..Self::default()
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, e: Event) {
        if let Event::Port(PortEvent::Progress(v)) = e {
            self.last_progress.store(v.into(), Ordering::Relaxed);
        }
        self.lock().push(e);
        self.wake.notify_all();
    }

    /// The last progress value the guest wrote, if any.
    pub fn last_progress(&self) -> Option<u64> {
        match self.last_progress.load(Ordering::Relaxed) {
            u64::MAX => None,
            v => Some(v),
        }
    }

    /// A vCPU exit handler that records into this log: port writes as events, port
    /// reads answered with zeros, any other exit recorded (and the vCPU parked).
    pub fn handler(self: &Arc<Self>) -> ExitHandler {
        let log = self.clone();
        Box::new(move |event| match event {
            ExitEvent::IoOut { port, data } => {
                log.push(Event::Port(PortEvent::from_io_out(port, data)));
                ExitAction::Continue
            }
            ExitEvent::IoIn { data, .. } => {
                data.fill(0);
                ExitAction::Continue
            }
            ExitEvent::Other(what) => {
                log.push(Event::Exit(what));
                ExitAction::Pause
            }
        })
    }

    /// Waits (up to `timeout`) for `required` new progress events at or above `mark`
    /// with no error, consuming the events seen. On a pass, `mark` becomes the last
    /// progress value.
    pub fn check(&self, mark: &mut u64, required: u64, timeout: Duration) -> Check {
        let baseline = u32::try_from(*mark).unwrap_or(u32::MAX);
        let mut monitor = PortMonitor::with_baseline(required, baseline);
        let deadline = Instant::now() + timeout;
        let mut events = self.lock();
        let verdict = loop {
            for e in events.drain(..) {
                match e {
                    Event::Port(p) => monitor.on_event(p),
                    Event::Exit(what) => monitor.on_unexpected_exit(what),
                };
            }
            if monitor.verdict().is_final() {
                break monitor.verdict().clone();
            }
            let now = Instant::now();
            if now >= deadline {
                break monitor.on_timeout();
            }
            events = self
                .wake
                .wait_timeout(events, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        match verdict {
            Verdict::Pass => {
                let last = monitor.last_progress().map_or(*mark, u64::from);
                let before = std::mem::replace(mark, last);
                Check {
                    ok: true,
                    detail: format!(
                        "progress {before} -> {last}, {} events, self-checks hold",
                        monitor.progress_events()
                    ),
                }
            }
            Verdict::Fail(Failure::GuestError(code)) => Check {
                ok: false,
                detail: format!(
                    "guest error {code:#010x}: {} (info {:x?})",
                    describe_error_code(code),
                    monitor.infos()
                ),
            },
            Verdict::Fail(f) => Check {
                ok: false,
                detail: f.to_string(),
            },
            Verdict::Pending => Check {
                ok: false,
                detail: "no verdict".into(),
            },
        }
    }
}
