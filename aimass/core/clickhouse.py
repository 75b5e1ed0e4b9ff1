"""One store client over embedded chDB and a ClickHouse server (native protocol).

``open_store(cfg)`` returns a ``Store`` with ``execute`` (DDL), ``query`` (-> Arrow table)
and ``insert`` (Arrow table -> table, with an insert deduplication token where the engine
has them). Errors come out as ``StoreError`` with ``retryable`` set: retryable ones
(server down, timeouts, too many parts, missing table) are worth a retry with the same
data; permanent ones (the data does not fit) are not.

chDB allows one process per data directory: the sink owns it and serves read-only SQL on
127.0.0.1 (``QueryServer``); ``open_reader(cfg)`` uses that endpoint when the sink runs and
opens chDB directly when it does not.
"""
from __future__ import annotations

import atexit
import hmac
import logging
import re
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aimass.core.config import Config
from aimass.core.procs import StackError
from aimass.core.tables import LEGACY, MODERN

log = logging.getLogger(__name__)

# ClickHouse error codes worth retrying with the same data (the server or its state, not the rows).
RETRYABLE_CODES = frozenset({
    3,    # UNEXPECTED_END_OF_FILE
    60,   # UNKNOWN_TABLE (schema being migrated)
    81,   # UNKNOWN_DATABASE
    159,  # TIMEOUT_EXCEEDED
    164,  # READONLY
    192,  # UNKNOWN_USER (credentials are fixable by an operator; keep the data)
    193,  # WRONG_PASSWORD
    202,  # TOO_MANY_SIMULTANEOUS_QUERIES
    203,  # NO_FREE_CONNECTION
    209,  # SOCKET_TIMEOUT
    210,  # NETWORK_ERROR
    236,  # ABORTED
    241,  # MEMORY_LIMIT_EXCEEDED
    242,  # TABLE_IS_READ_ONLY
    243,  # NOT_ENOUGH_SPACE
    252,  # TOO_MANY_PARTS
    279,  # ALL_CONNECTION_TRIES_FAILED
    319,  # UNKNOWN_STATUS_OF_INSERT
    394,  # QUERY_WAS_CANCELLED
    425,  # SYSTEM_ERROR
    497,  # ACCESS_DENIED (fixable by an operator; keep the data)
    516,  # AUTHENTICATION_FAILED
})


class StoreError(RuntimeError):
    """A store operation failed; ``retryable`` says whether the same call may succeed later."""

    def __init__(self, message: str, retryable: bool, code: int = 0):
        super().__init__(message)
        self.retryable = retryable
        self.code = code


def classify(exc: BaseException) -> StoreError:
    """Wrap any client exception as a StoreError with its code and retryability."""
    if isinstance(exc, StoreError):
        return exc
    text = " ".join(str(exc).split("Stack trace")[0].split()) or type(exc).__name__
    code = getattr(exc, "code", None)
    if not isinstance(code, int):
        m = re.search(r"Code: (\d+)", str(exc))
        code = int(m.group(1)) if m else 0
    network = isinstance(exc, (OSError, EOFError, ConnectionError, TimeoutError)) or \
        type(exc).__name__ in ("NetworkError", "SocketTimeoutError", "UnexpectedPacketFromServerError")
    return StoreError(f"{type(exc).__name__}: {text[:500]}", network or code in RETRYABLE_CODES, code)


class Store(Protocol):
    """What the sink, migrations and reports need from a ClickHouse."""

    dialect: str
    database: str

    def execute(self, sql: str) -> None: ...
    def query(self, sql: str) -> pa.Table: ...
    def insert(self, table: str, data: pa.Table, token: str = "") -> None: ...
    def close(self) -> None: ...


# --- embedded chDB --------------------------------------------------------------------

# Tables are partitioned by day; a batch of history spans any number of days (a year of replayed
# readings is 365 partitions), which ClickHouse refuses above 100 by default.
HISTORY_INSERTS = "max_partitions_per_insert_block = 0"

