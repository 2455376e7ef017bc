//! Route switches with holders: a route is off while anyone holds it. The operator holds with
//! [`ADMIN`] (stored in the database; only the operator lifts it), a failing `[[health_check]]`
//! with `health:<check>` (in memory; lifted when its check passes again). Neither lifts the
//! other's hold, so automation cannot undo an operator's switch and an operator's `enable` cannot
//! reopen a route whose check still fails.
//!
//! This is bookkeeping only: the state owner (`crate::state`) keeps it, and publishes the outcome
//! the data plane sees: the route table's set of disabled routes.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus::{IntGaugeVec, Opts, Registry};
use serde::Serialize;

/// The operator's holder name.
pub const ADMIN: &str = "admin";

/// The holder name of a health check.
pub fn health_holder(check: &str) -> String {
    format!("health:{check}")
}

/// One holder of a route, for `/routes` and the switch calls' answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hold {
    pub holder: String,
    /// Unix seconds.
    pub since_unix: i64,
    /// The same time in RFC 3339.
    pub since: String,
}

pub struct Switches {
    /// route -> holder -> since (unix seconds).
    holds: Mutex<BTreeMap<String, BTreeMap<String, i64>>>,
    /// `markco_route_held_since_seconds{route,holder}`: present while held.
    gauge: IntGaugeVec,
}

impl Switches {
    pub fn new(registry: &Registry) -> Switches {
        let gauge = IntGaugeVec::new(
            Opts::new(
                "markco_route_held_since_seconds",
                "Routes held off, by holder: unix time since when (absent when not held)",
            ),
            &["route", "holder"],
        )
        .expect("static metric definition");
        let _ = registry.register(Box::new(gauge.clone()));
        Switches { holds: Mutex::default(), gauge }
    }

    /// Adds (`on`) or removes `holder`'s hold of `route`. Returns the route's holders after the
    /// change: the route is off while there are any.
    pub(crate) fn set(&self, route: &str, holder: &str, on: bool, since: i64) -> Vec<Hold> {
        let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        let of_route = holds.entry(route.to_string()).or_default();
        if on {
            let since = *of_route.entry(holder.to_string()).or_insert(since);
            self.gauge.with_label_values(&[route, holder]).set(since);
        } else if of_route.remove(holder).is_some() {
            let _ = self.gauge.remove_label_values(&[route, holder]);
        }
        let now = views(of_route);
        if of_route.is_empty() {
            holds.remove(route);
        }
        now
    }

    /// The holders of `route`.
    pub fn holders(&self, route: &str) -> Vec<Hold> {
        let holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        holds.get(route).map(views).unwrap_or_default()
    }

    /// Every held route with its holders.
    pub fn all(&self) -> BTreeMap<String, Vec<Hold>> {
        let holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        holds.iter().map(|(route, h)| (route.clone(), views(h))).collect()
    }
}

fn views(holders: &BTreeMap<String, i64>) -> Vec<Hold> {
    holders
        .iter()
        .map(|(holder, since)| Hold {
            holder: holder.clone(),
            since_unix: *since,
            since: chrono::DateTime::from_timestamp(*since, 0).map(|t| t.to_rfc3339()).unwrap_or_default(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_is_held_while_anyone_holds_it() {
        let s = Switches::new(&Registry::new());
        s.set("sync", ADMIN, true, 10);
        s.set("sync", &health_holder("ws"), true, 20);
        // The check passes again: the operator's hold stays.
        let left = s.set("sync", &health_holder("ws"), false, 30);
        assert_eq!(left.iter().map(|h| h.holder.as_str()).collect::<Vec<_>>(), [ADMIN]);
        // A second hold by the same holder keeps the first time.
        assert_eq!(s.set("sync", ADMIN, true, 40)[0].since_unix, 10);
        assert!(s.set("sync", ADMIN, false, 50).is_empty());
        assert!(s.all().is_empty());
    }
}
