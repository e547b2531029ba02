"""backup --storage, check and retention of Storage objects, against the stand-in Storage API
(tests/local_storage.py) through the real supabase client's HTTP session.

The first backup of the demo's ~2,900 objects (76 MiB) is made once per session
(`storage_seed`); a test that needs a backup to build on gets a copy of that data folder
(hard links: objects are never changed in place), so that its own backup is the second night's.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

import supabase_backup
from helpers import (DEMO_TABLES, assert_same_state, database_state, error_line, files_in, run,
                     wait_for)

ALL_STORAGE = "SELECT bucket_id, name FROM storage.objects"


@pytest.fixture(scope="session")
def storage_seed(local_stack, tmp_path_factory):
    """A data folder holding one complete `backup --storage --tables app_settings` of the
    demo, made once; returns (data folder, its exit code, its stderr)."""
    if local_stack.dirty:
        local_stack.reset()
        local_stack.dirty = False
    folder = tmp_path_factory.mktemp("storage-seed") / "data"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUPABASE_URL", local_stack.url)
        mp.setenv("SUPABASE_SERVICE_ROLE_KEY", local_stack.service_role_key)
        mp.delenv("BACKUP_STORAGE", raising=False)
        local_stack.requests.clear()
        code = supabase_backup.main(["--quiet", "--data-dir", str(folder), "backup", "--storage",
                                     "--tables", "app_settings"])
        downloads = sum(1 for r in local_stack.requests if r.table == "storage.download")
    return folder, code, downloads


def seeded(data, storage_seed):
    """The seed's backups/ (file and objects, hard-linked) in this test's data folder; returns
    the seed backup's path there."""
    shutil.copytree(storage_seed[0] / "backups", data / "backups", copy_function=os.link)
    (name,) = [n for n in files_in(data, "backups") if n.startswith("supabase_backup_")]
    return data / "backups" / name


