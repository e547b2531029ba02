"""Auth users (issue 17): `backup --auth` keeps every user the admin API returns, `restore
--safe --auth` creates the users the project lacks before the tables that refer to them, with
the safety net of the tables: checked in the database (auth.users and public.profiles through
psycopg), the backup file and the exit codes."""

import gzip
import json
import threading

import pytest

import supabase_backup
from helpers import (
    DEMO_TABLES, assert_same_state, database_state, error_line, files_in, kill_9, make_backup, restore_log, run, running, safety_backup,
    start_restore, wait_for)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:supabase")

DEMO_USERS = 300
# What a restore can bring back of a user, as auth.users holds it (confirmation as a flag: the
# time becomes the time of the restore, as SAFETY.md says).
USER_FACTS = ("id::text, email, phone, raw_user_meta_data, raw_app_meta_data - 'provider' "
              "- 'providers', role, email_confirmed_at IS NOT NULL, "
              "phone_confirmed_at IS NOT NULL, banned_until IS NOT NULL")


def users(db, where="TRUE"):
    return sorted(tuple(json.dumps(v, sort_keys=True, default=str) for v in row)
                  for row in db.execute(f"SELECT {USER_FACTS} FROM auth.users WHERE {where}"))


def profiles(db):
    return sorted(db.execute("SELECT id::text, display_name, bio FROM public.profiles"))


def file_entry(path, name="auth.users"):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)["tables"].get(name)


def users_of_the_backup_and_live(data, db):
    """(the ids of the users in the one backup, the ids in auth.users)."""
    (name,) = files_in(data, "backups")
    in_file = {u["id"] for u in file_entry(data / "backups" / name)["rows"]}
    return in_file, {str(r[0]) for r in db.execute("SELECT id FROM auth.users")}


@pytest.fixture
def small_pages(monkeypatch):
    """70 users a page, so that a backup of the 300 demo users reads five pages."""
    monkeypatch.setattr(supabase_backup, "AUTH_PAGE_SIZE", 70)


# --- backup ----------------------------------------------------------------------------------


def test_backup_auth_keeps_every_user_of_every_page_without_password_hashes(
        stack, db, data, capsys, small_pages):
    path = make_backup(capsys, data, "--auth", "--tables", "profiles")

    entry = file_entry(path)
    assert entry["kind"] == "auth_users" and entry["row_count"] == DEMO_USERS
    ids = [user["id"] for user in entry["rows"]]
    assert ids == sorted(str(r[0]) for r in db.execute("SELECT id FROM auth.users"))
    pages = [r for r in stack.requests if r.table == "auth.users" and r.method == "GET"]
    # Five pages, read twice: two readings in a row must hold the same users.
    assert len(pages) == 10 and all("per_page=70" in r.query for r in pages)
    text = json.dumps(entry["rows"])
    assert "encrypted_password" not in text and "$2a$" not in text
    user13 = next(u for u in entry["rows"] if u["email"] == "user13@example.com")
    assert user13["banned_until"].startswith("2126-") and user13["user_metadata"]["score"] == 19.5
    code, out, err = run(capsys, data, "check", "--file", path.name)
    assert code == 0, err


def test_the_setting_backup_auth_does_what_the_option_does(stack, data, capsys, monkeypatch):
    monkeypatch.setenv("BACKUP_AUTH", "1")
    path = make_backup(capsys, data, "--tables", "app_settings")
    assert file_entry(path)["row_count"] == DEMO_USERS
    monkeypatch.setenv("BACKUP_AUTH", "sometimes")
    code, _, err = run(capsys, data, "backup", "--tables", "app_settings")
    assert code == 3 and "BACKUP_AUTH is 'sometimes'" in error_line(err)


def test_without_auth_a_backup_has_no_users(stack, data, capsys):
    path = make_backup(capsys, data, "--tables", "profiles")
    assert file_entry(path) is None and file_entry(path, "profiles")["row_count"] == 250


def test_a_public_table_named_auth_users_is_not_taken_for_the_users(stack, db, data, capsys):
    db.execute('CREATE TABLE public."auth.users" (id int PRIMARY KEY, note text)')
    try:
        db.execute('INSERT INTO public."auth.users" VALUES (1, \'a table\')')
        path = make_backup(capsys, data, "--tables", "auth.users")
        entry = file_entry(path)
        assert "kind" not in entry and entry["rows"] == [{"id": 1, "note": "a table"}]
        code, _, err = run(capsys, data, "backup", "--auth", "--tables", "auth.users")
        assert code == 3 and "--exclude auth.users" in error_line(err)
    finally:
        db.execute('DROP TABLE public."auth.users"')


