"""One store client over embedded chDB and a ClickHouse server (native protocol).

``open_store(cfg)`` returns a ``Store`` with ``execute`` (DDL), ``query`` (-> Arrow table)
and ``insert`` (Arrow table -> table, with an insert deduplication token where the engine
has them). Errors come out as ``StoreError`` with ``retryable`` set: retryable ones
(server down, timeouts, too many parts, missing table) are worth a retry with the same
data; permanent ones (the data does not fit) are not.

chDB allows one process per data directory: the sink owns it and serves read-only SQL on
127.0.0.1 (``QueryServer``: token always required, read-only engine session, checked parse,
limits; docs/security.md); ``open_reader(cfg)`` uses that endpoint when the sink runs and
opens chDB directly when it does not.
"""
from __future__ import annotations

import atexit
import hmac
import logging
import queue
import re
import secrets
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aimass.core.config import Config
from aimass.core.files import check_private, private_dir, write_private
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
_read_sessions: list = []  # the query endpoint's read-only sessions, closed before the writer's


def _open_chdb_session(path: Path):
    """The process's chDB session on ``path`` (chDB allows one directory per process)."""
    global _chdb_session, _chdb_path
    from chdb import session

    if _chdb_session is not None and _chdb_path == str(path):
        return _chdb_session
    if _chdb_session is not None:
        _chdb_session.close()
        _chdb_session = None
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
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
    while _read_sessions:
        _read_sessions.pop().close()
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
#
# Defence in depth, the engine first: every query runs on a chDB session opened with
# readonly=1 and the limits as startup settings, which no query can change (the engine refuses
# INSERT / DDL / SET / SETTINGS and the table functions that reach files, URLs, servers and
# programs). Two holes remain in that mode, closed by checking the engine's own parse:
# `INTO OUTFILE` (chDB's client writes the file) and the scalar file() function, plus DESCRIBE
# of a table function (it fetches to infer a schema). The parse: formatQuery() turns the text
# into one canonical statement (comments gone, multi-statements refused), EXPLAIN AST of that
# text lists every node, and the canonical text is what runs.

TOKEN_FILE = "query-token"
MAX_SQL_BYTES = 64 * 1024
MAX_MEMORY_BYTES = 2 << 30
STATEMENTS = frozenset({"SelectWithUnionQuery", "SelectIntersectExceptQuery", "Explain", "DescribeQuery",
                        "ShowTables", "ShowColumns", "ShowCreateTableQuery"})
# Table functions that only generate rows (format() is also a scalar function; as a table it parses
# the literal it is given). Every other table function is refused, whatever the engine allows.
SAFE_TABLE_FUNCTIONS = frozenset({"numbers", "numbers_mt", "zeros", "zeros_mt", "generate_series",
                                  "generateseries", "values", "view", "format"})
# Scalar functions that reach files, other servers or tables outside the store.
DENIED_FUNCTIONS = frozenset({"file", "catboostevaluate", "hascolumnintable", "joinget", "joingetornull",
                              "addresstoline", "addresstolinewithinlines", "addresstosymbol", "demangle"})
AST_LINE = re.compile(r"^( *)(\w+)(?: +([^ ]+))?")
# The SHOW statements of the project's database; SHOW DATABASES / SETTINGS / CLUSTERS / MERGES ...
# parse to the same ShowTables node, and SHOW COLUMNS names its database only in the text.
SHOW_ALLOWED = re.compile(r"SHOW (?:(?:FULL )?(?:TEMPORARY )?TABLES|(?:EXTENDED )?(?:FULL )?COLUMNS|CREATE TABLE)\b")
SHOW_COLUMNS_DB = re.compile(r"SHOW (?:EXTENDED )?(?:FULL )?COLUMNS FROM (?:`[^`]*`|[^ `]+) FROM (`[^`]*`|[^ `]+)")
QUOTED_IDENTIFIER_WITH_ESCAPE = re.compile(r"`[^`]*\\")
STRING_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'")


