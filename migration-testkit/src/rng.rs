//! [`Rng`]: a small deterministic pseudo-random generator (SplitMix64).
//!
//! Everything random in this crate (fault plans, workload patterns, bit-flip samples)
//! comes from an [`Rng`] built from a seed, so a failing run is replayed by reusing
//! the seed it printed. Not for cryptography.

/// SplitMix64: 64 bits of state, fast, and good enough for test data.
///
/// ```
/// use migration_testkit::Rng;
///
/// let mut a = Rng::new(42);
/// let mut b = Rng::new(42);
/// assert_eq!(a.next_u64(), b.next_u64());
/// assert!(a.below(10) < 10);
/// ```
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    /// A number in `0..bound` (`0` when `bound` is `0`).
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        // Multiply-shift: unbiased enough for tests, no division loop.
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let n = rest.len();
            rest.copy_from_slice(&self.next_u64().to_le_bytes()[..n]);
        }
    }
}

/// The SplitMix64 finaliser: a bijective 64-bit mix, also used as a cheap hash step.
pub const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A deterministic 64-bit digest builder (not cryptographic), stable across
/// processes and Rust versions, used by the fakes' `content_digest`.
#[derive(Clone, Debug)]
pub struct Digest {
    h: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Self::new()
    }
}

impl Digest {
    /// An empty digest.
    pub const fn new() -> Self {
        Self {
            h: 0x6a09_e667_f3bc_c908,
        }
    }

    /// Mixes in one word.
    pub fn word(&mut self, w: u64) -> &mut Self {
        self.h = mix(self.h ^ w).wrapping_add(0x9e37_79b9_7f4a_7c15);
        self
    }

    /// Mixes in bytes (length included, so `[a] + [b]` differs from `[a, b]`).
    pub fn bytes(&mut self, data: &[u8]) -> &mut Self {
        self.word(data.len() as u64);
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.word(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.word(u64::from_le_bytes(w));
        }
        self
    }

    /// The digest value.
    pub fn finish(&self) -> u64 {
        mix(self.h)
    }
}

impl std::hash::Hasher for Digest {
    fn write(&mut self, bytes: &[u8]) {
        self.bytes(bytes);
    }

    fn finish(&self) -> u64 {
        Digest::finish(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_bounds_and_covers_it() {
        let mut r = Rng::new(7);
        let mut seen = [false; 5];
        for _ in 0..200 {
            let v = r.below(5);
            assert!(v < 5);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(r.below(0), 0);
    }

    #[test]
    fn digest_depends_on_boundaries_and_content() {
        let d = |parts: &[&[u8]]| {
            let mut d = Digest::new();
            for p in parts {
                d.bytes(p);
            }
            d.finish()
        };
        assert_ne!(d(&[b"ab"]), d(&[b"a", b"b"]));
        assert_ne!(d(&[b"abc"]), d(&[b"abd"]));
        assert_eq!(d(&[b"abc"]), d(&[b"abc"]));
    }
}