def test_a_connection_dropped_mid_list_is_retried_and_no_user_is_missed(
        stack, db, data, capsys, small_pages, matrix_row):
    row = matrix_row("backup --auth: connection dropped mid-list once (retried)", "backup fault",
                     "retried; every user in the file", 0)
    dropped = stack.faults.add(kind="read", table="auth.users", after=3, times=1,
                               action="drop", when="after")
    code, _, err = run(capsys, data, "backup", "--auth", "--tables", "app_settings")
    row.exited(code)
    row.saw(f"fault fired {dropped.fired}x, retried", dropped.fired == 1 and "retrying" in err)
    in_file, live = users_of_the_backup_and_live(data, db)
    row.saw(f"{len(in_file)} of {len(live)} users in the file", in_file == live)
    assert code == 0, err
    assert row.as_expected, row.observed


def test_a_list_that_keeps_failing_fails_the_backup_with_no_file(
        stack, db, data, capsys, matrix_row):
    row = matrix_row("backup --auth: auth server down persistently", "backup fault",
                     "one error line; no file", 4)
    stack.faults.add(kind="read", table="auth.users", status=503, code="unexpected_failure",
                     message="injected: auth down")
    code, out, err = run(capsys, data, "backup", "--auth", "--tables", "app_settings")
    row.exited(code)
    line = error_line(err)
    row.saw(line, "auth down" in line and "no backup file was written" in line)
    row.saw(f"backups/: {files_in(data, 'backups')}", files_in(data, "backups") == [])
    assert stack.service_role_key not in err
    assert code == 4 and out == ""
    assert row.as_expected, row.observed


# --- restore ---------------------------------------------------------------------------------


def test_restore_onto_emptied_users_brings_back_users_then_profiles_in_one_run(
        fresh_stack, db, data, capsys, small_pages):
    path = make_backup(capsys, data, "--auth", "--tables", "profiles")
    before_users, before_profiles = users(db), profiles(db)
    db.execute("DELETE FROM auth.users")  # the profiles go with them (ON DELETE CASCADE)
    assert profiles(db) == []

    code, _, err = run(capsys, data, "restore", "--safe", "--auth", "--file", path.name)

    assert code == 0, err
    assert users(db) == before_users and profiles(db) == before_profiles
    assert "300 to create" in err and "no password hashes" in err and "MFA factors" in err
    assert err.index("auth.users: 300 users created") < err.index("profiles: 250 inserted")
    logged = restore_log(data)
    assert logged["status"] == "succeeded" and len(logged["auth_users"]["created"]) == 300
    assert file_entry(safety_backup(data))["rows"] == []  # the live users: none before


