"""Living with safety backups (issue #5): rollback, list-safety, cleanup-safety and diff, against
the local stack. The database is checked through psycopg (helpers.database_state: every column of
every demo table), never through the tool.
"""

import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import supabase_backup  # noqa: E402
from helpers import (  # noqa: E402
    assert_same_state, database_state, error_line, files_in, kill_9_mid_write, make_backup,
    restore_log, rewrite_backup, rows_where, run, safety_backup, table_rows, write_requests)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:supabase")


def change_everything(db):
    """Deletions, updates and additions since a backup, in several tables (FK chains included)."""
    db.execute("DELETE FROM payments WHERE id IN (1, 2, 3)")
    db.execute("DELETE FROM reviews WHERE id = md5('review-490')::uuid")
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    db.execute("UPDATE users SET full_name = 'changed', tags = NULL "
               "WHERE email IN ('user1@example.com', 'user2@example.com')")
    db.execute("UPDATE bookings SET notes = 'changed', guests = 1 WHERE id BETWEEN 100 AND 119")
    db.execute("UPDATE packages SET price = 1.00, name = 'changed' WHERE id = 7")
    db.execute("UPDATE package_tags SET weight = 99 WHERE package_id = 1")
    db.execute("INSERT INTO users (email, full_name) VALUES ('new@example.com', 'New')")
    db.execute("INSERT INTO bookings (user_id, package_id) "
               "SELECT id, 3 FROM users WHERE email = 'new@example.com'")
    db.execute("INSERT INTO app_settings (key, value) VALUES ('added.later', '1')")


def reverse_rows(document):
    """A backup edit: every table's rows in reverse key order (out of the server's order)."""
    for table in document["tables"].values():
        table["rows"].reverse()


def logs_named(data, prefix):
    return [json.loads((data / "summaries" / name).read_text())
            for name in files_in(data, "summaries") if name.startswith(prefix)]


def safety_backups(data):
    return [name for name in files_in(data, "safety_backups") if name.startswith("safety_backup_")]


def list_safety(capsys, data):
    code, out, err = run(capsys, data, "list-safety", "--json")
    assert code == 0, err
    return {entry["file"]: entry for entry in json.loads(out)}


# --- rollback -------------------------------------------------------------------------------------

def test_restore_then_rollback_returns_the_exact_state_before_the_restore(fresh_stack, db, data,
                                                                          capsys):
    stack = fresh_stack
    path = make_backup(capsys, data)
    change_everything(db)
    before_restore = database_state(db)
    assert run(capsys, data, "restore", "--safe", "--file", path.name)[0] == 0
    assert database_state(db) != before_restore
    safety = safety_backup(data)

    # The dry run names per table what the rollback would insert, update and delete, and writes
    # nothing.
    stack.requests.clear()
    code, out, err = run(capsys, data, "rollback", "--dry-run", "--json", safety.name)
    assert code == 0, err
    plan = json.loads(out)["plan"]
    assert plan["payments"] == {"insert": 0, "update": 0, "delete": 3, "unchanged": 2997}
    assert plan["app_settings"]["delete"] == 1 and plan["reviews"]["delete"] == 1
    assert plan["users"]["update"] == 2 and plan["bookings"]["update"] == 20
    assert "payments: 3000 rows now; 0 to insert, 0 to update, 3 to delete" in err
    assert write_requests(stack) == [] and safety_backups(data) == [safety.name]

    code, out, err = run(capsys, data, "rollback", safety.name)

    assert code == 0, err
    assert out == ""
    assert_same_state(database_state(db), before_restore)
    assert "rollback complete: 0 inserted, 26 updated, 5 deleted" in err
    (log,) = logs_named(data, "rollback_log_")
    assert log["kind"] == "rollback" and log["status"] == "succeeded"
    assert log["backup_file"] == str(safety) and log["total_deleted"] == 5
    # The rollback took its own safety backup first: the restored state can be had back.
    (own,) = set(safety_backups(data)) - {safety.name}
    assert log["safety_backup_file"] == str(data / "safety_backups" / own)
    assert run(capsys, data, "diff", "--file", safety.name)[0] == 0


