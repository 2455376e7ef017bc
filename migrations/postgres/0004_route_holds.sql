-- Routes an operator holds off (`POST /api/admin/routes/<name>/disable`). Only the operator's
-- `admin` hold is stored: health holds come and go with their checks. A restart applies these
-- before any listener accepts traffic.

CREATE TABLE IF NOT EXISTS markco_route_holds (
  route TEXT NOT NULL,
  holder TEXT NOT NULL,
  since TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (route, holder)
);
