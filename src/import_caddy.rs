//! `markco import-caddy FILE`: a Caddy JSON config (the shape the orchestrator pushes today, or
//! the output of `caddy adapt`) translated into a markco config, with a report of every part that
//! could not be translated. Nothing is dropped silently: an untranslated route is named in the
//! report and in a comment at the top of the output, and the exit code says so.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

/// The result of an import.
pub struct Imported {
    /// The markco config (TOML), with a comment block naming what was left out.
    pub toml: String,
    /// Parts of the Caddy config that markco does not do the same way; non-empty means the
    /// output does not behave like Caddy did.
    pub untranslated: Vec<String>,
    /// Differences that do not change where a request goes (said so the operator knows).
    pub notes: Vec<String>,
    pub sites: usize,
    pub routes: usize,
}

/// Why an import could not start at all.
#[derive(Debug)]
pub struct ImportError(pub String);

impl std::fmt::Display for ImportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

// The markco config, as serialized: field names are the config's keys.
#[derive(Serialize)]
struct OutConfig {
    server: OutServer,
    #[serde(rename = "site")]
    sites: Vec<OutSite>,
}

#[derive(Serialize)]
struct OutServer {
    http: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    https: Option<String>,
    admin: String,
}

#[derive(Serialize)]
struct OutSite {
    hosts: Vec<String>,
    #[serde(rename = "route")]
    routes: Vec<OutRoute>,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
struct OutRoute {
    name: String,
    #[serde(rename = "match")]
    patterns: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy: Option<String>,
    #[serde(rename = "static", skip_serializing_if = "Option::is_none")]
    static_root: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redirect: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    respond: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    strip_prefix: Option<String>,
}

/// What the handlers before a terminal one set up (Caddy's `vars` root, `rewrite`).
#[derive(Clone, Default)]
struct HandlerCtx {
    root: Option<String>,
    strip_prefix: Option<String>,
}

/// One matcher set, reduced to what markco matches on.
#[derive(Clone, Debug, Default, PartialEq)]
struct Matcher {
    /// `None`: any host.
    hosts: Option<Vec<String>>,
    /// `None`: any path.
    paths: Option<Vec<String>>,
}

/// A Caddy route flattened (subroutes expanded) to one markco route, not yet placed in a site.
struct Flat {
    hosts: Option<Vec<String>>,
    route: OutRoute,
}

struct Importer {
    untranslated: Vec<String>,
    notes: Vec<String>,
    flat: Vec<Flat>,
    /// Route names given so far (`@id`s or generated), to keep them unique.
    names: BTreeMap<String, usize>,
}

/// A Caddyfile starts with a site address or a global options block, never with `{"`.
fn looks_like_caddyfile(src: &str) -> bool {
    match src.trim_start().strip_prefix('{') {
        None => !src.trim_start().starts_with('['),
        // `{` then a key or `}` is JSON; `{` then a word is a Caddyfile's global options block.
        Some(rest) => !rest.trim_start().starts_with(['"', '}']),
    }
}

pub fn import(src: &str) -> Result<Imported, ImportError> {
    let doc: Value = match serde_json::from_str(src) {
        Ok(v) => v,
        Err(e) if looks_like_caddyfile(src) => {
            return Err(ImportError(format!(
                "this looks like a Caddyfile; only Caddy's JSON config is read (JSON parse error: {e}).\n\
                 help: convert it with Caddy itself, then import the JSON:\n\
                 \x20     caddy adapt --config Caddyfile --pretty > caddy.json\n\
                 \x20     markco import-caddy caddy.json > markco.toml\n\
                 or fetch the config a running Caddy serves: curl -s localhost:2019/config/ > caddy.json"
            )))
        }
        Err(e) => return Err(ImportError(format!("not valid JSON: {e}"))),
    };
    let Some(top) = doc.as_object() else {
        return Err(ImportError(
            "the JSON is not an object; expected Caddy's config ({\"apps\": {\"http\": ...}})".into(),
        ));
    };
    let mut im = Importer { untranslated: Vec::new(), notes: Vec::new(), flat: Vec::new(), names: BTreeMap::new() };

    let admin = im.admin(top.get("admin"));
    for key in top.keys() {
        match key.as_str() {
            "admin" | "apps" => {}
            "logging" => im.note("`logging` is not translated: markco writes its own access log (see [log])"),
            "storage" => im.note("`storage` is not translated: markco keeps certificates under [tls] storage"),
            other => im.lose(format!("top-level `{other}`: markco has no equivalent")),
        }
    }
    let apps = top.get("apps").and_then(Value::as_object);
    let Some(http) = apps.and_then(|a| a.get("http")).and_then(Value::as_object) else {
        return Err(ImportError("no `apps.http` in this config: there are no routes to import".into()));
    };
    for key in apps.into_iter().flat_map(|a| a.keys()) {
        match key.as_str() {
            "http" => {}
            "tls" => im.lose(
                "apps.tls (certificate policies): markco obtains a certificate per site by ACME; set [tls] email, \
                 storage and challenges by hand (see the README, \"HTTPS and automatic certificates\")"
                    .into(),
            ),
            other => im.lose(format!("apps.{other}: markco has no equivalent")),
        }
    }
    for key in http.keys() {
        match key.as_str() {
            "servers" => {}
            "http_port" | "https_port" => im.note(format!(
                "apps.http.{key} is not translated: markco's ports are the listen addresses under [server]"
            )),
            other => im.lose(format!("apps.http.{other}: markco has no equivalent")),
        }
    }
    let servers = http.get("servers").and_then(Value::as_object).cloned().unwrap_or_default();
    let mut server_iter = servers.iter();
    let Some((srv_name, srv)) = server_iter.next() else {
        return Err(ImportError("`apps.http.servers` is empty: there are no routes to import".into()));
    };
    for (other, _) in server_iter {
        im.lose(format!(
            "apps.http.servers.{other}: markco has one HTTP and one HTTPS listener; only server {srv_name:?} was \
             imported, merge this one's routes by hand"
        ));
    }
    let here = format!("apps.http.servers.{srv_name}");
    let (http_addr, https_addr) = im.listeners(&here, srv.get("listen"));
    for key in srv.as_object().into_iter().flat_map(|s| s.keys()) {
        match key.as_str() {
            "listen" | "routes" => {}
            "automatic_https" => im.note(format!(
                "{here}.automatic_https is not translated: markco gets certificates for every public host of a site \
                 when [server] https is set (per site: tls = \"off\" or a cert/key pair)"
            )),
            "logs" => im.note(format!("{here}.logs is not translated: markco writes an access log (see [log])")),
            other => im.lose(format!("{here}.{other}: not translated; set the matching [server] keys by hand")),
        }
    }
    let routes = srv.get("routes").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut name_seed = 0;
    im.routes(&format!("{here}.routes"), &routes, &Matcher::default(), &HandlerCtx::default(), None, &mut name_seed);
    if im.flat.iter().any(|f| f.route.patterns.iter().any(|p| p.len() > 2 && p.ends_with("/*"))) {
        im.note(
            "Caddy's \"/x/*\" does not match \"/x\" itself; markco's does (it matches \"/x\", \"/x/\" and below)"
                .to_string(),
        );
    }
    let sites = im.place_in_sites();
    let route_count = sites.iter().map(|s| s.routes.len()).sum();
    let site_count = sites.len();
    let out = OutConfig { server: OutServer { http: http_addr, https: https_addr, admin }, sites };
    let body = toml::to_string_pretty(&out).map_err(|e| ImportError(format!("cannot write the TOML: {e}")))?;
    let mut header = String::from("# markco config imported from Caddy's JSON config by `markco import-caddy`.\n");
    header.push_str(
        "# Check it with `markco check --config FILE`; every key is explained in deploy/markco.example.toml.\n",
    );
    if !im.untranslated.is_empty() {
        header.push_str("#\n# NOT TRANSLATED (this config does not do what Caddy did for these):\n");
        for u in &im.untranslated {
            header.push_str(&format!("#   - {}\n", u.replace('\n', " ")));
        }
    }
    header.push('\n');
    Ok(Imported {
        toml: header + &body,
        untranslated: im.untranslated,
        notes: im.notes,
        sites: site_count,
        routes: route_count,
    })
}

/// Caddy's "localhost:2019" / ":2019" / "0.0.0.0:2019" as a socket address markco accepts.
fn socket_addr(s: &str, default_host: &str) -> Option<String> {
    let s = s.trim();
    let s = s.strip_prefix("tcp/").unwrap_or(s);
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = match host {
        "" => default_host,
        "localhost" => "127.0.0.1",
        h => h,
    };
    let addr = format!("{host}:{port}");
    addr.parse::<std::net::SocketAddr>().ok().map(|a| a.to_string())
}

impl Importer {
    fn lose(&mut self, what: String) {
        self.untranslated.push(what);
    }

