//! The master's core against real databases: schedulers, requests, collapsing and claims on
//! SQLite and on a real PostgreSQL.

mod schedulers;