def test_rollback_after_kill_9_mid_restore_returns_the_exact_state_before(
        fresh_stack, db, data, capsys, tmp_path):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "app_settings,users")
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")  # the restore inserts it first
    db.execute("UPDATE users SET full_name = 'changed'")
    before_restore = database_state(db)
    kill_9_mid_write(stack, data, tmp_path, path)
    assert 1 <= stack.writes("users") < 4, "killed mid-restore"
    assert rows_where(db, "app_settings", "key = 'f(x)'"), "the restore had inserted a row"
    assert database_state(db) != before_restore
    safety = safety_backup(data)

    # list-safety flags the interrupted restore with the command to run.
    code, out, err = run(capsys, data, "list-safety")
    assert code == 0, err
    assert "INTERRUPTED (the process died half-way)" in out
    assert f"run: python supabase_backup.py rollback {safety.name}" in out

    code, _, err = run(capsys, data, "rollback", safety.name)

    assert code == 0, err
    assert_same_state(database_state(db), before_restore)
    entry = list_safety(capsys, data)[safety.name]
    assert entry["run"]["status"] == "in_progress" and entry["needs_rollback"] is False
    assert entry["rolled_back_by"] and "rollback_command" not in entry
    assert "partly restored" not in run(capsys, data, "list-safety")[1]


@pytest.mark.parametrize("change, words", [
    ("ALTER TABLE bookings DROP COLUMN notes", "bookings.notes no longer exists"),
    ("ALTER TABLE users RENAME COLUMN full_name TO display_name",
     "users.full_name no longer exists")])
def test_rollback_of_a_file_that_no_longer_fits_the_schema_is_refused_untouched(
        fresh_stack, db, data, capsys, change, words):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "users,bookings")
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id <= 10")
    assert run(capsys, data, "restore", "--safe", "--file", path.name)[0] == 0
    db.execute(change)
    before = database_state(db)
    stack.requests.clear()

    code, _, err = run(capsys, data, "rollback", safety_backup(data).name)

    assert code == 7, err
    line = error_line(err)
    assert words in line and "the database was not touched" in line
    assert write_requests(stack) == []
    assert_same_state(database_state(db), before)
    (log,) = logs_named(data, "rollback_log_")
    assert log["status"] == "refused"


def test_a_failed_rollback_is_itself_rolled_back(fresh_stack, db, data, capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "app_settings,payments")
    db.execute("DELETE FROM payments WHERE id IN (1, 2)")
    db.execute("UPDATE app_settings SET value = '\"changed\"' WHERE key = 'default currency'")
    assert run(capsys, data, "restore", "--safe", "--file", path.name)[0] == 0
    safety = safety_backup(data)
    restored = database_state(db)
    # The rollback updates app_settings, then its deletes of payments fail for longer than the
    # retries last: it must put app_settings back as the restore left it.
    stack.faults.add(kind="write", table="payments", status=503, code="503", times=4,
                     message="injected: unavailable")

    code, _, err = run(capsys, data, "rollback", safety.name)

    assert code == 8, err
    line = error_line(err)
    assert "rollback failed" in line and "the database is as before" in line
    assert_same_state(database_state(db), restored)
    (log,) = logs_named(data, "rollback_log_")
    assert log["status"] == "rolled_back"


def test_rollback_of_a_missing_file_names_list_safety(stack, data, capsys):
    code, _, err = run(capsys, data, "rollback", "safety_backup_20200101_000000.json.gz")
    assert code == 12
    assert "list-safety" in error_line(err) and "nothing was done" in err
    assert stack.writes() == 0


# --- list-safety ----------------------------------------------------------------------------------

