"""Stage: moving telemetry in. The MQTT client and bridge, payload parsing and units, the Faust app
and Kafka client settings, replay of partitions and of history, and the device simulator."""