_CHDB_LOCK = threading.Lock()
_chdb_session = None
_chdb_path: str | None = None


def _open_chdb_session(path: Path):
    """The process's chDB session on ``path`` (chDB allows one directory per process)."""
    global _chdb_session, _chdb_path
    from chdb import session

    if _chdb_session is not None and _chdb_path == str(path):
        return _chdb_session
    if _chdb_session is not None:
        _chdb_session.close()
        _chdb_session = None
    path.mkdir(parents=True, exist_ok=True)
    try:
        _chdb_session = session.Session(str(path))
    except Exception as exc:  # noqa: BLE001 - chDB raises plain RuntimeErrors
        raise StackError(f"cannot open the chDB store {path} ({exc}); chDB allows one process per data dir: "
                         f"if the sink runs, read through its endpoint (clickhouse.query_port) or stop it first") from None
    _chdb_path = str(path)
    return _chdb_session


def _close_chdb_session() -> None:
    """Close the session before interpreter shutdown (chDB complains when it is torn down late)."""
    global _chdb_session
    if _chdb_session is not None:
        _chdb_session.close()
        _chdb_session = None


atexit.register(_close_chdb_session)


class ChdbStore:
    """Embedded chDB with its data under ``path``; thread-safe (one statement at a time)."""

    dialect = MODERN

    def __init__(self, path: Path, database: str):
        self.path = Path(path)
        self.database = database
        self.lock = _CHDB_LOCK
        with self.lock:
            self.session = _open_chdb_session(self.path)

    def execute(self, sql: str) -> None:
        with self.lock:
            try:
                self.session.query(sql)
            except Exception as exc:  # noqa: BLE001
                raise classify(exc) from exc

    def query_arrow_stream(self, sql: str) -> bytes:
        with self.lock:
            try:
                return self.session.query(sql, "ArrowStream").bytes()
            except Exception as exc:  # noqa: BLE001
                raise classify(exc) from exc

    def query(self, sql: str) -> pa.Table:
        return arrow_from_stream(self.query_arrow_stream(sql))

    def insert(self, table: str, data: pa.Table, token: str = "") -> None:
        cols = ", ".join(f"`{c}`" for c in data.column_names)
        # One big block per insert (fewer parts, fewer merges); identity duplicates collapse in
        # merges and FINAL, so the insert-time ReplacingMergeTree pass is not worth its cost.
        settings = ("deduplicate_blocks_in_dependent_materialized_views = 1, optimize_on_insert = 0, "
                    f"min_insert_block_size_rows = 1048576, max_block_size = 262144, {HISTORY_INSERTS}")
        if token:
            settings += f", insert_deduplication_token = '{token}'"
        # chDB's Python() table function reads the local variable `data` zero-copy.
        self.execute(f"INSERT INTO `{self.database}`.`{table}` ({cols}) SELECT {cols} FROM Python(data) "
                     f"SETTINGS {settings}")

    def close(self) -> None:
        """The session stays open for the process (chDB cannot reopen another dir cleanly)."""


def arrow_from_stream(data: bytes) -> pa.Table:
    if not data:
        return pa.table({})
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


# --- ClickHouse server (native protocol) ----------------------------------------------

def parse_url(url: str, password_env_value: str = "") -> dict:
    """``clickhouse://user:password@host:9000/db`` -> clickhouse-driver keyword arguments."""
    u = urlparse(url)
    if u.scheme not in ("clickhouse", "clickhouses") or not u.hostname:
        raise StackError(f"clickhouse.url {url!r} is not clickhouse://user:password@host:9000/db")
    return {
        "host": u.hostname,
        "port": u.port or 9000,
        "user": unquote(u.username or "default"),
        "password": unquote(u.password) if u.password else password_env_value,
        "database": u.path.lstrip("/") or "",
        "secure": u.scheme == "clickhouses",
    }


