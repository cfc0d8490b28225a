//! Turns guest port writes into a pass/fail verdict, independent of how the vCPU is run.

use std::fmt;

use super::image::describe_error_code;

/// Port of progress events: a monotonic, guest-specific 32-bit value.
pub const PORT_PROGRESS: u16 = 0x10;
/// Port of the terminal error report: the guest writes the code forever.
pub const PORT_ERROR: u16 = 0x11;
/// Port of informational values (diagnostics, never a verdict).
pub const PORT_INFO: u16 = 0x12;

/// Most info values a [`PortMonitor`] keeps (the oldest are dropped first).
const MAX_INFOS: usize = 256;

/// One guest port write, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortEvent {
    /// A write to [`PORT_PROGRESS`].
    Progress(u32),
    /// A write to [`PORT_ERROR`].
    Error(u32),
    /// A write to [`PORT_INFO`].
    Info(u32),
    /// A write to any other port.
    Other {
        /// The port.
        port: u16,
        /// The value written (zero-extended).
        value: u32,
    },
}

impl PortEvent {
    /// Decodes a write of `value` to `port`.
    pub fn new(port: u16, value: u32) -> Self {
        match port {
            PORT_PROGRESS => PortEvent::Progress(value),
            PORT_ERROR => PortEvent::Error(value),
            PORT_INFO => PortEvent::Info(value),
            _ => PortEvent::Other { port, value },
        }
    }

    /// Decodes a `KVM_EXIT_IO` out exit: `data` is 1, 2 or 4 bytes, little-endian
    /// (longer data is truncated to 4 bytes).
    pub fn from_io_out(port: u16, data: &[u8]) -> Self {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        PortEvent::new(port, u32::from_le_bytes(b))
    }
}

/// Why a guest run failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The guest wrote this code to [`PORT_ERROR`]: its self-check failed.
    GuestError(u32),
    /// The guest wrote to a port that is not part of the ABI.
    UnexpectedPort {
        /// The port.
        port: u16,
        /// The value written.
        value: u32,
    },
    /// A progress value was lower than the previous one (or than the baseline).
    ProgressWentBack {
        /// The previous value (or the baseline).
        previous: u32,
        /// The value received.
        value: u32,
    },
    /// The vCPU stopped for a reason other than a port write (HLT, shutdown,
    /// internal error, MMIO, ...): the debug form of the exit.
    UnexpectedExit(String),
    /// The required progress events did not arrive before the timeout.
    Timeout {
        /// Progress events seen.
        seen: u64,
        /// Progress events required.
        required: u64,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::GuestError(code) => {
                write!(
                    f,
                    "guest error {code:#010x}: {}",
                    describe_error_code(*code)
                )
            }
            Failure::UnexpectedPort { port, value } => {
                write!(f, "write of {value:#x} to unexpected port {port:#x}")
            }
            Failure::ProgressWentBack { previous, value } => {
                write!(f, "progress went back from {previous} to {value}")
            }
            Failure::UnexpectedExit(e) => write!(f, "unexpected vCPU exit: {e}"),
            Failure::Timeout { seen, required } => {
                write!(f, "timeout after {seen} of {required} progress events")
            }
        }
    }
}

/// The state of a guest run as judged from its port writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not enough progress yet, no failure.
    Pending,
    /// The required progress events arrived with no failure.
    Pass,
    /// The run failed; final.
    Fail(Failure),
}

impl Verdict {
    /// True for [`Verdict::Pass`] and [`Verdict::Fail`].
    pub fn is_final(&self) -> bool {
        !matches!(self, Verdict::Pending)
    }
}

