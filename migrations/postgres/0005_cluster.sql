-- Several gateways on one PostgreSQL ([cluster]): the change log they all follow, the nodes they
-- heartbeat as, and which node runs each workspace's containers.
--
-- Every change to the shared live state is appended to markco_changes by a trigger, in the same
-- transaction as the change itself, whoever writes it (a gateway, a script, psql): nothing can
-- change the state without the log. A NOTIFY on channel `markco_changes` carries the new sequence
-- number; gateways read the log from their last applied number, so a lost NOTIFY costs a poll
-- interval, not a change.
--
-- Appenders take one transaction-scoped advisory lock before their sequence number, so numbers
-- become visible in order: a reader that sees N has seen every committed change below N, and a
-- hole below N is a rolled-back transaction (or a burnt sequence value), never a change to come.

CREATE TABLE IF NOT EXISTS markco_changes (
  seq BIGSERIAL PRIMARY KEY,
  at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
  -- The gateway that wrote it (its connections set markco.node); NULL: another writer.
  node TEXT,
  change JSONB NOT NULL
);

-- Everything up to `upto` was trimmed: a gateway that applied less rebuilds from the tables.
CREATE TABLE IF NOT EXISTS markco_changes_trimmed (
  one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
  upto BIGINT NOT NULL DEFAULT 0
);
INSERT INTO markco_changes_trimmed (one, upto) VALUES (true, 0) ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS markco_nodes (
  id TEXT PRIMARY KEY,
  advertise TEXT NOT NULL,
  -- Workspaces this node may run, by plan: {"free": 10, "pro": 4}; "*" for any plan.
  capacity JSONB NOT NULL DEFAULT '{}',
  applied_seq BIGINT NOT NULL DEFAULT 0,
  started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  heartbeat TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The node whose podman runs the workspace's containers; NULL: not a container markco runs, or
-- a single gateway. A workspace whose node stopped heartbeating is marked 'lost' (by any live
-- gateway) and placed again at its next request.
ALTER TABLE markco_workspaces ADD COLUMN IF NOT EXISTS node TEXT;
CREATE INDEX IF NOT EXISTS markco_workspaces_node_idx ON markco_workspaces(node);

-- A workspace placed on a node that has not started it yet: the node starts it when it reads the
-- change, and removes the row once the start ended (either way). Counted in the node's load.
CREATE TABLE IF NOT EXISTS markco_placements (
  user_id TEXT PRIMARY KEY,
  node TEXT NOT NULL,
  at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION markco_log_change(body jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
  s bigint;
BEGIN
  -- 0x6d61726b ('mark'): the one lock every appender takes; held until its transaction ends.
  PERFORM pg_advisory_xact_lock(1835102827);
  INSERT INTO markco_changes (node, change)
    VALUES (nullif(current_setting('markco.node', true), ''), body)
    RETURNING seq INTO s;
  PERFORM pg_notify('markco_changes', s::text);
  RETURN s;
END
$$;

CREATE OR REPLACE FUNCTION markco_workspace_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    PERFORM markco_log_change(jsonb_build_object('kind', 'workspace_deleted', 'user_id', OLD.user_id));
    RETURN NULL;
  END IF;
  -- Bookkeeping columns (runtime_id, updated_at) are not the live state.
  IF TG_OP = 'UPDATE' AND (OLD.editor_host, OLD.editor_port, OLD.runtime_host, OLD.runtime_port, OLD.state, OLD.node)
      IS NOT DISTINCT FROM (NEW.editor_host, NEW.editor_port, NEW.runtime_host, NEW.runtime_port, NEW.state, NEW.node) THEN
    RETURN NULL;
  END IF;
  PERFORM markco_log_change(jsonb_build_object(
    'kind', 'workspace', 'user_id', NEW.user_id,
    'editor_host', NEW.editor_host, 'editor_port', NEW.editor_port,
    'runtime_host', NEW.runtime_host, 'runtime_port', NEW.runtime_port,
    'state', NEW.state, 'node', NEW.node));
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS markco_workspaces_log ON markco_workspaces;
CREATE TRIGGER markco_workspaces_log
  AFTER INSERT OR UPDATE OR DELETE ON markco_workspaces
  FOR EACH ROW EXECUTE FUNCTION markco_workspace_changed();

CREATE OR REPLACE FUNCTION markco_route_hold_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    PERFORM markco_log_change(jsonb_build_object('kind', 'route_released', 'route', OLD.route, 'holder', OLD.holder));
  ELSE
    PERFORM markco_log_change(jsonb_build_object('kind', 'route_held', 'route', NEW.route, 'holder', NEW.holder,
      'since', extract(epoch FROM NEW.since)::bigint));
  END IF;
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS markco_route_holds_log ON markco_route_holds;
CREATE TRIGGER markco_route_holds_log
  AFTER INSERT OR UPDATE OR DELETE ON markco_route_holds
  FOR EACH ROW EXECUTE FUNCTION markco_route_hold_changed();

CREATE OR REPLACE FUNCTION markco_placement_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP <> 'DELETE' THEN
    PERFORM markco_log_change(jsonb_build_object('kind', 'placed', 'user_id', NEW.user_id, 'node', NEW.node));
  END IF;
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS markco_placements_log ON markco_placements;
CREATE TRIGGER markco_placements_log
  AFTER INSERT OR UPDATE ON markco_placements
  FOR EACH ROW EXECUTE FUNCTION markco_placement_changed();
