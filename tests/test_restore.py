"""restore --safe (issue #4) against the local stack.

The database is always checked through psycopg, never through the tool: every column of every
demo table, as PostgreSQL's own text (col::text), compared exactly before and after (see
row_texts). Layers (see STYLE.md): main([...])
in-process with tmp_path, and subprocess runs where a real process matters (kill -9, Ctrl-C, the
lock).
"""

import json
import signal
import sys
from pathlib import Path

import psycopg
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import supabase_backup  # noqa: E402
from helpers import (  # noqa: E402
    DEMO_TABLES, NO_UPDATED_AT, OUTLASTS_RETRIES, assert_same_state, counts,
    database_state, error_line, files_in, kill_9, make_backup, plus, restore_log, rewrite_backup,
    rows_where, run, running, safety_backup, start_restore, table_rows, write_requests)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:supabase")


# --- a restore that succeeds --------------------------------------------------------------------

def test_restore_brings_back_the_backup_and_leaves_rows_added_since_alone(fresh_stack, db, data,
                                                                           capsys):
    stack = fresh_stack
    path = make_backup(capsys, data)
    at_backup = database_state(db)
    # Deleted since the backup: three payments, a reply to a reply, a setting, the last booking.
    db.execute("DELETE FROM payments WHERE id IN (1, 2, 3)")
    db.execute("DELETE FROM reviews WHERE id = md5('review-490')::uuid")
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    db.execute("DELETE FROM bookings WHERE id = 5000")
    # One copy of a duplicated audit event (the table has no key: it is restored as a multiset).
    db.execute("DELETE FROM audit_events WHERE ctid = (SELECT min(ctid) FROM audit_events "
               "GROUP BY event, actor, payload, at HAVING count(*) > 1 LIMIT 1)")
    # As after a TRUNCATE ... RESTART IDENTITY: the next payment would get id 1 again.
    db.execute("SELECT setval('payments_id_seq', 1, false)")
    # Changed since the backup.
    db.execute("UPDATE users SET full_name = 'changed', tags = NULL "
               "WHERE email IN ('user1@example.com', 'user2@example.com')")
    db.execute("UPDATE bookings SET notes = 'changed', guests = 1 WHERE id BETWEEN 100 AND 119")
    db.execute("UPDATE packages SET price = 1.00, name = 'changed' WHERE id = 7")
    db.execute("UPDATE package_tags SET weight = 99 WHERE package_id = 1")
    db.execute("UPDATE app_settings SET value = '\"USD\"' WHERE key = 'default currency'")
    # Added since the backup: the restore leaves these alone.
    db.execute("INSERT INTO users (email, full_name) VALUES ('new@example.com', 'New')")
    db.execute("INSERT INTO bookings (user_id, package_id) "
               "SELECT id, 3 FROM users WHERE email = 'new@example.com'")
    db.execute("INSERT INTO app_settings (key, value) VALUES ('added.later', '1')")
    db.execute("INSERT INTO audit_events (event, at) VALUES ('restore.test', now())")
    added = {"users": rows_where(db, "users", "email = 'new@example.com'"),
             "bookings": rows_where(db, "bookings", "id > 5000"),
             "app_settings": rows_where(db, "app_settings", "key = 'added.later'"),
             "audit_events": rows_where(db, "audit_events", "event = 'restore.test'")}
    assert all(len(rows) == 1 for rows in added.values())
    before = database_state(db)
    stack.requests.clear()

    code, out, err = run(capsys, data, "restore", "--safe", "--file", path.name)

    assert code == 0, err
    assert out == ""
    assert_same_state(database_state(db), plus(at_backup, added))
    # Only the rows that differ were written, in one batch per table; reviews needed one insert,
    # users two updates, audit_events the copy it lacked.
    assert {table: len(write_requests(stack, table)) for table in DEMO_TABLES
            if table != "packages"} == {"app_settings": 1, "audit_events": 1, "bookings": 1,
                                        "package_tags": 1, "payments": 1, "profiles": 0,
                                        "reviews": 1, "users": 1}

    log = restore_log(data)
    assert log["status"] == "succeeded"
    assert log["started_at"] < log["finished_at"]
    assert log["backup_file"] == str(path)
    assert Path(log["safety_backup_file"]) == safety_backup(data)
    assert log["before_counts"] == counts(before)
    assert log["after_counts"] == counts(database_state(db))
    assert log["tables_skipped"] == {}
    outcome = {table: (entry["inserted"], entry["updated"], entry["errors"])
               for table, entry in log["tables_restored"].items()}
    assert outcome == {"app_settings": (1, 1, 0), "audit_events": (1, 0, 0),
                       "bookings": (1, 20, 0), "package_tags": (0, 3, 0), "packages": (0, 1, 0),
                       "payments": (3, 0, 0), "profiles": (0, 0, 0), "reviews": (1, 0, 0),
                       "users": (0, 2, 0)}
    assert log["tables_restored"]["bookings"]["unchanged"] == 5000 - 21
    assert log["tables_failed"] == [] and log["mismatches"] == []
    assert (log["total_inserted"], log["total_updated"], log["total_errors"]) == (7, 27, 0)
    assert [(s["step"], s["name"], s["status"]) for s in log["steps"]] == [
        (1, "SAFETY", "ok"), (2, "VALIDATE", "ok"), (3, "RECORD", "ok"), (4, "RESTORE", "ok"),
        (5, "VERIFY", "ok"), (6, "LOG", "ok")]
    for number in range(1, 7):
        assert f"{number}. [" in err

    # The safety backup holds the state before the restore, and is intact.
    code, _, check_err = run(capsys, data, "check", "--file", str(safety_backup(data)))
    assert code == 0, check_err
    assert len(table_rows(safety_backup(data), "bookings")) == len(before["bookings"])

    # Rows went back into tables whose keys come from sequences: the app's next payment would
    # collide with a restored one. The SQL that moves the sequences on is printed and logged, and
    # after it the app can insert again.
    new_payment = "INSERT INTO payments (booking_id, amount) VALUES (3, 1) RETURNING id"
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(new_payment)
    assert {statement.split("'")[1] for statement in log["sequence_sql"]} == {
        "public.bookings", "public.payments"}
    for statement in log["sequence_sql"]:
        assert statement in err
        db.execute(statement)
    assert db.execute(new_payment).fetchone()[0] == 3001


