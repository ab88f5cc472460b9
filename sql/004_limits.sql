-- Client limits: a user's rate-limit tier (null: by role, `admin` for ADMIN, `free` for USER),
-- budgets per user and per token ({"amount": "10.00", "period": "monthly"}), and a token's
-- own rate limit (requests per minute) overriding its owner's tier.

ALTER TABLE users ADD COLUMN tier text CHECK (tier ~ '^[a-z][a-z0-9_-]{0,31}$');
ALTER TABLE users ADD COLUMN budget jsonb;
ALTER TABLE tokens ADD COLUMN budget jsonb;
ALTER TABLE tokens ADD COLUMN rate_limit integer CHECK (rate_limit >= 0);
