-- Software updates: the OTA keys a tenant trusts, signed artifacts (the bytes live in the
-- object store), and campaign records (their view as JSON).
CREATE TABLE IF NOT EXISTS ota_keys (
    tenant TEXT NOT NULL,
    public_key TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, public_key)
);
CREATE TABLE IF NOT EXISTS ota_artifacts (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    version TEXT NOT NULL,
    device_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    signature TEXT NOT NULL,
    public_key TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS ota_campaigns (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    view TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