def test_fk_chain_and_self_references_all_come_back(fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--tables", "users,bookings,payments,reviews")
    at_backup = database_state(db)
    # The whole chain users -> bookings -> payments (and reviews) is gone. Users refer to users
    # (referred_by) whose keys sort after theirs, and replies refer to reviews.
    db.execute("TRUNCATE reviews, payments, bookings, users")

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path))

    assert code == 0, err
    assert_same_state(database_state(db), at_backup)
    log = restore_log(data)
    assert {t: e["inserted"] for t, e in log["tables_restored"].items()} == {
        "users": 2000, "bookings": 5000, "payments": 3000, "reviews": 500}
    # Parents went first, also within users: every batch landed whole, none had to wait.
    batches = sum(-(-rows // supabase_backup.WRITE_BATCH_SIZE) for rows in (2000, 5000, 3000, 500))
    assert [r.status for r in write_requests(fresh_stack)] == [201] * batches


def test_a_row_whose_parent_is_gone_is_named_and_the_restore_rolled_back(fresh_stack, db, data,
                                                                         capsys):
    path = make_backup(capsys, data, "--tables", "payments")
    # Payment 1 is for booking 2, which is gone since the backup and is not in it.
    assert db.execute("SELECT booking_id FROM payments WHERE id = 1").fetchone()[0] == 2
    db.execute("DELETE FROM payments WHERE booking_id = 2")
    db.execute("DELETE FROM bookings WHERE id = 2")
    db.execute("UPDATE payments SET method = 'changed' WHERE id BETWEEN 2 AND 101")
    before = database_state(db)
    fresh_stack.requests.clear()

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path))

    assert code == 8, err
    line = error_line(err)
    assert "payments: the row with key [1] refers to a row that is neither in the backup nor in " \
           "the project" in line and "bookings" in line and "rolled back" in line
    assert_same_state(database_state(db), before)
    # The batch was halved to find the row, not written row by row.
    assert len(write_requests(fresh_stack, "payments")) < 25


def test_identity_always_table_is_patched_and_generated_columns_are_never_written(
        fresh_stack, db, data, capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "packages")
    at_backup = database_state(db)
    db.execute("UPDATE packages SET price = price + 1, duration_days = 30, name = 'changed' "
               "WHERE id IN (3, 150, 300)")
    stack.requests.clear()

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path))

    assert code == 0, err
    assert_same_state(database_state(db), at_backup)
    # packages.id is GENERATED ALWAYS AS IDENTITY and packages.nights a generated column. The API
    # does not say so (its OpenAPI document marks neither), so the tool learns it from refusals
    # that write nothing: one upsert refused for id, one update refused for nights; then the
    # three rows by PATCH on their keys, without either column (PostgreSQL refuses any write that
    # carries one, so the writes it accepted did not).
    assert [(r.method, r.status) for r in write_requests(stack, "packages")] == [
        ("POST", 400), ("PATCH", 400), ("PATCH", 204), ("PATCH", 204), ("PATCH", 204)]
    assert "GENERATED ALWAYS AS IDENTITY" in err and "packages.nights is a generated column" in err


def test_numbers_inside_jsonb_keep_their_digits(fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--tables", "users")
    user = "user1400@example.com"  # profile.score is 518.00
    before = db.execute("SELECT profile::text FROM users WHERE email = %s", [user]).fetchone()[0]
    assert '"score": 518.00' in before
    db.execute("UPDATE users SET full_name = 'changed' WHERE email = %s", [user])

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path))

    assert code == 0, err
    after = db.execute("SELECT profile::text FROM users WHERE email = %s", [user]).fetchone()[0]
    assert after == before


# --- failures roll back exactly -----------------------------------------------------------------

