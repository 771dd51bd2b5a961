-- A step's progress metrics ({"lines": 1234}), as its step and observers last reported them:
-- updated while it runs, final once it ends. A running build's remaining time is estimated by
-- comparing them with the same step of the builder's last good build (Buildbot's
-- BuildProgress).
ALTER TABLE steps ADD COLUMN progress TEXT NOT NULL DEFAULT '{}';
