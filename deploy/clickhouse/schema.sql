-- AI Mass ClickHouse schema (modern dialect), generated from aimass/core/tables.py by `aimass db sql`; do not edit.

CREATE DATABASE IF NOT EXISTS `aimass`;

CREATE TABLE IF NOT EXISTS `aimass`.`readings` (
  `tenant` LowCardinality(String) CODEC(ZSTD(1)),
  `device_id` LowCardinality(String) CODEC(ZSTD(1)),
  `metric` LowCardinality(String) CODEC(ZSTD(1)),
  `ts` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `value` Float64 CODEC(Gorilla, ZSTD(1)),
  `unit` LowCardinality(String) CODEC(ZSTD(1)),
  `received_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD(1))
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(ts)
ORDER BY (`tenant`, `device_id`, `metric`, `ts`)
TTL toDateTime(ts) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE TABLE IF NOT EXISTS `aimass`.`rejects` (
  `stage` LowCardinality(String) CODEC(ZSTD(1)),
  `reason` LowCardinality(String) CODEC(ZSTD(1)),
  `detail` String CODEC(ZSTD(1)),
  `mqtt_topic` String CODEC(ZSTD(1)),
  `payload` String CODEC(ZSTD(3)),
  `tenant` LowCardinality(String) CODEC(ZSTD(1)),
  `device_id` LowCardinality(String) CODEC(ZSTD(1)),
  `metric` LowCardinality(String) CODEC(ZSTD(1)),
  `ts` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `value` Float64 CODEC(Gorilla, ZSTD(1)),
  `unit` LowCardinality(String) CODEC(ZSTD(1)),
  `received_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `rejected_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `topic` LowCardinality(String) CODEC(ZSTD(1)),
  `row_id` UInt64,
  `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD(1))
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(rejected_at)
ORDER BY (`stage`, `reason`, `rejected_at`, `row_id`)
TTL toDateTime(rejected_at) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE TABLE IF NOT EXISTS `aimass`.`windows` (
  `tenant` LowCardinality(String) CODEC(ZSTD(1)),
  `device_id` LowCardinality(String) CODEC(ZSTD(1)),
  `metric` LowCardinality(String) CODEC(ZSTD(1)),
  `window_s` Int32 CODEC(T64, ZSTD(1)),
  `window_start_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `window_end_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `count` Int64 CODEC(T64, ZSTD(1)),
  `mean` Float64 CODEC(Gorilla, ZSTD(1)),
  `min` Float64 CODEC(Gorilla, ZSTD(1)),
  `max` Float64 CODEC(Gorilla, ZSTD(1)),
  `std` Float64 CODEC(Gorilla, ZSTD(1)),
  `first` Float64 CODEC(Gorilla, ZSTD(1)),
  `last` Float64 CODEC(Gorilla, ZSTD(1)),
  `rate` Float64 CODEC(Gorilla, ZSTD(1)),
  `ewma` Float64 CODEC(Gorilla, ZSTD(1)),
  `zscore` Float64 CODEC(Gorilla, ZSTD(1)),
  `max_received_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD(1))
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(window_end_at)
ORDER BY (`tenant`, `device_id`, `metric`, `window_s`, `window_end_at`)
TTL toDateTime(window_end_at) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE TABLE IF NOT EXISTS `aimass`.`predictions` (
  `tenant` LowCardinality(String) CODEC(ZSTD(1)),
  `device_id` LowCardinality(String) CODEC(ZSTD(1)),
  `metric` LowCardinality(String) CODEC(ZSTD(1)),
  `window_s` Int32 CODEC(T64, ZSTD(1)),
  `window_end_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `target_end_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `observed_mean` Float64 CODEC(Gorilla, ZSTD(1)),
  `forecast_triton` Float64 CODEC(Gorilla, ZSTD(1)),
  `forecast_online` Float64 CODEC(Gorilla, ZSTD(1)),
  `forecast` Float64 CODEC(Gorilla, ZSTD(1)),
  `band_low` Float64 CODEC(Gorilla, ZSTD(1)),
  `band_high` Float64 CODEC(Gorilla, ZSTD(1)),
  `anomaly_triton` Float64 CODEC(Gorilla, ZSTD(1)),
  `anomaly_level` Float64 CODEC(Gorilla, ZSTD(1)),
  `anomaly_spread` Float64 CODEC(Gorilla, ZSTD(1)),
  `anomaly_change` Float64 CODEC(Gorilla, ZSTD(1)),
  `anomaly_device` Float64 CODEC(Gorilla, ZSTD(1)),
  `anomaly` Float64 CODEC(Gorilla, ZSTD(1)),
  `regime_change` Bool,
  `forecaster_model` LowCardinality(String) CODEC(ZSTD(1)),
  `anomaly_model` LowCardinality(String) CODEC(ZSTD(1)),
  `degraded` Bool,
  `max_received_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `predicted_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD(1))
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(target_end_at)
ORDER BY (`tenant`, `device_id`, `metric`, `window_s`, `target_end_at`)
TTL toDateTime(target_end_at) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE TABLE IF NOT EXISTS `aimass`.`outcomes` (
  `tenant` LowCardinality(String) CODEC(ZSTD(1)),
  `device_id` LowCardinality(String) CODEC(ZSTD(1)),
  `metric` LowCardinality(String) CODEC(ZSTD(1)),
  `window_s` Int32 CODEC(T64, ZSTD(1)),
  `target_end_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `forecast` Float64 CODEC(Gorilla, ZSTD(1)),
  `actual` Float64 CODEC(Gorilla, ZSTD(1)),
  `residual` Float64 CODEC(Gorilla, ZSTD(1)),
  `rel_error` Float64 CODEC(Gorilla, ZSTD(1)),
  `in_band` Bool,
  `forecaster_model` LowCardinality(String) CODEC(ZSTD(1)),
  `degraded` Bool,
  `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD(1))
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(target_end_at)
ORDER BY (`tenant`, `device_id`, `metric`, `window_s`, `target_end_at`)
TTL toDateTime(target_end_at) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE TABLE IF NOT EXISTS `aimass`.`labels` (
  `tenant` LowCardinality(String) CODEC(ZSTD(1)),
  `device_id` LowCardinality(String) CODEC(ZSTD(1)),
  `metric` LowCardinality(String) CODEC(ZSTD(1)),
  `start_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `end_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `kind` LowCardinality(String) CODEC(ZSTD(1)),
  `magnitude` Float64 CODEC(Gorilla, ZSTD(1)),
  `source` LowCardinality(String) CODEC(ZSTD(1)),
  `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD(1))
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(start_at)
ORDER BY (`tenant`, `device_id`, `metric`, `start_at`, `kind`)
TTL toDateTime(start_at) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE TABLE IF NOT EXISTS `aimass`.`alerts` (
  `event_id` String CODEC(ZSTD(1)),
  `event_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `ts` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `rule` LowCardinality(String) CODEC(ZSTD(1)),
  `severity` LowCardinality(String) CODEC(ZSTD(1)),
  `tenant` LowCardinality(String) CODEC(ZSTD(1)),
  `device_id` LowCardinality(String) CODEC(ZSTD(1)),
  `metric` LowCardinality(String) CODEC(ZSTD(1)),
  `state` LowCardinality(String) CODEC(ZSTD(1)),
  `transition` LowCardinality(String) CODEC(ZSTD(1)),
  `value` Float64 CODEC(Gorilla, ZSTD(1)),
  `message` String CODEC(ZSTD(1)),
  `labels_json` String CODEC(ZSTD(1)),
  `first_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `count` Int64 CODEC(T64, ZSTD(1)),
  `flapping` Bool,
  `source_received_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `actor` LowCardinality(String) CODEC(ZSTD(1)),
  `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD(1))
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(event_at)
ORDER BY (`rule`, `event_at`, `event_id`)
TTL toDateTime(event_at) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE TABLE IF NOT EXISTS `aimass`.`drift` (
  `tenant` LowCardinality(String) CODEC(ZSTD(1)),
  `device_id` LowCardinality(String) CODEC(ZSTD(1)),
  `metric` LowCardinality(String) CODEC(ZSTD(1)),
  `window_s` Int32 CODEC(T64, ZSTD(1)),
  `detected_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `window_end_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `detector` LowCardinality(String) CODEC(ZSTD(1)),
  `model` LowCardinality(String) CODEC(ZSTD(1)),
  `residual_mean_before` Float64 CODEC(Gorilla, ZSTD(1)),
  `residual_mean_after` Float64 CODEC(Gorilla, ZSTD(1)),
  `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD(1))
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(detected_at)
ORDER BY (`tenant`, `device_id`, `metric`, `window_s`, `detector`, `window_end_at`)
TTL toDateTime(detected_at) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE TABLE IF NOT EXISTS `aimass`.`quality` (
  `computed_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `rule` LowCardinality(String) CODEC(ZSTD(1)),
  `model` LowCardinality(String) CODEC(ZSTD(1)),
  `true_positives` Int64 CODEC(T64, ZSTD(1)),
  `false_positives` Int64 CODEC(T64, ZSTD(1)),
  `false_negatives` Int64 CODEC(T64, ZSTD(1)),
  `precision` Float64 CODEC(Gorilla, ZSTD(1)),
  `recall` Float64 CODEC(Gorilla, ZSTD(1)),
  `mean_delay_s` Float64 CODEC(Gorilla, ZSTD(1)),
  `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD(1))
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(computed_at)
ORDER BY (`rule`, `model`, `computed_at`)
TTL toDateTime(computed_at) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE TABLE IF NOT EXISTS `aimass`.`notifications` (
  `notification_id` String CODEC(ZSTD(1)),
  `event_id` String CODEC(ZSTD(1)),
  `receiver` LowCardinality(String) CODEC(ZSTD(1)),
  `kind` LowCardinality(String) CODEC(ZSTD(1)),
  `status` LowCardinality(String) CODEC(ZSTD(1)),
  `attempts` Int32 CODEC(T64, ZSTD(1)),
  `error` String CODEC(ZSTD(1)),
  `created_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `finished_at` DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
  `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD(1))
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(created_at)
ORDER BY (`notification_id`, `status`, `finished_at`)
TTL toDateTime(created_at) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE TABLE IF NOT EXISTS `aimass`.`readings_1m` (
  `tenant` LowCardinality(String),
  `device_id` LowCardinality(String),
  `metric` LowCardinality(String),
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count),
  `value_sum` AggregateFunction(sum, Float64),
  `value_min` AggregateFunction(min, Float64),
  `value_max` AggregateFunction(max, Float64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`tenant`, `device_id`, `metric`, bucket)
TTL bucket + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`readings_1m_mv` TO `aimass`.`readings_1m` AS
SELECT `tenant`, `device_id`, `metric`, toStartOfMinute(ts) AS bucket, countState() AS `n`, sumState(value) AS `value_sum`, minState(value) AS `value_min`, maxState(value) AS `value_max`
FROM `aimass`.`readings` GROUP BY `tenant`, `device_id`, `metric`, bucket;

CREATE TABLE IF NOT EXISTS `aimass`.`readings_1h` (
  `tenant` LowCardinality(String),
  `device_id` LowCardinality(String),
  `metric` LowCardinality(String),
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count),
  `value_sum` AggregateFunction(sum, Float64),
  `value_min` AggregateFunction(min, Float64),
  `value_max` AggregateFunction(max, Float64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`tenant`, `device_id`, `metric`, bucket)
TTL bucket + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`readings_1h_mv` TO `aimass`.`readings_1h` AS
SELECT `tenant`, `device_id`, `metric`, toStartOfHour(ts) AS bucket, countState() AS `n`, sumState(value) AS `value_sum`, minState(value) AS `value_min`, maxState(value) AS `value_max`
FROM `aimass`.`readings` GROUP BY `tenant`, `device_id`, `metric`, bucket;

CREATE TABLE IF NOT EXISTS `aimass`.`rejects_1m` (
  `stage` LowCardinality(String),
  `reason` LowCardinality(String),
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`stage`, `reason`, bucket)
TTL bucket + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`rejects_1m_mv` TO `aimass`.`rejects_1m` AS
SELECT `stage`, `reason`, toStartOfMinute(rejected_at) AS bucket, countState() AS `n`
FROM `aimass`.`rejects` GROUP BY `stage`, `reason`, bucket;

CREATE TABLE IF NOT EXISTS `aimass`.`rejects_1h` (
  `stage` LowCardinality(String),
  `reason` LowCardinality(String),
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`stage`, `reason`, bucket)
TTL bucket + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`rejects_1h_mv` TO `aimass`.`rejects_1h` AS
SELECT `stage`, `reason`, toStartOfHour(rejected_at) AS bucket, countState() AS `n`
FROM `aimass`.`rejects` GROUP BY `stage`, `reason`, bucket;

CREATE TABLE IF NOT EXISTS `aimass`.`predictions_1m` (
  `forecaster_model` LowCardinality(String),
  `metric` LowCardinality(String),
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count),
  `degraded_n` AggregateFunction(sum, UInt64),
  `anomaly_max` AggregateFunction(max, Float64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`forecaster_model`, `metric`, bucket)
TTL bucket + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`predictions_1m_mv` TO `aimass`.`predictions_1m` AS
SELECT `forecaster_model`, `metric`, toStartOfMinute(target_end_at) AS bucket, countState() AS `n`, sumState(toUInt64(degraded)) AS `degraded_n`, maxState(anomaly) AS `anomaly_max`
FROM `aimass`.`predictions` GROUP BY `forecaster_model`, `metric`, bucket;

CREATE TABLE IF NOT EXISTS `aimass`.`predictions_1h` (
  `forecaster_model` LowCardinality(String),
  `metric` LowCardinality(String),
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count),
  `degraded_n` AggregateFunction(sum, UInt64),
  `anomaly_max` AggregateFunction(max, Float64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`forecaster_model`, `metric`, bucket)
TTL bucket + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`predictions_1h_mv` TO `aimass`.`predictions_1h` AS
SELECT `forecaster_model`, `metric`, toStartOfHour(target_end_at) AS bucket, countState() AS `n`, sumState(toUInt64(degraded)) AS `degraded_n`, maxState(anomaly) AS `anomaly_max`
FROM `aimass`.`predictions` GROUP BY `forecaster_model`, `metric`, bucket;

CREATE TABLE IF NOT EXISTS `aimass`.`outcomes_1m` (
  `forecaster_model` LowCardinality(String),
  `metric` LowCardinality(String),
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count),
  `in_band_n` AggregateFunction(sum, UInt64),
  `abs_residual_sum` AggregateFunction(sum, Float64),
  `sq_residual_sum` AggregateFunction(sum, Float64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`forecaster_model`, `metric`, bucket)
TTL bucket + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`outcomes_1m_mv` TO `aimass`.`outcomes_1m` AS
SELECT `forecaster_model`, `metric`, toStartOfMinute(target_end_at) AS bucket, countState() AS `n`, sumState(toUInt64(in_band)) AS `in_band_n`, sumState(abs(residual)) AS `abs_residual_sum`, sumState(residual * residual) AS `sq_residual_sum`
FROM `aimass`.`outcomes` GROUP BY `forecaster_model`, `metric`, bucket;

CREATE TABLE IF NOT EXISTS `aimass`.`outcomes_1h` (
  `forecaster_model` LowCardinality(String),
  `metric` LowCardinality(String),
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count),
  `in_band_n` AggregateFunction(sum, UInt64),
  `abs_residual_sum` AggregateFunction(sum, Float64),
  `sq_residual_sum` AggregateFunction(sum, Float64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`forecaster_model`, `metric`, bucket)
TTL bucket + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`outcomes_1h_mv` TO `aimass`.`outcomes_1h` AS
SELECT `forecaster_model`, `metric`, toStartOfHour(target_end_at) AS bucket, countState() AS `n`, sumState(toUInt64(in_band)) AS `in_band_n`, sumState(abs(residual)) AS `abs_residual_sum`, sumState(residual * residual) AS `sq_residual_sum`
FROM `aimass`.`outcomes` GROUP BY `forecaster_model`, `metric`, bucket;
