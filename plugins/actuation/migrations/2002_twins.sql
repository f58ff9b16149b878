-- Device twins: desired state (versioned) and reported state, JSON as text.
CREATE TABLE IF NOT EXISTS twins (
    device_id TEXT PRIMARY KEY,
    desired TEXT NOT NULL,
    version BIGINT NOT NULL,
    reported TEXT NOT NULL,
    reported_version BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
