//! What a worker has to tell the master about its builds, kept until the master acknowledges
//! it. Each build's messages are numbered from 1; at most [`WINDOW`] may be unacknowledged,
//! so a build whose log outruns the master (or whose master is away) waits: backpressure. On
//! a reconnect, what the master did not apply is sent again.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use kiln_protocol::{BuildEvent, BuildRef, Running, ToMaster, WINDOW};

/// One build's messages.
#[derive(Debug)]
struct Queue {
    build: BuildRef,
    /// The number of the next message.
    next_seq: u64,
    /// The last number the master applied.
    acked: u64,
    /// The last number written to the current connection.
    sent: u64,
    /// Messages after `acked`, serialized, with their numbers.
    pending: VecDeque<(u64, String)>,
    /// The build's last message has been queued.
    finished: bool,
}

/// The outbox of all builds of one worker.
#[derive(Debug, Default)]
pub struct Outbox {
    queues: Mutex<BTreeMap<i64, Queue>>,
    room: Condvar,
    /// Wakes the connection's writer.
    pub ready: tokio::sync::Notify,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, Queue>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a build's queue.
    pub fn open(&self, build: BuildRef) {
        self.lock().insert(
            build.id,
            Queue {
                build,
                next_seq: 1,
                acked: 0,
                sent: 0,
                pending: VecDeque::new(),
                finished: false,
            },
        );
    }

