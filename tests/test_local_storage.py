"""The stand-in Storage API (tests/local_storage.py) through the real client (client.storage,
storage3), checked against what supabase/storage's source says it answers; the database is
checked through psycopg, not through the API."""

from __future__ import annotations

import hashlib

import pytest
from storage3.exceptions import StorageApiError

from local_storage import LARGE_OBJECT_SIZE


def all_names(bucket, prefix=""):
    """Every object name under prefix, walking folders and pages as a careful client does."""
    names, offset = [], 0
    while True:
        page = bucket.list(prefix, {"limit": 100, "offset": offset})
        for entry in page:
            path = f"{prefix}/{entry['name']}" if prefix else entry["name"]
            if entry["id"] is None:
                names += all_names(bucket, path)
            else:
                names.append(path)
        if len(page) < 100:
            return names
        offset += len(page)


def test_buckets_come_with_their_settings(client):
    buckets = {b.id: b for b in client.storage.list_buckets()}
    assert sorted(buckets) == ["avatars", "documents", "media"]
    assert buckets["avatars"].public is True
    assert buckets["avatars"].file_size_limit == 1024 * 1024
    assert buckets["avatars"].allowed_mime_types == ["image/*"]
    assert client.storage.get_bucket("documents").public is False


def test_list_gives_folders_first_with_null_ids(client):
    avatars = client.storage.from_("avatars")
    top = avatars.list()
    assert top == [{"name": "users", "id": None, "updated_at": None, "created_at": None,
                    "last_accessed_at": None, "metadata": None, "user_metadata": None}]
    folders = avatars.list("users")
    assert len(folders) == 40 and all(entry["id"] is None for entry in folders)
    documents = client.storage.from_("documents")
    first = documents.list("reports/2024/01")  # no limit given: storage's default of 100
    assert len(first) == 60 and first[0]["name"] == "report-000.pdf"
    page = documents.list("reports/2024/01", {"limit": 25, "offset": 50})
    assert [e["name"] for e in page] == [f"report-{n:03d}.pdf" for n in range(50, 60)]
    leaf = avatars.list("users/07")
    assert len(leaf) == 30 and leaf[0]["name"] == "0007.png"
    assert leaf[0]["metadata"]["mimetype"] == "image/png" and leaf[0]["id"]
    # Folders come first, then objects, and limit/offset count both.
    top = documents.list("", {"limit": 3})
    assert [e["id"] is None for e in top] == [True, True, False]


def test_list_defaults_to_100_and_pages_by_offset(fresh_stack, client):
    for n in range(150):
        fresh_stack.storage.put_object("documents", f"many/{n:03d}.txt", b"x")
    docs = client.storage.from_("documents")
    first = docs.list("many")  # storage3 sends limit 100, storage's own default too
    assert [e["name"] for e in first] == [f"{n:03d}.txt" for n in range(100)]
    raw = client.storage.session.post(
        f"{fresh_stack.url}/storage/v1/object/list/documents", json={"prefix": "many/"},
        headers={"Authorization": f"Bearer {fresh_stack.service_role_key}"})
    assert len(raw.json()) == 100  # no limit in the body: the server's default
    rest = docs.list("many", {"limit": 100, "offset": 100})
    assert [e["name"] for e in rest] == [f"{n:03d}.txt" for n in range(100, 150)]


def test_every_object_is_reached_by_walking_folders_and_pages(client, db):
    for bucket in ("avatars", "documents", "media"):
        walked = sorted(all_names(client.storage.from_(bucket)))
        in_db = sorted(name for (name,) in db.execute(
            "SELECT name FROM storage.objects WHERE bucket_id = %s", [bucket]))
        assert walked == in_db
    total = db.execute("SELECT count(*) FROM storage.objects").fetchone()[0]
    assert total > 2500


def test_download_is_the_bytes_and_metadata_agrees(client, db):
    name = "notes/日本語 メモ.txt"
    data = client.storage.from_("documents").download(name)
    (meta,) = db.execute("SELECT metadata FROM storage.objects WHERE bucket_id = 'documents' "
                         "AND name = %s", [name]).fetchone()
    assert len(data) == meta["size"] == 410
    assert meta["eTag"] == f'"{hashlib.md5(data).hexdigest()}"'


