-- What reporters owe the outside world. A build's rows are inserted in the transaction that
-- starts or ends it (one per reporter that wants the event), a buildset's by the reporter task
-- as it follows the `events` feed, so a master killed at any moment loses no notification.
-- The reporter task drains the queue: a delivery is claimed by moving `next_attempt_at`
-- forward (a compare-and-set, so two masters never send it both), then marked `delivered`,
-- or rescheduled with exponential backoff, or `failed` after its last attempt. `skipped`: the
-- reporter's mode did not want it after all (a failure that is not new); `superseded`: a
-- commit status overtaken by the build's final status.
CREATE TABLE reporter_deliveries (
    id INTEGER PRIMARY KEY,
    reporter TEXT NOT NULL,
    event TEXT NOT NULL,
    subject_id INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE INDEX reporter_deliveries_due ON reporter_deliveries (state, next_attempt_at);
CREATE INDEX reporter_deliveries_subject ON reporter_deliveries (reporter, subject_id);

-- How far the reporter task has read the `events` feed (buildset events).
CREATE TABLE reporter_marks (
    name TEXT PRIMARY KEY,
    event_id INTEGER NOT NULL
);