    /// Queues an event of build `id`, waiting while [`WINDOW`] messages are unacknowledged.
    /// Blocks: call it from the build's own thread. A build the master abandoned (its queue
    /// is gone) drops the event.
    pub fn push(&self, id: i64, event: BuildEvent) {
        let finished = matches!(event, BuildEvent::Finished { .. });
        let mut queues = self.lock();
        loop {
            match queues.get(&id) {
                None => return,
                Some(q) if (q.pending.len() as u64) < WINDOW || finished => break,
                Some(_) => {
                    queues = self
                        .room
                        .wait_timeout(queues, Duration::from_millis(200))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        let Some(q) = queues.get_mut(&id) else { return };
        let seq = q.next_seq;
        q.next_seq += 1;
        q.finished |= finished;
        let message = ToMaster::Build {
            build: q.build.clone(),
            seq,
            event,
        };
        match serde_json::to_string(&message) {
            Ok(text) => q.pending.push_back((seq, text)),
            Err(error) => tracing::error!(%error, "a build message could not be serialized"),
        }
        drop(queues);
        self.ready.notify_one();
    }

    /// The master applied build `id`'s messages up to `seq`. A finished build whose last
    /// message is applied leaves the outbox. Returns whether it did.
    pub fn ack(&self, build: &BuildRef, seq: u64) -> bool {
        let mut queues = self.lock();
        let Some(q) = queues.get_mut(&build.id).filter(|q| q.build == *build) else {
            return false;
        };
        while q.pending.front().is_some_and(|(s, _)| *s <= seq) {
            q.pending.pop_front();
        }
        q.acked = q.acked.max(seq);
        q.sent = q.sent.max(q.acked);
        let gone = q.finished && q.pending.is_empty();
        if gone {
            queues.remove(&build.id);
        }
        drop(queues);
        self.room.notify_all();
        gone
    }

    /// Messages not yet written to this connection, in order per build; marks them written.
    pub fn unsent(&self) -> Vec<String> {
        let mut queues = self.lock();
        let mut out = Vec::new();
        for q in queues.values_mut() {
            for (seq, text) in &q.pending {
                if *seq > q.sent {
                    out.push(text.clone());
                    q.sent = *seq;
                }
            }
        }
        out
    }

    /// The connection is gone: what was written but not acknowledged will be sent again.
    pub fn disconnected(&self) {
        for q in self.lock().values_mut() {
            q.sent = q.acked;
        }
    }

    /// A new connection's welcome: the master applied each adopted build's messages up to its
    /// `acked`; the others are dropped (the caller stops those builds). Returns the dropped.
    pub fn welcomed(&self, adopted: &[Running]) -> Vec<BuildRef> {
        let mut queues = self.lock();
        let mut dropped = Vec::new();
        queues.retain(|_, q| {
            if let Some(a) = adopted.iter().find(|a| a.build == q.build) {
                while q.pending.front().is_some_and(|(s, _)| *s <= a.acked) {
                    q.pending.pop_front();
                }
                q.acked = a.acked;
                q.sent = a.acked;
                !(q.finished && q.pending.is_empty())
            } else {
                dropped.push(q.build.clone());
                false
            }
        });
        drop(queues);
        self.room.notify_all();
        dropped
    }

    /// Drops every queue: the worker is leaving without a master to report to (the master
    /// retries what it does not hear about). Builds waiting for room go on, their events
    /// dropped.
    pub fn abandon(&self) {
        self.lock().clear();
        self.room.notify_all();
    }

    /// The builds with messages the master has not applied, or still running.
    pub fn running(&self) -> Vec<Running> {
        self.lock()
            .values()
            .map(|q| Running {
                build: q.build.clone(),
                acked: q.acked,
            })
            .collect()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::Outcome;

    fn build(id: i64) -> BuildRef {
        BuildRef {
            id,
            cookie: format!("c{id}"),
        }
    }

    fn started(step: u32) -> BuildEvent {
        BuildEvent::StepStarted {
            step,
            name: "s".into(),
        }
    }

    fn seqs(texts: &[String]) -> Vec<u64> {
        texts
            .iter()
            .map(|t| match serde_json::from_str::<ToMaster>(t).unwrap() {
                ToMaster::Build { seq, .. } => seq,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn unacknowledged_messages_are_sent_again_after_a_reconnect() {
        let outbox = Outbox::default();
        outbox.open(build(1));
        for i in 0..3 {
            outbox.push(1, started(i));
        }
        assert_eq!(seqs(&outbox.unsent()), [1, 2, 3]);
        assert!(outbox.unsent().is_empty());
        outbox.ack(&build(1), 1);
        outbox.disconnected();
        // The master says it applied up to 2 (its ack of 2 was lost with the connection).
        let dropped = outbox.welcomed(&[Running {
            build: build(1),
            acked: 2,
        }]);
        assert!(dropped.is_empty());
        assert_eq!(seqs(&outbox.unsent()), [3]);
    }

    #[test]
    fn a_finished_build_leaves_when_its_last_message_is_applied() {
        let outbox = Outbox::default();
        outbox.open(build(1));
        outbox.push(1, started(0));
        outbox.push(
            1,
            BuildEvent::Finished {
                result: Outcome::Success,
                message: None,
                properties: Default::default(),
            },
        );
        assert_eq!(outbox.running().len(), 1);
        assert!(!outbox.ack(&build(1), 1));
        // A stale cookie acknowledges nothing.
        assert!(!outbox.ack(
            &BuildRef {
                id: 1,
                cookie: "other".into()
            },
            2
        ));
        assert!(outbox.ack(&build(1), 2));
        assert!(outbox.is_empty());
    }

    #[test]
    fn a_full_window_makes_the_build_wait_for_acknowledgements() {
        let outbox = std::sync::Arc::new(Outbox::default());
        outbox.open(build(1));
        for i in 0..WINDOW {
            outbox.push(1, started(i as u32));
        }
        let pusher = {
            let outbox = outbox.clone();
            std::thread::spawn(move || outbox.push(1, started(999)))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!pusher.is_finished(), "the push should wait for room");
        outbox.ack(&build(1), 10);
        pusher.join().unwrap();
        assert_eq!(outbox.running()[0].acked, 10);
    }

    #[test]
    fn builds_the_master_does_not_adopt_are_dropped() {
        let outbox = Outbox::default();
        outbox.open(build(1));
        outbox.open(build(2));
        let dropped = outbox.welcomed(&[Running {
            build: build(2),
            acked: 0,
        }]);
        assert_eq!(dropped, [build(1)]);
        // A build whose queue is gone drops its events instead of waiting.
        outbox.push(1, started(0));
        assert_eq!(outbox.running().len(), 1);
    }
}
