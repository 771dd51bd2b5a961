//! Recovery: a build whose worker is lost or forgot it ends RETRY and its request is queued
//! again ([`Master::retry_build`]); every heartbeat the master scans what each worker says it
//! runs against its leases, and running builds nobody holds (after a master restart) are
//! retried once their grace is over (Launchpad's `scanActiveBuilders`).

use super::*;

/// How long a running build nobody holds (a master restarted, a master died) waits for its
/// worker to reconnect before it is retried.
const UNHELD_GRACE: Duration = Duration::from_secs(30);

impl Master {
    /// Ends a running build RETRY (its request goes back to the queue) and tells its worker
    /// to stop it; late reports of that attempt are refused. False if it was not running.
    pub async fn retry_build(&self, build: i64, why: &str) -> anyhow::Result<bool> {
        let lease = self.workers.lock().leases.remove(&build);
        let mut tx = self.db.begin().await?;
        let row = db::running_builds(&mut tx, Some(self.id), Some(BuildId(build)))
            .await?
            .pop();
        let Some(row) = row else {
            tx.commit().await?;
            return Ok(false);
        };
        if row.master != self.id {
            db::adopt_build(&mut tx, row.id, row.request, self.id).await?;
        }
        let ended = db::finish_build(&mut tx, row.id, Outcome::Retry, why, now_ms()).await?;
        if ended {
            db::unclaim_requests(&mut tx, &[row.request], self.id).await?;
            crate::reporters::queue_build(
                &mut tx,
                &self.state().config.reporters,
                &row.builder,
                row.id.0,
                crate::reporters::Event::BuildFinished,
                Some(Outcome::Retry),
                now_ms(),
            )
            .await?;
        }
        tx.commit().await?;
        if ended {
            self.wake_reporters();
        }
        if ended {
            self.metrics.build_finished(
                &row.builder,
                Outcome::Retry,
                lease.as_ref().map(|l| l.dispatched.elapsed()),
            );
            tracing::warn!(build, reason = %why, "build ended RETRY; its request is queued again");
            if let (Some(worker), Some(lease)) = (row.worker.as_deref(), lease) {
                self.send_to(
                    worker,
                    ToWorker::Stop {
                        build: BuildRef {
                            id: build,
                            cookie: lease.cookie,
                        },
                        reason: format!("retried: {why}"),
                    },
                );
            }
            self.wake_dispatch();
            crate::live::publish(self, &[], &[build]).await;
        }
        Ok(ended)
    }

    /// The periodic check (every heartbeat): asks each worker what it runs, retries builds
    /// of workers lost for `lost_after`, and builds in the database nobody holds.
    pub async fn scan(&self, lost_after: Duration) -> anyhow::Result<()> {
        let now = Instant::now();
        let lost: Vec<(i64, String)> = {
            let mut inner = self.workers.lock();
            // A scan answers within a heartbeat; ends older than that cannot be in one.
            inner.ended.retain(|_, (_, at)| {
                now.duration_since(*at) < lost_after / crate::server::DEAD_AFTER_BEATS
            });
            for (_, c) in inner.conns.iter_mut() {
                // An unanswered scan is simply replaced.
                let n = self.workers.next_scan.fetch_add(1, Ordering::Relaxed) + 1;
                if c.tx.send(ToWorker::Scan { scan: n }).is_ok() {
                    c.scan = Some((n, now));
                }
            }
            inner
                .leases
                .iter()
                .filter(|(_, l)| l.orphaned.is_some_and(|t| now - t > lost_after))
                .map(|(id, l)| (*id, l.worker.clone()))
                .collect()
        };
        for (id, worker) in lost {
            if self
                .retry_build(id, &format!("worker {worker} was lost"))
                .await?
            {
                self.worker_failed(&worker, &format!("lost while running build {id}"))
                    .await?;
            }
        }
        let running = {
            let mut conn = self.db.pool().acquire().await?;
            db::running_builds(&mut conn, Some(self.id), None).await?
        };
        let stale: Vec<(i64, Option<String>)> = {
            let mut inner = self.workers.lock();
            let ids: HashSet<i64> = running.iter().map(|b| b.id.0).collect();
            inner.unheld.retain(|id, _| ids.contains(id));
            let mut stale = Vec::new();
            for b in &running {
                if inner.leases.contains_key(&b.id.0) {
                    inner.unheld.remove(&b.id.0);
                    continue;
                }
                let since = *inner.unheld.entry(b.id.0).or_insert(now);
                // After a master restart its workers need time to notice and reconnect
                // (their backoff tops out at 15 s).
                if now - since > lost_after.max(UNHELD_GRACE) {
                    stale.push((b.id.0, b.worker.clone()));
                }
            }
            stale
        };
        for (id, worker) in stale {
            let who = worker.as_deref().unwrap_or("(none)");
            self.retry_build(id, &format!("worker {who} did not come back to claim it"))
                .await?;
            self.workers.lock().unheld.remove(&id);
        }
        Ok(())
    }
}
