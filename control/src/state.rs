//! The one owner of the live state. Every change to what the data plane sees is a typed
//! [`StateCommand`], applied here and nowhere else: [`StateOwner::apply`] computes the next table
//! from the current one, checks the invariants, and only then publishes it. Nothing else in markco
//! holds a [`TablePublisher`]; everyone else reads snapshots through a [`TableReader`].
//!
//! The admin API, the health loops, container events, reloads and `update-port` send commands.
//! A command that must survive a restart goes through [`StateOwner::commit`], which checks it,
//! writes it to the database (one statement, so one transaction) and publishes it only once the
//! database took it: a restart then rebuilds the same state from the database.
//!
//! Invariants, checked after each change, before the table is published:
//! - no editor address and no runtime address is used by two users (the database's unique address
//!   constraints, held by the table too): kept in O(1) per change through address indexes;
//! - every held route exists in the config, or is recorded as orphaned (a reload removed it; its
//!   holds stay and apply again if it comes back);
//! - a route is disabled in the table exactly while it has holders;
//! - the generation never decreases, and each config reload increases it by one.
//!
//! [`StateOwner::verify`] checks all of them over the whole state; it runs after every config
//! reload and at start (O(users)), and in tests.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use markco_proxy::table::{RouteTable, Routing, TablePublisher, TableReader, UserRoutes};

use crate::sessions::SessionCache;
use crate::switches::{Hold, Switches};

/// A change to the live state.
#[derive(Debug, Clone)]
pub enum StateCommand {
    /// A workspace is registered or started at these addresses (replaces the user's entry; its
    /// traffic record carries over).
    WorkspaceUp { user: String, routes: UserRoutes },
    /// A workspace's containers exited (`running: false`: requests get 503) or are back; its
    /// entry and addresses stay. No-op for a user without an entry.
    WorkspaceRunning { user: String, running: bool },
    /// A workspace stopped or was deleted: out of the table, its addresses free.
    WorkspaceDown { user: String },
    /// `update-port`: the user's runtime is now at `runtime`. No-op for a user without an entry
    /// (a stopped workspace: the database row moved, the next start uses it).
    RuntimeMoved { user: String, runtime: SocketAddr },
    /// `holder` (`admin` or `health:<check>`) holds `route` off since `since` (unix seconds).
    RouteHeld { route: String, holder: String, since: i64 },
    /// `holder` lifts its hold of `route`; other holders' holds stay.
    RouteReleased { route: String, holder: String },
    /// A reloaded config's routing replaces the current one under the next generation;
    /// workspaces and holds carry over.
    ConfigReloaded { routing: Arc<Routing> },
    /// Sessions to drop from the session cache at once (logout, account deletion, NOTIFY).
    SessionInvalidated(Sessions),
}

/// Which sessions a [`StateCommand::SessionInvalidated`] drops.
#[derive(Debug, Clone)]
pub enum Sessions {
    Token(String),
    User(String),
}

/// A command the invariants refuse; the table stays as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("{kind} address {addr} is already used by the workspace of user {other}")]
    AddressTaken { kind: &'static str, addr: SocketAddr, other: String },
    #[error("the live state breaks an invariant: {0}")]
    Broken(String),
}

/// Address indexes and orphaned holds: what the invariant checks need in O(1).
#[derive(Default)]
struct Books {
    editors: HashMap<SocketAddr, Arc<str>>,
    runtimes: HashMap<SocketAddr, Arc<str>>,
    /// Held routes that the current config does not define.
    orphaned: BTreeSet<String>,
}

pub struct StateOwner {
    publisher: TablePublisher,
    reader: TableReader,
    switches: Switches,
    sessions: Arc<SessionCache>,
    /// Serialises every change: one command at a time computes, checks and publishes.
    books: Mutex<Books>,
}

impl StateOwner {
    pub fn new(publisher: TablePublisher, switches: Switches, sessions: Arc<SessionCache>) -> StateOwner {
        let mut books = Books::default();
        let table = publisher.current();
        for (user, r) in table.workspaces.iter() {
            books.editors.insert(r.editor, user.clone());
            books.runtimes.insert(r.runtime, user.clone());
        }
        StateOwner { reader: publisher.reader(), publisher, switches, sessions, books: Mutex::new(books) }
    }

