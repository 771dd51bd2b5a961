-- Each builder's oldest queued request, read on every dispatch pass: walking this index from
-- the oldest passes only the claimed requests (builds running now) before the first queued
-- one, however long the queue. The old (builder, complete, priority, submitted_at) index
-- served nothing buildrequests_start_order does not.
DROP INDEX buildrequests_queue;
CREATE INDEX buildrequests_age ON buildrequests(builder_id, complete, submitted_at);
