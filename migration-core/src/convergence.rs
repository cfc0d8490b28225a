//! Convergence of precopy: the auto-converge throttle's parameters, the guard that
//! lifts the throttle on every exit, and why a migration gave up.
//!
//! Precopy converges when the guest dirties memory slower than the link carries it:
//! each round is then smaller than the one before, until the rest fits the downtime
//! limit. The driver measures both rates each round (the **dirty rate**: bytes the
//! dirty log reported over the time since the previous read; the **bandwidth**: wire
//! bytes over the time the rounds took) and, with [`AutoConverge`], slows a guest
//! that dirties too fast down through [`Migratable::set_throttle`]: the vCPUs sleep
//! for that share of every time slice. The throttle starts at
//! [`AutoConverge::initial`] after the first round of dirty pages that does not
//! converge, rises by [`AutoConverge::increment`] after each further one, and stops at
//! [`AutoConverge::max`] (QEMU's defaults: 20, 10, 99 %).
//!
//! The throttle is lifted whatever happens: [`Throttled`] sets it back to 0 when the
//! VM is paused for the final round, before a failed migration resumes the source, and
//! when it is dropped (an early return, a panic).

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use crate::error::MigratableError;
use crate::migratable::Migratable;

/// Auto-converge: throttle the source's vCPUs while precopy does not converge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoConverge {
    /// The first throttle, in percent of each time slice the vCPUs sleep.
    pub initial: u8,
    /// Added after each further round that does not converge.
    pub increment: u8,
    /// The highest throttle (at most 99: a vCPU always runs a little).
    pub max: u8,
}

impl Default for AutoConverge {
    /// QEMU's defaults: 20 %, +10 %, at most 99 %.
    fn default() -> Self {
        Self {
            initial: 20,
            increment: 10,
            max: 99,
        }
    }
}

impl AutoConverge {
    /// The throttle after one more round that did not converge, from `current`
    /// (0: not throttled yet). Never above [`max`](Self::max), never above 99.
    pub fn next(&self, current: u8) -> u8 {
        let max = self.max.min(99);
        if current == 0 {
            self.initial.clamp(1, 99).min(max)
        } else {
            current.saturating_add(self.increment).min(max)
        }
    }

    /// Whether [`next`](Self::next) can go higher than `current`.
    pub fn can_rise(&self, current: u8) -> bool {
        self.next(current) > current
    }
}

/// Why precopy gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUp {
    /// The guest dirtied memory faster than the link carried it, round after round,
    /// and the throttle could not rise (auto-converge off, the VM cannot be
    /// throttled, or the throttle at its maximum).
    DirtyFasterThanLink,
    /// [`MigrationOptions::max_rounds`](crate::precopy::MigrationOptions::max_rounds)
    /// rounds were sent.
    RoundCap,
    /// [`MigrationOptions::max_time`](crate::precopy::MigrationOptions::max_time)
    /// passed.
    TimeCap,
}

/// What the driver knew when precopy gave up: the error of a cancelled migration
/// ([`MigrationError::NotConverged`](crate::protocol::MigrationError::NotConverged)).
///
/// Its `Display` says why in words, with both rates:
/// `cannot converge: dirty 900.0 MB/s > link 130.0 MB/s, without throttling
/// (auto-converge is off) …`.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvergenceFailure {
    /// Why.
    pub reason: GiveUp,
    /// Rounds sent.
    pub rounds: u32,
    /// Dirty bytes left.
    pub remaining: u64,
    /// Estimated downtime for them.
    pub estimated: Duration,
    /// The caller's limit.
    pub limit: Duration,
    /// The last dirty rate, bytes per second.
    pub dirty_rate: f64,
    /// The link bandwidth estimate, bytes per second.
    pub bandwidth: f64,
    /// The throttle in force, percent (0: none).
    pub throttle: u8,
    /// Whether auto-converge could throttle this VM.
    pub throttling: bool,
}