def manifest(path):
    """The Storage entries of a backup file, read as a user's script would: (buckets, objects)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        tables = json.load(f)["tables"]
    assert tables["storage.buckets"]["kind"] == "storage_buckets"
    assert tables["storage.objects"]["kind"] == "storage_objects"
    return tables["storage.buckets"]["rows"], tables["storage.objects"]["rows"]


def new_backup(capsys, data, *argv):
    before = set(files_in(data, "backups"))
    code, out, err = run(capsys, data, "backup", "--storage", "--tables", "app_settings", *argv)
    assert code == 0, err
    (name,) = set(files_in(data, "backups")) - before
    return data / "backups" / name, err


def downloads(stack):
    return sum(1 for r in stack.requests if r.table == "storage.download")


def test_first_backup_has_every_bucket_and_object_with_its_bytes(storage_seed, stack, db):
    folder, code, downloaded = storage_seed
    assert code == 0
    (name,) = [n for n in os.listdir(folder / "backups") if n.startswith("supabase_backup_")]
    buckets, objects = manifest(folder / "backups" / name)
    assert buckets == [
        {"id": "avatars", "name": "avatars", "public": True, "file_size_limit": 1048576,
         "allowed_mime_types": ["image/*"]},
        {"id": "documents", "name": "documents", "public": False, "file_size_limit": None,
         "allowed_mime_types": None},
        {"id": "media", "name": "media", "public": False, "file_size_limit": 104857600,
         "allowed_mime_types": None}]
    live = {(b, n): (meta, user_meta) for b, n, meta, user_meta in db.execute(
        "SELECT bucket_id, name, metadata, user_metadata FROM storage.objects")}
    assert sorted((o["bucket"], o["name"]) for o in objects) == sorted(live)
    assert downloaded == len(live) > 2500
    store = folder / "backups" / "objects"
    for row in objects:
        meta, user_meta = live[(row["bucket"], row["name"])]
        data = stack.storage.object_bytes(row["bucket"], row["name"])
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert (store / row["sha256"][:2] / row["sha256"]).stat().st_size == len(data)
        assert (row["size"], row["content_type"], row["cache_control"], row["user_metadata"]) \
            == (len(data), meta["mimetype"], meta["cacheControl"], user_meta)
    big = [o for o in objects if o["size"] > 50 * 1024 * 1024]
    assert [o["name"] for o in big] == ["videos/big/launch.mp4"]
    assert not [n for n in os.listdir(store) if n.startswith(".partial-")]


def test_second_night_lists_only_and_downloads_nothing(storage_seed, stack, data, capsys):
    seed = seeded(data, storage_seed)
    path, err = new_backup(capsys, data)
    assert downloads(stack) == 0
    assert {r.table for r in stack.requests if r.table and r.table.startswith("storage.")} == \
        {"storage.bucket", "storage.list"}
    assert manifest(path) == manifest(seed)
    assert "0 downloaded" in err


def test_a_changed_object_is_downloaded_again_and_the_old_bytes_stay(
        storage_seed, fresh_stack, data, capsys, client):
    seed = seeded(data, storage_seed)
    client.storage.from_("documents").upload("Résumé final.pdf", b"new text", {
        "upsert": "true", "content-type": "application/pdf", "metadata": {"v": 2}})
    path, _ = new_backup(capsys, data)
    assert downloads(fresh_stack) == 1
    old = {(o["bucket"], o["name"]): o for o in manifest(seed)[1]}
    new = {(o["bucket"], o["name"]): o for o in manifest(path)[1]}
    changed = [key for key in new if new[key] != old.get(key)]
    assert changed == [("documents", "Résumé final.pdf")]
    row = new[changed[0]]
    assert row["sha256"] == hashlib.sha256(b"new text").hexdigest()
    assert row["user_metadata"] == {"v": 2}
    code, out, err = run(capsys, data, "check", "--file", seed.name)
    assert code == 0, err
    assert "Storage: 2895 objects" in out or "Storage:" in out


def test_check_finds_a_damaged_and_a_missing_object(storage_seed, data, capsys):
    seed = seeded(data, storage_seed)
    _, objects = manifest(seed)
    store = data / "backups" / "objects"
    damaged = store / objects[0]["sha256"][:2] / objects[0]["sha256"]
    content = bytearray(damaged.read_bytes())
    damaged.unlink()  # a hard link to the seed's: replaced, not changed in place
    content[0] ^= 0xFF
    damaged.write_bytes(bytes(content))
    code, _, err = run(capsys, data, "check", "--file", seed.name)
    assert code == supabase_backup.EXIT_INVALID_BACKUP
    line = error_line(err)
    assert "1 Storage object(s) cannot be restored" in line and "damaged" in line
    missing = store / objects[1]["sha256"][:2] / objects[1]["sha256"]
    missing.unlink()
    code, _, err = run(capsys, data, "check", "--file", seed.name)
    assert code == supabase_backup.EXIT_INVALID_BACKUP
    assert "2 Storage object(s)" in error_line(err) and "missing" in error_line(err)


def test_retention_deletes_only_objects_no_kept_backup_refers_to(
        storage_seed, fresh_stack, data, capsys, client):
    seed = seeded(data, storage_seed)
    old_sha = {o["name"]: o["sha256"] for o in manifest(seed)[1]}["empty.txt"]
    client.storage.from_("documents").upload("empty.txt", b"not empty any more", {
        "upsert": "true", "content-type": "text/plain"})
    path, _ = new_backup(capsys, data, "--keep", "1")
    assert not seed.exists()
    store = data / "backups" / "objects"
    kept = {o["sha256"] for o in manifest(path)[1]}
    on_disk = {p.name for p in store.glob("??/*")}
    assert on_disk == kept
    assert old_sha not in on_disk
    code, _, err = run(capsys, data, "check", "--file", path.name)
    assert code == 0, err


def test_a_download_cut_mid_way_is_tried_again(storage_seed, fresh_stack, data, capsys, client):
    seeded(data, storage_seed)
    content = os.urandom(300_000)
    client.storage.from_("media").upload("clips/new.bin", content, {
        "content-type": "application/octet-stream"})
    fresh_stack.faults.add(kind="read", table="storage.download", action="drop", when="after",
                           times=1)
    path, err = new_backup(capsys, data)
    row = {o["name"]: o for o in manifest(path)[1]}["clips/new.bin"]
    assert row["sha256"] == hashlib.sha256(content).hexdigest()
    assert downloads(fresh_stack) == 2
    assert not [p for p in (data / "backups" / "objects").iterdir()
                if p.name.startswith(".partial-")]


def test_a_download_that_keeps_failing_writes_no_backup(
        storage_seed, fresh_stack, data, capsys, client, matrix_row):
    row = matrix_row("Storage download cut off mid-way on every attempt", "backup fault",
                     "no backup file, no partial object left, one line", 4)
    seed = seeded(data, storage_seed)
    client.storage.from_("media").upload("clips/new.bin", os.urandom(300_000), {
        "content-type": "application/octet-stream"})
    fresh_stack.faults.add(kind="read", table="storage.download", action="drop", when="after")
    code, _, err = run(capsys, data, "backup", "--storage", "--tables", "app_settings")
    row.exited(code)
    row.saw("only the earlier backup in backups/",
            [n for n in files_in(data, "backups") if n != "objects"] == [seed.name])
    row.saw("no partial object", not [p for p in (data / "backups" / "objects").iterdir()
                                       if p.name.startswith(".partial-")])
    row.saw("one error line naming the object", "media/clips/new.bin" in error_line(err))
    assert row.as_expected, row.observed


def test_a_bucket_deleted_mid_backup_fails_the_backup(
        storage_seed, fresh_stack, data, capsys, db, matrix_row):
    row = matrix_row("Storage bucket deleted during the backup", "backup fault",
                     "no backup file written; the message says to run again", 6)
    seed = seeded(data, storage_seed)
    fresh_stack.faults.add(kind="any", table="storage.list", action="latency", delay=0.02)

    def delete_media():
        wait_for(lambda: any(r.table == "storage.list" for r in fresh_stack.requests),
                 what="the first listing")
        db.execute("DELETE FROM storage.objects WHERE bucket_id = 'media'")
        db.execute("DELETE FROM storage.buckets WHERE id = 'media'")

    deleter = threading.Thread(target=delete_media)
    deleter.start()
    try:
        code, _, err = run(capsys, data, "backup", "--storage", "--tables", "app_settings")
    finally:
        deleter.join()
    row.exited(code)
    line = error_line(err)
    row.saw("the line names the bucket and says to run again",
            "media" in line and "run the backup again" in line)
    row.saw("no new backup file",
            [n for n in files_in(data, "backups") if n != "objects"] == [seed.name])
    assert row.as_expected, row.observed


@pytest.mark.parametrize("name", ["with space/and  more .txt", "ünï/cödé ✓.txt",
                                  "a/../b.txt", "/leading/slash.txt", "dots/./in/./it"])
def test_odd_object_names_are_backed_up_exactly(storage_seed, fresh_stack, data, capsys, name,
                                                matrix_row):
    row = matrix_row(f"Storage object named {name!r}", "bad input",
                     "backed up under its exact name with its exact bytes", 0)
    seeded(data, storage_seed)
    content = name.encode() * 3
    fresh_stack.storage.put_object("documents", name, content)
    code, _, err = run(capsys, data, "backup", "--storage", "--tables", "app_settings")
    row.exited(code)
    path = max((data / "backups").glob("supabase_backup_*"))
    rows = {o["name"]: o for o in manifest(path)[1] if o["bucket"] == "documents"}
    row.saw("in the manifest with its SHA-256",
            name in rows and rows[name]["sha256"] == hashlib.sha256(content).hexdigest())
    assert row.as_expected, (row.observed, err)


def test_storage_with_encryption_or_offsite_is_refused_in_one_line(data, capsys, matrix_row):
    row = matrix_row("backup --storage --encrypt-to", "configuration",
                     "refused in one line before any request; nothing written", 3)
    code, _, err = run(capsys, data, "backup", "--storage", "--encrypt-to",
                       "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p")
    row.exited(code)
    row.saw("one line saying why", "--storage cannot be combined with --encrypt-to" in
            error_line(err, alone=True))
    row.saw("no backup", not [n for n in files_in(data, "backups") if n.endswith(".age")])
    assert row.as_expected, row.observed


def test_a_bad_backup_storage_setting_is_refused(data, capsys, monkeypatch):
    monkeypatch.setenv("BACKUP_STORAGE", "maybe")
    code, _, err = run(capsys, data, "backup")
    assert code == supabase_backup.EXIT_CONFIG
    assert "BACKUP_STORAGE is 'maybe'" in error_line(err, alone=True)


def test_the_setting_turns_storage_on(storage_seed, stack, data, capsys, monkeypatch):
    seeded(data, storage_seed)
    monkeypatch.setenv("BACKUP_STORAGE", "1")
    code, _, err = run(capsys, data, "backup", "--tables", "app_settings")
    assert code == 0, err
    path = max((data / "backups").glob("supabase_backup_*"))
    assert len(manifest(path)[1]) > 2500


# --- restore --safe --storage, rollback ----------------------------------------------------------

def storage_state(db):
    """Storage as the database holds it: every bucket's settings and every object's content
    (ETag, the MD5 of its bytes), size, type, cache control and user metadata."""
    return {"storage.buckets": sorted(str(row) for row in db.execute(
                "SELECT id, public, file_size_limit, allowed_mime_types FROM storage.buckets")),
            "storage.objects": sorted(str(row) for row in db.execute(
                "SELECT bucket_id, name, metadata->>'eTag', metadata->>'size', "
                "metadata->>'mimetype', metadata->>'cacheControl', user_metadata::text "
                "FROM storage.objects"))}


def damage_storage(client):
    """A bad day: an object overwritten, one deleted, one added, a bucket's settings changed."""
    docs = client.storage.from_("documents")
    docs.upload("empty.txt", b"changed", {"upsert": "true", "content-type": "text/plain"})
    docs.remove(["Résumé final.pdf"])
    docs.upload("added/since.txt", b"added since the backup", {"content-type": "text/plain"})
    client.storage.update_bucket("avatars", {"public": False, "file_size_limit": 1048576,
                                             "allowed_mime_types": ["image/*"]})


