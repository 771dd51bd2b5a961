//! Every query of `kiln-db`, against SQLite and against a real PostgreSQL server.

use kiln_db::model::*;
use kiln_db::{self as db, Db};
use serde_json::json;

use kiln_testkit::db::TestDb;
use kiln_testkit::on_both_databases;

on_both_databases!(
    changes_are_stored_whole_and_deduplicated,
    buildsets_make_one_request_per_builder_and_fire_once,
    the_queue_orders_by_priority_then_age,
    a_claim_has_exactly_one_winner_across_masters,
    buildsets_complete_with_the_worst_result,
    a_buildsets_result_ranks_every_pair_of_results_as_buildbot_does,
    a_buildset_is_read_whole_for_its_builds,
    dead_masters_release_what_they_held,
    scheduler_state_and_held_changes,
    events_are_read_in_order,
    builds_are_numbered_per_builder,
    a_build_advances_and_ends_only_as_its_row_agrees,
    logs_are_stored_compressed_and_read_by_line_range,
    finished_steps_keep_what_they_used,
    modules_are_registered_once_per_version,
    workers_are_synced_from_the_configuration,
    failing_workers_are_quarantined_and_recover,
    stored_json_that_does_not_parse_is_an_error_naming_its_column,
);

fn change(author: &str, branch: &str, key: Option<&str>) -> NewChange {
    NewChange {
        author: author.into(),
        comments: "fix the frobnicator\n\nlong text".into(),
        branch: Some(branch.into()),
        revision: Some("abc123".into()),
        repository: "https://example.org/kiln.git".into(),
        project: "kiln".into(),
        files: vec!["src/main.rs".into(), "README.md".into()],
        properties: json!({"ticket": 42, "labels": ["a", "b"]})
            .as_object()
            .unwrap()
            .clone(),
        source: "test".into(),
        source_key: key.map(str::to_owned),
        ..Default::default()
    }
}

async fn conn(db: &Db) -> sqlx::pool::PoolConnection<sqlx::Any> {
    db.pool().acquire().await.unwrap()
}

async fn add_change(db: &Db, c: &NewChange) -> Option<ChangeId> {
    let mut tx = db.begin().await.unwrap();
    db.serialize_appends(&mut tx).await.unwrap();
    let id = db::insert_change(&mut tx, c, 1_000).await.unwrap();
    tx.commit().await.unwrap();
    id
}

async fn changes_are_stored_whole_and_deduplicated(t: TestDb) {
    let db = &t.db;
    let a = add_change(db, &change("Alice <alice@example.org>", "main", Some("d1")))
        .await
        .unwrap();
    assert_eq!(
        add_change(db, &change("Alice <alice@example.org>", "main", Some("d1"))).await,
        None,
        "a redelivered change is dropped"
    );
    let b = add_change(db, &change("bob", "dev", None)).await.unwrap();
    let c = add_change(db, &change("bob", "dev", None)).await.unwrap();
    assert!(a < b && b < c);
    let mut conn = conn(db).await;
    let all = db::changes_after(&mut conn, ChangeId(0), 10).await.unwrap();
    assert_eq!(all.iter().map(|c| c.id).collect::<Vec<_>>(), vec![a, b, c]);
    let first = &all[0];
    assert_eq!(first.author, "Alice <alice@example.org>");
    assert_eq!(first.comments, "fix the frobnicator\n\nlong text");
    assert_eq!(first.files, vec!["src/main.rs", "README.md"]);
    assert_eq!(first.properties["ticket"], json!(42));
    assert_eq!(first.properties["labels"], json!(["a", "b"]));
    assert_eq!(first.when_ms, 1_000);
    assert!(first.trusted);
    assert_eq!(
        db::changes_after(&mut conn, a, 1).await.unwrap()[0].id,
        b,
        "after and limit"
    );
    assert_eq!(db::last_change_id(&mut conn).await.unwrap(), c);
    assert_eq!(db::count_changes(&mut conn).await.unwrap(), 3);
    assert_eq!(
        db::get_change(&mut conn, b).await.unwrap().unwrap().branch,
        Some("dev".into())
    );
    assert_eq!(
        db::get_change(&mut conn, ChangeId(999)).await.unwrap(),
        None
    );
}

fn buildset(scheduler: &str, key: Option<&str>, builders: &[(&str, i64)]) -> NewBuildset {
    NewBuildset {
        scheduler: scheduler.into(),
        reason: format!("scheduler {scheduler}"),
        external_id: key.map(str::to_owned),
        sourcestamps: vec![SourceStamp {
            repository: "https://example.org/kiln.git".into(),
            branch: Some("main".into()),
            revision: Some("abc".into()),
            ..Default::default()
        }],
        properties: vec![SourcedProperty {
            name: "reason_code".into(),
            value: json!(7),
            source: "Scheduler".into(),
        }],
        builders: builders.iter().map(|(b, p)| (b.to_string(), *p)).collect(),
        trusted: true,
        parent_build: None,
    }
}

