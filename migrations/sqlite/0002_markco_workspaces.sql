-- markco's routing table, as in migrations/postgres/0002_markco_workspaces.sql: one row per user's
-- workspace; user_id is not a foreign key to users; unique addresses make port allocation
-- collision-safe; runtime_id is the `runtimes` row kept up to date for this workspace's runtime.

CREATE TABLE IF NOT EXISTS markco_workspaces (
  user_id TEXT PRIMARY KEY NOT NULL,
  editor_host TEXT NOT NULL,
  editor_port INTEGER NOT NULL CHECK (editor_port BETWEEN 0 AND 65535),
  runtime_host TEXT NOT NULL,
  runtime_port INTEGER NOT NULL CHECK (runtime_port BETWEEN 0 AND 65535),
  state TEXT NOT NULL,
  editor_container TEXT,
  runtime_container TEXT,
  runtime_id TEXT REFERENCES runtimes(id) ON DELETE SET NULL,
  updated_at INTEGER NOT NULL,
  CONSTRAINT markco_workspaces_editor_addr_key UNIQUE (editor_host, editor_port),
  CONSTRAINT markco_workspaces_runtime_addr_key UNIQUE (runtime_host, runtime_port)
);

CREATE INDEX IF NOT EXISTS markco_workspaces_runtime_id_idx ON markco_workspaces(runtime_id);