    fn note(&mut self, what: impl Into<String>) {
        self.notes.push(what.into());
    }

    fn admin(&mut self, admin: Option<&Value>) -> String {
        let default = "127.0.0.1:2019".to_string();
        let Some(a) = admin.and_then(Value::as_object) else {
            return default;
        };
        for key in a.keys() {
            match key.as_str() {
                "listen" => {}
                "disabled" => self.note("admin.disabled is not translated: markco's admin API is always on (keep it on loopback and set admin_token_file)"),
                other => self.note(format!("admin.{other} is not translated")),
            }
        }
        match a.get("listen").and_then(Value::as_str) {
            None => default,
            Some(l) => match socket_addr(l, "127.0.0.1") {
                Some(addr) => addr,
                None => {
                    self.lose(format!(
                        "admin.listen {l:?} is not an IP:port markco can listen on; [server] admin is {default}"
                    ));
                    default
                }
            },
        }
    }

    /// `listen` → ([server] http, [server] https). Port 443 is the HTTPS listener, as in Caddy.
    fn listeners(&mut self, here: &str, listen: Option<&Value>) -> (String, Option<String>) {
        let mut http = None;
        let mut https = None;
        let list: Vec<&str> =
            listen.and_then(Value::as_array).map(|l| l.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        for l in &list {
            let Some(addr) = socket_addr(l, "0.0.0.0") else {
                self.lose(format!("{here}.listen {l:?}: not an address markco can listen on (port ranges and unix sockets are not supported)"));
                continue;
            };
            let slot = if addr.ends_with(":443") { &mut https } else { &mut http };
            if let Some(prev) = slot.as_ref() {
                self.lose(format!("{here}.listen {l:?}: markco has one HTTP and one HTTPS listener; {prev} is used"));
            } else {
                *slot = Some(addr);
            }
        }
        if list.is_empty() {
            self.note(format!("{here} has no `listen`; markco listens on 0.0.0.0:80 and 0.0.0.0:443 as Caddy would"));
            return ("0.0.0.0:80".into(), Some("0.0.0.0:443".into()));
        }
        let http = match (http, &https) {
            (Some(h), _) => h,
            (None, Some(s)) => {
                // Caddy also listens on :80 for ACME challenges and redirects when it serves :443.
                let h = format!("{}:80", s.rsplit_once(':').map(|(h, _)| h).unwrap_or("0.0.0.0"));
                self.note(format!("{here} listens on 443 only; markco also needs an HTTP listener ({h}) for ACME challenges and redirects"));
                h
            }
            (None, None) => "0.0.0.0:80".into(),
        };
        (http, https)
    }

    fn unique_name(&mut self, base: &str) -> String {
        let n = self.names.entry(base.to_string()).or_insert(0);
        *n += 1;
        if *n == 1 {
            base.to_string()
        } else {
            format!("{base}-{n}")
        }
    }

    /// Flattens a route list. `outer` is what enclosing routes matched; `ctx` what enclosing
    /// handlers set up; `parent` names routes that have no `@id`.
    fn routes(
        &mut self,
        here: &str,
        routes: &[Value],
        outer: &Matcher,
        ctx: &HandlerCtx,
        parent: Option<&str>,
        seed: &mut usize,
    ) {
        // A route with only `vars`/`rewrite` handlers and no matcher sets things up for the
        // routes after it (what `caddy adapt` makes of `root * /dir` in a Caddyfile).
        let mut ctx = ctx.clone();
        for (i, r) in routes.iter().enumerate() {
            let at = format!("{here}[{i}]");
            let Some(r) = r.as_object() else {
                self.lose(format!("{at}: a route must be an object"));
                continue;
            };
            let id = r.get("@id").and_then(Value::as_str).map(str::to_string);
            let label = match &id {
                Some(id) => format!("{at} (@id {id:?})"),
                None => at.clone(),
            };
            for key in r.keys() {
                if !matches!(key.as_str(), "@id" | "match" | "handle" | "terminal" | "group") {
                    self.lose(format!("{label}: `{key}` is not translated"));
                }
            }
            let sets = match self.matchers(&label, r.get("match"), outer) {
                Some(s) => s,
                None => continue,
            };
            let handlers = r.get("handle").and_then(Value::as_array).cloned().unwrap_or_default();
            let base = id.clone().unwrap_or_else(|| match parent {
                Some(p) => format!("{p}-{}", i + 1),
                None => {
                    *seed += 1;
                    format!("route-{}", *seed)
                }
            });
            self.handlers(&label, &base, &sets, &handlers, &mut ctx, r.get("match").is_none());
        }
    }

    /// The route's matcher sets (OR), each narrowed by `outer`. `None` when not translatable.
    fn matchers(&mut self, label: &str, m: Option<&Value>, outer: &Matcher) -> Option<Vec<Matcher>> {
        let Some(m) = m else {
            return Some(vec![outer.clone()]);
        };
        let Some(sets) = m.as_array() else {
            self.lose(format!("{label}: `match` must be a list of matcher sets; the route is left out"));
            return None;
        };
        let mut out: Vec<Matcher> = Vec::new();
        for set in sets {
            let Some(set) = set.as_object() else {
                self.lose(format!("{label}: a matcher set is not an object; the route is left out"));
                return None;
            };
            let mut mm = Matcher::default();
            for (k, v) in set {
                let list: Option<Vec<String>> =
                    v.as_array().map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect());
                match (k.as_str(), list) {
                    ("host", Some(hosts)) => {
                        if let Some(h) = hosts.iter().find(|h| h.contains('{')) {
                            self.lose(format!("{label}: host {h:?} is a placeholder; the route is left out"));
                            return None;
                        }
                        mm.hosts = Some(hosts.iter().map(|h| h.to_ascii_lowercase()).collect());
                    }
                    ("path", Some(paths)) => {
                        for p in &paths {
                            let star = p.find('*');
                            if !p.starts_with('/') || star.is_some_and(|s| s != p.len() - 1) || p.contains('{') {
                                self.lose(format!(
                                    "{label}: path matcher {p:?} is not a prefix or an exact path (markco matches \"/x\", \"/x/*\" and \"/x*\" only); the route is left out"
                                ));
                                return None;
                            }
                        }
                        mm.paths = Some(paths);
                    }
                    (other, _) => {
                        self.lose(format!(
                            "{label}: the `{other}` matcher is not supported (markco matches on host and path only); the route is left out, so its requests go to the next matching route"
                        ));
                        return None;
                    }
                }
            }
            // Narrow by what the enclosing route matched.
            if mm.hosts.is_none() {
                mm.hosts = outer.hosts.clone();
            } else if let (Some(inner), Some(o)) = (&mm.hosts, &outer.hosts) {
                let both: Vec<String> = inner.iter().filter(|h| o.contains(h)).cloned().collect();
                mm.hosts = Some(both);
            }
            match (&mm.paths, &outer.paths) {
                (None, o) => mm.paths = o.clone(),
                (Some(_), None) => {}
                (Some(inner), Some(o)) if inner.iter().all(|p| o.iter().any(|q| covers(q, p))) => {}
                (Some(_), Some(_)) => {
                    self.lose(format!(
                        "{label}: path matchers inside a subroute whose route also matches paths cannot be combined; the route is left out"
                    ));
                    return None;
                }
            }
            // Sets that differ only in paths become one markco route.
            match out.iter_mut().find(|o| o.hosts == mm.hosts) {
                Some(o) => match (&mut o.paths, mm.paths) {
                    (Some(a), Some(b)) => a.extend(b),
                    (a, _) => *a = None,
                },
                None => out.push(mm),
            }
        }
        if out.is_empty() {
            out.push(outer.clone());
        }
        Some(out)
    }

