"""Small helpers the test files share (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import supabase_backup  # noqa: E402

# Every setting the tool reads: tests clear them so that no real .env or environment leaks in.
SETTINGS = ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_KEY", "SUPABASE_BACKUP_DIR",
            "BACKUP_TABLES", "BACKUP_AUTH", "CRITICAL_TABLES", "VERIFY_IGNORE_COLUMNS", "BACKUP_REMOTE",
            "BACKUP_ENCRYPT_TO", "BACKUP_AGE_IDENTITY", "SAFETY_ENCRYPT_TO", "BACKUP_PING_URL")
FAST_RETRIES = (0.01, 0.01, 0.01)


def make_client(url, key):
    """The supabase client as the tool makes it: options passed the client's current way (an
    HTTP session of our making), so that no deprecated option is used."""
    import httpx
    from supabase import ClientOptions, create_client

    session = httpx.Client(timeout=120, http2=True, follow_redirects=True)
    return create_client(url, key, options=ClientOptions(httpx_client=session))


def run(capsys, data, *argv):
    """main() in-process with --data-dir; returns (exit code, stdout, stderr)."""
    code = supabase_backup.main(["--data-dir", str(data), *argv])
    out, err = capsys.readouterr()
    return code, out, err


DEMO_TABLES = ("app_settings", "audit_events", "bookings", "package_tags", "packages", "payments",
               "profiles", "reviews", "users")
NO_UPDATED_AT = {"bookings": ["updated_at"]}
# A transient server error that outlasts the retries of one request, then goes away, so that the
# restore fails and its rollback can succeed.
OUTLASTS_RETRIES = len(FAST_RETRIES) + 1


def isolated_work_dir(tmp_path, monkeypatch):
    """No settings anywhere: none in the environment, an empty working directory tmp_path/work
    (made current) and an empty folder as the script's own (no .env next to it); returns the
    working directory."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    script_dir = tmp_path / "script"
    script_dir.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(supabase_backup, "SCRIPT_DIR", script_dir)
    return work


def make_backup(capsys, data, *argv):
    """A completed backup (exit 0 asserted); returns its path."""
    folder = data / "backups"
    before = set(os.listdir(folder)) if folder.is_dir() else set()
    code, _, err = run(capsys, data, "backup", *argv)
    assert code == 0, err
    (name,) = set(os.listdir(folder)) - before
    return folder / name


def database_state(db, omit=None):
    """Every row of every demo table as text (every column but omit[table]), sorted: the exact
    state, read through psycopg."""
    omit = omit or {}
    return {table: sorted(row_texts(db, table, omit=omit.get(table, ()))) for table in DEMO_TABLES}


