"""Shared fixtures: one local Supabase stack for the whole run (tests/local_supabase.py).

`stack` hands each test the running stack with faults cleared, the row cap and
statement timeout back at their defaults, and the demo data as demo_schema.sql makes
it. A test that writes asks for `fresh_stack`, which marks the data dirty so that the
next test reloads it (one reload per writing test, none for the tests that only read). `db` is a superuser psycopg connection, for checking the
database through a path that is not the tool's.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import (  # noqa: E402
    FAST_RETRIES, REPO_ROOT, isolated_work_dir, make_backup, make_client, wait_for)
from local_supabase import LocalSupabase  # noqa: E402

import supabase_backup  # noqa: E402

DEFAULT_MAX_ROWS = 1000
DEFAULT_STATEMENT_TIMEOUT = "8s"

# The Ctrl-C tests send SIGINT to the tool's processes and to this one. A shell without job
# control starts a background command (`pytest &`, cron's `... &`) with SIGINT ignored, and
# every process started from it would inherit that: Ctrl-C would do nothing and those tests
# would fail for a reason that is not the tool's. Python's own handler, as in a foreground run.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def local_stack():
    with LocalSupabase(max_rows=DEFAULT_MAX_ROWS,
                       statement_timeout=DEFAULT_STATEMENT_TIMEOUT) as stack:
        stack.dirty = False
        yield stack


@pytest.fixture
def stack(local_stack):
    if local_stack.dirty:
        local_stack.reset()
        local_stack.dirty = False
    local_stack.faults.clear()
    local_stack.requests.clear()
    yield local_stack
    local_stack.faults.clear()
    local_stack.max_rows = DEFAULT_MAX_ROWS
    local_stack.statement_timeout = DEFAULT_STATEMENT_TIMEOUT


@pytest.fixture
def fresh_stack(stack):
    stack.dirty = True
    return stack


@pytest.fixture
def slow_restore_of_users(fresh_stack, db, data, capsys):
    """A backup of users, every user changed since, and writes to users that take 0.5 s."""
    path = make_backup(capsys, data, "--tables", "users")
    db.execute("UPDATE users SET full_name = 'changed'")
    slow = fresh_stack.faults.add(kind="write", table="users", action="latency", delay=0.5)
    yield path
    # The server finishes the request the stopped process was waiting for: let it, so that it
    # lands in this test and not in the next one.
    wait_for(lambda: fresh_stack.writes("users") == slow.seen,
             what="the server to answer the last write")


@pytest.fixture
def db(stack):
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def client(stack):
    return make_client(stack.url, stack.service_role_key)


@pytest.fixture
def data(stack, tmp_path, monkeypatch):
    """A data folder, the stack's URL and service key in the environment, and no other settings."""
    isolated_work_dir(tmp_path, monkeypatch)
    monkeypatch.setattr(supabase_backup, "RETRY_DELAYS", FAST_RETRIES)
    monkeypatch.setenv("SUPABASE_URL", stack.url)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", stack.service_role_key)
    return tmp_path / "data"