def test_list_safety_shows_each_restore_and_its_outcome_newest_first(fresh_stack, db, data,
                                                                    capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "app_settings")
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    assert run(capsys, data, "restore", "--safe", "--file", path.name)[0] == 0
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    stack.faults.add(kind="write", table="app_settings", status=503, code="503", times=4)
    assert run(capsys, data, "restore", "--safe", "--file", path.name)[0] == 8
    stack.faults.clear()
    stack.faults.add(kind="write", table="app_settings", status=503, code="503", times=4)
    assert run(capsys, data, "restore", "--safe", "--no-rollback", "--file", path.name)[0] == 11

    code, out, err = run(capsys, data, "list-safety")

    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    succeeded, rolled_back, kept = sorted(safety_backups(data))
    assert names == [kept, name_of_failed_state(data), rolled_back, succeeded]
    assert f"before restore of {path.name}: succeeded" in out
    assert "failed, rolled back automatically and verified" in out
    assert "FAILED and kept as it is (--no-rollback)" in out
    assert out.count("run: python supabase_backup.py rollback") == 1
    assert f"run: python supabase_backup.py rollback {kept}" in out
    assert "1 tables  4 rows" in out.split(succeeded)[1].splitlines()[0]
    entries = list_safety(capsys, data)
    assert entries[kept]["needs_rollback"] and not entries[succeeded]["needs_rollback"]
    assert entries[name_of_failed_state(data)]["run"]["role"] == "failed_state_of"
    assert entries[succeeded]["rows"] == 4 and entries[succeeded]["tables"] == 1


def name_of_failed_state(data):
    (name,) = [n for n in files_in(data, "safety_backups") if n.startswith("failed_state_")]
    return name


def test_list_safety_needs_no_settings_and_says_when_there_is_nothing(data, capsys, monkeypatch):
    monkeypatch.delenv("SUPABASE_URL")
    monkeypatch.delenv("SUPABASE_SERVICE_ROLE_KEY")
    code, out, _ = run(capsys, data, "list-safety")
    assert code == 0 and out.startswith("no safety backups in ")


# --- cleanup-safety -------------------------------------------------------------------------------

def age(data, name, stamp):
    """Rename a safety backup as if taken at stamp (YYYYMMDD_HHMMSS), and its log with it."""
    kind = name.split("_2")[0]
    new = f"{kind}_{stamp}.json.gz"
    os.rename(data / "safety_backups" / name, data / "safety_backups" / new)
    for log_name in files_in(data, "summaries"):
        log_path = data / "summaries" / log_name
        log_path.write_text(log_path.read_text().replace(name, new))
    return new