def test_a_fault_on_the_second_table_rolls_back_to_exactly_the_state_before(fresh_stack, db, data,
                                                                            capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "app_settings,users,bookings")
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    db.execute("UPDATE app_settings SET value = '1' WHERE key = 'say \"hi\"'")
    # About 2,000 changed users are written in four batches; three deleted ones are put back.
    db.execute("UPDATE users SET full_name = 'changed' WHERE email ~ '^user1?[0-9]{1,3}@'")
    db.execute("DELETE FROM users WHERE email IN ('user1997@example.com', "
               "'user1998@example.com', 'user1999@example.com')")
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id <= 50")
    changed_users = db.execute("SELECT count(*) FROM users WHERE full_name = 'changed'"
                               ).fetchone()[0]
    assert changed_users > 1000
    before = database_state(db)
    # app_settings is written first, then users: its second batch fails, whatever the retries.
    stack.faults.add(kind="write", table="users", after=2, times=OUTLASTS_RETRIES, status=503,
                     code="XX000", message="injected: disk on fire")

    code, out, err = run(capsys, data, "restore", "--safe", "--file", path.name)

    assert code == 8, err
    line = error_line(err)
    assert "users" in line and "disk on fire" in line
    assert "rolled back" in line and "the database is as before" in line
    assert_same_state(database_state(db), before)
    assert stack.writes("bookings") == 0, "never reached by the restore, so left alone"
    # The failed state was kept before rolling back: app_settings and the first batch of users
    # had been restored.
    failed = [n for n in files_in(data, "safety_backups") if n.startswith("failed_state_")]
    assert len(failed) == 1
    failed_path = data / "safety_backups" / failed[0]
    assert run(capsys, data, "check", "--file", str(failed_path))[0] == 0
    assert "f(x)" in {row["key"] for row in table_rows(failed_path, "app_settings")}
    still_changed = sum(row["full_name"] == "changed" for row in table_rows(failed_path, "users"))
    assert 0 < still_changed < changed_users
    log = restore_log(data)
    assert log["status"] == "rolled_back"
    assert log["rollback"]["verified"] is True
    assert log["rollback"]["failed_state_file"] == str(failed_path)
    assert log["tables_failed"] == ["users"]
    assert "disk on fire" in log["error"]
    assert log["after_counts"] == {t: n for t, n in counts(before).items()
                                   if t in ("app_settings", "users", "bookings")}
    assert [s["status"] for s in log["steps"]][-2:] == ["failed", "ok"]


def test_a_row_the_server_refuses_is_named_and_the_restore_rolled_back(fresh_stack, db, data,
                                                                       capsys):
    path = make_backup(capsys, data, "--tables", "bookings")
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id <= 100")
    # A rule added since the backup that one backup row breaks.
    db.execute("ALTER TABLE bookings ADD CONSTRAINT booking_42_is_frozen "
               "CHECK (id <> 42 OR notes = 'changed')")
    before = database_state(db)

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path))

    assert code == 8, err
    line = error_line(err)
    assert "bookings: the row with key [42] was refused" in line
    assert "booking_42_is_frozen" in line and "rolled back" in line
    assert_same_state(database_state(db), before)
    log = restore_log(data)
    assert log["status"] == "rolled_back" and log["tables_failed"] == ["bookings"]
    assert log["total_errors"] == 1 and "[42]" in log["error"]


def test_a_statement_timeout_splits_the_batch_and_the_restore_succeeds(fresh_stack, db, data,
                                                                       capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "bookings")
    at_backup = database_state(db)
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id <= 300")
    stack.faults.add(kind="write", table="bookings", times=1, status=500, code="57014",
                     message="canceling statement due to statement timeout")
    stack.requests.clear()

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path))

    assert code == 0, err
    assert "statement timeout" in err and "150 rows per request" in err
    assert_same_state(database_state(db), at_backup)
    assert [r.status for r in write_requests(stack, "bookings")] == [500, 200, 200]


def test_after_a_statement_timeout_every_later_batch_goes_at_the_smaller_size(fresh_stack, db,
                                                                            data, capsys):
    """Batches are read from the spool ahead of the writes: those made before the timeout halved
    the size are sent in halves too, not whole into the next timeout. (With one request in
    flight: with several, the batches already sent when the timeout comes back go whole.)"""
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "bookings")
    at_backup = database_state(db)
    db.execute("UPDATE bookings SET notes = 'changed'")  # 5000 rows: five batches of 1000
    stack.faults.add(kind="write", table="bookings", times=1, status=500, code="57014",
                     message="canceling statement due to statement timeout")
    stack.requests.clear()

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path), "--jobs", "1")

    assert code == 0, err
    assert "500 rows per request" in err
    assert_same_state(database_state(db), at_backup)
    statuses = [r.status for r in write_requests(stack, "bookings")]
    assert statuses[0] == 500 and set(statuses[1:]) == {200}
    # The first batch went again as two halves; the 4000 rows after it in parts of at most 500
    # (a batch being made as the size changed may end in a shorter part): at least 8 requests.
    # Sent whole, the batches made ahead would have taken 1000 rows per request.
    assert len(statuses) >= 1 + 2 + 8, statuses


def test_a_deleted_package_cannot_come_back_through_the_api_and_the_restore_rolls_back(
        fresh_stack, db, data, capsys):
    # A package nothing refers to, in the backup and deleted since.
    db.execute("INSERT INTO packages (id, name, price, duration_days) OVERRIDING SYSTEM VALUE "
               "VALUES (301, 'Short-lived', 99, 3)")
    path = make_backup(capsys, data, "--tables", "app_settings,packages")
    db.execute("DELETE FROM packages WHERE id = 301")
    db.execute("UPDATE packages SET name = 'changed' WHERE id <= 5")
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    before = database_state(db)

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path))

    assert code == 8, err
    line = error_line(err)
    assert "packages.id is GENERATED ALWAYS AS IDENTITY" in line and "(first: [301])" in line
    assert "ALTER TABLE public.packages ALTER COLUMN id SET GENERATED BY DEFAULT;" in line
    assert "rolled back" in line
    assert_same_state(database_state(db), before)


