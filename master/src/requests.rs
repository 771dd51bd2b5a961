//! From buildsets to claimed build requests: submitting a buildset (and collapsing older
//! compatible requests into the new ones), completing requests (and with them buildsets, with
//! their first-failure and finished events), and choosing which queued requests free workers
//! take, with the farm's hooks deciding, and claiming them atomically.

use std::collections::BTreeMap;

use anyhow::Context;
use runtime::policy::{BuilderInfo, RequestInfo, WorkerInfo};
use serde_json::json;
use sqlx::AnyConnection;

use crate::hooks::Hooks;
use kiln_db::model::*;
use kiln_db::{self as db, Db};

/// Builder settings that matter for queueing and dispatch.
#[derive(Debug, Clone, PartialEq)]
pub struct BuilderQueueing {
    /// Name.
    pub name: String,
    /// Builder priority: higher is served first.
    pub priority: i32,
    /// Whether its requests may be collapsed.
    pub collapse: bool,
    /// Tags, for policies.
    pub tags: Vec<String>,
    /// False: only sandbox workers, never secrets.
    pub trusted: bool,
    /// A trusted builder's builds may also go to sandbox workers.
    pub allow_sandbox_workers: bool,
    /// Explicit worker names, if given.
    pub workers: Option<Vec<String>>,
    /// Required capabilities.
    pub requires_arch: Option<String>,
    /// Required capabilities.
    pub requires_os: Option<String>,
    /// Required tags (all).
    pub requires_tags: Vec<String>,
}

impl BuilderQueueing {
    /// Whether `worker` may run this builder's builds at all (capabilities and names), and a
    /// build of trust `trusted` in particular.
    pub fn accepts(&self, worker: &WorkerInfo, request_trusted: bool) -> bool {
        if let Some(names) = &self.workers
            && !names.contains(&worker.name)
        {
            return false;
        }
        if let Some(arch) = &self.requires_arch
            && worker.arch.as_ref() != Some(arch)
        {
            return false;
        }
        if let Some(os) = &self.requires_os
            && worker.os.as_ref() != Some(os)
        {
            return false;
        }
        if !self.requires_tags.iter().all(|t| worker.tags.contains(t)) {
            return false;
        }
        let trusted = self.trusted && request_trusted;
        if trusted {
            // Trusted work runs on plain workers, and on sandbox workers only by permission.
            !worker.sandbox || self.allow_sandbox_workers
        } else {
            // Untrusted work never runs outside the sandbox.
            worker.sandbox
        }
    }
}

/// What one claim pass decided: `request` on `builder` goes to `worker`.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// The claimed request.
    pub request: BuildRequestId,
    /// What the queue said of it (buildset, trust), so starting it needs no second look.
    pub queued: QueuedRequest,
    /// Its builder.
    pub builder: String,
    /// The worker to run it.
    pub worker: String,
}

/// What a hook sees of a request without reading its buildset: enough for the built-in hooks,
/// which look only at priority and age.
fn basic_info(r: &QueuedRequest) -> RequestInfo {
    RequestInfo {
        id: r.id.0 as u64,
        builder: r.builder.clone(),
        priority: r.priority.clamp(i32::MIN as i64, i32::MAX as i64) as i32,
        submitted_at: r.submitted_ms,
        reason: String::new(),
        branch: None,
        repository: None,
        codebase: String::new(),
        has_patch: false,
        properties: Default::default(),
    }
}

/// Everything a policy looks at for one request.
async fn request_info(conn: &mut AnyConnection, r: &QueuedRequest) -> anyhow::Result<RequestInfo> {
    let (bs, props) = db::buildset_with_properties(&mut *conn, r.buildset)
        .await?
        .context("request without a buildset")?;
    let stamps = db::buildset_sourcestamps(&mut *conn, r.buildset).await?;
    let first = stamps.first();
    Ok(RequestInfo {
        id: r.id.0 as u64,
        builder: r.builder.clone(),
        priority: r.priority.clamp(i32::MIN as i64, i32::MAX as i64) as i32,
        submitted_at: r.submitted_ms,
        reason: bs.reason,
        branch: first.and_then(|s| s.branch.clone()),
        repository: first.map(|s| s.repository.clone()),
        codebase: first.map(|s| s.codebase.clone()).unwrap_or_default(),
        has_patch: stamps.iter().any(|s| s.patch.is_some()),
        properties: props.into_iter().map(|p| (p.name, p.value)).collect(),
    })
}

pub use kiln_db::model::collapse_key;