def test_cleanup_safety_keeps_the_newest_and_the_ones_still_needed(fresh_stack, db, data,
                                                                   capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "app_settings")
    for outcome in ("succeeded", "kept", "newest"):
        db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
        if outcome == "kept":
            stack.faults.add(kind="write", table="app_settings", status=503, code="503", times=4)
        code = run(capsys, data, "restore", "--safe", "--no-rollback", "--file", path.name)[0]
        assert code == (11 if outcome == "kept" else 0)
        stack.faults.clear()
    first, second, third = sorted(safety_backups(data))
    old = age(data, first, "20200101_000000")
    needed = age(data, second, "20200102_000000")
    newest = age(data, third, "20200103_000000")  # old too, but the newest of all
    sizes = {name: (data / "safety_backups" / name).stat().st_size for name in (old, needed)}

    code, out, err = run(capsys, data, "cleanup-safety", "--dry-run")
    assert code == 0, err
    assert f"would delete {old}" in out and "would delete 1 safety backup(s)" in out
    assert f"kept {newest}: the newest safety backup is always kept" in out
    assert f"kept {needed}: its restore FAILED and kept as it is" in out
    assert sorted(safety_backups(data)) == [old, needed, newest]

    code, out, err = run(capsys, data, "cleanup-safety")
    assert code == 0, err
    assert f"deleted {old} ({supabase_backup.human_size(sizes[old])}" in out
    assert sorted(safety_backups(data)) == [needed, newest]

    code, out, err = run(capsys, data, "cleanup-safety", "--older-than", "1", "--force", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["deleted"] == [needed] and report["bytes_freed"] == sizes[needed]
    assert list(report["kept"]) == [newest]
    assert safety_backups(data) == [newest]


def test_cleanup_safety_leaves_young_safety_backups_alone(fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--tables", "app_settings")
    for _ in range(2):
        db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
        assert run(capsys, data, "restore", "--safe", "--file", path.name)[0] == 0
    before = safety_backups(data)
    code, out, _ = run(capsys, data, "cleanup-safety")
    assert code == 0
    assert "deleted 0 safety backup(s) older than 7 days" in out
    assert safety_backups(data) == before


# --- diff -----------------------------------------------------------------------------------------

def test_diff_is_silent_on_identical_data_and_names_every_difference(fresh_stack, db, data,
                                                                     capsys):
    stack = fresh_stack
    path = make_backup(capsys, data)
    stack.requests.clear()
    code, out, err = run(capsys, data, "diff", "--file", path.name)
    assert code == 0, err
    assert out == ""
    assert "no differences: 9 table(s)" in err
    assert write_requests(stack) == []

    db.execute("DELETE FROM payments WHERE id IN (5, 6)")
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id IN (10, 11, 12)")
    db.execute("UPDATE bookings SET guests = 9 WHERE id = 12")
    db.execute("INSERT INTO app_settings (key, value) VALUES ('added.later', '1')")
    db.execute("INSERT INTO audit_events (event, at) "
               "SELECT event, at FROM audit_events LIMIT 2")  # duplicates of existing rows
    db.execute("ALTER TABLE reviews ADD COLUMN mood text")

    code, out, err = run(capsys, data, "diff", "--file", path.name)

    assert code == 10, err
    assert "payments: 3000 rows in the file, 2998 live\n  only in the file: 2  keys [5], [6]" \
        in out
    assert "  changed: 3  keys [10] (notes), [11] (notes), [12] (guests, notes)" in out
    assert 'app_settings: 5 rows in the file, 6 live\n  only live: 1  keys ["added.later"]' \
        in out
    assert "audit_events: 1500 rows in the file, 1502 live (compared as whole rows" in out
    assert "reviews: 500 rows in the file, 500 live\n  columns only live: mood" in out
    assert "users" not in out and "packages" not in out

    code, out, _ = run(capsys, data, "diff", "--file", path.name, "--tables", "payments,users",
                       "--json")
    assert code == 10
    report = json.loads(out)
    assert not report["identical"] and set(report["tables"]) == {"payments", "users"}
    assert report["tables"]["payments"]["only_in_file"] == 2
    assert report["tables"]["users"]["changed"] == 0


def test_diff_says_why_a_table_is_compared_as_whole_rows(fresh_stack, db, data, capsys):
    """A table whose primary key changed since the backup cannot be matched by key: diff says
    so (not "no primary key"), and still finds the one row that differs."""
    path = make_backup(capsys, data, "--tables", "app_settings,audit_events")
    db.execute("ALTER TABLE app_settings DROP CONSTRAINT app_settings_pkey, "
               "ADD PRIMARY KEY (key, value)")
    db.execute("UPDATE app_settings SET value = '\"changed\"' WHERE key = 'f(x)'")
    code, out, err = run(capsys, data, "diff", "--file", path.name)
    assert code == 10, err
    assert ("app_settings: 5 rows in the file, 5 live (compared as whole rows (the file's "
            "primary key is not the live one))\n  only in the file: 1\n  only live: 1") in out
    assert "audit_events" not in out  # no key, and no difference
    code, out, _ = run(capsys, data, "diff", "--file", path.name, "--json")
    report = json.loads(out)["tables"]
    assert report["audit_events"]["compared_as"] == "whole rows (no primary key)"


def test_diff_of_a_table_the_file_does_not_hold_is_refused(stack, data, capsys):
    path = make_backup(capsys, data, "--tables", "app_settings")
    code, _, err = run(capsys, data, "diff", "--file", path.name, "--tables", "users")
    assert code == 7
    assert "users not in" in error_line(err)


@pytest.mark.parametrize("chunk, max_rows", [(7, 5), (1000, 1000)])
def test_diff_in_key_ranges_with_composite_and_text_keys(fresh_stack, db, data, capsys,
                                                         monkeypatch, chunk, max_rows):
    """The file is compared chunk by chunk with the live rows of each chunk's key range: ranges
    over composite keys and text keys with commas, quotes and dots, through a small row cap."""
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "package_tags,app_settings,payments")
    db.execute("INSERT INTO app_settings (key, value) VALUES ('a,b.\"c\"', '1'), ('zz', '2')")
    db.execute("UPDATE app_settings SET value = '9' WHERE key = 'f(x)'")
    db.execute("DELETE FROM package_tags WHERE package_id = 2")
    db.execute("UPDATE package_tags SET weight = weight + 1 WHERE package_id = 5")
    db.execute("INSERT INTO package_tags (package_id, tag) VALUES (1, 'zzz-new'), (300, 'aaa')")
    db.execute("DELETE FROM payments WHERE id % 700 = 0")
    monkeypatch.setattr(supabase_backup, "COMPARE_CHUNK", chunk)
    stack.max_rows = max_rows

    code, out, err = run(capsys, data, "diff", "--file", path.name, "--json")

    assert code == 10, err
    tables = json.loads(out)["tables"]
    settings = tables["app_settings"]
    assert (settings["only_live"], settings["changed"], settings["only_in_file"]) == (2, 1, 0)
    assert sorted(settings["only_live_keys"]) == sorted(['["a,b.\\"c\\""]', '["zz"]'])
    assert settings["changed_columns"] == {'["f(x)"]': ["value"]}
    tags = tables["package_tags"]
    tags_per_package = db.execute("SELECT count(*) FROM package_tags WHERE package_id = 5"
                                  ).fetchone()[0]
    assert tags["only_live"] == 2 and tags["changed"] == tags_per_package
    assert tags["only_in_file"] == 900 - db.execute(
        "SELECT count(*) FROM package_tags").fetchone()[0] + 2
    payments = tables["payments"]
    assert payments["only_in_file"] == 3000 // 700 and payments["only_live"] == 0
    assert payments["only_in_file_keys"] == ["[700]", "[1400]", "[2100]", "[2800]"]
    assert payments["live_rows"] == 3000 - 3000 // 700


def test_diff_reads_each_table_about_once(fresh_stack, db, data, capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "bookings,users")
    stack.requests.clear()
    assert run(capsys, data, "diff", "--file", path.name)[0] == 0
    reads = [r.method for r in stack.requests if r.table in ("bookings", "users")]
    # One count per table, then one range per 1000 file rows; once the count is read, no more.
    assert sorted(reads) == ["GET"] * (5 + 2) + ["HEAD"] * 2


def test_diff_matches_rows_of_a_file_in_another_order(fresh_stack, db, data, capsys):
    """A file whose rows are not in the server's key order (edited, or a collation changed):
    rows that turn up in another chunk's range are still matched, never reported twice."""
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "users,package_tags")

    rewrite_backup(path, reverse_rows)
    code, out, err = run(capsys, data, "diff", "--file", path.name)
    assert code == 0, out + err
    assert out == ""

    db.execute("UPDATE users SET full_name = 'changed' WHERE email = 'user7@example.com'")
    db.execute("DELETE FROM package_tags WHERE package_id = 3")
    code, out, _ = run(capsys, data, "diff", "--file", path.name, "--json")
    assert code == 10
    tables = json.loads(out)["tables"]
    assert (tables["users"]["changed"], tables["users"]["only_in_file"],
            tables["users"]["only_live"]) == (1, 0, 0)
    gone = len(table_rows(path, "package_tags")) - db.execute(
        "SELECT count(*) FROM package_tags").fetchone()[0]
    assert (tables["package_tags"]["only_in_file"], tables["package_tags"]["only_live"],
            tables["package_tags"]["changed"]) == (gone, 0, 0)
    assert stack.writes() == 0


