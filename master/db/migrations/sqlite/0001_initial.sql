-- Kiln's schema, SQLite dialect. Keep master/migrations/postgres/ in step: the same tables,
-- columns and constraints. Times are Unix milliseconds; JSON is stored as TEXT; flags are 0/1.

-- Masters sharing this database, with their heartbeat.
CREATE TABLE masters (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    active INTEGER NOT NULL DEFAULT 1,
    last_active INTEGER NOT NULL
);

-- People: authors of changes (the blamelist) and users of the farm.
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    identifier TEXT NOT NULL UNIQUE,
    email TEXT
);

-- Changes, as change sources and `kiln sendchange` report them. `source_key` de-duplicates a
-- change delivered twice (a webhook delivery id, a poller's commit).
CREATE TABLE changes (
    id INTEGER PRIMARY KEY,
    author TEXT NOT NULL,
    committer TEXT,
    comments TEXT NOT NULL DEFAULT '',
    branch TEXT,
    revision TEXT,
    revlink TEXT,
    when_at INTEGER NOT NULL,
    category TEXT,
    repository TEXT NOT NULL DEFAULT '',
    codebase TEXT NOT NULL DEFAULT '',
    project TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL,
    source_key TEXT UNIQUE,
    trusted INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL
);

CREATE TABLE change_files (
    change_id INTEGER NOT NULL REFERENCES changes(id),
    filename TEXT NOT NULL
);
CREATE INDEX change_files_change ON change_files(change_id);

CREATE TABLE change_properties (
    change_id INTEGER NOT NULL REFERENCES changes(id),
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (change_id, name)
);

CREATE TABLE change_users (
    change_id INTEGER NOT NULL REFERENCES changes(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    PRIMARY KEY (change_id, user_id)
);

-- A patch to apply on top of a source stamp's revision (try builds).
CREATE TABLE patches (
    id INTEGER PRIMARY KEY,
    level INTEGER NOT NULL DEFAULT 1,
    body BLOB NOT NULL,
    author TEXT,
    comment TEXT,
    subdir TEXT
);

CREATE TABLE sourcestamps (
    id INTEGER PRIMARY KEY,
    codebase TEXT NOT NULL DEFAULT '',
    repository TEXT NOT NULL DEFAULT '',
    branch TEXT,
    revision TEXT,
    project TEXT NOT NULL DEFAULT '',
    patch_id INTEGER REFERENCES patches(id),
    created_at INTEGER NOT NULL
);

CREATE TABLE sourcestamp_changes (
    sourcestamp_id INTEGER NOT NULL REFERENCES sourcestamps(id),
    change_id INTEGER NOT NULL REFERENCES changes(id),
    PRIMARY KEY (sourcestamp_id, change_id)
);

-- One source stamp (per codebase) built on several builders.
CREATE TABLE buildsets (
    id INTEGER PRIMARY KEY,
    scheduler TEXT,
    reason TEXT NOT NULL,
    external_id TEXT,
    submitted_at INTEGER NOT NULL,
    trusted INTEGER NOT NULL DEFAULT 1,
    parent_build_id INTEGER,
    complete INTEGER NOT NULL DEFAULT 0,
    complete_at INTEGER,
    results INTEGER,
    first_failure_at INTEGER
);
CREATE INDEX buildsets_incomplete ON buildsets(complete);
-- A scheduler's idempotency key: the same timer or change batch can never make two buildsets.
CREATE UNIQUE INDEX buildsets_external ON buildsets(scheduler, external_id);

CREATE TABLE buildset_sourcestamps (
    buildset_id INTEGER NOT NULL REFERENCES buildsets(id),
    sourcestamp_id INTEGER NOT NULL REFERENCES sourcestamps(id),
    PRIMARY KEY (buildset_id, sourcestamp_id)
);

CREATE TABLE buildset_properties (
    buildset_id INTEGER NOT NULL REFERENCES buildsets(id),
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (buildset_id, name)
);

CREATE TABLE builders (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '[]',
    active INTEGER NOT NULL DEFAULT 1
);

-- A buildset's request on one builder. A claim is a row in buildrequest_claims: its primary
-- key is the arbiter when several masters claim at once.
CREATE TABLE buildrequests (
    id INTEGER PRIMARY KEY,
    buildset_id INTEGER NOT NULL REFERENCES buildsets(id),
    builder_id INTEGER NOT NULL REFERENCES builders(id),
    priority INTEGER NOT NULL DEFAULT 0,
    submitted_at INTEGER NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    complete_at INTEGER,
    results INTEGER,
    collapsed_into INTEGER REFERENCES buildrequests(id),
    waited_for INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX buildrequests_queue ON buildrequests(builder_id, complete, priority, submitted_at);
CREATE INDEX buildrequests_buildset ON buildrequests(buildset_id);

CREATE TABLE buildrequest_claims (
    request_id INTEGER PRIMARY KEY REFERENCES buildrequests(id),
    master_id INTEGER NOT NULL REFERENCES masters(id),
    claimed_at INTEGER NOT NULL
);
CREATE INDEX buildrequest_claims_master ON buildrequest_claims(master_id);

CREATE TABLE workers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    info TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT 'offline',
    master_id INTEGER REFERENCES masters(id),
    paused INTEGER NOT NULL DEFAULT 0,
    graceful INTEGER NOT NULL DEFAULT 0,
    health TEXT NOT NULL DEFAULT 'ok',
    failure_count INTEGER NOT NULL DEFAULT 0,
    quarantine_until INTEGER,
    notes TEXT NOT NULL DEFAULT '',
    last_seen INTEGER
);

CREATE TABLE builds (
    id INTEGER PRIMARY KEY,
    builder_id INTEGER NOT NULL REFERENCES builders(id),
    number INTEGER NOT NULL,
    request_id INTEGER NOT NULL REFERENCES buildrequests(id),
    worker_id INTEGER REFERENCES workers(id),
    master_id INTEGER NOT NULL REFERENCES masters(id),
    cookie TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    complete_at INTEGER,
    state_string TEXT NOT NULL DEFAULT '',
    results INTEGER,
    UNIQUE (builder_id, number)
);
CREATE INDEX builds_request ON builds(request_id);

CREATE TABLE build_properties (
    build_id INTEGER NOT NULL REFERENCES builds(id),
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (build_id, name)
);

CREATE TABLE steps (
    id INTEGER PRIMARY KEY,
    build_id INTEGER NOT NULL REFERENCES builds(id),
    number INTEGER NOT NULL,
    name TEXT NOT NULL,
    started_at INTEGER,
    complete_at INTEGER,
    state_string TEXT NOT NULL DEFAULT '',
    results INTEGER,
    hidden INTEGER NOT NULL DEFAULT 0,
    urls TEXT NOT NULL DEFAULT '[]',
    statistics TEXT NOT NULL DEFAULT '{}',
    UNIQUE (build_id, number)
);

CREATE TABLE logs (
    id INTEGER PRIMARY KEY,
    step_id INTEGER NOT NULL REFERENCES steps(id),
    name TEXT NOT NULL,
    slug TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 's',
    num_lines INTEGER NOT NULL DEFAULT 0,
    num_bytes INTEGER NOT NULL DEFAULT 0,
    complete INTEGER NOT NULL DEFAULT 0,
    UNIQUE (step_id, slug)
);

-- Log text in chunks of whole lines; `compressed` is 0 (raw) or 1 (deflate).
CREATE TABLE logchunks (
    log_id INTEGER NOT NULL REFERENCES logs(id),
    first_line INTEGER NOT NULL,
    last_line INTEGER NOT NULL,
    compressed INTEGER NOT NULL,
    content BLOB NOT NULL,
    PRIMARY KEY (log_id, first_line)
);

-- Which master runs each scheduler (the primary key is the arbiter), its durable state
-- (timers, watermarks), and the changes it has classified but not yet built.
CREATE TABLE scheduler_masters (
    scheduler TEXT PRIMARY KEY,
    master_id INTEGER NOT NULL REFERENCES masters(id),
    claimed_at INTEGER NOT NULL
);

CREATE TABLE scheduler_state (
    scheduler TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (scheduler, name)
);

CREATE TABLE scheduler_changes (
    scheduler TEXT NOT NULL,
    change_id INTEGER NOT NULL REFERENCES changes(id),
    important INTEGER NOT NULL,
    PRIMARY KEY (scheduler, change_id)
);

-- An append-only feed of what happened (buildset completed, first failure, ...), read by
-- consumers (dependent schedulers, reporters) through a durable watermark.
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    subject_id INTEGER NOT NULL,
    payload TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL
);

-- Uploaded step, observer and policy modules; the bytes live in `files`, named by SHA-1.
CREATE TABLE files (
    sha1 TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    content BLOB NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE step_modules (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    kind TEXT NOT NULL,
    sha1 TEXT NOT NULL REFERENCES files(sha1),
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    uploaded_at INTEGER NOT NULL,
    UNIQUE (name, version)
);
