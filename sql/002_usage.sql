-- Usage accounting: one record per request for a service, written in batches by the gateway,
-- and an hourly rollup kept in the same transaction, so analytics never scan the records.

CREATE TABLE usage_records (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL,
    service    text NOT NULL,
    key_id     uuid,             -- null: refused before a key was chosen
    token_id   uuid,             -- null: no valid token
    user_id    uuid,
    status     integer NOT NULL,
    latency_ms real NOT NULL,
    bytes_in   bigint NOT NULL DEFAULT 0,
    bytes_out  bigint NOT NULL DEFAULT 0,
    cost       numeric(20, 10) NOT NULL DEFAULT 0,
    fallbacks  integer NOT NULL DEFAULT 0
);
CREATE INDEX usage_records_at_idx ON usage_records (at);
CREATE INDEX usage_records_key_idx ON usage_records (key_id, at);

-- The nil uuid stands for "none" in the rollup's key, which cannot hold nulls.
CREATE TABLE usage_hourly (
    hour      timestamptz NOT NULL,
    service   text NOT NULL,
    key_id    uuid NOT NULL,
    user_id   uuid NOT NULL,
    requests  bigint NOT NULL DEFAULT 0,
    errors    bigint NOT NULL DEFAULT 0,
    fallbacks bigint NOT NULL DEFAULT 0,
    cost      numeric(20, 10) NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, service, key_id, user_id)
);
