"""The sink's query port attacked the way a local user would: against a real chDB store and the real
QueryServer, with a canary file that must not be read, paths that must not be written and a local
HTTP server that must receive no request. Then the limits (time, rows, body, concurrency), the
insert delay behind the heaviest allowed query, the token and the Host check."""
from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aimass.core import contract
from aimass.core.clickhouse import (MAX_SQL_BYTES, ChdbStore, HttpReader, QueryLimits, QueryServer, StoreError,
                                    ensure_query_token, query_token_path, read_query_token)
from aimass.core.config import Config
from aimass.core.db import migrate
from aimass.core.files import UnsafeFileError
from aimass.core.procs import free_port
from tests.fixtures_store import chdb_config, chdb_run_dir, counts, insert, readings  # noqa: F401

pytestmark = pytest.mark.integration
TOKEN = "t0ken-for-tests"
CANARY = "CANARY-7f3a9c-must-never-leave-the-file"
HEAVY = "SELECT count() FROM numbers(1000000000000) WHERE sipHash64(number) = 0"  # runs until the time limit

# {canary}: a file outside the store; {out}: a path that must not be written; {url}: the trap HTTP server;
# {hostport}: its address; {db}: the project's database.
ATTACKS = [
    # files
    "SELECT * FROM file('{canary}', 'LineAsString')",
    "SELECT * FROM file('/proc/self/environ', 'RawBLOB')",
    "SELECT file('{canary}')",
    "SELECT * FROM FiLe('{canary}', 'LineAsString')",
    "select * from FILE('{canary}','LineAsString')",
    "SELECT * FROM `file`('{canary}', 'LineAsString')",
    "/* c */ SELECT * FROM /**/ file('{canary}', 'LineAsString') -- trailing",
    "SELECT * FROM (SELECT * FROM file('{canary}', 'LineAsString'))",
    "SELECT * FROM view(SELECT * FROM file('{canary}', 'LineAsString'))",
    "SELECT * FROM {db}.readings WHERE tenant IN (SELECT * FROM file('{canary}', 'LineAsString'))",
    "SELECT * FROM sqlite('{canary}', 't')",
    "SELECT * FROM fileCluster('default', '{canary}', 'LineAsString')",
    "SELECT * FROM icebergLocal('{canary}')",
    "SELECT catboostEvaluate('{canary}', 1)",
    "DESCRIBE file('{canary}', 'LineAsString')",
    "SELECT * FROM file('{canary}', 'LineAsString') AS `x\n TableIdentifier {db}.readings`",
    # network
    "SELECT * FROM url('{url}/a', 'LineAsString')",
    "SELECT * FROM URL('{url}/a2', 'LineAsString', 'a String')",
    "SELECT * FROM s3('{url}/bucket/key', 'CSV', 'a String')",
    "DESCRIBE url('{url}/b', 'CSV')",
    "DESCRIBE TABLE s3('{url}/bucket/k2', 'CSV')",
    "EXPLAIN PIPELINE SELECT * FROM url('{url}/c', 'CSV', 'a String')",
    "SELECT * FROM urlCluster('default', '{url}/d', 'CSV', 'a String')",
    "SELECT * FROM remote('{hostport}', system.one)",
    "SELECT * FROM remoteSecure('{hostport}', system.one)",
    "SELECT * FROM cluster('default', system.one)",
    "SELECT * FROM mysql('{hostport}', 'd', 't', 'u', 'p')",
    "SELECT * FROM postgresql('{hostport}', 'd', 't', 'u', 'p')",
    "SELECT * FROM mongodb('{hostport}', 'd', 'c', 'u', 'p', 'x String')",
    "SELECT * FROM redis('{hostport}', 'k', 'k String')",
    "SELECT * FROM hdfs('hdfs://{hostport}/x', 'CSV', 'a String')",
    "SELECT * FROM azureBlobStorage('{url}/az', 'c', 'b', 'CSV')",
    "SELECT * FROM jdbc('jdbc:mysql://{hostport}/d', 't')",
    "SELECT * FROM odbc('DSN=x', 't')",
    "SELECT hasColumnInTable('{hostport}', 'u', 'p', 'd', 't', 'c')",
    # programs and the host process
    "SELECT * FROM executable('cat {canary}', 'TSV', 'a String')",
    "SELECT * FROM Python(token)",
    "SELECT * FROM input('a String')",
    "SELECT * FROM dictionary('d')",
    "SELECT addressToSymbol(1)",
    # writes: files
    "SELECT unhex('41') INTO/**/OUTFILE '{out}' FORMAT RawBLOB",
    "SELECT 1 INTO OUTFILE '{out}'",
    "select 1 into outfile '{out}' truncate",
    "EXPLAIN SELECT 1 INTO OUTFILE '{out}'",
    "SHOW TABLES INTO OUTFILE '{out}'",
    "DESCRIBE {db}.readings INTO OUTFILE '{out}'",
    "SELECT 1 UNION ALL SELECT 2 INTO OUTFILE '{out}'",
    "BACKUP TABLE {db}.readings TO File('{out}')",
    "CREATE TABLE {db}.evil (x Int8) ENGINE = File(RawBLOB, '{out}')",
    "CREATE TABLE {db}.evil2 ENGINE = URL('{url}/e', CSV) AS SELECT 1",
    "CREATE DICTIONARY {db}.d (a String) PRIMARY KEY a SOURCE(FILE(path '{canary}' format 'TSV')) "
    "LAYOUT(FLAT()) LIFETIME(0)",
    # writes: the store
    "WITH 1 AS a INSERT INTO {db}.readings (tenant) VALUES ('evil')",
    "INSERT INTO {db}.readings (tenant) SELECT 'evil'",
    "SELECT 1; INSERT INTO {db}.readings (tenant) VALUES ('evil')",
    "SELECT 1;INSERT INTO {db}.readings (tenant) VALUES ('evil');",
    "SELECT 1 /* ; */; DROP TABLE {db}.readings",
    "DROP TABLE {db}.readings",
    "TRUNCATE TABLE {db}.readings",
    "ALTER TABLE {db}.readings DELETE WHERE 1",
    "OPTIMIZE TABLE {db}.readings FINAL",
    "RENAME TABLE {db}.readings TO {db}.gone",
    "DETACH TABLE {db}.readings",
    "CREATE USER evil",
    "SYSTEM SHUTDOWN",
    "KILL QUERY WHERE 1",
    "USE system",
    # settings and limits
    "SELECT 1 SETTINGS readonly = 0",
    "SELECT 1 SETTINGS max_execution_time = 1000",
    "SELECT count() FROM numbers(10) SETTINGS max_result_rows = 0, max_threads = 64",
    "SELECT * FROM (SELECT 1 SETTINGS max_memory_usage = 0)",
    "SET readonly = 0",
    "SET max_execution_time = 0",
    "SELECT 1 FORMAT RawBLOB",
    # other databases
    "SELECT * FROM system.one",
    "SELECT name FROM SYSTEM.tables",
    "SELECT 1 WHERE 1 IN system.numbers",
    "SELECT * FROM merge('system', '^one$')",
    "SHOW TABLES FROM system",
    "EXISTS TABLE {db}.readings",
    # more of the same kind: tables of other databases through SHOW, writes inside EXPLAIN
    "SHOW COLUMNS FROM system.one",
    "SHOW COLUMNS FROM one FROM system",
    "SHOW EXTENDED FULL COLUMNS IN users IN `system`",
    "SHOW DATABASES",
    "SHOW SETTINGS LIKE '%path%'",
    "SHOW CLUSTERS",
    "SHOW MERGES",
    "SHOW FILESYSTEM CACHES",
    "SHOW DICTIONARIES FROM {db}",
    "EXPLAIN AST INSERT INTO {db}.readings (tenant) VALUES ('evil')",
    "EXPLAIN PIPELINE INSERT INTO {db}.readings (tenant) SELECT 'evil'",
    "EXPLAIN AST SHOW DATABASES",
    "SELECT * FROM (EXPLAIN AST INSERT INTO {db}.readings (tenant) SELECT 'evil')",
    # ... files, URLs and programs behind views, subqueries, joins, comments and look-alike names
    "SELECT * FROM view(SELECT * FROM url('{url}/v1', 'LineAsString'))",
    "SELECT * FROM viewIfPermitted(SELECT * FROM file('{canary}', 'LineAsString') ELSE null('a String'))",
    "SELECT * FROM viewExplain('EXPLAIN', '', (SELECT * FROM file('{canary}', 'LineAsString')))",
    "SELECT * FROM values('a String', (SELECT * FROM file('{canary}', 'LineAsString')))",
    "SELECT * FROM format(LineAsString, (SELECT file('{canary}')))",
    "SELECT * FROM numbers(2) AS n JOIN file('{canary}', 'LineAsString') AS f ON 1",
    "SELECT * FROM loop(file('{canary}', 'LineAsString'))",
    "SELECT * FROM file # a comment\n('{canary}', 'LineAsString')",
    "SELECT * FROM \"file\"('{canary}', 'LineAsString')",
    "SELECT * FROM `fi\\x6ce`('{canary}', 'LineAsString')",
    "SELECT * FROM f\u0456le('{canary}', 'LineAsString')",  # Cyrillic i
    "SELECT * FROM \uff46\uff49\uff4c\uff45('{canary}', 'LineAsString')",  # full-width letters
    "SELECT * FROM s3Cluster('default', '{url}/b/k', 'CSV', 'a String')",
    "SELECT * FROM gcs('{url}/b/k', 'CSV', 'a String')",
    "SELECT * FROM deltaLake('{url}/dl')",
    "SELECT * FROM iceberg('{url}/ice')",
    "SELECT * FROM azureBlobStorageCluster('default', '{url}/az', 'c', 'b', 'CSV')",
    "SELECT * FROM remoteSecure('{hostport}', '{db}', 'readings', 'default', '')",
    "SELECT * FROM information_schema.tables",
    "WITH (SELECT name FROM system.users LIMIT 1) AS u SELECT u",
    "SELECT * FROM {db}.readings FINAL SETTINGS max_threads = 1000",
]
# Reads of the project's database that must still be answered.
READS = ["SELECT count() FROM {db}.readings", "SHOW TABLES", "SHOW TABLES FROM {db} LIKE 'read%'",
         "SHOW COLUMNS FROM readings", "SHOW COLUMNS FROM readings FROM {db}", "SHOW CREATE TABLE {db}.readings",
         "DESCRIBE {db}.readings", "EXPLAIN SELECT 1", "EXPLAIN PIPELINE header = 1 SELECT count() FROM {db}.readings",
         "EXPLAIN AST SHOW TABLES", "SELECT * FROM view(SELECT number FROM numbers(3))"]