/// Whether two buildsets' requests may merge by Kiln's default rule ([`collapse_key`]).
pub async fn can_collapse(
    conn: &mut AnyConnection,
    new: BuildsetId,
    older: BuildsetId,
) -> anyhow::Result<bool> {
    let a = db::buildset_collapse_key(&mut *conn, new).await?;
    let b = db::buildset_collapse_key(&mut *conn, older).await?;
    Ok(a.is_some() && a == b)
}

/// A buildset as submitted.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    /// The buildset.
    pub buildset: BuildsetId,
    /// Its requests, with their builders.
    pub requests: Vec<(BuildRequestId, String)>,
    /// Older requests collapsed into the new ones.
    pub collapsed: Vec<BuildRequestId>,
}

/// Adds a buildset in the caller's transaction: one request per builder, then collapses older
/// compatible queued requests on builders that allow it into the new requests (they complete
/// as SKIPPED, pointing at the request that absorbed them). `None` if the scheduler already
/// made a buildset with this `external_id`.
pub async fn submit_buildset(
    db: &Db,
    tx: &mut db::Tx,
    master: MasterId,
    bs: &NewBuildset,
    builders: &BTreeMap<String, BuilderQueueing>,
    hooks: &Hooks,
    now: i64,
) -> anyhow::Result<Option<Submitted>> {
    let ids = db::builder_ids(&mut *tx).await?;
    let Some((buildset, requests)) = db::insert_buildset(&mut *tx, bs, &ids, now).await? else {
        return Ok(None);
    };
    let mut collapsed = Vec::new();
    for (new_id, builder) in &requests {
        if !builders.get(builder).is_some_and(|b| b.collapse) {
            continue;
        }
        let absorbed = if hooks.collapse_is_default() {
            // The default rule needs no look at each request: the key finds them all.
            match db::buildset_collapse_key(&mut *tx, buildset).await? {
                Some(key) => db::collapsible_requests(&mut *tx, builder, *new_id, &key).await?,
                None => Vec::new(),
            }
        } else {
            collapse_by_hook(tx, builder, *new_id, hooks).await?
        };
        for older in absorbed {
            // Claiming first makes the collapse safe against another master claiming the
            // same request for a build at this moment.
            if db::claim_request(&mut *tx, older, master, now).await? {
                collapsed.push((older, Results::Skipped, Some(*new_id)));
            }
        }
    }
    let done: Vec<BuildRequestId> = collapsed.iter().map(|c| c.0).collect();
    finish_requests(db, tx, master, &collapsed, now).await?;
    Ok(Some(Submitted {
        buildset,
        requests,
        collapsed: done,
    }))
}

/// The older queued requests on `builder` that the collapse hook (never, or a policy) lets
/// request `new_id` absorb, asking about each in turn.
async fn collapse_by_hook(
    tx: &mut db::Tx,
    builder: &str,
    new_id: BuildRequestId,
    hooks: &Hooks,
) -> anyhow::Result<Vec<BuildRequestId>> {
    let mut absorbed = Vec::new();
    if !hooks.collapse_needs_details() {
        return Ok(absorbed); // never
    }
    let queue = db::queued_requests(&mut *tx, Some(builder), i64::MAX, 0).await?;
    let Some(new) = queue.iter().find(|r| r.id == new_id).cloned() else {
        return Ok(absorbed);
    };
    let new_info = request_info(&mut *tx, &new).await?;
    for older in queue.iter().filter(|r| r.id < new.id) {
        let older_info = request_info(&mut *tx, older).await?;
        // What Kiln would decide, for when the policy has no opinion or fails.
        let default = can_collapse(&mut *tx, new.buildset, older.buildset).await?;
        if hooks.collapse(builder, &new_info, &older_info, || default) {
            absorbed.push(older.id);
        }
    }
    Ok(absorbed)
}

/// Completes claimed requests in the caller's transaction. A failing request records its
/// buildset's first failure (once, with a `buildset.first_failure` event); a buildset whose
/// requests are all complete completes with the worst result (with a `buildset.complete`
/// event). Returns the buildsets completed.
pub async fn finish_requests(
    db: &Db,
    tx: &mut db::Tx,
    master: MasterId,
    requests: &[(BuildRequestId, Results, Option<BuildRequestId>)],
    now: i64,
) -> anyhow::Result<Vec<(BuildsetId, Results)>> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    db.serialize_appends(tx).await?;
    let mut buildsets = Vec::new();
    for &(id, results, into) in requests {
        let Some(buildset) = db::complete_request(&mut *tx, id, master, results, into, now).await?
        else {
            continue;
        };
        if matches!(
            results,
            Results::Failure | Results::Exception | Results::Cancelled
        ) && db::mark_first_failure(&mut *tx, buildset, now).await?
        {
            let builder = db::get_request(&mut *tx, id)
                .await?
                .map(|(r, ..)| r.builder);
            db::insert_event(
                &mut *tx,
                "buildset.first_failure",
                buildset.0,
                &json!({"request": id.0, "builder": builder, "results": results}),
                now,
            )
            .await?;
        }
        if !buildsets.contains(&buildset) {
            buildsets.push(buildset);
        }
    }
    let mut completed = Vec::new();
    for bs in buildsets {
        if let Some((results, scheduler)) = db::complete_buildset_if_done(&mut *tx, bs, now).await?
        {
            db::insert_event(
                &mut *tx,
                "buildset.complete",
                bs.0,
                &json!({"scheduler": scheduler, "results": results}),
                now,
            )
            .await?;
            completed.push((bs, results));
        }
    }
    Ok(completed)
}

