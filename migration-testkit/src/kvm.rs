//! KVM gating for tests: skip visibly when `/dev/kvm` is unusable, or fail when the
//! environment demands KVM.
//!
//! Put [`require_kvm!`](crate::require_kvm) (or an `if !skip_unless_kvm() { return; }`)
//! at the top of every test that needs KVM:
//!
//! ```
//! // In tests/my_guest.rs, under #[test]:
//! fn runs_a_guest() {
//!     migration_testkit::require_kvm!();
//!     let kvm = kvm_ioctls::Kvm::new().unwrap();
//!     // … create a VM and run a guest …
//! #   drop(kvm);
//! }
//! # runs_a_guest();
//! ```
//!
//! Without a usable `/dev/kvm` the test prints
//! `skipped: /dev/kvm not usable: <reason>` to stderr and returns (passes). With the
//! environment variable `MIGRATION_REQUIRE_KVM=1` (CI machines that have KVM) it
//! panics instead, so a broken KVM setup cannot pass silently.

use std::env;

/// The environment variable that turns a skip into a failure.
pub const REQUIRE_KVM_ENV: &str = "MIGRATION_REQUIRE_KVM";

/// The KVM API version every KVM has reported since Linux 2.6.22.
const KVM_API_VERSION: i32 = 12;

/// Whether `/dev/kvm` can be opened read-write and speaks KVM API version 12; the
/// error says why not.
///
/// ```
/// match migration_testkit::kvm_available() {
///     Ok(()) => println!("KVM is usable"),
///     Err(reason) => println!("no KVM: {reason}"),
/// }
/// ```
pub fn kvm_available() -> Result<(), String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    match kvm.get_api_version() {
        KVM_API_VERSION => Ok(()),
        v => Err(format!(
            "KVM_GET_API_VERSION returned {v}, expected {KVM_API_VERSION}"
        )),
    }
}

/// Whether `MIGRATION_REQUIRE_KVM=1` is set.
pub fn kvm_required() -> bool {
    env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1")
}

/// `true` when KVM is usable. Otherwise prints
/// `skipped: /dev/kvm not usable: <reason>` to stderr and returns `false`, or panics
/// if `MIGRATION_REQUIRE_KVM=1`.
pub fn skip_unless_kvm() -> bool {
    decide(kvm_available(), kvm_required())
}

fn decide(available: Result<(), String>, required: bool) -> bool {
    match available {
        Ok(()) => true,
        Err(reason) if required => {
            panic!("/dev/kvm not usable: {reason} (and {REQUIRE_KVM_ENV}=1 requires it)")
        }
        Err(reason) => {
            eprintln!("skipped: /dev/kvm not usable: {reason}");
            false
        }
    }
}

/// Returns from the enclosing test when KVM is unusable, after printing
/// `skipped: /dev/kvm not usable: <reason>`; panics instead under
/// `MIGRATION_REQUIRE_KVM=1`. `require_kvm!(value)` returns `value` (for tests that
/// return `Result`: `require_kvm!(Ok(()))`).
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm::skip_unless_kvm() {
            return;
        }
    };
    ($ret:expr) => {
        if !$crate::kvm::skip_unless_kvm() {
            return $ret;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_without_kvm_unless_required() {
        assert!(decide(Ok(()), true));
        assert!(decide(Ok(()), false));
        assert!(!decide(Err("test reason".into()), false));
        let panicked = std::panic::catch_unwind(|| decide(Err("test reason".into()), true));
        assert!(panicked.is_err());
    }

    #[test]
    fn agrees_with_the_device_node() {
        let opens = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if !opens {
            assert!(kvm_available().is_err());
        }
    }
}
