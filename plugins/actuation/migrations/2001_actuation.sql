-- Device types and commands. Portable SQL for SQLite and PostgreSQL; JSON as text.
-- Migrations of this plugin are numbered from 2001 (they may share a database).
CREATE TABLE IF NOT EXISTS device_types (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    definition TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
);

CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    name TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT,
    sender TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_open ON commands (status, device_id);
