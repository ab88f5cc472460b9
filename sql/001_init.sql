-- The wallet core: users, services, keys (ciphertext only), tokens (hashes only),
-- the vault canary and the hash-chained audit log.

CREATE TABLE users (
    id                  uuid PRIMARY KEY,
    username            text NOT NULL,
    password_hash       text NOT NULL,
    role                text NOT NULL CHECK (role IN ('USER', 'ADMIN')),
    enabled             boolean NOT NULL DEFAULT true,
    password_changed_at timestamptz NOT NULL DEFAULT now(),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_username_key ON users (lower(username));

CREATE TABLE services (
    slug       text PRIMARY KEY CHECK (slug ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name       text NOT NULL,
    base_url   text NOT NULL,
    auth_type  text NOT NULL CHECK (auth_type IN ('bearer', 'basic', 'header', 'query')),
    auth_name  text,
    hosts      text[] NOT NULL DEFAULT '{}',
    builtin    boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    owner_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    service     text NOT NULL REFERENCES services (slug) ON DELETE RESTRICT,
    tier        text NOT NULL CHECK (tier IN ('free', 'paid')),
    name        text NOT NULL,
    priority    integer NOT NULL DEFAULT 0,
    enabled     boolean NOT NULL DEFAULT true,
    status      text NOT NULL DEFAULT 'active',
    metadata    jsonb NOT NULL DEFAULT '{}',
    kid         text NOT NULL,
    sealed      bytea NOT NULL,
    fingerprint bytea NOT NULL,
    masked      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX api_keys_fingerprint_key ON api_keys (fingerprint);
CREATE INDEX api_keys_service_idx ON api_keys (service, tier, priority DESC);
CREATE INDEX api_keys_owner_idx ON api_keys (owner_id);
CREATE INDEX api_keys_kid_idx ON api_keys (kid);

CREATE TABLE tokens (
    id           uuid PRIMARY KEY,
    owner_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text NOT NULL,
    services     text[] NOT NULL,
    token_hash   bytea NOT NULL,
    hint         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz
);
CREATE UNIQUE INDEX tokens_hash_key ON tokens (token_hash);
CREATE INDEX tokens_owner_idx ON tokens (owner_id);

-- One row per master key that has sealed anything: proves at startup that the configured
-- key is the right one (a wrong key cannot open its canary).
CREATE TABLE vault_canaries (
    kid        text PRIMARY KEY,
    sealed     bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE audit_log (
    seq         bigint PRIMARY KEY,
    at          timestamptz NOT NULL,
    actor_id    uuid,
    actor       text NOT NULL,
    action      text NOT NULL,
    target_type text NOT NULL,
    target_id   text,
    source      text NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}',
    prev_hash   text NOT NULL,
    hash        text NOT NULL
);
CREATE INDEX audit_log_at_idx ON audit_log (at);
