-- Adopt the production `markco` database as the auth service and compute-manager left it
-- (reference/today.md section 4), or create the same tables in a fresh database.
--
-- Every statement is idempotent and none drops, rewrites or updates existing rows:
--   * CREATE TABLE IF NOT EXISTS with today's exact shapes (a fresh database gets them too; an
--     existing table is left exactly as it is, whatever its shape);
--   * today's index names, so the existing indexes are recognised and not built twice;
--   * ALTER TABLE ... ADD COLUMN IF NOT EXISTS for each column markco reads or writes: no-ops on
--     today's schema; on an older one they add nullable columns with constant defaults only
--     (no volatile default, so no table rewrite);
--   * a final check that the columns markco compares or joins on have types its queries work with;
--     otherwise the migration fails (and rolls back) with the column to fix.
-- gen_random_uuid() is built into PostgreSQL 13+; pgcrypto is not needed.

-- auth-service (auth-service/src/schema.sql)

CREATE TABLE IF NOT EXISTS users (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  email TEXT UNIQUE NOT NULL,
  username TEXT UNIQUE,
  name TEXT,
  avatar_url TEXT,
  github_id TEXT UNIQUE,
  google_id TEXT UNIQUE,
  plan TEXT DEFAULT 'free',
  created_at TIMESTAMPTZ DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS sessions (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id UUID REFERENCES users(id) ON DELETE CASCADE,
  token TEXT UNIQUE NOT NULL,
  expires_at TIMESTAMPTZ NOT NULL,
  created_at TIMESTAMPTZ DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS invites (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  project_path TEXT NOT NULL,
  token TEXT UNIQUE NOT NULL,
  role TEXT NOT NULL DEFAULT 'editor',
  expires_at TIMESTAMPTZ,
  created_by UUID REFERENCES users(id),
  created_at TIMESTAMPTZ DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_sessions_token ON sessions(token);
CREATE INDEX IF NOT EXISTS idx_sessions_user_id ON sessions(user_id);
CREATE INDEX IF NOT EXISTS idx_sessions_expires_at ON sessions(expires_at);
CREATE INDEX IF NOT EXISTS idx_invites_token ON invites(token);
CREATE UNIQUE INDEX IF NOT EXISTS idx_users_username_unique ON users(username) WHERE username IS NOT NULL;

-- compute-manager (compute-manager/src/schema.sql @9097913)

CREATE TABLE IF NOT EXISTS runtimes (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id UUID NOT NULL,
  container_name TEXT NOT NULL,
  ec2_instance_id TEXT,
  instance_type TEXT NOT NULL DEFAULT 'local',
  host TEXT NOT NULL DEFAULT 'localhost',
  port INTEGER,
  state TEXT DEFAULT 'running',
  memory_limit BIGINT DEFAULT 268435456,
  memory_used BIGINT DEFAULT 0,
  cpu_limit REAL DEFAULT 0.5,
  created_at TIMESTAMPTZ DEFAULT NOW(),
  updated_at TIMESTAMPTZ DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS snapshots (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id UUID NOT NULL,
  runtime_id UUID REFERENCES runtimes(id),
  name TEXT NOT NULL,
  path TEXT NOT NULL,
  size_bytes BIGINT,
  created_at TIMESTAMPTZ DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS migrations (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  runtime_id UUID REFERENCES runtimes(id),
  from_instance TEXT NOT NULL,
  to_instance TEXT NOT NULL,
  from_type TEXT NOT NULL,
  to_type TEXT NOT NULL,
  strategy TEXT NOT NULL DEFAULT 'criu-leave-running',
  status TEXT DEFAULT 'pending',
  checkpoint_ms INTEGER,
  transfer_ms INTEGER,
  restore_ms INTEGER,
  started_at TIMESTAMPTZ,
  completed_at TIMESTAMPTZ
);

CREATE INDEX IF NOT EXISTS idx_runtimes_user_id ON runtimes(user_id);
CREATE INDEX IF NOT EXISTS idx_runtimes_state ON runtimes(state);
CREATE INDEX IF NOT EXISTS idx_snapshots_user_id ON snapshots(user_id);
CREATE INDEX IF NOT EXISTS idx_migrations_runtime_id ON migrations(runtime_id);

-- Columns markco reads or writes. All of them exist in today's schema, so these are no-ops there.

ALTER TABLE users ADD COLUMN IF NOT EXISTS username TEXT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS plan TEXT DEFAULT 'free';
ALTER TABLE users ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ;
ALTER TABLE runtimes ADD COLUMN IF NOT EXISTS instance_type TEXT DEFAULT 'local';
ALTER TABLE runtimes ADD COLUMN IF NOT EXISTS host TEXT DEFAULT 'localhost';
ALTER TABLE runtimes ADD COLUMN IF NOT EXISTS port INTEGER;
ALTER TABLE runtimes ADD COLUMN IF NOT EXISTS state TEXT DEFAULT 'running';
ALTER TABLE runtimes ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ;
ALTER TABLE runtimes ADD COLUMN IF NOT EXISTS updated_at TIMESTAMPTZ;
ALTER TABLE migrations ADD COLUMN IF NOT EXISTS strategy TEXT DEFAULT 'criu-leave-running';
ALTER TABLE migrations ADD COLUMN IF NOT EXISTS status TEXT DEFAULT 'pending';
ALTER TABLE migrations ADD COLUMN IF NOT EXISTS checkpoint_ms INTEGER;
ALTER TABLE migrations ADD COLUMN IF NOT EXISTS transfer_ms INTEGER;
ALTER TABLE migrations ADD COLUMN IF NOT EXISTS restore_ms INTEGER;
ALTER TABLE migrations ADD COLUMN IF NOT EXISTS started_at TIMESTAMPTZ;
ALTER TABLE migrations ADD COLUMN IF NOT EXISTS completed_at TIMESTAMPTZ;

-- Types markco's queries rely on (casts to uuid, joins, foreign keys, time comparisons). Anything
-- else (e.g. varchar instead of text, bigint instead of integer) works as it is.

DO $$
DECLARE
  want RECORD;
  got TEXT;
BEGIN
  FOR want IN
    SELECT * FROM (VALUES
      ('users', 'id', 'uuid'),
      ('sessions', 'user_id', 'uuid'),
      ('sessions', 'expires_at', 'timestamp%'),
      ('runtimes', 'id', 'uuid'),
      ('runtimes', 'user_id', 'uuid'),
      ('runtimes', 'updated_at', 'timestamp%'),
      ('migrations', 'runtime_id', 'uuid'),
      ('migrations', 'started_at', 'timestamp%'),
      ('migrations', 'completed_at', 'timestamp%')
    ) AS w(table_name, column_name, type_pattern)
  LOOP
    SELECT c.data_type INTO got
      FROM information_schema.columns c
     WHERE c.table_schema = current_schema()
       AND c.table_name = want.table_name
       AND c.column_name = want.column_name;
    IF got IS NULL OR got NOT LIKE want.type_pattern THEN
      RAISE EXCEPTION 'markco cannot adopt this database: column %.% has type %, markco needs %',
        want.table_name, want.column_name, coalesce(got, '(missing)'), replace(want.type_pattern, '%', '*')
        USING HINT = 'Change the column type by hand (ALTER TABLE ... ALTER COLUMN ... TYPE ...) after checking what else uses it, then start markco again.';
    END IF;
  END LOOP;
END
$$;