def test_a_trigger_that_rewrites_updated_at_fails_verification_and_names_the_option(
        fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--tables", "app_settings,bookings")
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id <= 10")
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    db.execute("CREATE TRIGGER bookings_updated_at BEFORE UPDATE ON bookings FOR EACH ROW "
               "EXECUTE FUNCTION extensions.moddatetime(updated_at)")
    before = database_state(db, omit=NO_UPDATED_AT)
    rewritten_before = rows_where(db, "bookings", "id <= 10")

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path))

    # The rollback writes the ten bookings back, and the trigger stamps them again: every column
    # but updated_at is as before, and the message says so instead of claiming more.
    assert code == 8, err
    line = error_line(err)
    assert "bookings key [1]: different values in updated_at" in line
    assert "--ignore-columns updated_at" in line
    assert "bookings.updated_at" in line and "10 row(s)" in line
    assert_same_state(database_state(db, omit=NO_UPDATED_AT), before)
    assert set(rows_where(db, "bookings", "id <= 10")).isdisjoint(rewritten_before)
    log = restore_log(data)
    assert log["status"] == "rolled_back"
    assert log["rollback"]["not_verified"] == {"bookings": ["updated_at"]}


def test_a_mismatch_in_one_column_without_a_trigger_is_not_blamed_on_one(fresh_stack, db, data,
                                                                          capsys):
    # A trigger that corrupts notes (a constant, not a time taken during the run): the mismatch
    # is confined to one column, but the evidence says nothing of a trigger that stamps times,
    # so no advice to ignore the column, which would hide the corruption.
    path = make_backup(capsys, data, "--tables", "bookings")
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id <= 10")
    db.execute("CREATE FUNCTION public.garble() RETURNS trigger LANGUAGE plpgsql AS "
               "$$ BEGIN NEW.notes := 'garbled'; RETURN NEW; END $$")
    db.execute("CREATE TRIGGER bookings_garble BEFORE UPDATE ON bookings FOR EACH ROW "
               "EXECUTE FUNCTION public.garble()")
    try:
        code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path))
    finally:
        db.execute("DROP TRIGGER bookings_garble ON bookings")
        db.execute("DROP FUNCTION public.garble()")

    line = error_line(err)
    assert code == 9, err  # the rollback's writes are garbled by the trigger too
    assert "different values in notes" in line
    assert "--ignore-columns" not in line and "trigger" not in line


def test_the_setval_sql_is_quoted_and_does_nothing_without_a_sequence(fresh_stack, db):
    db.execute('CREATE TABLE public."select" ("from" int PRIMARY KEY)')
    db.execute('CREATE TABLE public."Serial Key" ("my id" bigserial PRIMARY KEY, v text)')
    db.execute('INSERT INTO public."select" VALUES (41), (42)')
    db.execute('INSERT INTO public."Serial Key" ("my id", v) VALUES (500, \'a\')')
    live = {"select": {"columns": [{"name": "from", "format": "integer"}]},
            "Serial Key": {"columns": [{"name": "my id", "format": "bigint"}]}}
    plans = {}
    for name, column in (("select", "from"), ("Serial Key", "my id")):
        plans[name] = supabase_backup.TablePlan(name, [column], [column])
        plans[name].outcome.inserted = 2

    statements = supabase_backup.sequence_sql(plans, live)

    assert len(statements) == 2
    for statement in statements:  # each one runs as printed
        db.execute(statement)
    assert db.execute("SELECT nextval(pg_get_serial_sequence('public.\"Serial Key\"', "
                      "'my id'))").fetchone()[0] == 501


def test_a_failure_names_only_its_table_not_one_whose_name_begins_it(fresh_stack, db, data,
                                                                    capsys):
    db.execute('CREATE TABLE public."user" (id int PRIMARY KEY, note text)')
    db.execute("INSERT INTO public.\"user\" VALUES (1, 'a'), (2, 'b')")
    path = make_backup(capsys, data, "--tables", "user,users")
    db.execute("DELETE FROM public.\"user\" WHERE id = 2")
    db.execute("UPDATE users SET full_name = 'changed' WHERE email = 'user1@example.com'")
    fresh_stack.faults.add(kind="write", table="users", status=500, code="XX000",
                           message="disk on fire", times=OUTLASTS_RETRIES)

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path))

    assert code == 8, err
    assert restore_log(data)["tables_failed"] == ["users"]