def uploads(stack):
    return sum(1 for r in stack.requests if r.table == "storage.upload")


def test_restore_brings_objects_back_and_leaves_new_ones(storage_seed, fresh_stack, data, db,
                                                        capsys, client):
    seed = seeded(data, storage_seed)
    backed_up = storage_state(db)
    damage_storage(client)
    added = db.execute("SELECT metadata FROM storage.objects WHERE name = 'added/since.txt'"
                       ).fetchone()
    fresh_stack.requests.clear()
    code, _, err = run(capsys, data, "restore", "--safe", "--storage", "--file", seed.name)
    assert code == 0, err
    now = storage_state(db)
    added_row = [r for r in now["storage.objects"] if "'added/since.txt'" in r]
    assert len(added_row) == 1 and added  # left alone: a restore never deletes
    now["storage.objects"].remove(added_row[0])
    assert now == backed_up
    assert fresh_stack.storage.object_bytes("documents", "empty.txt") == b""
    assert uploads(fresh_stack) == 2  # only the missing and the differing object
    log = json.loads(next((data / "summaries").glob("restore_log_*")).read_text())
    assert log["status"] == "succeeded"
    assert log["storage"] == {"buckets_created": 0, "buckets_updated": 1, "objects_uploaded": 1,
                              "objects_overwritten": 1, "objects_deleted": 0}
    assert "Storage: 1 object(s) uploaded, 1 overwritten" in err.splitlines()[-1]


