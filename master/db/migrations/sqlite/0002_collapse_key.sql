-- Buildbot's collapse rule, computed once per buildset (requests::collapse_key): buildsets whose
-- requests may merge share a key; NULL never merges (a patch). Finding what a new request
-- absorbs is then one indexed query instead of comparing it with every queued request.
ALTER TABLE buildsets ADD COLUMN collapse_key TEXT;
CREATE INDEX buildsets_collapse_key ON buildsets(collapse_key);

-- The queue in start order (priority highest first, then oldest), without a sort.
CREATE INDEX buildrequests_start_order ON buildrequests(builder_id, complete, priority DESC, submitted_at, id);