@pytest.mark.parametrize("how", ["option", "setting"])
def test_ignore_columns_lets_a_restore_with_an_updated_at_trigger_succeed(fresh_stack, db, data,
                                                                          capsys, monkeypatch,
                                                                          how):
    path = make_backup(capsys, data, "--tables", "bookings")
    at_backup = database_state(db, omit=NO_UPDATED_AT)
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id <= 10")
    db.execute("CREATE TRIGGER bookings_updated_at BEFORE UPDATE ON bookings FOR EACH ROW "
               "EXECUTE FUNCTION extensions.moddatetime(updated_at)")
    stamped_by_us = db.execute("SELECT max(updated_at) FROM bookings").fetchone()[0]
    argv = ["restore", "--safe", "--file", str(path)]
    if how == "option":
        argv += ["--ignore-columns", "updated_at"]
    else:
        monkeypatch.setenv("VERIFY_IGNORE_COLUMNS", "updated_at")

    code, _, err = run(capsys, data, *argv)

    assert code == 0, err
    assert_same_state(database_state(db, omit=NO_UPDATED_AT), at_backup)
    # The trigger fired for the ten rows written, and for no other: identical rows are not sent.
    restamped = [i for (i,) in db.execute("SELECT id FROM bookings WHERE updated_at > %s "
                                          "ORDER BY id", [stamped_by_us])]
    assert restamped == list(range(1, 11))


# --- refused before anything is written ---------------------------------------------------------

def add_duplicate_key(document):
    rows = document["tables"]["users"]["rows"]
    rows.append(dict(rows[10]))


def drop_a_key_value(document):
    del document["tables"]["bookings"]["rows"][7]["id"]


def drop_a_column(document):
    del document["tables"]["bookings"]["rows"][9]["notes"]


def empty_app_settings(document):
    document["tables"]["app_settings"]["rows"] = []


def flip_a_byte(path):
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x55
    path.write_bytes(bytes(content))


REFUSED_FILES = {
    "bit flip": (flip_a_byte, [], "damaged"),
    "duplicate key": (lambda p: rewrite_backup(p, add_duplicate_key), [], "appears twice"),
    "row without its key": (lambda p: rewrite_backup(p, drop_a_key_value), [],
                            "bookings: a row has no value for key column id"),
    # Such a row's missing value would be written as NULL, not kept: refused.
    "row without a column": (lambda p: rewrite_backup(p, drop_a_column), [],
                             "bookings: a row lacks column(s) notes"),
    "critical table not in the backup": (None, ["--critical", "users,nope"],
                                         "critical table nope is not in the backup"),
    "critical table from the setting": (None, ["CRITICAL_TABLES=users,reviews"],
                                        "critical table reviews is not in the backup"),
    "critical table empty in the backup": (lambda p: rewrite_backup(p, empty_app_settings),
                                           ["--critical", "users,app_settings"],
                                           "critical table app_settings is empty in the backup"),
}


@pytest.mark.parametrize("case", list(REFUSED_FILES))
def test_a_bad_backup_is_refused_before_any_write(stack, db, data, capsys, monkeypatch, case):
    damage, options, words = REFUSED_FILES[case]
    path = make_backup(capsys, data, "--tables", "app_settings,users,bookings")
    if damage:
        damage(path)
    argv = []
    for option in options:
        if "=" in option:
            monkeypatch.setenv(*option.split("=", 1))
        else:
            argv.append(option)
    before = database_state(db)
    stack.requests.clear()

    code, out, err = run(capsys, data, "restore", "--safe", "--file", str(path), *argv)

    assert code == 7, err
    line = error_line(err)
    assert words in line and "the database was not touched" in line
    assert stack.writes() == 0
    assert_same_state(database_state(db), before)
    for name in files_in(data, "summaries"):
        assert json.loads((data / "summaries" / name).read_text())["status"] == "refused"


@pytest.mark.parametrize("setting", ["CRITICAL_TABLES", "VERIFY_IGNORE_COLUMNS"])
def test_a_malformed_setting_is_refused_before_anything_is_read(stack, data, capsys, monkeypatch,
                                                                 setting):
    path = make_backup(capsys, data, "--tables", "app_settings")
    monkeypatch.setenv(setting, "users,,bookings")
    stack.requests.clear()

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path))

    assert code == 3
    assert setting in error_line(err) and "empty table name" in err
    assert not stack.requests


@pytest.mark.parametrize("change, words", [
    ("ALTER TABLE bookings DROP COLUMN notes", "bookings.notes no longer exists"),
    ("ALTER TABLE users RENAME COLUMN full_name TO display_name",
     "users.full_name no longer exists")])
def test_schema_drift_is_refused_naming_table_and_column(fresh_stack, db, data, capsys, change,
                                                         words):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "users,bookings")
    db.execute("UPDATE bookings SET travel_date = NULL WHERE id <= 10")
    db.execute(change)
    before = database_state(db)
    stack.requests.clear()

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path))

    assert code == 7, err
    line = error_line(err)
    assert words in line and "schema drift" in line and "the database was not touched" in line
    assert stack.writes() == 0
    assert_same_state(database_state(db), before)
    log = restore_log(data)
    assert log["status"] == "refused" and words in log["error"]


# --- the options --------------------------------------------------------------------------------

def test_dry_run_prints_the_plan_and_writes_nothing(fresh_stack, db, data, capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "app_settings,bookings")
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id <= 10")
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    before = database_state(db)
    stack.requests.clear()

    code, out, err = run(capsys, data, "restore", "--safe", "--dry-run", "--file", str(path),
                         "--json")

    assert code == 0, err
    assert stack.writes() == 0
    assert_same_state(database_state(db), before)
    assert files_in(data, "safety_backups") == [] and files_in(data, "summaries") == []
    assert "bookings: 5000 rows now; 0 to insert, 10 to update, 4990 unchanged" in err
    assert "app_settings: 4 rows now; 1 to insert, 0 to update, 4 unchanged" in err
    plan = json.loads(out)
    assert plan["status"] == "dry_run"
    assert plan["plan"]["bookings"] == {"insert": 0, "update": 10, "delete": 0, "unchanged": 4990}


