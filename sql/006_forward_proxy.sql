-- Forward-proxy mode: the wallet's certificate authority (one active per installation; its
-- private key sealed by the vault like a stored API key), and the mode of each usage record.

CREATE TABLE certificate_authorities (
    id         uuid PRIMARY KEY,
    cert_pem   text NOT NULL,
    kid        text NOT NULL,
    sealed     bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz
);
-- At most one active CA.
CREATE UNIQUE INDEX certificate_authorities_active ON certificate_authorities ((true))
    WHERE retired_at IS NULL;

ALTER TABLE usage_records ADD COLUMN mode text NOT NULL DEFAULT 'reverse';

-- The Google Maps SDK calls these hosts directly for some APIs.
UPDATE services SET hosts = ARRAY['maps.googleapis.com', 'roads.googleapis.com',
    'www.googleapis.com', 'addressvalidation.googleapis.com']
WHERE slug = 'googlemaps' AND builtin AND hosts = ARRAY['maps.googleapis.com'];