async fn add_buildset(
    db: &Db,
    bs: &NewBuildset,
    now: i64,
) -> Option<(BuildsetId, Vec<(BuildRequestId, String)>)> {
    let mut tx = db.begin().await.unwrap();
    let ids = db::builder_ids(&mut tx).await.unwrap();
    let out = db::insert_buildset(&mut tx, bs, &ids, now).await.unwrap();
    tx.commit().await.unwrap();
    out
}

async fn buildsets_make_one_request_per_builder_and_fire_once(t: TestDb) {
    let db = &t.db;
    let mut conn = conn(db).await;
    let ids = db::sync_builders(
        &mut conn,
        &[
            ("linux".into(), "Linux".into(), vec!["os".into()]),
            ("mac".into(), String::new(), vec![]),
        ],
    )
    .await
    .unwrap();
    assert_eq!(ids.len(), 2);
    let a = add_change(db, &change("Alice <a@x.org>", "main", None))
        .await
        .unwrap();
    let b = add_change(db, &change("Bob <b@x.org>", "main", None))
        .await
        .unwrap();
    let mut bs = buildset("nightly", Some("fire:1"), &[("linux", 0), ("mac", 5)]);
    bs.sourcestamps[0].changes = vec![a, b];
    bs.sourcestamps[0].patch = Some(Patch {
        level: 1,
        body: b"--- a\n+++ b\n".to_vec(),
        author: Some("alice".into()),
        comment: None,
        subdir: None,
    });
    let (set, requests) = add_buildset(db, &bs, 5).await.unwrap();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        add_buildset(db, &bs, 6).await,
        None,
        "the same external id never makes a second buildset"
    );
    // A builder the configuration no longer has still gets a row.
    let (_, gone) = add_buildset(db, &buildset("nightly", Some("fire:2"), &[("old", 0)]), 7)
        .await
        .unwrap();
    assert_eq!(gone[0].1, "old");

    let got = db::get_buildset(&mut conn, set).await.unwrap().unwrap();
    assert_eq!(got.scheduler.as_deref(), Some("nightly"));
    assert!(!got.complete);
    let stamps = db::buildset_sourcestamps(&mut conn, set).await.unwrap();
    assert_eq!(stamps[0].changes, vec![a, b]);
    assert_eq!(stamps[0].patch.as_ref().unwrap().body, b"--- a\n+++ b\n");
    let props = db::buildset_properties(&mut conn, set).await.unwrap();
    assert_eq!(props[0].value, json!(7));
    assert_eq!(props[0].source, "Scheduler");
    assert_eq!(
        db::blamelist(&mut conn, set).await.unwrap(),
        vec!["Alice <a@x.org>", "Bob <b@x.org>"]
    );
    assert_eq!(
        db::buildsets_of(&mut conn, "nightly").await.unwrap().len(),
        2
    );
    // Re-syncing without "mac" deactivates it but keeps its id.
    let again = db::sync_builders(&mut conn, &[("linux".into(), String::new(), vec![])])
        .await
        .unwrap();
    assert_eq!(again["linux"], ids["linux"]);
    assert_eq!(db::builder_ids(&mut conn).await.unwrap()["mac"], ids["mac"]);
}

