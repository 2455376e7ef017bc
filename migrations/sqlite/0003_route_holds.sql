-- Routes an operator holds off (`POST /api/admin/routes/<name>/disable`), as in
-- migrations/postgres/0004_route_holds.sql. Only the operator's `admin` hold is stored: health
-- holds come and go with their checks. A restart applies these before any listener accepts traffic.

CREATE TABLE IF NOT EXISTS markco_route_holds (
  route TEXT NOT NULL,
  holder TEXT NOT NULL,
  since INTEGER NOT NULL,
  PRIMARY KEY (route, holder)
);