    fn handlers(
        &mut self,
        label: &str,
        name: &str,
        sets: &[Matcher],
        handlers: &[Value],
        ctx: &mut HandlerCtx,
        unconditional: bool,
    ) {
        let mut local = ctx.clone();
        for (j, h) in handlers.iter().enumerate() {
            let Some(h) = h.as_object() else {
                self.lose(format!("{label}: handler {j} is not an object; the route is left out"));
                return;
            };
            let kind = h.get("handler").and_then(Value::as_str).unwrap_or("");
            let last = j + 1 == handlers.len();
            let action = match kind {
                "vars" => {
                    for (k, v) in h {
                        match (k.as_str(), v.as_str()) {
                            ("handler", _) => {}
                            ("root", Some(root)) => local.root = Some(root.to_string()),
                            _ => {
                                self.lose(format!("{label}: vars `{k}` is not translated; the route is left out"));
                                return;
                            }
                        }
                    }
                    None
                }
                "rewrite" => {
                    for (k, v) in h {
                        match (k.as_str(), v.as_str()) {
                            ("handler", _) => {}
                            ("strip_path_prefix", Some(p)) => {
                                local.strip_prefix = Some(p.trim_end_matches('/').to_string())
                            }
                            _ => {
                                self.lose(format!(
                                    "{label}: rewrite `{k}` is not translated (markco can strip a path prefix only); the route is left out"
                                ));
                                return;
                            }
                        }
                    }
                    None
                }
                "reverse_proxy" => Some(self.reverse_proxy(label, h, &local)),
                "file_server" => Some(self.file_server(label, h, &local)),
                "static_response" => Some(self.static_response(label, h)),
                "subroute" => {
                    let inner = h.get("routes").and_then(Value::as_array).cloned().unwrap_or_default();
                    for s in sets {
                        self.routes(&format!("{label}.handle[{j}].routes"), &inner, s, &local, Some(name), &mut 0);
                    }
                    if !last {
                        self.note(format!("{label}: handlers after a subroute are not translated"));
                    }
                    return;
                }
                "" => {
                    self.lose(format!("{label}: handler {j} has no `handler` name; the route is left out"));
                    return;
                }
                other => {
                    self.lose(format!(
                        "{label}: handler {other:?} is not supported by markco; the route is left out, so its paths ({}) go to the next matching route. Write it by hand (actions: proxy, static, redirect, respond)",
                        describe_paths(sets)
                    ));
                    return;
                }
            };
            let Some(action) = action else { continue };
            let Some(mut route) = action else { return };
            if !last {
                self.note(format!("{label}: handlers after {kind:?} never run in Caddy either; ignored"));
            }
            for (k, s) in sets.iter().enumerate() {
                route.patterns = s.paths.clone().unwrap_or_else(|| vec!["/*".to_string()]);
                route.name =
                    if k == 0 { self.unique_name(name) } else { self.unique_name(&format!("{name}-{}", k + 1)) };
                self.flat.push(Flat { hosts: s.hosts.clone(), route: route.clone() });
            }
            return;
        }
        // Only set-up handlers: they apply to the routes that follow, when unconditional.
        if unconditional {
            *ctx = local;
        } else if !handlers.is_empty() {
            self.lose(format!("{label}: a matched route with only vars/rewrite handlers is not translated"));
        }
    }