async fn the_queue_orders_by_priority_then_age(t: TestDb) {
    let db = &t.db;
    let mut conn = conn(db).await;
    db::sync_builders(&mut conn, &[("b".into(), String::new(), vec![])])
        .await
        .unwrap();
    let (_, old) = add_buildset(db, &buildset("s", None, &[("b", 0)]), 10)
        .await
        .unwrap();
    let (_, new) = add_buildset(db, &buildset("s", None, &[("b", 0)]), 20)
        .await
        .unwrap();
    let (_, urgent) = add_buildset(db, &buildset("s", None, &[("b", 9)]), 30)
        .await
        .unwrap();
    let q = db::queued_requests(&mut conn, Some("b"), 10, 0)
        .await
        .unwrap();
    assert_eq!(
        q.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![urgent[0].0, old[0].0, new[0].0]
    );
    assert_eq!(q[1].submitted_ms, 10);
    assert_eq!(q[0].priority, 9);
    assert_eq!(
        db::queue_summary(&mut conn).await.unwrap(),
        vec![("b".to_string(), 3, 10)]
    );
    // The dispatcher's cheaper view: each builder's oldest unclaimed request, without counting.
    assert_eq!(
        db::queue_heads(&mut conn).await.unwrap(),
        vec![("b".to_string(), 10)]
    );
    let m = db::register_master(&mut conn, "m", 1).await.unwrap();
    assert!(db::claim_request(&mut conn, old[0].0, m, 40).await.unwrap());
    assert_eq!(
        db::queue_heads(&mut conn).await.unwrap(),
        vec![("b".to_string(), 20)],
        "a claimed request is not queued"
    );
    assert!(
        db::queued_requests(&mut conn, Some("nope"), 10, 0)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_claim_has_exactly_one_winner_across_masters(t: TestDb) {
    // Two masters, each with its own pool, claim the same requests at once.
    let other = Db::connect(&t.url).await.unwrap();
    let db = &t.db;
    let m1 = db::register_master(&mut *conn(db).await, "m1", 1)
        .await
        .unwrap();
    let m2 = db::register_master(&mut *conn(&other).await, "m2", 1)
        .await
        .unwrap();
    let mut requests = Vec::new();
    for _ in 0..20 {
        let (_, r) = add_buildset(db, &buildset("s", None, &[("b", 0)]), 1)
            .await
            .unwrap();
        requests.push(r[0].0);
    }
    let race = |db: Db, master: MasterId, requests: Vec<BuildRequestId>| async move {
        let mut won = Vec::new();
        for r in requests {
            let mut c = db.pool().acquire().await.unwrap();
            if db::claim_request(&mut c, r, master, 2).await.unwrap() {
                won.push(r);
            }
        }
        won
    };
    let mut reversed = requests.clone();
    reversed.reverse();
    let (w1, w2) = tokio::join!(
        tokio::spawn(race(db.clone(), m1, requests.clone())),
        tokio::spawn(race(other.clone(), m2, reversed))
    );
    let (w1, w2) = (w1.unwrap(), w2.unwrap());
    assert_eq!(w1.len() + w2.len(), 20, "{w1:?} {w2:?}");
    assert!(w1.iter().all(|r| !w2.contains(r)));
    let mut c = conn(db).await;
    assert!(
        db::queued_requests(&mut c, None, 100, 0)
            .await
            .unwrap()
            .is_empty()
    );
    // Only the holder can complete or unclaim.
    let r = w1.first().copied().unwrap_or_else(|| w2[0]);
    let (holder, stranger) = if w1.contains(&r) { (m1, m2) } else { (m2, m1) };
    assert_eq!(db::claimed_by(&mut c, r).await.unwrap(), Some(holder));
    assert!(
        db::complete_request(&mut c, r, stranger, Results::Success, None, 3)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        db::unclaim_requests(&mut c, &[r], stranger).await.unwrap(),
        0
    );
    assert_eq!(db::unclaim_requests(&mut c, &[r], holder).await.unwrap(), 1);
    assert_eq!(
        db::queued_requests(&mut c, None, 100, 0)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(db::claim_request(&mut c, r, stranger, 4).await.unwrap());
    assert!(
        db::complete_request(&mut c, r, stranger, Results::Success, None, 5)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        !db::claim_request(&mut c, r, holder, 6).await.unwrap(),
        "a complete request cannot be claimed"
    );
}

async fn buildsets_complete_with_the_worst_result(t: TestDb) {
    let db = &t.db;
    let mut c = conn(db).await;
    let m = db::register_master(&mut c, "m", 1).await.unwrap();
    let (set, reqs) = add_buildset(db, &buildset("s", None, &[("a", 0), ("b", 0), ("c", 0)]), 1)
        .await
        .unwrap();
    for (r, _) in &reqs {
        assert!(db::claim_request(&mut c, *r, m, 2).await.unwrap());
    }
    assert!(
        db::complete_request(&mut c, reqs[0].0, m, Results::Warnings, None, 3)
            .await
            .unwrap()
            == Some(set)
    );
    assert_eq!(
        db::complete_buildset_if_done(&mut c, set, 3).await.unwrap(),
        None
    );
    assert!(
        db::complete_request(&mut c, reqs[1].0, m, Results::Failure, None, 4)
            .await
            .unwrap()
            == Some(set)
    );
    assert!(db::mark_first_failure(&mut c, set, 4).await.unwrap());
    assert!(
        !db::mark_first_failure(&mut c, set, 5).await.unwrap(),
        "only once"
    );
    assert!(
        db::complete_request(&mut c, reqs[1].0, m, Results::Success, None, 5)
            .await
            .unwrap()
            .is_none(),
        "a complete request stays complete"
    );
    assert!(
        db::complete_request(&mut c, reqs[2].0, m, Results::Skipped, Some(reqs[0].0), 6)
            .await
            .unwrap()
            == Some(set)
    );
    assert_eq!(
        db::complete_buildset_if_done(&mut c, set, 7).await.unwrap(),
        Some((Results::Failure, Some("s".into())))
    );
    assert_eq!(
        db::complete_buildset_if_done(&mut c, set, 8).await.unwrap(),
        None,
        "completed once"
    );
    let bs = db::get_buildset(&mut c, set).await.unwrap().unwrap();
    assert!(bs.complete);
    assert_eq!(bs.results, Some(Results::Failure));
    assert_eq!(bs.first_failure_ms, Some(4));
    let (_, complete, results, collapsed) =
        db::get_request(&mut c, reqs[2].0).await.unwrap().unwrap();
    assert!(complete);
    assert_eq!(results, Some(Results::Skipped));
    assert_eq!(collapsed, Some(reqs[0].0));
}

async fn a_buildsets_result_ranks_every_pair_of_results_as_buildbot_does(t: TestDb) {
    // The buildset's result is ranked in SQL; it must agree with `Outcome::worst` (from
    // SUCCESS) for every pair, SKIPPED below SUCCESS and CANCELLED above all.
    let db = &t.db;
    let mut c = conn(db).await;
    let m = db::register_master(&mut c, "m", 1).await.unwrap();
    for a in Results::ALL {
        for b in Results::ALL {
            let (set, reqs) = add_buildset(db, &buildset("s", None, &[("a", 0), ("b", 0)]), 1)
                .await
                .unwrap();
            for ((r, _), result) in reqs.iter().zip([a, b]) {
                assert!(db::claim_request(&mut c, *r, m, 2).await.unwrap());
                db::complete_request(&mut c, *r, m, result, None, 3)
                    .await
                    .unwrap();
            }
            assert_eq!(
                db::complete_buildset_if_done(&mut c, set, 4).await.unwrap(),
                Some((Results::Success.worst(a).worst(b), Some("s".into()))),
                "{a} and {b}"
            );
        }
    }
}

async fn a_buildset_is_read_whole_for_its_builds(t: TestDb) {
    // What starting a build reads in two queries (the buildset with its properties, the
    // stamps with their changes) is what the one-thing-at-a-time reads return.
    let db = &t.db;
    let mut c = conn(db).await;
    let first = add_change(db, &change("ada", "main", None)).await.unwrap();
    let second = add_change(db, &change("bob", "main", None)).await.unwrap();
    let mut bs = buildset("s", None, &[("a", 0)]);
    bs.sourcestamps[0].changes = vec![first, second];
    bs.sourcestamps.push(SourceStamp {
        codebase: "docs".into(),
        repository: "https://example.org/docs.git".into(),
        ..Default::default()
    });
    bs.properties.push(SourcedProperty {
        name: "jobs".into(),
        value: json!(4),
        source: "Force Build Form".into(),
    });
    let (set, _) = add_buildset(db, &bs, 3).await.unwrap();
    let (read, props) = db::buildset_with_properties(&mut c, set)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read, db::get_buildset(&mut c, set).await.unwrap().unwrap());
    assert_eq!(props, db::buildset_properties(&mut c, set).await.unwrap());
    assert_eq!(props.len(), 2);
    let stamps = db::buildset_sourcestamps(&mut c, set).await.unwrap();
    assert_eq!(stamps.len(), 2);
    assert_eq!(stamps[0].codebase, "");
    assert_eq!(stamps[0].changes, vec![first, second]);
    assert_eq!(stamps[1].codebase, "docs");
    assert!(stamps[1].changes.is_empty());
    // A buildset without properties still reads; a missing one reads as none.
    let mut bare = buildset("t", None, &[("a", 0)]);
    bare.properties.clear();
    let (bare_set, _) = add_buildset(db, &bare, 4).await.unwrap();
    let (read, props) = db::buildset_with_properties(&mut c, bare_set)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.scheduler.as_deref(), Some("t"));
    assert!(props.is_empty());
    assert!(
        db::buildset_with_properties(&mut c, BuildsetId(999_999))
            .await
            .unwrap()
            .is_none()
    );
}

async fn dead_masters_release_what_they_held(t: TestDb) {
    let db = &t.db;
    let mut c = conn(db).await;
    let m1 = db::register_master(&mut c, "m1", 100).await.unwrap();
    let m2 = db::register_master(&mut c, "m2", 100).await.unwrap();
    assert_eq!(db::register_master(&mut c, "m1", 150).await.unwrap(), m1);
    db::heartbeat(&mut c, m2, 500).await.unwrap();
    assert_eq!(
        db::stale_masters(&mut c, 400).await.unwrap(),
        vec![(m1, "m1".to_string())]
    );
    let (_, reqs) = add_buildset(db, &buildset("s", None, &[("a", 0), ("b", 0)]), 1)
        .await
        .unwrap();
    assert!(db::claim_request(&mut c, reqs[0].0, m1, 2).await.unwrap());
    assert!(db::claim_request(&mut c, reqs[1].0, m1, 2).await.unwrap());
    // The second has a build in progress: the worker reconciliation owns it.
    db::insert_build(&mut c, reqs[1].0, None, m1, "cookie", 3)
        .await
        .unwrap();
    assert!(db::claim_scheduler(&mut c, "nightly", m1, 3).await.unwrap());
    assert!(!db::claim_scheduler(&mut c, "nightly", m2, 3).await.unwrap());
    let released = db::release_master_claims(&mut c, m1).await.unwrap();
    assert_eq!(released, vec![reqs[0].0]);
    db::deactivate_master(&mut c, m1).await.unwrap();
    assert!(db::stale_masters(&mut c, 400).await.unwrap().is_empty());
    assert!(db::claim_scheduler(&mut c, "nightly", m2, 4).await.unwrap());
    db::release_scheduler(&mut c, "nightly", m2).await.unwrap();
    assert!(db::claim_scheduler(&mut c, "nightly", m1, 5).await.unwrap());
}

async fn scheduler_state_and_held_changes(t: TestDb) {
    let db = &t.db;
    let mut c = conn(db).await;
    assert_eq!(db::get_state(&mut c, "s", "next").await.unwrap(), None);
    db::set_state(&mut c, "s", "next", &json!(5)).await.unwrap();
    db::set_state(&mut c, "s", "next", &json!(6)).await.unwrap();
    db::set_state(&mut c, "s", "timer:main", &json!({"at": 1}))
        .await
        .unwrap();
    db::set_state(&mut c, "other", "timer:x", &json!(0))
        .await
        .unwrap();
    assert_eq!(
        db::get_state(&mut c, "s", "next").await.unwrap(),
        Some(json!(6))
    );
    assert_eq!(
        db::state_with_prefix(&mut c, "s", "timer:").await.unwrap(),
        vec![("timer:main".to_string(), json!({"at": 1}))]
    );
    db::delete_state(&mut c, "s", "next").await.unwrap();
    assert_eq!(db::get_state(&mut c, "s", "next").await.unwrap(), None);

    let a = add_change(db, &change("a", "main", None)).await.unwrap();
    let b = add_change(db, &change("b", "main", None)).await.unwrap();
    db::classify_change(&mut c, "s", b, false).await.unwrap();
    db::classify_change(&mut c, "s", a, true).await.unwrap();
    db::classify_change(&mut c, "s", a, false).await.unwrap();
    assert_eq!(
        db::classified_changes(&mut c, "s").await.unwrap(),
        vec![(a, true), (b, false)]
    );
    db::flush_classified(&mut c, "s", &[a]).await.unwrap();
    assert_eq!(
        db::classified_changes(&mut c, "s").await.unwrap(),
        vec![(b, false)]
    );
}

async fn events_are_read_in_order(t: TestDb) {
    let db = &t.db;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut tx = db.begin().await.unwrap();
        db.serialize_appends(&mut tx).await.unwrap();
        ids.push(
            db::insert_event(
                &mut tx,
                "buildset.complete",
                i,
                &json!({"results": i}),
                10 + i,
            )
            .await
            .unwrap(),
        );
        tx.commit().await.unwrap();
    }
    let mut c = conn(db).await;
    let events = db::events_after(&mut c, ids[1], 2).await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].id, ids[2]);
    assert_eq!(events[0].subject, 2);
    assert_eq!(events[0].payload, json!({"results": 2}));
    assert_eq!(db::last_event_id(&mut c).await.unwrap(), ids[4]);
}

