-- The node that runs a workspace's containers (migrations/postgres/0005_cluster.sql). A SQLite
-- gateway is always alone, so this stays NULL; the column keeps both backends' rows alike.
ALTER TABLE markco_workspaces ADD COLUMN node TEXT;
