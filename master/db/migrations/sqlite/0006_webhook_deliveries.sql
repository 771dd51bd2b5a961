-- Webhook deliveries a change source accepted, by the forge's delivery id (X-GitHub-Delivery,
-- X-Gitlab-Event-UUID, X-Gitea-Delivery, X-Forgejo-Delivery, X-Kiln-Delivery). The unique key
-- is the arbiter: a delivery is recorded in the same transaction as its changes, so a forge
-- redelivering it (a retry, the "Redeliver" button) finds it here and nothing is stored twice.
-- `change_ids` is the JSON list of the changes it recorded, for the answer to a replay.
CREATE TABLE webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    delivery TEXT NOT NULL,
    event TEXT NOT NULL,
    change_ids TEXT NOT NULL DEFAULT '[]',
    received_at INTEGER NOT NULL,
    UNIQUE (source, delivery)
);