/// A JSON column damaged outside the master (by hand, by another program) is an error that
/// names the column, never a `null` the master would act on.
async fn stored_json_that_does_not_parse_is_an_error_naming_its_column(t: TestDb) {
    let db = &t.db;
    let mut tx = db.begin().await.unwrap();
    db.serialize_appends(&mut tx).await.unwrap();
    let id = db::insert_event(&mut tx, "buildset.complete", 1, &json!({}), 10)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut c = conn(db).await;
    sqlx::query("UPDATE events SET payload = $1 WHERE id = $2")
        .bind("{\"results\": 2,")
        .bind(id)
        .execute(&mut *c)
        .await
        .unwrap();
    match db::events_after(&mut c, 0, 10).await {
        Err(sqlx::Error::ColumnDecode { index, .. }) => {
            assert!(index.contains("payload"), "{index}")
        }
        other => panic!("a damaged payload read as {other:?}"),
    }
}

async fn a_build_advances_and_ends_only_as_its_row_agrees(t: TestDb) {
    let db = &t.db;
    let mut c = conn(db).await;
    let m = db::register_master(&mut c, "m", 1).await.unwrap();
    let workers = db::sync_workers(&mut c, &[("w".into(), json!({}))])
        .await
        .unwrap();
    let w = workers["w"];
    let (_, r) = add_buildset(db, &buildset("s", None, &[("a", 0)]), 1)
        .await
        .unwrap();
    let (b, _) = db::insert_build(&mut c, r[0].0, Some(w), m, "k", 2)
        .await
        .unwrap();
    assert!(
        db::advance_build(&mut c, b, "k", w, 1, 3, None)
            .await
            .unwrap()
    );
    let row = db::get_build(&mut c, b).await.unwrap().unwrap();
    assert_eq!(row.complete_at, None, "advancing alone does not end it");
    // Out of order, a stale cookie or another worker: nothing is written.
    let end = db::BuildEnd {
        results: Results::Warnings,
        state: "1 warning",
        at: 9,
    };
    assert!(
        !db::advance_build(&mut c, b, "k", w, 3, 5, Some(end))
            .await
            .unwrap()
    );
    assert!(
        !db::advance_build(&mut c, b, "stale", w, 4, 5, Some(end))
            .await
            .unwrap()
    );
    assert_eq!(
        db::get_build(&mut c, b).await.unwrap().unwrap().complete_at,
        None
    );
    // The next messages, ending the build: one statement records and ends it.
    assert!(
        db::advance_build(&mut c, b, "k", w, 4, 5, Some(end))
            .await
            .unwrap()
    );
    let row = db::get_build(&mut c, b).await.unwrap().unwrap();
    assert_eq!(row.complete_at, Some(9));
    assert_eq!(row.results, Some(Results::Warnings));
    assert_eq!(row.state, "1 warning");
    assert!(
        !db::advance_build(&mut c, b, "k", w, 6, 6, None)
            .await
            .unwrap(),
        "an ended build takes no more messages"
    );
}

