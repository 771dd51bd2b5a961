//! Health: rejected jobs, lost builds and builds a worker could not start count against it;
//! [`QUARANTINE_AFTER`] in a row quarantine it with exponential backoff; a build it runs
//! properly makes it healthy again.

use super::*;

/// Failures in a row that quarantine a worker.
pub const QUARANTINE_AFTER: i64 = 3;

/// How long a worker with `failures` failures in a row is quarantined, in ms: 30 s, doubling
/// with each further failure, at most an hour.
pub fn quarantine_ms(failures: i64) -> i64 {
    let doublings = (failures - QUARANTINE_AFTER).clamp(0, 7) as u32;
    (30_000i64 << doublings).min(3_600_000)
}

impl Master {
    pub(super) async fn worker_failed(&self, name: &str, note: &str) -> anyhow::Result<()> {
        {
            let mut inner = self.workers.lock();
            inner.healthy.remove(name);
            inner.health = None;
        }
        let mut conn = self.db.pool().acquire().await?;
        let h = db::record_worker_outcome(
            &mut conn,
            name,
            Some(note),
            QUARANTINE_AFTER,
            quarantine_ms,
            now_ms(),
        )
        .await?;
        if let Some(h) = h
            && let Some(until) = h.quarantine_until
        {
            tracing::warn!(worker = %name, failures = h.failure_count, note, quarantined_for_ms = until - now_ms(), "worker quarantined");
        }
        Ok(())
    }

    pub(super) async fn worker_ok(&self, name: &str) -> anyhow::Result<()> {
        if self.workers.lock().healthy.contains(name) {
            return Ok(());
        }
        let mut conn = self.db.pool().acquire().await?;
        db::record_worker_outcome(
            &mut conn,
            name,
            None,
            QUARANTINE_AFTER,
            quarantine_ms,
            now_ms(),
        )
        .await?;
        {
            let mut inner = self.workers.lock();
            inner.healthy.insert(name.to_owned());
            inner.health = None;
        }
        Ok(())
    }

    /// Drops the cached health table, so a pause or unpause counts at the next dispatch.
    pub fn forget_worker_health(&self) {
        self.workers.lock().health = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_backs_off_exponentially_up_to_an_hour() {
        assert_eq!(quarantine_ms(3), 30_000);
        assert_eq!(quarantine_ms(4), 60_000);
        assert_eq!(quarantine_ms(5), 120_000);
        assert_eq!(quarantine_ms(50), 3_600_000);
    }
}
