-- markco's own routing table: one row per user's workspace (editor + runtime addresses). It
-- replaces today's in-memory `activeEditors` map (reference/today.md section 3a), so a runtime
-- moved by update-port stays moved across restarts.
--
-- user_id is deliberately not a foreign key to users: the auth service owns users and may delete
-- them on its own schedule; markco reconciles its workspaces instead.
-- The unique address constraints make port allocation collision-safe across gateways.
-- runtime_id points at the `runtimes` row markco keeps up to date for this workspace's runtime, so
-- `migrations` rows (runtime moves) can reference it.

CREATE TABLE IF NOT EXISTS markco_workspaces (
  user_id TEXT PRIMARY KEY,
  editor_host TEXT NOT NULL,
  editor_port INTEGER NOT NULL CHECK (editor_port BETWEEN 0 AND 65535),
  runtime_host TEXT NOT NULL,
  runtime_port INTEGER NOT NULL CHECK (runtime_port BETWEEN 0 AND 65535),
  state TEXT NOT NULL,
  editor_container TEXT,
  runtime_container TEXT,
  runtime_id UUID REFERENCES runtimes(id) ON DELETE SET NULL,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  CONSTRAINT markco_workspaces_editor_addr_key UNIQUE (editor_host, editor_port),
  CONSTRAINT markco_workspaces_runtime_addr_key UNIQUE (runtime_host, runtime_port)
);

CREATE INDEX IF NOT EXISTS markco_workspaces_runtime_id_idx ON markco_workspaces(runtime_id);
