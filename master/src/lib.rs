//! The Kiln master's core: what a master does, whatever speaks to it.
//!
//! Changes enter through [`changes`] (from the [`poller`], the webhooks' [`forges`], the API or
//! `kiln sendchange`); [`schedulers`] turn them into buildsets and [`requests`] collapse and
//! plan them; [`workers`] holds the connected workers, applies what they send and dispatches
//! builds to them as jobs ([`jobs`], made from a builder's [`plan`]); [`latent`] starts and
//! stops workers on demand; [`reporters`] tell the world; [`metrics`] count; [`live`] is the
//! bus of live events. [`server::Master`] ties them together.
//!
//! No HTTP here: the HTTP layer (`kiln-http`) serves the API, the UI, the webhooks, the worker
//! endpoint and the file cache over this crate, which never imports it.

pub mod changes;
pub mod filecache;
pub mod forges;
pub mod hooks;
pub mod jobs;
pub mod latent;
pub mod live;
pub mod metrics;
pub mod plan;
pub mod poller;
pub mod properties;
pub mod reporters;
pub mod requests;
pub mod schedulers;
pub mod secrets;
pub mod server;
pub mod workers;