class Trap(BaseHTTPRequestHandler):
    """Answers anything (so a leaked request does not hang) and records it."""

    hits: list[str] = []

    def _any(self):
        Trap.hits.append(f"{self.command} {self.path}")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"a\n")

    do_GET = do_POST = do_HEAD = do_PUT = _any

    def log_message(self, *args):
        pass


@pytest.fixture
def store(chdb_run_dir) -> ChdbStore:  # noqa: F811
    cfg = chdb_config(Config(), chdb_run_dir)
    s = ChdbStore(cfg.run_dir / "chdb", cfg.clickhouse.database)
    migrate(s, cfg)
    s.cfg = cfg
    return s


@pytest.fixture
def trap():
    Trap.hits = []
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Trap)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def post(port: int, sql: bytes, token: str = TOKEN, host: str = "") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/query", data=sql, method="POST")
    req.add_header("Authorization", f"Bearer {token}")
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_no_adversarial_statement_runs_reads_writes_or_calls_out(store, trap, tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text(CANARY + "\n")
    out = tmp_path / "written"
    db = store.database
    insert(store, contract.CLEAN, readings(20, device="keep"))
    before = counts(store, db, final=False)
    server = QueryServer(store, free_port(), TOKEN, QueryLimits(timeout_s=2)).start()
    url = f"http://127.0.0.1:{trap.server_address[1]}"
    succeeded, silent, executed = [], [], []
    try:
        for attack in ATTACKS:
            sql = attack.format(canary=canary, out=out, url=url, hostport=url[7:], db=db)
            status, body = post(server.port, sql.encode())
            assert CANARY.encode() not in body, sql
            if status == 200:
                succeeded.append(sql)
            elif not (400 <= status < 500 and len(body.strip()) > 10):
                silent.append((sql, status, body))
            if not body.startswith(b"refused: "):  # the parse check's refusals come before anything runs
                executed.append((sql, status, body))
        # the port still answers legitimate reads
        for read in READS:
            status, body = post(server.port, read.format(db=db).encode())
            assert status == 200, (read, body)
    finally:
        server.stop()
    assert succeeded == []
    assert silent == []  # every refusal is a 4xx that says why
    assert executed == []  # none reached the engine: nothing was opened, read or fetched
    assert Trap.hits == []  # no request left
    assert not out.exists() and list(tmp_path.iterdir()) == [canary]  # nothing written
    assert counts(store, db, final=False) == before  # nothing inserted, nothing dropped
    assert set(store.query(f"SELECT name FROM system.tables WHERE database = '{db}'").column("name").to_pylist()) \
        >= {"readings"}


def test_refusals_name_the_reason(store, tmp_path):
    db = store.database
    server = QueryServer(store, free_port(), TOKEN).start()
    try:
        reasons = {
            f"SELECT * FROM file('{tmp_path}/x', 'LineAsString')": "file() is refused",
            "SELECT 1 INTO OUTFILE '/tmp/x'": "INTO OUTFILE is refused",
            "SELECT 1 SETTINGS max_threads = 64": "SETTINGS are refused",
            f"WITH 1 AS a INSERT INTO {db}.readings (tenant) VALUES ('x')": "only SELECT, SHOW, DESCRIBE and EXPLAIN",
            "SELECT 1; SELECT 2": "Multi-statements are not allowed",
            "SELECT * FROM system.one": "reads only the tables of database",
            "SET readonly = 0": "only SELECT",
            "SHOW DATABASES": "only SHOW TABLES, SHOW COLUMNS and SHOW CREATE TABLE",
            "SHOW COLUMNS FROM system.one": "reads only database",
            f"EXPLAIN AST INSERT INTO {db}.readings (tenant) VALUES ('x')": "not EXPLAIN of InsertQuery",
        }
        for sql, why in reasons.items():
            status, body = post(server.port, sql.encode())
            assert 400 <= status < 500 and why in body.decode(), (sql, status, body)
    finally:
        server.stop()


def test_the_engine_itself_refuses_what_the_parse_check_lets_through(store, tmp_path):
    """The read sessions are read-only in the engine: with the parse check switched off, writes,
    setting changes and table functions still fail with READONLY."""
    server = QueryServer(store, free_port(), TOKEN).start()
    db = store.database
    try:
        s = server.queries.pool.get()
        for sql in (f"INSERT INTO {db}.readings (tenant) VALUES ('x')", f"DROP TABLE {db}.readings",
                    "SELECT 1 SETTINGS readonly = 0", "SELECT 1 SETTINGS max_execution_time = 1000",
                    f"SELECT * FROM file('{tmp_path}/x', 'LineAsString')", "SELECT * FROM url('http://127.0.0.1:1/')"):
            with pytest.raises(RuntimeError, match="READONLY|readonly"):
                s.query(sql)
        server.queries.pool.put(s)
    finally:
        server.stop()
    assert counts(store, db, final=False)["readings"] == 0


def test_limits_body_time_rows_and_concurrency(store):
    limits = QueryLimits(timeout_s=1.0, max_rows=1000, max_bytes=1 << 20, max_concurrent=2)
    server = QueryServer(store, free_port(), TOKEN, limits).start()
    try:
        status, body = post(server.port, b"SELECT 1 -- " + b"x" * MAX_SQL_BYTES)
        assert status == 413 and b"bytes" in body
        t0 = time.monotonic()
        status, body = post(server.port, HEAVY.encode())
        assert status == 422 and b"TIMEOUT_EXCEEDED" in body and time.monotonic() - t0 < 3
        status, body = post(server.port, b"SELECT number FROM numbers(5000)")
        assert status == 422 and b"TOO_MANY_ROWS" in body
        assert post(server.port, b"SELECT number FROM numbers(1000)")[0] == 200
        status, body = post(server.port, b"SELECT repeat(toString(number), 2000) FROM numbers(500)")  # ~2 MB
        assert status == 422 and b"max bytes: 1.00 MiB" in body
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(server.port, HEAVY.encode())))
                   for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        statuses = sorted(s for s, _ in results)
        assert statuses.count(422) == 2 and statuses.count(429) == 2, results  # 2 ran to the limit, 2 were refused
        assert all(b"retry later" in b for s, b in results if s == 429)
    finally:
        server.stop()


