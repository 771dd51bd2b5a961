//! Schedulers: from changes, timers, upstream buildsets, force forms, trigger steps and try
//! patches to buildsets. Everything a scheduler must remember (which changes it has seen, which
//! it holds for the next build, when its timers fire) lives in the database and changes in the
//! same transaction as the buildset it leads to, so a master killed at any moment loses no
//! change and fires nothing twice; every buildset a timer or change batch makes also carries an
//! idempotency key (`external_id`) that the database keeps unique per scheduler.
//!
//! Change- and timer-driven schedulers run on one master at a time (`scheduler_masters`);
//! force, trigger and try act on request on whichever master receives it.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use chrono::{DateTime, Utc};
use runtime::policy::{ChangeInfo, ChangeVerdict};
use serde_json::{Map, Value, json};

use crate::hooks::{Hooks, Policy};
use crate::requests::{self, BuilderQueueing, Submitted};
use kiln_config::{
    ChangeFilter, Config, ForceParameterKind, ModuleSource, PolicyRef, Scheduler, SchedulerKind,
};
use kiln_db::model::*;
use kiln_db::{self as db, Db};
pub use kiln_protocol::api::{ForceRequest, TryBody};

/// Changes read per scheduler pass.
const CHANGE_BATCH: i64 = 500;

/// What schedulers need from the running master.
pub struct Env<'a> {
    /// The database.
    pub db: &'a Db,
    /// This master.
    pub master: MasterId,
    /// The configuration in force.
    pub config: &'a Config,
    /// Builder queueing settings, by name.
    pub builders: &'a BTreeMap<String, BuilderQueueing>,
    /// The farm's hooks.
    pub hooks: &'a Hooks,
    /// Loaded policy components, by reference (for change filters).
    pub policies: &'a HashMap<PolicyRef, Policy>,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Pass {
    /// Buildsets created.
    pub buildsets: Vec<(String, BuildsetId)>,
    /// Changes read.
    pub changes_seen: usize,
    /// The earliest timer still pending (ms), for the caller's sleep.
    pub next_timer_ms: Option<i64>,
}

fn default_reason(s: &Scheduler) -> String {
    let kind = match &s.kind {
        SchedulerKind::SingleBranch { .. } => "SingleBranchScheduler",
        SchedulerKind::AnyBranch { .. } => "AnyBranchScheduler",
        SchedulerKind::Periodic { .. } => "Periodic scheduler",
        SchedulerKind::Nightly { .. } => "Nightly scheduler",
        SchedulerKind::Force { .. } => "ForceScheduler",
        SchedulerKind::Triggerable => "Triggerable scheduler",
        SchedulerKind::Dependent { .. } => "Dependent scheduler",
        SchedulerKind::Try { .. } => "Try scheduler",
    };
    format!("The {kind} '{}' triggered this build", s.name)
}

fn scheduler_properties(s: &Scheduler) -> Vec<SourcedProperty> {
    let source = format!("Scheduler {}", s.name);
    let mut props: Vec<SourcedProperty> = s
        .properties
        .iter()
        .map(|(name, value)| SourcedProperty {
            name: name.clone(),
            value: value.clone(),
            source: source.clone(),
        })
        .collect();
    props.push(SourcedProperty {
        name: "scheduler".into(),
        value: Value::String(s.name.clone()),
        source,
    });
    props
}

fn new_buildset(s: &Scheduler, sourcestamps: Vec<SourceStamp>) -> NewBuildset {
    NewBuildset {
        scheduler: s.name.clone(),
        reason: s.reason.clone().unwrap_or_else(|| default_reason(s)),
        external_id: None,
        sourcestamps,
        properties: scheduler_properties(s),
        builders: s.builders.iter().map(|b| (b.clone(), 0)).collect(),
        trusted: true,
        parent_build: None,
    }
}

async fn submit(
    env: &Env<'_>,
    tx: &mut db::Tx,
    bs: &NewBuildset,
    now: i64,
) -> anyhow::Result<Option<Submitted>> {
    let submitted =
        requests::submit_buildset(env.db, tx, env.master, bs, env.builders, env.hooks, now).await?;
    if let Some(s) = &submitted {
        tracing::info!(
            scheduler = %bs.scheduler,
            buildset = %s.buildset,
            requests = s.requests.len(),
            collapsed = s.collapsed.len(),
            "buildset submitted"
        );
    }
    Ok(submitted)
}