def row_texts(db, table, where="TRUE", params=(), omit=()):
    """The rows of a table as text, less omit: each row as the JSON array of PostgreSQL's own
    text (col::text) of every column, so that a value is the same only when its ::text is."""
    columns = [name for (name,) in db.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum", [f"public.{table}"]) if name not in omit]
    texts = ", ".join(f"'{name}', t.\"{name}\"::text" for name in columns)
    return [text for (text,) in db.execute(
        f"SELECT json_build_object({texts})::text FROM public.{table} AS t WHERE {where}",
        params)]


# The types whose JSON, as PostgREST sends it, is exact: a backup keeps every other column as
# PostgreSQL's own text of it (format version 2).
NATIVE_TYPES = ("smallint", "integer", "bigint", "boolean", "text", "character varying", "uuid")


def file_form_rows(db, relation):
    """The rows of a table or view as psycopg reads them, in the form a backup file keeps them:
    PostgreSQL's own text (col::text) of every column whose type (a domain's base type) is not
    in NATIVE_TYPES, the JSON value of the others. A list of dicts."""
    as_text = [name for (name,) in db.execute(
        "SELECT attname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
        "AND format_type(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END, NULL) "
        "<> ALL(%s) ORDER BY attnum", [f"public.{relation}", list(NATIVE_TYPES)])]
    extra = "".join(f', t."{name}"::text' for name in as_text)
    rows = []
    for record in db.execute(f"SELECT to_jsonb(t){extra} FROM public.{relation} AS t"):
        row = record[0]
        row.update(zip(as_text, record[1:]))
        rows.append(row)
    return rows


def assert_same_state(actual, expected):
    """Every table holds exactly the expected rows, each as often (audit_events has duplicates)."""
    problems = []
    for table in DEMO_TABLES:
        have, want = Counter(actual[table]), Counter(expected[table])
        missing, extra = want - have, have - want
        if missing or extra:
            problems.append(f"{table}: {sum(missing.values())} row(s) missing or different, "
                            f"{sum(extra.values())} unexpected; e.g. missing "
                            f"{list(missing)[:1]}, unexpected {list(extra)[:1]}")
    assert not problems, "\n".join(problems)


def plus(state, added):
    """The state with more rows (the rows added since the backup)."""
    return {table: sorted(state[table] + added.get(table, [])) for table in DEMO_TABLES}


def rows_where(db, table, condition, params=()):
    return row_texts(db, table, condition, params)


def counts(state):
    return {table: len(rows) for table, rows in state.items()}


def error_line(err, alone=False):
    """The last line of a failed run: one error line, no traceback; with alone, also the only
    line of err."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("supabase_backup: error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert not alone or len(err.splitlines()) == 1, err
    return errors[0]


def files_in(data, folder):
    path = data / folder
    return sorted(os.listdir(path)) if path.is_dir() else []


def safety_backup(data):
    """The path of the one safety backup."""
    names = [n for n in files_in(data, "safety_backups") if n.startswith("safety_backup_")]
    assert len(names) == 1, names
    return data / "safety_backups" / names[0]


def restore_log(data):
    """The one restore log in summaries/."""
    names = files_in(data, "summaries")
    assert len(names) == 1 and names[0].startswith("restore_log_"), names
    return json.loads((data / "summaries" / names[0]).read_text())


def table_rows(path, table):
    """The rows of one table of a backup file, read the way a user's script would."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)["tables"][table]["rows"]


def rewrite_backup(path, edit):
    """Rewrite a backup file with edit(document) applied, with counts and checksums that match,
    so that only the restore's own checks can find what is wrong with it."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        document = json.load(f)
    edit(document)
    header = {k: v for k, v in document.items()
              if k not in ("tables", "complete", "finished_at", "table_count", "row_count")}
    path.unlink()
    writer = supabase_backup.BackupWriter(path, header)
    for name, table in document["tables"].items():
        writer.begin_table(name, {k: v for k, v in table.items()
                                  if k not in ("name", "rows", "row_count", "sha256",
                                               "count_before", "count_after", "count_method",
                                               "pages")})
        writer.write_rows(table["rows"])
        writer.end_table(count_before=len(table["rows"]), count_after=len(table["rows"]))
    writer.finish(finished_at=document["finished_at"], table_count=len(document["tables"]),
                  row_count=sum(len(t["rows"]) for t in document["tables"].values()))


def write_requests(stack, table=None):
    return [r for r in stack.requests if r.method in ("POST", "PATCH", "DELETE", "PUT")
            and (table is None or r.table == table)]


def wait_for(condition, timeout=20.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def script_and_env(stack, data, tmp_path):
    """A copy of supabase_backup.py in tmp_path/app (the process runs it, whatever the tests
    change in the repository meanwhile), and the environment that points it at the stack and
    the data folder, with no other setting."""
    script = tmp_path / "app" / "supabase_backup.py"
    script.parent.mkdir()
    shutil.copy(REPO_ROOT / "supabase_backup.py", script)
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(SUPABASE_URL=stack.url, SUPABASE_SERVICE_ROLE_KEY=stack.service_role_key,
               SUPABASE_BACKUP_DIR=str(data))
    return script, env


def start_restore(stack, data, tmp_path, path, command=None, table="users"):
    """`python supabase_backup.py restore --safe --file PATH` (or the command given) in a process
    of its own, once it is writing to table (a write more than it has had so far)."""
    writes_before = stack.writes(table)
    script, env = script_and_env(stack, data, tmp_path)
    command = command or ["restore", "--safe", "--file", path.name]
    process = subprocess.Popen([sys.executable, str(script), *command], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: stack.writes(table) > writes_before,
                 what=f"the restore to write to {table}")
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


@contextlib.contextmanager
def running(process):
    """A process of a test, killed if it is still running when the block ends (a failed
    assertion must not leave it behind)."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def kill_9(process, timeout=10):
    """kill -9 a process of a test and wait for it to be gone; returns what it left on its
    pipes, (stdout, stderr)."""
    os.kill(process.pid, signal.SIGKILL)
    output = process.communicate(timeout=timeout)
    assert process.returncode == -signal.SIGKILL
    return output


def kill_9_mid_write(stack, data, tmp_path, path, command=None):
    """Start a restore (or the command given) with writes to users slowed to 0.5 s, kill -9 it
    once it writes, and wait until the server has answered the write it was waiting for; the
    faults are cleared after."""
    writes_before = stack.writes("users")
    slow = stack.faults.add(kind="write", table="users", action="latency", delay=0.5)
    with running(start_restore(stack, data, tmp_path, path, command)) as process:
        kill_9(process)
    wait_for(lambda: stack.writes("users") - writes_before == slow.seen,
             what="the server to answer the last write")
    stack.faults.clear()


def backup_while_a_table_is_dropped(capsys, db, data, when, what):
    """`backup --tables app_settings,scratch_doomed` of a 100-row table scratch_doomed that a
    thread drops as soon as when() holds (what names the moment); returns (code, out, err)."""
    db.execute("CREATE TABLE public.scratch_doomed (id int PRIMARY KEY, body text)")
    try:
        db.execute("INSERT INTO public.scratch_doomed SELECT i, 'row ' || i "
                   "FROM generate_series(1, 100) AS i")

        def drop_it():
            wait_for(when, what=what)
            db.execute("DROP TABLE public.scratch_doomed")

        dropper = threading.Thread(target=drop_it)
        dropper.start()
        try:
            return run(capsys, data, "backup", "--tables", "app_settings,scratch_doomed")
        finally:
            dropper.join()
    finally:
        db.execute("DROP TABLE IF EXISTS public.scratch_doomed")