    fn new_route(&self) -> OutRoute {
        OutRoute {
            name: String::new(),
            patterns: Vec::new(),
            proxy: None,
            static_root: None,
            index: None,
            redirect: None,
            respond: None,
            status: None,
            strip_prefix: None,
        }
    }

    fn reverse_proxy(&mut self, label: &str, h: &Map<String, Value>, ctx: &HandlerCtx) -> Option<OutRoute> {
        for (k, v) in h {
            match k.as_str() {
                "handler" | "upstreams" => {}
                "flush_interval" => {} // markco streams every response as it comes
                "transport" => {
                    let t = v.as_object();
                    let plain = t.is_some_and(|t| {
                        t.get("protocol").and_then(Value::as_str) == Some("http")
                            && t.keys().all(|k| matches!(k.as_str(), "protocol" | "versions"))
                    });
                    if !plain {
                        self.lose(format!("{label}: reverse_proxy transport {v} is not translated (markco speaks plain HTTP/1.1 to upstreams)"));
                    }
                }
                other => {
                    self.lose(format!("{label}: reverse_proxy `{other}` is not translated"));
                }
            }
        }
        let upstreams = h.get("upstreams").and_then(Value::as_array).cloned().unwrap_or_default();
        let dials: Vec<&str> = upstreams.iter().filter_map(|u| u.get("dial").and_then(Value::as_str)).collect();
        let Some(first) = dials.first() else {
            self.lose(format!("{label}: reverse_proxy has no upstream with a `dial`; the route is left out"));
            return None;
        };
        if dials.len() > 1 {
            self.lose(format!(
                "{label}: reverse_proxy has {} upstreams; markco proxies to one, {first:?} is used",
                dials.len()
            ));
        }
        let Some(addr) = socket_addr(first, "127.0.0.1").or_else(|| {
            // A host name with a port ("api.internal:3000") is resolved by markco at load.
            let (h, p) = first.rsplit_once(':')?;
            (p.parse::<u16>().is_ok() && !h.is_empty() && !h.contains(['{', '/'])).then(|| first.to_string())
        }) else {
            self.lose(format!("{label}: upstream {first:?} is not host:port (unix sockets and placeholders are not supported); the route is left out"));
            return None;
        };
        let mut r = self.new_route();
        r.proxy = Some(addr);
        r.strip_prefix = ctx.strip_prefix.clone();
        Some(r)
    }

