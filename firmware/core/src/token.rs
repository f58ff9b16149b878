//! When to refresh an access token: at 80% of its lifetime, and at least a margin before it
//! expires, so that a reconnect with the new token happens while the old one still works.

/// The current access token's times (epoch milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenTimes {
    /// When it was issued (received).
    pub issued_ms: i64,
    /// When it expires.
    pub expires_ms: i64,
}

/// The least time before expiry a refresh is due.
pub const MARGIN_MS: i64 = 10_000;

impl TokenTimes {
    /// A token received at `now_ms` that lives `expires_in_s` seconds.
    pub fn new(now_ms: i64, expires_in_s: u64) -> Self {
        let life = i64::try_from(expires_in_s).unwrap_or(i64::MAX / 2_000).saturating_mul(1000);
        Self { issued_ms: now_ms, expires_ms: now_ms.saturating_add(life) }
    }

    /// When to refresh.
    pub fn refresh_at(&self) -> i64 {
        let life = self.expires_ms - self.issued_ms;
        let at = self.issued_ms + life / 5 * 4;
        at.min(self.expires_ms - MARGIN_MS).max(self.issued_ms)
    }

    /// Whether a refresh is due at `now_ms`.
    pub fn due(&self, now_ms: i64) -> bool {
        now_ms >= self.refresh_at()
    }

    /// Whether the token has expired at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        now_ms >= self.expires_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_at_four_fifths_and_before_the_margin() {
        let t = TokenTimes::new(0, 900);
        assert_eq!(t.refresh_at(), 720_000);
        assert!(!t.due(719_999) && t.due(720_000) && !t.expired(899_999) && t.expired(900_000));
        // Short lifetimes: the margin wins, but never before issue.
        assert_eq!(TokenTimes::new(1000, 30).refresh_at(), 21_000);
        assert_eq!(TokenTimes::new(1000, 5).refresh_at(), 1000);
    }
}