def test_rollback_tables_brings_back_only_the_tables_named(fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--tables", "app_settings,payments")
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    db.execute("DELETE FROM payments WHERE id = 9")
    before_restore = database_state(db)
    assert run(capsys, data, "restore", "--safe", "--file", path.name)[0] == 0
    restored = database_state(db)

    code, _, err = run(capsys, data, "rollback", "--tables", "payments", safety_backup(data).name)

    assert code == 0, err
    state = database_state(db)
    assert_same_state({**state, "app_settings": restored["app_settings"]},
                      {**before_restore, "app_settings": restored["app_settings"]})
    assert state["app_settings"] == restored["app_settings"]
    (log,) = logs_named(data, "rollback_log_")
    assert log["tables"] == ["payments"] and log["total_deleted"] == 1


def test_restore_and_rollback_of_a_file_in_another_order_plan_exactly(fresh_stack, db, data,
                                                                     capsys):
    """The plan compares the file with the live rows in key ranges; rows of a file out of the
    server's order turn up in other ranges and are matched after all: nothing equal is written,
    nothing is inserted twice, and the rollback deletes exactly what the file lacks."""
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "users,payments")

    rewrite_backup(path, reverse_rows)
    at_backup = database_state(db)
    db.execute("DELETE FROM payments WHERE id IN (5, 2999)")
    db.execute("UPDATE users SET full_name = 'changed' WHERE email = 'user9@example.com'")
    db.execute("INSERT INTO app_settings (key, value) VALUES ('untouched', '1')")
    before_restore = database_state(db)
    stack.requests.clear()

    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)

    assert code == 0, err
    expected = database_state(db)
    assert expected["payments"] == at_backup["payments"]
    assert expected["users"] == at_backup["users"]
    log = restore_log(data)
    assert log["plan"]["payments"] == {"insert": 2, "update": 0, "delete": 0, "unchanged": 2998}
    assert log["plan"]["users"] == {"insert": 0, "update": 1, "delete": 0, "unchanged": 1999}
    assert len(write_requests(stack)) == 2

    code, _, err = run(capsys, data, "rollback", safety_backup(data).name)

    assert code == 0, err
    assert_same_state(database_state(db), before_restore)
    (rollback,) = logs_named(data, "rollback_log_")
    assert rollback["plan"]["payments"]["delete"] == 2 and rollback["total_deleted"] == 2