/// A worker with room for more builds, as the dispatcher sees it.
pub type FreeWorker = WorkerInfo;

/// One claim pass: offers free workers to builders in priority order and claims the requests
/// they will run. A worker runs one build of a builder at a time (the builder's workdir is
/// its own): `busy` holds the (builder, worker) pairs running now, and gains this pass's.
/// Hooks decide the builder order, the request, the worker and whether it may start; the
/// database decides who wins a claim when several masters try at once. Builders missing from
/// `builders` (removed by a reload) get no new builds.
pub async fn claim_for_workers(
    db: &Db,
    master: MasterId,
    builders: &BTreeMap<String, BuilderQueueing>,
    workers: &mut [FreeWorker],
    busy: &mut std::collections::BTreeSet<(String, String)>,
    hooks: &Hooks,
    now: i64,
) -> anyhow::Result<Vec<Assignment>> {
    let assignments = plan_for_workers(db, builders, workers, busy, hooks).await?;
    // The decisions are made (hooks included) before any lock is taken; the claims then
    // commit together in one short transaction. A request another master won in between is
    // dropped (its worker slot stays free until the next pass).
    let mut tx = db.begin().await?;
    let mut won = Vec::with_capacity(assignments.len());
    for a in assignments {
        if db::claim_request(&mut tx, a.request, master, now).await? {
            tracing::debug!(request = %a.request, builder = %a.builder, worker = %a.worker, "claimed");
            won.push(a);
        } else if let Some(w) = workers.iter_mut().find(|w| w.name == a.worker) {
            w.running_builds -= 1;
        }
    }
    tx.commit().await?;
    Ok(won)
}