    fn file_server(&mut self, label: &str, h: &Map<String, Value>, ctx: &HandlerCtx) -> Option<OutRoute> {
        let mut r = self.new_route();
        for (k, v) in h {
            match k.as_str() {
                "handler" | "root" => {}
                "hide" => self.note(format!(
                    "{label}: file_server `hide` is not translated (markco serves only what is under the root)"
                )),
                "index_names" => {
                    r.index = v.as_array().map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect());
                }
                other => self.lose(format!("{label}: file_server `{other}` is not translated")),
            }
        }
        let root = h.get("root").and_then(Value::as_str).map(str::to_string).or_else(|| ctx.root.clone());
        let Some(root) = root else {
            self.lose(format!("{label}: file_server without a root serves Caddy's working directory; give the route a `static` root by hand"));
            return None;
        };
        if root.contains('{') {
            self.lose(format!("{label}: file_server root {root:?} is a placeholder; the route is left out"));
            return None;
        }
        r.static_root = Some(root);
        r.strip_prefix = ctx.strip_prefix.clone();
        Some(r)
    }

    fn static_response(&mut self, label: &str, h: &Map<String, Value>) -> Option<OutRoute> {
        let status = match h.get("status_code") {
            None => 200,
            Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()).unwrap_or(0),
            Some(Value::String(s)) => s.parse().unwrap_or(0),
            Some(_) => 0,
        };
        if !(200..=599).contains(&status) {
            self.lose(format!("{label}: static_response status {:?} is not translated", h.get("status_code")));
            return None;
        }
        let mut r = self.new_route();
        let location = h
            .get("headers")
            .and_then(|hd| hd.get("Location"))
            .and_then(Value::as_array)
            .and_then(|l| l.first())
            .and_then(Value::as_str);
        for k in h.keys() {
            match k.as_str() {
                "handler" | "status_code" | "body" => {}
                "headers" if location.is_some() && h["headers"].as_object().is_some_and(|m| m.len() == 1) => {}
                other => {
                    self.lose(format!("{label}: static_response `{other}` is not translated"));
                }
            }
        }
        if let Some(loc) = location {
            if !matches!(status, 301 | 302 | 303 | 307 | 308) {
                self.lose(format!("{label}: a Location header with status {status} is not translated"));
                return None;
            }
            let to = loc.replace("{http.request.uri}", "{uri}").replace("{http.request.uri.path}", "{path}");
            if to.replace("{uri}", "").replace("{path}", "").contains('{') {
                self.lose(format!("{label}: redirect target {loc:?} has placeholders markco does not know ({{http.request.uri}} and {{http.request.uri.path}} are translated)"));
                return None;
            }
            r.redirect = Some(to);
        } else {
            r.respond = Some(h.get("body").and_then(Value::as_str).unwrap_or("").to_string());
        }
        r.status = (status != if r.redirect.is_some() { 308 } else { 200 }).then_some(status);
        Some(r)
    }

    /// Puts each route in the sites of its hosts. Hosts with the same route list share a site;
    /// routes without a host matcher apply to every site and to a `*` site.
    fn place_in_sites(&mut self) -> Vec<OutSite> {
        let mut hosts: Vec<String> = Vec::new();
        for f in &self.flat {
            for h in f.hosts.iter().flatten() {
                if !hosts.contains(h) {
                    hosts.push(h.clone());
                }
            }
        }
        let applies = |f: &Flat, host: &str| f.hosts.as_ref().is_none_or(|hs| hs.iter().any(|h| h == host));
        let mut groups: Vec<(Vec<String>, Vec<usize>)> = Vec::new();
        for h in &hosts {
            let list: Vec<usize> = (0..self.flat.len()).filter(|&i| applies(&self.flat[i], h)).collect();
            match groups.iter_mut().find(|(_, l)| *l == list) {
                Some((hs, _)) => hs.push(h.clone()),
                None => groups.push((vec![h.clone()], list)),
            }
        }
        let anywhere: Vec<usize> = (0..self.flat.len()).filter(|&i| self.flat[i].hosts.is_none()).collect();
        if !anywhere.is_empty() {
            groups.push((vec!["*".to_string()], anywhere));
            self.note("routes without a host matcher are copied into every site and into a `*` site (any other host)");
        }
        // A route placed in several sites needs a unique name in each after the first.
        let mut used = vec![false; self.flat.len()];
        groups
            .into_iter()
            .map(|(hosts, list)| OutSite {
                routes: list
                    .into_iter()
                    .map(|i| {
                        let mut r = self.flat[i].route.clone();
                        if std::mem::replace(&mut used[i], true) {
                            r.name = format!("{}@{}", r.name, hosts[0]);
                        }
                        r
                    })
                    .collect(),
                hosts,
            })
            .collect()
    }
}