def test_tables_restores_only_the_tables_named(fresh_stack, db, data, capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "app_settings,users,bookings")
    at_backup = database_state(db)
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id <= 10")
    db.execute("UPDATE users SET full_name = 'changed' WHERE email = 'user5@example.com'")
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    before = database_state(db)
    stack.requests.clear()

    code, out, err = run(capsys, data, "restore", "--safe", "--tables", "bookings,app_settings",
                         "--file", str(path), "--json")

    assert code == 0, err
    assert json.loads(out) == restore_log(data)
    assert_same_state(database_state(db),
                      {**at_backup, "users": before["users"]})
    assert {r.table for r in write_requests(stack)} == {"bookings", "app_settings"}
    assert set(restore_log(data)["before_counts"]) == {"bookings", "app_settings"}
    assert len(supabase_backup.check_backup(safety_backup(data))[1]) == 2


def test_without_safe_a_restore_needs_yes_when_not_on_a_terminal(fresh_stack, db, data, capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "app_settings")
    at_backup = database_state(db)
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    before = database_state(db)
    stack.requests.clear()

    code, _, err = run(capsys, data, "restore", "--file", str(path))

    assert code == 3
    assert "WITHOUT --safe" in err
    assert "needs --yes" in error_line(err) and "the database was not touched" in err
    assert not stack.requests, "not even a read"
    assert_same_state(database_state(db), before)
    assert files_in(data, "summaries") == []

    code, _, err = run(capsys, data, "restore", "--yes", "--file", str(path))

    assert code == 0, err
    assert_same_state(database_state(db), at_backup)
    assert files_in(data, "safety_backups") == []
    assert restore_log(data)["status"] == "succeeded"


def test_no_rollback_keeps_a_partial_restore_and_names_the_rollback_command(fresh_stack, db, data,
                                                                            capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "app_settings,bookings")
    at_backup = database_state(db)
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id <= 10")
    before = database_state(db)
    stack.faults.add(kind="write", table="bookings", times=OUTLASTS_RETRIES, status=503,
                     code="XX000", message="injected: disk on fire")

    code, _, err = run(capsys, data, "restore", "--safe", "--no-rollback", "--file", str(path))

    assert code == 11, err
    line = error_line(err)
    assert "--no-rollback" in line
    assert f"python supabase_backup.py rollback {safety_backup(data).name}" in line
    # app_settings was restored and stays so; bookings failed and is as it was.
    assert_same_state(database_state(db), {**before, "app_settings": at_backup["app_settings"]})
    log = restore_log(data)
    assert log["status"] == "failed_kept" and log["tables_failed"] == ["bookings"]
    assert log["tables_restored"]["app_settings"]["inserted"] == 1


def test_when_the_rollback_fails_too_exit_9_names_the_rollback_command(fresh_stack, db, data,
                                                                       capsys):
    stack = fresh_stack
    path = make_backup(capsys, data, "--tables", "app_settings,bookings")
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id <= 10")
    # From now on bookings refuses every write: the restore fails, and its rollback too.
    stack.faults.add(kind="write", table="bookings", status=503, code="XX000",
                     message="injected: disk on fire")

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path))

    assert code == 9, err
    line = error_line(err)
    assert "and so did the automatic rollback" in line and "disk on fire" in line
    assert line.endswith(f"CRITICAL: the database may be partly restored, run now: "
                         f"python supabase_backup.py rollback {safety_backup(data).name}")
    assert run(capsys, data, "check", "--file", str(safety_backup(data)))[0] == 0
    log = restore_log(data)
    assert log["status"] == "rollback_failed" and log["rollback"]["verified"] is False


# --- interruptions and the lock -------------------------------------------------------------------

def test_kill_9_mid_restore_leaves_the_safety_backup_and_an_in_progress_log(
        fresh_stack, data, capsys, tmp_path, slow_restore_of_users):
    stack, path = fresh_stack, slow_restore_of_users
    process = start_restore(stack, data, tmp_path, path)
    with running(process):
        # While it runs, a second restore is refused at once: one run at a time.
        code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)
        assert code == 5
        assert f"pid {process.pid}" in error_line(err) and "wait for it to finish" in err

        kill_9(process)

    assert 1 <= stack.writes("users") < 4, "killed mid-restore"
    safety = safety_backup(data)
    code, out, _ = run(capsys, data, "check", "--file", str(safety))
    assert code == 0 and "intact" in out
    assert all(row["full_name"] == "changed" for row in table_rows(safety, "users"))
    log = restore_log(data)
    assert log["status"] == "in_progress" and log["finished_at"] is None
    assert log["safety_backup_file"] == str(safety)
    assert log["steps"][-1] == {"step": 4, "name": "RESTORE", "status": "running"}