async fn builds_are_numbered_per_builder(t: TestDb) {
    let db = &t.db;
    let mut c = conn(db).await;
    let m = db::register_master(&mut c, "m", 1).await.unwrap();
    let (_, r) = add_buildset(db, &buildset("s", None, &[("a", 0), ("b", 0)]), 1)
        .await
        .unwrap();
    let (_, r2) = add_buildset(db, &buildset("s", None, &[("a", 0)]), 1)
        .await
        .unwrap();
    let (b1, n1) = db::insert_build(&mut c, r[0].0, None, m, "k1", 2)
        .await
        .unwrap();
    let (_, n2) = db::insert_build(&mut c, r[1].0, None, m, "k2", 2)
        .await
        .unwrap();
    let (b3, n3) = db::insert_build(&mut c, r2[0].0, None, m, "k3", 2)
        .await
        .unwrap();
    assert_eq!((n1, n2, n3), (1, 1, 2));
    assert_ne!(b1, b3);
    db::set_build_properties(
        &mut c,
        b1,
        &[SourcedProperty {
            name: "got_revision".into(),
            value: json!("abc"),
            source: "Step git".into(),
        }],
    )
    .await
    .unwrap();
    assert_eq!(
        db::build_properties(&mut c, b1).await.unwrap()[0].source,
        "Step git"
    );
    assert!(
        db::finish_build(&mut c, b1, Results::Success, "done", 9)
            .await
            .unwrap()
    );
    assert!(
        !db::finish_build(&mut c, b1, Results::Failure, "again", 9)
            .await
            .unwrap()
    );
}