    /// A read-only handle on the table this owner publishes.
    pub fn reader(&self) -> TableReader {
        self.reader.clone()
    }

    pub fn table(&self) -> Arc<RouteTable> {
        self.publisher.current()
    }

    /// The holders of `route`.
    pub fn holders(&self, route: &str) -> Vec<Hold> {
        self.switches.holders(route)
    }

    /// Every held route with its holders.
    pub fn holds(&self) -> std::collections::BTreeMap<String, Vec<Hold>> {
        self.switches.all()
    }

    /// Held routes the current config does not define.
    pub fn orphaned(&self) -> Vec<String> {
        self.lock().orphaned.iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `cmd`: the next table is computed, checked and published, or nothing changes and
    /// the error says which invariant refused it. Returns the table in service afterwards.
    pub fn apply(&self, cmd: StateCommand) -> Result<Arc<RouteTable>, StateError> {
        let mut books = self.lock();
        self.apply_locked(&mut books, cmd, false)
    }

    /// Checks `cmd` against the current state without applying it.
    pub fn check(&self, cmd: &StateCommand) -> Result<(), StateError> {
        let mut books = self.lock();
        self.apply_locked(&mut books, cmd.clone(), true).map(|_| ())
    }

    /// A command that must survive a restart: checked, then `persist` writes it to the database,
    /// then it is applied. A command the invariants refuse is never written; one the database
    /// refuses is never published.
    pub async fn commit<T, E>(
        &self,
        cmd: StateCommand,
        persist: impl Future<Output = Result<T, E>>,
    ) -> Result<(T, Arc<RouteTable>), CommitError<E>> {
        self.check(&cmd).map_err(CommitError::State)?;
        let stored = persist.await.map_err(CommitError::Db)?;
        // Another change may have come in while the database wrote: checked again.
        let table = self.apply(cmd).map_err(|e| {
            tracing::error!("stored in the database but refused by the live state (applies after a restart): {e}");
            CommitError::State(e)
        })?;
        Ok((stored, table))
    }

    fn apply_locked(&self, books: &mut Books, cmd: StateCommand, dry_run: bool) -> Result<Arc<RouteTable>, StateError> {
        let old = self.publisher.current();
        let next = match cmd {
            StateCommand::WorkspaceUp { user, routes } => {
                let user: Arc<str> = Arc::from(user.as_str());
                free_for(&books.editors, "editor", routes.editor, &user)?;
                free_for(&books.runtimes, "runtime", routes.runtime, &user)?;
                if dry_run {
                    return Ok(old);
                }
                if let Some(prev) = old.user(&user) {
                    release(books, prev, &user);
                }
                books.editors.insert(routes.editor, user.clone());
                books.runtimes.insert(routes.runtime, user.clone());
                old.with_user(&user, routes)
            }
            StateCommand::WorkspaceRunning { user, running } => match old.user(&user) {
                Some(r) if r.running != running && !dry_run => {
                    old.with_user(&user, UserRoutes { running, ..(**r).clone() })
                }
                _ => return Ok(old),
            },
            StateCommand::WorkspaceDown { user } => match old.user(&user) {
                Some(prev) if !dry_run => {
                    release(books, prev, &Arc::from(user.as_str()));
                    old.without_user(&user)
                }
                _ => return Ok(old),
            },
            StateCommand::RuntimeMoved { user, runtime } => {
                let Some(prev) = old.user(&user) else { return Ok(old) };
                let owner: Arc<str> = Arc::from(user.as_str());
                free_for(&books.runtimes, "runtime", runtime, &owner)?;
                if dry_run {
                    return Ok(old);
                }
                if books.runtimes.get(&prev.runtime).is_some_and(|u| *u == owner) {
                    books.runtimes.remove(&prev.runtime);
                }
                books.runtimes.insert(runtime, owner);
                old.with_user(&user, UserRoutes { runtime, ..(**prev).clone() })
            }
            StateCommand::RouteHeld { route, holder, since } => {
                if dry_run {
                    return Ok(old);
                }
                if !old.has_route(&route) && books.orphaned.insert(route.clone()) {
                    tracing::warn!(route = %route, holder = %holder, "a hold of a route the config does not define: recorded as orphaned");
                }
                self.switches.set(&route, &holder, true, since);
                match with_switch(&old, &route, true) {
                    Some(next) => next,
                    // Held already (another holder, or a health check's every tick): nothing to publish.
                    None => return Ok(old),
                }
            }
            StateCommand::RouteReleased { route, holder } => {
                if dry_run {
                    return Ok(old);
                }
                let off = !self.switches.set(&route, &holder, false, 0).is_empty();
                if !off {
                    books.orphaned.remove(&route);
                }
                match with_switch(&old, &route, off) {
                    Some(next) => next,
                    None => return Ok(old),
                }
            }
            StateCommand::ConfigReloaded { routing } => {
                if dry_run {
                    return Ok(old);
                }
                let next = old.with_routing(old.generation + 1, routing);
                books.orphaned = self.switches.all().into_keys().filter(|r| !next.has_route(r)).collect();
                for route in &books.orphaned {
                    tracing::warn!(route = %route, "held route is not in the reloaded config: its holds stay, recorded as orphaned");
                }
                next
            }
            StateCommand::SessionInvalidated(which) => {
                if !dry_run {
                    match which {
                        Sessions::Token(t) => self.sessions.invalidate_token(&t),
                        Sessions::User(u) => self.sessions.invalidate_user(&u),
                    }
                }
                return Ok(old);
            }
        };
        let next = Arc::new(next);
        // The address invariant was checked above, before the indexes changed; what is left
        // (holds, switches, generation) is checked on the next table itself.
        check_step(&old, &next, books, &self.switches)?;
        self.publisher.publish(next.clone());
        Ok(next)
    }

    /// Checks every invariant over the whole state (O(users + holds)).
    pub fn verify(&self) -> Result<(), StateError> {
        let books = self.lock();
        let table = self.publisher.current();
        let mut editors = HashMap::new();
        let mut runtimes = HashMap::new();
        for (user, r) in table.workspaces.iter() {
            for (kind, addr, seen) in [("editor", r.editor, &mut editors), ("runtime", r.runtime, &mut runtimes)] {
                if let Some(other) = seen.insert(addr, user.clone()) {
                    return Err(StateError::Broken(format!("{kind} address {addr} used by users {other} and {user}")));
                }
            }
        }
        if editors != books.editors || runtimes != books.runtimes {
            return Err(StateError::Broken("the address indexes disagree with the table".into()));
        }
        let holds = self.switches.all();
        for route in holds.keys() {
            if !table.has_route(route) && !books.orphaned.contains(route) {
                return Err(StateError::Broken(format!("route {route} is held but neither defined nor orphaned")));
            }
        }
        let disabled: BTreeSet<&str> = table.disabled.iter().map(|r| &**r).collect();
        let held: BTreeSet<&str> = holds.keys().map(String::as_str).collect();
        if disabled != held {
            return Err(StateError::Broken(format!("disabled routes {disabled:?} are not the held routes {held:?}")));
        }
        Ok(())
    }
}

/// What [`StateOwner::commit`] fails with: the invariants refused, or the database did.
#[derive(Debug, thiserror::Error)]
pub enum CommitError<E> {
    #[error(transparent)]
    State(StateError),
    #[error(transparent)]
    Db(E),
}

fn free_for(
    index: &HashMap<SocketAddr, Arc<str>>,
    kind: &'static str,
    addr: SocketAddr,
    user: &Arc<str>,
) -> Result<(), StateError> {
    match index.get(&addr) {
        Some(other) if other != user => Err(StateError::AddressTaken { kind, addr, other: other.to_string() }),
        _ => Ok(()),
    }
}

/// Frees a user's addresses in the indexes (only where they are that user's).
fn release(books: &mut Books, prev: &UserRoutes, user: &Arc<str>) {
    if books.editors.get(&prev.editor).is_some_and(|u| u == user) {
        books.editors.remove(&prev.editor);
    }
    if books.runtimes.get(&prev.runtime).is_some_and(|u| u == user) {
        books.runtimes.remove(&prev.runtime);
    }
}

/// The table with `route` off or on; `None` when it already is.
fn with_switch(old: &RouteTable, route: &str, off: bool) -> Option<RouteTable> {
    (old.is_disabled(route) != off).then(|| old.with_route_disabled(route, off))
}

/// The per-change checks: O(1) in the number of users, so a workspace update stays flat.
fn check_step(old: &RouteTable, next: &RouteTable, books: &Books, switches: &Switches) -> Result<(), StateError> {
    if next.generation < old.generation {
        return Err(StateError::Broken(format!("generation went back from {} to {}", old.generation, next.generation)));
    }
    if !Arc::ptr_eq(&old.routing, &next.routing) && next.generation != old.generation + 1 {
        return Err(StateError::Broken("a new config must come with the next generation".into()));
    }
    // The routes off before or after (a handful; never per user).
    for route in old.disabled.iter().chain(next.disabled.iter()) {
        let held = !switches.holders(route).is_empty();
        if held != next.is_disabled(route) {
            return Err(StateError::Broken(format!(
                "route {route} disabled={} but held={held}",
                next.is_disabled(route)
            )));
        }
        if held && !next.has_route(route) && !books.orphaned.contains(&**route) {
            return Err(StateError::Broken(format!("route {route} is held but neither defined nor orphaned")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::SessionSettings;
    use crate::switches::{health_holder, ADMIN};

    fn owner() -> StateOwner {
        let (publisher, _reader) = TablePublisher::new(RouteTable::empty());
        let (sessions, _lookups) = SessionCache::new(SessionSettings::default());
        StateOwner::new(publisher, Switches::new(&prometheus::Registry::new()), sessions)
    }

    fn up(user: &str, editor: u16, runtime: u16) -> StateCommand {
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        StateCommand::WorkspaceUp { user: user.into(), routes: UserRoutes::new(a(editor), a(runtime), true) }
    }

    #[test]
    fn an_address_belongs_to_one_user() {
        let s = owner();
        s.apply(up("a", 1000, 2000)).expect("first workspace");
        let err = s.apply(up("b", 1000, 2001)).expect_err("b may not take a's editor");
        assert!(matches!(err, StateError::AddressTaken { kind: "editor", .. }), "{err}");
        assert!(s.table().user("b").is_none(), "a refused change is not published");
        // a's move to b's runtime address is refused; a moving within its own addresses is fine.
        s.apply(up("b", 1001, 2001)).expect("b on its own addresses");
        let to_b = StateCommand::RuntimeMoved { user: "a".into(), runtime: SocketAddr::from(([127, 0, 0, 1], 2001)) };
        assert!(s.apply(to_b).is_err());
        s.apply(StateCommand::RuntimeMoved { user: "a".into(), runtime: SocketAddr::from(([127, 0, 0, 1], 2100)) })
            .expect("a to a free port");
        // a's old runtime address is free again.
        s.apply(up("c", 1002, 2000)).expect("c takes a's former runtime port");
        s.apply(StateCommand::WorkspaceDown { user: "c".into() }).expect("c stops");
        s.apply(up("d", 1002, 2000)).expect("d takes c's ports");
        s.verify().expect("invariants hold");
    }

    #[test]
    fn holds_decide_the_switch_and_survive_a_reload_as_orphans() {
        let s = owner();
        let hold = |holder: &str| StateCommand::RouteHeld { route: "sync".into(), holder: holder.into(), since: 10 };
        s.apply(hold(ADMIN)).expect("admin holds");
        s.apply(hold(&health_holder("ws"))).expect("check holds");
        assert_eq!(s.orphaned(), ["sync"], "the empty config has no sync route");
        let t = s
            .apply(StateCommand::RouteReleased { route: "sync".into(), holder: health_holder("ws") })
            .expect("check passes");
        assert!(t.is_disabled("sync"), "the operator's hold stays");
        let gen = t.generation;
        let t = s.apply(StateCommand::ConfigReloaded { routing: s.table().routing.clone() }).expect("reload");
        assert_eq!(t.generation, gen + 1);
        assert!(t.is_disabled("sync"));
        s.verify().expect("invariants hold");
        let t = s.apply(StateCommand::RouteReleased { route: "sync".into(), holder: ADMIN.into() }).expect("lift");
        assert!(!t.is_disabled("sync"));
        assert!(s.orphaned().is_empty());
        s.verify().expect("invariants hold");
    }
}
