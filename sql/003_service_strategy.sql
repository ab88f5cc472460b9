-- Per-service key selection strategy (how keys of the same tier and priority share the
-- traffic) and cost model (what a request costs; validated by gateway.costs).

ALTER TABLE services
    ADD COLUMN strategy text NOT NULL DEFAULT 'priority'
        CHECK (strategy IN ('priority', 'round_robin', 'least_used', 'weighted')),
    ADD COLUMN cost_model jsonb;
