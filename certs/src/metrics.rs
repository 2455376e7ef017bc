//! TLS and ACME metrics.

use prometheus::{Gauge, GaugeVec, IntCounterVec, Opts, Registry};

#[derive(Clone)]
pub struct TlsMetrics {
    handshakes: IntCounterVec,
    expiry: GaugeVec,
    orders: IntCounterVec,
    fleet: IntCounterVec,
    challenge_lookups: IntCounterVec,
    pub last_renewal: Gauge,
}

impl std::fmt::Debug for TlsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMetrics")
    }
}

impl TlsMetrics {
    pub fn new(registry: &Registry) -> TlsMetrics {
        let handshakes = IntCounterVec::new(
            Opts::new("markco_tls_handshakes_total", "TLS handshakes, by result and protocol version"),
            &["result", "protocol"],
        )
        .expect("static metric definition");
        let expiry = GaugeVec::new(
            Opts::new(
                "markco_tls_certificate_expiry_timestamp_seconds",
                "Not-after time of the certificate served for a host",
            ),
            &["host"],
        )
        .expect("static metric definition");
        let orders = IntCounterVec::new(
            Opts::new("markco_acme_orders_total", "ACME certificate orders, by result (ok or error)"),
            &["result"],
        )
        .expect("static metric definition");
        let fleet = IntCounterVec::new(
            Opts::new(
                "markco_acme_fleet_certificates_total",
                "[cluster]: certificates this gateway took from the shared database instead of ordering (event adopted)",
            ),
            &["event"],
        )
        .expect("static metric definition");
        let challenge_lookups = IntCounterVec::new(
            Opts::new(
                "markco_acme_shared_challenge_lookups_total",
                "[cluster]: HTTP-01 tokens this gateway did not know, looked up in the shared database, by result (hit, miss, error)",
            ),
            &["result"],
        )
        .expect("static metric definition");
        let last_renewal = Gauge::new(
            "markco_acme_last_success_timestamp_seconds",
            "Time of the last certificate obtained from the ACME server (0: none yet)",
        )
        .expect("static metric definition");
        for c in [
            Box::new(handshakes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(expiry.clone()),
            Box::new(orders.clone()),
            Box::new(fleet.clone()),
            Box::new(challenge_lookups.clone()),
            Box::new(last_renewal.clone()),
        ] {
            // A second registration (tests building two stores on one registry) is harmless.
            let _ = registry.register(c);
        }
        orders.with_label_values(&["ok"]);
        orders.with_label_values(&["error"]);
        fleet.with_label_values(&["adopted"]);
        for r in ["hit", "miss", "error"] {
            challenge_lookups.with_label_values(&[r]);
        }
        TlsMetrics { handshakes, expiry, orders, fleet, challenge_lookups, last_renewal }
    }

    pub fn handshake(&self, result: &str, protocol: &str) {
        self.handshakes.with_label_values(&[result, protocol]).inc();
    }

    pub fn expiry(&self, host: &str, not_after: i64) {
        self.expiry.with_label_values(&[host]).set(not_after as f64);
    }

    pub fn forget_host(&self, host: &str) {
        let _ = self.expiry.remove_label_values(&[host]);
    }

    pub fn fleet(&self, event: &str) {
        self.fleet.with_label_values(&[event]).inc();
    }

    /// `result`: hit, miss or error.
    pub fn challenge_lookup(&self, result: &str) {
        self.challenge_lookups.with_label_values(&[result]).inc();
    }

    pub fn order(&self, ok: bool) {
        self.orders.with_label_values(&[if ok { "ok" } else { "error" }]).inc();
    }
}