def test_rollback_returns_the_buckets_to_exactly_the_saved_state(
        storage_seed, fresh_stack, data, db, capsys, client):
    seed = seeded(data, storage_seed)
    damage_storage(client)
    before_restore = storage_state(db)
    code, _, err = run(capsys, data, "restore", "--safe", "--storage", "--file", seed.name)
    assert code == 0, err
    (safety,) = [n for n in files_in(data, "safety_backups") if n.startswith("safety_backup_")]
    code, _, err = run(capsys, data, "rollback", "--yes", safety)
    assert code == 0, err
    assert storage_state(db) == before_restore
    assert fresh_stack.storage.object_bytes("documents", "empty.txt") == b"changed"


def test_dry_run_shows_the_plan_and_writes_nothing(storage_seed, fresh_stack, data, db, capsys,
                                                   client):
    seed = seeded(data, storage_seed)
    damage_storage(client)
    before = storage_state(db)
    fresh_stack.requests.clear()
    code, out, err = run(capsys, data, "restore", "--safe", "--storage", "--dry-run", "--json",
                         "--file", seed.name)
    assert code == 0, err
    plan = json.loads(out)["storage_plan"]
    assert (plan["objects_to_upload"], plan["bytes_to_upload"], plan["objects_to_overwrite"],
            plan["buckets_to_update"]) == (1, 3100, 1, ["avatars"])
    assert storage_state(db) == before and uploads(fresh_stack) == 0
    assert "Storage: 1 object(s) to upload (3.0 KiB), 1 to overwrite" in err


