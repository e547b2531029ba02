"""The Storage API of the local Supabase (tests/local_supabase.py serves it under /storage/v1).

It follows supabase/storage, the server behind every Supabase project's Storage, as its source
states it (the routes in src/http/routes/bucket and src/http/routes/object, the tenant
migrations in migrations/tenant):

- metadata in PostgreSQL, in storage.buckets and storage.objects with the columns Supabase has
  (objects.metadata holds eTag, size, mimetype, cacheControl, lastModified, contentLength and
  httpStatusCode; objects.user_metadata what the uploader sent in x-metadata / the metadata
  form field; path_tokens the name split at "/");
- the bytes in files on disk, one per object version (the file backend keeps
  tenant/bucket/name/version; here root/version, so that no object name becomes a path);
- listing as storage.search does it (0034-optimize-search-function-v1.sql, its legacy branch):
  a prefix that does not end in "/" gets one, the level is the prefix's number of parts, the
  folders of that level come first (name only, every other field null), then the objects of
  that level; limit (default 100) and offset apply to the whole; the prefix and search are
  matched with ILIKE, wildcards and all, as Supabase does;
- errors as {"statusCode": "404", "error": "not_found", "message": "Object not found"}, the
  body storage3 parses (message, error, statusCode);
- uploads as multipart (storage3's upload: a "file" part with its content type, and the form
  fields cacheControl and metadata) or as a plain body (Content-Type, cache-control and
  x-metadata, base64 JSON, as headers); x-upsert: true replaces an existing object; a bucket's
  file_size_limit and allowed_mime_types are enforced (413, 415).

The service role bypasses row level security; any other role sees no object (storage.objects
has RLS on and the demo has no policy), so its uploads are refused as RLS refuses them.

Demo data (make_demo): three buckets with nested folders, a few thousand objects of mixed sizes
and one of 52 MiB, generated once per stack into a seed folder that reset() never rewrites.
"""

from __future__ import annotations

import base64
import datetime
import email.parser
import email.policy
import hashlib
import json
import os
import random
import shutil
import socket
import tempfile
import urllib.parse
import uuid
from dataclasses import dataclass

import psycopg
from psycopg_pool import ConnectionPool

STORAGE_PREFIX = "/storage/v1"
DEFAULT_LIST_LIMIT = 100  # storage's search: limit defaults to 100
MAX_LIST_LIMIT = 1500  # and is capped at 1500
LARGE_OBJECT_SIZE = 52 * 1024 * 1024  # the demo's object over 50 MB
CHUNK = 1 << 20

# The columns of storage.buckets and storage.objects as Supabase has them today (the tenant
# migrations up to the custom metadata and versions), less the multipart-upload tables.
STORAGE_SCHEMA_SQL = r"""
CREATE TABLE IF NOT EXISTS storage.buckets (
    id text PRIMARY KEY,
    name text NOT NULL,
    owner uuid,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now(),
    public boolean DEFAULT false,
    avif_autodetection boolean DEFAULT false,
    file_size_limit bigint,
    allowed_mime_types text[],
    owner_id text,
    type text NOT NULL DEFAULT 'STANDARD'
);
CREATE UNIQUE INDEX IF NOT EXISTS bname ON storage.buckets (name);
CREATE TABLE IF NOT EXISTS storage.objects (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    bucket_id text REFERENCES storage.buckets (id),
    name text,
    owner uuid,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now(),
    last_accessed_at timestamptz DEFAULT now(),
    metadata jsonb,
    path_tokens text[] GENERATED ALWAYS AS (string_to_array(name, '/')) STORED,
    version text,
    owner_id text,
    user_metadata jsonb
);
CREATE UNIQUE INDEX IF NOT EXISTS bucketid_objname ON storage.objects (bucket_id, name);
CREATE INDEX IF NOT EXISTS name_prefix_search ON storage.objects (name text_pattern_ops);
ALTER TABLE storage.objects ENABLE ROW LEVEL SECURITY;
ALTER TABLE storage.buckets ENABLE ROW LEVEL SECURITY;
GRANT ALL ON storage.buckets, storage.objects TO anon, authenticated, service_role;
"""

