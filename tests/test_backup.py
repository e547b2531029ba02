"""backup, check and list (issue #3) against the local stack.

Every comparison of data goes through psycopg, never through the tool: the rows in a backup file
must equal what PostgreSQL holds. Layers (see STYLE.md): a few pure functions, main([...])
in-process with tmp_path, and subprocess runs where a real process matters (kill -9, cron).
"""

import datetime
import fcntl
import gc
import gzip
import json
import math
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import supabase_backup  # noqa: E402
from helpers import (  # noqa: E402
    SETTINGS, backup_while_a_table_is_dropped, error_line, file_form_rows, kill_9, make_backup,
    run, running, wait_for)
from local_supabase import make_jwt  # noqa: E402

DEMO_TABLES = {"app_settings": 5, "audit_events": 1500, "bookings": 5000, "package_tags": 900,
               "packages": 300, "payments": 3000, "profiles": 250, "reviews": 500, "users": 2000}
BACKUP_NAME = re.compile(r"supabase_backup_\d{8}_\d{6}\.json\.gz")

# The supabase client passes postgrest options it has itself deprecated; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:supabase")


# --- helpers ------------------------------------------------------------------------------------

def backups_in(data):
    """The file names in backups/, sorted."""
    folder = data / "backups"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def only_backup(data):
    """The path of the one backup in backups/ (fails if there is not exactly one)."""
    names = backups_in(data)
    assert len(names) == 1 and BACKUP_NAME.fullmatch(names[0]), names
    return data / "backups" / names[0]