@pytest.fixture
def script(tmp_path):
    """A copy of the script in a folder of its own, so that no real .env next to it is read."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(REPO_ROOT / "supabase_backup.py", app)
    return app / "supabase_backup.py"


@pytest.fixture
def html_server_url():
    """A web server that is not PostgREST: an HTML 404 page for everything."""

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html><body><h1>404 Not Found</h1></body></html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_HEAD = do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- The fault matrix (tests/test_faults.py) -------------------------------------------------
# A case of the fault suite asks for `matrix_row(case, kind, expected, exit_code)` and fills the
# row in from what it observed: the exit code, the facts it checked, and the database (or file)
# state it compared. pytest_terminal_summary prints the rows as a Markdown table with totals, and
# writes that table to the path in FAULT_MATRIX when it is set. Nothing in a row is written by
# hand but the case, its kind and what is expected.

MATRIX_KINDS = ("backup fault", "restore fault", "bad input", "configuration")
MATRIX_ROWS = pytest.StashKey[list]()


class MatrixRow:
    """One case of the matrix: what was expected, and what the test observed."""

    def __init__(self, nodeid, case, kind, expected, exit_code):
        assert kind in MATRIX_KINDS, kind
        self.nodeid, self.case, self.kind = nodeid, case, kind
        self.expected, self.expected_exit = expected, exit_code
        self.exit_code = None
        self.facts, self.problems = [], []
        self.lost = self.unexpected = 0

    def exited(self, code):
        """Record the exit code the run ended with; returns it."""
        self.exit_code = code
        return code

    def saw(self, fact, ok=True):
        """Record an observed fact; ok=False marks it as not what was expected."""
        self.facts.append(fact if ok else f"NOT AS EXPECTED: {fact}")
        if not ok:
            self.problems.append(fact)

    def compare(self, actual, expected, label):
        """Compare two states ({table: rows}, each row a hashable text): rows lost are the rows of
        the expected state missing from the actual one."""
        lost = unexpected = 0
        for table in sorted(set(actual) | set(expected)):
            have, want = Counter(actual.get(table, ())), Counter(expected.get(table, ()))
            lost += sum((want - have).values())
            unexpected += sum((have - want).values())
        self.lost += lost
        self.unexpected += unexpected
        exact = not (lost or unexpected)
        self.saw(label if exact else f"{label}: {lost} row(s) missing, {unexpected} unexpected",
                 exact)
        return lost

    @property
    def as_expected(self):
        return (self.exit_code is not None and self.exit_code == self.expected_exit
                and not self.problems and self.lost == 0 and self.unexpected == 0)

    @property
    def observed(self):
        if self.exit_code is None:
            return "(no observation: the test stopped before the run ended)"
        return "; ".join([f"exit {self.exit_code}", *self.facts])


@pytest.fixture
def matrix_row(request):
    """matrix_row(case, kind, expected, exit_code) -> a MatrixRow the test fills in."""
    rows = request.config.stash.setdefault(MATRIX_ROWS, [])

    def make(case, kind, expected, exit_code):
        row = MatrixRow(request.node.nodeid, case, kind, expected, exit_code)
        rows.append(row)
        return row

    return make


def _test_outcomes(terminalreporter):
    outcomes = {}
    for outcome in ("passed", "failed", "error", "xfailed", "xpassed", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", None)
            if nodeid and (outcome != "passed" or nodeid not in outcomes):
                outcomes[nodeid] = outcome
    return outcomes


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def fault_matrix_markdown(rows, outcomes):
    """The matrix as Markdown: one row per case, then the totals."""
    lines = ["| # | kind | case | expected | observed | rows lost | as expected | test |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for number, row in enumerate(rows, 1):
        lines.append("| " + " | ".join(_cell(value) for value in (
            number, row.kind, row.case, f"exit {row.expected_exit}; {row.expected}", row.observed,
            row.lost, "yes" if row.as_expected else "NO", outcomes.get(row.nodeid, "?"))) + " |")
    faults = [r for r in rows if r.kind in ("backup fault", "restore fault")]
    inputs = [r for r in rows if r.kind in ("bad input", "configuration")]
    refusals = [r for r in inputs if r.expected_exit != 0]
    totals = (f"cases run: {len(rows)}; faults survived: "
              f"{sum(r.as_expected for r in faults)} of {len(faults)}; bad inputs refused: "
              f"{sum(r.as_expected for r in refusals)} of {len(refusals)}"
              + (f" (and {sum(r.as_expected for r in inputs if r.expected_exit == 0)} of "
                 f"{len(inputs) - len(refusals)} accepted and restored exactly, as expected)"
                 if len(inputs) > len(refusals) else "")
              + f"; rows lost: {sum(r.lost for r in rows)}")
    not_expected = [f"#{n} {outcomes.get(r.nodeid, '?')}" for n, r in enumerate(rows, 1)
                    if not r.as_expected]
    if not_expected:
        totals += f"; not as expected: {len(not_expected)} ({', '.join(not_expected)})"
    return "\n".join(lines) + "\n\n" + totals + "\n"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = config.stash.get(MATRIX_ROWS, [])
    if not rows:
        return
    text = fault_matrix_markdown(rows, _test_outcomes(terminalreporter))
    target = os.environ.get("FAULT_MATRIX")
    if target or config.get_verbosity() > 0:
        terminalreporter.write_sep("=", "fault matrix")
        terminalreporter.write(text)
    else:
        # The default output stays short: the totals line only (the matrix with -v or
        # FAULT_MATRIX=file).
        terminalreporter.write_line("fault matrix: " + text.rstrip().splitlines()[-1]
                                    + " (the whole matrix: -v, or FAULT_MATRIX=file)")
    if target:
        Path(target).write_text("# Fault matrix\n\n" + text)
        terminalreporter.write_line(f"fault matrix written to {target}")