class ServerStore:
    """A ClickHouse server over the native protocol; reconnects on the next call after a failure.

    Thread-safe: one statement at a time on the single connection.
    """

    def __init__(self, url: str, database: str, password: str = "", secure: bool = False,
                 connect_timeout_s: float = 5.0, ca_file: str = ""):
        from clickhouse_driver import Client

        params = parse_url(url, password)
        self.database = params.pop("database") or database
        params["secure"] = params["secure"] or secure
        if params["secure"] and ca_file:
            params["ca_certs"] = ca_file
        self.address = f"{params['host']}:{params['port']}"
        self.lock = threading.Lock()
        self.client = Client(**params, connect_timeout=connect_timeout_s, send_receive_timeout=300,
                             settings={"use_numpy": True}, client_name="aimass")
        self.dialect = MODERN if self._version() >= (22, 3) else LEGACY

    def _version(self) -> tuple[int, int]:
        version = self._call(lambda: self.client.execute("SELECT version()"))[0][0]
        major, minor = str(version).split(".")[:2]
        return int(major), int(minor)

    def _call(self, fn):
        with self.lock:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - driver, socket and server errors alike
                self.client.disconnect()
                raise classify(exc) from exc

    def execute(self, sql: str) -> None:
        settings = {"allow_experimental_low_cardinality_type": 1} if self.dialect == LEGACY else {}
        self._call(lambda: self.client.execute(sql, settings=settings))

    def query(self, sql: str) -> pa.Table:
        rows, types = self._call(lambda: self.client.execute(sql, with_column_types=True, columnar=True))
        return pa.table({name: _to_arrow(col) for (name, _), col in zip(types, rows)}) if types else pa.table({})

    def insert(self, table: str, data: pa.Table, token: str = "") -> None:
        cols = ", ".join(f"`{c}`" for c in data.column_names)
        settings = {}
        if self.dialect == MODERN:
            settings = {"max_partitions_per_insert_block": 0}
        if token and self.dialect == MODERN:
            settings.update(insert_deduplication_token=token, deduplicate_blocks_in_dependent_materialized_views=1)
        columns = [_to_numpy(c) for c in data.columns]
        self._call(lambda: self.client.execute(f"INSERT INTO `{self.database}`.`{table}` ({cols}) VALUES",
                                               columns, columnar=True, settings=settings))

    def close(self) -> None:
        self.client.disconnect()


def _to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_timestamp(col.type):
        return col.cast(pa.timestamp("ms")).to_numpy()
    if pa.types.is_binary(col.type):  # not valid UTF-8 in general: the driver sends bytes as they are
        return np.array(col.to_pylist(), dtype=object)
    return col.to_numpy()


def _to_arrow(col) -> pa.Array:
    arr = np.asarray(col)
    if arr.dtype.kind == "U":
        arr = arr.astype(object)
    return pa.array(arr)


# --- the sink's read-only SQL endpoint ------------------------------------------------

READ_ONLY = re.compile(r"^\s*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXISTS|EXPLAIN)\b", re.IGNORECASE)


def check_read_only(sql: str) -> str:
    """The statement if it is one read-only query; ValueError otherwise."""
    body = sql.strip().rstrip(";")
    if not READ_ONLY.match(body) or ";" in body or re.search(r"\bINTO\s+OUTFILE\b", body, re.IGNORECASE):
        raise ValueError("only one read-only statement (SELECT/WITH/SHOW/DESCRIBE/EXISTS/EXPLAIN) is accepted")
    return body


