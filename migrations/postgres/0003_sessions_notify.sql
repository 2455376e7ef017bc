-- Tell every gateway at once when a session stops being what it was (logout, account deletion
-- through ON DELETE CASCADE, expiry change), so their session caches drop it without waiting for
-- the TTL. Gateways LISTEN on channel `markco_sessions`; the payload is the old token.
-- Notifications are delivered at commit; TRUNCATE fires no row trigger (the cache TTL covers it).

CREATE OR REPLACE FUNCTION markco_notify_session_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('markco_sessions', OLD.token);
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS markco_sessions_notify ON sessions;
CREATE TRIGGER markco_sessions_notify
  AFTER DELETE OR UPDATE ON sessions
  FOR EACH ROW EXECUTE FUNCTION markco_notify_session_change();
