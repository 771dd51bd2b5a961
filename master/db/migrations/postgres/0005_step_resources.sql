-- What a step used, as its worker measured it; all NULL when the step did not run or its
-- worker was too old to say. CPU time of its commands; the peak resident memory of the largest
-- of them (NULL when it ran none); the peak linear memory of the step's guest, and of its
-- largest observer (NULL when it had none).
ALTER TABLE steps ADD COLUMN cpu_ms BIGINT;
ALTER TABLE steps ADD COLUMN peak_rss_bytes BIGINT;
ALTER TABLE steps ADD COLUMN guest_memory_bytes BIGINT;
ALTER TABLE steps ADD COLUMN observer_memory_bytes BIGINT;
