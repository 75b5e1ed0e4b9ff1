-- AI Mass ClickHouse schema (legacy dialect), generated from aimass/core/tables.py by `aimass db sql`; do not edit.

CREATE DATABASE IF NOT EXISTS `aimass`;

CREATE TABLE IF NOT EXISTS `aimass`.`readings` (
  `tenant` String,
  `device_id` String,
  `metric` String,
  `ts_ms` Int64,
  `ts` DateTime('UTC') ALIAS toDateTime(intDiv(ts_ms, 1000), 'UTC'),
  `value` Float64,
  `unit` String,
  `received_ms` Int64,
  `received_at` DateTime('UTC') ALIAS toDateTime(intDiv(received_ms, 1000), 'UTC'),
  `inserted_at` DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(toDateTime(intDiv(ts_ms, 1000), 'UTC'))
ORDER BY (`tenant`, `device_id`, `metric`, `ts_ms`);

CREATE TABLE IF NOT EXISTS `aimass`.`rejects` (
  `stage` String,
  `reason` String,
  `detail` String,
  `mqtt_topic` String,
  `payload` String,
  `tenant` String,
  `device_id` String,
  `metric` String,
  `ts_ms` Int64,
  `ts` DateTime('UTC') ALIAS toDateTime(intDiv(ts_ms, 1000), 'UTC'),
  `value` Float64,
  `unit` String,
  `received_ms` Int64,
  `received_at` DateTime('UTC') ALIAS toDateTime(intDiv(received_ms, 1000), 'UTC'),
  `rejected_ms` Int64,
  `rejected_at` DateTime('UTC') ALIAS toDateTime(intDiv(rejected_ms, 1000), 'UTC'),
  `topic` String,
  `row_id` UInt64,
  `inserted_at` DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(toDateTime(intDiv(rejected_ms, 1000), 'UTC'))
ORDER BY (`stage`, `reason`, `rejected_ms`, `row_id`);

CREATE TABLE IF NOT EXISTS `aimass`.`windows` (
  `tenant` String,
  `device_id` String,
  `metric` String,
  `window_s` Int32,
  `window_start_ms` Int64,
  `window_start_at` DateTime('UTC') ALIAS toDateTime(intDiv(window_start_ms, 1000), 'UTC'),
  `window_end_ms` Int64,
  `window_end_at` DateTime('UTC') ALIAS toDateTime(intDiv(window_end_ms, 1000), 'UTC'),
  `count` Int64,
  `mean` Float64,
  `min` Float64,
  `max` Float64,
  `std` Float64,
  `first` Float64,
  `last` Float64,
  `rate` Float64,
  `ewma` Float64,
  `zscore` Float64,
  `max_received_ms` Int64,
  `max_received_at` DateTime('UTC') ALIAS toDateTime(intDiv(max_received_ms, 1000), 'UTC'),
  `inserted_at` DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(toDateTime(intDiv(window_end_ms, 1000), 'UTC'))
ORDER BY (`tenant`, `device_id`, `metric`, `window_s`, `window_end_ms`);

CREATE TABLE IF NOT EXISTS `aimass`.`predictions` (
  `tenant` String,
  `device_id` String,
  `metric` String,
  `window_s` Int32,
  `window_end_ms` Int64,
  `window_end_at` DateTime('UTC') ALIAS toDateTime(intDiv(window_end_ms, 1000), 'UTC'),
  `target_end_ms` Int64,
  `target_end_at` DateTime('UTC') ALIAS toDateTime(intDiv(target_end_ms, 1000), 'UTC'),
  `observed_mean` Float64,
  `forecast_triton` Float64,
  `forecast_online` Float64,
  `forecast` Float64,
  `band_low` Float64,
  `band_high` Float64,
  `anomaly_triton` Float64,
  `anomaly_level` Float64,
  `anomaly_spread` Float64,
  `anomaly_change` Float64,
  `anomaly_device` Float64,
  `anomaly` Float64,
  `regime_change` UInt8,
  `forecaster_model` String,
  `anomaly_model` String,
  `degraded` UInt8,
  `max_received_ms` Int64,
  `max_received_at` DateTime('UTC') ALIAS toDateTime(intDiv(max_received_ms, 1000), 'UTC'),
  `predicted_ms` Int64,
  `predicted_at` DateTime('UTC') ALIAS toDateTime(intDiv(predicted_ms, 1000), 'UTC'),
  `inserted_at` DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(toDateTime(intDiv(target_end_ms, 1000), 'UTC'))
ORDER BY (`tenant`, `device_id`, `metric`, `window_s`, `target_end_ms`);

CREATE TABLE IF NOT EXISTS `aimass`.`outcomes` (
  `tenant` String,
  `device_id` String,
  `metric` String,
  `window_s` Int32,
  `target_end_ms` Int64,
  `target_end_at` DateTime('UTC') ALIAS toDateTime(intDiv(target_end_ms, 1000), 'UTC'),
  `forecast` Float64,
  `actual` Float64,
  `residual` Float64,
  `rel_error` Float64,
  `in_band` UInt8,
  `forecaster_model` String,
  `degraded` UInt8,
  `inserted_at` DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(toDateTime(intDiv(target_end_ms, 1000), 'UTC'))
ORDER BY (`tenant`, `device_id`, `metric`, `window_s`, `target_end_ms`);

CREATE TABLE IF NOT EXISTS `aimass`.`labels` (
  `tenant` String,
  `device_id` String,
  `metric` String,
  `start_ms` Int64,
  `start_at` DateTime('UTC') ALIAS toDateTime(intDiv(start_ms, 1000), 'UTC'),
  `end_ms` Int64,
  `end_at` DateTime('UTC') ALIAS toDateTime(intDiv(end_ms, 1000), 'UTC'),
  `kind` String,
  `magnitude` Float64,
  `source` String,
  `inserted_at` DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(toDateTime(intDiv(start_ms, 1000), 'UTC'))
ORDER BY (`tenant`, `device_id`, `metric`, `start_ms`, `kind`);

CREATE TABLE IF NOT EXISTS `aimass`.`alerts` (
  `event_id` String,
  `event_ms` Int64,
  `event_at` DateTime('UTC') ALIAS toDateTime(intDiv(event_ms, 1000), 'UTC'),
  `ts_ms` Int64,
  `ts` DateTime('UTC') ALIAS toDateTime(intDiv(ts_ms, 1000), 'UTC'),
  `rule` String,
  `severity` String,
  `tenant` String,
  `device_id` String,
  `metric` String,
  `state` String,
  `transition` String,
  `value` Float64,
  `message` String,
  `labels_json` String,
  `first_ms` Int64,
  `first_at` DateTime('UTC') ALIAS toDateTime(intDiv(first_ms, 1000), 'UTC'),
  `count` Int64,
  `flapping` UInt8,
  `source_received_ms` Int64,
  `source_received_at` DateTime('UTC') ALIAS toDateTime(intDiv(source_received_ms, 1000), 'UTC'),
  `actor` String,
  `inserted_at` DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(toDateTime(intDiv(event_ms, 1000), 'UTC'))
ORDER BY (`rule`, `event_ms`, `event_id`);

CREATE TABLE IF NOT EXISTS `aimass`.`drift` (
  `tenant` String,
  `device_id` String,
  `metric` String,
  `window_s` Int32,
  `detected_ms` Int64,
  `detected_at` DateTime('UTC') ALIAS toDateTime(intDiv(detected_ms, 1000), 'UTC'),
  `window_end_ms` Int64,
  `window_end_at` DateTime('UTC') ALIAS toDateTime(intDiv(window_end_ms, 1000), 'UTC'),
  `detector` String,
  `model` String,
  `residual_mean_before` Float64,
  `residual_mean_after` Float64,
  `inserted_at` DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(toDateTime(intDiv(detected_ms, 1000), 'UTC'))
ORDER BY (`tenant`, `device_id`, `metric`, `window_s`, `detector`, `window_end_ms`);

CREATE TABLE IF NOT EXISTS `aimass`.`quality` (
  `computed_ms` Int64,
  `computed_at` DateTime('UTC') ALIAS toDateTime(intDiv(computed_ms, 1000), 'UTC'),
  `rule` String,
  `model` String,
  `true_positives` Int64,
  `false_positives` Int64,
  `false_negatives` Int64,
  `precision` Float64,
  `recall` Float64,
  `mean_delay_s` Float64,
  `inserted_at` DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(toDateTime(intDiv(computed_ms, 1000), 'UTC'))
ORDER BY (`rule`, `model`, `computed_ms`);

CREATE TABLE IF NOT EXISTS `aimass`.`notifications` (
  `notification_id` String,
  `event_id` String,
  `receiver` String,
  `kind` String,
  `status` String,
  `attempts` Int32,
  `error` String,
  `created_ms` Int64,
  `created_at` DateTime('UTC') ALIAS toDateTime(intDiv(created_ms, 1000), 'UTC'),
  `finished_ms` Int64,
  `finished_at` DateTime('UTC') ALIAS toDateTime(intDiv(finished_ms, 1000), 'UTC'),
  `inserted_at` DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toDate(toDateTime(intDiv(created_ms, 1000), 'UTC'))
ORDER BY (`notification_id`, `status`, `finished_ms`);

CREATE TABLE IF NOT EXISTS `aimass`.`readings_1m` (
  `tenant` String,
  `device_id` String,
  `metric` String,
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count),
  `value_sum` AggregateFunction(sum, Float64),
  `value_min` AggregateFunction(min, Float64),
  `value_max` AggregateFunction(max, Float64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`tenant`, `device_id`, `metric`, bucket);

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`readings_1m_mv` TO `aimass`.`readings_1m` AS
SELECT `tenant`, `device_id`, `metric`, toStartOfMinute(toDateTime(intDiv(ts_ms, 1000), 'UTC')) AS bucket, countState() AS `n`, sumState(value) AS `value_sum`, minState(value) AS `value_min`, maxState(value) AS `value_max`
FROM `aimass`.`readings` GROUP BY `tenant`, `device_id`, `metric`, bucket;

CREATE TABLE IF NOT EXISTS `aimass`.`readings_1h` (
  `tenant` String,
  `device_id` String,
  `metric` String,
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count),
  `value_sum` AggregateFunction(sum, Float64),
  `value_min` AggregateFunction(min, Float64),
  `value_max` AggregateFunction(max, Float64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`tenant`, `device_id`, `metric`, bucket);

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`readings_1h_mv` TO `aimass`.`readings_1h` AS
SELECT `tenant`, `device_id`, `metric`, toStartOfHour(toDateTime(intDiv(ts_ms, 1000), 'UTC')) AS bucket, countState() AS `n`, sumState(value) AS `value_sum`, minState(value) AS `value_min`, maxState(value) AS `value_max`
FROM `aimass`.`readings` GROUP BY `tenant`, `device_id`, `metric`, bucket;

CREATE TABLE IF NOT EXISTS `aimass`.`rejects_1m` (
  `stage` String,
  `reason` String,
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`stage`, `reason`, bucket);

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`rejects_1m_mv` TO `aimass`.`rejects_1m` AS
SELECT `stage`, `reason`, toStartOfMinute(toDateTime(intDiv(rejected_ms, 1000), 'UTC')) AS bucket, countState() AS `n`
FROM `aimass`.`rejects` GROUP BY `stage`, `reason`, bucket;

CREATE TABLE IF NOT EXISTS `aimass`.`rejects_1h` (
  `stage` String,
  `reason` String,
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`stage`, `reason`, bucket);

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`rejects_1h_mv` TO `aimass`.`rejects_1h` AS
SELECT `stage`, `reason`, toStartOfHour(toDateTime(intDiv(rejected_ms, 1000), 'UTC')) AS bucket, countState() AS `n`
FROM `aimass`.`rejects` GROUP BY `stage`, `reason`, bucket;

CREATE TABLE IF NOT EXISTS `aimass`.`predictions_1m` (
  `forecaster_model` String,
  `metric` String,
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count),
  `degraded_n` AggregateFunction(sum, UInt64),
  `anomaly_max` AggregateFunction(max, Float64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`forecaster_model`, `metric`, bucket);

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`predictions_1m_mv` TO `aimass`.`predictions_1m` AS
SELECT `forecaster_model`, `metric`, toStartOfMinute(toDateTime(intDiv(target_end_ms, 1000), 'UTC')) AS bucket, countState() AS `n`, sumState(toUInt64(degraded)) AS `degraded_n`, maxState(anomaly) AS `anomaly_max`
FROM `aimass`.`predictions` GROUP BY `forecaster_model`, `metric`, bucket;

CREATE TABLE IF NOT EXISTS `aimass`.`predictions_1h` (
  `forecaster_model` String,
  `metric` String,
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count),
  `degraded_n` AggregateFunction(sum, UInt64),
  `anomaly_max` AggregateFunction(max, Float64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`forecaster_model`, `metric`, bucket);

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`predictions_1h_mv` TO `aimass`.`predictions_1h` AS
SELECT `forecaster_model`, `metric`, toStartOfHour(toDateTime(intDiv(target_end_ms, 1000), 'UTC')) AS bucket, countState() AS `n`, sumState(toUInt64(degraded)) AS `degraded_n`, maxState(anomaly) AS `anomaly_max`
FROM `aimass`.`predictions` GROUP BY `forecaster_model`, `metric`, bucket;

CREATE TABLE IF NOT EXISTS `aimass`.`outcomes_1m` (
  `forecaster_model` String,
  `metric` String,
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count),
  `in_band_n` AggregateFunction(sum, UInt64),
  `abs_residual_sum` AggregateFunction(sum, Float64),
  `sq_residual_sum` AggregateFunction(sum, Float64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`forecaster_model`, `metric`, bucket);

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`outcomes_1m_mv` TO `aimass`.`outcomes_1m` AS
SELECT `forecaster_model`, `metric`, toStartOfMinute(toDateTime(intDiv(target_end_ms, 1000), 'UTC')) AS bucket, countState() AS `n`, sumState(toUInt64(in_band)) AS `in_band_n`, sumState(abs(residual)) AS `abs_residual_sum`, sumState(residual * residual) AS `sq_residual_sum`
FROM `aimass`.`outcomes` GROUP BY `forecaster_model`, `metric`, bucket;

CREATE TABLE IF NOT EXISTS `aimass`.`outcomes_1h` (
  `forecaster_model` String,
  `metric` String,
  `bucket` DateTime('UTC'),
  `n` AggregateFunction(count),
  `in_band_n` AggregateFunction(sum, UInt64),
  `abs_residual_sum` AggregateFunction(sum, Float64),
  `sq_residual_sum` AggregateFunction(sum, Float64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (`forecaster_model`, `metric`, bucket);

CREATE MATERIALIZED VIEW IF NOT EXISTS `aimass`.`outcomes_1h_mv` TO `aimass`.`outcomes_1h` AS
SELECT `forecaster_model`, `metric`, toStartOfHour(toDateTime(intDiv(target_end_ms, 1000), 'UTC')) AS bucket, countState() AS `n`, sumState(toUInt64(in_band)) AS `in_band_n`, sumState(abs(residual)) AS `abs_residual_sum`, sumState(residual * residual) AS `sq_residual_sum`
FROM `aimass`.`outcomes` GROUP BY `forecaster_model`, `metric`, bucket;