def test_without_the_flag_storage_is_left_alone_in_one_line(storage_seed, fresh_stack, data, db,
                                                            capsys, client):
    seed = seeded(data, storage_seed)
    damage_storage(client)
    before = storage_state(db)
    code, _, err = run(capsys, data, "restore", "--safe", "--file", seed.name)
    assert code == 0, err
    assert storage_state(db) == before
    assert [line for line in err.splitlines() if "Storage" in line] == [
        "the file's Storage buckets and objects are left alone (restore --storage restores "
        "them)"]


def test_restore_storage_of_a_file_without_it_is_refused(data, capsys, matrix_row):
    row = matrix_row("restore --storage of a backup made without --storage", "bad input",
                     "refused in one line, nothing written", 7)
    path = make_plain_backup(capsys, data)
    code, _, err = run(capsys, data, "restore", "--safe", "--storage", "--file", path.name)
    row.exited(code)
    row.saw("the line says the file has no Storage", "holds no Storage" in error_line(err))
    assert row.as_expected, row.observed


def make_plain_backup(capsys, data):
    code, _, err = run(capsys, data, "backup", "--tables", "app_settings")
    assert code == 0, err
    return max((data / "backups").glob("supabase_backup_*"))


def test_an_upload_refused_rolls_storage_back(storage_seed, fresh_stack, data, db, capsys,
                                              client, matrix_row):
    row = matrix_row("Storage refuses an upload mid-restore", "restore fault",
                     "rolled back: created objects deleted, overwritten ones put back", 8)
    seed = seeded(data, storage_seed)
    damage_storage(client)
    before = storage_state(db)
    fresh_stack.faults.add(kind="write", table="storage.upload", after=2, times=1, status=400,
                           code="InvalidRequest", message="refused by the test")
    code, _, err = run(capsys, data, "restore", "--safe", "--storage", "--file", seed.name)
    row.exited(code)
    row.saw("the line names the refused object", "refused by the test" in error_line(err))
    row.compare(storage_state(db), before, "Storage exactly as before the restore")
    assert row.as_expected, row.observed


def test_damaged_object_in_the_backup_is_refused_before_writing(
        storage_seed, fresh_stack, data, db, capsys, client, matrix_row):
    row = matrix_row("Storage object of the backup damaged on disk", "bad input",
                     "refused at validation, nothing written", 7)
    seed = seeded(data, storage_seed)
    damage_storage(client)
    before = storage_state(db)
    _, objects = manifest(seed)
    target = data / "backups" / "objects" / objects[5]["sha256"][:2] / objects[5]["sha256"]
    target.unlink()
    target.write_bytes(b"not the object")
    code, _, err = run(capsys, data, "restore", "--safe", "--storage", "--file", seed.name)
    row.exited(code)
    row.saw("the line says it is damaged", "damaged" in error_line(err))
    row.compare(storage_state(db), before, "Storage untouched")
    assert row.as_expected, row.observed


