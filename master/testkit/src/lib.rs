//! Test support shared by Kiln's tests and benchmarks, used only as a dev-dependency (nothing
//! of it reaches a production binary): [`pgtemp`], a throwaway PostgreSQL server from Debian's
//! package, and [`db`], a fresh database of either kind for a test ([`on_both_databases!`]
//! runs one on both); [`cdp`], a headless Chromium driven over the DevTools protocol; [`farm`], a farm of
//! real `kiln master` and `kiln-worker` processes; [`bins`], the workspace's binaries for tests
//! of another package.

pub mod bins;
pub mod cdp;
pub mod db;
pub mod farm;
pub mod pgtemp;