def test_a_slow_sender_holds_no_query_slot(store):
    """Clients that announce a body and never send it do not take the query slots from others; a body
    that ends short is refused."""
    server = QueryServer(store, free_port(), TOKEN, QueryLimits(max_concurrent=2)).start()
    slow = []
    try:
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(f"POST /query HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {TOKEN}"
                         "\r\nContent-Length: 100\r\n\r\nSELECT".encode())
            slow.append(sock)
        time.sleep(0.3)
        status, body = post(server.port, b"SELECT 1")
        assert status == 200, body  # not 429: the slow senders hold no slot
        slow[0].shutdown(socket.SHUT_WR)  # a body cut short is refused, not run
        slow[0].settimeout(10)
        reply = b"".join(iter(lambda: slow[0].recv(4096), b""))  # until the server closes
        assert b" 400 " in reply and b"the body ended after 6 of 100 bytes" in reply, reply
    finally:
        for sock in slow:
            sock.close()
        server.stop()


def test_an_insert_waits_at_most_1s_behind_the_heaviest_allowed_query(store):
    """Default limits; both query slots busy with queries that run to the time limit while the
    writer inserts 20k-row batches: the worst insert takes at most 1 s longer than the slowest quiet
    one (it never waits for the reads; the quiet time is its own work, slower on a loaded machine)."""
    limits = QueryLimits(timeout_s=4.0)
    batch = readings(20_000, device="w")
    quiet = []
    for _ in range(3):
        t0 = time.monotonic()
        insert(store, contract.CLEAN, batch)
        quiet.append(time.monotonic() - t0)
    server = QueryServer(store, free_port(), TOKEN, limits).start()
    loaded, done = [], []
    try:
        heavy = [threading.Thread(target=lambda: done.append(post(server.port, HEAVY.encode())))
                 for _ in range(limits.max_concurrent)]
        for t in heavy:
            t.start()
        time.sleep(0.3)
        while any(t.is_alive() for t in heavy):
            t0 = time.monotonic()
            insert(store, contract.CLEAN, batch)
            loaded.append(time.monotonic() - t0)
        for t in heavy:
            t.join()
    finally:
        server.stop()
    print(f"insert of 20k rows: quiet max {max(quiet):.3f} s; under {limits.max_concurrent} heavy queries: "
          f"{len(loaded)} inserts, max {max(loaded):.3f} s")
    assert [s for s, _ in done] == [422] * limits.max_concurrent  # they really ran to the limit
    assert len(loaded) >= 3 and max(loaded) - max(quiet) <= 1.0