class QueryRefused(ValueError):
    """A query the endpoint will not run; ``status`` is its HTTP status, the message says why."""

    def __init__(self, message: str, status: int = 403):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class QueryLimits:
    """What one query on the endpoint may use (set by the server, not by the query)."""

    timeout_s: float = 30.0
    max_rows: int = 5_000_000
    max_bytes: int = 512 << 20
    max_concurrent: int = 2
    max_threads: int = 2

    @classmethod
    def of(cls, cfg: Config) -> "QueryLimits":
        ch = cfg.clickhouse
        return cls(ch.query_timeout_s, ch.query_max_rows, ch.query_max_bytes, ch.query_max_concurrent,
                   ch.query_max_threads)

    def session_settings(self, database: str) -> str:
        """chDB startup settings (connection-string query) of a read-only session."""
        return "&".join(f"{k}={v}" for k, v in {
            "readonly": 1, "database": database, "max_execution_time": self.timeout_s,
            "timeout_overflow_mode": "throw", "max_result_rows": self.max_rows, "max_result_bytes": self.max_bytes,
            "result_overflow_mode": "throw", "max_threads": self.max_threads, "max_memory_usage": MAX_MEMORY_BYTES,
            "max_query_size": MAX_SQL_BYTES, "function_sleep_max_microseconds_per_block": 100_000,
            "allow_introspection_functions": 0}.items())


def check_canonical(canonical: str) -> None:
    """Refuse the clauses a read-only engine still honours: INTO OUTFILE, FORMAT and SETTINGS."""
    if QUOTED_IDENTIFIER_WITH_ESCAPE.search(STRING_LITERAL.sub("''", canonical)):
        raise QueryRefused("identifiers with escaped characters are not accepted", 400)
    for line in canonical.splitlines():
        clause = line.lstrip().split(" ", 2)
        if clause[:2] == ["INTO", "OUTFILE"]:
            raise QueryRefused("INTO OUTFILE is refused: the query port never writes files")
        if clause[0] == "SETTINGS":
            raise QueryRefused("SETTINGS are refused: the query port sets the limits "
                               "(clickhouse.query_timeout_s, query_max_rows, query_max_bytes, query_max_threads)")
        if clause[0] == "FORMAT" and not line.startswith(" "):
            raise QueryRefused("FORMAT is refused: the query port answers in Arrow IPC (`aimass query` converts)", 400)


def check_show(canonical: str, database: str) -> None:
    """Refuse SHOW statements other than SHOW TABLES / COLUMNS / CREATE TABLE, and columns of other databases."""
    for line in canonical.splitlines():
        if not line.startswith("SHOW "):
            continue
        if not SHOW_ALLOWED.match(line):
            raise QueryRefused(f"{' '.join(line.split()[:2])} is refused: only SHOW TABLES, SHOW COLUMNS and "
                               f"SHOW CREATE TABLE of database {database} are accepted")
        m = SHOW_COLUMNS_DB.match(line)
        if m and m.group(1).strip("`") != database:
            raise QueryRefused(f"{m.group(1)} is refused: the query port reads only database {database}")


def check_ast(explain_ast: str, database: str, other_databases: frozenset[str], denied: frozenset[str]) -> None:
    """Refuse statements other than SELECT / SHOW / DESCRIBE / EXPLAIN (also as what an EXPLAIN explains),
    denied functions and other databases."""
    kinds: dict[int, str] = {}  # depth -> kind of the last node seen there (a node's parent is at depth - 1)
    for i, line in enumerate(explain_ast.splitlines()):
        m = AST_LINE.match(line)
        if not m:
            continue
        depth, kind, name = len(m.group(1)), m.group(2), (m.group(3) or "")
        if i == 0 and kind not in STATEMENTS:
            raise QueryRefused(f"only SELECT, SHOW, DESCRIBE and EXPLAIN are accepted, not {kind}")
        kinds[depth] = kind
        if kinds.get(depth - 1) == "Explain" and kind not in STATEMENTS and kind != "Set":  # what it explains
            raise QueryRefused(f"only SELECT, SHOW, DESCRIBE and EXPLAIN are accepted, not EXPLAIN of {kind}")
        if kind == "Function" and name.lower() in denied:
            raise QueryRefused(f"{name}() is refused: the query port reads only the tables of database {database}")
        if kind in ("TableIdentifier", "Identifier") and "." in name:
            db = name.split(".", 1)[0].strip("`")
            if (kind == "TableIdentifier" and db != database) or db.lower() in other_databases:
                raise QueryRefused(f"{name} is refused: the query port reads only the tables of database {database}")
        if kind == "Identifier" and i == 1 and name.strip("`").lower() in other_databases:
            raise QueryRefused(f"{name} is refused: the query port reads only database {database}")