async fn logs_are_stored_compressed_and_read_by_line_range(t: TestDb) {
    let db = &t.db;
    let mut c = conn(db).await;
    let m = db::register_master(&mut c, "m", 1).await.unwrap();
    let (_, r) = add_buildset(db, &buildset("s", None, &[("a", 0)]), 1)
        .await
        .unwrap();
    let (build, _) = db::insert_build(&mut c, r[0].0, None, m, "k", 2)
        .await
        .unwrap();
    let step = db::insert_step(&mut c, &db::NewStep::started(build, 0, "compile", 3))
        .await
        .unwrap();
    let log = db::insert_log(&mut c, step, "stdio", "s", "", false)
        .await
        .unwrap();
    assert!(
        db::insert_log(&mut c, step, "stdio", "s", "", false)
            .await
            .is_err(),
        "one stdio"
    );
    let big: String = (0..1000).map(|i| format!("line {i}\n")).collect();
    assert_eq!(db::append_log(&mut c, log, "a\nb\n").await.unwrap(), 2);
    assert_eq!(db::append_log(&mut c, log, &big).await.unwrap(), 1002);
    assert_eq!(db::append_log(&mut c, log, "").await.unwrap(), 1002);
    assert_eq!(
        db::log_lines(&mut c, log, 1, 3).await.unwrap(),
        vec!["b", "line 0", "line 1"]
    );
    assert_eq!(
        db::log_lines(&mut c, log, 1000, 5000).await.unwrap(),
        vec!["line 998", "line 999"]
    );
    let stored: i64 =
        sqlx::query_scalar("SELECT SUM(LENGTH(content)) FROM logchunks WHERE log_id = $1")
            .bind(log)
            .fetch_one(&mut *c)
            .await
            .unwrap();
    assert!(stored < big.len() as i64 / 3, "compressed: {stored} bytes");
    // A log written whole as it is first seen: its text, its counts and its state at once.
    let whole = db::insert_log(&mut c, step, "test results", "s", &big, true)
        .await
        .unwrap();
    assert_eq!(
        db::log_lines(&mut c, whole, 998, 5000).await.unwrap(),
        vec!["line 998", "line 999"]
    );
    assert_eq!(db::append_log(&mut c, whole, "more\n").await.unwrap(), 1001);
    let (lines, bytes, complete): (i64, i64, i64) =
        sqlx::query_as("SELECT num_lines, num_bytes, complete FROM logs WHERE id = $1")
            .bind(whole)
            .fetch_one(&mut *c)
            .await
            .unwrap();
    assert_eq!((lines, bytes, complete), (1001, big.len() as i64 + 5, 1));
}

