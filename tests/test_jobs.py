"""--jobs N (issue 14): a table read in key ranges several requests at once, a restore's batches
written several at once, and restore --safe planning from the safety backup just taken ("one
read"). Every test runs the tool against the local stack and looks at what a user sees: the
bytes of a backup file, the rows in PostgreSQL (as ::text), exit codes."""

from __future__ import annotations

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

import pytest

from helpers import (assert_same_state, database_state, error_line, make_backup,
                     rewrite_backup, row_texts, run, running, safety_backup, script_and_env,
                     start_restore, table_rows, wait_for)

import supabase_backup

SCRATCH = "jobs_scratch"


@pytest.fixture
def scratch(db):
    """A table of 300 rows with an int key (keys 1..300); dropped after the test."""
    db.execute(f"DROP TABLE IF EXISTS public.{SCRATCH}")
    db.execute(f"CREATE TABLE public.{SCRATCH} (id int PRIMARY KEY, body text)")
    db.execute(f"INSERT INTO public.{SCRATCH} SELECT i, 'row ' || i FROM generate_series(1, 300) i")
    yield SCRATCH
    db.execute(f"DROP TABLE IF EXISTS public.{SCRATCH}")


def backup_lines(path):
    """The lines of a backup file less the two that carry the moment it was taken."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line for line in f.read().splitlines()
                if '"created_at"' not in line and '"finished_at"' not in line]


def file_keys(path, table, key="id"):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [row[key] for row in json.load(f)["tables"][table]["rows"]]


# --- Usage --------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["backup"], ["restore", "--safe", "--file", "x.json.gz"],
                                     ["rollback", "x.json.gz"], ["diff", "--file", "x.json.gz"]])
@pytest.mark.parametrize("value", ["0", "-1", "33", "1000", "six"])
def test_jobs_out_of_range_is_a_usage_error(capsys, data, stack, command, value):
    """--jobs outside 1..32 on any command: exit 2 naming --jobs, no traceback, no request."""
    code, out, err = run(capsys, data, *command, "--jobs", value)
    assert code == 2, err
    assert "--jobs" in err and "Traceback" not in err
    assert stack.requests == []


# --- Backup: the same bytes whatever N ----------------------------------------------------------

def test_backup_is_byte_identical_at_jobs_1_3_8_with_a_table_split_in_ranges(
        capsys, data, stack, scratch, monkeypatch):
    """With ranges of 40 rows the 300-row table is cut in up to 8 ranges, read at once into
    spools: the file holds the same bytes as with --jobs 1 (one range), the demo tables too."""
    monkeypatch.setattr(supabase_backup, "RANGE_ROWS", 40)
    files = {}
    for jobs in ("1", "3", "8"):
        stack.requests.clear()
        files[jobs] = make_backup(capsys, data, "--jobs", jobs)
        probes = [r for r in stack.requests if r.table == SCRATCH and "offset=" in r.query]
        assert (len(probes) > 0) == (jobs != "1"), (jobs, probes)
    assert backup_lines(files["1"]) == backup_lines(files["3"]) == backup_lines(files["8"])
    assert file_keys(files["8"], SCRATCH) == list(range(1, 301))


def test_backup_of_numeric_keys_kept_as_text_is_byte_identical_across_jobs(
        capsys, data, db, monkeypatch):
    """A numeric key (kept as PostgreSQL's text in a file: "-1.5", "10", "9"), whose order as
    text is not the server's: split into ranges by the server's order, each range written in
    order, the same bytes at --jobs 1 and 8, every key once, in the server's order. (This
    server has no ICU or en_US collation, so numeric-as-text stands for keys whose Python
    order is not PostgreSQL's.)"""
    db.execute("DROP TABLE IF EXISTS public.jobs_numeric")
    db.execute("CREATE TABLE public.jobs_numeric (k numeric PRIMARY KEY, n int)")
    try:
        db.execute("INSERT INTO public.jobs_numeric SELECT (i - 150) * 1.5, i "
                   "FROM generate_series(1, 300) i")
        monkeypatch.setattr(supabase_backup, "RANGE_ROWS", 40)
        one = make_backup(capsys, data, "--tables", "jobs_numeric", "--jobs", "1")
        eight = make_backup(capsys, data, "--tables", "jobs_numeric", "--jobs", "8")
        assert backup_lines(one) == backup_lines(eight)
        keys = file_keys(eight, "jobs_numeric", "k")
        assert keys == [k for (k,) in db.execute("SELECT k::text AS t FROM jobs_numeric ORDER BY k")]
        assert keys != sorted(keys)  # the server's order is not Python's
    finally:
        db.execute("DROP TABLE IF EXISTS public.jobs_numeric")


def test_split_points_probed_while_rows_come_and_go_do_not_double_rows(
        capsys, data, stack, db, scratch, monkeypatch):
    """Found in review. backup --jobs 2 of a 300-row table cut in 3 ranges probes its two split points
    (offsets 99 and 199) at once; the first probe to reach the server is held 2 s. As soon as
    the other one is answered, the app changes the table: when the early answer was the lower
    point (key 100), 250 rows go in below every key, so the held upper probe (offset 199) lands
    on key -51; when it was the upper point (key 200), the 150 lowest rows are deleted, so the
    held lower probe lands on key 250. Either way the second point is not after the first,
    and the ranges (None, p1] and (p2, None] overlap: the rows between the two points are read
    twice: the backup exited 0 and restore refused the file ("key [201] appears twice", exit
    7). The points are now put in the server's order by one more request. A backup must hold
    each key once."""
    monkeypatch.setattr(supabase_backup, "RANGE_ROWS", 100)
    stack.faults.add(kind="read", table=SCRATCH, after=2, times=1, action="latency", delay=2.0)
    changed = []

    def probes_answered():
        return [r for r in list(stack.requests) if r.table == SCRATCH and "offset=" in r.query]

    def change_the_table():
        wait_for(lambda: probes_answered(), what="a split probe to be answered")
        (early,) = probes_answered()
        if "offset=99" in early.query:  # the held probe is the upper one: rows go in below
            db.execute(f"INSERT INTO public.{SCRATCH} SELECT -i, 'new' "
                       f"FROM generate_series(1, 250) i")
            changed.append("inserted")
        else:  # the held probe is the lower one: the lowest rows go
            db.execute(f"DELETE FROM public.{SCRATCH} WHERE id <= 150")
            changed.append("deleted")

    changer = threading.Thread(target=change_the_table)
    changer.start()
    try:
        code, out, err = run(capsys, data, "backup", "--tables", SCRATCH, "--jobs", "2")
    finally:
        changer.join()
    assert changed, "the table was not changed between the probes"
    assert code == 0, err
    (path,) = (data / "backups").iterdir()
    keys = file_keys(path, SCRATCH)
    doubled = sorted(k for k, n in Counter(keys).items() if n > 1)
    # What the user meets then: the nightly backup said exit 0, and its restore is refused.
    restore, _, restore_err = run(capsys, data, "restore", "--safe", "--dry-run", "--file",
                                  path.name)
    assert not doubled, (f"{len(doubled)} key(s) twice in the file ({changed[0]}), e.g. "
                         f"{doubled[:3]}; its restore --dry-run exits {restore}")
    assert restore == 0, restore_err
    # Every row that existed throughout the backup is in the file.
    survivors = set(range(151, 301)) if changed[0] == "deleted" else set(range(1, 301))
    assert survivors <= set(keys)


# --- Restore with --jobs ------------------------------------------------------------------------

@pytest.mark.parametrize("jobs", ["1", "8"])
def test_restore_safe_at_jobs_brings_back_exactly_the_backup(fresh_stack, db, data, capsys,
                                                             jobs):
    """Every demo table changed (updated, rows deleted, a row added): restore --safe --jobs N
    puts back every row of the backup exactly and leaves the added row alone."""
    path = make_backup(capsys, data)
    want = {t: sorted(row_texts(db, t)) for t in ("bookings", "users", "payments")}
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id % 3 = 0")
    db.execute("UPDATE users SET full_name = upper(full_name)")
    db.execute("DELETE FROM payments WHERE id % 2 = 0")
    code, out, err = run(capsys, data, "restore", "--safe", "--file", path.name, "--jobs", jobs)
    assert code == 0, err
    have = {t: sorted(row_texts(db, t)) for t in want}
    assert have == want


def test_a_batch_failing_for_good_among_several_in_flight_is_rolled_back_exactly(
        fresh_stack, db, data, capsys):
    """--jobs 4, 5000 bookings to rewrite in batches of 1000: a check constraint added since
    the backup refuses the file's booking 2500 (the third batch) while other batches are in
    flight. Exit 8, and bookings exactly as before the restore (the writes in flight were
    waited for, then undone)."""
    path = make_backup(capsys, data, "--tables", "bookings")
    db.execute("UPDATE bookings SET notes = 'changed since'")
    db.execute("ALTER TABLE bookings ADD CONSTRAINT jobs_poison "
               "CHECK (id <> 2500 OR notes IS NOT DISTINCT FROM 'changed since') NOT VALID")
    try:
        before = sorted(row_texts(db, "bookings"))
        code, out, err = run(capsys, data, "restore", "--safe", "--file", path.name,
                             "--jobs", "4")
        assert code == 8, err
        assert "jobs_poison" in error_line(err)
        assert sorted(row_texts(db, "bookings")) == before
    finally:
        db.execute("ALTER TABLE bookings DROP CONSTRAINT IF EXISTS jobs_poison")


def test_requests_in_flight_never_exceed_jobs(capsys, data, stack, scratch, monkeypatch):
    """Every read of the split table takes 0.3 s at the server: with --jobs 2 the backup
    takes at least (reads / 2) x 0.3 s, and less than reads x 0.3 s (it does overlap)."""
    monkeypatch.setattr(supabase_backup, "RANGE_ROWS", 40)
    stack.faults.add(kind="read", table=SCRATCH, action="latency", delay=0.3)
    started = time.monotonic()
    make_backup(capsys, data, "--tables", SCRATCH, "--jobs", "2")
    took = time.monotonic() - started
    reads = len([r for r in stack.requests if r.table == SCRATCH])
    assert reads >= 10
    assert reads * 0.3 / 2 <= took < reads * 0.3, (reads, took)


# --- One read: restore --safe plans from the safety backup just taken ----------------------------

KEY_KINDS = {
    # name: (key columns' definition, the key's SQL made of i, the primary key)
    "negative ints": ("k int", "i - 150", "k"),
    "numeric as text": ("k numeric", "(i - 150) * 1.5", "k"),
    "big negative bigint": ("k bigint", "(i - 150) * 30000000000000007", "k"),
    "composite int, text": ("a int, b text", "i % 7, 'x' || (300 - i)", "a, b"),
    "uuid": ("k uuid", "md5(i::text)::uuid", "k"),
    "mixed-case text": ("k text", "(ARRAY['a','B','-c','é','Z','_x','10','9'])[1 + i % 8] || i",
                        "k"),
}


@pytest.mark.parametrize("kind", list(KEY_KINDS))
@pytest.mark.parametrize("jobs", ["1", "4"])
def test_restore_safe_plan_and_outcome_whatever_the_key(capsys, data, db, stack, monkeypatch,
                                                        kind, jobs):
    """A 300-row table keyed by `kind`: after the backup 60 rows change, 34 are deleted and one
    is added. restore --safe plans exactly 34 inserts, 60 updates and 206 unchanged rows
    (whether step 3 merges the file with the safety backup, keys rising in Python's order in
    both, or reads the project, where they do not), and the table ends up as the backup plus
    the added row, every value the same as PostgreSQL's text."""
    columns, key_sql, pk = KEY_KINDS[kind]
    monkeypatch.setattr(supabase_backup, "RANGE_ROWS", 40)
    monkeypatch.setattr(supabase_backup, "COMPARE_CHUNK", 25)
    db.execute("DROP TABLE IF EXISTS public.jobs_keys")
    db.execute(f"CREATE TABLE public.jobs_keys ({columns}, n int, body text, PRIMARY KEY ({pk}))")
    try:
        db.execute(f"INSERT INTO public.jobs_keys SELECT {key_sql}, i, 'row ' || i "
                   f"FROM generate_series(1, 300) i")
        path = make_backup(capsys, data, "--tables", "jobs_keys", "--jobs", jobs)
        at_backup = sorted(row_texts(db, "jobs_keys"))
        db.execute("UPDATE public.jobs_keys SET body = 'changed' WHERE n % 5 = 0")
        db.execute("DELETE FROM public.jobs_keys WHERE n % 7 = 0 AND n % 5 <> 0")
        db.execute(f"INSERT INTO public.jobs_keys SELECT {key_sql}, i, 'added' "
                   f"FROM generate_series(301, 301) i")
        added = row_texts(db, "jobs_keys", "body = 'added'")

        code, out, err = run(capsys, data, "restore", "--safe", "--file", path.name,
                             "--jobs", jobs)

        assert code == 0, err
        names = [n for n in (data / "summaries").iterdir() if n.name.startswith("restore_log_")]
        (log_path,) = names
        log = json.loads(log_path.read_text())
        assert log["plan"]["jobs_keys"] == {"insert": 34, "update": 60, "delete": 0,
                                            "unchanged": 206}
        assert sorted(row_texts(db, "jobs_keys")) == sorted(at_backup + added)
    finally:
        db.execute("DROP TABLE IF EXISTS public.jobs_keys")


# --- Ctrl-C with requests in flight -------------------------------------------------------------

def test_ctrl_c_with_batches_in_flight_rolls_back_exactly(fresh_stack, db, data, capsys,
                                                           tmp_path):
    """restore --safe --jobs 4 of 5000 changed bookings (5 batches), each write held 1.5 s at
    the server (long enough that the restore is still writing when the test, on a busy
    machine, sees its first write): Ctrl-C while batches are in flight. The writes in flight
    are waited for, then undone: exit 8 and bookings exactly as before."""
    path = make_backup(capsys, data, "--tables", "bookings")
    db.execute("UPDATE bookings SET notes = 'changed since'")
    before = database_state(db)
    slow = fresh_stack.faults.add(kind="write", table="bookings", action="latency", delay=1.5)
    process = start_restore(fresh_stack, data, tmp_path, path,
                            ["restore", "--safe", "--file", path.name, "--jobs", "4"],
                            table="bookings")
    with running(process):
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    wait_for(lambda: fresh_stack.writes("bookings") == slow.seen,
             what="the server to answer the last write")
    assert process.returncode == 8, stderr
    assert "interrupted (Ctrl-C)" in error_line(stderr)
    assert_same_state(database_state(db), before)


def test_ctrl_c_during_a_backup_with_ranges_in_flight_leaves_no_file(stack, data, tmp_path,
                                                                      scratch):
    """backup --jobs 8 of a table split in ranges, every read held 0.5 s: Ctrl-C once ranges
    are being read. The process ends within seconds (no thread keeps it alive), exit 130, and
    no backup file, partial or not, is left."""
    script, env = script_and_env(stack, data, tmp_path)
    stack.faults.add(kind="read", table=SCRATCH, action="latency", delay=0.5)
    # 300 rows in ranges: RANGE_ROWS is the script's own; a copy with ranges of 40 rows.
    text = script.read_text()
    assert "\nRANGE_ROWS = 20_000\n" in text
    script.write_text(text.replace("\nRANGE_ROWS = 20_000\n", "\nRANGE_ROWS = 40\n"))
    process = subprocess.Popen([sys.executable, str(script), "backup", "--tables", SCRATCH,
                                "--jobs", "8"], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with running(process):
        wait_for(lambda: any(r.table == SCRATCH and "lte." in r.query
                             for r in list(stack.requests)) or process.poll() is not None,
                 what="a range to be read")
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, stderr = process.communicate(timeout=30)
        took = time.monotonic() - started
    assert process.returncode == 130, stderr
    assert took < 5, took
    assert "Traceback" not in stderr
    assert os.listdir(data / "backups") == []  # nothing, not even a partial file


@pytest.mark.parametrize("jobs", ["1", "8"])
def test_a_self_referencing_tree_restored_onto_an_empty_table_at_jobs(capsys, data, db,
                                                                      stack, jobs):
    """A 3000-row tree whose every row refers to its parent (12 levels), parents' keys above
    their children's so that key order puts children first: restored into the emptied table
    with --jobs N (batches of several levels at once), every row comes back, exit 0."""
    db.execute("DROP TABLE IF EXISTS public.jobs_tree")
    db.execute("CREATE TABLE public.jobs_tree (id int PRIMARY KEY, "
               "parent int REFERENCES public.jobs_tree (id), body text)")
    try:
        db.execute("INSERT INTO public.jobs_tree SELECT 10000 - i, "
                   "CASE WHEN i > 1 THEN 10000 - i / 2 END, 'node ' || i "
                   "FROM generate_series(1, 3000) i ORDER BY i")
        path = make_backup(capsys, data, "--tables", "jobs_tree")
        want = sorted(row_texts(db, "jobs_tree"))
        db.execute("DELETE FROM public.jobs_tree")
        code, out, err = run(capsys, data, "restore", "--safe", "--file", path.name,
                             "--jobs", jobs)
        assert code == 0, err
        assert sorted(row_texts(db, "jobs_tree")) == want
    finally:
        db.execute("DROP TABLE IF EXISTS public.jobs_tree")


# --- diff with ranges in flight -----------------------------------------------------------------

def test_diff_at_jobs_1_and_8_says_the_same_of_a_file_out_of_the_servers_order(
        fresh_stack, db, data, capsys, monkeypatch):
    """diff --json of bookings (5000 rows, chunks of 100: 50 ranges, 8 in flight) after 3 rows
    changed, 2 deleted and 1 added, from the backup and from a copy of it whose rows are in
    reverse key order (ranges then come back empty and are asked for again): the same report
    at --jobs 1 and 8, naming exactly those rows."""
    monkeypatch.setattr(supabase_backup, "COMPARE_CHUNK", 100)
    path = make_backup(capsys, data, "--tables", "bookings")
    reverse = path.with_name("backup_reversed.json.gz")
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id IN (10, 2500, 4999)")
    db.execute("DELETE FROM bookings b WHERE id IN (SELECT id FROM bookings b2 WHERE NOT EXISTS "
               "(SELECT 1 FROM payments p WHERE p.booking_id = b2.id) AND NOT EXISTS "
               "(SELECT 1 FROM reviews r WHERE r.booking_id = b2.id) ORDER BY id LIMIT 2)")
    db.execute("INSERT INTO bookings (user_id, package_id, status, notes) "
               "SELECT user_id, package_id, status, 'added' FROM bookings LIMIT 1")
    shutil.copy(path, reverse)
    rewrite_backup(reverse, lambda doc: doc["tables"]["bookings"]["rows"].reverse())
    reports = {}
    for name in (path.name, reverse.name):
        for jobs in ("1", "8"):
            code, out, err = run(capsys, data, "diff", "--file", name, "--json", "--jobs", jobs)
            assert code == 10, err
            reports[name, jobs] = json.loads(out)["tables"]["bookings"]
    first = reports[path.name, "1"]
    assert (first["only_in_file"], first["changed"], first["only_live"]) == (2, 3, 1), first
    for key, report in reports.items():
        assert {k: report[k] for k in ("only_in_file", "changed", "only_live")} == \
            {k: first[k] for k in ("only_in_file", "changed", "only_live")}, key
    # Each of the 200 ranges compared was read by a thread of its own: none is left behind (a
    # range left at once, join(0), may still be finishing its last request for a moment).
    wait_for(lambda: not [t for t in threading.enumerate() if t.name == "parallel"],
             what="every range's reading thread to stop")


def test_a_row_changed_between_the_safety_read_and_the_plan_is_restored(
        fresh_stack, db, data, capsys):
    """Found in review. restore --safe --jobs 1 of app_settings (unchanged) and users (changed).
    Once the safety backup has read app_settings, and while it reads users (held 1 s), an app
    changes one app_settings row. Step 3 compares the file with the safety backup and finds
    app_settings equal, so nothing is sent to it; step 5 reads it again and finds the app's
    change, so the restore is rolled back (it once only counted such a table: exit 0, "every
    row matches", the file's row not there). Never exit 0 with the file's row missing."""
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "app_settings,users")
    want = sorted(row_texts(db, "app_settings"))
    db.execute("UPDATE users SET full_name = 'changed'")
    stack.requests.clear()
    stack.faults.add(kind="read", table="users", action="latency", delay=1.0, times=2)

    def app_writes():
        wait_for(lambda: any(r.table == "app_settings" and r.method == "GET"
                             for r in list(stack.requests)), what="the safety read")
        db.execute("UPDATE app_settings SET value = '\"the app wrote this\"' "
                   "WHERE key = (SELECT min(key) FROM app_settings)")

    app = threading.Thread(target=app_writes)
    app.start()
    try:
        code, out, err = run(capsys, data, "restore", "--safe", "--file", path.name,
                             "--jobs", "1")
    finally:
        app.join()
    # The app's change came after the safety backup read app_settings (it holds the old value).
    assert "the app wrote this" not in json.dumps(table_rows(safety_backup(data),
                                                               "app_settings"))
    assert code != 0 or sorted(row_texts(db, "app_settings")) == want, \
        "restore said every row matches, but app_settings differs from the file"


# --- a key range read ahead (RangeRead) -----------------------------------------------------------

def scratch_range(stack, tmp_path, scratch):
    """A RangeRead of the scratch table's 300 rows (pages of 50, from PAGE_SIZE) through a
    SupabaseApi of its own, and that api."""
    config = supabase_backup.Config(url=stack.url, key=stack.service_role_key,
                                    key_setting="SUPABASE_SERVICE_ROLE_KEY", data_dir=tmp_path,
                                    sources=(), settings={})
    api = supabase_backup.SupabaseApi(config)
    meta = supabase_backup.discover_tables(api.openapi())[scratch]
    read = supabase_backup.RangeRead(api, scratch, supabase_backup.with_stored_forms(meta), None,
                                     None)
    return read, api


def reading_threads():
    return [t for t in threading.enumerate() if t.name == "parallel" and t.is_alive()]


def test_a_range_whose_comparison_fails_half_way_stops_its_reading_thread(
        stack, scratch, tmp_path, monkeypatch):
    """An error while a key range's rows are compared, after its first page (step 3's spool on a
    full disk, say): the thread reading that range ahead stops with the comparison, rather than
    waiting for the rest of the process's life."""
    monkeypatch.setattr(supabase_backup, "PAGE_SIZE", 50)
    read, api = scratch_range(stack, tmp_path, scratch)
    try:
        compared = []
        with pytest.raises(OSError, match="No space left"):
            for page in read:
                compared += [row["id"] for row in page]
                if len(compared) > 50:
                    raise OSError(28, "No space left on device")
        assert compared == list(range(1, 101))
        wait_for(lambda: not reading_threads(), timeout=supabase_backup.THREAD_GRACE + 5,
                 what="the range's reading thread to stop")
    finally:
        read.join()
        api.close()


def test_ctrl_c_while_a_range_waits_for_a_slow_page_is_not_held_up(
        stack, scratch, tmp_path, monkeypatch):
    """Ctrl-C while a comparison waits for its range's next page (a slow answer in flight)
    reaches the run at once: its rollback, or diff's exit, does not wait for that answer."""
    monkeypatch.setattr(supabase_backup, "PAGE_SIZE", 50)
    stack.faults.add(kind="read", table=scratch, after=2, action="latency", delay=4)
    read, api = scratch_range(stack, tmp_path, scratch)
    ctrl_c = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    try:
        assert [row["id"] for row in read.first_page()] == list(range(1, 51))  # not slowed
        started = time.monotonic()
        ctrl_c.start()
        with pytest.raises(KeyboardInterrupt):
            for _ in read:
                pass  # the second page takes 4 s
        assert time.monotonic() - started < 2.5
    finally:
        ctrl_c.cancel()
        # The slow answer still comes; its thread then ends (it only reads).
        wait_for(lambda: not reading_threads(), what="the range's reading thread to stop")
        api.close()
