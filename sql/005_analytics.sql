-- Analytics: the filters of /analytics/overview and /analytics/usage by key and by user read
-- the hourly rollup through these (the primary key already serves time ranges and services).
-- Neither covers a column the writer's upsert changes, so its updates stay HOT.
CREATE INDEX usage_hourly_key_idx ON usage_hourly (key_id, hour);
CREATE INDEX usage_hourly_user_idx ON usage_hourly (user_id, hour);
