//! Micro-benchmarks of the route table: applying one workspace update, and one request's lookup
//! (site, route, user), with 100, 10,000 and 100,000 users registered. Both must stay flat
//! (within 1.5x from 100 to 100,000 users): per-user changes are O(log n) on a persistent map,
//! never a copy of the table.
//!
//! `owner_workspace_update` is the same update as the control plane applies it: a typed command
//! through the state owner (invariant checks, address indexes, publishing), also flat.
//!
//! Run: `cargo bench --bench route_table` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use markco_control::sessions::{SessionCache, SessionSettings};
use markco_control::state::{StateCommand, StateOwner};
use markco_control::switches::Switches;
use markco_proxy::metrics::Metrics;
use markco_proxy::table::{
    Action, PathPattern, ProxySettings, Route, RouteTable, Routing, Site, TablePublisher, UserRoutes,
};

fn user_id(i: usize) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", i, i)
}

fn table_with(users: usize) -> RouteTable {
    let metrics = Metrics::new();
    let routes = vec![
        std::sync::Arc::new(Route::new(
            "workspace",
            vec![PathPattern::parse("/u/*")],
            Action::Workspace,
            metrics.route("workspace"),
        )),
        std::sync::Arc::new(Route::new(
            "fallback",
            vec![PathPattern::parse("/*")],
            Action::Control,
            metrics.route("fallback"),
        )),
    ];
    let site = Site { hosts: vec!["markco.dev".into()], tls: false, routes };
    let mut t = RouteTable::new(1, Routing::new(ProxySettings::default(), vec![site]));
    for i in 0..users {
        t = t.with_user(&user_id(i), routes_for(i));
    }
    t
}

/// Addresses no two users share (the owner refuses a shared one).
fn distinct_routes(i: usize) -> UserRoutes {
    let ip = |first: u8| std::net::IpAddr::from([first, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
    UserRoutes::new(SocketAddr::new(ip(10), 20000), SocketAddr::new(ip(11), 40000), true)
}

fn owner_with(users: usize) -> StateOwner {
    let (publisher, _reader) = TablePublisher::new(table_with(0));
    let (sessions, _lookups) = SessionCache::new(SessionSettings::default());
    let owner = StateOwner::new(publisher, Switches::new(&prometheus::Registry::new()), sessions);
    for i in 0..users {
        owner.apply(StateCommand::WorkspaceUp { user: user_id(i), routes: distinct_routes(i) }).expect("distinct");
    }
    owner
}

fn routes_for(i: usize) -> UserRoutes {
    let editor: SocketAddr = format!("127.0.0.1:{}", 20000 + i % 20000).parse().expect("addr");
    let runtime: SocketAddr = format!("127.0.0.1:{}", 40000 + i % 20000).parse().expect("addr");
    UserRoutes::new(editor, runtime, true)
}

fn bench(c: &mut Criterion) {
    let mut update = c.benchmark_group("workspace_update");
    for n in [100usize, 10_000, 100_000] {
        let table = table_with(n);
        let who = user_id(n / 2);
        let mut flip = 0usize;
        update.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                flip += 1;
                black_box(table.with_user(&who, routes_for(flip)))
            })
        });
    }
    update.finish();

    let mut owned = c.benchmark_group("owner_workspace_update");
    for n in [100usize, 10_000, 100_000] {
        let owner = owner_with(n);
        let who = user_id(n / 2);
        let mut flip = 0usize;
        owned.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                flip += 1;
                let routes = UserRoutes { running: flip % 2 == 0, ..distinct_routes(n / 2) };
                black_box(owner.apply(StateCommand::WorkspaceUp { user: who.clone(), routes }).expect("applied"))
            })
        });
    }
    owned.finish();

    let mut lookup = c.benchmark_group("request_lookup");
    for n in [100usize, 10_000, 100_000] {
        let table = table_with(n);
        let who = user_id(n / 3);
        let path = format!("/u/{who}/index.html");
        lookup.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let site = table.site(black_box("markco.dev")).expect("site");
                let route = site.find(black_box(&path)).expect("route");
                let owner = markco_proxy::identity::owner_segment(&path, "/u/").expect("owner");
                black_box((route, table.user(owner).expect("user").editor))
            })
        });
    }
    lookup.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
