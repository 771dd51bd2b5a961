-- The last message of the build's worker that was applied (the master-worker protocol numbers
-- each build's messages), so a message sent again after a reconnect or a master restart is
-- applied once.
ALTER TABLE builds ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;
CREATE INDEX builds_incomplete ON builds(complete_at, master_id);