/// Runs every scheduler this master owns once: reads new changes, fires due timers, reacts to
/// finished upstream buildsets.
pub async fn run_pass(env: &Env<'_>, now: i64) -> anyhow::Result<Pass> {
    let mut pass = Pass::default();
    let mut conn = env.db.pool().acquire().await?;
    for s in &env.config.schedulers {
        let driven = !matches!(
            s.kind,
            SchedulerKind::Force { .. } | SchedulerKind::Triggerable | SchedulerKind::Try { .. }
        );
        if !driven || !db::claim_scheduler(&mut conn, &s.name, env.master, now).await? {
            continue;
        }
        let result = match &s.kind {
            SchedulerKind::SingleBranch { branch, filter } => {
                change_scheduler(env, s, Some(branch), None, filter, now, &mut pass).await
            }
            SchedulerKind::AnyBranch { branches, filter } => {
                change_scheduler(env, s, None, branches.as_ref(), filter, now, &mut pass).await
            }
            SchedulerKind::Periodic {
                interval,
                only_if_changed,
            } => {
                let interval = interval.as_millis() as i64;
                timed_scheduler(
                    env,
                    s,
                    None,
                    *only_if_changed,
                    now,
                    &mut pass,
                    |due, now| {
                        let next = due + interval;
                        Some(if next <= now { now + interval } else { next })
                    },
                )
                .await
            }
            SchedulerKind::Nightly {
                cron,
                branch,
                only_if_changed,
            } => {
                timed_scheduler(
                    env,
                    s,
                    branch.as_deref(),
                    *only_if_changed,
                    now,
                    &mut pass,
                    |due, now| {
                        let after = DateTime::<Utc>::from_timestamp_millis(due.max(now))?;
                        cron.next_after(after).map(|t| t.timestamp_millis())
                    },
                )
                .await
            }
            SchedulerKind::Dependent { upstream } => {
                dependent_scheduler(env, s, upstream, now, &mut pass).await
            }
            SchedulerKind::Force { .. }
            | SchedulerKind::Triggerable
            | SchedulerKind::Try { .. } => Ok(()),
        };
        if let Err(error) = result {
            // One scheduler's trouble (a database hiccup) must not stop the others; the
            // next pass retries from the durable state.
            tracing::error!(scheduler = %s.name, error = format!("{error:#}"), "scheduler pass failed");
        }
    }
    Ok(pass)
}

fn timer_key(repository: &str, branch: Option<&str>) -> String {
    format!("timer:{repository}\u{1f}{}", branch.unwrap_or(""))
}

/// How a change-driven scheduler sees a change: `None` to ignore it, else whether it is
/// important.
fn classify(
    env: &Env<'_>,
    s: &Scheduler,
    branch: Option<&str>,
    branches: Option<&kiln_config::Globs>,
    filter: &ChangeFilter,
    change: &Change,
) -> Option<bool> {
    if let Some(policy) = filter.policy.as_ref().and_then(|p| env.policies.get(p)) {
        let info = ChangeInfo {
            id: change.id.0 as u64,
            author: change.author.clone(),
            branch: change.branch.clone(),
            repository: change.repository.clone(),
            project: change.project.clone(),
            category: change.category.clone(),
            files: change.files.clone(),
            comments: change.comments.clone(),
            revision: change.revision.clone(),
        };
        match env.hooks.change_filter(policy, &s.name, &info) {
            Some(ChangeVerdict::Ignore) => return None,
            Some(ChangeVerdict::Unimportant) => return Some(false),
            Some(ChangeVerdict::Important) => return Some(true),
            None => {}
        }
    }
    if let Some(b) = branch
        && change.branch.as_deref() != Some(b)
    {
        return None;
    }
    if let Some(globs) = branches
        && !globs.is_match(change.branch.as_deref().unwrap_or(""))
    {
        return None;
    }
    let matches = |want: &Option<String>, have: &str| want.as_ref().is_none_or(|w| w == have);
    if !matches(&filter.repository, &change.repository)
        || !matches(&filter.project, &change.project)
        || !matches(&filter.codebase, &change.codebase)
        || !matches(&filter.category, change.category.as_deref().unwrap_or(""))
    {
        return None;
    }
    let important = match &filter.file_is_important {
        // A change that names no files (a tag, an empty commit) is important: there is
        // nothing to judge it by.
        Some(ff) if !change.files.is_empty() => {
            ff.change_is_important(change.files.iter().map(String::as_str))
        }
        _ => true,
    };
    if !important && filter.only_important {
        return None;
    }
    Some(important)
}

/// The changes a scheduler has not read yet. A scheduler seen for the first time starts at
/// the newest change: it builds what happens after it was configured, as Buildbot's do.
async fn unread_changes(tx: &mut db::Tx, s: &Scheduler) -> anyhow::Result<(ChangeId, Vec<Change>)> {
    let mark = match db::get_state(&mut *tx, &s.name, "last_change").await? {
        Some(v) => ChangeId(v.as_i64().unwrap_or(0)),
        None => {
            let last = db::last_change_id(&mut *tx).await?;
            db::set_state(&mut *tx, &s.name, "last_change", &json!(last.0)).await?;
            return Ok((last, Vec::new()));
        }
    };
    let changes = db::changes_after(&mut *tx, mark, CHANGE_BATCH).await?;
    Ok((mark, changes))
}

