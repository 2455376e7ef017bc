-- Certificates shared by the gateways of a [cluster]: one ACME account per CA directory, one
-- certificate per site name, and the challenges of the orders in flight, so whichever gateway the
-- CA's validation request reaches can answer it.
--
-- Secrets (the account's credentials, the certificate's private key) are sealed by the gateways
-- with a key derived from the `[cluster] secret_file` every gateway has (XChaCha20-Poly1305, a
-- random nonce per value, bound to the row it belongs to); the database never sees them in clear.
--
-- Orders are serialised per name by a session advisory lock, pg_try_advisory_lock(1835754275,
-- hashtext('order <directory> <name>')), held by the ordering gateway on a dedicated connection for
-- the order's duration. A change to markco_certificates is announced with NOTIFY markco_certs
-- (payload: the site name); a TLS-ALPN-01 challenge put up or withdrawn with `* challenges`.
-- The fleet's account is created once, under the same kind of lock on 'account <directory>'.

CREATE TABLE IF NOT EXISTS markco_acme_accounts (
  directory TEXT PRIMARY KEY,
  -- Sealed JSON of instant-acme's AccountCredentials.
  credentials BYTEA NOT NULL,
  node TEXT,
  created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS markco_certificates (
  directory TEXT NOT NULL,
  name TEXT NOT NULL,
  -- The certificate chain (public), PEM.
  chain_pem TEXT NOT NULL,
  -- The private key, PEM, sealed.
  key_sealed BYTEA NOT NULL,
  not_after TIMESTAMPTZ NOT NULL,
  -- The gateway that obtained it.
  node TEXT,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (directory, name)
);

CREATE TABLE IF NOT EXISTS markco_acme_challenges (
  token TEXT PRIMARY KEY,
  kind TEXT NOT NULL CHECK (kind IN ('http-01', 'tls-alpn-01')),
  host TEXT NOT NULL,
  -- The key authorization (public by design: it is what the CA fetches).
  answer TEXT NOT NULL,
  node TEXT,
  expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS markco_acme_challenges_expires ON markco_acme_challenges (expires_at);
