"""The fault and bad-input suite (issue #6), with its matrix.

Every case runs against the real local stack and ends with an exactly checked state: the database
through psycopg (every column of every demo table, helpers.database_state), backup files through
`check --file` and a row-by-row comparison with the database, and the data folder for half-written
files (`.partial-*`). Each case records one row of the fault matrix (conftest.py: matrix_row) from
what it observed; the matrix is printed after the run, and written as Markdown to $FAULT_MATRIX:

    FAULT_MATRIX=fault_matrix.md .venv/bin/python -m pytest tests/test_faults.py

Layers (see STYLE.md): main([...]) in-process with tmp_path, and a subprocess where a real process
matters (kill -9, a file size limit).
"""

import fcntl
import gzip
import json
import os
import subprocess
import sys
import time
import zlib
from collections import Counter

import pytest

import supabase_backup
from helpers import (
    OUTLASTS_RETRIES, REPO_ROOT, SETTINGS, backup_while_a_table_is_dropped, database_state,
    file_form_rows, files_in, kill_9, kill_9_mid_write, make_backup, restore_log, rewrite_backup,
    rows_where, run, running, safety_backup, table_rows, wait_for, write_requests)
from local_supabase import make_jwt

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:supabase")

BATCH = 20  # rows per upsert request in the restore cases (small_batches)
CHANGED = 2 * BATCH + 10  # rows to write per table: three batches, the last one short
RESTORED = ("users", "bookings", "payments")  # written in this order: parents before children
SHRUNK_TO = 300  # bookings kept for the restore cases
DISK_FULL = "File too large"  # strerror(EFBIG): what a write past RLIMIT_FSIZE fails with


# --- observing -----------------------------------------------------------------------------------

def canonical(row):
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def api_state(db, tables):
    """The rows of tables as psycopg reads them, in the form a backup file holds them:
    {table: [canonical JSON]}."""
    return {table: [canonical(row) for row in file_form_rows(db, table)] for table in tables}