# storage.search as its path for a sort other than by name runs it (0059-search-functions-user-
# metadata.sql; the legacy branch of 0034 before it), user_metadata included, with the sort column
# and order chosen from the same closed lists.
SEARCH_SQL = """
WITH folders AS (
    SELECT path_tokens[%(level)s] AS folder FROM storage.objects
    WHERE objects.name ILIKE %(prefix)s || %(search)s || '%%' AND bucket_id = %(bucket)s
      AND array_length(objects.path_tokens, 1) <> %(level)s
    GROUP BY folder ORDER BY folder {order})
(SELECT folder AS name, NULL::uuid AS id, NULL::timestamptz AS updated_at,
        NULL::timestamptz AS created_at, NULL::timestamptz AS last_accessed_at,
        NULL::jsonb AS metadata, NULL::jsonb AS user_metadata FROM folders)
UNION ALL
(SELECT path_tokens[%(level)s] AS name, id, updated_at, created_at, last_accessed_at, metadata,
        user_metadata
 FROM storage.objects
 WHERE objects.name ILIKE %(prefix)s || %(search)s || '%%' AND bucket_id = %(bucket)s
   AND array_length(objects.path_tokens, 1) = %(level)s
 ORDER BY {column} {order})
LIMIT %(limit)s OFFSET %(offset)s
"""
SORT_COLUMNS = ("name", "updated_at", "created_at", "last_accessed_at")


class StorageError(Exception):
    """An error answer of the Storage API."""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message

    def body(self) -> bytes:
        return json.dumps({"statusCode": str(self.status), "error": self.error,
                           "message": self.message}).encode()


def not_found(what="Object"):
    return StorageError(404, "not_found", f"{what} not found")


def bucket_not_found():
    return StorageError(404, "Bucket not found", "Bucket not found")


def iso(moment) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def mime_allowed(mimetype: str, allowed) -> bool:
    """Whether a bucket's allowed_mime_types admit this type ("image/*" admits image/png)."""
    if not allowed:
        return True
    base = mimetype.split(";")[0].strip().lower()
    for pattern in allowed:
        pattern = pattern.strip().lower()
        if pattern.endswith("/*") and base.startswith(pattern[:-1]):
            return True
        if pattern == base:
            return True
    return False


@dataclass
class Upload:
    data: bytes
    mimetype: str
    cache_control: str
    user_metadata: dict | None


def read_upload(headers, body: bytes) -> Upload:
    """The object of an upload request: multipart (storage3) or a plain body."""
    content_type = headers.get("Content-Type") or "application/octet-stream"
    if content_type.lower().startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        fields, file_part = {}, None
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "file" or part.get_filename() is not None:
                file_part = part
            else:
                fields[name] = part.get_payload(decode=True).decode()
        if file_part is None:
            raise StorageError(400, "InvalidRequest", "No file in the multipart body")
        # uploader.ts: the form field cacheControl is seconds, stored as max-age=...
        cache = fields.get("cacheControl")
        metadata = json.loads(fields["metadata"]) if fields.get("metadata") else None
        return Upload(file_part.get_payload(decode=True) or b"",
                      file_part.get_content_type() or "text/plain;charset=UTF-8",
                      f"max-age={cache}" if cache else "no-cache", metadata)
    metadata = headers.get("x-metadata")
    try:
        user_metadata = json.loads(base64.b64decode(metadata)) if metadata else None
    except ValueError:
        raise StorageError(400, "InvalidRequest", "x-metadata is not base64 JSON") from None
    return Upload(body, content_type, headers.get("cache-control") or "no-cache", user_metadata)


