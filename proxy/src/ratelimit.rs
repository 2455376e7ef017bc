//! Per-route request rate limits (`rate_limit = "100/s"`, `burst = 20`), per client address, or
//! per user on identity routes, counted with `pingora-limits`' lock-free estimators.
//!
//! Two windows make a rate with a burst: within any one period (a second for "/s", a minute for
//! "/m") a key may make `rate + burst` requests, and over ten periods no more than `rate` per
//! period on average. Both are sliding estimates (the previous period's count weighted by how
//! much of it still falls in the window), so there is no free burst at a period boundary.

use std::fmt;
use std::hash::Hash;
use std::time::Duration;

use pingora_limits::rate::{Rate, RateComponents};

/// A parsed `rate_limit` with its `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    pub rate: u32,
    pub period: Duration,
    pub burst: u32,
}

impl RateSpec {
    /// Parses "100/s", "20/m" or "1000/h".
    pub fn parse(text: &str, burst: u32) -> Result<RateSpec, String> {
        let (n, unit) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a rate: write requests per unit, e.g. \"100/s\" or \"600/m\""))?;
        let rate: u32 = n.trim().parse().map_err(|_| format!("{:?} is not a whole number of requests", n.trim()))?;
        if rate == 0 {
            return Err("a rate of 0 would refuse every request; disable the route instead".to_string());
        }
        let period = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => return Err(format!("unknown unit {other:?}: use s, m or h")),
        };
        Ok(RateSpec { rate, period, burst })
    }
}

impl fmt::Display for RateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit} (burst {})", self.rate, self.burst)
    }
}

/// The estimators of one route.
pub struct RateLimiter {
    spec: RateSpec,
    short: Rate,
    long: Rate,
    /// Seconds a refused client is told to wait.
    retry_after: u64,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RateLimiter({})", self.spec)
    }
}

const LONG: u32 = 10;

fn sliding(c: RateComponents) -> f64 {
    c.prev_samples as f64 * (1.0 - c.current_interval_fraction) + c.curr_samples as f64
}

impl RateLimiter {
    pub fn new(spec: RateSpec) -> RateLimiter {
        RateLimiter {
            spec,
            short: Rate::new(spec.period),
            long: Rate::new(spec.period * LONG),
            retry_after: spec.period.as_secs().max(1),
        }
    }

    pub fn spec(&self) -> RateSpec {
        self.spec
    }

    pub fn retry_after(&self) -> u64 {
        self.retry_after
    }

    /// Counts one request of `key`; false when it is over the limit (and then not counted, so a
    /// client that keeps trying is let in again once its rate falls).
    pub fn allow<K: Hash + ?Sized>(&self, key: &K) -> bool {
        let short = self.short.rate_with(&key, sliding);
        let long = self.long.rate_with(&key, sliding);
        let short_cap = f64::from(self.spec.rate) + f64::from(self.spec.burst);
        let long_cap = f64::from(self.spec.rate) * f64::from(LONG) + f64::from(self.spec.burst);
        if short + 1.0 > short_cap || long + 1.0 > long_cap {
            return false;
        }
        self.short.observe(&key, 1);
        self.long.observe(&key, 1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!(RateSpec::parse("100/s", 5), Ok(RateSpec { rate: 100, period: Duration::from_secs(1), burst: 5 }));
        assert_eq!(RateSpec::parse(" 20 / m ", 0).map(|r| r.period), Ok(Duration::from_secs(60)));
        assert!(RateSpec::parse("100", 0).is_err());
        assert!(RateSpec::parse("0/s", 0).is_err());
        assert!(RateSpec::parse("-1/s", 0).is_err());
        assert!(RateSpec::parse("5/d", 0).is_err());
    }

    #[test]
    fn burst_then_refusal_per_key() {
        let l = RateLimiter::new(RateSpec { rate: 5, period: Duration::from_secs(60), burst: 2 });
        let allowed = (0..20).filter(|_| l.allow(&"a")).count();
        assert_eq!(allowed, 7, "rate + burst within one period");
        assert!(l.allow(&"b"), "another key has its own budget");
    }
}