/// Decides [`Verdict`]s from port events: PASS = `required` progress events and
/// no error; FAIL = an error write, a write to another port, progress going
/// back, any other vCPU exit, or a timeout before PASS.
///
/// A progress value equal to the last one is tolerated and not counted (a
/// restored vCPU may re-execute the `out` whose exit was pending when it was
/// saved). A [`Verdict::Fail`] is final; after [`Verdict::Pass`] the monitor
/// still records events, and an error turns it into a failure.
///
/// ```
/// use migration_testkit::guest::{Failure, PortMonitor, Verdict, PORT_ERROR, PORT_PROGRESS};
///
/// let mut m = PortMonitor::new(2);
/// assert_eq!(m.on_port_write(PORT_PROGRESS, 7), Verdict::Pending);
/// assert_eq!(m.on_port_write(PORT_PROGRESS, 8), Verdict::Pass);
/// assert_eq!(
///     m.on_port_write(PORT_ERROR, 0xB000_0001),
///     Verdict::Fail(Failure::GuestError(0xB000_0001))
/// );
/// ```
#[derive(Debug, Clone)]
pub struct PortMonitor {
    required: u64,
    seen: u64,
    repeats: u64,
    baseline: Option<u32>,
    first_progress: Option<u32>,
    last_progress: Option<u32>,
    infos: Vec<u32>,
    verdict: Verdict,
}

impl PortMonitor {
    /// A monitor that passes after `required` progress events.
    pub fn new(required: u64) -> Self {
        PortMonitor {
            required,
            seen: 0,
            repeats: 0,
            baseline: None,
            first_progress: None,
            last_progress: None,
            infos: Vec::new(),
            verdict: if required == 0 {
                Verdict::Pass
            } else {
                Verdict::Pending
            },
        }
    }

    /// A monitor whose progress values must not go below `baseline`: use the last
    /// progress value seen before a snapshot to check that a restored or migrated
    /// guest continues from where it was.
    pub fn with_baseline(required: u64, baseline: u32) -> Self {
        PortMonitor {
            baseline: Some(baseline),
            ..PortMonitor::new(required)
        }
    }

    /// Feeds one decoded port event and returns the verdict after it.
    pub fn on_event(&mut self, event: PortEvent) -> Verdict {
        match event {
            PortEvent::Info(v) => {
                if self.infos.len() == MAX_INFOS {
                    self.infos.remove(0);
                }
                self.infos.push(v);
            }
            _ if matches!(self.verdict, Verdict::Fail(_)) => {}
            PortEvent::Progress(value) => {
                let previous = self.last_progress.or(self.baseline);
                match previous {
                    Some(p) if value < p => {
                        self.fail(Failure::ProgressWentBack { previous: p, value });
                    }
                    Some(p) if value == p && self.last_progress.is_some() => self.repeats += 1,
                    _ => {
                        self.first_progress.get_or_insert(value);
                        self.last_progress = Some(value);
                        self.seen += 1;
                        if self.seen >= self.required && self.verdict == Verdict::Pending {
                            self.verdict = Verdict::Pass;
                        }
                    }
                }
            }
            PortEvent::Error(code) => self.fail(Failure::GuestError(code)),
            PortEvent::Other { port, value } => self.fail(Failure::UnexpectedPort { port, value }),
        }
        self.verdict.clone()
    }

    /// Feeds a write of `value` to `port`.
    pub fn on_port_write(&mut self, port: u16, value: u32) -> Verdict {
        self.on_event(PortEvent::new(port, value))
    }

    /// Feeds a `KVM_EXIT_IO` out exit (`data` as in `VcpuExit::IoOut`).
    pub fn on_io_out(&mut self, port: u16, data: &[u8]) -> Verdict {
        self.on_event(PortEvent::from_io_out(port, data))
    }

    /// Records a vCPU exit that is not a port write (`what` describes it): a failure.
    pub fn on_unexpected_exit(&mut self, what: impl Into<String>) -> Verdict {
        self.fail(Failure::UnexpectedExit(what.into()));
        self.verdict.clone()
    }

    /// Records that the time allowed is up: a failure unless already passed.
    pub fn on_timeout(&mut self) -> Verdict {
        if self.verdict == Verdict::Pending {
            self.fail(Failure::Timeout {
                seen: self.seen,
                required: self.required,
            });
        }
        self.verdict.clone()
    }

    fn fail(&mut self, failure: Failure) {
        if !matches!(self.verdict, Verdict::Fail(_)) {
            self.verdict = Verdict::Fail(failure);
        }
    }

    /// The current verdict.
    pub fn verdict(&self) -> &Verdict {
        &self.verdict
    }