async fn finished_steps_keep_what_they_used(t: TestDb) {
    let db = &t.db;
    let mut c = conn(db).await;
    let m = db::register_master(&mut c, "m", 1).await.unwrap();
    let (_, r) = add_buildset(db, &buildset("s", None, &[("a", 0)]), 1)
        .await
        .unwrap();
    let (build, _) = db::insert_build(&mut c, r[0].0, None, m, "k", 2)
        .await
        .unwrap();
    let used = kiln_protocol::StepResources {
        commands: 3,
        cpu_ms: 1500,
        peak_rss_bytes: Some(5 << 30),
        guest_memory_bytes: 2 << 20,
        observer_memory_bytes: None,
    };
    // Steps 0 and 1 are ended by an update; 2 and 3 are written whole, as a step that starts
    // and ends in one batch of its worker's messages is: the rows must not differ.
    for (number, resources) in [(0, Some(used)), (1, None), (2, Some(used)), (3, None)] {
        let end = db::StepEnd {
            results: Results::Warnings,
            state: "2 warnings",
            hidden: true,
            urls: &json!([{"name": "report", "url": "https://ci.example/r"}]),
            statistics: &json!({"warnings": 2}),
            progress: &json!({"files": 7}),
            resources,
        };
        let mut step = db::NewStep::started(build, number, "compile", 3);
        if number < 2 {
            let id = db::insert_step(&mut c, &step).await.unwrap();
            db::finish_step(&mut c, id, &end, 4).await.unwrap();
        } else {
            step.end = Some((end, 4));
            db::insert_step(&mut c, &step).await.unwrap();
        }
    }
    type Row = (
        i64,
        Option<i64>,
        Option<i64>,
        String,
        i64,
        String,
        String,
        String,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT started_at, complete_at, results, state_string, hidden, urls, statistics,
                progress
         FROM steps WHERE build_id = $1 ORDER BY number",
    )
    .bind(build.0)
    .fetch_all(&mut *c)
    .await
    .unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0], rows[2]);
    assert_eq!(rows[1], rows[3]);
    assert_eq!(
        (rows[0].1, rows[0].2, rows[0].3.as_str(), rows[0].4),
        (Some(4), Some(1), "2 warnings", 1)
    );
    type Figures = (Option<i64>, Option<i64>, Option<i64>, Option<i64>);
    let rows: Vec<Figures> = sqlx::query_as(
        "SELECT cpu_ms, peak_rss_bytes, guest_memory_bytes, observer_memory_bytes FROM steps
         WHERE build_id = $1 ORDER BY number",
    )
    .bind(build.0)
    .fetch_all(&mut *c)
    .await
    .unwrap();
    let figures = (Some(1500), Some(5 << 30), Some(2 << 20), None);
    let none = (None, None, None, None);
    assert_eq!(rows, vec![figures, none, figures, none]);
    // A running step's summary and progress are written with it too.
    let mut running = db::NewStep::started(build, 4, "test", 5);
    running.state = "12 tests";
    let progress = json!({"tests": 12});
    running.progress = Some(&progress);
    let id = db::insert_step(&mut c, &running).await.unwrap();
    let (state, stored, complete): (String, String, Option<i64>) =
        sqlx::query_as("SELECT state_string, progress, complete_at FROM steps WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *c)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), stored.as_str(), complete),
        ("12 tests", r#"{"tests":12}"#, None)
    );
}