def load(path):
    """The whole backup document, read the way a user's script would."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def database_rows(db, relation):
    """The rows of a table or view as psycopg reads them, in the form the file keeps them."""
    return file_form_rows(db, relation)


def canonical(row):
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def assert_same_rows(file_rows, expected_rows, table):
    """Each row exactly as often in the file as in the database (duplicates count)."""
    in_file, in_db = Counter(map(canonical, file_rows)), Counter(map(canonical, expected_rows))
    missing, extra = in_db - in_file, in_file - in_db
    assert not missing and not extra, (
        f"{table}: {sum(missing.values())} row(s) of the database missing or different in the "
        f"file, {sum(extra.values())} unexpected; e.g. missing {list(missing)[:2]}, "
        f"extra {list(extra)[:2]}")


def reads_of(stack, table):
    return [r for r in stack.requests if r.table == table and r.method in ("GET", "HEAD")]


def backup_with_name(capsys, data, moment):
    """A real backup of app_settings renamed to the name a backup taken at `moment` would have."""
    path = make_backup(capsys, data, "--tables", "app_settings")
    target = path.with_name(f"supabase_backup_{moment.strftime('%Y%m%d_%H%M%S')}.json.gz")
    path.rename(target)
    return target


# --- pure functions -----------------------------------------------------------------------------

def test_key_role_reads_the_jwt_role_and_the_new_key_prefixes(stack):
    key_role = supabase_backup.key_role
    assert key_role(stack.service_role_key) == "service_role"
    assert key_role(stack.secret_key) == "service_role"
    assert key_role(stack.anon_key) == "anon"
    assert key_role(stack.publishable_key) == "anon"
    assert key_role(stack.user_key("5f1c2f0e-0000-4000-8000-000000000001")) == "authenticated"
    assert key_role("not-a-key") is None


def test_reader_accepts_plain_json_and_a_reindented_document(capsys, data, tmp_path):
    path = make_backup(capsys, data, "--tables", "app_settings,package_tags")
    document = load(path)
    plain = tmp_path / "plain.json"
    plain.write_bytes(gzip.decompress(path.read_bytes()))
    jq_style = tmp_path / "reindented.json.gz"
    jq_style.write_bytes(gzip.compress(json.dumps(document, indent=2).encode()))

    for copy in (plain, jq_style):
        header, tables = supabase_backup.check_backup(copy)
        assert header["format"] == "supabase_backup"
        assert {name: t["row_count"] for name, t in tables.items()} == {
            "app_settings": 5, "package_tags": 900}
        rows = [row for table in supabase_backup.read_tables(copy) for row in table.rows]
        assert rows == document["tables"]["app_settings"]["rows"] + \
            document["tables"]["package_tags"]["rows"]


# --- round trip ---------------------------------------------------------------------------------

def test_backup_of_every_demo_table_equals_the_database(stack, db, data, capsys):
    code, out, err = run(capsys, data, "backup")

    assert code == 0, err
    assert out == ""
    path = only_backup(data)
    stamp = datetime.datetime.strptime(path.name[16:31], "%Y%m%d_%H%M%S").replace(
        tzinfo=datetime.timezone.utc)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - stamp) < datetime.timedelta(
        minutes=1), "the file name carries the UTC time"
    document = load(path)
    assert document["format"] == "supabase_backup" and document["format_version"] == 3
    assert document["complete"] is True and document["rls_limited"] is False
    assert document["project_host"] == stack.url.split("://")[1]
    assert set(document["tables"]) == set(DEMO_TABLES), "every table, and no view, by default"
    for table, count in DEMO_TABLES.items():
        saved = document["tables"][table]
        assert saved["row_count"] == len(saved["rows"]) == count
        assert_same_rows(saved["rows"], database_rows(db, table), table)

    tables = document["tables"]
    assert tables["package_tags"]["primary_key"] == ["package_id", "tag"]
    assert tables["audit_events"]["primary_key"] == []
    assert tables["app_settings"]["primary_key"] == ["key"]
    assert {"column": "referred_by", "references_table": "users", "references_column": "id"} \
        in tables["users"]["foreign_keys"]
    columns = {c["name"]: c for c in tables["packages"]["columns"]}
    assert {"price", "nights", "metadata"} <= set(columns)
    assert columns["price"]["format"] == "numeric" and columns["metadata"]["format"] == "jsonb"
    assert all(t["writable"] for t in tables.values())

    text = gzip.decompress(path.read_bytes()).decode()
    assert stack.service_role_key not in text
    # One summary line per table and a final line: what cron mails.
    lines = err.splitlines()
    assert len(lines) == 2 + len(DEMO_TABLES) and "backup complete" in lines[-1]
    for table in DEMO_TABLES:
        assert any(line.strip().startswith(f"{table}: ") for line in lines)


def test_values_of_every_type_come_back_exactly(stack, db, data, capsys):
    path = make_backup(capsys, data, "--tables", "users,packages,bookings")
    tables = load(path)["tables"]
    users = {row["id"]: row for row in tables["users"]["rows"]}
    packages = {row["id"]: row for row in tables["packages"]["rows"]}
    bookings = {row["id"]: row for row in tables["bookings"]["rows"]}

    user_id, avatar, tags, profile, created_at = db.execute(
        "SELECT id, avatar, tags::text, profile::text, created_at::text FROM users "
        "WHERE avatar IS NOT NULL AND tags IS NOT NULL AND profile IS NOT NULL LIMIT 1").fetchone()
    user = users[str(user_id)]
    assert user["avatar"] == "\\x" + avatar.hex()  # bytea as PostgreSQL's hex text
    # Everything else as PostgreSQL's own text of it, which reads back as the same value.
    assert user["tags"] == tags and user["profile"] == profile
    assert user["created_at"] == created_at
    assert any(row["full_name"] and not row["full_name"].isascii() for row in users.values())
    assert any(row["birth_date"] is None for row in users.values())

    package_id, price, available_from = db.execute(
        "SELECT id, price::text, available_from::text FROM packages "
        "WHERE available_from IS NOT NULL ORDER BY id LIMIT 1").fetchone()
    assert packages[package_id]["price"] == price
    assert packages[package_id]["available_from"] == available_from
    booking_id, status, total_price = db.execute(
        "SELECT id, status::text, total_price::text FROM bookings ORDER BY id DESC LIMIT 1"
    ).fetchone()
    assert bookings[booking_id]["status"] == status
    assert bookings[booking_id]["total_price"] == total_price
    # The file says which columns it keeps as text, and which as a json document's text.
    columns = {c["name"]: c for c in tables["users"]["columns"]}
    assert columns["profile"]["stored_as"] == "json_text"
    assert columns["tags"]["stored_as"] == "text" and "stored_as" not in columns["email"]


def test_the_secret_key_backs_up_like_the_service_role_jwt(stack, db, data, capsys, monkeypatch):
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", stack.secret_key)
    path = make_backup(capsys, data, "--tables", "app_settings")
    assert_same_rows(load(path)["tables"]["app_settings"]["rows"],
                     database_rows(db, "app_settings"), "app_settings")
    assert stack.secret_key not in gzip.decompress(path.read_bytes()).decode()


def test_files_are_0600_and_folders_0700(stack, data, capsys):
    path = make_backup(capsys, data, "--tables", "app_settings")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in ("backups", "safety_backups", "summaries", "logs"):
        assert stat.S_IMODE((data / folder).stat().st_mode) == 0o700
    log_file = data / "logs" / "supabase_backup.log"
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    log_text = log_file.read_text()
    assert "backup complete" in log_text and stack.service_role_key not in log_text


# --- paging -------------------------------------------------------------------------------------

def test_small_row_cap_pages_composite_and_keyless_tables_completely(stack, db, data, capsys):
    stack.max_rows = 7
    path = make_backup(capsys, data, "--tables", "package_tags,audit_events")

    tables = load(path)["tables"]
    for table in ("package_tags", "audit_events"):
        assert_same_rows(tables[table]["rows"], database_rows(db, table), table)
        # audit_events has no key: it is paged by offset, and each page is cut before the rows
        # that tie with its last one (one row, or a duplicate pair), which start the next page.
        fewest = 7 if table == "package_tags" else 7 - 2
        pages = math.ceil(DEMO_TABLES[table] / 7)
        assert pages <= len(reads_of(stack, table)) <= math.ceil(
            DEMO_TABLES[table] / fewest) + 4, "paging follows the cap"
    # audit_events holds 50 exact duplicates: each one is in the file twice, not once or thrice.
    assert len(tables["audit_events"]["rows"]) == 1500


def test_tiny_row_cap_pages_text_keys_with_commas_quotes_and_dots(stack, db, data, capsys):
    stack.max_rows = 2
    path = make_backup(capsys, data, "--tables", "app_settings")

    rows = load(path)["tables"]["app_settings"]["rows"]
    assert_same_rows(rows, database_rows(db, "app_settings"), "app_settings")
    assert {"feature,flags", 'say "hi"', "f(x)", "maintenance.mode"} <= {r["key"] for r in rows}
    assert len(reads_of(stack, "app_settings")) <= math.ceil(5 / 2) + 4


def test_default_row_cap_reads_a_few_thousand_rows_in_few_requests(stack, db, data, capsys):
    path = make_backup(capsys, data, "--tables", "bookings")
    assert_same_rows(load(path)["tables"]["bookings"]["rows"], database_rows(db, "bookings"),
                     "bookings")
    assert len(reads_of(stack, "bookings")) <= 5000 // 1000 + 4


def test_rows_inserted_and_deleted_during_the_backup(fresh_stack, db, data, capsys):
    stack = fresh_stack
    stack.max_rows = 250
    stack.faults.add(kind="read", table="bookings", action="latency", delay=0.03)
    before = {row["id"]: row for row in database_rows(db, "bookings")}
    # Early bookings nothing refers to, deleted after the first pages were read: offset paging
    # would then skip as many rows further on.
    doomed = [i for (i,) in db.execute(
        "SELECT id FROM bookings b WHERE id <= 300 AND NOT EXISTS (SELECT FROM payments p "
        "WHERE p.booking_id = b.id) AND NOT EXISTS (SELECT FROM reviews r "
        "WHERE r.booking_id = b.id)")]
    assert len(doomed) > 40

    def change_the_table():
        wait_for(lambda: sum(r.method == "GET" for r in reads_of(stack, "bookings")) >= 3,
                 what="the backup to read two pages of bookings")
        db.execute("DELETE FROM bookings WHERE id = ANY(%s)", [doomed])
        db.execute("INSERT INTO bookings (id, user_id, package_id, status, notes) "
                   "SELECT 100000 + id, user_id, package_id, status, 'added during backup' "
                   "FROM bookings WHERE id BETWEEN 1000 AND 1019")

    changer = threading.Thread(target=change_the_table)
    changer.start()
    try:
        code, out, err = run(capsys, data, "backup", "--tables", "bookings", "--json")
    finally:
        changer.join()

    assert code == 0, err
    rows = load(only_backup(data))["tables"]["bookings"]["rows"]
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "no row twice"
    after = {row["id"]: row for row in database_rows(db, "bookings")}
    throughout = set(before) & set(after)
    assert len(throughout) == 5000 - len(doomed)
    file_rows = {row["id"]: row for row in rows}
    assert throughout <= set(file_rows), "every row that existed throughout is in the file"
    assert_same_rows([file_rows[i] for i in throughout], [after[i] for i in throughout],
                     "bookings")
    summary = json.loads(out)
    assert summary["warnings"] == ["bookings changed during the backup"]
    assert summary["tables"]["bookings"]["count_before"] == 5000
    assert summary["tables"]["bookings"]["count_after"] == 5000 - len(doomed) + 20
    assert f"count 5000 before, {5000 - len(doomed) + 20} after" in err


def test_memory_does_not_grow_with_the_table(stack, db, data, capsys, monkeypatch):
    """Rows stream to the file: eight times the rows, about the same peak memory, with several
    key ranges read at once (ranges of 500 rows here, so that both sizes keep every job busy).

    Holding the rows instead would take some 18 MB more for 40,000 of them.
    """
    monkeypatch.setattr(supabase_backup, "RANGE_ROWS", 500)
    make_backup(capsys, data, "--tables", "app_settings").unlink()  # imports, caches: warm up
    db.execute("CREATE TABLE public.scratch_big (id int PRIMARY KEY, body text)")
    try:
        peaks = {}
        for rows in (5000, 40000):
            db.execute("INSERT INTO public.scratch_big SELECT i, repeat(md5(i::text), 4) "
                       "FROM generate_series((SELECT count(*) FROM public.scratch_big) + 1, %s) "
                       "AS i", [rows])
            gc.collect()
            tracemalloc.start()
            try:
                path = make_backup(capsys, data, "--tables", "scratch_big")
                peaks[rows] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert supabase_backup.check_backup(path)[1]["scratch_big"]["row_count"] == rows
            path.unlink()
    finally:
        db.execute("DROP TABLE IF EXISTS public.scratch_big")
    assert peaks[40000] < peaks[5000] * 1.5, peaks


# --- interrupted runs and the lock --------------------------------------------------------------

def script_env(stack, data, **settings):
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update({"SUPABASE_URL": stack.url, "SUPABASE_SERVICE_ROLE_KEY": stack.service_role_key,
                "SUPABASE_BACKUP_DIR": str(data), **settings})
    return env


def test_kill_9_mid_backup_leaves_no_final_file_and_the_next_run_cleans_up(stack, db, data, capsys,
                                                                          script, tmp_path):
    stack.max_rows = 500
    stack.faults.add(kind="read", table="bookings", action="latency", delay=0.2)
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen([sys.executable, str(script), "backup",
                                    "--tables", "users,bookings"],
                                   cwd=tmp_path, env=script_env(stack, data),
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    with running(process):
        wait_for(lambda: len([r for r in reads_of(stack, "bookings") if r.method == "GET"]) >= 2,
                 what="the backup to be reading bookings")

        # While it runs, a second backup is refused at once: one run at a time.
        started = time.monotonic()
        code, _, err = run(capsys, data, "backup", "--tables", "app_settings")
        assert code == 5
        assert time.monotonic() - started < 5
        line = error_line(err, alone=True)
        assert f"pid {process.pid}" in line and "wait for it to finish" in err

        kill_9(process)

    # The run died while writing: its temporary file is there, and nothing under a final name.
    leftovers = backups_in(data)
    assert len(leftovers) == 1 and leftovers[0].startswith(".partial-"), leftovers

    stack.faults.clear()
    stack.max_rows = 1000
    code, _, err = run(capsys, data, "backup", "--tables", "users,bookings")
    assert code == 0, err
    document = load(only_backup(data))  # the leftover is gone, the new file is whole
    assert_same_rows(document["tables"]["bookings"]["rows"], database_rows(db, "bookings"),
                     "bookings")
    assert leftovers[0] in (data / "logs" / "supabase_backup.log").read_text()


def test_a_held_lock_makes_a_second_backup_exit_5_at_once(stack, data, capsys):
    data.mkdir()
    with open(data / ".supabase_backup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("supabase_backup backup (pid 4242)")
        lock.flush()
        started = time.monotonic()
        code, out, err = run(capsys, data, "backup")
        assert time.monotonic() - started < 5

    assert code == 5 and out == ""
    line = error_line(err, alone=True)
    assert "pid 4242" in line and str(data) in line and "one backup or restore at a time" in line
    assert backups_in(data) == []
    assert not [r for r in stack.requests if r.method == "GET"], "nothing was read"


# --- keys, configuration and connection failures ------------------------------------------------

@pytest.mark.parametrize("key_name", ["anon_key", "publishable_key", "user_key"])
def test_a_key_that_is_not_the_service_role_is_refused(stack, data, capsys, monkeypatch,
                                                       key_name):
    key = getattr(stack, key_name)
    if key_name == "user_key":
        key = key("5f1c2f0e-0000-4000-8000-000000000001")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", key)

    code, out, err = run(capsys, data, "backup")

    assert code == 3 and out == ""
    line = error_line(err, alone=True)
    assert "not the service role" in line and "--allow-rls-limited" in line
    assert key not in err + (data / "logs" / "supabase_backup.log").read_text()
    assert backups_in(data) == []


def test_allow_rls_limited_backs_up_what_the_key_sees_and_says_so(stack, db, data, capsys,
                                                                  monkeypatch):
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", stack.anon_key)

    code, _, err = run(capsys, data, "backup", "--tables", "packages",
                       "--allow-rls-limited")

    assert "row level security may hide rows" in err
    assert code == 0, err
    document = load(only_backup(data))
    assert document["rls_limited"] is True and "row level security" in document["note"]
    assert "row level security may hide rows" in (data / "logs" /
                                                  "supabase_backup.log").read_text()
    # What the anon key sees: the active packages only (RLS), every one of them once.
    rows = document["tables"]["packages"]["rows"]
    active = db.execute("SELECT count(*) FROM packages WHERE is_active").fetchone()[0]
    assert len(rows) == active == len({row["id"] for row in rows}) < 300
    assert "guessed" in document["tables"]["packages"]["metadata"]


def test_allow_rls_limited_passes_the_key_guard_with_a_warning(stack, data, capsys, monkeypatch):
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", stack.anon_key)

    code, _, err = run(capsys, data, "backup", "--allow-rls-limited")

    assert "row level security may hide rows" in err
    assert "row level security may hide rows" in (data / "logs" /
                                                  "supabase_backup.log").read_text()
    assert stack.anon_key not in err
    # This server, like hosted Supabase, shows the table list to the service role only, so
    # the tables must be named.
    assert code == 3 and backups_in(data) == []
    assert "--tables" in err.strip().splitlines()[-1]


def test_rls_limited_snapshot_is_marked_in_the_file(stack, tmp_path):
    """The marking itself, through snapshot(): the file says a backup may be RLS-limited."""
    config = supabase_backup.Config(url=stack.url, key=stack.service_role_key,
                                    key_setting="SUPABASE_SERVICE_ROLE_KEY", data_dir=tmp_path,
                                    sources=(), settings={})
    api = supabase_backup.SupabaseApi(config)
    try:
        discovered = supabase_backup.discover_tables(api.openapi())
        path = tmp_path / "limited.json.gz"
        supabase_backup.snapshot(api, ["app_settings"], discovered, path, config.host, "anon",
                                 supabase_backup.progress, note="rls limited")
    finally:
        api.close()
    document = load(path)
    assert document["rls_limited"] is True and document["key_role"] == "anon"
    assert document["note"] == "rls limited"


@pytest.fixture
def closed_port_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("case, exit_code, words", [
    ("missing url", 3, ["SUPABASE_URL is not set"]),
    ("invalid url", 3, ["SUPABASE_URL (set in the environment) is not a valid URL"]),
    ("missing key", 3, ["SUPABASE_SERVICE_ROLE_KEY is not set"]),
    ("unreachable host", 4, ["cannot reach", "SUPABASE_URL"]),
    ("wrong key", 3, ["refused the key", "SUPABASE_SERVICE_ROLE_KEY"]),
    ("wrong secret key", 3, ["refused the key", "SUPABASE_SERVICE_ROLE_KEY"]),
    ("not postgrest", 4, ["HTTP 404", "SUPABASE_URL"]),
    ("missing table", 3, ["no table named bookingz", "--tables"]),
])
def test_configuration_and_connection_failures_are_one_clear_line(
        stack, data, capsys, monkeypatch, request, case, exit_code, words):
    key = stack.service_role_key
    argv = ["backup"]
    if case == "missing url":
        monkeypatch.delenv("SUPABASE_URL")
    elif case == "invalid url":
        monkeypatch.setenv("SUPABASE_URL", "127.0.0.1:54321")
    elif case == "missing key":
        monkeypatch.delenv("SUPABASE_SERVICE_ROLE_KEY")
    elif case == "unreachable host":
        monkeypatch.setenv("SUPABASE_URL", request.getfixturevalue("closed_port_url"))
    elif case == "wrong key":
        key = make_jwt("another-projects-secret-0123456789abcdef", "service_role")
        monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", key)
    elif case == "wrong secret key":
        key = "sb_secret_" + "x" * 32
        monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", key)
    elif case == "not postgrest":
        monkeypatch.setenv("SUPABASE_URL", request.getfixturevalue("html_server_url"))
    elif case == "missing table":
        argv += ["--tables", "users,bookingz"]

    started = time.monotonic()
    code, out, err = run(capsys, data, *argv)

    assert time.monotonic() - started < 10
    assert code == exit_code, err
    assert out == ""
    line = error_line(err, alone=True)
    for word in words:
        assert word in line
    log_file = data / "logs" / "supabase_backup.log"
    log_text = log_file.read_text() if log_file.exists() else ""
    assert key not in err + log_text
    assert backups_in(data) == []


# --- failures while reading ---------------------------------------------------------------------

@pytest.mark.parametrize("fault", [dict(status=503, code="PGRST000", message="unavailable"),
                                   dict(status=500, code="XX000"),
                                   dict(action="drop")])
def test_a_transient_read_failure_is_retried_and_the_backup_completes(stack, db, data, capsys,
                                                                      fault):
    stack.faults.add(kind="read", table="bookings", after=3, times=1, **fault)

    code, _, err = run(capsys, data, "backup", "--tables", "bookings")

    assert code == 0, err
    assert "retrying" in err
    assert_same_rows(load(only_backup(data))["tables"]["bookings"]["rows"],
                     database_rows(db, "bookings"), "bookings")


def test_a_persistent_read_failure_exits_4_and_writes_no_file(stack, data, capsys):
    stack.faults.add(kind="read", table="bookings", after=3, status=500, code="XX000",
                     message="disk on fire")

    code, out, err = run(capsys, data, "backup", "--tables", "users,bookings")

    assert code == 4 and out == ""
    line = err.splitlines()[-1]  # after the lines of the tables already read and the retries
    assert line.startswith("supabase_backup: error: bookings: ") and "Traceback" not in err
    assert "bookings" in line and "rows after" in line and "disk on fire" in line
    assert "no backup file was written" in line
    assert backups_in(data) == [], "not even a temporary file"


def test_a_table_dropped_mid_backup_fails_the_run_with_no_file(stack, db, data, capsys):
    stack.max_rows = 7
    stack.faults.add(kind="read", table="scratch_doomed", action="latency", delay=0.02)
    code, _, err = backup_while_a_table_is_dropped(
        capsys, db, data, lambda: len(reads_of(stack, "scratch_doomed")) >= 4,
        "the backup to be reading scratch_doomed")

    assert code == 6, err
    line = err.splitlines()[-1]
    assert "scratch_doomed" in line and "no backup file was written" in line
    assert "Traceback" not in err
    assert backups_in(data) == []


@pytest.mark.parametrize("request_number, what", [(1, "the exact count timed out"),
                                                  (2, "asking for 500 rows per page"),
                                                  (8, "the exact count timed out")])
def test_a_statement_timeout_asks_for_less_and_the_backup_completes(stack, db, data, capsys,
                                                                    request_number, what):
    # bookings is read as: count, pages of 1000 (the 2nd request is the first page), one empty
    # page, count after (the 8th request).
    stack.faults.add(kind="read", table="bookings", after=request_number, times=1, status=500,
                     code="57014", message="canceling statement due to statement timeout")

    code, _, err = run(capsys, data, "backup", "--tables", "bookings")

    assert code == 0, err
    assert what in err
    assert_same_rows(load(only_backup(data))["tables"]["bookings"]["rows"],
                     database_rows(db, "bookings"), "bookings")


@pytest.mark.parametrize("request_number, words", [(1, "estimate of the row count"),
                                                   (2, "even a page of 10 rows")])
def test_a_table_that_always_times_out_fails_loudly(stack, data, capsys, request_number, words):
    stack.faults.add(kind="read", table="bookings", after=request_number, status=500,
                     code="57014", message="canceling statement due to statement timeout")

    code, _, err = run(capsys, data, "backup", "--tables", "app_settings,bookings")

    assert code == 6
    line = err.splitlines()[-1]
    assert line.startswith("supabase_backup: error: bookings: ") and words in line
    assert "statement timeout" in line and "no backup file was written" in line
    assert backups_in(data) == []


# --- retention ----------------------------------------------------------------------------------

def days_ago(days):
    return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days)


def backup_name(moment):
    return f"supabase_backup_{moment:%Y%m%d_%H%M%S}.json.gz"


def test_keep_n_keeps_the_newest_n_and_never_touches_safety_backups(stack, data, capsys):
    oldest = backup_with_name(capsys, data, days_ago(3))
    older = data / "backups" / backup_name(days_ago(2))
    old = data / "backups" / backup_name(days_ago(1))
    shutil.copy(oldest, older)
    shutil.copy(oldest, old)
    safety = data / "safety_backups" / "safety_backup_20200101_000000.json.gz"
    shutil.copy(oldest, safety)
    (data / "backups" / "notes.txt").write_text("mine")

    new = make_backup(capsys, data, "--tables", "app_settings", "--keep", "2")

    assert backups_in(data) == sorted([old.name, new.name, "notes.txt"])
    assert safety.exists()


def test_keep_days_deletes_only_older_backups(stack, data, capsys):
    month_old = backup_with_name(capsys, data, days_ago(30))
    eight_days_old = data / "backups" / backup_name(days_ago(8))
    six_days_old = data / "backups" / backup_name(days_ago(6))
    for copy in (eight_days_old, six_days_old):
        shutil.copy(month_old, copy)
    safety = data / "safety_backups" / f"safety_backup_{days_ago(300):%Y%m%d_%H%M%S}.json.gz"
    shutil.copy(month_old, safety)

    code, out, err = run(capsys, data, "backup", "--tables", "app_settings", "--keep-days", "7",
                         "--json")

    assert code == 0, err
    summary = json.loads(out)
    assert sorted(summary["deleted"]) == sorted([month_old.name, eight_days_old.name])
    assert backups_in(data) == sorted([six_days_old.name, Path(summary["file"]).name])
    assert safety.exists()


def test_retention_never_deletes_the_new_backup(stack, data, capsys):
    # A file named in the future (a clock that was wrong once) sorts before the new backup.
    backup_with_name(capsys, data, datetime.datetime(2099, 1, 1, tzinfo=datetime.timezone.utc))

    new = make_backup(capsys, data, "--tables", "app_settings", "--keep", "1")

    assert new.exists()
    assert supabase_backup.check_backup(new)[1]["app_settings"]["row_count"] == 5


def test_a_failed_backup_deletes_nothing(stack, data, capsys):
    old = backup_with_name(capsys, data, days_ago(30))
    stack.faults.add(kind="read", table="app_settings", status=500, code="XX000")

    code, _, _ = run(capsys, data, "backup", "--tables", "app_settings", "--keep-days", "1")

    assert code == 4
    assert backups_in(data) == [old.name]


# --- check and list -----------------------------------------------------------------------------

def flip_a_byte_in_the_middle(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))


def edit_a_row(path):
    lines = gzip.decompress(path.read_bytes()).decode().split("\n")
    row = next(i for i, line in enumerate(lines) if '"key":"f(x)"' in line)
    lines[row] = lines[row].replace("x^2 + 1", "x^2 + 2")
    path.write_bytes(gzip.compress("\n".join(lines).encode()))


def put_invalid_utf8_in_a_row(path):
    lines = gzip.decompress(path.read_bytes()).split(b"\n")
    row = next(i for i, line in enumerate(lines) if b'"key":"f(x)"' in line)
    lines[row] = lines[row].replace(b"x^2 + 1", b"x^2 \xff 1")
    path.write_bytes(gzip.compress(b"\n".join(lines)))


def truncate_reindented(path):
    document = load(path)
    whole = gzip.compress(json.dumps(document, indent=2).encode())
    path.write_bytes(whole[:len(whole) // 2])


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]),
    "bit-flipped": flip_a_byte_in_the_middle,
    "row edited": edit_a_row,
    "row not UTF-8": put_invalid_utf8_in_a_row,
    "gzip of invalid JSON": lambda p: p.write_bytes(gzip.compress(b'{"format": "supabase_b')),
    "gzip of other JSON": lambda p: p.write_bytes(gzip.compress(b'{"rows": []}')),
    "empty": lambda p: p.write_bytes(b""),
    "a folder": lambda p: (p.unlink(), p.mkdir()),
    "truncated re-indented": truncate_reindented,
    "missing": lambda p: p.unlink(),
}


def test_check_passes_an_intact_backup_and_prints_each_table(stack, data, capsys):
    path = make_backup(capsys, data, "--tables", "app_settings,package_tags")

    code, out, err = run(capsys, data, "check", "--file", path.name)

    assert code == 0, err
    assert "intact" in out
    assert re.search(r"app_settings\s+5\s", out) and re.search(r"package_tags\s+900\s", out)
    code, out, _ = run(capsys, data, "check", "--file", str(path), "--json")
    assert code == 0 and json.loads(out)["tables"]["package_tags"]["rows"] == 900


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_check_refuses_a_damaged_or_missing_file_with_one_line(stack, data, capsys, damage):
    # Larger than the reader's buffer, so that damage is met while streaming, not at the start.
    path = make_backup(capsys, data, "--tables", "app_settings,package_tags,users")
    DAMAGE[damage](path)

    code, out, err = run(capsys, data, "check", "--file", str(path))

    # A damaged file is invalid (7); a missing one is its own case (12), not "invalid".
    assert code == (12 if damage == "missing" else 7), err
    assert out == ""
    assert path.name in error_line(err, alone=True)


def test_check_refuses_a_flipped_bit_anywhere_in_the_middle(stack, data, capsys, tmp_path):
    intact = make_backup(capsys, data, "--tables", "app_settings,package_tags,users")
    size = intact.stat().st_size
    damaged = tmp_path / "damaged.json.gz"
    for offset in range(size // 10, size - size // 10, size // 25):
        content = bytearray(intact.read_bytes())
        content[offset] ^= 0x10
        damaged.write_bytes(bytes(content))

        code, out, err = run(capsys, data, "check", "--file", str(damaged))

        assert code == 7, f"a bit flipped at byte {offset} of {size}: {err}"
        assert "damaged.json.gz" in error_line(err, alone=True)


def test_list_shows_backups_newest_first_with_tables_and_rows(stack, data, capsys):
    older = backup_with_name(capsys, data, days_ago(2))
    newer = make_backup(capsys, data, "--tables", "app_settings,package_tags")
    damaged = data / "backups" / backup_name(days_ago(1))
    damaged.write_bytes(newer.read_bytes()[:500])

    code, out, err = run(capsys, data, "list")

    # A damaged backup is listed, marked, and makes the exit code say so (7).
    assert code == 7, err
    header, *lines = out.splitlines()
    assert header.split() == ["backup", "created", "(UTC)", "size", "tables", "rows"]
    assert [line.split()[0] for line in lines] == [newer.name, damaged.name, older.name]
    assert lines[0].split()[-2:] == ["2", "905"] and lines[2].split()[-2:] == ["1", "5"]
    assert "DAMAGED" in lines[1]
    assert f"1 damaged backup(s): {damaged.name}" in error_line(err)
    code, out, _ = run(capsys, data, "list", "--json")
    entries = json.loads(out)
    assert code == 7 and [e["file"] for e in entries] == [newer.name, damaged.name, older.name]
    assert entries[0]["rows"] == 905 and entries[0]["tables"] == 2
    assert entries[1]["status"].startswith("damaged")


def test_list_of_an_empty_data_folder(stack, data, capsys):
    code, out, _ = run(capsys, data, "list")
    assert code == 0 and "no backups" in out


# --- choosing tables and where the file goes ----------------------------------------------------

def test_tables_exclude_and_backup_tables_choose_the_tables(stack, data, capsys, monkeypatch,
                                                           tmp_path):
    def tables_backed_up(*argv):
        output = tmp_path / f"backup-{len(list(tmp_path.glob('backup-*')))}.json.gz"
        code, _, err = run(capsys, data, "backup", "--output", str(output), *argv)
        assert code == 0, err
        return list(load(output)["tables"])

    assert tables_backed_up("--tables", "packages,app_settings") == ["packages", "app_settings"]
    assert set(tables_backed_up("--exclude", "bookings,users", "--exclude", "payments")) == \
        set(DEMO_TABLES) - {"bookings", "users", "payments"}
    monkeypatch.setenv("BACKUP_TABLES", "reviews, app_settings")
    assert tables_backed_up() == ["reviews", "app_settings"]
    assert tables_backed_up("--tables", "packages") == ["packages"]


def test_a_view_is_backed_up_only_when_named_and_marked_read_only(stack, db, data, capsys):
    path = make_backup(capsys, data, "--tables", "booking_summary,packages")

    tables = load(path)["tables"]
    assert tables["booking_summary"]["writable"] is False
    assert tables["packages"]["writable"] is True
    assert_same_rows(tables["booking_summary"]["rows"], database_rows(db, "booking_summary"),
                     "booking_summary")


def test_output_path_writes_there_and_not_in_backups(stack, data, capsys, tmp_path):
    target = tmp_path / "offsite" / "today.json.gz"
    target.parent.mkdir()

    code, out, err = run(capsys, data, "backup", "--tables", "app_settings", "--output",
                         str(target), "--json")

    assert code == 0, err
    assert json.loads(out)["file"] == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert load(target)["tables"]["app_settings"]["row_count"] == 5
    assert backups_in(data) == [] and sorted(os.listdir(target.parent)) == ["today.json.gz"]

    code, _, err = run(capsys, data, "backup", "--tables", "app_settings", "--output",
                       str(target.parent))
    assert code == 0, err
    (named,) = set(os.listdir(target.parent)) - {"today.json.gz"}
    assert BACKUP_NAME.fullmatch(named), "a folder gets a timestamped name in it"

    code, _, err = run(capsys, data, "backup", "--output", str(tmp_path / "nowhere" / "x.json.gz"))
    assert code == 3 and "does not exist" in error_line(err, alone=True)


def test_quiet_prints_nothing_and_json_prints_a_summary(stack, data, capsys):
    code, out, err = run(capsys, data, "--quiet", "backup", "--tables", "app_settings,reviews")
    assert code == 0 and out == "" and err == ""

    code, out, err = run(capsys, data, "backup", "--quiet", "--json", "--tables", "reviews")
    assert code == 0 and err == ""
    summary = json.loads(out)
    assert summary["status"] == "ok" and summary["rows"] == 500
    assert summary["tables"]["reviews"]["rows"] == 500
    assert Path(summary["file"]).is_file()


# --- subprocess: what cron sees -----------------------------------------------------------------

def test_script_for_cron_is_silent_on_success_and_one_line_on_failure(stack, data, script,
                                                                      tmp_path):
    ok = subprocess.run([sys.executable, str(script), "--quiet", "backup", "--tables",
                         "app_settings"], cwd=tmp_path, env=script_env(stack, data),
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "" and ok.stderr == ""
    assert len(backups_in(data)) == 1

    anon = subprocess.run([sys.executable, str(script), "--quiet", "backup"], cwd=tmp_path,
                          env=script_env(stack, data, SUPABASE_SERVICE_ROLE_KEY=stack.anon_key),
                          capture_output=True, text=True, timeout=60)
    assert anon.returncode == 3
    assert len(anon.stderr.splitlines()) == 1 and stack.anon_key not in anon.stderr


def test_the_compressing_thread_hands_every_byte_on_in_order_and_raises_its_errors():
    import io as _io

    sink = _io.BytesIO()
    writer = supabase_backup.CompressingWriter(sink)
    parts = [bytes([i % 251]) * (i * 997 % 70000) for i in range(200)]
    for part in parts:
        writer.write(part)
    writer.close()
    assert sink.getvalue() == b"".join(parts)

    class FullDisk(_io.BytesIO):
        def write(self, data):
            if self.tell() + len(data) > 600_000:
                raise OSError(28, "No space left on device")
            return super().write(data)

    import threading

    before = set(threading.enumerate())
    writer = supabase_backup.CompressingWriter(FullDisk())
    with pytest.raises(OSError, match="No space left"):
        for _ in range(100):
            writer.write(b"x" * 100_000)
        writer.close()
    writer.abort()
    assert set(threading.enumerate()) <= before  # its thread is gone


def test_rows_are_encoded_exactly_as_compact_json():
    """The file and its checksums are over each row's compact JSON: the encoder made once for
    rows writes the same text as json's own, for every kind of value a row can hold."""
    rows = [{"id": 1, "name": "é ü 中文 \U0001F600", "quote": 'a "b" \\ c',
             "ctrl": "\x00\x1f\n\t", "sep": "\u2028\u2029", "f": 0.1, "neg": -0.0,
             "big": 10 ** 40, "e": 1e300, "t": True, "n": None,
             "nested": {"a": [1, {"b": [None, False, 2.5]}], "": ""}, "list": [], "obj": {}},
            {}, {"only": "x"}]
    for row in rows:
        assert supabase_backup.row_json(row) == json.dumps(row, ensure_ascii=False,
                                                           separators=(",", ":"))
    with pytest.raises(TypeError):
        supabase_backup.row_json({"a": object()})


def test_dates_in_another_datestyle_than_iso_are_refused_by_the_backup():
    meta = {"columns": [{"name": "d", "format": "date", "stored_as": "text"},
                        {"name": "t", "format": "timestamp with time zone", "stored_as": "text"}]}
    check = supabase_backup.check_iso_dates
    check("events", meta, [{"d": None, "t": None}, {"d": "4714-11-24 BC",
                                                     "t": "2026-12-01 10:00:00.5+00"}])
    check("events", meta, [{"d": "infinity", "t": "-infinity"}])
    with pytest.raises(supabase_backup.IncompleteBackupError) as refused:
        check("events", meta, [{"d": "01/02/2026", "t": None}])
    assert "events.d comes as '01/02/2026', not in PostgreSQL's ISO DateStyle" in str(refused.value)
    with pytest.raises(supabase_backup.IncompleteBackupError):
        check("events", meta, [{"d": None, "t": "Tue 01 Dec 10:00:00 2026 UTC"}])
