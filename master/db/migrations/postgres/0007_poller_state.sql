-- What each git poller has seen, so a restarted master neither repeats nor misses commits.
-- A poll records its heads and its changes in one transaction. `generation` advances with
-- every recorded poll: a poll records only if the generation is still the one it read, so
-- when several masters poll the same source, one of them records each commit.
CREATE TABLE poller_sources (
    source TEXT PRIMARY KEY,
    repourl TEXT NOT NULL,
    generation BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- The head of each branch a poller follows, as of its last recorded poll.
CREATE TABLE poller_heads (
    source TEXT NOT NULL REFERENCES poller_sources(source),
    branch TEXT NOT NULL,
    revision TEXT NOT NULL,
    PRIMARY KEY (source, branch)
);