class LocalStorage:
    """Storage's metadata (in the stack's PostgreSQL) and bytes (in a folder of its own)."""

    def __init__(self, database_url: str):
        self.database_url = database_url
        self.root = tempfile.mkdtemp(prefix="local-storage-")
        self.files = os.path.join(self.root, "objects")
        os.makedirs(self.files)
        self.seed_buckets: list[tuple] = []
        self.seed_objects: list[tuple] = []
        self.seed_versions: set[str] = set()
        # Storage connects as its own admin role; the stand-in as the stack's superuser.
        self.pool = ConnectionPool(database_url, min_size=1, max_size=8, open=True, timeout=30,
                                   kwargs={"autocommit": True, "prepare_threshold": None})

    # -- set-up

    def install(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(STORAGE_SCHEMA_SQL)

    def stop(self) -> None:
        self.pool.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def path_of(self, version: str) -> str:
        return os.path.join(self.files, version)

    def make_demo(self, seed: int = 17) -> None:
        """Generate the demo buckets and objects once (bytes to the seed files), then load them."""
        rnd = random.Random(seed)
        now = datetime.datetime(2026, 11, 30, 3, 0, tzinfo=datetime.timezone.utc)
        self.seed_buckets = [
            ("avatars", "avatars", True, 1024 * 1024, ["image/*"]),
            ("documents", "documents", False, None, None),
            ("media", "media", False, 100 * 1024 * 1024, None),
        ]
        objects = []
        for user in range(1200):
            objects.append(("avatars", f"users/{user % 40:02d}/{user:04d}.png",
                            rnd.randint(200, 4000), "image/png", "max-age=3600", None))
        for year in (2024, 2025):
            for month in range(1, 13):
                for n in range(60):
                    size = rnd.choice((100, 900, 2500, 7000, 20000, 60000))
                    objects.append(("documents", f"reports/{year}/{month:02d}/report-{n:03d}.pdf",
                                    rnd.randint(size // 2, size), "application/pdf", "no-cache",
                                    {"author": f"user{n % 7}", "year": year} if n % 5 == 0
                                    else None))
        objects += [
            ("documents", "Résumé final.pdf", 3100, "application/pdf", "max-age=60",
             {"lang": "fr"}),
            ("documents", "notes/日本語 メモ.txt", 410, "text/plain;charset=UTF-8",
             "max-age=3600", None),
            ("documents", "notes/with  two spaces .txt", 77, "text/plain", "no-cache", None),
            ("documents", "empty.txt", 0, "text/plain", "no-cache", None),
        ]
        for n in range(250):
            objects.append(("media", f"clips/{n // 50}/clip-{n}.bin", rnd.randint(1000, 40000),
                            "application/octet-stream", "max-age=86400", None))
        objects.append(("media", "videos/big/launch.mp4", LARGE_OBJECT_SIZE, "video/mp4",
                        "max-age=86400", {"duration": 61.5}))
        self.seed_objects = []
        for index, (bucket, name, size, mimetype, cache, user_metadata) in enumerate(objects):
            version = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
            data = os.urandom(size)
            with open(self.path_of(version), "wb") as f:
                f.write(data)
            moment = now - datetime.timedelta(minutes=len(objects) - index)
            self.seed_objects.append((
                str(uuid.UUID(int=rnd.getrandbits(128), version=4)), bucket, name, moment,
                json.dumps(self.system_metadata(data, mimetype, cache, moment)), version,
                json.dumps(user_metadata) if user_metadata is not None else None))
        self.seed_versions = {row[5] for row in self.seed_objects}
        self.reset()

    @staticmethod
    def system_metadata(data: bytes, mimetype: str, cache: str, moment) -> dict:
        """objects.metadata as storage writes it after an upload."""
        return {"eTag": f'"{hashlib.md5(data).hexdigest()}"', "size": len(data),
                "mimetype": mimetype, "cacheControl": cache, "lastModified": iso(moment),
                "contentLength": len(data), "httpStatusCode": 200}

    def reset(self) -> None:
        """The demo buckets and objects again, as make_demo made them."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            with conn.transaction():
                conn.execute("DELETE FROM storage.objects")
                conn.execute("DELETE FROM storage.buckets")
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO storage.buckets (id, name, public, file_size_limit, "
                        "allowed_mime_types) VALUES (%s, %s, %s, %s, %s)", self.seed_buckets)
                    with cur.copy("COPY storage.objects (id, bucket_id, name, created_at, "
                                  "updated_at, last_accessed_at, metadata, version, "
                                  "user_metadata) FROM STDIN") as copy:
                        for oid, bucket, name, moment, meta, version, user_meta in \
                                self.seed_objects:
                            copy.write_row((oid, bucket, name, moment, moment, moment, meta,
                                            version, user_meta))
        # Files of versions written since (not the seed's) are left: nothing refers to them.

    def put_object(self, bucket: str, name: str, data: bytes, mimetype: str = "text/plain",
                   user_metadata: dict | None = None) -> None:
        """An object written the way the S3 protocol or the dashboard would (no name checks of
        the REST client): for tests of names storage3 refuses to send, such as "a/../b"."""
        version = str(uuid.uuid4())
        with open(self.path_of(version), "wb") as f:
            f.write(data)
        moment = datetime.datetime.now(datetime.timezone.utc)
        with self.pool.connection() as conn:
            conn.execute("INSERT INTO storage.objects (bucket_id, name, metadata, user_metadata, "
                         "version, created_at, updated_at, last_accessed_at) VALUES (%s, %s, %s, "
                         "%s, %s, %s, %s, %s)",
                         [bucket, name, json.dumps(self.system_metadata(data, mimetype,
                                                                        "no-cache", moment)),
                          json.dumps(user_metadata) if user_metadata is not None else None,
                          version, moment, moment, moment])

    def object_bytes(self, bucket: str, name: str) -> bytes | None:
        """An object's bytes as the server holds them (None when there is no such object)."""
        with self.pool.connection() as conn:
            row = conn.execute("SELECT version FROM storage.objects WHERE bucket_id = %s AND "
                               "name = %s", [bucket, name]).fetchone()
        if row is None:
            return None
        with open(self.path_of(row[0]), "rb") as f:
            return f.read()

    # -- the API

    def handle(self, handler, method: str, path: str, query: str, body: bytes) -> int:
        """Serve one request under /storage/v1 for the ApiHandler; returns its status."""
        try:
            role = handler._role_and_claims()[0]
        except Exception as exc:  # ApiError of the REST side: the same refusal, Storage's body
            raise StorageError(getattr(exc, "status", 400), "Unauthorized",
                               getattr(exc, "message", "invalid JWT")) from None
        if role not in ("service_role", "anon", "authenticated"):
            raise StorageError(403, "Unauthorized", "invalid role")
        route = path[len(STORAGE_PREFIX):]
        parts = route.split("/", 3)  # "", "bucket"|"object", ...
        if len(parts) < 2 or parts[1] not in ("bucket", "object"):
            raise StorageError(404, "not_found", f"Route {method}:{path} not found")
        with self.pool.connection() as conn:
            if parts[1] == "bucket":
                return self._bucket(handler, conn, method, route[len("/bucket"):], body, role)
            return self._object(handler, conn, method, route[len("/object"):], body, role)

    def _json(self, handler, status: int, value, method="GET") -> int:
        handler._send(status, json.dumps(value).encode(), method=method)
        return status

    # buckets (src/http/routes/bucket)

    def _bucket_row(self, conn, bucket_id: str):
        return conn.execute(
            "SELECT id, name, owner, public, file_size_limit, allowed_mime_types, created_at, "
            "updated_at, type FROM storage.buckets WHERE id = %s", [bucket_id]).fetchone()

    @staticmethod
    def _bucket_json(row) -> dict:
        id_, name, owner, public, limit, mimes, created, updated, kind = row
        return {"id": id_, "name": name, "owner": str(owner) if owner else "",
                "public": public, "file_size_limit": limit, "allowed_mime_types": mimes,
                "created_at": iso(created), "updated_at": iso(updated), "type": kind}

    def _bucket(self, handler, conn, method, rest, body, role) -> int:
        rest = urllib.parse.unquote(rest.strip("/"))
        if role != "service_role" and method != "GET":
            raise StorageError(403, "Unauthorized",
                               "new row violates row-level security policy")
        if method == "GET" and not rest:
            rows = conn.execute(
                "SELECT id, name, owner, public, file_size_limit, allowed_mime_types, "
                "created_at, updated_at, type FROM storage.buckets ORDER BY name").fetchall()
            visible = [r for r in rows if role == "service_role"]
            return self._json(handler, 200, [self._bucket_json(r) for r in visible])
        if method == "POST" and not rest:
            spec = json.loads(body or b"{}")
            bucket_id = spec.get("id") or spec.get("name")
            if not bucket_id:
                raise StorageError(400, "InvalidRequest", "body must have required property "
                                   "'name'")
            if self._bucket_row(conn, bucket_id):
                raise StorageError(409, "Duplicate", "The resource already exists")
            conn.execute("INSERT INTO storage.buckets (id, name, public, file_size_limit, "
                         "allowed_mime_types) VALUES (%s, %s, %s, %s, %s)",
                         [bucket_id, spec.get("name") or bucket_id, bool(spec.get("public")),
                          spec.get("file_size_limit"), spec.get("allowed_mime_types")])
            return self._json(handler, 200, {"name": bucket_id})
        if rest.endswith("/empty") and method == "POST":
            bucket_id = rest[:-len("/empty")]
            if not self._bucket_row(conn, bucket_id):
                raise bucket_not_found()
            self._delete_objects(conn, bucket_id, None)
            return self._json(handler, 200, {"message": "Successfully emptied"})
        row = self._bucket_row(conn, rest) if rest else None
        if row is None or (role != "service_role"):
            raise bucket_not_found()
        if method == "GET":
            return self._json(handler, 200, self._bucket_json(row))
        if method == "PUT":
            spec = json.loads(body or b"{}")
            conn.execute("UPDATE storage.buckets SET public = coalesce(%s, public), "
                         "file_size_limit = %s, allowed_mime_types = %s, updated_at = now() "
                         "WHERE id = %s", [spec.get("public"), spec.get("file_size_limit"),
                                           spec.get("allowed_mime_types"), rest])
            return self._json(handler, 200, {"message": "Successfully updated"})
        if method == "DELETE":
            if conn.execute("SELECT 1 FROM storage.objects WHERE bucket_id = %s LIMIT 1",
                            [rest]).fetchone():
                raise StorageError(409, "InvalidRequest", "The bucket you tried to delete is "
                                   "not empty")
            conn.execute("DELETE FROM storage.buckets WHERE id = %s", [rest])
            return self._json(handler, 200, {"message": "Successfully deleted"})
        raise StorageError(404, "not_found", f"Route {method}:/bucket/{rest} not found")

    # objects (src/http/routes/object)

    def _object(self, handler, conn, method, rest, body, role) -> int:
        if rest.startswith("/list/") and method == "POST":
            return self._list(handler, conn, urllib.parse.unquote(rest[len("/list/"):]), body,
                              role)
        for prefix in ("/info/authenticated/", "/info/public/", "/info/"):
            if rest.startswith(prefix) and method == "GET":
                return self._info(handler, conn, rest[len(prefix):], role,
                                  public="public" in prefix)
        for prefix in ("/authenticated/", "/public/"):
            if rest.startswith(prefix) and method in ("GET", "HEAD"):
                return self._download(handler, conn, method, rest[len(prefix):], role,
                                      public=prefix == "/public/")
        bucket, sep, name = rest.lstrip("/").partition("/")
        bucket = urllib.parse.unquote(bucket)
        if method == "DELETE" and not sep:
            spec = json.loads(body or b"{}")
            prefixes = spec.get("prefixes")
            if not isinstance(prefixes, list) or not prefixes:
                raise StorageError(400, "InvalidRequest",
                                   "body/prefixes must NOT have fewer than 1 items")
            self._require_bucket(conn, bucket)
            if role != "service_role":
                return self._json(handler, 200, [])
            return self._json(handler, 200, self._delete_objects(conn, bucket, prefixes))
        if not sep:
            raise StorageError(404, "not_found", f"Route {method}:/object{rest} not found")
        if method in ("GET", "HEAD"):
            return self._download(handler, conn, method, rest.lstrip("/"), role)
        if method in ("POST", "PUT"):
            return self._upload(handler, conn, method, bucket, urllib.parse.unquote(name), body,
                                role)
        if method == "DELETE":
            name = urllib.parse.unquote(name)
            self._require_bucket(conn, bucket)
            deleted = self._delete_objects(conn, bucket, [name]) if role == "service_role" \
                else []
            if not deleted:
                raise not_found()
            return self._json(handler, 200, {"message": "Successfully deleted"})
        raise StorageError(404, "not_found", f"Route {method}:/object{rest} not found")

    def _require_bucket(self, conn, bucket: str):
        row = self._bucket_row(conn, bucket)
        if row is None:
            raise bucket_not_found()
        return row

    def _list(self, handler, conn, bucket, body, role) -> int:
        spec = json.loads(body or b"{}")
        if not isinstance(spec.get("prefix"), str):
            raise StorageError(400, "InvalidRequest", "body must have required property "
                               "'prefix'")
        limit = spec.get("limit", DEFAULT_LIST_LIMIT)
        offset = spec.get("offset", 0)
        if not isinstance(limit, int) or limit < 1 or not isinstance(offset, int) or offset < 0:
            raise StorageError(400, "InvalidRequest", "body/limit must be >= 1, body/offset "
                               ">= 0")
        sort = spec.get("sortBy") or {}
        column = sort.get("column") if sort.get("column") in SORT_COLUMNS else "name"
        order = "desc" if sort.get("order") == "desc" else "asc"
        prefix = spec["prefix"]
        if prefix and not prefix.endswith("/"):
            prefix += "/"  # storage's searchObjects: the prefix is always a folder
        level = len(prefix.split("/"))
        if role != "service_role":  # RLS: no policy lets another role see an object
            return self._json(handler, 200, [])
        rows = conn.execute(SEARCH_SQL.format(column=column, order=order),
                            {"level": level, "prefix": prefix, "search": spec.get("search") or "",
                             "bucket": bucket, "limit": min(limit, MAX_LIST_LIMIT),
                             "offset": offset}).fetchall()
        return self._json(handler, 200, [
            {"name": name, "id": str(oid) if oid else None, "updated_at": iso(updated),
             "created_at": iso(created), "last_accessed_at": iso(accessed), "metadata": meta,
             "user_metadata": user_meta}
            for name, oid, updated, created, accessed, meta, user_meta in rows])

    def _find(self, conn, rest: str, role, public=False):
        bucket, _, name = rest.partition("/")
        bucket, name = urllib.parse.unquote(bucket), urllib.parse.unquote(name)
        bucket_row = self._bucket_row(conn, bucket)
        if bucket_row is None:
            raise bucket_not_found()
        if public and not bucket_row[3]:
            raise bucket_not_found()
        if role != "service_role" and not public:
            raise not_found()
        row = conn.execute(
            "SELECT id, name, version, metadata, user_metadata, created_at, updated_at, "
            "bucket_id FROM storage.objects WHERE bucket_id = %s AND name = %s",
            [bucket, name]).fetchone()
        if row is None:
            raise not_found()
        return row

    def _info(self, handler, conn, rest, role, public=False) -> int:
        oid, name, version, meta, user_meta, created, updated, bucket = self._find(
            conn, rest, role, public)
        meta = meta or {}
        return self._json(handler, 200, {
            "id": str(oid), "name": name, "version": version, "bucket_id": bucket,
            "size": meta.get("size"), "content_type": meta.get("mimetype"),
            "cache_control": meta.get("cacheControl"), "etag": meta.get("eTag"),
            "metadata": user_meta, "last_modified": meta.get("lastModified"),
            "created_at": iso(created)})

    def _download(self, handler, conn, method, rest, role, public=False) -> int:
        oid, name, version, meta, user_meta, created, updated, bucket = self._find(
            conn, rest, role, public)
        meta = meta or {}
        try:
            f = open(self.path_of(version), "rb")
        except OSError:
            raise not_found() from None
        with f:
            size = os.fstat(f.fileno()).st_size
            cut = getattr(handler, "cut_download", False)  # a "drop" fault "after": half the body
            handler._log_request(0 if cut else 200)
            handler.send_response(200)
            handler.send_header("Content-Type", meta.get("mimetype") or
                                "application/octet-stream")
            handler.send_header("Cache-Control", meta.get("cacheControl") or "no-cache")
            handler.send_header("ETag", meta.get("eTag") or "")
            handler.send_header("Last-Modified", updated.strftime("%a, %d %b %Y %H:%M:%S GMT"))
            handler.send_header("Content-Length", str(size))
            handler.end_headers()
            if method == "HEAD":
                return 200
            sent = 0
            while True:
                if cut and sent >= size // 2:
                    handler.close_connection = True
                    handler.wfile.flush()
                    handler.connection.shutdown(socket.SHUT_RDWR)
                    return 0
                data = f.read(min(CHUNK, max(size // 2 - sent, 1)) if cut else CHUNK)
                if not data:
                    return 200
                handler.wfile.write(data)
                sent += len(data)

    def _upload(self, handler, conn, method, bucket, name, body, role) -> int:
        bucket_row = self._require_bucket(conn, bucket)
        if not name or any(ord(ch) < 32 for ch in name):
            raise StorageError(400, "InvalidKey", f"Invalid key: {name}")
        if role != "service_role":
            raise StorageError(403, "Unauthorized", "new row violates row-level security policy")
        upload = read_upload(handler.headers, body)
        limit, allowed = bucket_row[4], bucket_row[5]
        if limit is not None and len(upload.data) > limit:
            raise StorageError(413, "Payload too large",
                               "The object exceeded the maximum allowed size")
        if not mime_allowed(upload.mimetype, allowed):
            raise StorageError(415, "invalid_mime_type",
                               f"mime type {upload.mimetype} is not supported")
        upsert = (handler.headers.get("x-upsert") or "").lower() == "true"
        existing = conn.execute("SELECT id, version FROM storage.objects WHERE bucket_id = %s "
                                "AND name = %s", [bucket, name]).fetchone()
        if method == "POST" and existing and not upsert:
            raise StorageError(409, "Duplicate", "The resource already exists")
        if method == "PUT" and not existing:
            raise not_found()
        version = str(uuid.uuid4())
        with open(self.path_of(version), "wb") as f:
            f.write(upload.data)
        moment = datetime.datetime.now(datetime.timezone.utc)
        meta = json.dumps(self.system_metadata(upload.data, upload.mimetype,
                                               upload.cache_control, moment))
        user_meta = json.dumps(upload.user_metadata) if upload.user_metadata is not None \
            else None
        if existing:
            oid = existing[0]
            conn.execute("UPDATE storage.objects SET metadata = %s, user_metadata = %s, "
                         "version = %s, updated_at = %s, last_accessed_at = %s WHERE id = %s",
                         [meta, user_meta, version, moment, moment, oid])
            self._drop_file(existing[1])
        else:
            oid = conn.execute(
                "INSERT INTO storage.objects (bucket_id, name, metadata, user_metadata, version, "
                "created_at, updated_at, last_accessed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, "
                "%s) RETURNING id", [bucket, name, meta, user_meta, version, moment, moment,
                                     moment]).fetchone()[0]
        return self._json(handler, 200, {"Id": str(oid), "Key": f"{bucket}/{name}"})

    def _drop_file(self, version: str | None) -> None:
        if version and version not in self.seed_versions:  # reset() needs the seed's files
            try:
                os.unlink(self.path_of(version))
            except OSError:
                pass

    def _delete_objects(self, conn, bucket: str, names) -> list[dict]:
        """Delete objects by exact name (deleteObjects: prefixes are names), or all of a
        bucket; returns the deleted objects as storage answers them."""
        if names is None:
            rows = conn.execute("DELETE FROM storage.objects WHERE bucket_id = %s RETURNING "
                                "id, name, version, bucket_id, metadata, updated_at, created_at",
                                [bucket]).fetchall()
        else:
            rows = conn.execute("DELETE FROM storage.objects WHERE bucket_id = %s AND name = "
                                "ANY(%s) RETURNING id, name, version, bucket_id, metadata, "
                                "updated_at, created_at", [bucket, list(names)]).fetchall()
        for row in rows:
            self._drop_file(row[2])
        return [{"id": str(oid), "name": name, "bucket_id": b, "metadata": meta,
                 "updated_at": iso(updated), "created_at": iso(created)}
                for oid, name, version, b, meta, updated, created in rows]