/// Does Caddy path pattern `outer` match everything `inner` does?
fn covers(outer: &str, inner: &str) -> bool {
    match outer.strip_suffix('*') {
        Some(prefix) => inner.starts_with(prefix),
        None => outer == inner,
    }
}

fn describe_paths(sets: &[Matcher]) -> String {
    let paths: Vec<String> = sets.iter().flat_map(|s| s.paths.clone().unwrap_or_else(|| vec!["/*".into()])).collect();
    paths.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(socket_addr("localhost:3000", "127.0.0.1").as_deref(), Some("127.0.0.1:3000"));
        assert_eq!(socket_addr(":443", "0.0.0.0").as_deref(), Some("0.0.0.0:443"));
        assert_eq!(socket_addr("[::1]:80", "0.0.0.0").as_deref(), Some("[::1]:80"));
        assert_eq!(socket_addr("unix//run/x.sock", "0.0.0.0"), None);
    }

    #[test]
    fn caddyfile_is_refused_with_the_way_out() {
        let e = import("markco.dev {\n  reverse_proxy localhost:3000\n}\n").err().map(|e| e.0).unwrap_or_default();
        assert!(e.contains("caddy adapt"), "{e}");
    }

    #[test]
    fn redirects_responses_and_stripped_prefixes() {
        let src = r#"{"apps":{"http":{"servers":{"srv0":{"listen":[":80"],"routes":[
          {"@id":"old","match":[{"host":["a.test"],"path":["/old/*"]}],"handle":[{"handler":"static_response",
             "status_code":301,"headers":{"Location":["https://a.test{http.request.uri}"]}}]},
          {"@id":"ping","match":[{"host":["a.test"],"path":["/ping"]}],"handle":[{"handler":"static_response",
             "status_code":"204","body":""}]},
          {"@id":"legacy","match":[{"host":["a.test"],"path":["/legacy/*"]}],"handle":[
             {"handler":"rewrite","strip_path_prefix":"/legacy"},
             {"handler":"reverse_proxy","upstreams":[{"dial":":4000"}]}]},
          {"@id":"two","match":[{"host":["a.test"],"path":["/two"]}],"handle":[{"handler":"reverse_proxy",
             "upstreams":[{"dial":"localhost:1"},{"dial":"localhost:2"}]}]}
        ]}}}}}"#;
        let im = import(src).map_err(|e| e.0).expect("imports");
        let v: toml::Value = toml::from_str(&im.toml).expect("TOML");
        let r = &v["site"][0]["route"];
        assert_eq!(r[0]["redirect"].as_str(), Some("https://a.test{uri}"));
        assert_eq!(r[0]["status"].as_integer(), Some(301));
        assert_eq!(r[1]["respond"].as_str(), Some(""));
        assert_eq!(r[1]["status"].as_integer(), Some(204));
        assert_eq!(r[2]["proxy"].as_str(), Some("127.0.0.1:4000"));
        assert_eq!(r[2]["strip_prefix"].as_str(), Some("/legacy"));
        // Two upstreams: the first is used, and that is reported as not translated.
        assert_eq!(r[3]["proxy"].as_str(), Some("127.0.0.1:1"));
        assert_eq!(im.untranslated.len(), 1, "{:?}", im.untranslated);
        assert!(im.untranslated[0].contains("2 upstreams"), "{:?}", im.untranslated);
        assert_eq!(v["server"]["http"].as_str(), Some("0.0.0.0:80"));
        assert!(v["server"].get("https").is_none());
    }

    #[test]
    fn adapted_caddyfile_subroutes_flatten() {
        // The shape `caddy adapt` gives a site with `handle` blocks and `root * dir` + file_server.
        let src = r#"{"apps":{"http":{"servers":{"srv0":{"listen":[":443"],"routes":[
          {"match":[{"host":["a.test"]}],"handle":[{"handler":"subroute","routes":[
            {"group":"g","match":[{"path":["/static/*"]}],"handle":[{"handler":"subroute","routes":[
               {"handle":[{"handler":"vars","root":"/srv/www"}]},
               {"handle":[{"handler":"file_server","hide":["./Caddyfile"]}]}]}]},
            {"group":"g","handle":[{"handler":"subroute","routes":[
               {"handle":[{"handler":"reverse_proxy","upstreams":[{"dial":"localhost:3000"}]}]}]}]}
          ]}],"terminal":true}]}}}}}"#;
        let im = import(src).map_err(|e| e.0).expect("imports");
        assert!(im.untranslated.is_empty(), "{:?}", im.untranslated);
        let v: toml::Value = toml::from_str(&im.toml).expect("TOML");
        let routes = v["site"][0]["route"].as_array().cloned().unwrap_or_default();
        assert_eq!(routes.len(), 2, "{}", im.toml);
        assert_eq!(routes[0]["static"].as_str(), Some("/srv/www"));
        assert_eq!(routes[0]["match"][0].as_str(), Some("/static/*"));
        assert_eq!(routes[1]["proxy"].as_str(), Some("127.0.0.1:3000"));
        assert_eq!(routes[1]["match"][0].as_str(), Some("/*"));
        assert_eq!(v["server"]["https"].as_str(), Some("0.0.0.0:443"));
        assert_eq!(v["server"]["http"].as_str(), Some("0.0.0.0:80"));
    }
}