def test_restore_into_an_emptied_table_asks_for_no_range_to_plan(fresh_stack, db, data, capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "app_settings")
    at_backup = database_state(db)
    db.execute("DELETE FROM app_settings")
    stack.requests.clear()

    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)

    assert code == 0, err
    assert_same_state(database_state(db), at_backup)
    reads = [r.method for r in stack.requests if r.table == "app_settings"
             and r.method in ("GET", "HEAD")]
    # The safety backup: a count, one (empty) page, a count; the plan: nothing, it compares the
    # file with the safety backup just taken; the verification: a count, one range; the log: a
    # count.
    assert reads == ["HEAD", "GET", "HEAD", "HEAD", "GET", "HEAD"], " ".join(reads)


def test_diff_names_a_table_that_no_longer_exists(fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--tables", "app_settings,package_tags")
    db.execute("DROP TABLE app_settings")

    code, out, err = run(capsys, data, "diff", "--file", path.name)

    assert code == 10, err
    assert out == "app_settings: the table no longer exists in the project (5 rows in the file)\n"


# --- found in review: each of these once went wrong -----------------------------------------------

def test_true_and_1_are_different_values_to_diff_and_restore(fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--tables", "app_settings")
    at_backup = database_state(db)
    db.execute("UPDATE app_settings SET value = '0' WHERE key = 'maintenance.mode'")
    db.execute("UPDATE app_settings SET value = jsonb_set(value, '{new_checkout}', '1') "
               "WHERE key = 'feature,flags'")

    code, out, _ = run(capsys, data, "diff", "--file", path.name)
    assert code == 10
    assert "changed: 2" in out and '["maintenance.mode"] (value)' in out

    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)
    assert code == 0, err
    assert "0 inserted, 2 updated" in err
    assert_same_state(database_state(db), at_backup)


def test_the_automatic_rollback_writes_back_before_it_deletes_rows_still_referred_to(
        fresh_stack, db, data, capsys):
    """The restore inserts a user and points bookings back at it, then fails: the rollback must
    point the bookings away again before it can delete that user."""
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "users,bookings,payments")
    (user,) = db.execute("SELECT user_id FROM bookings b WHERE NOT EXISTS (SELECT FROM users u "
                         "WHERE u.referred_by = b.user_id) ORDER BY id LIMIT 1").fetchone()
    (other,) = db.execute("SELECT id FROM users WHERE id <> %s ORDER BY id LIMIT 1",
                          [user]).fetchone()
    db.execute("UPDATE bookings SET user_id = %s WHERE user_id = %s", [other, user])
    db.execute("DELETE FROM users WHERE id = %s", [user])
    db.execute("UPDATE payments SET method = 'changed' WHERE id = 1")
    before = database_state(db)
    stack.faults.add(kind="write", table="payments", status=503, code="503", times=4)

    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)

    assert code == 8, err
    assert "the database is as before" in err
    assert_same_state(database_state(db), before)