    /// Progress events required for [`Verdict::Pass`].
    pub fn required(&self) -> u64 {
        self.required
    }

    /// Progress events counted so far (repeats of the last value not included).
    pub fn progress_events(&self) -> u64 {
        self.seen
    }

    /// Progress writes that repeated the last value.
    pub fn repeated_progress(&self) -> u64 {
        self.repeats
    }

    /// The first progress value counted, if any.
    pub fn first_progress(&self) -> Option<u32> {
        self.first_progress
    }

    /// The last progress value, if any.
    pub fn last_progress(&self) -> Option<u32> {
        self.last_progress
    }

    /// The baseline given to [`with_baseline`](Self::with_baseline), if any.
    pub fn baseline(&self) -> Option<u32> {
        self.baseline
    }

    /// Values written to [`PORT_INFO`], oldest first (the last 256 at most).
    pub fn infos(&self) -> &[u32] {
        &self.infos
    }

    /// The guest's error code, if it reported one.
    pub fn error_code(&self) -> Option<u32> {
        match self.verdict {
            Verdict::Fail(Failure::GuestError(code)) => Some(code),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_after_n_progress_events() {
        let mut m = PortMonitor::new(3);
        m.on_port_write(PORT_INFO, 42);
        assert_eq!(m.on_port_write(PORT_PROGRESS, 1), Verdict::Pending);
        assert_eq!(m.on_port_write(PORT_PROGRESS, 1), Verdict::Pending);
        assert_eq!(m.on_port_write(PORT_PROGRESS, 2), Verdict::Pending);
        assert_eq!(m.on_io_out(PORT_PROGRESS, &[3, 0, 0, 0]), Verdict::Pass);
        assert_eq!(m.progress_events(), 3);
        assert_eq!(m.repeated_progress(), 1);
        assert_eq!(m.first_progress(), Some(1));
        assert_eq!(m.last_progress(), Some(3));
        assert_eq!(m.infos(), &[42]);
        assert_eq!(m.on_timeout(), Verdict::Pass);
    }

    #[test]
    fn failures_are_sticky() {
        let mut m = PortMonitor::new(1);
        assert_eq!(
            m.on_port_write(PORT_ERROR, 5),
            Verdict::Fail(Failure::GuestError(5))
        );
        assert_eq!(
            m.on_port_write(PORT_PROGRESS, 9),
            Verdict::Fail(Failure::GuestError(5))
        );
        assert_eq!(
            m.on_port_write(0x3f8, 1),
            Verdict::Fail(Failure::GuestError(5))
        );
        assert_eq!(m.error_code(), Some(5));
    }

    #[test]
    fn baseline_and_going_back() {
        let mut m = PortMonitor::with_baseline(2, 100);
        assert_eq!(m.on_port_write(PORT_PROGRESS, 100), Verdict::Pending);
        assert_eq!(m.progress_events(), 1);
        assert_eq!(
            m.on_port_write(PORT_PROGRESS, 99),
            Verdict::Fail(Failure::ProgressWentBack {
                previous: 100,
                value: 99
            })
        );
        let mut m = PortMonitor::with_baseline(2, 100);
        assert!(matches!(
            m.on_port_write(PORT_PROGRESS, 50),
            Verdict::Fail(Failure::ProgressWentBack { .. })
        ));
    }

    #[test]
    fn other_exits_and_timeouts_fail() {
        let mut m = PortMonitor::new(2);
        m.on_port_write(PORT_PROGRESS, 1);
        assert_eq!(
            m.on_timeout(),
            Verdict::Fail(Failure::Timeout {
                seen: 1,
                required: 2
            })
        );
        let mut m = PortMonitor::new(2);
        assert!(matches!(
            m.on_unexpected_exit("Hlt"),
            Verdict::Fail(Failure::UnexpectedExit(_))
        ));
        let mut m = PortMonitor::new(2);
        assert_eq!(
            m.on_io_out(0x80, &[7]),
            Verdict::Fail(Failure::UnexpectedPort {
                port: 0x80,
                value: 7
            })
        );
        assert!(PortMonitor::new(0).verdict().is_final());
    }
}