def test_kill_9_mid_restore_then_rollback(storage_seed, fresh_stack, data, db, tmp_path,
                                          client, matrix_row, capsys):
    import subprocess
    import sys

    from helpers import REPO_ROOT, SETTINGS, kill_9, running
    row = matrix_row("kill -9 during a Storage restore, then rollback", "restore fault",
                     "rollback returns Storage to exactly the state before", 0)
    seed = seeded(data, storage_seed)
    damage_storage(client)
    client.storage.from_("media").remove(["clips/0/clip-1.bin", "clips/0/clip-2.bin"])
    before = storage_state(db)
    fresh_stack.requests.clear()
    fresh_stack.faults.add(kind="write", table="storage.upload", action="latency", delay=0.5)
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(REPO_ROOT / "supabase_backup.py", app)
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(SUPABASE_URL=fresh_stack.url, SUPABASE_SERVICE_ROLE_KEY=fresh_stack.service_role_key,
               SUPABASE_BACKUP_DIR=str(data))
    process = subprocess.Popen([sys.executable, str(app / "supabase_backup.py"), "restore",
                                "--safe", "--storage", "--file", seed.name], cwd=tmp_path,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with running(process):
        wait_for(lambda: uploads(fresh_stack) >= 2, what="the second upload")
        kill_9(process)
    fresh_stack.faults.clear()
    row.saw("the restore was cut off after writing", storage_state(db) != before)
    (safety,) = [n for n in files_in(data, "safety_backups") if n.startswith("safety_backup_")]
    code, _, err = run(capsys, data, "rollback", "--yes", safety)
    row.exited(code)
    row.compare(storage_state(db), before, "Storage exactly as before the restore")
    assert row.as_expected, (row.observed, err)


ODD_NAMES = ["with space/and  more .txt", "ünï/cödé ✓.txt", "a/../b.txt", "/leading/slash.txt",
             "dots/./in/./it", "100%/25%20.txt", "q?/h#sh.txt"]


def test_odd_names_come_back_exactly(storage_seed, fresh_stack, data, db, capsys, matrix_row):
    row = matrix_row("Storage objects with spaces, unicode, '..', '.', leading '/', %, ?, # in "
                     "their names, deleted, then restored", "bad input",
                     "backed up and restored under their exact names, bytes verified", 0)
    seeded(data, storage_seed)
    for name in ODD_NAMES:
        fresh_stack.storage.put_object("documents", name, name.encode() * 2)
    backed_up = storage_state(db)
    path, _ = new_backup(capsys, data)
    db.execute("DELETE FROM storage.objects WHERE name = ANY(%s)", [ODD_NAMES])
    code, _, err = run(capsys, data, "restore", "--safe", "--storage", "--file", path.name)
    row.exited(code)
    restored = {name: fresh_stack.storage.object_bytes("documents", name) for name in ODD_NAMES}
    row.saw("every name back with its bytes",
            restored == {name: name.encode() * 2 for name in ODD_NAMES})
    row.compare(storage_state(db), backed_up, "Storage exactly as backed up")
    assert row.as_expected, (row.observed, err)


def test_the_storage_benchmark_writes_its_report(tmp_path):
    """bench/storage.py once (--repeat 1), so that it never rots: it completes, and its report
    holds every figure; nothing is asserted about speed, except what the second night asks for
    (no download at all)."""
    import subprocess
    import sys

    from helpers import REPO_ROOT
    out = tmp_path / "RESULTS-storage.md"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "storage.py"), "--repeat",
                           "1", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    for label in ("| first backup |", "| bare loop |", "| second night |", "## Machine",
                  "python bench/storage.py --repeat 1", "Throughput, first backup / bare"):
        assert label in report, label
    assert "Second night, nothing changed: downloads [0]" in report


