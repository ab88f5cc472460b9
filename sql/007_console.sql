-- The console's dashboard lists a USER's latest proxied requests: without this index that
-- query walks every user's records backwards from now.
CREATE INDEX usage_records_user_idx ON usage_records (user_id, at);