def test_ctrl_c_mid_restore_rolls_back_to_exactly_the_state_before(fresh_stack, db, data,
                                                                   tmp_path,
                                                                   slow_restore_of_users):
    before = database_state(db)
    process = start_restore(fresh_stack, data, tmp_path, slow_restore_of_users)
    try:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    # Ctrl-C is a failure like any other: what was written is rolled back (exit 8).
    assert process.returncode == 8, stderr
    assert "interrupted (Ctrl-C): rolling back" in stderr
    line = error_line(stderr)
    assert "interrupted (Ctrl-C)" in line and "the database is as before" in line
    assert_same_state(database_state(db), before)
    assert restore_log(data)["status"] == "rolled_back"


def test_a_second_ctrl_c_stops_the_rollback_and_names_the_command(fresh_stack, data, tmp_path,
                                                                  slow_restore_of_users):
    process = start_restore(fresh_stack, data, tmp_path, slow_restore_of_users)
    try:
        process.send_signal(signal.SIGINT)
        # Once the rollback has begun (its snapshot of the failed state is announced), again.
        for line in process.stderr:
            if "[ROLLBACK]" in line:
                break
        process.send_signal(signal.SIGINT)
        rest = process.stderr.read()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 130, rest
    line = error_line(rest)
    assert "interrupted" in line and \
        f"run: python supabase_backup.py rollback {safety_backup(data).name}" in line
    log = restore_log(data)
    assert log["status"] == "interrupted" and log["finished_at"] is not None


def test_a_spool_read_error_mid_write_rolls_back_to_exactly_the_state_before(
        fresh_stack, db, data, capsys, monkeypatch):
    """The rows to write are read and parsed a batch ahead, in a thread of their own: an error
    there (here the disk, on the second batch of users) still stops the restore in its place and
    rolls it back."""
    path = make_backup(capsys, data, "--tables", "users")
    db.execute("UPDATE users SET full_name = 'changed' WHERE email ~ '^user1?[0-9]{1,3}@'")
    before = database_state(db)
    real, calls = supabase_backup.parse_batch, []

    def failing(lines, start):
        calls.append(start)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(lines, start)

    monkeypatch.setattr(supabase_backup, "parse_batch", failing)

    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)

    assert code == 8, err
    line = error_line(err)
    assert "Input/output error" in line and "rolled back" in line
    assert_same_state(database_state(db), before)
    log = restore_log(data)
    assert log["status"] == "rolled_back" and log["rollback"]["verified"] is True


def test_in_parallel_hands_out_every_result_in_order_and_stops_its_threads():
    import threading

    def call(n):
        return lambda: n

    assert list(supabase_backup.in_parallel(map(call, range(1000)), 4)) == list(range(1000))

    def broken():
        yield call(1)

        def fail():
            raise OSError("disk")
        yield fail

    seen = []
    with pytest.raises(OSError, match="disk"):
        for item in supabase_backup.in_parallel(broken(), 4):
            seen.append(item)
    assert seen == [1]

    closed = []

    def endless():
        try:
            n = 0
            while True:
                yield call(n)
                n += 1
        finally:
            closed.append(True)

    results = supabase_backup.in_parallel(endless(), 4)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    results.close()
    assert closed == [True]
    assert not any(t.name == "parallel" and t.is_alive() for t in threading.enumerate())


def test_seen_key_tells_rows_apart_exactly_when_row_key_does():
    values = [1, "1", True, 1.0, "[1]", '["1"]', 0, False, "", None, 10**20, "é", [1], {"a": 1}]
    rows = [{"id": v} for v in values] + [{"id": 1, "n": 2}, {"id": "1", "n": 1}]
    for pk in (["id"], ["id", "n"]):
        for a in rows:
            for b in rows:
                same_row_key = (supabase_backup.row_key(a, pk) == supabase_backup.row_key(b, pk))
                same_seen_key = (supabase_backup.seen_key(a, pk) == supabase_backup.seen_key(b, pk))
                assert same_seen_key == same_row_key, (a, b, pk)
                if same_seen_key:
                    assert hash(supabase_backup.seen_key(a, pk)) == \
                        hash(supabase_backup.seen_key(b, pk))


def write_file(path, rows, key=lambda i: i):
    """A backup file of one table `t` (id primary key, body) with the given number of rows."""
    writer = supabase_backup.BackupWriter(path, {"format": supabase_backup.FORMAT_NAME,
                                                 "format_version": supabase_backup.FORMAT_VERSION})
    writer.begin_table("t", {"columns": [{"name": "id"}, {"name": "body"}],
                             "primary_key": ["id"]})
    for start in range(0, rows, 1000):
        writer.write_rows([{"id": key(i), "body": "x" * 40}
                           for i in range(start, min(rows, start + 1000))])
    writer.end_table()
    return writer.finish()


@pytest.mark.parametrize("key", [lambda i: i, lambda i: f"{i:08d}-a"], ids=["int", "text"])
def test_checking_a_file_for_repeated_keys_takes_memory_that_does_not_grow_with_it(tmp_path,
                                                                                  key):
    import tracemalloc

    peaks = {}
    for rows in (5000, 80000):
        path = write_file(tmp_path / f"{rows}.json.gz", rows, key)
        tracemalloc.start()
        try:
            supabase_backup.scan_backup(path)
            peaks[rows] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    # A set of 80,000 keys alone would take some 4 MB more.
    assert peaks[80000] < peaks[5000] * 1.5, peaks