def test_the_large_object_streams(client, stack):
    response = client.storage.session.get(
        f"{stack.url}/storage/v1/object/media/videos/big/launch.mp4",
        headers={"Authorization": f"Bearer {stack.service_role_key}"})
    assert response.status_code == 200
    assert len(response.content) == LARGE_OBJECT_SIZE > 50 * 1024 * 1024
    assert response.headers["Content-Type"] == "video/mp4"


def test_upload_upsert_info_and_remove(fresh_stack, client, db):
    docs = client.storage.from_("documents")
    docs.upload("new/a b.txt", b"first", {"content-type": "text/plain", "cache-control": "60",
                                          "metadata": {"k": "v"}})
    with pytest.raises(StorageApiError) as refused:
        docs.upload("new/a b.txt", b"second")
    assert str(refused.value.status) == "409"
    docs.upload("new/a b.txt", b"second!", {"upsert": "true", "content-type": "text/plain"})
    info = docs.info("new/a b.txt")
    assert info["size"] == 7 and info["content_type"] == "text/plain"
    assert docs.download("new/a b.txt") == b"second!"
    (cache, user_meta), = db.execute(
        "SELECT metadata->>'cacheControl', user_metadata FROM storage.objects "
        "WHERE name = 'new/a b.txt'").fetchall()
    assert cache == "max-age=3600" and user_meta is None  # the upsert's own defaults
    removed = docs.remove(["new/a b.txt", "not/there"])
    assert [r["name"] for r in removed] == ["new/a b.txt"]
    assert not docs.exists("new/a b.txt")


def test_bucket_limits_are_enforced(fresh_stack, client):
    avatars = client.storage.from_("avatars")
    with pytest.raises(StorageApiError) as wrong_type:
        avatars.upload("x.txt", b"text", {"content-type": "text/plain"})
    assert str(wrong_type.value.status) == "415"
    with pytest.raises(StorageApiError) as too_big:
        avatars.upload("x.png", b"0" * (1024 * 1024 + 1), {"content-type": "image/png"})
    assert str(too_big.value.status) == "413"


def test_missing_object_and_bucket_are_404(client):
    with pytest.raises(StorageApiError) as missing:
        client.storage.from_("documents").download("no/such.txt")
    assert str(missing.value.status) == "404" and missing.value.code == "not_found"
    with pytest.raises(StorageApiError) as no_bucket:
        client.storage.get_bucket("nope")
    assert str(no_bucket.value.status) == "404"


def test_create_update_empty_delete_bucket(fresh_stack, client, db):
    client.storage.create_bucket("scratch", options={"public": False,
                                                     "file_size_limit": 10})
    client.storage.update_bucket("scratch", {"public": True, "file_size_limit": 20,
                                             "allowed_mime_types": ["text/plain"]})
    bucket = client.storage.get_bucket("scratch")
    assert (bucket.public, bucket.file_size_limit, bucket.allowed_mime_types) == \
        (True, 20, ["text/plain"])
    client.storage.from_("scratch").upload("a.txt", b"x", {"content-type": "text/plain"})
    with pytest.raises(StorageApiError) as not_empty:
        client.storage.delete_bucket("scratch")
    assert str(not_empty.value.status) == "409"
    client.storage.empty_bucket("scratch")
    client.storage.delete_bucket("scratch")
    assert db.execute("SELECT count(*) FROM storage.buckets WHERE id = 'scratch'").fetchone()[0] \
        == 0


def test_anon_sees_no_private_object(stack):
    from helpers import make_client
    anon = make_client(stack.url, stack.anon_key)
    assert anon.storage.from_("documents").list() == []
    with pytest.raises(StorageApiError):
        anon.storage.from_("documents").download("empty.txt")


def test_reset_brings_the_demo_back(fresh_stack, client, db):
    before = db.execute("SELECT count(*) FROM storage.objects").fetchone()[0]
    client.storage.from_("documents").remove(["empty.txt"])
    fresh_stack.reset()
    assert db.execute("SELECT count(*) FROM storage.objects").fetchone()[0] == before
    assert client.storage.from_("documents").download("empty.txt") == b""