class ReadOnlyQueries:
    """Read-only chDB sessions on the store's directory, one per concurrent query.

    They are separate from the writer's session and lock, so a running query never makes an insert
    wait for the lock (only for CPU: ``max_threads`` bounds that)."""

    def __init__(self, store: ChdbStore, limits: QueryLimits):
        self.database, self.limits = store.database, limits
        store.execute(f"CREATE DATABASE IF NOT EXISTS `{store.database}`")
        self.url = f"{store.path}?{limits.session_settings(store.database)}"
        self.pool: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(limits.max_concurrent):
            self.pool.put(self._open())
        probe = self.pool.get()
        try:
            others = _rows(probe, "SELECT lower(name) FROM system.databases")
            table_functions = _rows(probe, "SELECT lower(name) FROM system.table_functions")
        finally:
            self.pool.put(probe)
        self.other_databases = frozenset(others) - {self.database.lower()}
        self.denied = DENIED_FUNCTIONS | (frozenset(table_functions) - SAFE_TABLE_FUNCTIONS)

    def _open(self):
        from chdb import session

        s = session.Session(self.url)
        _read_sessions.append(s)
        return s

    def _discard(self, s) -> None:
        _read_sessions.remove(s)
        s.close()

    def run(self, sql: str) -> bytes:
        """One checked query -> Arrow IPC stream bytes; QueryRefused or StoreError otherwise."""
        s = self.pool.get()
        try:
            return self._run(s, sql)
        except BaseException:
            # A failed query can leave unread result bytes in a chDB session: start the next one clean.
            self._discard(s)
            s = self._open()
            raise
        finally:
            self.pool.put(s)

    def _run(self, s, sql: str) -> bytes:
        try:
            canonical = _rows(s, "SELECT formatQuery({q:String})", q=_escape(sql), raw=True)
        except Exception as exc:  # noqa: BLE001 - syntax errors and multi-statements
            raise QueryRefused(f"not one valid statement: {classify(exc)}", 400) from None
        check_canonical(canonical)
        check_show(canonical, self.database)
        try:
            ast = _rows(s, f"EXPLAIN AST {canonical}", raw=True)
        except Exception as exc:  # noqa: BLE001
            raise classify(exc) from None
        check_ast(ast, self.database, self.other_databases, self.denied)
        try:
            return s.query(canonical, "ArrowStream").bytes()
        except Exception as exc:  # noqa: BLE001
            raise classify(exc) from None

    def close(self) -> None:
        while not self.pool.empty():
            self._discard(self.pool.get())