async fn modules_are_registered_once_per_version(t: TestDb) {
    let db = &t.db;
    let mut c = conn(db).await;
    let sha1 = "a".repeat(40);
    assert!(
        db::insert_file(&mut c, &sha1, &"b".repeat(64), b"\0asm", 1)
            .await
            .unwrap()
    );
    assert!(
        !db::insert_file(&mut c, &sha1, &"b".repeat(64), b"\0asm", 1)
            .await
            .unwrap()
    );
    assert_eq!(
        db::get_file(&mut c, &sha1).await.unwrap(),
        Some(("b".repeat(64), b"\0asm".to_vec()))
    );
    let m = db::StepModule {
        name: "lint".into(),
        version: "1.0".into(),
        kind: "step".into(),
        sha1: sha1.clone(),
        sha256: "b".repeat(64),
        size: 4,
        uploaded_ms: 1,
    };
    assert!(db::insert_step_module(&mut c, &m).await.unwrap());
    assert!(!db::insert_step_module(&mut c, &m).await.unwrap());
    let v2 = db::StepModule {
        version: "2.0".into(),
        uploaded_ms: 2,
        ..m.clone()
    };
    assert!(db::insert_step_module(&mut c, &v2).await.unwrap());
    let all = db::step_modules(&mut c, Some("lint")).await.unwrap();
    assert_eq!(
        all.iter().map(|m| m.version.as_str()).collect::<Vec<_>>(),
        vec!["2.0", "1.0"]
    );
    assert_eq!(db::step_modules(&mut c, None).await.unwrap().len(), 2);
    assert!(
        db::step_modules(&mut c, Some("x"))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn workers_are_synced_from_the_configuration(t: TestDb) {
    let db = &t.db;
    let mut c = conn(db).await;
    let first = db::sync_workers(
        &mut c,
        &[
            ("w1".into(), json!({"arch": "x86_64", "sandbox": false})),
            ("w2".into(), json!({"sandbox": true})),
        ],
    )
    .await
    .unwrap();
    let again = db::sync_workers(&mut c, &[("w1".into(), json!({"arch": "aarch64"}))])
        .await
        .unwrap();
    assert_eq!(
        again["w1"], first["w1"],
        "a worker keeps its id across reloads"
    );
    let rows: Vec<(String, String, String, String)> =
        sqlx::query_as("SELECT name, info, state, health FROM workers ORDER BY name")
            .fetch_all(&mut *c)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![
            (
                "w1".to_string(),
                r#"{"arch":"aarch64"}"#.to_string(),
                "offline".to_string(),
                "ok".to_string()
            ),
            (
                "w2".to_string(),
                r#"{"sandbox":true}"#.to_string(),
                "offline".to_string(),
                "ok".to_string()
            ),
        ],
        "a worker removed from the configuration keeps its row and history"
    );
}

async fn failing_workers_are_quarantined_and_recover(t: TestDb) {
    // The master's rule (master::workers::QUARANTINE_AFTER and quarantine_ms, tested with
    // them): quarantined from the third failure in a row, 30 s doubling up to an hour.
    const QUARANTINE_AFTER: i64 = 3;
    fn quarantine_ms(failures: i64) -> i64 {
        (30_000i64 << (failures - QUARANTINE_AFTER).clamp(0, 7)).min(3_600_000)
    }
    let db = &t.db;
    let mut c = conn(db).await;
    db::sync_workers(&mut c, &[("w1".into(), json!({}))])
        .await
        .unwrap();
    let fail = |note: &'static str, now: i64| {
        let db = db.clone();
        async move {
            let mut c = db.pool().acquire().await.unwrap();
            db::record_worker_outcome(
                &mut c,
                "w1",
                Some(note),
                QUARANTINE_AFTER,
                quarantine_ms,
                now,
            )
            .await
            .unwrap()
            .unwrap()
        }
    };
    let h = fail("lost while running build 1", 1_000).await;
    assert_eq!(
        (h.health.as_str(), h.failure_count, h.quarantine_until),
        ("ok", 1, None)
    );
    fail("rejected build 2: full", 2_000).await;
    let h = fail("could not fetch a module", 3_000).await;
    assert_eq!(h.health, "failed");
    assert_eq!(h.quarantine_until, Some(3_000 + 30_000));
    assert_eq!(h.notes, "could not fetch a module");
    // Each further failure doubles the quarantine.
    let h = fail("lost again", 40_000).await;
    assert_eq!(h.quarantine_until, Some(40_000 + 60_000));
    assert_eq!(db::worker_health(&mut c).await.unwrap()["w1"], h);
    // A build it runs properly makes it healthy again.
    let h = db::record_worker_outcome(&mut c, "w1", None, QUARANTINE_AFTER, quarantine_ms, 50_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (h.health.as_str(), h.failure_count, h.quarantine_until),
        ("ok", 0, None)
    );
    assert_eq!(h.notes, "");
    // An unknown worker has no health.
    assert!(
        db::record_worker_outcome(&mut c, "nobody", None, QUARANTINE_AFTER, quarantine_ms, 0)
            .await
            .unwrap()
            .is_none()
    );
}
