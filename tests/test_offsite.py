"""Backups that survive the machine (issue #16): off-site copies to S3-compatible storage,
encryption at rest with age, calendar retention and the heartbeat.

Every S3 request goes to a real S3-compatible HTTP server, moto's server mode on 127.0.0.1, with
authentication on (an IAM user whose key may do s3:*), so wrong credentials are refused the way a
real service refuses them. The heartbeat is a local HTTP server. The database is checked through
psycopg (helpers.database_state), the storage through a boto3 client of the test's own.
"""

import datetime
import gzip
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")
pyrage = pytest.importorskip("pyrage")
moto_server = pytest.importorskip("moto.server")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import supabase_backup  # noqa: E402
from helpers import (  # noqa: E402
    SETTINGS, assert_same_state, database_state, error_line, files_in, kill_9, make_backup, run,
    running, wait_for)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TABLES = "app_settings,packages,package_tags"  # a small backup: parents and children


# --- the S3-compatible server -------------------------------------------------------------------

class S3Server:
    """moto's S3 server on 127.0.0.1 with authentication on; key_id/secret may do s3:*."""

    def __init__(self):
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0,
                                                     verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        iam = boto3.client("iam", endpoint_url=self.url, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="backup")
        iam.put_user_policy(UserName="backup", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="backup")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        # From here on every request must be signed with a key IAM knows.
        urllib.request.urlopen(urllib.request.Request(
            self.url + "/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "text/plain"})).read()

    def client(self):
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)

    def stop(self):
        self.server.stop()


@pytest.fixture(scope="module")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


class Bucket:
    """A bucket of its own for one test, and the storage as the test sees it."""

    def __init__(self, server, name):
        self.server, self.name, self.client = server, name, server.client()
        self.client.create_bucket(Bucket=name)

    def url(self, path=""):
        return f"s3://{self.name}/{path}"

    def keys(self, prefix=""):
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name,
                                                                      Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def get(self, key):
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def head(self, key):
        return self.client.head_object(Bucket=self.name, Key=key)

    def pending_uploads(self):
        return self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", [])


@pytest.fixture
def bucket(s3_server, data, monkeypatch, request, tmp_path):
    """A new bucket, and the AWS settings pointing at the server (no AWS config file read)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setattr(supabase_backup, "S3_ATTEMPTS", 2)
    name = "t-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:20]
    return Bucket(s3_server, name)


# --- age keys -----------------------------------------------------------------------------------

class AgeKey:
    """An age key pair, its identity written to a file as age-keygen writes it."""

    def __init__(self, folder, name="key.txt"):
        identity = pyrage.x25519.Identity.generate()
        self.secret = str(identity)
        self.recipient = str(identity.to_public())
        self.path = folder / name
        self.path.write_text(f"# created: test\n# public key: {self.recipient}\n{self.secret}\n")
        os.chmod(self.path, 0o600)


@pytest.fixture
def key(tmp_path):
    return AgeKey(tmp_path)


# --- helpers ------------------------------------------------------------------------------------

def sha256_of(data):
    return hashlib.sha256(data).hexdigest()


def document_of(gz_bytes):
    return json.loads(gzip.decompress(gz_bytes))


def backups(data):
    return files_in(data, "backups")


def everything_written(data):
    """The text of every file the runs wrote in the data folder (logs, summaries, backups'
    names), to look for secrets in."""
    texts = []
    for path in Path(data).rglob("*"):
        if path.is_file() and path.suffix in (".log", ".json"):
            texts.append(path.read_text(errors="replace"))
    return "\n".join(texts)


class PingServer:
    """A local HTTP server that records the pings it receives: (path, body)."""

    def __init__(self):
        pings = self.pings = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                pings.append((self.path, body.decode()))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ping/abc-123"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pings():
    server = PingServer()
    yield server
    server.stop()


def closed_port():
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the off-site copy --------------------------------------------------------------------------

def test_backup_to_s3_uploads_the_verified_file_with_its_sha256(stack, data, capsys, bucket):
    code, out, err = run(capsys, data, "backup", "--tables", TABLES,
                         "--to", bucket.url("nightly/"), "--json")
    assert code == 0, err
    (name,) = backups(data)
    local = (data / "backups" / name).read_bytes()
    assert bucket.keys() == [f"nightly/{name}"]
    # The object is the local file, byte for byte, and says its own SHA-256.
    assert bucket.get(f"nightly/{name}") == local
    assert bucket.head(f"nightly/{name}")["Metadata"]["sha256"] == sha256_of(local)
    assert bucket.pending_uploads() == []
    summary = json.loads(out)
    assert summary["remote"] == bucket.url(f"nightly/{name}")
    # list reads the location; the recorded counts are the file's.
    code, out, err = run(capsys, data, "list", bucket.url("nightly/"), "--json")
    assert code == 0, err
    (entry,) = json.loads(out)
    document = document_of(local)
    assert entry["file"] == bucket.url(f"nightly/{name}") and entry["bytes"] == len(local)
    assert entry["rows"] == document["row_count"] and entry["tables"] == 3


def test_backup_remote_setting_is_used_and_marker_is_gone(stack, data, capsys, bucket,
                                                          monkeypatch):
    monkeypatch.setenv("BACKUP_REMOTE", bucket.url("from-setting"))
    code, _, err = run(capsys, data, "backup", "--tables", "app_settings")
    assert code == 0, err
    (name,) = backups(data)  # no .upload- marker is left once the copy is checked
    assert bucket.keys() == [f"from-setting/{name}"]


@pytest.mark.parametrize("fault", ["endpoint down", "wrong secret key", "unknown access key",
                                   "missing bucket"])
def test_a_failed_upload_exits_12_keeps_the_local_backup_and_runs_no_retention(
        stack, data, capsys, bucket, monkeypatch, fault, pings):
    old = make_backup(capsys, data, "--tables", "app_settings")
    target = bucket.url("x/")
    if fault == "endpoint down":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    elif fault == "wrong secret key":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key-0123456789")
    elif fault == "unknown access key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN12")
    else:
        target = "s3://no-such-bucket-here/x/"
    code, _, err = run(capsys, data, "backup", "--tables", "app_settings", "--to", target,
                       "--keep", "1", "--ping", pings.url)
    assert code == supabase_backup.EXIT_UPLOAD
    line = error_line(err)
    expected = {"endpoint down": "cannot reach the storage",
                "wrong secret key": "refused the credentials (SignatureDoesNotMatch)",
                "unknown access key": "refused the credentials (InvalidAccessKeyId)",
                "missing bucket": "the bucket no-such-bucket-here does not exist"}[fault]
    assert expected in line and "no retention ran" in line
    # Both backups are still there (--keep 1 did not run), the new one complete.
    names = backups(data)
    assert len(names) == 2 and old.name in names
    for name in names:
        assert run(capsys, data, "check", "--file", name)[0] == 0
    assert bucket.keys() == []
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in err and secret not in everything_written(data)
    assert stack.service_role_key not in err
    # The heartbeat heard the start and the failure, with the exit code and the line.
    assert [path for path, _ in pings.pings] == ["/ping/abc-123/start", "/ping/abc-123/fail"]
    failure = pings.pings[1][1]
    assert failure.startswith(f"exit {supabase_backup.EXIT_UPLOAD}: ") and expected in failure
    assert secret not in pings.pings[1][1]


@pytest.mark.parametrize("fault, exit_code, expected", [
    ("endpoint down", 4, "cannot reach the storage"),
    ("wrong secret key", 3, "refused the credentials (SignatureDoesNotMatch)"),
    ("missing bucket", 3, "the bucket no-such-bucket-here does not exist"),
])
def test_reading_from_s3_fails_with_one_line_and_touches_nothing(
        stack, data, capsys, bucket, monkeypatch, fault, exit_code, expected):
    run(capsys, data, "backup", "--tables", "app_settings", "--to", bucket.url())
    (name,) = backups(data)
    url = bucket.url(name)
    if fault == "endpoint down":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    elif fault == "wrong secret key":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key-0123456789")
    else:
        url = f"s3://no-such-bucket-here/{name}"
    stack.requests.clear()
    for argv in (["check", "--file", url], ["restore", "--safe", "--file", url],
                 ["diff", "--file", url], ["list", url.rsplit("/", 1)[0] + "/"]):
        code, _, err = run(capsys, data, *argv)
        assert code == exit_code and expected in error_line(err), argv
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in err
    assert stack.requests == [] and files_in(data, "safety_backups") == []


def test_kill_9_mid_upload_leaves_nothing_under_the_final_name(stack, data, tmp_path, bucket,
                                                               s3_server, monkeypatch, capsys):
    """A backup whose multipart upload goes through a proxy that slows it down is killed once a
    part is stored: nothing appears under the final name, the local file is complete, and the
    next backup with a remote aborts the leftover upload."""
    proxy = SlowProxy(s3_server.url, delay=0.2)  # about 80 KB/s
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(REPO_ROOT / "supabase_backup.py", app)
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(SUPABASE_URL=stack.url, SUPABASE_SERVICE_ROLE_KEY=stack.service_role_key,
               SUPABASE_BACKUP_DIR=str(data), AWS_ENDPOINT_URL=proxy.url)
    # The same script, with parts of 64 KiB so that a small backup is uploaded in many parts.
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import supabase_backup as s; "
            "s.S3_PART_SIZE = 64 * 1024; s.S3_CONCURRENCY = 1; sys.exit(s.main(sys.argv[1:]))")
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(app), "backup", "--tables", "bookings,users",
         "--to", bucket.url("k/")], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        def half_uploaded():
            assert process.poll() is None, process.stderr.read().decode()
            return proxy.sent > 200 * 1024 and bucket.pending_uploads()

        with running(process):
            wait_for(half_uploaded, timeout=60, what="half of the upload to be sent")
            kill_9(process)
    finally:
        proxy.stop()
    assert bucket.keys() == []  # nothing under the final name, nor any other
    assert len(bucket.pending_uploads()) == 1
    (name,) = [n for n in backups(data) if not n.startswith(".")]
    assert run(capsys, data, "check", "--file", name)[0] == 0  # the local backup is whole
    # The next backup with a remote aborts what the killed one left.
    time.sleep(1.1)
    code, _, err = run(capsys, data, "backup", "--tables", "app_settings", "--to",
                       bucket.url("k/"))
    assert code == 0, err
    assert bucket.pending_uploads() == []
    assert "aborted the unfinished upload" in err
    assert [k for k in bucket.keys()] == [f"k/{n}" for n in backups(data)
                                         if n.startswith("supabase_backup_") and n != name]


class SlowProxy:
    """A TCP proxy to the S3 server that forwards what the client sends 16 KiB at a time with a
    pause after each: an upload through it takes long enough to be killed half-way. sent counts
    the bytes forwarded to the server."""

    def __init__(self, upstream, delay):
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.upstream, self.delay, self.sent = (host, int(port)), delay, 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopped = threading.Event()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self.pipe, args=(client, server, self.delay),
                             daemon=True).start()
            threading.Thread(target=self.pipe, args=(server, client, 0), daemon=True).start()

    def pipe(self, source, target, delay):
        try:
            while not self.stopped.is_set():
                chunk = source.recv(16 * 1024)
                if not chunk:
                    break
                target.sendall(chunk)
                if delay:
                    self.sent += len(chunk)
                    time.sleep(delay)
        except OSError:
            pass
        finally:
            for end in (source, target):
                with_shutdown(end)

    def stop(self):
        self.stopped.set()
        self.listener.close()


def with_shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# --- encryption ---------------------------------------------------------------------------------

def test_encrypted_backup_leaves_no_plain_file_and_is_readable_by_the_age_cli(
        stack, data, capsys, key, tmp_path, db):
    code, _, err = run(capsys, data, "backup", "--tables", TABLES, "--encrypt-to", key.recipient)
    assert code == 0, err
    (name,) = backups(data)
    assert name.endswith(".json.gz.age")  # no plain copy left beside it
    encrypted = (data / "backups" / name).read_bytes()
    assert encrypted.startswith(b"age-encryption.org/v1\n")
    if shutil.which("age") is None:
        pytest.skip("the age CLI is not installed (apt-get install age); pyrage read it above")
    plain = subprocess.run(["age", "-d", "-i", str(key.path), str(data / "backups" / name)],
                           capture_output=True, check=True).stdout
    document = document_of(plain)
    assert document["complete"] is True
    live = sorted(r for (r,) in db.execute("SELECT key FROM app_settings"))
    assert sorted(row["key"] for row in document["tables"]["app_settings"]["rows"]) == live


def test_check_list_and_diff_read_an_encrypted_backup_with_the_identity(stack, data, capsys,
                                                                        key, monkeypatch):
    run(capsys, data, "backup", "--tables", TABLES, "--encrypt-to", key.recipient)
    (name,) = backups(data)
    code, out, err = run(capsys, data, "check", "--file", name, "--identity", str(key.path))
    assert code == 0, err
    assert "intact" in out and "age-encrypted" in out
    # Without an identity: one line saying what to give, exit 3.
    code, _, err = run(capsys, data, "check", "--file", name)
    assert code == 3 and "--identity" in error_line(err, alone=True)
    code, out, _ = run(capsys, data, "list", "--json")
    assert json.loads(out)[0]["status"].startswith("encrypted (age)")
    monkeypatch.setenv("BACKUP_AGE_IDENTITY", str(key.path))
    code, out, _ = run(capsys, data, "list", "--json")
    (entry,) = json.loads(out)
    assert entry["status"] == "ok" and entry["tables"] == 3 and entry["encrypted"] is True
    code, out, err = run(capsys, data, "diff", "--file", name)
    assert code == 0 and out == "", err
    assert key.secret not in everything_written(data)


@pytest.mark.parametrize("damage", ["wrong identity", "a changed byte", "truncated"])
def test_a_wrong_identity_or_a_changed_byte_is_refused_before_any_request(
        stack, data, capsys, key, tmp_path, damage):
    path = make_backup(capsys, data, "--tables", TABLES, "--encrypt-to", key.recipient)
    identity = key.path
    if damage == "wrong identity":
        identity = AgeKey(tmp_path, "other.txt").path
    elif damage == "a changed byte":
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        path.write_bytes(bytes(blob))
    else:
        path.write_bytes(path.read_bytes()[:-100])
    stack.requests.clear()
    for argv in (["restore", "--safe", "--file", path.name], ["diff", "--file", path.name],
                 ["rollback", str(path)], ["check", "--file", path.name]):
        code, _, err = run(capsys, data, *argv, "--identity", str(identity))
        line = error_line(err)
        if damage == "wrong identity":
            assert code == 3 and "no identity in the identity file matches" in line, argv
        else:
            assert code == 7 and "is damaged: age refused it" in line, argv
    assert stack.requests == []  # not one request to the project
    assert files_in(data, "safety_backups") == []
    assert [n for n in backups(data) if n.startswith(".")] == []  # no decrypted copy left


def test_restore_from_s3_with_an_identity_on_a_machine_that_never_saw_the_backup(
        fresh_stack, data, capsys, bucket, key, db, tmp_path, monkeypatch):
    before = database_state(db)
    code, _, err = run(capsys, data, "backup", "--encrypt-to", key.recipient,
                       "--to", bucket.url("prod/"))
    assert code == 0, err
    (name,) = backups(data)
    url = bucket.url(f"prod/{name}")
    db.execute("DELETE FROM payments WHERE id <= 100")
    db.execute("UPDATE packages SET name = 'changed' WHERE id <= 10")
    db.execute("DELETE FROM app_settings")
    # Another machine: an empty data folder, the identity file, the AWS settings, the project.
    fresh = tmp_path / "new-machine"
    code, out, err = run(capsys, fresh, "check", "--file", url, "--identity", str(key.path))
    assert code == 0 and "intact" in out, err
    code, out, err = run(capsys, fresh, "diff", "--file", url, "--identity", str(key.path))
    assert code == supabase_backup.EXIT_DIFFERENCES and "payments" in out, err
    code, _, err = run(capsys, fresh, "restore", "--safe", "--file", url,
                       "--identity", str(key.path))
    assert code == 0, err
    assert_same_state(database_state(db), before)
    log = json.loads((fresh / "summaries" / files_in(fresh, "summaries")[0]).read_text())
    assert log["status"] == "succeeded" and log["backup_file"] == url
    # rollback to the same object makes the tables exactly the file again.
    db.execute("INSERT INTO app_settings (key, value) VALUES ('added.later', '1')")
    code, _, err = run(capsys, fresh, "rollback", url, "--identity", str(key.path))
    assert code == 0, err
    assert_same_state(database_state(db), before)
    assert not any(n.startswith(".fetch-") for n in backups(fresh))  # the copies are gone
    assert key.secret not in everything_written(fresh)


def test_a_remote_object_changed_after_upload_is_refused_by_check_and_restore(
        stack, data, capsys, bucket, tmp_path):
    run(capsys, data, "backup", "--tables", TABLES, "--to", bucket.url())
    (name,) = backups(data)
    head = bucket.head(name)
    # Someone rewrites the object: another valid backup file, with the old metadata.
    document = document_of(bucket.get(name))
    document["tables"]["app_settings"]["rows"] = []
    changed = gzip.compress(json.dumps(document).encode())
    bucket.client.put_object(Bucket=bucket.name, Key=name, Body=changed,
                             Metadata=head["Metadata"])
    stack.requests.clear()
    fresh = tmp_path / "elsewhere"
    for argv in (["check", "--file", bucket.url(name)],
                 ["restore", "--safe", "--file", bucket.url(name)]):
        code, _, err = run(capsys, fresh, *argv)
        assert code == 7
        assert "does not match the SHA-256 recorded when it was uploaded" in error_line(err)
    assert stack.requests == []
    assert files_in(fresh, "safety_backups") == []
    # A name with no object: one line, exit 7.
    code, _, err = run(capsys, fresh, "check", "--file", bucket.url("nothing_here.json.gz"))
    assert code == 7 and "no such object" in error_line(err)


def test_encrypted_safety_backups(fresh_stack, data, capsys, key, monkeypatch, db):
    path = make_backup(capsys, data, "--tables", "app_settings")
    db.execute("INSERT INTO app_settings (key, value) VALUES ('added.later', '1')")
    before = database_state(db)
    monkeypatch.setenv("SAFETY_ENCRYPT_TO", key.recipient)
    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)
    assert code == 0, err
    (safety,) = files_in(data, "safety_backups")  # the encrypted one only; no plain copy
    assert safety.startswith("safety_backup_") and safety.endswith(".json.gz.age")
    blob = (data / "safety_backups" / safety).read_bytes()
    document = document_of(pyrage.decrypt(blob, [pyrage.x25519.Identity.from_str(key.secret)]))
    assert "added.later" in [r["key"] for r in document["tables"]["app_settings"]["rows"]]
    code, out, _ = run(capsys, data, "list-safety", "--json", "--identity", str(key.path))
    (entry,) = json.loads(out)
    assert entry["status"] == "ok" and entry["run"]["outcome"] == "succeeded"
    db.execute("DELETE FROM app_settings WHERE key = 'added.later'")
    code, _, err = run(capsys, data, "rollback", safety, "--identity", str(key.path))
    assert code == 0, err
    assert database_state(db) == before


# --- retention by calendar ----------------------------------------------------------------------

def daily_names(days, end, suffix=".json.gz"):
    """One backup a day at 03:15 UTC for days days up to end (a date), plus a second one at
    15:00 on every tenth day: names only."""
    names = []
    for offset in range(days):
        day = end - datetime.timedelta(days=offset)
        names.append(f"supabase_backup_{day:%Y%m%d}_031500{suffix}")
        if offset % 10 == 0:
            names.append(f"supabase_backup_{day:%Y%m%d}_150000{suffix}")
    return names


def expected_kept(end):
    """What --keep-daily 7 --keep-weekly 4 --keep-monthly 12 keeps of daily_names(365, end),
    worked out by hand from the calendar: the newest backup of each of the last 7 days, 4 ISO
    weeks and 12 months (end = 2026-11-30, a Monday)."""
    kept = {f"supabase_backup_{end - datetime.timedelta(days=d):%Y%m%d}_031500.json.gz"
            for d in range(1, 7)}
    kept.add("supabase_backup_20261130_150000.json.gz")  # today: 15:00 is the newer
    # Weeks end on Sundays: Nov 29, 22, 15; the current week's newest is today's.
    kept |= {"supabase_backup_20261129_031500.json.gz", "supabase_backup_20261122_031500.json.gz",
             "supabase_backup_20261115_031500.json.gz"}
    # Months: the last day of each of the 11 months before, and today's for November. The
    # oldest, 2025-12, has backups from the 1st to the 31st.
    for month_end in ("20261031", "20260930", "20260831", "20260731", "20260630", "20260531",
                      "20260430", "20260331", "20260228", "20260131", "20251231"):
        stamp = "150000" if month_end in {n[16:24] for n in daily_names(365, end)
                                          if n.endswith("150000.json.gz")} else "031500"
        kept.add(f"supabase_backup_{month_end}_{stamp}.json.gz")
    return kept


def test_calendar_rules_keep_what_restic_would_over_a_year_of_daily_backups():
    end = datetime.date(2026, 11, 30)
    names = daily_names(365, end)
    policy = supabase_backup.RetentionPolicy(daily=7, weekly=4, monthly=12)
    plan = supabase_backup.retention_plan(names, policy)
    kept = {name for name, reasons in plan if reasons}
    assert kept == expected_kept(end)
    reasons = dict(plan)
    assert reasons["supabase_backup_20261130_150000.json.gz"] == [
        "daily 2026-11-30", "weekly 2026-W49", "monthly 2026-11"]
    assert reasons["supabase_backup_20261130_031500.json.gz"] == []  # not the day's newest
    # --keep-last counts backups, not days; protect keeps what no rule keeps.
    plan = supabase_backup.retention_plan(names, supabase_backup.RetentionPolicy(last=3),
                                          protect="supabase_backup_20251201_031500.json.gz")
    assert [n for n, r in plan if r] == [
        "supabase_backup_20261130_150000.json.gz", "supabase_backup_20261130_031500.json.gz",
        "supabase_backup_20261129_031500.json.gz", "supabase_backup_20251201_031500.json.gz"]


def test_prune_thins_a_year_locally_and_remotely_and_dry_run_says_why(data, capsys, bucket):
    end = datetime.date(2026, 11, 30)
    names = daily_names(365, end)
    folder = data / "backups"
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(b"x")
        bucket.client.put_object(Bucket=bucket.name, Key=f"y/{name}", Body=b"x")
    bucket.client.put_object(Bucket=bucket.name, Key="y/notes.txt", Body=b"not a backup")
    rules = ["--keep-daily", "7", "--keep-weekly", "4", "--keep-monthly", "12"]
    code, out, err = run(capsys, data, "prune", *rules, "--remote", bucket.url("y/"),
                         "--dry-run")
    assert code == 0, err
    assert len(os.listdir(folder)) == len(names) and len(bucket.keys("y/")) == len(names) + 1
    lines = out.splitlines()
    assert (f"keep    {folder}/supabase_backup_20261130_150000.json.gz  (daily 2026-11-30, "
            f"weekly 2026-W49, monthly 2026-11)") in lines
    assert (f"would delete  {bucket.url('y/')}supabase_backup_20261130_031500.json.gz  "
            f"(no rule keeps it)") in lines
    code, out, err = run(capsys, data, "prune", *rules, "--remote", bucket.url("y/"), "--json")
    assert code == 0, err
    kept = expected_kept(end)
    assert set(os.listdir(folder)) == kept
    assert set(bucket.keys("y/")) == {f"y/{n}" for n in kept} | {"y/notes.txt"}
    report = json.loads(out)
    assert len(report["remote"]["deleted"]) == len(names) - len(kept)


def test_backup_never_deletes_the_file_it_just_wrote(stack, data, capsys, bucket):
    folder = data / "backups"
    folder.mkdir(parents=True)
    future = "supabase_backup_20991231_000000.json.gz"  # newer than any backup made now
    (folder / future).write_bytes(b"x")
    bucket.client.put_object(Bucket=bucket.name, Key=f"z/{future}", Body=b"x")
    code, out, err = run(capsys, data, "backup", "--tables", "app_settings", "--to",
                         bucket.url("z/"), "--keep-last", "1", "--json")
    assert code == 0, err
    names = backups(data)
    assert len(names) == 2 and future in names
    assert len(bucket.keys("z/")) == 2
    new = [n for n in names if n != future][0]
    assert json.loads(out)["deleted"] == []
    assert bucket.keys("z/") == sorted([f"z/{new}", f"z/{future}"])


# --- the heartbeat ------------------------------------------------------------------------------

def test_heartbeat_pings_start_and_success(stack, data, capsys, pings):
    code, _, err = run(capsys, data, "backup", "--tables", "app_settings", "--ping", pings.url)
    assert code == 0, err
    assert [path for path, _ in pings.pings] == ["/ping/abc-123/start", "/ping/abc-123"]
    assert backups(data)[0] in pings.pings[1][1]
    assert stack.service_role_key not in "".join(body for _, body in pings.pings)


def test_heartbeat_fail_carries_the_exit_code_and_never_the_key(stack, data, capsys, pings,
                                                               monkeypatch):
    monkeypatch.setenv("BACKUP_PING_URL", pings.url)
    code, _, err = run(capsys, data, "backup", "--tables", "no_such_table")
    assert code == 3
    line = error_line(err)
    assert [path for path, _ in pings.pings] == ["/ping/abc-123/start", "/ping/abc-123/fail"]
    body = pings.pings[1][1]
    assert body.startswith("exit 3: ") and line.split("error: ", 1)[1] in body
    assert stack.service_role_key not in body


def test_a_ping_that_cannot_be_sent_never_fails_the_backup(stack, data, capsys):
    url = f"http://127.0.0.1:{closed_port()}/ping"
    code, _, err = run(capsys, data, "backup", "--tables", "app_settings", "--ping", url)
    assert code == 0
    assert "heartbeat: could not ping" in err and len(backups(data)) == 1


# --- setup --------------------------------------------------------------------------------------

@pytest.mark.parametrize("package, argv", [
    ("boto3", ["backup", "--to", "s3://some-bucket/x/"]),
    ("pyrage", ["backup", "--encrypt-to", "age1qqqq"]),
])
def test_a_missing_package_is_one_line_saying_what_to_install(stack, tmp_path, package, argv):
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(SUPABASE_URL=stack.url, SUPABASE_SERVICE_ROLE_KEY=stack.service_role_key,
               SUPABASE_BACKUP_DIR=str(tmp_path / "data"))
    code = (f"import sys; sys.modules[{package!r}] = None; sys.path.insert(0, {str(REPO_ROOT)!r}); "
            "import supabase_backup as s; sys.exit(s.main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, *argv], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert f"pip install {package}" in result.stderr
    assert not (tmp_path / "data" / "backups").exists() or \
        os.listdir(tmp_path / "data" / "backups") == []


@pytest.mark.parametrize("argv, message", [
    (["backup", "--encrypt-to", "age1notakey"], "is not an age public key"),
    (["backup", "--to", "s3://A_B/x"], "is not an s3://bucket/prefix/ URL"),
])
def test_bad_settings_are_refused_before_the_backup(stack, data, capsys, argv, message):
    code, _, err = run(capsys, data, *argv)
    assert code == 3 and message in error_line(err, alone=True)
    assert backups(data) == []


def test_a_secret_key_given_as_recipient_is_refused_without_echoing_it(stack, data, capsys, key):
    code, _, err = run(capsys, data, "backup", "--encrypt-to", key.secret)
    assert code == 3 and "secret key" in error_line(err, alone=True)
    assert key.secret not in err and key.secret not in everything_written(data)


def test_local_stack_with_s3_lets_a_user_try_backup_to(tmp_path):
    """`tests/local_supabase.py --s3` prints settings with which `backup` (BACKUP_REMOTE) copies
    its file to the local S3 server; Ctrl-C removes the settings file."""
    env_file = tmp_path / "local.env"
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("AWS_")}
    stack_process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "local_supabase.py"), "--s3", "--env-file",
         str(env_file)], env=clean, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    try:
        wait_for(env_file.exists, timeout=120, what="the local stack to start")
        settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert settings["BACKUP_REMOTE"].startswith("s3://")
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "supabase_backup.py"), "--data-dir",
             str(tmp_path / "data"), "backup", "--tables", "app_settings"],
            env={**clean, **settings}, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        (name,) = os.listdir(tmp_path / "data" / "backups")
        storage = boto3.client("s3", endpoint_url=settings["AWS_ENDPOINT_URL"],
                               region_name=settings["AWS_REGION"],
                               aws_access_key_id=settings["AWS_ACCESS_KEY_ID"],
                               aws_secret_access_key=settings["AWS_SECRET_ACCESS_KEY"])
        bucket, prefix = settings["BACKUP_REMOTE"][5:].split("/", 1)
        body = storage.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
        assert body == (tmp_path / "data" / "backups" / name).read_bytes()
    finally:
        stack_process.send_signal(signal.SIGINT)
        stack_process.wait(timeout=60)
    assert not env_file.exists()


def test_offsite_benchmark_runs_and_writes_its_report(tmp_path):
    """bench/offsite.py --quick, so that it never rots: it completes and reports every figure
    (nothing about speed is asserted)."""
    out = tmp_path / "RESULTS-offsite.md"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "offsite.py"), "--quick",
                             "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    for label in ("| tool upload (SHA-256, upload, HEAD) |", "| bare boto3 upload_file |",
                  "Throughput, tool / bare: **", "| encrypt_backup |", "| decrypt_backup |",
                  "python bench/offsite.py --quick --out"):
        assert label in report, label


def test_the_readme_cron_line_backs_up_encrypts_ships_thins_and_pings(stack, data, capsys,
                                                                      bucket, key, pings):
    """The cron line README.md gives, run with this test's recipient, bucket and ping URL."""
    readme = (REPO_ROOT / "README.md").read_text()
    (line,) = [line for line in readme.splitlines()
               if line.startswith("15 3 * * *") and "--encrypt-to" in line]
    argv = line.split("supabase_backup.py", 1)[1].split()
    swap = {"--encrypt-to": key.recipient, "--to": bucket.url("supabase/"), "--ping": pings.url}
    argv = [swap.get(argv[i - 1], arg) if i else arg for i, arg in enumerate(argv)]
    assert argv[:2] == ["--quiet", "backup"]
    old = [f"supabase_backup_2025{month:02d}15_031500.json.gz.age" for month in range(1, 13)]
    for name in old:
        bucket.client.put_object(Bucket=bucket.name, Key=f"supabase/{name}", Body=b"x")
    code, out, err = run(capsys, data, *argv)
    assert code == 0 and out == "" and err == "", err  # --quiet: nothing unless it fails
    (name,) = backups(data)
    assert name.endswith(".json.gz.age")
    # Shipped, encrypted, byte for byte; thinned by calendar: --keep-monthly 12 keeps this month
    # and the 11 newest of the old months, so January 2025 goes.
    assert bucket.get(f"supabase/{name}") == (data / "backups" / name).read_bytes()
    assert bucket.keys("supabase/") == sorted([f"supabase/{name}"] +
                                              [f"supabase/{n}" for n in old[1:]])
    assert [path for path, _ in pings.pings] == ["/ping/abc-123/start", "/ping/abc-123"]
