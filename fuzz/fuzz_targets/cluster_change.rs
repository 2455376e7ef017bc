//! What a gateway reads from the shared database: change-log rows (JSON, into the typed
//! `Change` and then the owner's commands) and sealed secrets (fleet certificate keys). Never a
//! panic; a sealed value opens only with its own key and context, and round-trips.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use markco_certs::SecretKey;
use markco_control::cluster::{commands, Change};
use markco_proxy::table::{RouteTable, UserRoutes};

fuzz_target!(|data: &[u8]| {
    let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let table = RouteTable::empty().with_user("u", UserRoutes::new(a(1000), a(2000), true));
    if let Ok(change) = serde_json::from_slice::<Change>(data) {
        let cmds = commands(change, &table);
        assert!(cmds.len() <= 1, "one change, at most one command: {cmds:?}");
    }

    let key = SecretKey::from_secret(b"0123456789abcdef0123456789abcdef", Path::new("fuzz.key"));
    // Arbitrary bytes as a stored sealed value: refused, never a panic (a forgery would be a bug).
    assert!(key.open(data, "row").is_err(), "arbitrary bytes opened as a sealed value");
    let sealed = key.seal(data, "row").expect("seal");
    assert_eq!(key.open(&sealed, "row").expect("open"), data);
    assert!(key.open(&sealed, "another row").is_err(), "a sealed value opened under another row");
});