def test_a_key_that_repeats_out_of_order_is_still_found(tmp_path):
    path = write_file(tmp_path / "b.json.gz", 3000, key=lambda i: (2999 - i) if i < 2999 else 5)
    with pytest.raises(supabase_backup.ValidationError, match=r"t: key \[5\] appears twice"):
        supabase_backup.scan_backup(path)
    path = write_file(tmp_path / "c.json.gz", 3000, key=lambda i: 2999 - i)
    assert supabase_backup.scan_backup(path).tables["t"]["row_count"] == 3000


def test_rows_refused_by_the_first_pass_do_not_trouble_the_second(tmp_path):
    """A table whose keys do not keep rising is read again with a set of its keys; rows the
    first pass refused (not an object, no key) are named once, by the first pass. (Such rows
    can only come in a file of the whole-document layout, e.g. re-indented by jq.)"""
    import gzip
    import hashlib

    rows = [{"id": 2, "body": "a"}, {"id": 1, "body": "b"}, [1, 2], "text",
            {"id": None, "body": "c"}, {"id": None, "body": "d"}]
    digest = hashlib.sha256(b"".join(supabase_backup.row_json(r).encode() + b"\n"
                                     for r in rows)).hexdigest()
    path = tmp_path / "b.json.gz"
    path.write_bytes(gzip.compress(json.dumps({
        "format": supabase_backup.FORMAT_NAME, "format_version": supabase_backup.FORMAT_VERSION,
        "tables": {"t": {"columns": [{"name": "id"}, {"name": "body"}], "primary_key": ["id"],
                         "rows": rows, "row_count": len(rows), "sha256": digest}},
        "complete": True}, indent=2).encode()))
    with pytest.raises(supabase_backup.ValidationError) as refused:
        supabase_backup.scan_backup(path)
    message = str(refused.value)
    assert "t: a row is not a JSON object" in message
    assert "t: a row has no value for key column id" in message
    assert "appears twice" not in message


# --- what a restore reads (issue 14) -------------------------------------------------------------

def page_reads(stack, table):
    """The GET requests for rows of a table (pages and ranges; not the HEAD counts)."""
    return [r for r in stack.requests if r.table == table and r.method == "GET"]


@pytest.mark.parametrize("jobs", ["1", "4"])
def test_restore_safe_onto_the_unchanged_table_reads_its_rows_twice_not_three_times(
        stack, db, data, capsys, jobs):
    """The safety backup (step 1) reads the live rows; the plan (step 3) compares the file with
    those rows on disk; the verification (step 5) reads them again, as diff does: two reads of
    the rows, not three, and nothing written."""
    stack.requests.clear()
    path = make_backup(capsys, data, "--tables", "bookings", "--jobs", jobs)
    backup_reads = len(page_reads(stack, "bookings"))
    stack.requests.clear()
    assert run(capsys, data, "diff", "--file", str(path), "--jobs", jobs)[0] == 0
    diff_reads = len(page_reads(stack, "bookings"))
    stack.requests.clear()

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path), "--jobs", jobs)

    assert code == 0, err
    assert len(page_reads(stack, "bookings")) == backup_reads + diff_reads, err
    assert write_requests(stack) == []
    log = restore_log(data)
    assert log["plan"]["bookings"] == {"insert": 0, "update": 0, "delete": 0, "unchanged": 5000}


def test_the_plan_from_the_safety_backup_finds_every_change(fresh_stack, db, data, capsys):
    """Compared with the safety backup instead of the live table, the plan still sees rows
    changed, deleted and added since the backup; the restore brings back exactly the backup's
    rows and leaves the added one."""
    path = make_backup(capsys, data, "--tables", "users,bookings")
    at_backup = database_state(db)
    db.execute("UPDATE bookings SET notes = 'changed' WHERE id % 7 = 0")
    db.execute("DELETE FROM bookings b WHERE id % 11 = 0 AND id % 7 <> 0 AND NOT EXISTS "
               "(SELECT 1 FROM payments p WHERE p.booking_id = b.id) AND NOT EXISTS "
               "(SELECT 1 FROM reviews r WHERE r.booking_id = b.id)")
    db.execute("INSERT INTO bookings (user_id, package_id, status, notes) "
               "SELECT user_id, package_id, status, 'added' FROM bookings LIMIT 1")
    changed = db.execute("SELECT count(*) FROM bookings WHERE id % 7 = 0").fetchone()[0]
    deleted = 5000 - db.execute("SELECT count(*) FROM bookings WHERE id <= 5000").fetchone()[0]
    assert changed and deleted

    code, _, err = run(capsys, data, "restore", "--safe", "--file", str(path))

    assert code == 0, err
    log = restore_log(data)
    assert log["plan"]["bookings"]["update"] == changed
    assert log["plan"]["bookings"]["insert"] == deleted
    assert log["plan"]["users"] == {"insert": 0, "update": 0, "delete": 0, "unchanged": 2000}
    added = db.execute("SELECT count(*) FROM bookings WHERE notes = 'added'").fetchone()[0]
    assert added == 1
    db.execute("DELETE FROM bookings WHERE notes = 'added'")
    assert_same_state(database_state(db), at_backup)