class QueryServer:
    """Serves ``POST /query`` (SQL body -> Arrow IPC stream) from the sink's chDB on 127.0.0.1."""

    def __init__(self, store: ChdbStore, port: int, token: str = ""):
        self.store = store
        handler = self._handler_class(store, token)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="query-server", daemon=True)

    @staticmethod
    def _handler_class(store: ChdbStore, token: str):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # quiet: the sink logs its own progress
                log.debug("query endpoint: " + fmt, *args)

            def _reply(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/health":
                    self._reply(200, f"ok {store.database}\n".encode())
                else:
                    self._reply(404, b"POST /query with SQL; GET /health\n")

            def do_POST(self):
                if token and not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {token}"):
                    return self._reply(401, b"missing or wrong bearer token\n")
                if self.path != "/query":
                    return self._reply(404, b"POST /query\n")
                sql = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode("utf-8", "replace")
                try:
                    data = store.query_arrow_stream(check_read_only(sql))
                except ValueError as exc:
                    return self._reply(400, f"{exc}\n".encode())
                except StoreError as exc:
                    return self._reply(422, f"{exc}\n".encode())
                self._reply(200, data, "application/vnd.apache.arrow.stream")

        return Handler

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> "QueryServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class HttpReader:
    """Read-only client of a running sink's ``QueryServer``."""

    dialect = MODERN

    def __init__(self, port: int, database: str, token: str = "", timeout_s: float = 60.0):
        self.url = f"http://127.0.0.1:{port}"
        self.database = database
        self.token = token
        self.timeout_s = timeout_s

    def alive(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                return r.status == 200 and r.read().decode().split()[-1] == self.database
        except (OSError, IndexError):
            return False

    def query(self, sql: str) -> pa.Table:
        req = urllib.request.Request(f"{self.url}/query", data=sql.encode(), method="POST")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return arrow_from_stream(r.read())
        except urllib.error.HTTPError as exc:
            raise StoreError(f"query endpoint: {exc.read().decode(errors='replace').strip()}",
                             retryable=False, code=exc.code) from None
        except OSError as exc:
            raise StoreError(f"query endpoint {self.url}: {exc}", retryable=True) from None

    def execute(self, sql: str) -> None:
        raise StoreError("the sink's query endpoint is read-only", retryable=False)

    def insert(self, table: str, data: pa.Table, token: str = "") -> None:
        self.execute("INSERT")

    def close(self) -> None:
        """Nothing to release."""


# --- opening --------------------------------------------------------------------------

def chdb_path(cfg: Config) -> Path:
    return cfg.run_dir / "chdb"


def open_store(cfg: Config) -> Store:
    """The writable store of this config: a ClickHouse server if clickhouse.url is set, else chDB."""
    ch = cfg.clickhouse
    if ch.url:
        return ServerStore(ch.url, ch.database, cfg.secret(ch.password_env), ch.secure, ch.connect_timeout_s,
                           ch.tls_ca_file)
    return ChdbStore(chdb_path(cfg), ch.database)


def open_reader(cfg: Config) -> Store:
    """A store to read from: the server, the running sink's endpoint, or chDB opened directly."""
    ch = cfg.clickhouse
    if not ch.url and ch.query_port:
        reader = HttpReader(ch.query_port, ch.database, cfg.secret(ch.query_token_env))
        if reader.alive():
            return reader
    return open_store(cfg)


def fill_nulls(table: pa.Table) -> pa.Table:
    """Arrow nulls -> the column type's ClickHouse default ("" / 0 / NaN / false)."""
    for i, f in enumerate(table.schema):
        col = table.column(i)
        if col.null_count == 0:
            continue
        if pa.types.is_floating(f.type):
            fill = pa.scalar(float("nan"), f.type)
        elif pa.types.is_string(f.type) or pa.types.is_binary(f.type):
            fill = pa.scalar(b"" if pa.types.is_binary(f.type) else "", f.type)
        elif pa.types.is_boolean(f.type):
            fill = pa.scalar(False)
        elif pa.types.is_timestamp(f.type):
            fill = pa.scalar(0, pa.int64()).cast(f.type)
        else:
            fill = pa.scalar(0, f.type)
        table = table.set_column(i, f, pc.fill_null(col, fill))
    return table