def test_list_safety_flags_a_failed_restore_while_another_run_holds_the_lock(
        fresh_stack, db, data, capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "app_settings")
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    stack.faults.add(kind="write", table="app_settings", status=503, code="503", times=4)
    assert run(capsys, data, "restore", "--safe", "--no-rollback", "--file", path.name)[0] == 11
    kept = safety_backup(data).name

    with supabase_backup.data_lock(data, "backup"):  # a nightly backup, say
        entries = list_safety(capsys, data)

    assert entries[kept]["needs_rollback"] is True
    assert entries[kept]["rollback_command"] == f"python supabase_backup.py rollback {kept}"


def test_cleanup_safety_keeps_the_newest_safety_backup_not_a_failed_state(fresh_stack, db, data,
                                                                         capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "app_settings")
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    stack.faults.add(kind="write", table="app_settings", status=503, code="503", times=4)
    assert run(capsys, data, "restore", "--safe", "--file", path.name)[0] == 8
    (safety,) = safety_backups(data)
    failed = name_of_failed_state(data)
    age(data, safety, "20200101_000000")
    (safety,) = safety_backups(data)
    age(data, failed, "20200101_000000")

    code, out, err = run(capsys, data, "cleanup-safety")

    assert code == 0, err
    assert f"kept {safety}: the newest safety backup is always kept" in out
    assert safety_backups(data) == [safety]


def test_list_safety_offers_to_finish_a_rollback_that_was_killed(fresh_stack, db, data, capsys,
                                                                tmp_path):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "users")
    db.execute("UPDATE users SET full_name = 'changed'")
    assert run(capsys, data, "restore", "--safe", "--file", path.name)[0] == 0
    first = safety_backup(data).name
    kill_9_mid_write(stack, data, tmp_path, data / "safety_backups" / first,
                     command=["rollback", first])
    (own,) = set(safety_backups(data)) - {first}

    code, out, _ = run(capsys, data, "list-safety")

    assert code == 0
    assert (f"the rollback did not finish; to finish it run again: python supabase_backup.py "
            f"rollback {first}; or, to return to the state before it: python supabase_backup.py "
            f"rollback {own}") in out
