//! Prometheus metrics. Label sets are bounded by the config (route names, upstream labels) and by
//! fixed enums (method, status class, error kind); never by user input.
//!
//! Per-route handles are resolved once, when a route table is built, and cached lock-free, so a
//! request only touches atomics.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

const METHODS: [&str; 8] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER"];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

pub fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::HEAD => 1,
        http::Method::POST => 2,
        http::Method::PUT => 3,
        http::Method::DELETE => 4,
        http::Method::PATCH => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

fn class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// The kinds of upstream failure we count.
#[derive(Debug, Clone, Copy)]
pub enum UpstreamErrorKind {
    ConnectRefused,
    ConnectTimeout,
    ReadTimeout,
    Reset,
    Other,
}

impl UpstreamErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::ConnectRefused => "connect_refused",
            UpstreamErrorKind::ConnectTimeout => "connect_timeout",
            UpstreamErrorKind::ReadTimeout => "read_timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Other => "other",
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    websockets: IntGaugeVec,
    upstream_errors: IntCounterVec,
    pub table_generation: IntGauge,
    reloads: IntCounterVec,
    pub bad_requests: IntCounterVec,
    rate_limited: IntCounterVec,
    /// Connections whose request header was not complete within `header_timeout`.
    pub header_timeouts: prometheus::IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("markco_http_requests_total", "HTTP requests handled, by route, method and status class"),
            &["route", "method", "status_class"],
        )
        .expect("static metric definition");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "markco_http_request_duration_seconds",
                "Time from request start to the end of the response, by route",
            )
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["route"],
        )
        .expect("static metric definition");
        let websockets = IntGaugeVec::new(
            Opts::new("markco_websockets_open", "Upgraded (websocket) connections open, by route"),
            &["route"],
        )
        .expect("static metric definition");
        let upstream_errors = IntCounterVec::new(
            Opts::new("markco_upstream_errors_total", "Failures talking to an upstream, by upstream and kind"),
            &["upstream", "kind"],
        )
        .expect("static metric definition");
        let table_generation = IntGauge::new(
            "markco_route_table_generation",
            "Generation of the route table in service; increases with every applied reload",
        )
        .expect("static metric definition");
        let reloads = IntCounterVec::new(
            Opts::new("markco_config_reloads_total", "Config reloads, by result (ok or error)"),
            &["result"],
        )
        .expect("static metric definition");
        let bad_requests = IntCounterVec::new(
            Opts::new("markco_http_bad_requests_total", "Requests refused before routing, by reason"),
            &["reason"],
        )
        .expect("static metric definition");
        let rate_limited = IntCounterVec::new(
            Opts::new("markco_http_rate_limited_total", "Requests refused with 429 by a route's rate_limit, by route"),
            &["route"],
        )
        .expect("static metric definition");
        let header_timeouts = prometheus::IntCounter::new(
            "markco_http_header_timeouts_total",
            "Connections closed because a request header was not complete within header_timeout",
        )
        .expect("static metric definition");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(websockets.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(table_generation.clone()),
            Box::new(reloads.clone()),
            Box::new(bad_requests.clone()),
            Box::new(rate_limited.clone()),
            Box::new(header_timeouts.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Seed the reload counters so both series exist from the start.
        reloads.with_label_values(&["ok"]);
        reloads.with_label_values(&["error"]);
        Arc::new(Metrics {
            registry,
            requests,
            duration,
            websockets,
            upstream_errors,
            table_generation,
            reloads,
            bad_requests,
            rate_limited,
            header_timeouts,
        })
    }

    /// Handles for one route; cheap, and the same series as any earlier route of that name.
    pub fn route(self: &Arc<Self>, name: &str) -> RouteMetrics {
        RouteMetrics {
            name: name.into(),
            owner: self.clone(),
            requests: Default::default(),
            duration: self.duration.with_label_values(&[name]),
            websockets: self.websockets.with_label_values(&[name]),
        }
    }

    pub fn upstream_error(&self, upstream: &str, kind: UpstreamErrorKind) {
        self.upstream_errors.with_label_values(&[upstream, kind.as_str()]).inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads.with_label_values(&[if ok { "ok" } else { "error" }]).inc();
    }

    pub fn rate_limited(&self, route: &str) {
        self.rate_limited.with_label_values(&[route]).inc();
    }

    pub fn bad_request(&self, reason: &str) {
        self.bad_requests.with_label_values(&[reason]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

/// Metric handles of one route (a clone shares its series).
#[derive(Clone)]
pub struct RouteMetrics {
    name: Arc<str>,
    owner: Arc<Metrics>,
    /// Created on first use so unused method/class pairs do not show up as zero series.
    requests: [[OnceLock<IntCounter>; 5]; 8],
    pub duration: Histogram,
    pub websockets: IntGauge,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RouteMetrics({})", self.name)
    }
}

impl RouteMetrics {
    pub fn count(&self, method: &http::Method, status: u16) {
        let (m, c) = (method_index(method), class_index(status));
        self.requests[m][c]
            .get_or_init(|| self.owner.requests.with_label_values(&[&self.name, METHODS[m], CLASSES[c]]))
            .inc();
    }
}
