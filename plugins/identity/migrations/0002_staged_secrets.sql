-- A second client secret during a credential rotation: valid beside the current one until
-- the device confirms it has the new one (or the rotation's deadline passes).
ALTER TABLE clients ADD COLUMN next_secret_hash TEXT;