/// A buildset from held changes of one branch: the newest change names the revision; every
/// held change is in the blamelist; any untrusted change makes the buildset untrusted.
fn buildset_for_changes(s: &Scheduler, changes: &[Change]) -> NewBuildset {
    let last = changes.last().expect("at least one change");
    let mut bs = new_buildset(
        s,
        vec![SourceStamp {
            codebase: last.codebase.clone(),
            repository: last.repository.clone(),
            branch: last.branch.clone(),
            revision: last.revision.clone(),
            project: last.project.clone(),
            patch: None,
            changes: changes.iter().map(|c| c.id).collect(),
        }],
    );
    bs.external_id = Some(format!("changes:{}", last.id));
    bs.trusted = changes.iter().all(|c| c.trusted);
    let mut change_props: Map<String, Value> = Map::new();
    for c in changes {
        change_props.extend(c.properties.clone());
    }
    bs.properties.extend(
        change_props
            .into_iter()
            .map(|(name, value)| SourcedProperty {
                name,
                value,
                source: "Change".into(),
            }),
    );
    bs
}

async fn change_scheduler(
    env: &Env<'_>,
    s: &Scheduler,
    branch: Option<&String>,
    branches: Option<&kiln_config::Globs>,
    filter: &ChangeFilter,
    now: i64,
    pass: &mut Pass,
) -> anyhow::Result<()> {
    let stable_ms = filter.tree_stable_timer.as_millis() as i64;
    // Read new changes, hold the relevant ones, and (re)start the branch's timer.
    let mut tx = env.db.begin().await?;
    let (mark, changes) = unread_changes(&mut tx, s).await?;
    let mut last = mark;
    for change in &changes {
        last = change.id;
        pass.changes_seen += 1;
        let Some(important) =
            classify(env, s, branch.map(String::as_str), branches, filter, change)
        else {
            continue;
        };
        db::classify_change(&mut tx, &s.name, change.id, important).await?;
        if important {
            // Each important change restarts the tree-stable timer of its branch.
            db::set_state(
                &mut tx,
                &s.name,
                &timer_key(&change.repository, change.branch.as_deref()),
                &json!(now + stable_ms),
            )
            .await?;
            if stable_ms == 0 {
                // No timer: one build per important change, as Buildbot does.
                let key = timer_key(&change.repository, change.branch.as_deref());
                fire_branch(env, &mut tx, s, &key, Some(change.id), now, pass).await?;
            }
        }
    }
    if last != mark {
        db::set_state(&mut tx, &s.name, "last_change", &json!(last.0)).await?;
    }
    tx.commit().await?;

    // Fire the timers that ran out.
    let mut conn = env.db.pool().acquire().await?;
    for (key, at) in db::state_with_prefix(&mut conn, &s.name, "timer:").await? {
        let at = at.as_i64().unwrap_or(0);
        if at > now {
            pass.next_timer_ms = Some(pass.next_timer_ms.map_or(at, |t| t.min(at)));
            continue;
        }
        let mut tx = env.db.begin().await?;
        // Re-read inside the transaction: a change may have restarted the timer.
        if db::get_state(&mut tx, &s.name, &key)
            .await?
            .and_then(|v| v.as_i64())
            != Some(at)
        {
            continue;
        }
        // Every change held for the branch goes in, important or not, as in Buildbot.
        fire_branch(env, &mut tx, s, &key, None, now, pass).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Makes the buildset for the changes held for the branch `key` names (up to and including
/// `upto`, if given) when one of them is important, and forgets them and the branch's timer.
async fn fire_branch(
    env: &Env<'_>,
    tx: &mut db::Tx,
    s: &Scheduler,
    key: &str,
    upto: Option<ChangeId>,
    now: i64,
    pass: &mut Pass,
) -> anyhow::Result<()> {
    let mut batch = Vec::new();
    let mut important = false;
    for (id, imp) in db::classified_changes(&mut *tx, &s.name).await? {
        if upto.is_some_and(|u| id > u) {
            break;
        }
        if let Some(c) = db::get_change(&mut *tx, id).await?
            && timer_key(&c.repository, c.branch.as_deref()) == key
        {
            important |= imp;
            batch.push(c);
        }
    }
    if !important {
        db::delete_state(&mut *tx, &s.name, key).await?;
        return Ok(());
    }
    let bs = buildset_for_changes(s, &batch);
    if let Some(submitted) = submit(env, tx, &bs, now).await? {
        pass.buildsets.push((s.name.clone(), submitted.buildset));
    }
    let ids: Vec<ChangeId> = batch.iter().map(|c| c.id).collect();
    db::flush_classified(&mut *tx, &s.name, &ids).await?;
    db::delete_state(&mut *tx, &s.name, key).await?;
    Ok(())
}

/// Periodic and nightly schedulers: fire when `next_fire` passes, then compute the next time
/// from the one due (`next`). With `only_if_changed`, a time with no new change on the branch
/// is skipped.
async fn timed_scheduler(
    env: &Env<'_>,
    s: &Scheduler,
    branch: Option<&str>,
    only_if_changed: bool,
    now: i64,
    pass: &mut Pass,
    next: impl Fn(i64, i64) -> Option<i64>,
) -> anyhow::Result<()> {
    let mut tx = env.db.begin().await?;
    // Hold changes on the branch, to know whether anything changed and to name them.
    let (mark, changes) = unread_changes(&mut tx, s).await?;
    let mut last = mark;
    for c in &changes {
        last = c.id;
        pass.changes_seen += 1;
        if branch.is_none_or(|b| c.branch.as_deref() == Some(b)) {
            db::classify_change(&mut tx, &s.name, c.id, true).await?;
        }
    }
    if last != mark {
        db::set_state(&mut tx, &s.name, "last_change", &json!(last.0)).await?;
    }
    let due = match db::get_state(&mut tx, &s.name, "next_fire").await? {
        Some(v) => v.as_i64().unwrap_or(now),
        None => {
            // First start: a periodic scheduler fires at once (as Buildbot's does); a nightly
            // one waits for its first time.
            let first = match s.kind {
                SchedulerKind::Periodic { .. } => now,
                _ => next(now, now).context("the cron expression has no future time")?,
            };
            db::set_state(&mut tx, &s.name, "next_fire", &json!(first)).await?;
            first
        }
    };
    if due > now {
        pass.next_timer_ms = Some(pass.next_timer_ms.map_or(due, |t| t.min(due)));
        tx.commit().await?;
        return Ok(());
    }
    let held = db::classified_changes(&mut tx, &s.name).await?;
    if !only_if_changed || !held.is_empty() {
        let mut changes = Vec::new();
        for (id, _) in &held {
            if let Some(c) = db::get_change(&mut tx, *id).await? {
                changes.push(c);
            }
        }
        let mut bs = if changes.is_empty() {
            new_buildset(
                s,
                vec![SourceStamp {
                    branch: branch.map(str::to_owned),
                    ..Default::default()
                }],
            )
        } else {
            buildset_for_changes(s, &changes)
        };
        bs.external_id = Some(format!("timer:{due}"));
        if let Some(submitted) = submit(env, &mut tx, &bs, now).await? {
            pass.buildsets.push((s.name.clone(), submitted.buildset));
        }
        let ids: Vec<ChangeId> = held.iter().map(|(id, _)| *id).collect();
        db::flush_classified(&mut tx, &s.name, &ids).await?;
    }
    let following = next(due, now).context("the cron expression has no future time")?;
    db::set_state(&mut tx, &s.name, "next_fire", &json!(following)).await?;
    db::set_state(&mut tx, &s.name, "last_fired", &json!(due)).await?;
    tx.commit().await?;
    pass.next_timer_ms = Some(pass.next_timer_ms.map_or(following, |t| t.min(following)));
    Ok(())
}

/// Dependent schedulers: a new buildset of the same source stamps for each buildset of the
/// upstream scheduler that finished SUCCESS or WARNINGS.
async fn dependent_scheduler(
    env: &Env<'_>,
    s: &Scheduler,
    upstream: &str,
    now: i64,
    pass: &mut Pass,
) -> anyhow::Result<()> {
    let mut tx = env.db.begin().await?;
    let mark = match db::get_state(&mut tx, &s.name, "last_event").await? {
        Some(v) => v.as_i64().unwrap_or(0),
        None => {
            let last = db::last_event_id(&mut tx).await?;
            db::set_state(&mut tx, &s.name, "last_event", &json!(last)).await?;
            tx.commit().await?;
            return Ok(());
        }
    };
    let events = db::events_after(&mut tx, mark, CHANGE_BATCH).await?;
    let Some(last) = events.last().map(|e| e.id) else {
        return Ok(());
    };
    for e in &events {
        let ok = matches!(
            e.payload.get("results").and_then(Value::as_str),
            Some("SUCCESS" | "WARNINGS")
        );
        if e.kind != "buildset.complete"
            || e.payload.get("scheduler").and_then(Value::as_str) != Some(upstream)
            || !ok
        {
            continue;
        }
        let parent = BuildsetId(e.subject);
        let stamps = db::buildset_sourcestamps(&mut tx, parent).await?;
        let trusted = db::get_buildset(&mut tx, parent)
            .await?
            .is_none_or(|b| b.trusted);
        let mut bs = new_buildset(s, stamps);
        bs.external_id = Some(format!("upstream:{parent}"));
        bs.trusted = trusted;
        if let Some(submitted) = submit(env, &mut tx, &bs, now).await? {
            pass.buildsets.push((s.name.clone(), submitted.buildset));
        }
    }
    db::set_state(&mut tx, &s.name, "last_event", &json!(last)).await?;
    tx.commit().await?;
    Ok(())
}

/// Refuses a try on builders that would not apply its patch: a builder of try scheduler
/// `scheduler` (those named, or all of its builders) needs a built-in `git` step whose
/// arguments name no patch of their own. Unknown schedulers and builders are left for
/// `schedulers::try_build` to refuse.
pub fn check_builders(config: &Config, scheduler: &str, builders: &[String]) -> Result<(), String> {
    let Some(s) = config.scheduler(scheduler) else {
        return Ok(());
    };
    let names = if builders.is_empty() {
        &s.builders
    } else {
        builders
    };
    for name in names {
        let Some(b) = config.builder(name).filter(|_| s.builders.contains(name)) else {
            continue;
        };
        let takes_patch = b.steps.iter().any(|step| {
            matches!(&step.module, ModuleSource::Builtin(m) if *m == "git")
                && step.args.get("patch").is_none()
        });
        if !takes_patch {
            return Err(format!(
                "builder {name:?} has no git step to apply the patch to (a built-in git step without a patch of its own); try on a builder that checks out the source"
            ));
        }
    }
    Ok(())
}

/// Highest `-p` level a patch may give.
const MAX_PATCH_LEVEL: u32 = 32;

/// Largest total size of a try request's properties, as JSON.
const MAX_PROPERTIES: usize = 64 << 10;

/// Checks a try request's body (`POST /api/v2/tryschedulers/{name}`) and turns it into a try
/// request from `who`; the message says what to fix.
pub fn try_request(body: TryBody, who: &str) -> Result<TryRequest, String> {
    let this = body;
    let rev = &this.baserev;
    if !(rev.len() == 40 || rev.len() == 64) || !rev.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "baserev {:?} is not a full commit id (40 or 64 hex digits)",
            rev.chars().take(80).collect::<String>()
        ));
    }
    for (name, value) in [
        ("branch", this.branch.as_deref().unwrap_or_default()),
        ("repository", &this.repository),
        ("project", &this.project),
    ] {
        if value.len() > crate::changes::MAX_FIELD || value.contains('\0') {
            return Err(format!(
                "{name} is longer than {} bytes or contains NUL",
                crate::changes::MAX_FIELD
            ));
        }
    }
    if this.comment.len() > crate::changes::MAX_FIELD {
        return Err(format!(
            "the comment is {} bytes; the limit is {}",
            this.comment.len(),
            crate::changes::MAX_FIELD
        ));
    }
    if this.patch.trim().is_empty() {
        return Err("the patch is empty: there is nothing to try".into());
    }
    if this.patch.len() > MAX_TRY_PATCH {
        return Err(format!(
            "the patch is {} bytes; the limit is {} MiB",
            this.patch.len(),
            MAX_TRY_PATCH >> 20
        ));
    }
    // Escaped as JSON (in the job a worker receives), control characters grow sixfold.
    let escaped = serde_json::to_string(&this.patch).map_or(usize::MAX, |s| s.len());
    if escaped > MAX_TRY_PATCH * 3 / 2 {
        return Err(format!(
            "the patch is {escaped} bytes escaped as JSON (it has many control characters); \
             the limit is {} bytes",
            MAX_TRY_PATCH * 3 / 2
        ));
    }
    if this.patch.contains('\0') {
        return Err("the patch contains a NUL character; make binary files git binary patches (git diff --binary)".into());
    }
    if this.patch_level > MAX_PATCH_LEVEL {
        return Err(format!(
            "patch_level {} is more than {MAX_PATCH_LEVEL}",
            this.patch_level
        ));
    }
    let props = serde_json::to_string(&this.properties).map_or(usize::MAX, |s| s.len());
    if props > MAX_PROPERTIES {
        return Err(format!(
            "the properties are {props} bytes of JSON; the limit is {MAX_PROPERTIES}"
        ));
    }
    for name in this.properties.keys() {
        kiln_protocol::props::check_property_name(name)
            .map_err(|e| format!("property {name:?}: {e}"))?;
    }
    Ok(TryRequest {
        who: who.to_owned(),
        builders: this.builders,
        sourcestamp: SourceStamp {
            repository: this.repository,
            branch: this.branch.filter(|b| !b.is_empty()),
            revision: Some(this.baserev.to_ascii_lowercase()),
            project: this.project,
            patch: Some(Patch {
                level: i64::from(this.patch_level),
                body: this.patch.into_bytes(),
                author: Some(who.to_owned()),
                comment: Some(this.comment.clone()).filter(|c| !c.is_empty()),
                subdir: None,
            }),
            ..Default::default()
        },
        properties: this.properties,
        comment: this.comment,
    })
}