/// The decisions of a claim pass without the claims: which queued request each free worker
/// should take. The dispatcher claims them in the transaction that records their builds;
/// `workers` and `busy` are updated as if every claim is won.
pub async fn plan_for_workers(
    db: &Db,
    builders: &BTreeMap<String, BuilderQueueing>,
    workers: &mut [FreeWorker],
    busy: &mut std::collections::BTreeSet<(String, String)>,
    hooks: &Hooks,
) -> anyhow::Result<Vec<Assignment>> {
    let mut conn = db.pool().acquire().await?;
    // Counting every builder's queue costs a scan of it on each pass; only a policy is told
    // the counts.
    let heads = if hooks.prioritize_needs_counts() {
        db::queue_summary(&mut conn).await?
    } else {
        db::queue_heads(&mut conn)
            .await?
            .into_iter()
            .map(|(name, oldest)| (name, 0, oldest))
            .collect()
    };
    let mut order: Vec<BuilderInfo> = heads
        .into_iter()
        .filter_map(|(name, queued, oldest)| {
            let b = builders.get(&name)?;
            Some(BuilderInfo {
                name,
                priority: b.priority,
                oldest_request_at: Some(oldest),
                queued: queued as u32,
                tags: b.tags.clone(),
            })
        })
        .collect();
    order.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.oldest_request_at.cmp(&b.oldest_request_at))
            .then_with(|| a.name.cmp(&b.name))
    });
    let order = hooks.prioritize(order);
    let mut assignments = Vec::new();
    for info in order {
        let builder = &builders[&info.name];
        if !workers.iter().any(|w| w.running_builds < w.max_builds) {
            break;
        }
        if !workers.iter().any(|w| {
            w.running_builds < w.max_builds
                && !busy.contains(&(builder.name.clone(), w.name.clone()))
        }) {
            continue;
        }
        // A policy choosing among requests sees up to 200 of them; the default order needs
        // only as many as there are free slots, plus some for requests no free worker can
        // take (trust). The queue is read a page at a time, so a long queue costs a pass
        // no more than a short one.
        let full = hooks.dispatch_needs_details();
        let slots: u32 = workers
            .iter()
            .map(|w| w.max_builds.saturating_sub(w.running_builds))
            .sum();
        let page = if full { 200 } else { i64::from(slots) + 8 };
        let mut offset = 0;
        let mut pending = Vec::new();
        loop {
            if pending.is_empty() {
                if offset >= 200 || !workers.iter().any(|w| w.running_builds < w.max_builds) {
                    break;
                }
                let queue =
                    db::queued_requests(&mut conn, Some(&builder.name), page, offset).await?;
                offset += page;
                let last_page = (queue.len() as i64) < page;
                for r in queue {
                    let info = if full {
                        request_info(&mut conn, &r).await?
                    } else {
                        basic_info(&r)
                    };
                    pending.push((r, info));
                }
                if pending.is_empty() {
                    break;
                }
                if last_page {
                    offset = i64::MAX;
                }
            }
            let infos: Vec<RequestInfo> = pending.iter().map(|(_, i)| i.clone()).collect();
            let pick = hooks
                .next_build(&builder.name, None, &infos)
                .min(pending.len() - 1);
            let (request, info) = pending.remove(pick);
            let candidates: Vec<usize> = (0..workers.len())
                .filter(|&i| {
                    let w = &workers[i];
                    w.running_builds < w.max_builds
                        && builder.accepts(w, request.trusted)
                        && !busy.contains(&(builder.name.clone(), w.name.clone()))
                })
                .collect();
            if candidates.is_empty() {
                // No worker can take this request now; later requests may need other workers
                // (trusted and untrusted ones differ), so keep looking.
                continue;
            }
            let mut offered: Vec<WorkerInfo> =
                candidates.iter().map(|&i| workers[i].clone()).collect();
            let mut chosen = None;
            while let Some(k) = hooks.next_worker(&builder.name, &offered, &info) {
                if hooks.can_start(&builder.name, &offered[k], &info) {
                    chosen = Some(offered[k].name.clone());
                    break;
                }
                offered.remove(k);
            }
            let Some(worker) = chosen else { continue };
            if let Some(w) = workers.iter_mut().find(|w| w.name == worker) {
                w.running_builds += 1;
            }
            busy.insert((builder.name.clone(), worker.clone()));
            assignments.push(Assignment {
                request: request.id,
                queued: request,
                builder: builder.name.clone(),
                worker,
            });
            if !workers.iter().any(|w| w.running_builds < w.max_builds) {
                break;
            }
        }
    }
    Ok(assignments)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn stamp(branch: &str, revision: Option<&str>, changes: &[i64]) -> SourceStamp {
        SourceStamp {
            repository: "r".into(),
            branch: Some(branch.into()),
            revision: revision.map(str::to_owned),
            changes: changes.iter().map(|c| ChangeId(*c)).collect(),
            ..Default::default()
        }
    }

    fn prop(name: &str, value: Value, source: &str) -> SourcedProperty {
        SourcedProperty {
            name: name.into(),
            value,
            source: source.into(),
        }
    }

    #[test]
    fn the_collapse_key_is_buildbots_rule() {
        let key = |s: SourceStamp, p: &[SourcedProperty]| collapse_key(&[s], p);
        // Built from changes: any revision merges with any other on the same branch.
        assert_eq!(
            key(stamp("main", Some("a"), &[1]), &[]),
            key(stamp("main", Some("b"), &[2, 3]), &[])
        );
        assert_ne!(
            key(stamp("main", None, &[1]), &[]),
            key(stamp("dev", None, &[1]), &[])
        );
        // Without changes only the same revision merges, and never with one built from changes.
        assert_eq!(
            key(stamp("main", Some("a"), &[]), &[]),
            key(stamp("main", Some("a"), &[]), &[])
        );
        assert_ne!(
            key(stamp("main", Some("a"), &[]), &[]),
            key(stamp("main", Some("b"), &[]), &[])
        );
        assert_ne!(
            key(stamp("main", Some("a"), &[]), &[]),
            key(stamp("main", Some("a"), &[1]), &[])
        );
        // Where a request came from does not matter; what it builds with does.
        let s = || stamp("main", None, &[1]);
        assert_eq!(
            key(
                s(),
                &[
                    prop("owner", json!("ada"), "Force Build Form"),
                    prop("ticket", json!(1), "Change")
                ]
            ),
            key(s(), &[prop("owner", json!("bob"), "Force Build Form")])
        );
        assert_ne!(
            key(s(), &[prop("jobs", json!(4), "Force Build Form")]),
            key(s(), &[prop("jobs", json!(8), "Force Build Form")])
        );
        // A patch never merges.
        let mut patched = s();
        patched.patch = Some(Patch {
            level: 1,
            body: vec![],
            author: None,
            comment: None,
            subdir: None,
        });
        assert_eq!(key(patched, &[]), None);
    }
}