def _escape(text: str) -> str:
    """A query parameter value in ClickHouse's escaped text form."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _rows(s, sql: str, raw: bool = False, **params):
    out = s.query(sql, "TabSeparatedRaw", params=params or None).bytes().decode()
    return out if raw else out.split()


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server with at most ``max_connections`` handler threads; beyond, 503 and close."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 34\r\nRetry-After: 1\r\n"
                            b"Connection: close\r\n\r\ntoo many connections: retry later\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):  # the client went away before its answer
            log.debug("query endpoint: %s closed the connection early", client_address)
            return
        super().handle_error(request, client_address)


class QueryServer:
    """Serves ``POST /query`` (SQL body -> Arrow IPC stream) from the sink's chDB on 127.0.0.1.

    A bearer token is always required; the Host header must name the bind address (no DNS rebinding);
    bodies are capped at MAX_SQL_BYTES; beyond ``max_concurrent`` running queries the answer is 429.
    Every refusal is a 4xx whose body says why."""

    def __init__(self, store: ChdbStore, port: int, token: str, limits: QueryLimits = QueryLimits()):
        if not token:
            raise ValueError("the query port needs a token (ensure_query_token makes one)")
        self.queries = ReadOnlyQueries(store, limits)
        self.httpd = _BoundedHTTPServer(("127.0.0.1", port), None, 4 * limits.max_concurrent + 4)
        self.httpd.RequestHandlerClass = self._handler_class(self.queries, token, self.port, limits)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="query-server", daemon=True)

    @staticmethod
    def _handler_class(queries: ReadOnlyQueries, token: str, port: int, limits: QueryLimits):
        hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
        running = threading.BoundedSemaphore(limits.max_concurrent)

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # seconds a client may take to send its request

            def log_message(self, fmt, *args):  # quiet: the sink logs its own progress
                log.debug("query endpoint: " + fmt, *args)

            def _reply(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8", **headers) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k.replace("_", "-"), v)
                self.end_headers()
                self.wfile.write(body)

            def _refuse(self, status: int, why: str, **headers) -> None:
                self.close_connection = True
                self._reply(status, f"{why}\n".encode(), **headers)

            def _host_ok(self) -> bool:
                if self.headers.get("Host", "") in hosts:
                    return True
                self._refuse(421, f"Host must be 127.0.0.1:{port} or localhost:{port}")
                return False

            def do_GET(self):
                if not self._host_ok():
                    return
                if self.path == "/health":
                    self._reply(200, f"ok {queries.database}\n".encode())
                else:
                    self._refuse(404, "POST /query with SQL; GET /health")

            def do_POST(self):
                if not self._host_ok():
                    return
                if not hmac.compare_digest(self.headers.get("Authorization", "").encode(), f"Bearer {token}".encode()):
                    return self._refuse(401, "missing or wrong bearer token: send `Authorization: Bearer <token>` "
                                             f"(the sink keeps it in <run dir>/{TOKEN_FILE}, mode 0600, unless "
                                             "clickhouse.query_token_env names a variable that holds it)")
                if self.path != "/query":
                    return self._refuse(404, "POST /query")
                try:
                    size = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    return self._refuse(411, "Content-Length is required")
                if not 0 < size <= MAX_SQL_BYTES:
                    return self._refuse(413, f"the SQL must be 1..{MAX_SQL_BYTES} bytes, not {size}")
                body = self.rfile.read(size)  # before taking a slot: a slow sender holds none
                if len(body) < size:
                    return self._refuse(400, f"the body ended after {len(body)} of {size} bytes")
                if not running.acquire(blocking=False):
                    return self._refuse(429, f"{limits.max_concurrent} queries already running "
                                             "(clickhouse.query_max_concurrent): retry later", Retry_After="1")
                try:
                    data = queries.run(body.decode("utf-8", "replace"))
                except QueryRefused as exc:
                    return self._refuse(exc.status, f"refused: {exc}")
                except StoreError as exc:
                    status = 403 if exc.code == 164 else 422
                    return self._refuse(status, f"{'refused by the read-only engine' if status == 403 else 'failed'}: {exc}")
                finally:
                    running.release()
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
        self.queries.close()


def query_token_path(cfg: Config) -> Path:
    return cfg.run_dir / TOKEN_FILE


def read_query_token(cfg: Config) -> str:
    """The query port's token: from clickhouse.query_token_env, else <run dir>/query-token, else ""."""
    token = cfg.secret(cfg.clickhouse.query_token_env)
    path = query_token_path(cfg)
    if token or not path.exists():
        return token
    check_private(path, "query token")
    return path.read_text().strip()


def ensure_query_token(cfg: Config) -> str:
    """The token the sink requires: the configured or stored one, else a new one stored 0600 in the run dir."""
    token = read_query_token(cfg)
    if not token:
        token = secrets.token_urlsafe(32)
        private_dir(cfg.run_dir)
        write_private(query_token_path(cfg), token.encode())
    return token


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
        reader = HttpReader(ch.query_port, ch.database, read_query_token(cfg))
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