def test_one_restore_onto_an_emptied_project_brings_back_every_user_and_table(
        fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--auth")  # every table and every user: one backup
    before_state, before_users = database_state(db), users(db)
    # Everything but packages, whose GENERATED ALWAYS key the API cannot insert (SAFETY.md).
    db.execute("TRUNCATE " + ", ".join(t for t in DEMO_TABLES if t != "packages"))
    db.execute("DELETE FROM auth.users")

    code, _, err = run(capsys, data, "restore", "--safe", "--auth", "--file", path.name)

    assert code == 0, err
    assert users(db) == before_users
    assert_same_state(database_state(db), before_state)


def test_restore_without_auth_leaves_the_users_alone_and_says_so(fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--auth", "--tables", "app_settings")
    db.execute("DELETE FROM auth.users WHERE email = 'user299@example.com'")
    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)
    assert code == 0, err
    assert "holds 300 auth users: left alone (add --auth to restore them)" in err
    assert users(db, "email = 'user299@example.com'") == []


def test_a_user_whose_email_another_live_user_holds_is_refused_before_any_write(
        fresh_stack, db, data, capsys, matrix_row):
    row = matrix_row("restore --auth: a file user's email held by another live user",
                     "bad input", "refused before the first write (exit 7), one line naming it", 7)
    path = make_backup(capsys, data, "--auth", "--tables", "profiles")
    db.execute("DELETE FROM auth.users WHERE email = 'user7@example.com'")
    db.execute("INSERT INTO auth.users (instance_id, id, aud, role, email, created_at) VALUES "
               "('00000000-0000-0000-0000-000000000000', gen_random_uuid(), 'authenticated', "
               "'authenticated', 'user7@example.com', now())")
    before = users(db), profiles(db)
    stack = fresh_stack
    stack.requests.clear()

    code, _, err = run(capsys, data, "restore", "--safe", "--auth", "--file", path.name)

    row.exited(code)
    line = error_line(err)
    row.saw(line, "email user7@example.com belongs to live user" in line)
    writes = [r for r in stack.requests if r.method in ("POST", "PUT", "PATCH", "DELETE")]
    row.saw(f"{len(writes)} write request(s)", writes == [])
    row.saw("auth.users and profiles as before", (users(db), profiles(db)) == before)
    assert code == 7
    assert row.as_expected, row.observed


def test_metadata_is_put_back_only_with_update_users(fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--auth", "--tables", "app_settings")
    before = users(db, "email = 'user4@example.com'")
    db.execute("UPDATE auth.users SET raw_user_meta_data = raw_user_meta_data - 'full_name' "
               "|| '{\"added\": 1}' WHERE email = 'user4@example.com'")
    changed = users(db, "email = 'user4@example.com'")

    code, _, err = run(capsys, data, "restore", "--safe", "--auth", "--file", path.name)
    assert code == 0, err
    assert "1 live user(s) differ from the file in metadata: left as they are" in err
    assert users(db, "email = 'user4@example.com'") == changed

    code, _, err = run(capsys, data, "restore", "--safe", "--auth", "--update-users",
                       "--file", path.name)
    assert code == 0, err
    assert users(db, "email = 'user4@example.com'") == before


def test_update_users_without_auth_is_a_usage_error(stack, data, capsys):
    code, _, err = run(capsys, data, "restore", "--safe", "--update-users", "--file", "x")
    assert code == 2 and "add --auth" in err


def test_dry_run_shows_the_users_plan_and_its_limits_and_writes_nothing(
        fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--auth", "--tables", "app_settings")
    db.execute("DELETE FROM auth.users WHERE email LIKE 'user2%'")
    left = users(db)
    code, _, err = run(capsys, data, "restore", "--auth", "--dry-run", "--file", path.name)
    assert code == 0, err
    assert "111 to create" in err and "sign in by magic link or password reset" in err
    assert users(db) == left


def test_a_user_the_api_refuses_to_create_rolls_back_users_and_tables(
        fresh_stack, db, data, capsys, matrix_row):
    row = matrix_row("restore --auth: the auth server refuses the 5th user", "restore fault",
                     "rolled back (exit 8): users it created deleted, profiles as before", 8)
    path = make_backup(capsys, data, "--auth", "--tables", "profiles")
    db.execute("DELETE FROM auth.users WHERE email LIKE 'user1%'")  # 111 users, 61 profiles
    before = users(db), profiles(db)
    refused = fresh_stack.faults.add(kind="write", table="auth.users", after=5, times=1,
                                     status=422, code="validation_failed",
                                     message="injected: refused")

    code, _, err = run(capsys, data, "restore", "--safe", "--auth", "--file", path.name)

    row.exited(code)
    line = error_line(err)
    row.saw(f"refused {refused.fired}x; {line}", refused.fired == 1 and "injected: refused" in
            line and "rolled back" in line)
    row.saw("auth.users and profiles as before", (users(db), profiles(db)) == before)
    assert restore_log(data)["status"] == "rolled_back"
    assert code == 8
    assert row.as_expected, row.observed


def test_kill_9_mid_restore_then_rollback_loses_no_user_nor_row(
        fresh_stack, db, data, capsys, tmp_path, matrix_row):
    row = matrix_row("restore --auth: kill -9 while creating users, then rollback",
                     "restore fault", "rollback: tables as before, every user of the safety "
                     "backup there; users the dead run created named, not deleted", 0)
    stack = fresh_stack
    path = make_backup(capsys, data, "--auth", "--tables", "profiles")
    db.execute("DELETE FROM auth.users WHERE email LIKE 'user1%'")
    db.execute("UPDATE public.profiles SET bio = 'changed'")
    before_users, before_profiles = users(db), profiles(db)
    slow = stack.faults.add(kind="write", table="auth.users", action="latency", delay=0.3)
    with running(start_restore(stack, data, tmp_path, path, ["restore", "--safe", "--auth",
                                                             "--file", path.name],
                               table="auth.users")) as process:
        kill_9(process)
    wait_for(lambda: stack.writes("auth.users") == slow.seen, what="the last create's answer")
    stack.faults.clear()
    created = len(users(db)) - len(before_users)
    assert 1 <= created < 111, "killed while creating users"
    safety = safety_backup(data)

    code, _, err = run(capsys, data, "rollback", safety.name)

    row.exited(code)
    row.saw("profiles as before", profiles(db) == before_profiles)
    kept = set(before_users) <= set(users(db))
    row.saw("every user of the safety backup is there", kept)
    row.saw(f"{created} user(s) the dead run created named", f"{created} live user(s) are not "
            f"in {safety.name}" in err and "never deletes users" in err)
    assert code == 0, err
    assert row.as_expected, row.observed


def test_rollback_brings_back_users_deleted_since_and_deletes_none(fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--auth", "--tables", "profiles")
    db.execute("DELETE FROM auth.users WHERE email = 'user298@example.com'")
    code, _, err = run(capsys, data, "restore", "--safe", "--auth", "--file", path.name)
    assert code == 0, err
    before = users(db)
    safety = safety_backup(data)  # 299 users: the restore's own safety backup
    db.execute("DELETE FROM auth.users WHERE email = 'user5@example.com'")
    db.execute("UPDATE auth.users SET raw_app_meta_data = raw_app_meta_data || '{\"tier\": 9}' "
               "WHERE email = 'user6@example.com'")

    code, _, err = run(capsys, data, "rollback", "--yes", safety.name)

    assert code == 0, err
    # user298, which the restore created, is not in the safety backup: named, not deleted.
    assert users(db) == before
    assert "1 live user(s) are not in" in err and "never deletes users" in err


def test_auth_users_named_in_tables_is_pointed_to_auth(stack, data, capsys):
    path = make_backup(capsys, data, "--auth", "--tables", "app_settings")
    code, _, err = run(capsys, data, "restore", "--safe", "--tables", "auth.users",
                       "--file", path.name)
    assert code == 7 and "restore it with --auth" in error_line(err)
    code, _, err = run(capsys, data, "diff", "--file", path.name, "--tables", "auth.users")
    assert code == 7 and "diff compares tables" in error_line(err)
    code, out, err = run(capsys, data, "diff", "--file", path.name)
    assert code == 0, err
    code, out, err = run(capsys, data, "list")
    assert code == 0 and path.name in out


def test_a_user_signing_up_mid_list_makes_the_list_read_again_and_complete(
        fresh_stack, db, data, capsys, small_pages, matrix_row):
    row = matrix_row("backup --auth: a user signs up between two pages", "backup fault",
                     "the shifted list is read again; every user in the file", 0)
    stack = fresh_stack
    stack.faults.add(kind="read", table="auth.users", after=2, times=1, action="latency",
                     delay=0.5)

    def sign_up():  # while the second page is on its way: every later page shifts by one
        wait_for(lambda: sum(r.table == "auth.users" for r in stack.requests) >= 1,
                 what="the first page")
        db.execute("INSERT INTO auth.users (instance_id, id, aud, role, email, created_at) "
                   "VALUES ('00000000-0000-0000-0000-000000000000', gen_random_uuid(), "
                   "'authenticated', 'authenticated', 'late@example.com', now())")

    signer = threading.Thread(target=sign_up)
    signer.start()
    try:
        code, _, err = run(capsys, data, "backup", "--auth", "--tables", "app_settings")
    finally:
        signer.join()
    row.exited(code)
    row.saw("read again", "reading it again" in err)
    in_file, live = users_of_the_backup_and_live(data, db)
    row.saw(f"{len(in_file)} users in the file, {len(live)} live", in_file == live)
    assert code == 0, err
    assert row.as_expected, row.observed


def test_an_anonymous_user_cannot_come_back_and_the_last_line_says_so(
        fresh_stack, db, data, capsys):
    db.execute("INSERT INTO auth.users (instance_id, id, aud, role, created_at, is_anonymous) "
               "VALUES ('00000000-0000-0000-0000-000000000000', gen_random_uuid(), "
               "'authenticated', 'authenticated', now(), true)")
    path = make_backup(capsys, data, "--auth", "--tables", "app_settings")
    db.execute("DELETE FROM auth.users WHERE is_anonymous OR email = 'user9@example.com'")

    code, _, err = run(capsys, data, "restore", "--safe", "--auth", "--file", path.name)

    assert code == 13, err
    assert "1 anonymous user(s) of the file cannot be created" in err
    last = err.splitlines()[-1]
    assert "NOT restored" in last and "auth.users (1 anonymous user(s)" in last
    assert len(users(db, "email = 'user9@example.com'")) == 1
    assert users(db, "is_anonymous") == []
