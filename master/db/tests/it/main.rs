//! kiln-db against real databases: every query on SQLite and on a real PostgreSQL
//! (`queries.rs`), and the two migration trees' agreement (`schema.rs`).

mod queries;
mod schema;
