//! Reconnect back-off: exponential, capped, with full jitter (a random delay between zero
//! and the exponential bound), so that a fleet that lost the server at once does not come
//! back at once.

/// Back-off state of one connection.
#[derive(Debug, Clone)]
pub struct Backoff {
    base_ms: u32,
    max_ms: u32,
    attempt: u32,
}

impl Backoff {
    /// Delays from `base_ms` doubling up to `max_ms`.
    pub fn new(base_ms: u32, max_ms: u32) -> Self {
        Self { base_ms: base_ms.max(1), max_ms: max_ms.max(base_ms.max(1)), attempt: 0 }
    }

    /// The bound of the next delay (before jitter).
    pub fn ceiling(&self) -> u32 {
        let factor = 1u64 << self.attempt.min(31);
        (u64::from(self.base_ms) * factor).min(u64::from(self.max_ms)) as u32
    }

    /// The next delay in milliseconds, from a random number the caller supplies.
    pub fn next_delay(&mut self, random: u32) -> u32 {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        random % ceiling.saturating_add(1)
    }

    /// Connected: the next failure starts from the base again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_under_the_bound() {
        let mut b = Backoff::new(100, 5_000);
        let mut ceilings = alloc::vec::Vec::new();
        for i in 0..10u32 {
            ceilings.push(b.ceiling());
            let d = b.next_delay(i.wrapping_mul(2_654_435_761));
            assert!(d <= ceilings[i as usize]);
        }
        assert_eq!(&ceilings[..7], &[100, 200, 400, 800, 1600, 3200, 5000]);
        b.reset();
        assert_eq!(b.ceiling(), 100);
    }
}
