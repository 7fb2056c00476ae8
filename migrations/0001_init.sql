-- telemetry-agent schema, version 1. Runs on MySQL 8.0+ and MariaDB 10.6+.
-- Ids are ASCII with binary collation: `E-1` and `e-1` are different events.
-- Statements end with `;` at the end of a line (the migrator splits there).

CREATE TABLE IF NOT EXISTS dd_trade_performance (
    id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    event_id    VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    agent_id    VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    wal_seq     BIGINT UNSIGNED NOT NULL,
    profile_id  VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    symbol      VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    side        VARCHAR(4) CHARACTER SET ascii NOT NULL,
    quantity    DECIMAL(24,8) NOT NULL,
    price       DECIMAL(24,8) NOT NULL,
    pnl         DECIMAL(24,8) NULL,
    fees        DECIMAL(24,8) NULL,
    opened_at   DATETIME(6) NULL,
    closed_at   DATETIME(6) NOT NULL,
    meta        JSON NULL,
    received_at DATETIME(6) NOT NULL,
    UNIQUE KEY uq_trade_event_id (event_id),
    KEY ix_trade_profile_closed (profile_id, closed_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS dd_metrics (
    id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    event_id    VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    agent_id    VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    wal_seq     BIGINT UNSIGNED NOT NULL,
    profile_id  VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    name        VARCHAR(128) NOT NULL,
    value       DOUBLE NOT NULL,
    ts          DATETIME(6) NOT NULL,
    tags        JSON NULL,
    received_at DATETIME(6) NOT NULL,
    UNIQUE KEY uq_metric_event_id (event_id),
    KEY ix_metric_profile_name_ts (profile_id, name, ts)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS telemetry_offsets (
    agent_id    VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    sink        VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    last_seq    BIGINT UNSIGNED NOT NULL,
    updated_at  DATETIME(6) NOT NULL,
    PRIMARY KEY (agent_id, sink)
) ENGINE=InnoDB;
