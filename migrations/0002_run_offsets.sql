-- telemetry-agent schema, version 2: offsets per WAL run.
-- Every start of an agent opens a new run of its WAL with a random run id, and generated event ids name the
-- run (`~{run_id}-{seq}`). The forwarder keeps its offset under (agent_id, run_id), a row no other process
-- writes: two hosts with the same [agent] id, or a WAL copied to a second host, can no longer share one.
-- `telemetry_offsets` stays for agents of the previous release during a rolling upgrade; nothing reads it.

CREATE TABLE IF NOT EXISTS telemetry_run_offsets (
    agent_id    VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    run_id      VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    sink        VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    last_seq    BIGINT UNSIGNED NOT NULL,
    updated_at  DATETIME(6) NOT NULL,
    PRIMARY KEY (agent_id, run_id, sink)
) ENGINE=InnoDB;