def test_every_page_of_every_folder_is_read(storage_seed, stack, data, capsys, monkeypatch):
    """With pages of 7 entries every folder of the demo takes several pages: the manifest is
    still every object, once."""
    seed = seeded(data, storage_seed)
    monkeypatch.setattr(supabase_backup, "LIST_PAGE_SIZE", 7)
    path, _ = new_backup(capsys, data)
    assert manifest(path) == manifest(seed)
    lists = sum(1 for r in stack.requests if r.table == "storage.list")
    assert lists > 2895 / 7


def test_list_and_diff_count_tables_only(storage_seed, stack, data, capsys):
    seed = seeded(data, storage_seed)
    code, out, err = run(capsys, data, "list", "--json")
    assert code == 0, err
    (entry,) = json.loads(out)
    assert (entry["tables"], entry["rows"]) == (1, 5)
    code, _, err = run(capsys, data, "diff", "--file", seed.name)
    assert code == 0, err


def test_cleanup_safety_deletes_only_objects_no_safety_backup_refers_to(
        storage_seed, fresh_stack, data, capsys, client):
    seed = seeded(data, storage_seed)
    damage_storage(client)  # empty.txt now holds b"changed": only the first safety backup has it
    for _ in range(2):
        code, _, err = run(capsys, data, "restore", "--safe", "--storage", "--file", seed.name)
        assert code == 0, err
    first, newest = sorted(n for n in files_in(data, "safety_backups")
                           if n.startswith("safety_backup_"))
    old = "safety_backup_20200101_000000.json.gz"
    os.rename(data / "safety_backups" / first, data / "safety_backups" / old)
    for log_name in files_in(data, "summaries"):
        log_path = data / "summaries" / log_name
        log_path.write_text(log_path.read_text().replace(first, old))
    store = data / "safety_backups" / "objects"
    changed = hashlib.sha256(b"changed").hexdigest()
    assert (store / changed[:2] / changed).exists()
    code, out, err = run(capsys, data, "cleanup-safety")
    assert code == 0, err
    assert f"deleted {old}" in out
    assert not (store / changed[:2] / changed).exists()
    kept = {o["sha256"] for o in manifest(data / "safety_backups" / newest)[1]}
    assert {p.name for p in store.glob("??/*")} == kept
    code, _, err = run(capsys, data, "check", "--file", newest)
    assert code == 0, err


def test_an_object_deleted_before_its_download_is_left_out_with_a_warning(
        storage_seed, fresh_stack, data, capsys, client, db):
    seeded(data, storage_seed)
    media = client.storage.from_("media")
    media.upload("clips/new-1.bin", b"one", {"content-type": "application/octet-stream"})
    media.upload("clips/new-2.bin", b"two", {"content-type": "application/octet-stream"})
    fresh_stack.requests.clear()
    fresh_stack.faults.add(kind="read", table="storage.download", action="latency", delay=0.3)

    def delete_the_second():
        wait_for(lambda: downloads(fresh_stack) >= 1, what="the first download")
        db.execute("DELETE FROM storage.objects WHERE name = 'clips/new-2.bin'")

    deleter = threading.Thread(target=delete_the_second)
    deleter.start()
    try:
        path, err = new_backup(capsys, data)
    finally:
        deleter.join()
    names = {o["name"] for o in manifest(path)[1] if o["bucket"] == "media"}
    assert "clips/new-1.bin" in names and "clips/new-2.bin" not in names
    assert "Storage: media/clips/new-2.bin was deleted during the backup; it is not in this " \
           "backup" in err