def test_a_token_is_always_required_and_the_host_must_be_the_bind_address(store):
    with pytest.raises(ValueError, match="needs a token"):
        QueryServer(store, free_port(), "")
    server = QueryServer(store, free_port(), TOKEN).start()
    try:
        port = server.port
        for token in ("", "wrong", TOKEN + "x"):
            status, body = post(port, b"SELECT 1", token=token)
            assert status == 401 and b"bearer token" in body
        req = urllib.request.Request(f"http://127.0.0.1:{port}/query", data=b"SELECT 1", method="POST")
        with pytest.raises(urllib.error.HTTPError) as no_header:
            urllib.request.urlopen(req, timeout=10)
        assert no_header.value.code == 401
        status, body = post(port, b"SELECT 1", host=f"evil.example:{port}")  # DNS rebinding
        assert status == 421 and b"Host must be" in body
        assert post(port, b"SELECT 1", host=f"localhost:{port}")[0] == 200
        with pytest.raises(StoreError, match="bearer token"):
            HttpReader(port, store.database).query("SELECT 1")
        assert HttpReader(port, store.database, TOKEN).query("SELECT 1 AS x").column("x")[0].as_py() == 1
    finally:
        server.stop()


def test_the_sink_token_is_generated_0600_in_the_run_dir_and_read_back(tmp_path, monkeypatch):
    cfg = Config()
    cfg.run.dir = str(tmp_path / "run")
    monkeypatch.delenv(cfg.clickhouse.query_token_env, raising=False)
    assert read_query_token(cfg) == ""
    token = ensure_query_token(cfg)
    path = query_token_path(cfg)
    assert len(token) >= 32 and path.read_text() == token
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(cfg.run_dir.stat().st_mode & 0o777) == "0o700"
    assert ensure_query_token(cfg) == token and read_query_token(cfg) == token  # reused across restarts
    monkeypatch.setenv(cfg.clickhouse.query_token_env, "from-env")
    assert ensure_query_token(cfg) == "from-env" and read_query_token(cfg) == "from-env"
    monkeypatch.delenv(cfg.clickhouse.query_token_env)
    path.chmod(0o666)  # someone else could have planted it
    with pytest.raises(UnsafeFileError, match="group or others may write"):
        read_query_token(cfg)
    if os.geteuid() == 0:  # only root can give the file to another user
        path.chmod(0o600)
        os.chown(path, 65534, 65534)
        with pytest.raises(UnsafeFileError, match="belongs to uid 65534"):
            ensure_query_token(cfg)