def file_state(path):
    """The rows of every table of a backup file, read the way a user's script would."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        document = json.load(f)
    return {name: [canonical(row) for row in table["rows"]]
            for name, table in document["tables"].items()}


def data_files(data):
    """Every file under the data folder."""
    return sorted(p for p in data.rglob("*") if p.is_file()) if data.is_dir() else []


def observe_files(row, capsys, data, skip=()):
    """Every file under the data folder (but skip) is whole: backups pass `check --file`, logs are
    JSON; and no `.partial-*` is left. Records what it found."""
    intact, damaged = [], []
    for path in data_files(data):
        if path in skip or any(part.startswith(".partial-") for part in path.parts):
            continue
        if path.name.endswith(".json.gz"):
            code, _, err = run(capsys, data, "check", "--file", str(path))
            (intact if code == 0 else damaged).append(path.name if code == 0 else
                                                      f"{path.name} fails check: {err.strip()}")
        elif path.parent.name == "summaries":
            try:
                json.loads(path.read_text())
                intact.append(path.name)
            except ValueError:
                damaged.append(f"{path.name} is not JSON")
    row.saw(f"{len(intact)} file(s) intact" if not damaged else "; ".join(damaged), not damaged)
    partial = sorted(str(p.relative_to(data)) for p in data.rglob(".partial-*"))
    row.saw("none half-written" if not partial else f"half-written: {', '.join(partial)}",
            not partial)


def observe_no_key(row, data, out, err, *keys):
    """No key appears in the output, or in any file under the data folder (decompressed too)."""
    places = []
    for key in {k.encode() for k in keys if k}:
        if key in (out + err).encode():
            places.append("the output")
        for path in data_files(data):
            content = path.read_bytes()
            if path.suffix == ".gz":
                try:
                    content = gzip.decompress(content)
                except (OSError, EOFError, zlib.error):  # a damaged file: search its bytes
                    pass
            if key in content:
                places.append(str(path.relative_to(data)))
    row.saw("key in no output or file" if not places else f"key found in {', '.join(places)}",
            not places)
    return places


def observe_error_line(row, err, *words):
    """The run ended with one error line, no traceback, naming words; returns the line."""
    lines = [line for line in err.splitlines() if line.startswith("supabase_backup: error: ")]
    ok = "Traceback" not in err and len(lines) == 1 and err.splitlines()[-1] == lines[0]
    missing = [word for word in words if not any(word in line for line in lines)]
    row.saw("one error line" + (f" naming {', '.join(words)}" if words else "")
            if ok and not missing else
            f"error output: {len(lines)} error line(s), traceback: {'Traceback' in err}, "
            f"missing: {missing}", ok and not missing)
    return lines[-1] if lines else ""


def observe_writes(row, stack, expected=0):
    writes = len(write_requests(stack))
    row.saw(f"{writes} write request(s)", writes == expected)
    return writes


def script_copy(tmp_path):
    """The script in a folder of its own (no .env next to it)."""
    app = tmp_path / "app"
    app.mkdir()
    script = app / "supabase_backup.py"
    script.write_bytes((REPO_ROOT / "supabase_backup.py").read_bytes())
    return script


def script_env(stack, data):
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(SUPABASE_URL=stack.url, SUPABASE_SERVICE_ROLE_KEY=stack.service_role_key,
               SUPABASE_BACKUP_DIR=str(data))
    return env


def run_with_file_size_limit(stack, data, tmp_path, limit, *argv):
    """`python supabase_backup.py ARGV` in a process whose files cannot grow past limit bytes
    (RLIMIT_FSIZE binds root too): its writes fail with EFBIG there, as on a full disk."""
    script = script_copy(tmp_path)
    wrapper = ("import resource, runpy, sys; "
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
               f"sys.argv = {[str(script), *argv]!r}; "
               f"runpy.run_path({str(script)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", wrapper], cwd=tmp_path,
                          env=script_env(stack, data), capture_output=True, text=True,
                          timeout=60)


def reads_recorded(stack, table):
    return len([r for r in stack.requests if r.table == table and r.method in ("GET", "HEAD")])


# --- backup faults -------------------------------------------------------------------------------

@pytest.mark.parametrize("case, fault", [
    ("API 5xx once (retried)", dict(status=503, code="PGRST001", message="injected: no db")),
    ("connection dropped mid-page once (retried)", dict(action="drop", when="after")),
])
def test_a_transient_fault_while_reading_is_retried_and_the_file_is_exact(
        stack, db, data, capsys, matrix_row, case, fault):
    row = matrix_row(f"backup: {case}", "backup fault",
                     "retried; file intact and equal to the database", 0)
    # bookings: the count, then the pages; the second page fails once.
    injected = stack.faults.add(kind="read", table="bookings", after=3, times=1, **fault)

    code, out, err = run(capsys, data, "backup", "--tables", "users,bookings")

    row.exited(code)
    row.saw(f"fault fired {injected.fired}x, retried", injected.fired == 1 and "retrying" in err)
    (path,) = [data / "backups" / n for n in files_in(data, "backups")]
    row.compare(file_state(path), api_state(db, ("users", "bookings")), "file = database")
    observe_files(row, capsys, data)
    assert code == 0, err
    assert row.as_expected, row.observed


@pytest.mark.parametrize("case, fault, words", [
    ("API 5xx persistently", dict(status=500, code="XX000", message="injected: disk on fire"),
     ["bookings", "disk on fire", "no backup file was written"]),
    ("connection dropped mid-page persistently", dict(action="drop", when="after"),
     ["bookings", "cannot reach", "after 4 attempts"]),
])
def test_a_persistent_fault_while_reading_fails_with_no_file(stack, db, data, capsys, matrix_row,
                                                             case, fault, words):
    row = matrix_row(f"backup: {case}", "backup fault",
                     "one error line; no file, not even a partial one; database untouched", 4)
    before = database_state(db)
    stack.faults.add(kind="read", table="bookings", after=3, **fault)

    code, out, err = run(capsys, data, "backup", "--tables", "users,bookings")

    row.exited(code)
    observe_error_line(row, err, *words)
    row.saw(f"backups/: {files_in(data, 'backups') or 'empty'}", files_in(data, "backups") == [])
    observe_files(row, capsys, data)
    row.compare(database_state(db), before, "database = as before")
    assert code == 4 and out == "", err
    assert row.as_expected, row.observed


def test_kill_9_mid_backup_to_an_output_folder_and_the_next_run_cleans_up(
        stack, db, data, capsys, tmp_path, matrix_row):
    row = matrix_row("backup: kill -9 mid-backup (--output folder)", "backup fault",
                     "only a .partial-* left, no final file; the next run removes it and writes "
                     "an exact file", 0)
    offsite = tmp_path / "offsite"
    offsite.mkdir()
    stack.max_rows = 500
    slow = stack.faults.add(kind="read", table="bookings", action="latency", delay=0.2)
    argv = ["backup", "--tables", "users,bookings", "--output", str(offsite)]
    process = subprocess.Popen([sys.executable, str(script_copy(tmp_path)), *argv], cwd=tmp_path,
                               env=script_env(stack, data), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    with running(process):
        wait_for(lambda: slow.seen >= 4, what="the backup to be reading bookings' pages")
        kill_9(process)
    left = sorted(os.listdir(offsite))
    row.saw(f"after the kill: {left}", len(left) == 1 and left[0].startswith(
        f".partial-{process.pid}-"))
    # The server answers the request the killed process was waiting for; then the next run.
    wait_for(lambda: reads_recorded(stack, "bookings") == slow.seen, what="the last answer")
    stack.faults.clear()
    stack.max_rows = 1000

    code, _, err = run(capsys, data, *argv)

    row.exited(code)
    now = sorted(os.listdir(offsite))
    row.saw(f"after the next run: {len(now)} file(s), no partial",
            len(now) == 1 and supabase_backup.BACKUP_NAME_PATTERN.fullmatch(now[0]) is not None)
    row.compare(file_state(offsite / now[0]), api_state(db, ("users", "bookings")),
                "file = database")
    check, _, _ = run(capsys, data, "check", "--file", str(offsite / now[0]))
    row.saw(f"check exit {check}", check == 0)
    logged = left[0] in (data / "logs" / "supabase_backup.log").read_text()
    row.saw(f"the log names the leftover removed: {logged}", logged)
    assert code == 0, err
    assert row.as_expected, row.observed


def test_disk_full_fails_the_backup_with_no_file_and_keeps_the_earlier_one(
        stack, db, data, capsys, tmp_path, matrix_row):
    row = matrix_row("backup: disk full (file size limit half-way)", "backup fault",
                     "one error line; no new file, no partial; the earlier backup intact", 6)
    earlier = make_backup(capsys, data, "--tables", "users,bookings")

    process = run_with_file_size_limit(stack, data, tmp_path, earlier.stat().st_size // 2,
                                       "backup", "--tables", "users,bookings")

    row.exited(process.returncode)
    observe_error_line(row, process.stderr, DISK_FULL, "no backup file was written")
    row.saw(f"backups/: {files_in(data, 'backups')}", files_in(data, "backups") == [earlier.name])
    observe_files(row, capsys, data)
    assert process.returncode == 6, process.stderr
    assert row.as_expected, row.observed


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_a_held_lock_refuses_a_second_run_before_any_request(stack, db, data, capsys, matrix_row,
                                                             command):
    row = matrix_row(f"{command}: lock held by another run", f"{command} fault",
                     "one error line naming the holder; no request; nothing written", 5)
    argv = ["backup"]
    data.mkdir()
    if command == "restore":
        argv = ["restore", "--safe", "--file", make_backup(capsys, data, "--tables",
                                                           "app_settings").name]
    before = database_state(db)
    stack.requests.clear()
    with open(data / ".supabase_backup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("supabase_backup backup (pid 4242)")
        lock.flush()
        code, out, err = run(capsys, data, *argv)

    row.exited(code)
    observe_error_line(row, err, "pid 4242", "wait for it to finish")
    row.saw(f"{len(stack.requests)} request(s)", not stack.requests)
    row.compare(database_state(db), before, "database = as before")
    observe_files(row, capsys, data)
    made = files_in(data, "backups")[1 if command == "restore" else 0:] + \
        files_in(data, "safety_backups") + files_in(data, "summaries")
    row.saw(f"new files: {made or 'none'}", not made)
    assert code == 5, err
    assert row.as_expected, row.observed


def test_a_table_dropped_between_discovery_and_its_first_read(stack, db, data, capsys,
                                                              matrix_row):
    row = matrix_row("backup: table dropped between discovery and read", "backup fault",
                     "one error line naming the table; no file, no partial", 6)
    # The first request for the table (its count) waits in the server; the table goes then.
    held = stack.faults.add(kind="read", table="scratch_doomed", action="latency", delay=0.5,
                            times=1)
    code, _, err = backup_while_a_table_is_dropped(capsys, db, data, lambda: held.seen >= 1,
                                                   "the first read of scratch_doomed")

    row.exited(code)
    row.saw(f"requests for the table: {reads_recorded(stack, 'scratch_doomed')} (the count)",
            reads_recorded(stack, "scratch_doomed") == 1)
    observe_error_line(row, err, "scratch_doomed disappeared during the backup",
                       "no backup file was written")
    row.saw(f"backups/: {files_in(data, 'backups') or 'empty'}", files_in(data, "backups") == [])
    observe_files(row, capsys, data)
    assert code == 6, err
    assert row.as_expected, row.observed


# --- restore --safe faults -----------------------------------------------------------------------

@pytest.fixture
def small_batches(monkeypatch):
    """Upserts of BATCH rows, so that a few dozen changed rows make three batches per table."""
    monkeypatch.setattr(supabase_backup, "WRITE_BATCH_SIZE", BATCH)


class Changed:
    """A backup of users, bookings and payments, and the changes since, as the database shows
    them: CHANGED rows of each table to write back, three batches each. Among them are three
    bookings deleted since with their payments, which the restore inserts again (the bookings in
    the last batch, parents before children), and a user added since, which it leaves alone.

    To keep the suite fast, bookings beyond SHRUNK_TO (and their payments, and every review) are
    deleted before the backup: the tables are still a chain of foreign keys."""

    def __init__(self, stack, db, data, capsys):
        self.stack, self.db = stack, db
        db.execute("TRUNCATE reviews")
        db.execute("DELETE FROM payments WHERE booking_id > %s", [SHRUNK_TO])
        db.execute("DELETE FROM bookings WHERE id > %s", [SHRUNK_TO])
        self.path = make_backup(capsys, data, "--tables", ",".join(RESTORED))
        self.backup_reads = {table: reads_recorded(stack, table) for table in RESTORED}
        self.at_backup = database_state(db)
        # The first batch of bookings: the first BATCH keys, all updated.
        self.bookings_at_backup = rows_where(db, "bookings", "id <= %s", [BATCH])
        db.execute("UPDATE users SET full_name = 'changed' "
                   "WHERE id IN (SELECT id FROM users ORDER BY id LIMIT %s)", [CHANGED])
        db.execute("INSERT INTO users (email, full_name) VALUES ('added@example.com', 'Added')")
        self.added = {"users": rows_where(db, "users", "email = 'added@example.com'")}
        gone = [i for (i,) in db.execute(
            "SELECT id FROM bookings AS b WHERE id > %s "
            "AND EXISTS (SELECT FROM payments AS p WHERE p.booking_id = b.id) "
            "ORDER BY id DESC LIMIT 3", [CHANGED])]
        gone_payments = [i for (i,) in db.execute(
            "DELETE FROM payments WHERE booking_id = ANY(%s) RETURNING id", [gone])]
        db.execute("DELETE FROM bookings WHERE id = ANY(%s)", [gone])
        self.gone = gone
        db.execute("UPDATE bookings SET notes = 'changed' WHERE id <= %s", [CHANGED - len(gone)])
        db.execute("UPDATE payments SET method = 'changed' WHERE id IN (SELECT id FROM payments "
                   "ORDER BY id LIMIT %s)", [CHANGED - len(gone_payments)])
        # The payment ids the restore writes, in the order it writes them (key order).
        self.payments_written = sorted(gone_payments + [i for (i,) in db.execute(
            "SELECT id FROM payments WHERE method = 'changed'")])
        assert len(self.payments_written) == CHANGED
        self.take_before()

    def take_before(self):
        """The state just before the restore (after any change a test makes)."""
        self.before = database_state(self.db)
        self.bookings_before = rows_where(self.db, "bookings", "id <= %s", [BATCH])
        self.api_before = api_state(self.db, RESTORED)
        self.stack.requests.clear()

    def restored(self):
        """What a complete restore leaves: the backup, plus the user added since."""
        return {table: sorted(rows + self.added.get(table, []))
                for table, rows in self.at_backup.items()}


@pytest.fixture
def changed(fresh_stack, db, data, capsys, small_batches, monkeypatch):
    """Changed, restored with one request in flight unless a test says --jobs: a fault on the
    N-th write request and its retries then hits one batch, the N-th. With several in flight,
    the N-th request is whichever gets there first (see the --jobs tests after the matrix)."""
    monkeypatch.setattr(supabase_backup, "DEFAULT_JOBS", 1)
    return Changed(fresh_stack, db, data, capsys)


def observe_rolled_back(row, capsys, data, db, changed, code, err, *words):
    """Exit 8: one error line, the database exactly as before, the safety backup holding exactly
    the state before, every file whole, and the restore log saying rolled back and verified."""
    row.exited(code)
    observe_error_line(row, err, *words, "rolled back", "the database is as before")
    row.compare(database_state(db), changed.before, "database = state before")
    row.compare(file_state(safety_backup(data)), changed.api_before,
                "safety backup = state before")
    observe_files(row, capsys, data)
    log = restore_log(data)
    row.saw(f"restore log: {log['status']}, rollback verified: {log['rollback']['verified']}",
            log["status"] == "rolled_back" and log["rollback"]["verified"] is True)
    return log


@pytest.mark.parametrize("table", RESTORED)
@pytest.mark.parametrize("batch", [1, 2, 3], ids=["first batch", "middle batch", "last batch"])
def test_a_write_failure_at_any_batch_of_any_table_rolls_back_exactly(
        changed, db, data, capsys, matrix_row, table, batch):
    which = {1: "first", 2: "middle", 3: "last"}
    position = {"users": "first", "bookings": "middle", "payments": "last"}[table]
    row = matrix_row(f"restore: write fails at the {which[batch]} batch of the {position} table "
                     f"({table})", "restore fault",
                     "rolled back; database exactly as before; safety backup intact", 8)
    fault = changed.stack.faults.add(kind="write", table=table, after=batch,
                                     times=OUTLASTS_RETRIES, status=503, code="XX000",
                                     message="injected: disk on fire")

    code, _, err = run(capsys, data, "restore", "--safe", "--file", changed.path.name)

    log = observe_rolled_back(row, capsys, data, db, changed, code, err, table, "disk on fire")
    written = log["tables_restored"][table]
    row.saw(f"{written['inserted'] + written['updated']} row(s) of {table} written before the "
            f"failure", fault.fired == OUTLASTS_RETRIES
            and written["inserted"] + written["updated"] == (batch - 1) * BATCH)
    assert code == 8, err
    assert row.as_expected, row.observed


@pytest.mark.parametrize("table", RESTORED)
@pytest.mark.parametrize("fault", [
    dict(status=503, code="XX000", message="injected: disk on fire"),
    dict(action="drop", when="before"),
], ids=["refused", "connection dropped"])
def test_with_writes_in_flight_a_batch_failing_for_good_rolls_back_exactly(
        changed, db, data, capsys, matrix_row, table, fault):
    """--jobs 4: the three batches of a table go at once; the first request to arrive lands,
    the other two batches fail for good (each of their attempts fails). The writes in flight
    when the first failure comes back are waited for, then all is rolled back (the rollback's
    own writes then land)."""
    how = "refused" if "status" in fault else "connection dropped"
    row = matrix_row(f"restore --jobs 4: 2 of 3 batches in flight {how} for good ({table})",
                     "restore fault", "rolled back; database exactly as before", 8)
    changed.stack.faults.add(kind="write", table=table, after=2, times=2 * OUTLASTS_RETRIES,
                             **fault)

    code, _, err = run(capsys, data, "restore", "--safe", "--file", changed.path.name,
                       "--jobs", "4")

    observe_rolled_back(row, capsys, data, db, changed, code, err, table,
                        "disk on fire" if "status" in fault else "cannot reach")
    assert code == 8, err
    assert row.as_expected, row.observed


def halvings(size):
    """How many requests a batch refused whole takes to come down to its first row: the tool
    splits a batch in halves and tries the first half first."""
    requests = 1
    while size > 1:
        size //= 2
        requests += 1
    return requests


def test_a_statement_timeout_down_to_one_row_rolls_back(changed, db, data, capsys, matrix_row):
    row = matrix_row("restore: statement timeout on every split of a batch (bookings)",
                     "restore fault", "batch halved down to one row, then rolled back", 8)
    fault = changed.stack.faults.add(
        kind="write", table="bookings", after=2, times=halvings(BATCH), status=500, code="57014",
        message="canceling statement due to statement timeout")

    code, _, err = run(capsys, data, "restore", "--safe", "--file", changed.path.name)

    observe_rolled_back(row, capsys, data, db, changed, code, err, "bookings: writing the row",
                        "statement timeout")
    row.saw(f"timeouts: {fault.fired}", fault.fired == halvings(BATCH))
    assert code == 8, err
    assert row.as_expected, row.observed


def test_a_request_timeout_on_the_client_rolls_back(changed, db, data, capsys, matrix_row,
                                                    monkeypatch):
    row = matrix_row("restore: no answer within the request timeout (bookings, every retry)",
                     "restore fault", "rolled back; database exactly as before", 8)
    # Whole seconds: the supabase client rounds its timeout down to an int.
    monkeypatch.setattr(supabase_backup, "REQUEST_TIMEOUT", 1)
    # The server holds each attempt longer than the client waits, then refuses it: nothing lands.
    slow = changed.stack.faults.add(kind="write", table="bookings", after=2,
                                    times=OUTLASTS_RETRIES, action="latency", delay=1.5)
    changed.stack.faults.add(kind="write", table="bookings", after=2, times=OUTLASTS_RETRIES,
                             status=503, code="XX000", message="too late")

    code, _, err = run(capsys, data, "restore", "--safe", "--file", changed.path.name)

    wait_for(lambda: changed.stack.writes("bookings") == slow.seen, what="the held requests")
    observe_rolled_back(row, capsys, data, db, changed, code, err, "bookings", "ReadTimeout")
    assert code == 8, err
    assert row.as_expected, row.observed


@pytest.mark.parametrize("when, times, batch, exit_code", [
    ("before", OUTLASTS_RETRIES, 2, 8),
    ("after", OUTLASTS_RETRIES, 3, 8),
    ("after", 1, 3, 0),
], ids=["before the write, every retry", "after the commit, every retry",
        "after the commit, once"])
def test_a_connection_dropped_mid_batch(changed, db, data, capsys, matrix_row, when, times,
                                        batch, exit_code):
    how = {"before": "before the write", "after": "after the commit (answer lost)"}[when]
    row = matrix_row(f"restore: connection dropped {how}, "
                     f"{'every retry' if times > 1 else 'once'} (bookings, batch {batch})",
                     "restore fault",
                     "rolled back; database exactly as before" if exit_code else
                     "retried; database exactly as the backup", exit_code)
    changed.stack.faults.add(kind="write", table="bookings", after=batch, times=times,
                             action="drop", when=when)

    code, _, err = run(capsys, data, "restore", "--safe", "--file", changed.path.name)

    if exit_code:
        observe_rolled_back(row, capsys, data, db, changed, code, err, "bookings", "cannot reach")
    else:
        row.exited(code)
        row.compare(database_state(db), changed.restored(), "database = backup + row added since")
        observe_files(row, capsys, data)
        writes = Counter(r.table for r in write_requests(changed.stack))
        row.saw(f"write requests: {dict(writes)}", writes == {"users": 3, "bookings": 4,
                                                              "payments": 3})  # one retried
        row.saw(f"restore log: {restore_log(data)['status']}",
                restore_log(data)["status"] == "succeeded")
    if when == "after" and exit_code:
        # The batch whose answer was lost had landed, its inserted bookings with it: the snapshot
        # of the failed state, taken before the rollback, holds them.
        (failed,) = [n for n in files_in(data, "safety_backups") if n.startswith("failed_state_")]
        ids = {r["id"] for r in table_rows(data / "safety_backups" / failed, "bookings")}
        row.saw(f"the lost answer's batch had landed: {sorted(set(changed.gone) & ids)} in the "
                f"failed state", set(changed.gone) <= ids)
    assert code == exit_code, err
    assert row.as_expected, row.observed


def test_a_batch_rejected_for_one_bad_row_names_it_and_rolls_back(changed, db, data, capsys,
                                                                  matrix_row):
    row = matrix_row("restore: a batch rejected for one bad row (payments, middle batch)",
                     "restore fault", "the row is named; rolled back; database as before", 8)
    # A rule added since the backup that one backup row, in the middle batch, breaks.
    bad = changed.payments_written[BATCH + BATCH // 2]
    db.execute(f"ALTER TABLE payments ADD CONSTRAINT payment_{bad}_is_frozen "
               f"CHECK (id <> {bad} OR method IS NOT DISTINCT FROM 'changed')")
    changed.take_before()

    code, _, err = run(capsys, data, "restore", "--safe", "--file", changed.path.name)

    observe_rolled_back(row, capsys, data, db, changed, code, err,
                        f"payments: the row with key [{bad}] was refused",
                        f"payment_{bad}_is_frozen")
    refused = [r for r in write_requests(changed.stack, "payments") if r.status == 400]
    row.saw(f"{len(refused)} refused requests to find the row (halving)",
            len(refused) <= halvings(BATCH))
    assert code == 8, err
    assert row.as_expected, row.observed


def test_a_verification_mismatch_rolls_back_exactly(changed, db, data, capsys, matrix_row):
    row = matrix_row("restore: verification mismatch (a trigger alters one restored row)",
                     "restore fault", "mismatch named; rolled back; database as before", 8)
    # The restore writes booking 7 back; this trigger, added since, alters what lands. Putting
    # back the state before does not fire it (notes is 'changed' then).
    db.execute("""
        CREATE FUNCTION public.tamper() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          NEW.notes := 'tampered';
          NEW.guests := coalesce(NEW.guests, 0) + 100;
          NEW.total_price := coalesce(NEW.total_price, 0) + 1;
          RETURN NEW;
        END $$;
        CREATE TRIGGER tamper BEFORE INSERT OR UPDATE ON public.bookings FOR EACH ROW
          WHEN (NEW.id = 7 AND NEW.notes IS DISTINCT FROM 'changed')
          EXECUTE FUNCTION public.tamper();
    """)
    changed.take_before()

    code, _, err = run(capsys, data, "restore", "--safe", "--file", changed.path.name)

    observe_rolled_back(row, capsys, data, db, changed, code, err,
                        "verification found 1 mismatch(es): bookings key [7]: different values")
    assert code == 8, err
    assert row.as_expected, row.observed


@pytest.mark.parametrize("step", ["planning (step 3)", "verifying (step 5)"])
def test_a_read_that_fails_while_comparing_with_the_live_rows(changed, db, data, capsys,
                                                              matrix_row, step):
    """Steps 3 and 5 read key ranges in threads of their own while they compare the range
    before: a read that fails there stops the restore in its place. Before any write (planning)
    nothing is written and the log says aborted; after the writes (verifying) the restore is
    rolled back exactly. Step 3 reads the project in a restore without --safe (with --safe it
    compares the file with the safety backup just taken, read from disk)."""
    planning = step.startswith("planning")
    row = matrix_row(f"restore: a read fails for good while {step}", "restore fault",
                     "nothing written, aborted" if planning else
                     "rolled back; database exactly as before; safety backup intact",
                     4 if planning else 8)
    stack = changed.stack
    # Planning reads bookings' count, then its first range; verifying comes after the safety
    # backup's reads, with its own count first.
    after = 1 if planning else changed.backup_reads["bookings"] + 1
    stack.faults.add(kind="read", table="bookings", after=after + 1, times=OUTLASTS_RETRIES,
                     status=500, code="XX000", message="injected: cannot read")

    code, _, err = run(capsys, data, "restore", "--yes" if planning else "--safe", "--file",
                       changed.path.name)

    if planning:
        row.exited(code)
        observe_error_line(row, err, "injected: cannot read", "reading bookings")
        observe_writes(row, stack)
        row.compare(database_state(db), changed.before, "database = state before")
        observe_files(row, capsys, data)
        log = restore_log(data)
        row.saw(f"restore log: {log['status']}", log["status"] == "aborted")
        assert code == 4, err
    else:
        observe_rolled_back(row, capsys, data, db, changed, code, err, "injected: cannot read")
        assert code == 8, err
    assert row.as_expected, row.observed


def test_a_failure_during_the_rollback_exits_9_naming_the_rollback_command(
        changed, db, data, capsys, matrix_row):
    row = matrix_row("restore: the rollback fails too (its failed-state snapshot cannot read)",
                     "restore fault",
                     "one error line naming `python supabase_backup.py rollback <safety file>`; "
                     "database exactly as left; safety backup intact and exactly the state "
                     "before", 9)
    stack = changed.stack
    # The second batch of bookings fails for good; then the snapshot of the failed state, the
    # rollback's first step, cannot read bookings: its first read after the safety backup's
    # (which reads bookings as the backup did; the planning compares with the safety backup).
    stack.faults.add(kind="write", table="bookings", after=2, times=OUTLASTS_RETRIES, status=503,
                     code="XX000", message="injected: disk on fire")
    stack.faults.add(kind="read", table="bookings", after=changed.backup_reads["bookings"] + 1,
                     status=500, code="XX000", message="injected: cannot read")

    code, _, err = run(capsys, data, "restore", "--safe", "--file", changed.path.name)

    row.exited(code)
    command = f"python supabase_backup.py rollback {safety_backup(data).name}"
    line = observe_error_line(row, err, "disk on fire", "so did the automatic rollback",
                              "counting bookings", command)
    row.saw("the line ends with the command", line.endswith(command))
    # Left as the restore left it: users restored, the first batch of bookings restored, the
    # rest as before.
    bookings = (Counter(changed.before["bookings"]) - Counter(changed.bookings_before)
                + Counter(changed.bookings_at_backup))
    left = dict(changed.before, users=changed.restored()["users"],
                bookings=sorted(bookings.elements()))
    row.compare(database_state(db), left, "database = as the restore left it")
    row.compare(file_state(safety_backup(data)), changed.api_before,
                "safety backup = state before")
    observe_files(row, capsys, data)
    log = restore_log(data)
    row.saw(f"restore log: {log['status']}", log["status"] == "rollback_failed")
    assert code == 9, err
    assert row.as_expected, row.observed

    # The user does what the line says, once the fault is gone.
    row = matrix_row("restore: after exit 9, the rollback command the line names",
                     "restore fault", "database exactly as before the restore", 0)
    stack.faults.clear()
    code, _, err = run(capsys, data, *command.split()[2:])
    row.exited(code)
    row.compare(database_state(db), changed.before, "database = state before")
    observe_files(row, capsys, data)
    assert code == 0, err
    assert row.as_expected, row.observed


def test_kill_9_mid_restore_then_rollback_returns_exactly_the_state_before(
        changed, db, data, capsys, tmp_path, matrix_row):
    row = matrix_row("restore: kill -9 mid-restore, then `rollback` of its safety backup",
                     "restore fault", "list-safety names the command; the rollback returns the "
                     "database exactly to the state before the restore", 0)
    stack = changed.stack
    kill_9_mid_write(stack, data, tmp_path, changed.path)
    row.saw("the killed restore had written", database_state(db) != changed.before)
    command = f"python supabase_backup.py rollback {safety_backup(data).name}"
    _, out, _ = run(capsys, data, "list-safety")
    row.saw("list-safety names the rollback command", command in out and "INTERRUPTED" in out)

    code, _, err = run(capsys, data, *command.split()[2:])

    row.exited(code)
    row.compare(database_state(db), changed.before, "database = state before")
    observe_files(row, capsys, data)
    assert code == 0, err
    assert row.as_expected, row.observed


@pytest.mark.parametrize("how", ["API 5xx persistently", "disk full"])
def test_no_safety_backup_no_restore(stack, db, data, capsys, tmp_path, matrix_row, how):
    exit_code, words = {"API 5xx persistently": (4, ["bookings", "disk on fire"]),
                        "disk full": (6, [DISK_FULL, "safety_backup_"])}[how]
    row = matrix_row(f"restore: the safety backup cannot be taken ({how})", "restore fault",
                     "one error line; zero writes; database untouched; no safety file, no "
                     "partial; the restore log says it stopped before writing (aborted)",
                     exit_code)
    path = make_backup(capsys, data, "--tables", "app_settings,bookings")
    before = database_state(db)
    stack.requests.clear()

    if how == "disk full":
        process = run_with_file_size_limit(stack, data, tmp_path, path.stat().st_size // 2,
                                           "restore", "--safe", "--file", path.name)
        code, out, err = process.returncode, process.stdout, process.stderr
    else:
        stack.faults.add(kind="read", table="bookings", after=3, status=500, code="XX000",
                         message="injected: disk on fire")
        code, out, err = run(capsys, data, "restore", "--safe", "--file", path.name)

    row.exited(code)
    observe_error_line(row, err, *words)
    observe_writes(row, stack)
    row.compare(database_state(db), before, "database = as before")
    row.saw(f"safety_backups/: {files_in(data, 'safety_backups') or 'empty'}",
            files_in(data, "safety_backups") == [])
    observe_files(row, capsys, data)
    log = restore_log(data)
    row.saw(f"restore log: {log['status']}, step 1 {log['steps'][-1]['status']}",
            log["status"] == "aborted" and log["finished_at"] is not None
            and log["steps"][-1] == {**log["steps"][-1], "step": 1, "status": "failed"}
            and words[-1] in log["error"])
    assert code == exit_code, err
    assert row.as_expected, row.observed


def test_kill_9_mid_restore_then_the_next_restore_completes_and_cleans_up(
        fresh_stack, db, data, capsys, tmp_path, matrix_row):
    row = matrix_row("restore: kill -9 mid-restore, then restore --safe again", "restore fault",
                     "the next restore restores exactly and removes what the killed one left "
                     "(.partial-*); the first safety backup intact", 0)
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "users")
    at_backup = database_state(db)
    db.execute("UPDATE users SET full_name = 'changed'")
    api_before = api_state(db, ["users"])
    kill_9_mid_write(stack, data, tmp_path, path)
    first_safety = safety_backup(data)
    left = sorted(str(p.relative_to(data)) for p in data.rglob(".partial-*"))
    row.saw(f"left by the kill: {left}", bool(left))

    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)

    row.exited(code)
    row.compare(database_state(db), at_backup, "database = backup")
    row.compare(file_state(first_safety), api_before, "first safety backup = state before")
    observe_files(row, capsys, data)
    assert code == 0, err
    assert row.as_expected, row.observed


# --- bad input -----------------------------------------------------------------------------------

def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def flip_a_byte(path):
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x55
    path.write_bytes(bytes(content))


def break_a_row_inside_valid_gzip(path):
    lines = gzip.decompress(path.read_bytes()).split(b"\n")
    middle = len(lines) // 2
    lines[middle] = lines[middle].rstrip(b"}")
    path.write_bytes(gzip.compress(b"\n".join(lines)))


def duplicate_a_key(document):
    rows = document["tables"]["bookings"]["rows"]
    rows.insert(200, dict(rows[100]))


def duplicate_a_text_key(document):
    rows = document["tables"]["app_settings"]["rows"]
    rows.append(dict(rows[0]))


def drop_a_key_value(document):
    del document["tables"]["bookings"]["rows"][7]["id"]


def another_tools_dump(path):
    """What pg_dump | gzip writes."""
    target = path.with_name("dump.sql.gz")
    target.write_bytes(gzip.compress(
        b"--\n-- PostgreSQL database dump\n--\n\nSET statement_timeout = 0;\n"
        b"COPY public.bookings (id, user_id, package_id, status) FROM stdin;\n"
        b"1\tdd261e04-0000-4000-8000-000000000001\t3\tconfirmed\n\\.\n"))
    return target


def another_json_shape(path):
    """An export of another tool: plain JSON, one list of rows per table."""
    target = path.with_name("export.json")
    target.write_text(json.dumps({"version": 1, "tables": {"bookings": [{"id": 1}]}}))
    return target


def empty(path):
    path.write_bytes(b"")


def a_folder(path):
    path.unlink()
    path.mkdir()


# case: (damage to the backup, or a function returning another file; restore options; the words
# of the error line)
BAD_FILES = {
    "truncated gzip": (truncate, [], ["not a readable backup", "use another backup"]),
    "flipped byte": (flip_a_byte, [], ["use another backup"]),
    "valid gzip of invalid JSON": (break_a_row_inside_valid_gzip, [],
                                   ["is not valid JSON", "use another backup"]),
    "wrong format version": (lambda p: rewrite_backup(p, lambda d: d.update(format_version=4)),
                             [], ["format version 4", "reads versions 1, 2, 3"]),
    "--tables names a table not in the file": (None, ["--tables", "bookings,reviews"],
                                               ["reviews not in", "check --tables"]),
    "--critical names a table not in the file": (None, ["--critical", "bookings,users"],
                                                 ["critical table users is not in the backup"]),
    "duplicate keys": (lambda p: rewrite_backup(p, duplicate_a_key), [],
                       ["bookings: key [101] appears twice"]),
    "duplicate text keys": (lambda p: rewrite_backup(p, duplicate_a_text_key), [],
                            ["app_settings: key [", "appears twice"]),
    "rows missing key columns": (lambda p: rewrite_backup(p, drop_a_key_value), [],
                                 ["bookings: a row has no value for key column id"]),
    "schema drift (a column dropped live)": (None, [], ["bookings.created_at no longer exists",
                                                        "schema drift"]),
    "a file from another tool (pg_dump .sql.gz)": (another_tools_dump, [],
                                                   ["not a supabase_backup file"]),
    "a JSON of another shape": (another_json_shape, [], ["not a supabase_backup file"]),
    "an empty file": (empty, [], ["not a supabase_backup file"]),
    "a directory instead of a file": (a_folder, [], ["is a folder, not a backup file"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_backup_file_is_refused_with_zero_writes(stack, db, data, capsys, matrix_row,
                                                       request, case):
    damage, options, words = BAD_FILES[case]
    row = matrix_row(f"restore: {case}", "bad input",
                     "one error line naming the problem and the next step; no traceback; zero "
                     "writes; database untouched; no key in any output or file", 7)
    path = make_backup(capsys, data, "--tables", "app_settings,bookings")
    given = (damage(path) if damage else None) or path
    if case.startswith("schema drift"):
        request.getfixturevalue("fresh_stack")
        db.execute("ALTER TABLE bookings DROP COLUMN created_at")
    before = database_state(db)
    stack.requests.clear()

    code, out, err = run(capsys, data, "restore", "--safe", "--file", str(given), *options)

    if write_requests(stack):
        stack.dirty = True  # a bug wrote: the next test needs the demo data back
    row.exited(code)
    observe_error_line(row, err, *words)
    row.saw("nothing on stdout", out == "")
    observe_writes(row, stack)
    row.compare(database_state(db), before, "database = as before")
    observe_no_key(row, data, out, err, stack.service_role_key)
    observe_files(row, capsys, data, skip={path} if damage and given == path else set())
    for name in files_in(data, "summaries"):
        status = json.loads((data / "summaries" / name).read_text())["status"]
        row.saw(f"restore log: {status}", status == "refused")
    assert code == 7, err
    assert row.as_expected, row.observed


def test_a_huge_row_is_restored_exactly(fresh_stack, db, data, capsys, matrix_row):
    row = matrix_row("restore: a huge row (5 MB text value)", "bad input",
                     "restored exactly (the database as the backup)", 0)
    huge = "0123456789abcdef" * (5 * 1024 * 1024 // 16)
    db.execute("UPDATE bookings SET notes = %s WHERE id = 10", [huge])
    path = make_backup(capsys, data, "--tables", "app_settings,bookings")
    at_backup = database_state(db)
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id <= 10")

    code, out, err = run(capsys, data, "restore", "--safe", "--file", path.name)

    row.exited(code)
    row.compare(database_state(db), at_backup, "database = backup, the 5 MB value included")
    length = db.execute("SELECT length(notes) FROM bookings WHERE id = 10").fetchone()[0]
    row.saw(f"the value is back: {length} characters", length == len(huge))
    observe_files(row, capsys, data)
    assert code == 0, err
    assert row.as_expected, row.observed


# --- configuration -------------------------------------------------------------------------------

# case: ({setting: value, None to unset it, or a function of (stack, request) making it}, exit
# code, the words of the error line)
CONFIGURATIONS = {
    "no .env and no environment": ({"SUPABASE_URL": None, "SUPABASE_SERVICE_ROLE_KEY": None}, 3,
                                   ["SUPABASE_URL is not set", ".env"]),
    "empty SUPABASE_URL": ({"SUPABASE_URL": ""}, 3, ["SUPABASE_URL is not set"]),
    "malformed SUPABASE_URL": ({"SUPABASE_URL": "https//abcd.supabase.co"}, 3,
                               ["SUPABASE_URL (set in the environment) is not a valid URL"]),
    "anon key": ({"SUPABASE_SERVICE_ROLE_KEY": lambda stack, request: stack.anon_key}, 3,
                 ["anon role, not the service role", "service_role"]),
    "publishable key": ({"SUPABASE_SERVICE_ROLE_KEY": lambda stack, request:
                         stack.publishable_key}, 3, ["not the service role"]),
    "wrong key (401)": ({"SUPABASE_SERVICE_ROLE_KEY": lambda stack, request: make_jwt(
        "another-projects-secret-0123456789abcdef", "service_role")}, 3,
        ["refused the key", "SUPABASE_SERVICE_ROLE_KEY"]),
    "unknown host": ({"SUPABASE_URL": "https://no-such-project.invalid"}, 4,
                     ["cannot reach https://no-such-project.invalid", "SUPABASE_URL"]),
    "not PostgREST (HTML 404)": ({"SUPABASE_URL": lambda stack, request:
                                  request.getfixturevalue("html_server_url")}, 4,
                                 ["HTTP 404", "SUPABASE_URL"]),
}


@pytest.mark.parametrize("command", ["backup", "restore"])
@pytest.mark.parametrize("case", list(CONFIGURATIONS))
def test_a_bad_configuration_is_refused_in_one_line(stack, db, data, capsys, monkeypatch,
                                                    matrix_row, request, case, command):
    settings, exit_code, words = CONFIGURATIONS[case]
    row = matrix_row(f"{command}: {case}", "configuration",
                     "one error line naming the setting; zero writes; no file; no key in any "
                     "output or file", exit_code)
    argv = ["backup"]
    if command == "restore":
        argv = ["restore", "--safe", "--file",
                make_backup(capsys, data, "--tables", "app_settings").name]
    keys = [stack.service_role_key]
    for name, value in settings.items():
        if value is None:
            monkeypatch.delenv(name)
            continue
        value = value(stack, request) if callable(value) else value
        monkeypatch.setenv(name, value)
        if name == "SUPABASE_SERVICE_ROLE_KEY":
            keys.append(value)
    before = database_state(db)
    stack.requests.clear()
    started = time.monotonic()

    code, out, err = run(capsys, data, *argv)

    row.exited(code)
    observe_error_line(row, err, *words)
    row.saw(f"{time.monotonic() - started:.1f}s", time.monotonic() - started < 10)
    row.saw("nothing on stdout", out == "")
    observe_writes(row, stack)
    row.compare(database_state(db), before, "database = as before")
    observe_no_key(row, data, out, err, *keys)
    new = [n for n in files_in(data, "backups") + files_in(data, "safety_backups")
           if command == "backup" or not n.startswith("supabase_backup_")]
    row.saw(f"new files: {new or 'none'}", not new)
    assert code == exit_code, err
    assert row.as_expected, row.observed
