"""--jobs N (issue 14): a table read in key ranges several requests at once, a restore's batches
written several at once, and restore --safe planning from the safety backup just taken ("one
read"). Every test runs the tool against the local stack and looks at what a user sees: the
bytes of a backup file, the rows in PostgreSQL (as ::text), exit codes."""

from __future__ import annotations

import gzip
import json
import threading
from collections import Counter

import pytest

from helpers import error_line, make_backup, row_texts, run, wait_for

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

@pytest.mark.parametrize("value", ["0", "-1", "33", "1000", "six"])
def test_jobs_out_of_range_is_a_usage_error(capsys, data, value):
    code, out, err = run(capsys, data, "backup", "--jobs", value)
    assert code == 2, err
    assert "--jobs" in err and "Traceback" not in err
    assert not (data / "backups").exists() or not list((data / "backups").iterdir())


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


def test_backup_of_text_keys_under_a_collation_is_byte_identical_across_jobs(
        capsys, data, db, monkeypatch):
    """Text keys whose PostgreSQL order (en-US-x-icu, if the server has it, else the default
    collation) is not Python's: split into ranges by the server's order, each range written in
    order, the same bytes at --jobs 1 and 8, every key once."""
    collation = db.execute("SELECT collname FROM pg_collation WHERE collname IN "
                           "('en-US-x-icu', 'en_US.utf8', 'en_US') ORDER BY 1 LIMIT 1").fetchone()
    collate = f' COLLATE "{collation[0]}"' if collation else ""
    db.execute("DROP TABLE IF EXISTS public.jobs_text")
    db.execute(f"CREATE TABLE public.jobs_text (k text{collate} PRIMARY KEY, n int)")
    try:
        db.execute("INSERT INTO public.jobs_text SELECT w, i FROM (SELECT i, "
                   "(ARRAY['a','B','-c','é','Z','_x','10','9'])[1 + i % 8] || i AS w "
                   "FROM generate_series(1, 300) i) s")
        monkeypatch.setattr(supabase_backup, "RANGE_ROWS", 40)
        one = make_backup(capsys, data, "--tables", "jobs_text", "--jobs", "1")
        eight = make_backup(capsys, data, "--tables", "jobs_text", "--jobs", "8")
        assert backup_lines(one) == backup_lines(eight)
        keys = file_keys(eight, "jobs_text", "k")
        assert Counter(keys) == Counter(k for (k,) in db.execute("SELECT k FROM jobs_text"))
        assert keys == [k for (k,) in db.execute("SELECT k FROM jobs_text ORDER BY k")]
    finally:
        db.execute("DROP TABLE IF EXISTS public.jobs_text")


def test_split_points_probed_while_rows_come_and_go_do_not_double_rows(
        capsys, data, stack, db, scratch, monkeypatch):
    """DEFECT. backup --jobs 2 of a 300-row table cut in 3 ranges probes its two split points
    (offsets 99 and 199) at once; the first probe to reach the server is held 2 s. As soon as
    the other one is answered, the app changes the table: when the early answer was the lower
    point (key 100), 250 rows go in below every key, so the held upper probe (offset 199) lands
    on key -51; when it was the upper point (key 200), the 150 lowest rows are deleted, so the
    held lower probe lands on key 250. Either way the
    second point is not after the first, and the ranges (p1, p2], (p2, None] overlap: rows
    between the two points are read twice. A backup must hold each key once, or restore
    refuses the file ("key ... appears twice")."""
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
    assert not doubled, f"{len(doubled)} key(s) twice in the file ({changed[0]}), e.g. {doubled[:3]}"
    # Every row that existed throughout the backup is in the file.
    survivors = set(range(151, 301)) if changed[0] == "deleted" else set(range(1, 301))
    assert survivors <= set(keys)


# --- Restore with --jobs ------------------------------------------------------------------------

@pytest.mark.parametrize("jobs", ["1", "8"])
def test_restore_safe_at_jobs_brings_back_exactly_the_backup(fresh_stack, db, data, capsys, jobs):
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
    import time
    stack.faults.add(kind="read", table=SCRATCH, action="latency", delay=0.3)
    started = time.monotonic()
    make_backup(capsys, data, "--tables", SCRATCH, "--jobs", "2")
    took = time.monotonic() - started
    reads = len([r for r in stack.requests if r.table == SCRATCH])
    assert reads >= 10
    assert reads * 0.3 / 2 <= took < reads * 0.3, (reads, took)
