-- The device registry. Portable SQL (TEXT, BIGINT, DOUBLE PRECISION) for SQLite and
-- PostgreSQL; lists and objects are JSON text. Migrations of this plugin are numbered
-- from 1001 so that they share a PostgreSQL database with other plugins'.
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    device_type TEXT NOT NULL,
    owner TEXT NOT NULL,
    level TEXT NOT NULL,
    parent TEXT,
    attributes TEXT NOT NULL,
    tags TEXT NOT NULL,
    device_groups TEXT NOT NULL,
    firmware TEXT NOT NULL,
    latitude DOUBLE PRECISION,
    longitude DOUBLE PRECISION,
    status TEXT NOT NULL,
    last_seen BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_tenant ON devices (tenant);

-- Self-registration: a device that presents one of these secrets lands in `pending`.
CREATE TABLE IF NOT EXISTS provisioning_secrets (
    secret_hash TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    device_type TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