/// Why a force, trigger or try request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No such scheduler of that kind.
    #[error("{0}")]
    NoScheduler(String),
    /// A parameter or field is wrong.
    #[error("{0}")]
    Invalid(String),
}

fn find<'c>(
    config: &'c Config,
    name: &str,
    kind: &str,
    is_kind: impl Fn(&SchedulerKind) -> bool,
) -> Result<&'c Scheduler, RequestError> {
    let of_kind: Vec<&str> = config
        .schedulers
        .iter()
        .filter(|s| is_kind(&s.kind))
        .map(|s| s.name.as_str())
        .collect();
    config
        .scheduler(name)
        .filter(|s| is_kind(&s.kind))
        .ok_or_else(|| {
            RequestError::NoScheduler(format!(
                "there is no {kind} scheduler {name:?} (defined: {})",
                if of_kind.is_empty() {
                    "none".to_string()
                } else {
                    of_kind.join(", ")
                }
            ))
        })
}

fn pick_builders(s: &Scheduler, wanted: &[String]) -> Result<Vec<String>, RequestError> {
    if wanted.is_empty() {
        return Ok(s.builders.clone());
    }
    for b in wanted {
        if !s.builders.contains(b) {
            return Err(RequestError::Invalid(format!(
                "builder {b:?} is not one of scheduler {:?}'s builders ({})",
                s.name,
                s.builders.join(", ")
            )));
        }
    }
    Ok(wanted.to_vec())
}