impl fmt::Display for ConvergenceFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mb = |r: f64| r / 1e6;
        let (dirty, link) = (mb(self.dirty_rate), mb(self.bandwidth));
        match self.reason {
            GiveUp::DirtyFasterThanLink => {
                write!(
                    f,
                    "cannot converge: dirty {dirty:.1} MB/s > link {link:.1} MB/s"
                )?;
                if self.throttle > 0 {
                    write!(f, " at the highest throttle ({} %)", self.throttle)?;
                } else if self.throttling {
                    write!(f, " without throttling (auto-converge is off)")?;
                } else {
                    write!(f, " (this VM cannot be throttled)")?;
                }
            }
            GiveUp::RoundCap | GiveUp::TimeCap => {
                let cap = if self.reason == GiveUp::RoundCap {
                    "the round cap"
                } else {
                    "the time cap"
                };
                write!(
                    f,
                    "did not converge before {cap}: dirty {dirty:.1} MB/s, link {link:.1} MB/s, throttle {} %",
                    self.throttle
                )?;
            }
        }
        write!(
            f,
            "; after {} rounds {} bytes are dirty, estimated downtime {:?} over the limit {:?}",
            self.rounds, self.remaining, self.estimated, self.limit
        )
    }
}

/// A VM under migration whose throttle is lifted when this is dropped. Derefs to the
/// VM.
#[derive(Debug)]
pub struct Throttled<'a, M: Migratable + ?Sized> {
    vm: &'a mut M,
    percent: u8,
}

impl<'a, M: Migratable + ?Sized> Throttled<'a, M> {
    /// Wraps `vm` (its throttle is taken to be 0).
    pub fn new(vm: &'a mut M) -> Self {
        Self { vm, percent: 0 }
    }

    /// The throttle set through this guard, percent.
    pub fn percent(&self) -> u8 {
        self.percent
    }

    /// Sets the throttle ([`Migratable::set_throttle`]).
    pub fn set(&mut self, percent: u8) -> Result<(), MigratableError> {
        if percent != self.percent {
            self.vm.set_throttle(percent)?;
            self.percent = percent;
        }
        Ok(())
    }

    /// Sets the throttle back to 0, if it is not.
    pub fn lift(&mut self) -> Result<(), MigratableError> {
        self.set(0)
    }
}

impl<M: Migratable + ?Sized> Deref for Throttled<'_, M> {
    type Target = M;

    fn deref(&self) -> &M {
        self.vm
    }
}

impl<M: Migratable + ?Sized> DerefMut for Throttled<'_, M> {
    fn deref_mut(&mut self) -> &mut M {
        self.vm
    }
}

impl<M: Migratable + ?Sized> Drop for Throttled<'_, M> {
    fn drop(&mut self) {
        if self.percent != 0 {
            if let Err(e) = self.vm.set_throttle(0) {
                tracing::error!(error = %e, "cannot lift the throttle");
            } else {
                tracing::info!("throttle lifted");
            }
            self.percent = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_converge_rises_from_initial_by_increment_to_max() {
        let a = AutoConverge::default();
        let mut t = 0;
        let mut seen = Vec::new();
        while a.can_rise(t) {
            t = a.next(t);
            seen.push(t);
        }
        assert_eq!(seen, [20, 30, 40, 50, 60, 70, 80, 90, 99]);
        let odd = AutoConverge {
            initial: 0,
            increment: 200,
            max: 250,
        };
        assert_eq!(odd.next(0), 1);
        assert_eq!(odd.next(1), 99);
        assert!(!odd.can_rise(99));
    }

    #[test]
    fn a_failure_says_why_with_both_rates() {
        let f = ConvergenceFailure {
            reason: GiveUp::DirtyFasterThanLink,
            rounds: 3,
            remaining: 1 << 20,
            estimated: Duration::from_millis(8),
            limit: Duration::from_millis(1),
            dirty_rate: 900e6,
            bandwidth: 130e6,
            throttle: 0,
            throttling: true,
        };
        let text = f.to_string();
        assert!(
            text.starts_with(
                "cannot converge: dirty 900.0 MB/s > link 130.0 MB/s without throttling"
            ),
            "{text}"
        );
        let capped = ConvergenceFailure {
            reason: GiveUp::RoundCap,
            throttle: 99,
            ..f
        };
        assert!(capped.to_string().contains("throttle 99 %"), "{capped}");
    }
}