def test_restore_onto_emptied_storage_brings_everything_back(storage_seed, fresh_stack, data, db,
                                                            capsys):
    """Every bucket and object deleted (the 52 MiB one included), then `restore --safe
    --storage`: Storage exactly as backed up, every object's bytes compared."""
    seed = seeded(data, storage_seed)
    backed_up = storage_state(db)
    db.execute("DELETE FROM storage.objects")
    db.execute("DELETE FROM storage.buckets")
    code, _, err = run(capsys, data, "restore", "--safe", "--storage", "--file", seed.name)
    assert code == 0, err
    assert storage_state(db) == backed_up
    for row in manifest(seed)[1]:
        data_now = fresh_stack.storage.object_bytes(row["bucket"], row["name"])
        assert hashlib.sha256(data_now).hexdigest() == row["sha256"], row["name"]
    assert "Storage: 2895 object(s) uploaded, 0 overwritten, 0 deleted, 3 bucket(s) created" \
        in err.splitlines()[-1]


OVERLAPPING = ["Photos/a.txt", "photos/a.txt", "photos/b.txt", "Photos/2024/x.txt",
               "photos/2024/y.txt", "a_b/1.txt", "aXb/2.txt", "50%/c.txt", "50abc/d.txt"]


def test_folders_storage_lists_into_each_other_are_told_apart(storage_seed, fresh_stack, data,
                                                             db, capsys, matrix_row):
    row = matrix_row("Storage folders that differ only in case, or match each other's % or _ "
                     "(Storage's listing mixes them)", "bad input",
                     "every object backed up once under its own name, and restored", 0)
    seeded(data, storage_seed)
    for name in OVERLAPPING:
        fresh_stack.storage.put_object("documents", name, name.encode())
    backed_up = storage_state(db)
    path, err = new_backup(capsys, data)
    rows = [o for o in manifest(path)[1] if o["name"] in OVERLAPPING]
    row.saw("each object once, with its own bytes",
            sorted((o["name"], o["sha256"]) for o in rows) ==
            sorted((n, hashlib.sha256(n.encode()).hexdigest()) for n in OVERLAPPING))
    row.saw("no object reported as deleted", "deleted during the backup" not in err)
    db.execute("DELETE FROM storage.objects WHERE name = ANY(%s)", [OVERLAPPING])
    code, _, err = run(capsys, data, "restore", "--safe", "--storage", "--file", path.name)
    row.exited(code)
    row.compare(storage_state(db), backed_up, "Storage exactly as backed up")
    assert row.as_expected, (row.observed, err)


# --- the whole project: tables, Storage and auth users (issue 17's done-when) ---------------------

def test_one_backup_and_one_restore_bring_back_tables_storage_and_auth_users(
        storage_seed, fresh_stack, data, db, capsys):
    """README's cron line backs up every table, every Storage object and every auth user in one
    run; the project is then emptied of all three (every table but packages, whose GENERATED
    ALWAYS key the API cannot insert: SAFETY.md's Limits); one `restore --safe --auth --storage`
    brings all three back: the tables and the users' facts compared through psycopg, Storage as
    the database holds it, and every object's bytes."""
    from test_auth_users import users  # the users' facts a restore keeps (times become new)

    seeded(data, storage_seed)  # the objects are already in backups/objects: none downloaded
    code, out, err = run(capsys, data, "--quiet", "backup", "--auth", "--storage", "--json")
    assert code == 0, err
    path = Path(json.loads(out)["file"])
    before_tables, before_users, before_storage = database_state(db), users(db), storage_state(db)
    db.execute("TRUNCATE " + ", ".join(t for t in DEMO_TABLES if t != "packages"))
    db.execute("DELETE FROM auth.users")
    db.execute("DELETE FROM storage.objects")
    db.execute("DELETE FROM storage.buckets")

    code, _, err = run(capsys, data, "restore", "--safe", "--auth", "--storage", "--file",
                       path.name)

    assert code == 0, err
    assert_same_state(database_state(db), before_tables)
    assert users(db) == before_users
    assert storage_state(db) == before_storage
    for row in manifest(path)[1]:
        data_now = fresh_stack.storage.object_bytes(row["bucket"], row["name"])
        assert hashlib.sha256(data_now).hexdigest() == row["sha256"], row["name"]
    last = err.splitlines()[-1]
    assert "restore complete" in last and "auth.users: 300 created" in last \
        and "2895 object(s) uploaded" in last, last
