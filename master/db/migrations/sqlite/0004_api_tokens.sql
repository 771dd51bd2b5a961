-- API tokens: a name, a role (read, force, upload, admin) and the SHA-256 of the secret; the
-- secret itself is shown once, when the token is made, and never stored.
CREATE TABLE api_tokens (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