/// Checks force parameters against their declared types and fills in defaults.
pub fn check_force_parameters(
    s: &Scheduler,
    given: &Map<String, Value>,
) -> Result<Vec<SourcedProperty>, RequestError> {
    let SchedulerKind::Force { parameters } = &s.kind else {
        return Ok(Vec::new());
    };
    let bad = |m: String| RequestError::Invalid(m);
    for name in given.keys() {
        if !parameters.iter().any(|p| &p.name == name) {
            return Err(bad(format!(
                "parameter {name:?} is not one of scheduler {:?}'s ({})",
                s.name,
                parameters
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let mut props = Vec::new();
    for p in parameters {
        let value = given.get(&p.name).filter(|v| !v.is_null());
        let value = match (&p.kind, value) {
            (ForceParameterKind::String { regex, .. }, Some(Value::String(v))) => {
                if let Some(re) = regex {
                    let re = regex::Regex::new(&format!("^(?:{re})$"))
                        .map_err(|e| bad(format!("parameter {:?}: bad regex: {e}", p.name)))?;
                    if !re.is_match(v) {
                        return Err(bad(format!(
                            "parameter {:?}: {v:?} does not match {re}",
                            p.name
                        )));
                    }
                }
                Value::String(v.clone())
            }
            (ForceParameterKind::Int { .. }, Some(Value::Number(n))) if n.is_i64() => {
                Value::Number(n.clone())
            }
            (ForceParameterKind::Int { .. }, Some(Value::String(v))) => Value::from(
                v.trim()
                    .parse::<i64>()
                    .map_err(|_| bad(format!("parameter {:?}: {v:?} is not an integer", p.name)))?,
            ),
            (ForceParameterKind::Bool { .. }, Some(Value::Bool(b))) => Value::Bool(*b),
            (ForceParameterKind::Bool { .. }, Some(Value::String(v))) => {
                match v.trim().to_ascii_lowercase().as_str() {
                    "true" | "yes" | "on" | "1" => Value::Bool(true),
                    "false" | "no" | "off" | "0" | "" => Value::Bool(false),
                    _ => {
                        return Err(bad(format!(
                            "parameter {:?}: {v:?} is not true or false",
                            p.name
                        )));
                    }
                }
            }
            (ForceParameterKind::Choice { choices, .. }, Some(Value::String(v))) => {
                if !choices.contains(v) {
                    return Err(bad(format!(
                        "parameter {:?}: {v:?} is not one of {}",
                        p.name,
                        choices.join(", ")
                    )));
                }
                Value::String(v.clone())
            }
            (kind, Some(v)) => {
                let want = match kind {
                    ForceParameterKind::String { .. } => "a string",
                    ForceParameterKind::Int { .. } => "an integer",
                    ForceParameterKind::Bool { .. } => "true or false",
                    ForceParameterKind::Choice { .. } => "one of the choices, as a string",
                };
                return Err(bad(format!("parameter {:?}: {v} is not {want}", p.name)));
            }
            (kind, None) => {
                let default = match kind {
                    ForceParameterKind::String { default, .. } => default.clone().map(Value::from),
                    ForceParameterKind::Int { default } => default.map(Value::from),
                    ForceParameterKind::Bool { default } => Some(Value::Bool(*default)),
                    ForceParameterKind::Choice { default, .. } => default.clone().map(Value::from),
                };
                match default {
                    Some(d) => d,
                    None if p.required => {
                        return Err(bad(format!("parameter {:?} is required", p.name)));
                    }
                    None => continue,
                }
            }
        };
        props.push(SourcedProperty {
            name: p.name.clone(),
            value,
            source: "Force Build Form".into(),
        });
    }
    Ok(props)
}

/// Forces a build through a force scheduler.
pub async fn force(
    env: &Env<'_>,
    scheduler: &str,
    request: &ForceRequest,
    now: i64,
) -> anyhow::Result<Result<Submitted, RequestError>> {
    let s = match find(env.config, scheduler, "force", |k| {
        matches!(k, SchedulerKind::Force { .. })
    }) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let builders = match pick_builders(s, &request.builders) {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    let params = match check_force_parameters(s, &request.parameters) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let owner = if request.owner.is_empty() {
        "anonymous"
    } else {
        &request.owner
    };
    // Parameters named after source stamp fields fill them, as Buildbot's codebase fields do
    // on its force form (a `branch` parameter picks the branch to build).
    let param = |name: &str| {
        params
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.value.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let mut bs = new_buildset(
        s,
        vec![SourceStamp {
            repository: request
                .repository
                .clone()
                .or_else(|| param("repository"))
                .unwrap_or_default(),
            branch: request.branch.clone().or_else(|| param("branch")),
            revision: request.revision.clone().or_else(|| param("revision")),
            project: request
                .project
                .clone()
                .or_else(|| param("project"))
                .unwrap_or_default(),
            ..Default::default()
        }],
    );
    bs.reason = if request.reason.is_empty() {
        format!("A build was forced by '{owner}'")
    } else {
        format!("A build was forced by '{owner}': {}", request.reason)
    };
    bs.builders = builders
        .into_iter()
        .map(|b| (b, request.priority))
        .collect();
    bs.properties.extend(params);
    bs.properties.push(SourcedProperty {
        name: "owner".into(),
        value: Value::String(owner.into()),
        source: "Force Build Form".into(),
    });
    let mut tx = env.db.begin().await?;
    let submitted = submit(env, &mut tx, &bs, now)
        .await?
        .context("a forced buildset has no idempotency key, so it cannot be a duplicate")?;
    tx.commit().await?;
    Ok(Ok(submitted))
}

/// Builds a build again, as Buildbot's rebuild does: a new buildset with the same source
/// stamps and properties, on the same builder, with the same request priority. The
/// buildset keeps its scheduler, so what follows a build of that scheduler follows this one.
pub async fn rebuild(
    env: &Env<'_>,
    build: BuildId,
    owner: &str,
    now: i64,
) -> anyhow::Result<Result<Submitted, RequestError>> {
    let mut conn = env.db.pool().acquire().await?;
    let Some(row) = db::get_build(&mut conn, build).await? else {
        return Ok(Err(RequestError::NoScheduler(format!("no build {build}"))));
    };
    if !env.builders.contains_key(&row.builder) {
        return Ok(Err(RequestError::Invalid(format!(
            "builder {:?} is no longer in the configuration",
            row.builder
        ))));
    }
    let (request, ..) = db::get_request(&mut conn, row.request)
        .await?
        .context("a build's request is missing")?;
    let (original, mut properties) = db::buildset_with_properties(&mut conn, request.buildset)
        .await?
        .context("a request's buildset is missing")?;
    let sourcestamps = db::buildset_sourcestamps(&mut conn, request.buildset).await?;
    drop(conn);
    properties.retain(|p| p.name != "owner");
    properties.push(SourcedProperty {
        name: "owner".into(),
        value: Value::String(owner.into()),
        source: "Rebuild".into(),
    });
    let bs = NewBuildset {
        scheduler: original.scheduler.unwrap_or_else(|| "rebuild".into()),
        reason: format!(
            "Rebuild of {} #{} by '{owner}' ({})",
            row.builder, row.number, original.reason
        ),
        external_id: None,
        sourcestamps,
        properties,
        builders: vec![(row.builder.clone(), request.priority)],
        trusted: original.trusted,
        parent_build: None,
    };
    let mut tx = env.db.begin().await?;
    let submitted = submit(env, &mut tx, &bs, now)
        .await?
        .context("a rebuild has no idempotency key, so it cannot be a duplicate")?;
    tx.commit().await?;
    Ok(Ok(submitted))
}

/// A trigger step's request to a triggerable scheduler.
#[derive(Debug, Clone, Default)]
pub struct TriggerRequest {
    /// Source stamps (usually the triggering build's).
    pub sourcestamps: Vec<SourceStamp>,
    /// Properties to pass (source "Trigger").
    pub properties: Map<String, Value>,
    /// The triggering build.
    pub parent_build: Option<BuildId>,
    /// Whether the triggering build is trusted.
    pub trusted: bool,
}

/// Starts builds on a triggerable scheduler.
pub async fn trigger(
    env: &Env<'_>,
    scheduler: &str,
    request: &TriggerRequest,
    now: i64,
) -> anyhow::Result<Result<Submitted, RequestError>> {
    let s = match find(env.config, scheduler, "triggerable", |k| {
        matches!(k, SchedulerKind::Triggerable)
    }) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let mut bs = new_buildset(s, request.sourcestamps.clone());
    bs.trusted = request.trusted;
    bs.parent_build = request.parent_build;
    bs.properties
        .extend(request.properties.iter().map(|(n, v)| SourcedProperty {
            name: n.clone(),
            value: v.clone(),
            source: "Trigger".into(),
        }));
    let mut tx = env.db.begin().await?;
    let submitted = submit(env, &mut tx, &bs, now)
        .await?
        .context("a triggered buildset cannot be a duplicate")?;
    tx.commit().await?;
    Ok(Ok(submitted))
}

/// Largest patch a try request may carry: it travels in a JSON request (at most 4 MiB) and,
/// as the git step's argument, in the job a worker receives (at most 8 MiB).
pub const MAX_TRY_PATCH: usize = 2 << 20;

/// A `kiln try` request.
#[derive(Debug, Clone, Default)]
pub struct TryRequest {
    /// Who sends it.
    pub who: String,
    /// Builders (a subset of the scheduler's); empty for all.
    pub builders: Vec<String>,
    /// The base: repository, branch, revision, and the patch on top.
    pub sourcestamp: SourceStamp,
    /// Properties (source "Try").
    pub properties: Map<String, Value>,
    /// A comment for the reason.
    pub comment: String,
}

/// Builds a patch through a try scheduler.
pub async fn try_build(
    env: &Env<'_>,
    scheduler: &str,
    request: &TryRequest,
    now: i64,
) -> anyhow::Result<Result<Submitted, RequestError>> {
    let s = match find(env.config, scheduler, "try", |k| {
        matches!(k, SchedulerKind::Try { .. })
    }) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    if let SchedulerKind::Try { users: Some(users) } = &s.kind
        && !users.contains(&request.who)
    {
        return Ok(Err(RequestError::Invalid(format!(
            "user {:?} may not send try builds to {:?}",
            request.who, s.name
        ))));
    }
    match &request.sourcestamp.patch {
        None => {
            return Ok(Err(RequestError::Invalid(
                "a try build needs a patch (the diff of the working tree)".into(),
            )));
        }
        Some(p) if p.body.len() > MAX_TRY_PATCH => {
            return Ok(Err(RequestError::Invalid(format!(
                "the patch is {} bytes; the limit is {MAX_TRY_PATCH}",
                p.body.len()
            ))));
        }
        Some(_) => {}
    }
    let builders = match pick_builders(s, &request.builders) {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    let mut bs = new_buildset(s, vec![request.sourcestamp.clone()]);
    bs.builders = builders.into_iter().map(|b| (b, 0)).collect();
    bs.reason = format!("'try' job by user {}: {}", request.who, request.comment)
        .trim_end_matches([' ', ':'])
        .to_string();
    bs.properties
        .extend(request.properties.iter().map(|(n, v)| SourcedProperty {
            name: n.clone(),
            value: v.clone(),
            source: "Try".into(),
        }));
    bs.properties.push(SourcedProperty {
        name: "owner".into(),
        value: Value::String(request.who.clone()),
        source: "Try".into(),
    });
    let mut tx = env.db.begin().await?;
    let submitted = submit(env, &mut tx, &bs, now)
        .await?
        .context("a try buildset cannot be a duplicate")?;
    tx.commit().await?;
    Ok(Ok(submitted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn try_body() -> TryBody {
        TryBody {
            baserev: "a".repeat(40),
            patch: "diff --git a/x b/x\n".into(),
            patch_level: 1,
            ..Default::default()
        }
    }

    #[test]
    fn a_try_request_is_checked_before_anything_is_stored() {
        let r = try_request(try_body(), "ada").unwrap();
        let ss = &r.sourcestamp;
        assert_eq!(ss.revision.as_deref(), Some("a".repeat(40).as_str()));
        let patch = ss.patch.as_ref().unwrap();
        assert_eq!((patch.level, patch.author.as_deref()), (1, Some("ada")));
        let bad = |f: &dyn Fn(&mut TryBody)| {
            let mut b = try_body();
            f(&mut b);
            try_request(b, "ada").unwrap_err()
        };
        assert_eq!(
            bad(&|b| b.baserev = "main".into()),
            "baserev \"main\" is not a full commit id (40 or 64 hex digits)"
        );
        assert_eq!(
            bad(&|b| b.patch = " \n".into()),
            "the patch is empty: there is nothing to try"
        );
        assert_eq!(
            bad(&|b| b.patch = "x".repeat(MAX_TRY_PATCH + 1)),
            format!(
                "the patch is {} bytes; the limit is 2 MiB",
                MAX_TRY_PATCH + 1
            )
        );
        assert!(bad(&|b| b.patch = "\u{1}".repeat(MAX_TRY_PATCH / 2)).contains("escaped as JSON"));
        assert!(bad(&|b| b.patch = "a\0b".into()).contains("NUL"));
        assert_eq!(
            bad(&|b| b.patch_level = 99),
            "patch_level 99 is more than 32"
        );
        assert!(
            bad(&|b| {
                b.properties.insert("".into(), Value::Null);
            })
            .starts_with("property \"\":")
        );
        assert!(bad(&|b| b.branch = Some("x".repeat(2000))).starts_with("branch is longer"));
    }
}
