#!/usr/bin/env python3
"""Back up and restore the data in a Supabase project, with a safety net.

supabase_backup reads the tables of a Supabase project through its REST API
with the service role key and writes them to one gzip-compressed JSON file.
It restores such a file only behind a safety net: a safety backup of the
current data first, validation before anything is written, verification
afterwards, and an automatic rollback if anything fails (see SAFETY.md).

Commands:
  backup          back up tables (and with --auth the auth users) to
                  backups/supabase_backup_YYYYMMDD_HHMMSS.json.gz
                  (UTC): every table the service role sees, read completely in
                  key order, streamed to a temporary file that is renamed only
                  when complete and then verified; optionally encrypted to an
                  age recipient (--encrypt-to), copied to S3-compatible storage
                  (--to s3://bucket/prefix/), thinned by calendar (--keep-daily
                  ...) and reported to a heartbeat URL (--ping); with --storage
                  also every Storage bucket and object (objects kept once each
                  in backups/objects/, shared between backups)
  check           verify a backup file offline (structure, row counts, checksums;
                  the SHA-256 of every Storage object it refers to)
  list            the backups in backups/ (or at s3://bucket/prefix/), newest
                  first, with tables and rows
  prune           apply the retention rules to backups/ (and the off-site copies)
                  without a backup; --dry-run says what would go and why the
                  rest stays
  restore         restore a backup file (a path, a name in backups/, or
                  s3://bucket/prefix/name); with --safe a safety backup is taken
                  first and a failed restore is rolled back; with --auth the
                  file's auth users the project lacks are created first; --storage
                  also uploads the file's missing and differing Storage objects
  rollback        bring tables (and the Storage buckets it holds) back to exactly
                  the state in a safety backup (rows and objects it lacks are
                  deleted), behind its own safety backup
  list-safety     the safety backups, newest first, with the restore each one
                  protected and its outcome; flags interrupted restores
  cleanup-safety  delete safety backups older than 7 days (never the newest,
                  never one whose restore failed or was interrupted)
  diff            compare a backup file with the live data (exit 10: differs)

Exit codes:
  0    success
  1    unexpected internal error (one line on stderr, traceback only in the
       log file)
  2    usage error (argparse)
  3    configuration error (missing/invalid SUPABASE_URL or key, key that is
       not the service role)
  4    connection or API failure (Supabase, or the S3-compatible storage)
  5    another run holds the lock
  6    backup incomplete (a table could not be read completely; no backup
       file written)
  7    backup file invalid (validation refused it; database untouched)
  8    restore failed and was rolled back (database as before)
  9    restore failed AND rollback failed (critical: the message names the
       rollback command)
  10   differences found (diff)
  11   restore failed and was kept as it is (no --safe, or --no-rollback;
       the message names the rollback command when there is a safety backup)
  12   a file named on the command line does not exist (nothing done)
  13   restore complete, but tables of the file were not restored (read-only
       relations such as views; the last line names them)
  14   off-site copy failed (the local backup is complete and kept; no
       retention ran)
  130  interrupted (Ctrl-C); a restore interrupted after its first write is
       rolled back first and exits 8, a second Ctrl-C stops that rollback

Configuration, read from the environment, else from .env in the working
directory, else from .env next to this script (see .env.example):
  SUPABASE_URL               the project URL, e.g. https://abcd.supabase.co
  SUPABASE_SERVICE_ROLE_KEY  the service role key (SUPABASE_KEY is accepted
                             when SUPABASE_SERVICE_ROLE_KEY is not set)
  SUPABASE_BACKUP_DIR        the data folder holding backups/, safety_backups/,
                             summaries/ and logs/ (default: the folder of
                             this script; --data-dir overrides it)
  BACKUP_TABLES              the tables to back up, comma-separated (default:
                             every table; backup --tables overrides it)
  BACKUP_AUTH                1: backups also keep every auth user (backup --auth)
  BACKUP_STORAGE             1 to back up Storage's buckets and objects too
                             (backup --storage)
  CRITICAL_TABLES            tables a restore requires present and non-empty in
                             the backup (default: none; restore --critical)
  VERIFY_IGNORE_COLUMNS      columns a restore leaves out of verification, e.g.
                             updated_at kept current by a trigger (restore
                             --ignore-columns)
  BACKUP_REMOTE              s3://bucket/prefix/ to copy each backup to
                             (backup --to); credentials, region and endpoint
                             from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
                             AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL
  BACKUP_ENCRYPT_TO          age public key(s) to encrypt backups to (backup
                             --encrypt-to)
  BACKUP_AGE_IDENTITY        the age identity file that decrypts them (--identity)
  SAFETY_ENCRYPT_TO          age public key(s) to encrypt safety backups to
  BACKUP_PING_URL            a healthchecks.io-style URL pinged by backup (--ping)
backup, restore, rollback and diff keep up to --jobs N requests in flight (default 6; 1 is
gentlest on a busy shared project). Every run of a command appends to logs/supabase_backup.log in
the data folder.
The service key is never printed or logged, nor the AWS secret key, nor an age
identity.
"""

# The map of this file: its numbered sections, in the order data flows through them.
#
#    1 Constants and exceptions          15 Restore steps 5 and 7: verify, roll back
#    2 Configuration                     16 Auth users: backup and restore steps (--auth)
#    3 Supabase access (all requests)    17 Storage objects: backup, check, retention
#    4 Schema: what the API says         18 Storage objects: restore and rollback steps
#    5 Backup file format                19 What a restore run's steps share (RunParts)
#    6 Encryption at rest (age)          20 The restore run (RestoreRun)
#    7 Off-site copies (S3)              21 The rollback run (RollbackRun), sequence SQL
#    8 Background work and progress      22 Retention and the heartbeat
#    9 Backup: reading tables            23 Inventory: backups/, safety_backups/, diff
#   10 Restore steps 0 and 2: checking   24 Logs and output
#   11 A table's plan and outcome        25 Commands: backup, check, list
#   12 Comparing a file with live rows   26 Commands: restore, rollback, ..., diff
#   13 Restore step 3: the counts, plan  27 Command line (build_parser, main)
#   14 Restore step 4: writing
#
# The restore flow (SAFETY.md), run by RestoreRun.run(), one method per step:
#   0 read    RestoreRun.read_file      -> scan_backup (every checksum and key), discover_tables
#   1 SAFETY  RestoreRun.safety_backup  -> snapshot (as a backup: read_table per table)
#   2 VALIDATE RestoreRun.validate      -> validate_backup, write_order
#   3 RECORD  RestoreRun.record         -> record_counts (PlanComparison / KeylessComparison)
#   4 RESTORE RestoreRun.restore        -> upsert_restore (write_rows); RollbackRun: delete_extra
#   5 VERIFY  RestoreRun.verify         -> verify_restore (TableComparison)
#   6 LOG     RestoreRun.write_log      -> write_restore_log
#   7 ROLLBACK RestoreRun.recover (a failure in 4-5) -> RunParts.roll_back: a snapshot of the
#             failed state, then rollback
# With --auth (a rollback: a file holding users) each step does the users too, through
# RestoreRun.auth (AuthRestore): 1 snapshot(auth=True), 3 plan_auth_users, 4 write_auth_users
# (before the tables), 5 AuthRestore.verify, 7 AuthRestore.roll_back (after the tables).
# A backup is cmd_backup -> run_backup -> snapshot; diff is diff_tables (TableComparison).
# With Storage (restore --storage; a rollback whose file has it), each step calls the file's
# StorageRestore: 1 snapshot(storage=...) -> back_up_storage, 2 .validate, 3 .plan, 4 .write
# (after the tables), 5 .verify, 7 .undo.

import argparse
import base64
import bisect
import collections
import contextlib
import datetime
import errno
import functools
import fcntl
import gc
import gzip
import hashlib
import io
import itertools
import json
import logging
import logging.handlers
import math
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple

try:
    from dotenv import dotenv_values
except ImportError:  # a Python without the requirements: missing_package() says what to do
    dotenv_values = None

# --- 1. Constants and exceptions ------------------------------------------------------------------

TOOL_VERSION = "0.6.0"
FORMAT_NAME = "supabase_backup"
FORMAT_VERSION = 3
# version 1: values as PostgREST sent them (numeric as text); version 3: entries of other kinds
# than tables (auth users, Storage) beside the tables, each with a "kind" (entry_kind)
READABLE_VERSIONS = (1, 2, 3)

PROG = "supabase_backup.py"
# The data folder defaults to the script's own folder, so that cron, which starts jobs in $HOME,
# still writes next to the script.
SCRIPT_DIR = Path(__file__).resolve().parent

BACKUP_DIR = "backups"
SAFETY_DIR = "safety_backups"
SUMMARY_DIR = "summaries"
LOG_DIR = "logs"
LOG_FILE_NAME = "supabase_backup.log"
LOG_FILE_MAX_BYTES = 5 * 1024 * 1024
LOG_FILE_BACKUPS = 5

# Rows asked for per page. The server may cap lower (Supabase's db-max-rows, 1000 by default);
# paging learns the cap from what comes back instead of assuming it.
PAGE_SIZE = 1000
MIN_PAGE_SIZE = 10  # a page that times out is halved down to this before the table fails
REQUEST_TIMEOUT = 120  # seconds, per request
RETRY_DELAYS = (1.0, 2.0, 4.0)  # seconds before each new attempt at a transient failure
GZIP_LEVEL = 6
WRITE_BATCH_SIZE = 1000  # rows per upsert request; a batch that times out is split
DELETE_BATCH_SIZE = 100  # keys per delete or key-lookup request (they travel in the URL)
DIFF_EXAMPLES = 5  # keys shown per kind of difference
MISMATCHES_LISTED = 100  # mismatches a verification lists per kind and table (all are counted)
THREAD_GRACE = 5  # seconds a reading thread gets to end after its consumer stopped early
# Requests in flight at once (--jobs). Over a link with a round trip of 50 ms, one request at a
# time leaves it idle most of the time; measured in bench/RESULTS-wan.md.
DEFAULT_JOBS = 6
MAX_JOBS = 32  # more would only wait in the project's connection pool
COMPARE_CHUNK = 1000  # file rows compared with the live rows of their key range at a time
GENERATED_COLUMN = "428C9"  # PostgreSQL: cannot insert a non-DEFAULT value into a column
FK_VIOLATION = "23503"

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_CONNECTION = 4
EXIT_LOCKED = 5
EXIT_INCOMPLETE = 6
EXIT_INVALID_BACKUP = 7
EXIT_ROLLED_BACK = 8
EXIT_ROLLBACK_FAILED = 9
EXIT_DIFFERENCES = 10
EXIT_PARTIAL = 11
EXIT_NOT_FOUND = 12
EXIT_NOT_ALL_RESTORED = 13
EXIT_UPLOAD = 14
EXIT_INTERRUPTED = 130

log = logging.getLogger("supabase_backup")


class BackupError(Exception):
    """A failure a person can act on: main() prints the message as one line, exits exit_code."""

    exit_code = EXIT_INTERNAL


class ConfigError(BackupError):
    """The configuration is missing or invalid (SUPABASE_URL, the key, the data folder)."""

    exit_code = EXIT_CONFIG


class ConnectionFailure(BackupError):
    """The Supabase API could not be reached or answered with an error."""

    exit_code = EXIT_CONNECTION


class LockedError(BackupError):
    """Another backup or restore holds the lock on the data folder."""

    exit_code = EXIT_LOCKED


class IncompleteBackupError(BackupError):
    """A table could not be read completely, so no backup file was written."""

    exit_code = EXIT_INCOMPLETE


class TableMissingError(IncompleteBackupError):
    """A table the run was reading is gone from the API (dropped, renamed)."""


class FileMissingError(BackupError):
    """A file named on the command line does not exist; nothing was done."""

    exit_code = EXIT_NOT_FOUND


class ValidationError(BackupError):
    """A backup file was refused before anything was written to the database."""

    exit_code = EXIT_INVALID_BACKUP


class RestoreError(BackupError):
    """A restore failed and was rolled back: the database is as it was before."""

    exit_code = EXIT_ROLLED_BACK


class RollbackFailedError(BackupError):
    """A restore failed and so did its rollback: the message names the command that recovers."""

    exit_code = EXIT_ROLLBACK_FAILED

    def __init__(self, message, rollback_command):
        super().__init__(f"{message}; CRITICAL: the database may be partly restored, "
                         f"run now: {rollback_command}")
        self.rollback_command = rollback_command


class PartialRestoreError(BackupError):
    """A restore failed and was kept as it is (no --safe, or --no-rollback)."""

    exit_code = EXIT_PARTIAL


class UploadError(BackupError):
    """The off-site copy could not be made or verified; the local backup is complete and kept."""

    exit_code = EXIT_UPLOAD


class InterruptedRestore(BackupError):
    """Ctrl-C during a restore: the message names the rollback command."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, rollback_command):
        super().__init__(f"interrupted (Ctrl-C) during the restore; the tables may be partly "
                         f"restored: to return to the state before, run: {rollback_command}")


class Cancelled(Exception):
    """Control flow: the person answered no at a confirmation question; nothing was done."""


# --- 2. Configuration -----------------------------------------------------------------------------
# The settings (environment, then .env files), the data folder and its lock.

URL_PATTERN = re.compile(r"https?://[^/\s]+(/\S*)?")


@dataclass(frozen=True)
class Config:
    """The settings of one run, validated."""

    url: str
    key: str = field(repr=False)
    key_setting: str  # which setting held the key: SUPABASE_SERVICE_ROLE_KEY or SUPABASE_KEY
    data_dir: Path
    sources: tuple  # where the settings were read, highest precedence first
    # Every setting (environment over .env files), for the settings later versions read,
    # such as BACKUP_TABLES. It holds the key too, hence repr=False.
    settings: Mapping = field(repr=False)
    key_source: str = ""  # where the key was read: "environment" or a .env file
    url_source: str = ""  # where SUPABASE_URL was read

    @property
    def key_described(self):
        """The key's setting and where it was read, for messages: an exported variable beats a
        .env file, and a person fixing the key must see which one is in use."""
        return f"{self.key_setting}{where_set(self.key_source)}"

    @property
    def host(self):
        """The project's host name, safe to print and to record in a backup file."""
        return self.url.split("://", 1)[1].split("/", 1)[0]


class DataPaths(NamedTuple):
    """The four folders of the data folder."""

    backups: Path
    safety_backups: Path
    summaries: Path
    logs: Path


def missing_package(package):
    """The ConfigError for a requirement this Python lacks (run with another interpreter than
    the virtual environment's, as `python3 supabase_backup.py` may be)."""
    return ConfigError(f"this Python ({sys.executable}) lacks the package {package}; run the "
                       f"tool with the Python of the virtual environment you installed it in "
                       f"(e.g. .venv/bin/python {PROG} ...), or install the requirements for "
                       f"this one: {sys.executable} -m pip install -r requirements.txt")


def dotenv_files():
    """The .env files to read, highest precedence first: the working directory's, the script's."""
    candidates = []
    try:
        candidates.append(Path.cwd() / ".env")
    except OSError:  # the working directory was deleted under us
        pass
    candidates.append(SCRIPT_DIR / ".env")
    files = []
    for candidate in candidates:
        if candidate.is_file() and not any(candidate.samefile(known) for known in files):
            files.append(candidate)
    return files


def setting_layers(environ=None):
    """Each source of settings as (name, values), highest precedence first; empty means unset."""
    environ = os.environ if environ is None else environ
    layers = [("environment", environ)]
    if dotenv_values is None:
        raise missing_package("python-dotenv")
    for env_file in dotenv_files():
        try:
            values = dotenv_values(env_file, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {env_file}: {exc}; fix or remove that file") from None
        layers.append((str(env_file), values))
    return [(name, {key: value.strip() for key, value in values.items()
                    if value is not None and value.strip()})
            for name, values in layers]


def merge_settings(layers):
    """One mapping of every setting, each taken from the highest-precedence layer that sets it."""
    settings = {}
    for _, values in reversed(layers):
        settings.update(values)
    return settings


def resolve_data_dir(args, settings):
    """The data folder: --data-dir, else SUPABASE_BACKUP_DIR, else the script's folder."""
    value = getattr(args, "data_dir", None) or settings.get("SUPABASE_BACKUP_DIR")
    if not value:
        return SCRIPT_DIR
    # Relative paths are taken from the working directory, like any other path on a command line.
    return (Path.cwd() / Path(value).expanduser()).resolve()


def where_set(source):
    """" (set in the environment)" or " (set in /path/.env)"; "" when unknown."""
    if not source:
        return ""
    return " (set in the environment)" if source == "environment" else f" (set in {source})"


def check_url(url, setting="SUPABASE_URL", source=None):
    """Return the project URL without a trailing slash, or raise ConfigError saying what to fix
    (and where the value was set: an exported variable beats .env)."""
    example = "e.g. https://abcd.supabase.co (Project Settings > API in the dashboard)"
    named = f"{setting}{where_set(source)}"
    if url.startswith(("eyJ", "sb_")):
        # A key pasted into the URL setting: say so without echoing it.
        raise ConfigError(f"{named} holds what looks like an API key; set {setting} to the "
                          f"project URL, {example}")
    if not URL_PATTERN.fullmatch(url):
        shown = url if len(url) <= 60 else url[:57] + "..."
        raise ConfigError(f"{named} is not a valid URL ({shown!r}); set it to the project URL, "
                          f"{example}")
    url = url.rstrip("/")
    if url.endswith("/rest/v1"):
        raise ConfigError(f"{named} must be the project URL without /rest/v1, {example}")
    return url


def load_config(args, environ=None):
    """Read and validate the settings: the environment, then .env in the working directory, then
    .env next to the script. os.environ is never changed."""
    layers = setting_layers(environ)
    settings = merge_settings(layers)

    # The first source that sets either name wins, as for every setting: a key in the environment is
    # never overridden by one in a .env file, whatever its name.
    key_setting, key, key_source = next(
        ((name, values[name], source) for source, values in layers
         for name in ("SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_KEY") if name in values),
        (None, None, None))
    if key:
        # Registered before any other check, so that no message of this run can show it.
        redactor.add(key)

    url = settings.get("SUPABASE_URL")
    if not url:
        raise ConfigError("SUPABASE_URL is not set; set SUPABASE_URL in .env (see .env.example) "
                          "or in the environment to the project URL, e.g. https://abcd.supabase.co")
    url_source = next(source for source, values in layers if "SUPABASE_URL" in values)
    url = check_url(url, source=url_source)
    if not key:
        raise ConfigError("SUPABASE_SERVICE_ROLE_KEY is not set; set it in .env (see .env.example) "
                          "or in the environment to the service_role key from the dashboard "
                          "(Project Settings > API)")

    return Config(url=url, key=key, key_setting=key_setting, key_source=key_source,
                  url_source=url_source,
                  data_dir=resolve_data_dir(args, settings),
                  sources=tuple(name for name, values in layers if values), settings=settings)


def make_private_dir(path, tighten=True):
    """Create a folder only its owner can read (0700); with tighten, also narrow an existing one."""
    advice = "choose a data folder you can write to with --data-dir or SUPABASE_BACKUP_DIR"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"cannot use {path} as a folder: it is a file; {advice}")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if tighten and path.stat().st_mode & 0o077:
            # Backups hold the users' data: other accounts on the machine must not read them.
            os.chmod(path, 0o700)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot use the folder {path}: {reason}; {advice}") from None
    return path


def data_paths(config):
    """The four folders of the data folder, created on demand with mode 0700."""
    make_private_dir(config.data_dir, tighten=False)
    return DataPaths(*(make_private_dir(config.data_dir / name)
                       for name in (BACKUP_DIR, SAFETY_DIR, SUMMARY_DIR, LOG_DIR)))


LOCK_FILE_NAME = ".supabase_backup.lock"


@contextlib.contextmanager
def data_lock(data_dir, command):
    """Hold the data folder's lock for the whole run: one backup or restore at a time."""
    path = Path(data_dir) / LOCK_FILE_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot create the lock file {path}: {exc.strerror or exc}; choose a "
                          f"data folder you can write to (--data-dir)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another run"
            raise LockedError(f"{holder} is using {data_dir}; wait for it to finish (one backup "
                              f"or restore at a time), then run {command} again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"supabase_backup {command} (pid {os.getpid()})".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock, also when the process dies


# --- 3. Supabase access ---------------------------------------------------------------------------
# The only code that makes requests to the project: SupabaseApi.request, the one retry loop,
# through the supabase client's own HTTP session (its URL, key and kept-alive connection), and
# the PostgREST filters it sends, every identifier and value quoted as PostgREST reads quotes.

SERVICE_ROLE = "service_role"
SECRET_KEY_PREFIX = "sb_secret_"
PUBLISHABLE_KEY_PREFIX = "sb_publishable_"
STATEMENT_TIMEOUT = "57014"
# Codes worth another attempt: the gateway's 5xx/429 (the client reports the HTTP status when the
# body is not PostgREST JSON), PostgREST's connection errors, and PostgreSQL's connection, resource,
# shutdown, serialization and internal errors.
TRANSIENT_CODES = {"408", "429", "500", "502", "503", "504", "520", "521", "522", "523", "524",
                   "PGRST000", "PGRST001", "PGRST002", "PGRST003", "40001", "40P01",
                   # the auth server's (GoTrue's error codes, internal/api/apierrors): its
                   # database failing, its own timeout, its rate limits
                   "unexpected_failure", "request_timeout", "over_request_rate_limit"}
TRANSIENT_PREFIXES = ("08", "53", "57P", "XX")
AUTH_CODES = {"401", "PGRST301", "PGRST302", "PGRST303", "22023"}
MISSING_TABLE_CODES = {"PGRST205", "42P01"}


class StatementTimeout(Exception):
    """Control flow: a request hit the server's statement timeout (57014); ask for less."""


class ApiRejected(Exception):
    """Control flow: the server refused a write for a reason retrying cannot cure."""

    def __init__(self, code, message, details=None, hint=None, status=None, not_json=False):
        super().__init__(f"{code} {message}")
        self.code, self.message, self.details, self.hint = code, message, details, hint
        self.status, self.not_json = status, not_json

    @classmethod
    def from_response(cls, response):
        """PostgREST's error body ({"code", "message", "details", "hint"}); a body that is not
        one (a gateway's page) gives the HTTP status as the code."""
        status = response.status_code
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
        if isinstance(body, dict) and ("code" in body or "message" in body):
            # The auth server's older form: {"code": status, "error_code": ..., "msg": ...}.
            return cls(str(body.get("error_code") or body.get("code") or status),
                       str(body.get("message") or body.get("msg") or ""),
                       body.get("details"), body.get("hint"), status)
        # No PostgREST body (a HEAD request, a gateway's page): PostgREST also names the error
        # in its Proxy-Status header ("PostgREST; error=57014").
        match = re.search(r'(?i)(?:^|,)\s*"?postgrest"?\s*;[^,]*?\berror\s*=\s*"?([^";,\s]+)',
                          response.headers.get("Proxy-Status", ""))
        return cls(match.group(1) if match else str(status),
                   response.reason_phrase or f"HTTP {status}", response.text[:300], None, status,
                   not_json=not match)


def key_role(key):
    """The role a key acts as: from the sb_ prefix, or the role claim of a JWT; None if unknown.

    The JWT is decoded, not verified: only the server can verify it. This is a guard against a
    key that would make RLS hide rows silently, not an authentication.
    """
    if key.startswith(SECRET_KEY_PREFIX):
        return SERVICE_ROLE
    if key.startswith(PUBLISHABLE_KEY_PREFIX):
        return "anon"
    parts = key.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        return None
    role = payload.get("role") if isinstance(payload, dict) else None
    return role if isinstance(role, str) else None


def check_key_role(config, allow_rls_limited=False):
    """Refuse a key that is not the service role: RLS would hide rows without any error.

    Returns the role; with allow_rls_limited a weaker key passes with a warning.
    """
    role = key_role(config.key)
    if role == SERVICE_ROLE:
        return role
    what = f"the {role} role" if role else "an unknown role"
    if allow_rls_limited:
        log.warning("%s acts as %s: row level security may hide rows, so this backup may be "
                    "incomplete without any error (--allow-rls-limited)", config.key_described, what)
        return role or "unknown"
    raise ConfigError(f"{config.key_described} is a key for {what}, not the service role: row level "
                      f"security would hide rows without an error; set it to the service_role "
                      f"(secret) key from Project Settings > API, or pass --allow-rls-limited to "
                      f"accept a partial backup")


def is_transient(code):
    """Whether an error code is worth another attempt at the same request."""
    return code in TRANSIENT_CODES or code.startswith(TRANSIENT_PREFIXES)


def is_http_status(code):
    """Whether an error code is an HTTP status (the client's code when the body is not JSON)."""
    return len(code) == 3 and code.isdigit()


class SupabaseApi:
    """The project's REST API through the supabase client's HTTP session: the one place that
    makes requests, with the one retry loop (request) and request counting.

    Requests are built here rather than by the client's query builder, for two reasons the
    builder cannot serve: the bodies and answers stay bytes, so that no value passes through a
    JSON parse that loses digits (a json column's text is sent as it is), and every identifier
    and filter value is quoted as PostgREST reads quotes (the builder leaves `k.1` or ` a7`
    bare, and PostgREST then reads a path or trims the space).
    """

    def __init__(self, config, jobs=1):
        # Imported here: the client takes a moment to import, and --help should not wait for it.
        try:
            from supabase import ClientOptions, create_client
        except ImportError:
            raise missing_package("supabase") from None

        self.url = config.url
        self.key_setting = config.key_described
        self.url_setting = f"SUPABASE_URL{where_set(config.url_source)}"
        import httpx

        # The client's current way to set the timeout: an HTTP session of our making, which
        # every request of the client then goes through (HTTP/2 and redirects as its own).
        self.session = httpx.Client(timeout=REQUEST_TIMEOUT, http2=True, follow_redirects=True)
        options = ClientOptions(httpx_client=self.session,
                                postgrest_client_retry=False)  # retries are ours, see request()
        try:
            self.client = create_client(config.url, config.key, options=options)
        except Exception as exc:  # the client validates the URL and key format
            self.session.close()
            raise ConfigError(f"the supabase client refused the settings: {one_line(exc)}; "
                              f"check {self.url_setting} and {config.key_described}") from None
        # The REST base and headers (apikey, Authorization, the schema's profile) as the client
        # builds them for its own requests.
        self.rest_url = str(self.client.postgrest.base_url).rstrip("/")
        self.headers = dict(self.client.postgrest.headers)
        # The auth server's base and headers as the client's auth.admin sends them (the key, and
        # the API version whose error bodies carry GoTrue's error code as "code").
        self.auth_url = str(self.client.auth_url).rstrip("/")
        self.auth_headers = {"apikey": config.key, "Authorization": f"Bearer {config.key}",
                             "X-Supabase-Api-Version": "2024-01-01"}
        # The same for the Storage API, as the client's storage3 builds them (storage3 has no
        # public accessor for its headers). Its own methods are not used: download() holds a
        # whole object in memory, and none of them would go through request()'s retries.
        self.storage_url = str(self.client.storage_url).rstrip("/")
        self.storage_headers = dict(self.client.storage._headers)
        self.requests = 0
        self.answered = False  # whether the project has answered a request yet
        self._counting = threading.Lock()  # requests are made by several threads
        self.set_jobs(jobs)

    def set_jobs(self, jobs):
        """At most `jobs` requests in flight at once, whatever the number of threads asking
        (--jobs): a slot is held for one HTTP exchange, never across a retry's pause."""
        self.jobs = jobs
        self._slots = threading.BoundedSemaphore(jobs)

    def close(self):
        """Close the HTTP session."""
        self.session.close()

    def request(self, what, method, table=None, params=(), prefer=None, body=None,
                writes=False, auth_path=None, url=None, headers=None, consume=None,
                rejected=()):
        """One request, retried on transient failures; returns the httpx response (2xx).
        With auth_path, a request to the auth server (/auth/v1 + auth_path) instead of the REST
        API.

        Statement timeouts raise StatementTimeout for the caller to ask for less. With writes,
        an error that retrying cannot cure (the server refused the data) raises ApiRejected with
        PostgREST's code, for the caller to split the batch or name the row. Only idempotent
        writes (upserts by key, updates and deletes by key) are retried; a plain insert (a
        table without a key) is sent once.

        The Storage API goes through here too: url (instead of a table) and headers (instead
        of PostgREST's); body may be a callable that makes the body afresh for each attempt (a
        file streamed from disk); consume(response) reads a 2xx answer as it streams in, inside
        the attempt, so that an answer cut off mid-way is retried like a lost connection; the
        HTTP statuses in rejected (e.g. "404") raise ApiRejected for the caller to act on.
        """
        import httpx

        url, headers = self._request_target(auth_path, url, headers, body, prefer)
        path = url or self.rest_url + "/" + (urllib.parse.quote(table, safe="") if table else "")
        attempts = len(RETRY_DELAYS) + 1 if not (writes == "once") else 1
        for attempt in range(1, attempts + 1):
            with self._counting:
                self.requests += 1
            try:
                response = self._attempt(method, path, params, headers,
                                         body() if callable(body) else body, consume)
            except httpx.TransportError as exc:
                if attempt == attempts:
                    raise ConnectionFailure(
                        f"{what}: cannot reach {self.url} ({type(exc).__name__}: "
                        f"{one_line(exc, 120)}) after {attempts} attempts; check "
                        f"{self.url_setting} and the network, then run again") from None
                reason = f"{type(exc).__name__}: {one_line(exc, 120)}"
            else:
                if response.status_code < 400:
                    self.answered = True
                    return response
                reason = self._refused(what, response, writes, rejected, attempt, attempts)
            delay = RETRY_DELAYS[attempt - 1]
            # Until the project has answered once, a failure is most likely a wrong URL: the
            # attempts go to the log file, and the person reads one line.
            log.warning("%s: %s; retrying in %gs (attempt %d of %d)", what, reason, delay,
                        attempt + 1, attempts, extra={FILE_ONLY: not self.answered})
            time.sleep(delay)

    def _request_target(self, auth_path, url, headers, body, prefer):
        """The URL (None: the REST API's) and the headers of one request()."""
        if auth_path:  # the auth server's admin API, with the key as its headers
            url, headers = self.auth_url + auth_path, dict(self.auth_headers)
            if body is not None:
                headers["Content-Type"] = "application/json"
        if headers is None:
            headers = dict(self.headers)
            if body is not None:
                headers["Content-Type"] = "application/json"
        if prefer:
            headers["Prefer"] = prefer
        return url, headers

    def _refused(self, what, response, writes, rejected, attempt, attempts):
        """An answer of 400 or more to request(): raises what the caller acts on, or the
        failure when retrying cannot cure it or attempts ran out; else returns the reason to
        try again."""
        error = ApiRejected.from_response(response)
        code = error.code
        if code == STATEMENT_TIMEOUT:
            raise StatementTimeout(what)
        if str(response.status_code) in rejected:
            raise error
        # A bare HTTP status (three digits) is the gateway's, not PostgREST's; SQLSTATEs
        # such as 23503 are all digits too, but five of them.
        if writes and not is_transient(code) and code not in AUTH_CODES and \
                code not in MISSING_TABLE_CODES and not is_http_status(code):
            raise error
        if not is_transient(code) or attempt == attempts:
            raise self.api_failure(what, error, attempt)
        return f"{code} {one_line(error.message, 120)}"

    def _attempt(self, method, url, params, headers, body, consume):
        """One attempt of request(), holding one of the --jobs slots; with consume, the answer
        is streamed and read by it."""
        with self._slots:
            if consume is None:
                return self.session.request(method, url, params=list(params), headers=headers,
                                            content=body)
            response = self.session.send(self.session.build_request(
                method, url, params=list(params), headers=headers, content=body), stream=True)
            try:
                if response.status_code < 400:
                    consume(response)
                else:
                    response.read()  # the error body, for ApiRejected
            finally:
                response.close()
            return response

    def api_failure(self, what, error, attempts):
        """The BackupError for an API error that retrying did not cure."""
        code, message = error.code, one_line(error.message, 200)
        if code in AUTH_CODES or error.status in (401, 403):
            return ConfigError(f"{what}: the API refused the key ({code} {message}); check "
                               f"{self.key_setting}: it must be the service_role (secret) key "
                               f"(Project Settings > API)")
        if code in MISSING_TABLE_CODES:
            return TableMissingError(f"{what}: {message}")
        if error.not_json and (error.status == 404 or "<html" in (error.details or "").lower()):
            return ConnectionFailure(f"{what}: {self.url} answered HTTP {error.status}, not like "
                                     f"a Supabase project; check {self.url_setting}")
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        return ConnectionFailure(f"{what}: the API answered {code} {message}{tried}")

    def openapi(self):
        """The PostgREST OpenAPI document at /rest/v1/ (service role only on hosted Supabase)."""
        what = "reading the table list (GET /rest/v1/)"
        response = self.request(what, "GET")
        try:
            document = json.loads(response.content)
        except ValueError:
            document = None
        if not isinstance(document, dict) or "definitions" not in document:
            raise ConnectionFailure(f"{what}: {self.url} answered HTTP {response.status_code} "
                                    f"without a PostgREST schema; check {self.url_setting} (the "
                                    f"project URL, e.g. https://abcd.supabase.co)")
        return document

    def count(self, table, method="exact"):
        """The number of rows of a table (a HEAD request with Prefer: count=...)."""
        response = self.request(f"counting {table}", "HEAD", table, [("select", "*")],
                                prefer=f"count={method}")
        total = content_range_total(response)
        if total is None:
            raise ConnectionFailure(f"counting {table}: the API answered without a count")
        return total

    def page(self, table, select, order_by, after, limit, offset=0, until=None, where=(),
             count=False):
        """One page of rows in order_by order: rows after the key values `after` (keyset), or
        from `offset` when the table has no key. Rows come parsed from the answer's bytes: the
        select list casts every value whose JSON number would lose digits to text.

        With `until`, only rows up to those key values (inclusive). With count, the answer is
        (rows, how many rows the range holds after `after`): Prefer: count=exact on a key range
        is an index range count, and it tells when the range is read without a further request.
        """
        params = [("select", select), *where]
        if after is not None:
            params.append(keyset_filter(order_by, after))
        if until is not None:
            params.append(upper_bound_filter(order_by, until))
        if order_by:
            params.append(("order", ",".join(quote_field(c) + ".asc" for c in order_by)))
        params.append(("limit", str(limit)))
        if offset:
            params.append(("offset", str(offset)))
        response = self.request(f"reading {table} (rows after {after!r})" if after is not None
                                else f"reading {table} (offset {offset})", "GET", table, params,
                                prefer="count=exact" if count else None)
        rows = json.loads(response.content)
        if count:
            total = content_range_total(response)
            if total is None:
                raise ConnectionFailure(f"reading {table}: the API answered a range without a "
                                        f"count")
            return rows, total
        return rows

    def upsert(self, table, body, columns, primary_key):
        """Insert or update rows by primary key in one request (Prefer: resolution=merge-
        duplicates, return=minimal); body is the JSON array of the rows, as bytes. Idempotent,
        so it is retried. A table without a key gets a plain insert, sent once: were it sent
        again after an answer lost on the way, its rows would land twice.

        Without Prefer: missing=default, which makes the server take a slower path (about twice
        the time per row): every row of a backup holds every column of its table (scan_backup
        refuses a file where one does not), so no row lacks a value that would become NULL.
        """
        params = [("columns", ",".join(quote_field(c) for c in columns))]
        if primary_key:
            params.append(("on_conflict", ",".join(quote_field(c) for c in primary_key)))
        self.request(f"writing rows to {table}", "POST", table,
                     params, prefer="return=minimal,resolution=merge-duplicates" if primary_key
                     else "return=minimal", body=body, writes=True if primary_key else "once")

    def update_row(self, table, primary_key, key_row, body, columns):
        """Update one row, found by its key values, to the JSON object body (PATCH)."""
        params = [("columns", ",".join(quote_field(c) for c in columns))]
        params += [(quote_field(c), "eq." + filter_text(key_row[c])) for c in primary_key]
        self.request(f"updating a row of {table}", "PATCH", table, params,
                     prefer="return=minimal", body=body, writes=True)

    def update_keys(self, table, primary_key, keys, body, columns):
        """Update the rows with these key value lists to the JSON object body (PATCH)."""
        params = [("columns", ",".join(quote_field(c) for c in columns)),
                  key_filter(primary_key, keys)]
        self.request(f"updating {len(keys)} row(s) of {table}", "PATCH", table, params,
                     prefer="return=minimal", body=body, writes=True)

    def delete_keys(self, table, primary_key, keys):
        """Delete the rows with these key value lists (DELETE with an in or or filter)."""
        self.request(f"deleting {len(keys)} row(s) of {table}", "DELETE", table,
                     [key_filter(primary_key, keys)], prefer="return=minimal", writes=True)

    def delete_where(self, table, where):
        """Delete the rows a filter matches; returns how many (Prefer: count=exact). Sent once:
        the caller knows which rows it matched, and checks the count."""
        response = self.request(f"deleting rows of {table} by value", "DELETE", table, where,
                                prefer="return=minimal,count=exact", writes="once")
        return content_range_total(response)


def content_range_total(response):
    """The total of a Content-Range header ("0-999/5000" -> 5000), None when not counted."""
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def quote_field(name):
    """A column name as PostgREST reads it in select, order, filters, on_conflict and columns:
    double-quoted unless it is a plain identifier (a `.` would start a JSON path, a `,` the next
    item, a space be trimmed)."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def filter_text(value):
    """A value as PostgREST reads it on the right of a top-level filter (taken verbatim:
    booleans lower-case, None as null, everything else its JSON text or string)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return compact_json(value)
    return str(value)


def quote_value(value):
    """A value inside a PostgREST list or logic tree, always double-quoted, so that spaces at
    its ends, commas, dots and parentheses stay in it."""
    text = filter_text(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def key_filter(primary_key, keys):
    """The filter (name, value) for the rows with these key value lists."""
    if len(primary_key) == 1 and all(k[0] != "" for k in keys):
        return (quote_field(primary_key[0]),
                "in.(" + ",".join(quote_value(k[0]) for k in keys) + ")")
    # PostgREST reads in.("") as an empty list, which matches nothing (SqlFragment.hs): a key
    # that is the empty string goes in the or= form.
    return ("or", "(" + ",".join(
        "and(" + ",".join(f"{quote_field(c)}.eq.{quote_value(v)}" for c, v in zip(primary_key, k))
        + ")" for k in keys) + ")")


def equal_filter(columns, row):
    """The filter (name, value) for rows equal to row in every given column (NULL by is.null),
    as PostgreSQL's = sees it; with no column, a filter every row passes (a DELETE needs one)."""
    if not columns:
        return ("or", "(" + ",".join(f"{quote_field(c)}.{test}" for c in row
                                     for test in ("is.null", "not.is.null")) + ")")
    return ("and", "(" + ",".join(
        f"{quote_field(c)}.is.null" if row.get(c) is None else
        f"{quote_field(c)}.eq.{quote_value(row[c])}" for c in columns) + ")")


def keyset_filter(columns, values):
    """Rows strictly after `values` in the order of `columns` (the key): a > x, or a = x and b > y...

    One column is a plain gt filter, which PostgreSQL answers with an index range scan.
    """
    if len(columns) == 1:
        return (quote_field(columns[0]), "gt." + filter_text(values[0]))
    return ("or", "(" + after_branches(columns, values) + ")")


def upper_bound_filter(columns, values):
    """Rows up to `values` (inclusive) in the order of `columns`: not (after values)."""
    if len(columns) == 1:
        return (quote_field(columns[0]), "lte." + filter_text(values[0]))
    return ("not.or", "(" + after_branches(columns, values) + ")")


def after_branches(columns, values):
    """The PostgREST logic tree of "strictly after values": a.gt.x,and(a.eq.x,b.gt.y),..."""
    branches = []
    for i, column in enumerate(columns):
        equal = [f"{quote_field(c)}.eq.{quote_value(v)}" for c, v in zip(columns[:i], values[:i])]
        greater = f"{quote_field(column)}.gt.{quote_value(values[i])}"
        branches.append(f"and({','.join(equal + [greater])})" if equal else greater)
    return ",".join(branches)


# --- 4. Schema: what the API says of each table ---------------------------------------------------
# Pure functions over the OpenAPI document: the tables, their columns, keys and foreign keys,
# how each column's values are read and kept (stored_form), and the order tables are written in.

def discover_tables(openapi):
    """Every relation of the OpenAPI document: name -> its metadata (columns, keys, writable)."""
    paths = openapi.get("paths") or {}
    tables = {}
    for name, definition in (openapi.get("definitions") or {}).items():
        properties = definition.get("properties") or {}
        required = set(definition.get("required") or [])
        columns, primary_key, foreign_keys = [], [], []
        for column, prop in properties.items():
            description = prop.get("description") or ""
            columns.append({"name": column, "type": prop.get("type"), "format": prop.get("format"),
                            "nullable": column not in required,
                            **({"default": prop["default"]} if "default" in prop else {})})
            if "<pk/>" in description:
                primary_key.append(column)
            for fk_table, fk_column in FK_MARKER.findall(description):
                foreign_keys.append({"column": column, "references_table": fk_table,
                                     "references_column": fk_column})
        operations = paths.get(f"/{name}") or {}
        tables[name] = {"columns": columns, "primary_key": primary_key,
                        "foreign_keys": foreign_keys,
                        "writable": "post" in operations,
                        "relation": "table" if "post" in operations else "read-only"}
    return tables


FK_MARKER = re.compile(r"<fk table='([^']+)' column='([^']+)'/>")
# Column formats PostgreSQL cannot sort by (no btree ordering): left out of a no-key table's order.
UNORDERABLE_FORMATS = {"json", "point", "line", "lseg", "box", "path", "polygon", "circle", "xml",
                       "tsvector", "tsquery"}


# Why complex: two ways to choose, each with its own refusals: named tables (--tables or
# BACKUP_TABLES; views allowed), refused when in another schema or unknown, kept as given; else
# every writable table less --exclude, refused when an excluded name is unknown. Each refusal's
# message sits beside the rule it enforces; split, the halves would be tiny and far apart.
def select_tables(discovered, wanted=None, exclude=None):
    """The tables to back up, in name order: the named ones (views too), else every writable one."""
    if wanted:
        missing = [name for name in wanted if name not in discovered]
        other_schema = [name for name in missing if "." in name and name not in discovered]
        if other_schema:
            raise ConfigError(f"{', '.join(other_schema)} is not in the public schema the API "
                              f"serves: a backup holds the tables of public (and with --auth the "
                              f"auth users; not Storage objects, the schema, functions or roles); "
                              f"README's 'Backing up' says what to use for those")
        if missing:
            known = ", ".join(sorted(discovered)) or "(none)"
            raise ConfigError(f"no table named {', '.join(missing)} in the project's API (the "
                              f"service role sees: {known}); check --tables / BACKUP_TABLES")
        return list(wanted)
    exclude = set(exclude or [])
    unknown = exclude - set(discovered)
    if unknown:
        known = ", ".join(sorted(discovered)) or "(none)"
        raise ConfigError(f"--exclude names no table called {', '.join(sorted(unknown))} in the "
                          f"project's API (the service role sees: {known}); check the spelling")
    return [name for name in sorted(discovered)
            if discovered[name]["writable"] and name not in exclude]


# How each column's values travel and are kept (backup format version 2). PostgREST sends a row as
# PostgreSQL's to_json of it, which is exact for the types in NATIVE_FORMATS only: any JSON parser
# turns a number into a binary float (numeric 1.50 -> 1.5, float8 -0 -> 0, jsonb 19.90 -> 19.9),
# an array loses its lower bound, a json value its spacing and duplicate keys. Every other column
# is read as `col::text`, PostgreSQL's own text of the value, and kept as a JSON string
# ("stored_as": "text"); written back as that string, PostgreSQL reads it through the type's
# input function, so the value round-trips exactly. json and jsonb are the exception: a JSON
# string written to them stays a string, so their text ("stored_as": "json_text") is written back
# as raw JSON (row_body).
INTEGER_FORMATS = {"smallint", "integer", "bigint", "int32", "int64"}  # int32/64: PostgREST 14.8+
NATIVE_FORMATS = INTEGER_FORMATS | {"boolean", "text", "character varying", "uuid"}
JSON_FORMATS = {"json", "jsonb"}


def stored_form(column):
    """How a backup made now keeps a column: None (as PostgREST sends it), "text" or
    "json_text". A column of unknown type (metadata guessed from the rows) is kept as sent."""
    fmt = column.get("format")
    if fmt is None or fmt in NATIVE_FORMATS:
        return None
    # PostgREST gives every type a swagger type but json and jsonb (toSwaggerType): a column
    # without one is a JSON document whatever its format says.
    return "json_text" if fmt in JSON_FORMATS or column.get("type") is None else "text"


def with_stored_forms(meta, forms=None):
    """meta with each column's stored_as: from forms ({column: form}, a file's) where it names
    the column, else as a backup made now keeps it."""
    forms = forms or {}
    columns = []
    for column in meta["columns"]:
        plain = {k: v for k, v in column.items() if k != "stored_as"}
        form = forms[column["name"]] if column["name"] in forms else stored_form(column)
        columns.append({**plain, "stored_as": form} if form else plain)
    return {**meta, "columns": columns}


def file_forms(meta):
    """{column: stored_as} of a table in a backup file."""
    return {c["name"]: c.get("stored_as") for c in meta.get("columns") or []}


def json_text_columns(meta):
    """The columns whose values are a json/jsonb document's text, written back as raw JSON."""
    return {c["name"] for c in meta.get("columns") or [] if c.get("stored_as") == "json_text"}


def select_list(meta):
    """The select parameter for a table: every column, cast to text where it is stored so."""
    if not any(c.get("stored_as") for c in meta["columns"]):
        return "*"
    return key_select(meta, [c["name"] for c in meta["columns"]])


def key_select(meta, columns):
    """The select parameter for these columns, each cast to text where it is stored so (the
    split-point probes ask for the key columns only; select_list for every column)."""
    stored = file_forms(meta)
    return ",".join(quote_field(c) + ("::text" if stored.get(c) else "") for c in columns)


def read_order(meta):
    """(order_by columns, paging): the key for keyset paging, else every sortable column."""
    if meta["primary_key"]:
        return list(meta["primary_key"]), "keyset"
    columns = [c["name"] for c in meta["columns"]
               if (c.get("format") or "").lower().removesuffix("[]") not in UNORDERABLE_FORMATS]
    return columns, "offset"


def write_order(tables, foreign_keys):
    """Tables ordered parents before children by their foreign keys (self-references ignored).

    Tables in a cycle keep name order among themselves; their rows still land, because a batch
    refused for a missing parent row (23503) is retried after the others (see upsert_restore).
    Returns (order, cycles) where cycles lists the tables found in a cycle.
    """
    names = set(tables)
    parents = {t: {fk["references_table"] for fk in foreign_keys.get(t, [])
                   if fk["references_table"] in names and fk["references_table"] != t}
               for t in tables}
    order, placed = [], set()
    while len(order) < len(tables):
        ready = sorted(t for t in tables if t not in placed and parents[t] <= placed)
        if not ready:
            cycle = sorted(t for t in tables if t not in placed)
            order.extend(cycle)
            return order, cycle
        order.extend(ready)
        placed.update(ready)
    return order, []


# --- 5. Backup file format ------------------------------------------------------------------------
# One gzip-compressed JSON document that json.load and jq read whole. The writer lays it out one
# row per line, with the metadata of each table on the line before its rows and the count and
# checksum on the line after, so that the reader can stream it in constant memory:
#
#   {"format":"supabase_backup","format_version":2,...,"tables":{
#   "bookings":{"name":"bookings","columns":[...],"primary_key":["id"],...,"rows":[
#   {"id":1,...}
#   ,{"id":2,...}
#   ],"row_count":2,"sha256":"...","count_before":2,"count_after":2}
#   ,"packages":{...
#   },"complete":true,"finished_at":"...","table_count":9,"row_count":13205}
#
# sha256 is over the table's rows in file order, each as compact JSON (row_json) plus "\n".

BACKUP_NAME_PATTERN = re.compile(r"supabase_backup_(\d{8}_\d{6})\.json(?:\.gz)?(?:\.age)?")
TEMP_PREFIX = ".partial-"


# json.dumps with keyword arguments builds a new encoder per call; this one is made once (the
# output is the same bytes).
compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _row_encoder():
    """compact_json for rows, without its cost per call: JSONEncoder.encode makes a new C encoder
    (and a dict to catch cycles) every time, and a row parsed from JSON has no cycles, so one
    is made once. The same bytes, checked on a sample; compact_json where the C encoder is
    missing or differs."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return compact_json

    def refuse(value):
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    try:
        chunks = make(None, refuse, json.encoder.encode_basestring, None, ":", ",", False, False,
                      True)
        sample = {"a": [1, 2.5, -0.0, 10 ** 30, True, None, {"b": "é\n\"\\\u2028"}], "": ""}
        if "".join(chunks(sample, 0)) != compact_json(sample):
            return compact_json
    except Exception:  # another C encoder than this Python's json module expects
        return compact_json
    return lambda row: "".join(chunks(row, 0))


row_json = _row_encoder()
row_json.__doc__ = "A row as the compact JSON the checksum is computed over (key order kept)."


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def timestamp_name(prefix, moment, suffix=".json.gz"):
    """prefix_YYYYMMDD_HHMMSS.suffix, in UTC."""
    return f"{prefix}_{moment.strftime('%Y%m%d_%H%M%S')}{suffix}"


def clear_partial_files(folder):
    """Remove the temporary files of runs that died; called under the lock, so none is live."""
    removed = []
    for path in folder.glob(TEMP_PREFIX + "*"):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)  # a restore's spool of rows to write
            else:
                path.unlink()
            removed.append(path.name)
        except OSError:
            pass
    if removed:
        log.info("removed %d unfinished file(s) left by an earlier run that died: %s",
                 len(removed), ", ".join(removed))


class BackupWriter:
    """Writes a backup file atomically: a temporary name in the same folder, fsync, rename.

    Until finish() the final name does not exist, so a run that dies leaves no file that looks
    whole; the temporary file is removed by abort() or, after kill -9, by the next run.
    """

    def __init__(self, path, header):
        self.path = Path(path)
        self.temp_path = self.path.parent / f"{TEMP_PREFIX}{os.getpid()}-{self.path.name}"
        fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.raw = os.fdopen(fd, "wb")
        self.gzip = gzip.GzipFile(filename="", mode="wb", fileobj=self.raw,
                                  compresslevel=GZIP_LEVEL, mtime=0)
        self.out = CompressingWriter(self.gzip)
        self.tables_written = 0
        self.rows_written = 0
        head = json.dumps(header, ensure_ascii=False, separators=(",", ":"))
        self.out.write(head[:-1].encode() + b',"tables":{\n')
        self._table = None

    def begin_table(self, name, meta):
        """Start a table: its metadata line; rows follow with write_rows()."""
        first = json.dumps({"name": name, **meta}, ensure_ascii=False, separators=(",", ":"))
        sep = b"," if self.tables_written else b""
        self.out.write(sep + json.dumps(name).encode() + b":" + first[:-1].encode()
                       + b',"rows":[\n')
        self._table = {"rows": 0, "sha": hashlib.sha256()}

    def write_rows(self, rows):
        """Append rows to the current table, updating its count and checksum."""
        if not rows:
            return
        table = self._table
        lines = b"\n".join([row_json(row).encode() for row in rows]) + b"\n"
        table["sha"].update(lines)  # the same as line by line, each with its "\n"
        # Each row on a line of its own, with a comma before it from the second row on (compact
        # JSON holds no raw newline: the first len(rows) - 1 are the ones between rows).
        self.out.write((b"," if table["rows"] else b"")
                       + lines.replace(b"\n", b"\n,", len(rows) - 1))
        table["rows"] += len(rows)
        self.rows_written += len(rows)

    @property
    def table_rows(self):
        """The rows of the current table written so far."""
        return self._table["rows"]

    def write_lines(self, blocks, on_rows=None):
        """Append rows given as their lines (compact JSON, each ending in "\n", as write_rows
        makes them), in blocks of any size: the same bytes as write_rows. on_rows(n) is told
        of each block's rows."""
        table, rest = self._table, b""
        for data in blocks:
            data = rest + data
            cut = data.rfind(b"\n") + 1
            data, rest = data[:cut], data[cut:]
            if data:
                rows = data.count(b"\n")
                table["sha"].update(data)
                self.out.write((b"," if table["rows"] else b"")
                               + data[:-1].replace(b"\n", b"\n,") + b"\n")
                table["rows"] += rows
                self.rows_written += rows
                if on_rows is not None:
                    on_rows(rows)
        if rest:
            raise OSError("a spool of rows ended inside a line")

    def end_table(self, **trailer):
        """Close the current table; returns (row_count, sha256)."""
        table, self._table = self._table, None
        count, digest = table["rows"], table["sha"].hexdigest()
        tail = json.dumps({"row_count": count, "sha256": digest, **trailer},
                          ensure_ascii=False, separators=(",", ":"))
        self.out.write(b"]," + tail[1:].encode() + b"\n")
        self.tables_written += 1
        return count, digest

    def finish(self, **trailer):
        """Write the closing line, fsync, and rename into place; the file is whole from here on."""
        tail = json.dumps({"complete": True, **trailer}, ensure_ascii=False, separators=(",", ":"))
        self.out.write(b"}," + tail[1:].encode() + b"\n")
        self.out.close()
        self.gzip.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        self.raw.close()
        os.replace(self.temp_path, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self):
        """Throw the unfinished file away."""
        for closer in (self.out.abort, self.gzip.close, self.raw.close):
            try:
                closer()
            except Exception:  # the file is being thrown away; closing errors do not matter
                pass
        try:
            self.temp_path.unlink()
        except OSError:
            pass


def fsync_dir(folder):
    """Make a rename durable (the folder's entry reaches the disk)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CountingReader(io.RawIOBase):
    """A file whose reads are counted: on_read(bytes) after each (a progress bar over a
    file)."""

    def __init__(self, raw, on_read):
        self.raw, self.on_read = raw, on_read

    def readable(self):
        return True

    def readinto(self, buffer):
        count = self.raw.readinto(buffer)
        if count:
            self.on_read(count)
        return count

    def seek(self, offset, whence=io.SEEK_SET):
        return self.raw.seek(offset, whence)

    def tell(self):
        return self.raw.tell()

    def seekable(self):
        return True

    def close(self):
        self.raw.close()
        super().close()


def open_backup(path, on_read=None):
    """A binary stream of the decompressed file (.json.gz, or plain .json); on_read(bytes) is
    told of every read of the file itself (progress.over_file)."""
    path = Path(path)
    if path.is_dir():
        raise ValidationError(f"{path} is a folder, not a backup file; give the path of a "
                              f".json.gz file")
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise ValidationError(f"cannot open {path}: {exc.strerror or exc}; check the path "
                              f"(`python {PROG} list` shows the backups)") from None
    magic = raw.read(2)
    raw.seek(0)
    if on_read is not None:
        raw = io.BufferedReader(CountingReader(raw, on_read), buffer_size=1 << 16)
    if magic == b"\x1f\x8b":
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), buffer_size=1 << 20)
    return raw


def _json_error(exc):
    """Why json.loads refused bytes: the parser's message, or bytes that are not UTF-8."""
    return exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"


def _parse_line(path, number, text):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValidationError(f"{path.name} is damaged: line {number} is not valid JSON "
                              f"({_json_error(exc)}); use another backup") from None


def read_backup(path, parse_rows=True, as_bytes=False, on_read=None):
    """Stream a backup file: yields ("header", dict), ("table", name, meta), ("row", name, row),
    ("end_table", name, trailer), ("end", trailer).

    Checks as it goes: the format, that every table's rows match its row_count and sha256, and
    that the document is complete. A problem raises ValidationError naming it. Without
    parse_rows the rows are checked by their bytes only (the checksum) and yielded as None; with
    as_bytes they are yielded as those bytes (the row's compact JSON, what the checksum covers),
    unparsed: parse_row() reads one when it is needed.
    """
    path = Path(path)
    stream = open_backup(path, on_read)
    try:
        try:
            first = stream.readline()
            # Another layout (e.g. re-indented by jq) is read whole, so damage shows up here.
            whole = None if first.startswith(b'{"format":') else first + stream.read()
        except (OSError, EOFError, zlib.error) as exc:
            raise ValidationError(f"{path.name} is not a readable backup ({exc}); "
                                  f"use another backup") from None
        if whole is not None:
            yield from _read_whole(path, whole, as_bytes)
            return
        yield from _read_lines(path, first, stream, parse_rows, as_bytes)
    finally:
        stream.close()


class BackupTable:
    """One table of a backup file, as read_tables() yields it: name, meta (its metadata), rows
    (an iterator, read once: each row parsed, or the bytes of its line with as_bytes) and, once
    the rows are read, trailer (row_count, sha256 and the counts of the backup)."""

    def __init__(self, name, meta, events):
        self.name, self.meta, self.trailer = name, meta, None
        self.kind = entry_kind(meta)  # None for a table
        self.columns = [column["name"] for column in meta.get("columns") or []]
        self._events = events
        self.rows = self._rows()

    def _rows(self):
        for event in self._events:
            if event[0] != "row":  # the end of the table
                self.trailer = event[2]
                return
            yield event[2]

    def finish(self):
        """Read past the rows not taken (the next table follows them in the file)."""
        for _ in self.rows:
            pass


def entry_kind(meta):
    """What an entry of a file's "tables" holds: None for a table of the REST API, else its
    "kind" (storage_buckets, storage_objects, ...). Decided on the kind, never on the name: a
    table may be called "storage.objects" too."""
    kind = meta.get("kind") if isinstance(meta, dict) else None
    return kind if isinstance(kind, str) else None


TABLES_ONLY = (None,)  # read_tables(kinds=...): the REST API's tables, the other entries skipped


def read_tables(path, parse_rows=True, as_bytes=False, label=None, header=None,
                kinds=TABLES_ONLY, skipped=None):
    """The entries of a backup file in file order, as BackupTable objects: the one way the file
    is read (read_backup checks format, checksums and completeness as it goes, and raises
    ValidationError). By default only tables (kind None); kinds names the kinds wanted (None in
    it: tables), kinds=None every entry; the others are read past, their checksums checked,
    and named in skipped (a list) with their kinds. header, a dict, receives the file's header;
    with label, a progress bar over the file says which table is being read."""
    with (progress.over_file(label, path) if label else contextlib.nullcontext()) as on_read:
        events = read_backup(path, parse_rows, as_bytes, on_read)
        for event in events:
            if event[0] == "header" and header is not None:
                header.update(event[1])
            elif event[0] == "table":
                if label:
                    progress.describe(f"{label}: {event[1]}")
                table = BackupTable(event[1], event[2], events)
                if kinds is None or table.kind in kinds:
                    yield table
                elif skipped is not None:
                    skipped.append((table.name, table.kind))
                table.finish()


def parse_row(line):
    """A row from its line (read_backup with as_bytes), which the file's checksum vouched for."""
    try:
        return json.loads(line)
    except ValueError as exc:
        raise ValidationError(f"a row of the backup file is not valid JSON ({_json_error(exc)}); "
                              f"was the file changed during the run? use another backup") from None


def _check_header(path, header):
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ValidationError(f"{path.name} is not a supabase_backup file (no "
                              f"\"format\": \"{FORMAT_NAME}\"); give a file this tool wrote")
    version = header.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValidationError(f"{path.name} has format version {version!r}; this tool "
                              f"({TOOL_VERSION}) reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}; use a matching "
                              f"version of supabase_backup.py")


def upgraded_meta(header, meta):
    """A table's metadata as version 2 says it: a version-1 file kept numeric columns as text
    (numeric_as_text) and every other column as PostgREST sent it."""
    if header.get("format_version") != 1:
        return meta
    columns = [{**c, "stored_as": "text"} if meta.get("numeric_as_text") and
               c.get("format") == "numeric" else c for c in meta.get("columns") or []]
    return {**meta, "columns": columns}


# Why complex: one state machine over a streamed file tells apart a row line, a table's opening
# line, its closing record (row count and checksum compared), the file's closing record (complete
# or not) and anything else, and refuses data after the end or a file that stops early. The current
# table, its row count and digest are state every branch shares: they cannot become functions alone.
def _read_lines(path, first, stream, parse_rows=True, as_bytes=False):
    """The streaming reader for the layout BackupWriter writes."""
    if not first.endswith(b',"tables":{\n'):
        raise ValidationError(f"{path.name} is damaged: its first line is not a backup header; "
                              f"use another backup")
    header = _parse_line(path, 1, first[:-len(b',"tables":{\n')] + b"}")
    _check_header(path, header)
    yield ("header", header)
    number, table, rows, sha, finished = 1, None, 0, None, False
    try:
        for line in stream:
            number += 1
            if finished:
                raise ValidationError(f"{path.name} is damaged: data after the end (line "
                                      f"{number}); use another backup")
            if table is not None and (line.startswith(b"{") or line.startswith(b",{")):
                body = line[1:] if line.startswith(b",") else line
                body = body.rstrip(b"\n")
                row = (body if as_bytes else
                       _parse_line(path, number, body) if parse_rows else None)
                sha.update(body + b"\n")
                rows += 1
                yield ("row", table, row)
            elif table is not None and line.startswith(b"],"):
                trailer = _parse_line(path, number, b"{" + line[2:])
                if trailer.get("row_count") != rows or trailer.get("sha256") != sha.hexdigest():
                    raise ValidationError(
                        f"{path.name} is damaged: table {table} holds {rows} rows with checksum "
                        f"{sha.hexdigest()[:12]}..., but its record says "
                        f"{trailer.get('row_count')} rows, {str(trailer.get('sha256'))[:12]}...; "
                        f"use another backup")
                yield ("end_table", table, trailer)
                table = None
            elif table is None and line.endswith(b',"rows":[\n'):
                text = line[1:] if line.startswith(b",") else line
                name_end = text.index(b":{") if b":{" in text else -1
                if name_end < 0:
                    raise ValidationError(f"{path.name} is damaged at line {number}; use "
                                          f"another backup")
                name = _parse_line(path, number, text[:name_end])
                meta = _parse_line(path, number, text[name_end + 1:-len(b',"rows":[\n')] + b"}")
                table, rows, sha = name, 0, hashlib.sha256()
                yield ("table", name, upgraded_meta(header, meta))
            elif table is None and line.startswith(b"},"):
                trailer = _parse_line(path, number, b"{" + line[2:])
                if trailer.get("complete") is not True:
                    break
                finished = True
                yield ("end", trailer)
            else:
                raise ValidationError(f"{path.name} is damaged at line {number} (unexpected "
                                      f"content); use another backup")
    except (OSError, EOFError, zlib.error) as exc:
        raise ValidationError(f"{path.name} is damaged or truncated ({exc}); use another "
                              f"backup") from None
    if not finished:
        raise ValidationError(f"{path.name} is incomplete: it ends before its closing record "
                              f"(truncated?); use another backup")


def _read_whole(path, data, as_bytes=False):
    """A backup in the same format but another layout (e.g. re-indented by jq): read it whole."""
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ValidationError(f"{path.name} is not a supabase_backup file (not valid JSON: "
                              f"{_json_error(exc)}); give a file this tool wrote") from None
    _check_header(path, document)
    if document.get("complete") is not True or not isinstance(document.get("tables"), dict):
        raise ValidationError(f"{path.name} is incomplete (no \"complete\": true); use another "
                              f"backup")
    header = {k: v for k, v in document.items() if k not in ("tables",)}
    yield ("header", header)
    for name, table in document["tables"].items():
        rows = table.get("rows")
        if not isinstance(rows, list):
            raise ValidationError(f"{path.name}: table {name} has no rows list; use another "
                                  f"backup")
        meta = {k: v for k, v in table.items()
                if k not in ("rows", "row_count", "sha256", "count_before", "count_after",
                             "count_method")}
        yield ("table", name, upgraded_meta(header, meta))
        sha = hashlib.sha256()
        for row in rows:
            line = row_json(row).encode()
            sha.update(line + b"\n")
            yield ("row", name, line if as_bytes else row)
        if table.get("row_count") != len(rows) or table.get("sha256") != sha.hexdigest():
            raise ValidationError(f"{path.name} is damaged: table {name} does not match its "
                                  f"row count and checksum; use another backup")
        yield ("end_table", name, {k: table.get(k) for k in
                                   ("row_count", "sha256", "count_before", "count_after")})
    yield ("end", {"complete": True, "finished_at": document.get("finished_at")})


def check_backup(path):
    """Read a whole backup, verifying it; returns (header, {table: trailer}) or raises."""
    header, tables = {}, {}
    # The checksums are over the rows' bytes: a file whose checksums match holds exactly the
    # rows that were written, so the rows need not be parsed here.
    for table in read_tables(path, parse_rows=False, label=f"checking {Path(path).name}",
                             header=header, kinds=None):
        table.finish()
        tables[table.name] = {"meta": table.meta, **table.trailer}
    return header, tables


def only_tables(entries):
    """The tables of check_backup's entries (kind None): what list, diff and restore count."""
    return {name: entry for name, entry in entries.items() if entry_kind(entry["meta"]) is None}


# --- 6. Encryption at rest (age) ------------------------------------------------------------------
# A backup encrypted to an age recipient is the whole .json.gz file run through age
# (https://age-encryption.org/v1): name.json.gz.age, which `age -d -i key.txt` turns back into
# the same .json.gz. pyrage's encrypt_io/decrypt_io stream 64 KiB chunks, so memory stays flat
# (measured: 11 MB peak RSS for a 200 MB file, bench/RESULTS-offsite.md). age authenticates
# every chunk: a changed byte fails decryption, so a file is never read unverified. pyrage is
# imported only by the code that needs it.

AGE_SUFFIX = ".age"
AGE_MAGIC = (b"age-encryption.org/v1\n", b"-----BEGIN AGE ENCRYPTED FILE-----")
FETCH_PREFIX = ".fetch-"  # a private folder holding a fetched or decrypted copy while in use


def import_pyrage():
    """The pyrage module, or ConfigError saying how to install it."""
    try:
        import pyrage
    except ImportError:
        raise ConfigError("encrypted backups need the pyrage package, which is not installed; "
                          "install it with `.venv/bin/pip install pyrage` (or -r "
                          "requirements.txt)") from None
    return pyrage


def age_recipients(text, setting):
    """The age recipients in text (age1... or ssh public keys, comma-separated); ConfigError
    naming the setting when one is not a public key."""
    pyrage = import_pyrage()
    recipients = []
    for item in (part.strip() for part in text.split(",")):
        if item.startswith("AGE-SECRET-KEY-"):
            # Never echo it: it is the secret half.
            raise ConfigError(f"{setting} holds an age secret key (an identity); give the public "
                              f"key, the age1... line that `age-keygen -y` prints")
        kind = pyrage.ssh if item.startswith("ssh-") else pyrage.x25519
        try:
            recipients.append(kind.Recipient.from_str(item))
        except Exception:
            shown = item if len(item) <= 70 else item[:67] + "..."
            raise ConfigError(f"{setting}: {shown!r} is not an age public key (age1..., as "
                              f"`age-keygen` prints) nor an ssh public key") from None
    if not recipients:
        raise ConfigError(f"{setting} names no age public key")
    return recipients


def age_identities(path, setting):
    """The identities in an age identity file (the output of age-keygen); each is registered with
    the log filter so that no message can show it. ConfigError when unreadable or empty."""
    pyrage = import_pyrage()
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{setting}: cannot read the age identity file {path} "
                          f"({getattr(exc, 'strerror', None) or exc}); give the file "
                          f"age-keygen wrote") from None
    identities = []
    for line in (line.strip() for line in lines):
        if not line or line.startswith("#"):
            continue
        redactor.add(line)
        try:
            identities.append(pyrage.x25519.Identity.from_str(line))
        except Exception:
            raise ConfigError(f"{setting}: {path} holds a line that is not an age identity "
                              f"(AGE-SECRET-KEY-1...); give the file age-keygen wrote") from None
    if not identities:
        raise ConfigError(f"{setting}: {path} holds no age identity (AGE-SECRET-KEY-1...)")
    return identities


def is_encrypted(path):
    """True when the file is age-encrypted (by its first bytes, whatever its name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(40)
    except OSError:
        return False
    return head.startswith(AGE_MAGIC)


def plain_name(name):
    """supabase_backup_X.json.gz.age -> supabase_backup_X.json.gz."""
    return name[:-len(AGE_SUFFIX)] if name.endswith(AGE_SUFFIX) else name


def encrypt_backup(plain, target, recipients):
    """Encrypt a complete, verified backup file to target (written under a temporary name,
    fsynced and renamed, like every file), streaming; returns target."""
    pyrage = import_pyrage()
    temp = target.parent / f"{TEMP_PREFIX}{os.getpid()}-{target.name}"
    try:
        with open(plain, "rb") as source, open(temp, "wb", opener=private_opener) as out:
            pyrage.encrypt_io(source, out, recipients)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_dir(target.parent)
    return target


def decrypt_backup(encrypted, target, identities, shown):
    """Decrypt an age file to target (private), streaming. A wrong identity, or a changed byte
    anywhere in the file, is refused with one line: age authenticates every chunk."""
    pyrage = import_pyrage()
    try:
        with open(encrypted, "rb") as source, open(target, "wb", opener=private_opener) as out:
            pyrage.decrypt_io(source, out, identities)
    except pyrage.DecryptError as exc:
        if "no matching keys" in str(exc).lower():
            raise ConfigError(f"cannot decrypt {shown}: no identity in the identity file matches "
                              f"its recipients (the wrong --identity / BACKUP_AGE_IDENTITY, or "
                              f"its header was changed); nothing was done") from None
        raise ValidationError(f"{shown} is not a readable age file ({exc}); use another "
                              f"backup; nothing was done") from None
    except OSError as exc:
        if exc.errno is not None:  # the disk, not the file's content
            raise
        raise ValidationError(f"{shown} is damaged: age refused it ({exc}: a byte was changed or "
                              f"the file is truncated); use another backup; nothing was "
                              f"done") from None
    return target


def clear_dead_fetches(folder):
    """Remove the private copies of runs that died (their process is gone)."""
    for path in folder.glob(FETCH_PREFIX + "*"):
        try:
            pid = int(path.name[len(FETCH_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, OSError):
            pass


@contextlib.contextmanager
def private_folder(data_dir):
    """A folder only this run uses, for a fetched or decrypted copy: in the data folder's
    backups/ (a run that died leaves it for the next run to remove), else the system's temp."""
    parent = Path(data_dir) / BACKUP_DIR if data_dir else None
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        parent = None
    else:
        clear_dead_fetches(parent)
    with tempfile.TemporaryDirectory(prefix=f"{FETCH_PREFIX}{os.getpid()}-", dir=parent) as folder:
        yield Path(folder)


class BackupSource(NamedTuple):
    """A backup named on the command line, made readable: path is a plain local file, verified as
    far as its source allows; shown is how the user named it (a path or an s3:// URL)."""

    path: Path
    shown: str
    encrypted: bool


@contextlib.contextmanager
def readable_backup(source, settings, identity=None, data_dir=None):
    """Yield a BackupSource for source, a local path or an s3:// URL.

    An s3:// object is fetched to a private folder and its SHA-256 checked against the one
    recorded when it was uploaded; an age file is decrypted there with the identity (--identity,
    else BACKUP_AGE_IDENTITY). The copies are removed when the block ends. The normal checks of
    the backup file (format, checksums) are the caller's, as for any file."""
    shown = str(source)
    with contextlib.ExitStack() as stack:
        folder = None
        if is_remote(shown):
            folder = stack.enter_context(private_folder(data_dir))
            path = fetch_remote_backup(shown, folder, settings)
        else:
            path = Path(source)
        if not is_encrypted(path):
            yield BackupSource(path, shown, False)
            return
        setting = "--identity" if identity else "BACKUP_AGE_IDENTITY"
        identity = identity or settings.get("BACKUP_AGE_IDENTITY")
        if not identity:
            raise ConfigError(f"{path.name} is encrypted (age); give the identity file that "
                              f"decrypts it with --identity FILE or BACKUP_AGE_IDENTITY; nothing "
                              f"was done")
        identities = age_identities(identity, setting)
        if folder is None:
            folder = stack.enter_context(private_folder(data_dir))
        target = folder / plain_name(path.name)  # the file's own name, for messages and logs
        if target == path:
            target = folder / ("plain-" + target.name)
        decrypt_backup(path, target, identities, shown)
        yield BackupSource(target, shown, True)


# --- 7. Off-site copies (S3) ----------------------------------------------------------------------
# The only code that talks to S3-compatible storage (AWS S3, R2, B2, MinIO, Supabase Storage),
# through boto3, imported here only. Credentials, region and endpoint are boto3's own settings
# (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION,
# AWS_ENDPOINT_URL, ~/.aws/config), read from the environment or .env like every setting.
#
# A copy is made only of a complete, verified local file. S3 shows an object under its name only
# once its PUT or its multipart upload completes, so a run that dies leaves nothing under the
# final name; a failed multipart upload is aborted by s3transfer, and one left by a killed run is
# aborted by the next run with a remote (the marker file .upload-NAME.json names it). The file's
# SHA-256 travels as the object's metadata (x-amz-meta-sha256), is checked by a HEAD after the
# upload, and against the bytes fetched before any use.

REMOTE_PATTERN = re.compile(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?")
UPLOAD_MARKER_PREFIX = ".upload-"
S3_PART_SIZE = 16 * 1024 * 1024  # multipart above this size, in parts of this size
S3_CONCURRENCY = 4  # parts in flight at once: at most this many parts are held in memory
S3_ATTEMPTS = 5  # per request, by botocore's standard retry mode (backoff with jitter)
S3_TIMEOUT = 60  # seconds to connect or to wait for an answer


class RemoteLocation(NamedTuple):
    """An s3://bucket/prefix/ folder; prefix is empty or ends with /."""

    bucket: str
    prefix: str

    def url(self, name=""):
        return f"s3://{self.bucket}/{self.prefix}{name}"


def is_remote(text):
    return str(text).startswith("s3://")


def parse_remote(url, setting):
    """An s3://bucket/prefix/ folder (the prefix taken as a folder); ConfigError when it is not
    one."""
    match = REMOTE_PATTERN.fullmatch(url)
    if not match:
        raise ConfigError(f"{setting}: {url!r} is not an s3://bucket/prefix/ URL (a bucket name "
                          f"of 3-63 lowercase letters, digits, dots and dashes)")
    prefix = (match.group(2) or "").lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return RemoteLocation(match.group(1), prefix)


def parse_remote_file(url):
    """(RemoteLocation, name) of an s3://bucket/prefix/name object URL."""
    match = REMOTE_PATTERN.fullmatch(url)
    key = (match.group(2) or "") if match else ""
    if not key or key.endswith("/"):
        raise ConfigError(f"{url!r} does not name an object; give s3://bucket/prefix/NAME "
                          f"(`python {PROG} list s3://bucket/prefix/` shows them)")
    folder, _, name = key.rpartition("/")
    return RemoteLocation(match.group(1), folder + "/" if folder else ""), name


def import_boto3():
    """boto3 and botocore's Config, or ConfigError saying how to install them."""
    try:
        import boto3
        import boto3.s3.transfer
        import botocore.config
    except ImportError:
        raise ConfigError("off-site copies need the boto3 package, which is not installed; "
                          "install it with `.venv/bin/pip install boto3` (or -r "
                          "requirements.txt)") from None
    return boto3, botocore.config.Config


def s3_client(settings):
    """A boto3 S3 client from the AWS settings (environment over .env; boto3's own config files
    for what neither sets). The secret key is registered with the log filter first."""
    boto3, Config = import_boto3()
    import botocore.exceptions
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if settings.get(name):
            redactor.add(settings[name])
    endpoint = settings.get("AWS_ENDPOINT_URL_S3") or settings.get("AWS_ENDPOINT_URL")
    try:
        session = boto3.session.Session(
            aws_access_key_id=settings.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=settings.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=settings.get("AWS_SESSION_TOKEN"),
            region_name=settings.get("AWS_REGION") or settings.get("AWS_DEFAULT_REGION"),
            profile_name=settings.get("AWS_PROFILE"))
        # Path-style requests (endpoint/bucket/key) are what MinIO and Supabase Storage need,
        # and what R2 and B2 accept; AWS itself gets its default.
        config = Config(retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"},
                        connect_timeout=S3_TIMEOUT, read_timeout=S3_TIMEOUT,
                        s3={"addressing_style": "path" if endpoint else "auto"})
        return session.client("s3", endpoint_url=endpoint, config=config)
    except botocore.exceptions.ProfileNotFound:
        raise ConfigError(f"AWS_PROFILE: no profile {settings.get('AWS_PROFILE')!r} in the AWS "
                          f"config files (~/.aws/config, ~/.aws/credentials)") from None
    except ValueError as exc:  # e.g. an endpoint URL that is not a URL
        raise ConfigError(f"the S3 settings are invalid: {one_line(exc, 200)} (check "
                          f"AWS_ENDPOINT_URL)") from None


def s3_failure(exc, what, location, key=None):
    """(exception class, one line) for a failed request to the storage: what went wrong and
    what to do, never a credential."""
    import botocore.exceptions as errors
    where = location.url(key[len(location.prefix):] if key else "")
    if isinstance(exc, (errors.NoCredentialsError, errors.PartialCredentialsError)):
        return ConfigError, (f"{what} {where}: no AWS credentials; set AWS_ACCESS_KEY_ID and "
                             f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if isinstance(exc, (errors.EndpointConnectionError, errors.ConnectTimeoutError,
                        errors.ReadTimeoutError, errors.ConnectionClosedError)):
        return ConnectionFailure, (f"{what} {where}: cannot reach the storage "
                                   f"({one_line(exc, 160)}) after {S3_ATTEMPTS} attempts; check "
                                   f"AWS_ENDPOINT_URL and the network")
    if isinstance(exc, errors.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or exc.response.get("ResponseMetadata", {})
                   .get("HTTPStatusCode"))
        if code == "NoSuchBucket":
            return ConfigError, (f"{what} {where}: the bucket {location.bucket} does not exist; "
                                 f"create it, or check the s3:// URL (--to, BACKUP_REMOTE)")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                    "ExpiredToken", "AuthorizationHeaderMalformed"):
            return ConfigError, (f"{what} {where}: the storage refused the credentials ({code}); "
                                 f"check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                                 f"AWS_PROFILE)")
        if code in ("AccessDenied", "403"):
            return ConfigError, (f"{what} {where}: access denied; the credentials need "
                                 f"s3:PutObject, s3:GetObject, s3:ListBucket and s3:DeleteObject "
                                 f"on the bucket")
        if code in ("NoSuchKey", "404", "NotFound"):
            return ValidationError, (f"{what} {where}: no such object; `python {PROG} list "
                                     f"{location.url()}` shows the backups there")
        return ConnectionFailure, (f"{what} {where}: the storage answered {code}: "
                                   f"{one_line(error.get('Message') or exc, 160)}")
    return ConnectionFailure, f"{what} {where}: {type(exc).__name__}: {one_line(exc, 200)}"


def s3_call(what, location, call, key=None, failure=None, **kwargs):
    """call(**kwargs), a boto3 request; its failure raised as one line (failure overrides the
    exception class, e.g. UploadError during a backup)."""
    import boto3.exceptions
    import botocore.exceptions
    try:
        return call(**kwargs)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
            boto3.exceptions.S3UploadFailedError) as exc:
        if isinstance(exc, boto3.exceptions.S3UploadFailedError) and exc.__context__:
            exc = exc.__context__  # upload_file wraps the request's own error
        kind, text = s3_failure(exc, what, location, key)
        raise (failure or kind)(text) from None


def file_sha256(path):
    """(hex SHA-256, size) of a file, read 1 MiB at a time."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def transfer_config():
    boto3, _ = import_boto3()
    return boto3.s3.transfer.TransferConfig(
        multipart_threshold=S3_PART_SIZE, multipart_chunksize=S3_PART_SIZE,
        max_concurrency=S3_CONCURRENCY, use_threads=True)


def upload_backup(client, location, path, summary):
    """Copy a complete, verified local backup to location under its own name, and check the
    object (size and SHA-256 by HEAD); returns the object's URL. UploadError on any failure:
    the local file is kept."""
    key = location.prefix + path.name
    digest, size = file_sha256(path)
    metadata = {"sha256": digest, "created-at": str(summary.get("created_at", "")),
                "tables": str(len(summary.get("tables", ()))),
                "rows": str(summary.get("rows", "")),
                "encrypted": "age" if path.name.endswith(AGE_SUFFIX) else "no"}
    # A multipart upload stays in the storage, invisible, until it is completed or aborted: the
    # marker lets the next run abort one that a killed run left (a single PUT leaves nothing).
    marker = path.parent / f"{UPLOAD_MARKER_PREFIX}{path.name}.json"
    if size >= S3_PART_SIZE:
        write_json_atomically(marker, {"bucket": location.bucket, "key": key,
                                       "started_at": utc_now().isoformat()})
    url = location.url(path.name)
    log.info("copying %s (%s) to %s", path.name, human_size(size), url)
    # upload_file, not upload_fileobj: s3transfer then reads each part from the file when it is
    # sent; from a file object it buffers parts ahead (244 MB peak RSS against 89 MB for a
    # 200 MB file, bench/offsite.py).
    s3_call("cannot copy the backup to", location, client.upload_file, key, UploadError,
            Filename=str(path), Bucket=location.bucket, Key=key,
            ExtraArgs={"Metadata": metadata}, Config=transfer_config())
    head = s3_call("cannot check the copy at", location, client.head_object, key, UploadError,
                   Bucket=location.bucket, Key=key)
    if head.get("ContentLength") != size or head.get("Metadata", {}).get("sha256") != digest:
        raise UploadError(f"the copy at {url} does not match the local file ({head.get('ContentLength')} "
                          f"bytes, sha256 {str(head.get('Metadata', {}).get('sha256'))[:12]}..., "
                          f"expected {size} bytes, {digest[:12]}...); the local backup {path} is "
                          f"complete and kept; run the backup again")
    marker.unlink(missing_ok=True)
    return url


def abort_dead_uploads(client, folder):
    """Abort the multipart uploads that runs killed mid-upload left (named by their markers in
    folder): S3 keeps their parts, invisible, until they are aborted."""
    import botocore.exceptions
    for marker in folder.glob(UPLOAD_MARKER_PREFIX + "*.json"):
        try:
            target = json.loads(marker.read_text(encoding="utf-8"))
            bucket, key = target["bucket"], target["key"]
            pending = client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
            for upload in pending:
                if upload["Key"] == key:
                    client.abort_multipart_upload(Bucket=bucket, Key=key,
                                                  UploadId=upload["UploadId"])
                    log.info("aborted the unfinished upload of %s left by a run that died", key)
            marker.unlink()
        except (OSError, ValueError, KeyError, TypeError,
                botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            log.warning("could not clear the unfinished upload named by %s (%s); it will be "
                        "tried again next time", marker.name, one_line(exc, 160))


def fetch_remote_backup(url, folder, settings):
    """Download an s3:// backup into folder and check it against the SHA-256 recorded when it
    was uploaded; returns the local path. ValidationError when it does not match."""
    location, name = parse_remote_file(url)
    key = location.prefix + name
    client = s3_client(settings)
    # Its first byte, not a HEAD: an answer to HEAD has no body, so a refusal would not say
    # why (credentials, a missing bucket or object); this carries the metadata all the same.
    head = s3_call("cannot read", location, client.get_object, key, Bucket=location.bucket,
                   Key=key, Range="bytes=0-0")
    head["Body"].close()
    size = int(str(head.get("ContentRange") or "/0").rpartition("/")[2] or 0)
    expected = (head.get("Metadata") or {}).get("sha256")
    if not expected:
        raise ValidationError(f"{url} has no SHA-256 recorded (x-amz-meta-sha256): it was not "
                              f"uploaded by {PROG}, so it cannot be verified; download it and "
                              f"`check --file` it yourself")
    path = folder / name
    log.info("fetching %s (%s)", url, human_size(size))
    # Into the private folder (0700); by file name, so that s3transfer writes each part as it
    # arrives instead of buffering (as upload_backup).
    s3_call("cannot read", location, client.download_file, key, Bucket=location.bucket,
            Key=key, Filename=str(path), Config=transfer_config())
    os.chmod(path, 0o600)
    digest, _ = file_sha256(path)
    if digest != expected:
        raise ValidationError(f"{url} does not match the SHA-256 recorded when it was uploaded "
                              f"(got {digest[:12]}..., recorded {expected[:12]}...): it was "
                              f"changed or damaged in the storage; use another backup; nothing "
                              f"was done")
    return path


def remote_backups(client, location):
    """The backups at location: [(name, size)] for every object named like a backup directly
    under the prefix."""
    names = []
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket,
                                                             Prefix=location.prefix)
    import botocore.exceptions
    try:
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"][len(location.prefix):]
                if BACKUP_NAME_PATTERN.fullmatch(name):
                    names.append((name, item["Size"]))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        kind, text = s3_failure(exc, "cannot list", location)
        raise kind(text) from None
    return names


def delete_remote(client, location, names):
    """Delete these backups at location; returns the names deleted (a failure is a warning)."""
    import botocore.exceptions
    deleted = []
    for batch in chunks(names, 1000):
        try:
            answer = client.delete_objects(Bucket=location.bucket, Delete={
                "Objects": [{"Key": location.prefix + name} for name in batch], "Quiet": True})
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            log.warning("retention: could not delete %d backup(s) at %s (%s)", len(batch),
                        location.url(), s3_failure(exc, "delete", location)[1])
            continue
        failed = {e.get("Key") for e in answer.get("Errors", [])}
        for name in batch:
            if location.prefix + name in failed:
                log.warning("retention: could not delete %s", location.url(name))
            else:
                deleted.append(name)
    return deleted


# --- 8. Background work and progress --------------------------------------------------------------
# All the threading, one primitive: Parallel runs calls in threads of its own, a bounded number
# ahead, and hands their results back in order. It makes several requests at once (in_parallel: a
# backup's key ranges, a restore's batches), reads a key range's pages ahead of their encoding or
# comparison (RangeRead: one thread) and compresses beside encoding (CompressingWriter: one
# thread, fed by put()). Spool carries what one thread makes to another; and the one progress
# display.

class _Call:
    """One call of in_parallel: its function, and its result or error once done."""
    __slots__ = ("function", "done", "value", "error")

    def __init__(self, function):
        self.function, self.done, self.value, self.error = function, threading.Event(), None, None


class Parallel:
    """The one way work is done in the background: calls (functions without arguments) taken
    from an iterator as room frees up, or handed over with put(), up to `jobs` running at once in
    threads of their own, and at most `ahead` (2 x jobs by default) started and not yet taken:
    memory bounded. take() returns the results in the order of the calls, raising a call's error
    in its place. close() drops the calls not started and gives those running a moment
    (THREAD_GRACE): they only read, and their daemon threads do not outlive the process. Writes
    (grace None) are waited for, however long: a rollback must not start while a write may still
    land. SupabaseApi.request holds a slot per request, so --jobs bounds what is in flight
    however many such pools are at work."""

    def __init__(self, calls, jobs, ahead=None, grace=THREAD_GRACE):
        self.calls, self.jobs, self.grace = iter(calls), max(1, jobs), grace
        self.ahead = max(ahead or 2 * self.jobs, self.jobs)
        self._todo, self.waiting = queue.SimpleQueue(), collections.deque()
        self._stop, self._threads, self._failure = threading.Event(), [], None

    def _work(self):
        while (call := self._todo.get()) is not None:
            if self._stop.is_set():
                call.error = self._failure or RuntimeError("stopped before it began")
            else:
                try:
                    call.value = call.function()
                except BaseException as exc:  # raised by take(), in order
                    call.error = exc
                    # No call starts after a failure: a restore's first failed batch is the last
                    # one written, as with one request in flight. A call already started but
                    # found stopped raises that first failure in its place.
                    self._failure = self._failure or exc
                    self._stop.set()
            call.done.set()

    def fill(self):
        """Start calls until `ahead` are started and not taken (or none is left)."""
        while len(self.waiting) < self.ahead:
            function = next(self.calls, None)
            if function is None:
                return
            self.put(function)

    def put(self, function):
        """Start one more call (its result taken in turn); the caller keeps within `ahead`."""
        call = _Call(function)
        self.waiting.append(call)
        self._todo.put(call)
        if len(self._threads) < min(self.jobs, len(self.waiting)):
            thread = threading.Thread(target=self._work, name="parallel", daemon=True)
            thread.start()
            self._threads.append(thread)

    def take(self):
        """The result of the oldest call not taken, once it is done; then start more."""
        call = self.waiting.popleft()
        call.done.wait()
        self.fill()
        if call.error is not None:
            raise call.error
        return call.value

    def close(self):
        self._stop.set()
        close = getattr(self.calls, "close", None)
        if close is not None:
            close()
        # One end mark per thread that may be waiting, a thread whose start Ctrl-C interrupted
        # (not in the list) included: a mark it takes must not leave a listed one waiting.
        for _ in range(len(self._threads) + 1):
            self._todo.put(None)
        deadline = None if self.grace is None else time.monotonic() + self.grace
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


def in_parallel(calls, jobs, ahead=None, grace=THREAD_GRACE):
    """The results of calls, in their order, made by a Parallel."""
    work = Parallel(calls, jobs, ahead, grace)
    try:
        work.fill()
        while work.waiting:
            yield work.take()
    finally:
        work.close()


class Spool:
    """Bytes made by one thread and taken by another as they come, through a temporary file (so
    that what is read ahead waits on disk, not in memory): a key range of a backup, read while
    the ranges before it are written to the file."""

    def __init__(self, folder):
        self.file = tempfile.TemporaryFile(dir=folder)
        self.size, self.finished, self.error = 0, False, None
        self._more = threading.Condition()

    def write(self, data):
        view = memoryview(data)
        while view:  # unbuffered, as blocks() reads by offset; a write may take only a part
            view = view[os.write(self.file.fileno(), view):]
        with self._more:
            self.size += len(data)
            self._more.notify_all()

    def finish(self, error=None):
        with self._more:
            self.finished, self.error = True, error
            self._more.notify_all()

    def blocks(self, size=1 << 20):
        """The bytes, a block at a time, as they are written; raises the maker's error."""
        offset = 0
        try:
            while True:
                with self._more:
                    while offset >= self.size and not self.finished:
                        self._more.wait()
                    if self.error is not None:
                        raise self.error
                    end, finished = self.size, self.finished
                while offset < end:
                    data = os.pread(self.file.fileno(), min(size, end - offset), offset)
                    if not data:
                        raise OSError(errno.EIO, "a spool file is shorter than written")
                    offset += len(data)
                    yield data
                if finished:
                    return
        finally:
            self.file.close()


class RangeRead:
    """The live rows of one key range (TablePages with after and until), read by a thread of
    its own (a Parallel of one) from the start and up to two pages ahead, so that fetching and
    parsing a page overlaps encoding the one before (a backup's read_range) or comparing it, and
    a range's first page the range before (diff, verification). Reads only."""

    def __init__(self, api, name, meta, after, until):
        self.pages = TablePages(api, name, meta, after, until)
        # One thread calls next() on the pages, in order; None marks the end of the range.
        self._ahead = Parallel(itertools.repeat(functools.partial(next, iter(self.pages), None)),
                               1, ahead=2)
        self._ahead.fill()
        self._first, self._taken = None, False

    def _next_page(self):
        """The next page, or None (the thread stopped) when the range has no more."""
        try:
            page = self._ahead.take()
        except BaseException:
            # The reading failed (its thread has stopped), or Ctrl-C: that is not held up by a
            # request in flight, which only reads (as after an error elsewhere, join()).
            self.join(0)
            raise
        if page is None:
            self._ahead.close()
        return page

    def first_page(self):
        """The range's first page, or None when it holds no rows; raises what reading raised."""
        if not self._taken:
            self._first, self._taken = self._next_page(), True
        return self._first

    def join(self, timeout=None):
        """After an error elsewhere: stop reading, giving a request in flight a moment."""
        self._ahead.grace = THREAD_GRACE if timeout is None else timeout
        self._ahead.close()

    def __iter__(self):
        page = self.first_page()
        try:
            while page is not None:
                yield page
                page = self._next_page()
        except GeneratorExit:  # its consumer stopped early (an error, Ctrl-C): so does reading
            self.join()
            raise


class CompressingWriter:
    """Bytes written here are compressed and written to `target` (a GzipFile) by a thread of its
    own (a Parallel of one, fed by put()), 256 KB at a time: zlib lets go of the interpreter while
    it compresses, so that runs on another core beside reading and encoding the next page. An
    error there (a full disk) is raised by a later write(), or by close()."""

    CHUNK = 1 << 18

    def __init__(self, target):
        self.target = target
        self._parts, self._size = [], 0
        # Up to three chunks handed on and not yet written; a write waits for the disk, as a
        # target written to directly would (grace None: close() waits for the write in hand).
        self._work = Parallel((), 1, ahead=3, grace=None)

    def _hand_on(self):
        data, self._parts, self._size = b"".join(self._parts), [], 0
        while len(self._work.waiting) >= self._work.ahead:
            self._work.take()  # raises what writing an earlier chunk raised
        self._work.put(functools.partial(self.target.write, data))

    def write(self, data):
        self._parts.append(data)
        self._size += len(data)
        if self._size >= self.CHUNK:
            self._hand_on()

    def close(self):
        """Compress what is left and wait until everything is written."""
        try:
            if self._parts:
                self._hand_on()
            while self._work.waiting:
                self._work.take()
        finally:
            self._work.close()

    def abort(self):
        """Drop what is not written yet and stop the thread."""
        self._parts = []
        self._work.close()


class Progress:
    """The progress of the long work, the one way it is shown: on a terminal a bar (tqdm) with
    the percentage, rate and time left, one at a time; nothing under --quiet or when stderr is
    not a terminal (cron), where a summary line per table is all. Log lines printed while a bar
    is up go above it (ConsoleHandler), so that no message is glued onto it."""

    def __init__(self):
        self.live, self.bar = False, None
        self.rows, self.started = 0, time.monotonic()

    def configure(self, quiet):
        self.live = sys.stderr.isatty() and not quiet

    def start(self, label, total=None, unit="rows"):
        """A new bar (the previous one closed): label, and total in units, if known."""
        self.close()
        self.rows, self.started = 0, time.monotonic()
        if self.live:
            try:
                from tqdm import tqdm  # only on a terminal: cron never pays for the import
            except ImportError:  # an environment made before tqdm was a requirement
                self.live = False
                return
            self.bar = tqdm(total=total, desc=f"  {label}", unit=unit, unit_scale=True,
                            leave=False, file=sys.stderr, dynamic_ncols=True, mininterval=0.2,
                            smoothing=0.1)

    def advance(self, count):
        self.rows += count
        if self.bar is not None:
            self.bar.update(count)

    def describe(self, label):
        """A new label for the bar that is up (the table being worked on)."""
        if self.bar is not None:
            self.bar.set_description_str(f"  {label}", refresh=False)

    def done(self, message=None):
        """Close the bar; log message, the summary line that stays."""
        self.close()
        if message:
            log.info("%s", message)

    def close(self):
        bar, self.bar = self.bar, None
        if bar is not None:
            bar.close()

    @contextlib.contextmanager
    def over_file(self, label, path):
        """A bar over the bytes of a backup file as it is read (the compressed bytes, the only
        total known before reading); yields the on_read callback for read_backup."""
        try:
            size = Path(path).stat().st_size
        except OSError:
            size = None
        self.start(label, size, unit="B")
        try:
            yield self.advance
        finally:
            self.close()


progress = Progress()


def chunks(items, size):
    """Lists of up to size items from any iterable."""
    iterator = iter(items)
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk


# --- 9. Backup: reading tables (snapshot) ---------------------------------------------------------
# A backup and a safety backup alike: every table read completely, in key order, into a new file.

def count_rows(api, name, method="exact"):
    """(count, method) of a table: the exact count, or PostgreSQL's estimate ("planned") when
    the exact count hits the server's statement timeout, as it can on a large table."""
    if method == "exact":
        try:
            return api.count(name), "exact"
        except StatementTimeout:
            pass
    try:
        count = api.count(name, "planned")
    except StatementTimeout:
        # snapshot() puts the table's name in front of the message.
        raise IncompleteBackupError(f"even PostgreSQL's estimate of the row count hits the "
                                    f"server's statement timeout; raise the API's "
                                    f"statement_timeout for this backup, or exclude "
                                    f"{name}") from None
    if method == "exact":
        log.warning("%s: the exact count timed out on the server; using PostgreSQL's estimate "
                    "(%d) and the rows read instead", name, count)
    return count, "planned"


class TablePages:
    """The rows of one table, page by page, in key order: iterate to read them all.

    Keyset paging on the primary key: each page asks for the rows after the last key read, so a
    row that exists throughout the reading is read exactly once even while others are inserted or
    deleted. A table without a key is paged by offset in an order on all sortable columns, which
    is stable only while the table does not change. A page that hits the statement timeout is
    asked for again with half as many rows; any other error ends the iteration with an exception,
    never silently.
    """

    def __init__(self, api, name, meta, after=None, until=None, where=()):
        self.api, self.name, self.where = api, name, where
        self.order_by, self.paging = read_order(meta)
        self.select = select_list(meta)
        self.pages = 0
        # A range of keys: after (exclusive) and until (inclusive); keyset paging only.
        self.after, self.until = after, until
        self.largest_page = None  # the server's row cap, once a page has shown it
        self.answered = 0  # rows in the last answer (before whole_groups cut it)
        self.whole_tail, self.warned = None, False  # see whole_groups
        self.in_range = None  # with `until`: how many rows the range holds (its first answer)

    # Why complex: one loop does keyset paging (by key) and offset paging (no key; pages cut at
    # whole groups of tied rows), halves the page on a statement timeout down to a floor, counts a
    # key range with its first page and learns the server's row cap to know the last page. Page
    # size, position and cap are the loop's shared state; apart, each piece would need all of it.
    def __iter__(self):
        name, page_size, after, offset = self.name, PAGE_SIZE, self.after, 0
        while True:
            # A range's size is asked for with its first page (in the same statement, so the
            # two agree): a range that page holds whole needs no further request.
            counting = self.until is not None and self.pages == 0
            try:
                rows = self.api.page(name, self.select, self.order_by, after, page_size,
                                     offset if self.paging == "offset" else 0, self.until,
                                     self.where, count=counting)
                if counting:
                    rows, self.in_range = rows
            except StatementTimeout:
                if page_size <= MIN_PAGE_SIZE:
                    raise IncompleteBackupError(
                        f"even a page of {page_size} rows hits the server's statement "
                        f"timeout; raise the API's statement_timeout for this backup, or "
                        f"exclude {name}") from None
                page_size = max(MIN_PAGE_SIZE, page_size // 2)
                log.warning("%s: a page hit the server's statement timeout; asking for %d rows "
                            "per page from now on", name, page_size)
                continue
            self.pages += 1
            self.answered = len(rows)
            last = not rows or (self.largest_page is not None and
                                len(rows) < min(page_size, self.largest_page))
            if self.paging == "offset" and rows:
                rows = self.whole_groups(rows, last)
            if rows:
                yield rows
                # Each HTTP response sits in a reference cycle: without this its body (a page,
                # ~200 KB) waits for the rare full collection, and memory grows with the table.
                gc.collect()
                if self.paging == "keyset":
                    after = [rows[-1].get(column) for column in self.order_by]
                offset += len(rows)
            if counting and self.answered >= self.in_range:
                return
            # The server returns min(asked, its row cap, rows left): a page shorter than both
            # what was asked and the largest page seen so far is the last one. The cap is
            # learned, not assumed.
            if last:
                return
            self.largest_page = max(self.largest_page or 0, self.answered)

    def whole_groups(self, rows, last):
        """A page read by offset, less its last rows that tie with the page's last row in the
        order (equal in every sorted column): PostgreSQL may order tied rows differently from
        one query to the next, so a group of them split between two pages could lose a row to
        one and double one in the other. The next page starts at the group instead. A group as
        large as a page is kept whole; if the next page goes on with it, the order cannot be
        relied on, and a warning says so."""
        tail = [rows[-1].get(column) for column in self.order_by]
        if self.whole_tail is not None and not self.warned and \
                [rows[0].get(column) for column in self.order_by] == self.whole_tail:
            self.warned = True
            log.warning("%s has no primary key and more rows that tie in its sortable columns "
                        "than a page holds: PostgreSQL may order them differently from page to "
                        "page, so rows may be missed or doubled; give the table a primary key",
                        self.name)
        if last:
            return rows
        cut = len(rows)
        while cut > 0 and [rows[cut - 1].get(column) for column in self.order_by] == tail:
            cut -= 1
        self.whole_tail = tail if cut == 0 else None
        return rows if cut == 0 else rows[:cut]


class TableRead:
    """One table of a backup being read: its key ranges (after, until], read in parallel
    (read_range), and the counts before and after. A small table, or one without a key, is one
    range: the whole table."""

    def __init__(self, api, name, meta):
        self.name, self.meta = name, with_stored_forms(meta)
        pages = TablePages(api, name, self.meta)
        self.order_by, self.paging = pages.order_by, pages.paging
        self.count_before, self.count_method = count_rows(api, name)
        self.ranges = [(None, None)]
        if self.paging == "keyset":
            points = split_points(api, self, self.count_before)
            bounds = [None, *points, None]
            self.ranges = list(zip(bounds, bounds[1:]))
        self.left, self.pages, self.count_after = len(self.ranges), 0, None
        self._done = threading.Lock()
        # Per range: (first key, last key, whether its keys rose) in seen_key's order, for
        # keys_rising(); None for a range without rows.
        self.range_keys = [None] * len(self.ranges)

    def keys_rising(self):
        """Whether the table's keys rose from row to row in Python's order of seen_key, as the
        file holds them: then a file of the same table can be merged with it row by row
        (record_counts compares the file being restored with the safety backup so)."""
        if self.paging != "keyset":
            return False
        last = None
        for keys in self.range_keys:
            if keys is None:
                continue
            first, end, rising = keys
            if not rising or (last is not None and not _rises(last, first)):
                return False
            last = end
        return True

    def range_read(self, api, pages):
        """A range's rows are read: the last range read takes the count after (so that it is
        taken once every row is read, whichever range ends last)."""
        with self._done:
            self.pages += pages
            self.left -= 1
            last = self.left == 0
        if last:
            self.count_after, self.count_method = count_rows(api, self.name, self.count_method)

    def trailer(self):
        return {"count_before": self.count_before, "count_after": self.count_after,
                "count_method": self.count_method}


# How a backup splits a table for --jobs: key ranges of about RANGE_ROWS rows, at most
# RANGES_PER_JOB per job (each split point is a request that skips `offset` rows in the key's
# index, so their number stays bounded whatever the table's size).
RANGE_ROWS = 20_000
RANGES_PER_JOB = 16


def split_points(api, table, count):
    """Key values that cut a table in ranges of about equal size (each the key of the last row
    of a range), found by offset, several requests at once; [] for one range.

    The probes are answered at different moments: while rows come and go, their keys may come
    back out of the server's order, and ranges cut at them would overlap (rows read twice). So
    one more request reads the rows with those keys in the server's order (a key deleted
    meanwhile drops out; at most DELETE_BATCH_SIZE keys, which travel in the URL). Rows that come
    and go while the ranges are read do not matter: the ranges cover every key, once."""
    ranges = min(math.ceil(count / RANGE_ROWS), RANGES_PER_JOB * api.jobs,
                 DELETE_BATCH_SIZE + 1) if api.jobs > 1 else 1
    if ranges < 2:
        return []

    # Only the key columns (in their stored forms): the server skips `offset` rows for each
    # probe, and with every column selected it builds each skipped row whole (an index-only
    # scan cannot serve it).
    keys = key_select(table.meta, table.order_by)

    def key_at(offset):
        rows = api.page(table.name, keys, table.order_by, None, 1, offset)
        return [rows[0].get(column) for column in table.order_by] if rows else None

    found = {compact_json(key): key for key in in_parallel(
        (functools.partial(key_at, count * i // ranges - 1) for i in range(1, ranges)), api.jobs)
        if key is not None}
    if not found:
        return []
    rows = api.page(table.name, keys, table.order_by, None, len(found),
                    where=[key_filter(table.order_by, list(found.values()))])
    return [[row.get(column) for column in table.order_by] for row in rows]


def read_range(api, table, index, spool):
    """Read one key range of a table into its spool (the first range checks the date style)."""
    after, until = table.ranges[index]
    # The range's next pages are fetched and parsed by a thread of its own (RangeRead) while
    # this one encodes and spools the page before (bench/PROFILE.md, "Issue 14").
    reader, rows = RangeRead(api, table.name, table.meta, after, until), 0
    pk, first, last, rising = table.order_by, None, None, table.paging == "keyset"
    try:
        for page in reader:
            if index == 0 and rows == 0:
                check_iso_dates(table.name, table.meta, page)
            spool.write(b"\n".join([row_json(row).encode() for row in page]) + b"\n")
            rows += len(page)
            if rising:
                for row in page:
                    key = seen_key(row, pk)
                    if last is not None and not _rises(last, key):
                        rising = False
                        break
                    first, last = key if first is None else first, key
        table.range_keys[index] = (first, last, rising) if rows else None
        table.range_read(api, reader.pages.pages)  # the TablePages' count of pages read
    except BaseException as exc:
        reader.join(0)  # no page is read after the range failed
        spool.finish(table_failure(table.name, exc))
        raise
    spool.finish()


def for_table(name, function):
    """function, its failure named after the table (a backup fails as a whole, naming it)."""
    def call():
        try:
            return function()
        except BaseException as exc:
            raise table_failure(name, exc) from None
    return call


def table_failure(name, exc):
    """The error of a table's reading as the backup reports it: naming the table."""
    if isinstance(exc, TableMissingError):
        return IncompleteBackupError(f"{name} disappeared during the backup ({exc}); no backup "
                                     f"file was written; run the backup again")
    if isinstance(exc, BackupError) and not getattr(exc, "table_named", False):
        exc.args, exc.table_named = (f"{name}: {exc}; no backup file was written",), True
    return exc


def read_live_tables(api, tables, discovered, folder):
    """The rows of the tables in file order (table by table, each in key order), as
    (TableRead, range index, Spool) to take the range's lines from as they come, read with up
    to api.jobs requests in flight: the counts and split points of the next tables and the
    ranges after the one being written are read meanwhile, into spools on disk, so memory does
    not grow with the table. The first range of the lot streams: reading overlaps writing even
    with --jobs 1."""
    planned = in_parallel((for_table(name, functools.partial(TableRead, api, name,
                                                             discovered[name]))
                           for name in tables), api.jobs)
    order = collections.deque()

    def range_calls():
        with contextlib.closing(planned):
            for table in planned:
                for index in range(len(table.ranges)):
                    spool = Spool(folder)
                    order.append((table, index, spool))
                    yield for_table(table.name, functools.partial(read_range, api, table, index,
                                                                  spool))

    work = Parallel(range_calls(), api.jobs)
    try:
        work.fill()
        while order:
            yield order.popleft()
            work.take()  # done by now (its spool was taken whole): frees room for the next
    finally:
        work.close()
        for _, _, spool in order:
            spool.file.close()


def table_read_note(table, rows_read):
    """The summary line of a table read (its bar closed); returns whether the table changed
    during the backup (its exact count before, rows read and count after disagree)."""
    name, paging, rate = table.name, table.paging, rows_read / max(
        time.monotonic() - progress.started, 1e-6)
    changed = table.count_method == "exact" and not (
        table.count_before == rows_read == table.count_after)
    if not changed:
        progress.done(f"  {name}: {rows_read} rows in {table.pages} page(s), {rate:,.0f} rows/s")
    else:
        progress.done(
            f"  {name}: {rows_read} rows; the table changed during the backup (count "
            f"{table.count_before} before, {table.count_after} after); "
            + ("rows that existed throughout are all in the file" if paging == "keyset" else
               "and it has no primary key, so rows may be missing or doubled: run the backup "
               "again"))
    return changed


# PostgreSQL writes dates and times as text in the session's DateStyle, and reads them back in
# the restoring session's: only ISO is read the same whatever the DateStyle. Supabase runs with
# ISO; a database set otherwise would make "01/02/2026" ambiguous, so the backup refuses it.
ISO_DATE_TIME = {
    "date": re.compile(r"-?infinity|\d{4,}-\d\d-\d\d( BC)?"),
    "timestamp without time zone": re.compile(
        r"-?infinity|\d{4,}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?( BC)?"),
    "timestamp with time zone": re.compile(
        r"-?infinity|\d{4,}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?[+-]\d\d(:\d\d){0,2}( BC)?"),
}


def check_iso_dates(name, meta, rows):
    """Refuse dates and times a page holds in another DateStyle than ISO (see ISO_DATE_TIME)."""
    for column in meta["columns"]:
        pattern = ISO_DATE_TIME.get(column.get("format")) if column.get("stored_as") else None
        value = next((row.get(column["name"]) for row in rows
                      if row.get(column["name"]) is not None), None) if pattern else None
        if isinstance(value, str) and not pattern.fullmatch(value):
            raise IncompleteBackupError(
                f"{name}.{column['name']} comes as {value!r}, not in PostgreSQL's ISO DateStyle, "
                f"so it could be read back differently; run `ALTER DATABASE postgres SET "
                f"DateStyle = 'ISO, MDY';` in the SQL editor, then back up again")


def snapshot(api, tables, discovered, path, project_host, role, progress, note=None,
             auth=False, storage=False):
    """Back up the given tables (with auth, also the auth users: back_up_auth_users; with
    storage, also Storage's buckets and objects: True, or a dict of back_up_storage's options)
    into one new file at path; returns the backup's summary.

    The file appears under its final name only once every table is read completely, and is then
    re-read and verified.
    """
    if auth and AUTH_ENTRY in tables:
        raise ConfigError(f"a table of the public schema is named {AUTH_ENTRY}, the name the "
                          f"auth users take in a backup file: leave it out (--exclude "
                          f"{AUTH_ENTRY}) or rename it, then back up again")
    writer, header = new_backup_writer(path, project_host, role, note)
    summary = {"file": str(path), "created_at": header["created_at"], "tables": {}, "rows": 0,
               "warnings": []}
    try:
        write_live_tables(api, tables, discovered, writer, summary, progress)
        if auth:
            back_up_auth_users(api, writer, summary, progress)
        if storage:
            summary["storage"] = back_up_storage(api, writer, path.parent, progress,
                                                 **(storage if isinstance(storage, dict) else {}))
        writer.finish(finished_at=utc_now().isoformat(), table_count=len(summary["tables"]),
                      row_count=summary["rows"])
    except OSError as exc:  # disk full, folder gone, quota: the file is thrown away, loudly
        writer.abort()
        raise IncompleteBackupError(f"cannot write the backup file {path}: "
                                    f"{exc.strerror or exc}; free some space or choose another "
                                    f"place (--output), then run again; no backup file was "
                                    f"written") from None
    except BaseException:
        writer.abort()
        raise
    reread_backup(path, summary)
    summary["bytes"] = path.stat().st_size
    return summary


def new_backup_writer(path, project_host, role, note):
    """A BackupWriter for a new backup at path, and the header it writes."""
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
              "tool_version": TOOL_VERSION, "created_at": utc_now().isoformat(),
              "project_host": project_host, "key_role": role,
              "rls_limited": role != SERVICE_ROLE}
    if note:
        header["note"] = note
    try:
        return BackupWriter(path, header), header
    except OSError as exc:
        raise IncompleteBackupError(f"cannot create a file in {path.parent}: "
                                    f"{exc.strerror or exc}; choose a folder you can write to "
                                    f"(--output or --data-dir)") from None


def write_live_tables(api, tables, discovered, writer, summary, progress):
    """Every table read from the project (read_live_tables), written to the backup in order;
    each table's count, checksum and trailer go into summary."""
    for table, index, spool in read_live_tables(api, tables, discovered, writer.path.parent):
        if index == 0:
            progress.start(f"{table.name} (table {tables.index(table.name) + 1} of "
                           f"{len(tables)})", table.count_before)
            writer.begin_table(table.name, {**table.meta, "order_by": table.order_by,
                                            "paging": table.paging})
        writer.write_lines(spool.blocks(), progress.advance)
        if index == len(table.ranges) - 1:
            trailer = table.trailer()
            if table_read_note(table, writer.table_rows):
                trailer["count_mismatch"] = True
                summary["warnings"].append(f"{table.name} changed during the backup")
            count, digest = writer.end_table(**trailer)
            summary["tables"][table.name] = {"rows": count, "sha256": digest,
                                             "pages": table.pages, **trailer,
                                             "keys_rising": table.keys_rising()}
            summary["rows"] += count


def reread_backup(path, summary):
    """Re-read what was written: a backup is only as good as the file on disk. A backup in
    backups/ or safety_backups/ is then recorded in the folder's index."""
    header, checked = check_backup(path)
    if [name for name, entry in checked.items()
            if entry_kind(entry["meta"]) in (None, AUTH_KIND)] != list(summary["tables"]):
        raise IncompleteBackupError(f"{path} does not read back as written; it was kept for "
                                    f"inspection, but do not rely on it")
    if path.parent.name in (BACKUP_DIR, SAFETY_DIR) and not path.name.startswith(TEMP_PREFIX):
        record_in_index(path, header, checked)  # what list shows, recorded now it is checked


# --- 10. Restore steps 0 and 2: checking a file ---------------------------------------------------
# scan_backup reads the whole file before anything else (step 0); validate_backup holds it against
# the live schema (step 2).

def row_key(row, primary_key):
    """A row's primary key as a hashable string (JSON of the key values in key order)."""
    return compact_json([row.get(column) for column in primary_key])


def row_digest(row, columns):
    """A short digest of a row's values over the given columns, for comparing rows cheaply."""
    values = compact_json([row.get(column) for column in columns])
    return hashlib.blake2b(values.encode(), digest_size=16).digest()


def seen_key(row, primary_key):
    """A key to tell rows apart by, cheaper in time and memory than row_key where it can be: a
    one-column key's value itself when it is an int or a string, a tuple of the values of a
    longer key made of those. Two rows get equal seen_keys only when their row_keys are equal
    (an int never equals a string; a key with a bool, float or anything else takes its JSON
    text, in a tuple of one, which never equals a value or a longer tuple)."""
    values = [row.get(column) for column in primary_key]
    if all(type(value) is int or type(value) is str for value in values):
        return values[0] if len(values) == 1 else tuple(values)
    return (row_key(row, primary_key),)


def _rises(before, key):
    try:
        return key > before
    except TypeError:  # keys of different kinds: not known to rise
        return False


def _repeated_keys(path, names):
    """The second pass of scan_backup for tables whose keys did not keep rising: a set of each
    one's keys, one table at a time."""
    problems = []
    for table in read_tables(path, as_bytes=True, label="checking keys"):
        pk = table.meta.get("primary_key") or []
        if table.name not in names or not pk:
            continue
        keys = set()
        for line in table.rows:
            row = parse_row(line)
            if not isinstance(row, dict) or any(row.get(c) is None for c in pk):
                continue  # named by the first pass already
            key = seen_key(row, pk)
            if key in keys:
                problems.append(f"{table.name}: key {row_key(row, pk)} appears twice")
            keys.add(key)
    return problems


@dataclass
class BackupScan:
    """What one streaming pass over a backup file found: its header and per-table facts."""

    path: Path
    header: dict
    tables: dict  # name -> {"meta": ..., "row_count": n, "sha256": ...}
    others: list = field(default_factory=list)  # (name, kind) of the entries that are not tables


def scan_backup(path, tables_wanted=None):
    """Read a whole backup file, checking what can be checked offline: format, checksums, row
    structure, and primary keys (present, non-null, unique). Raises ValidationError listing the
    problems.

    Memory does not grow with the rows: keys that keep rising (as the server sorted them, for
    ints, uuids and most keys) cannot repeat, so only the last one is kept. A table whose keys
    do not keep rising in Python's order (text under a collation, an edited file) is checked
    again in a second pass with a set of its keys."""
    header, tables, problems, unsorted, others = {}, {}, [], set(), []
    for table in read_tables(path, label=f"reading {Path(path).name}", header=header,
                             kinds=(None, AUTH_KIND), skipped=others):
        rising = None
        if tables_wanted is None or table.name in tables_wanted:
            rising = scan_rows(table, problems)
            if not rising:
                unsorted.add(table.name)
        table.finish()
        tables[table.name] = {"meta": table.meta, "row_count": table.trailer.get("row_count"),
                              "sha256": table.trailer.get("sha256"),
                              "keys_rising": bool(rising) and not table.kind}
    if unsorted:
        problems.extend(_repeated_keys(path, unsorted))
    if problems:
        shown = "; ".join(dict.fromkeys(problems[:5]))
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValidationError(f"{Path(path).name} is refused: {shown}{more}")
    return BackupScan(Path(path), header, tables, others)


# Why complex: a single pass over a table's rows, streamed from the file, makes every check: an
# entry that is not a table handed on, a row that is not an object, extra or lacking columns (a
# keyless table's checks end there), a key column without a value, and whether keys keep rising.
# Checks in separate functions would each read the table again, or share this pass's state.
def scan_rows(table, problems):
    """scan_backup's checks of one table's rows (problems collects what is wrong); returns
    whether its keys kept rising (when not, they are checked again with a set: _repeated_keys)."""
    if table.kind:
        return scan_entry_rows(table, problems)
    name, known = table.name, set(table.columns)
    pk, last, rising = table.meta.get("primary_key") or [], None, True
    for row in table.rows:
        if not isinstance(row, dict):
            problems.append(f"{name}: a row is not a JSON object")
            continue
        if len(row) != len(known) or row.keys() != known:
            extra, lacking = set(row) - known, known - set(row)
            if extra:
                problems.append(f"{name}: a row has columns the table's metadata does not "
                                f"list ({', '.join(sorted(extra))})")
            if lacking:
                problems.append(f"{name}: a row lacks column(s) {', '.join(sorted(lacking))} "
                                f"(a backup row holds every column of its table)")
        if not pk:
            continue
        missing = [c for c in pk if row.get(c) is None]
        if missing:
            problems.append(f"{name}: a row has no value for key column {', '.join(missing)}")
            continue
        if rising:
            key = seen_key(row, pk)
            if last is None or _rises(last, key):
                last = key
            else:
                rising = False
    return rising


# Why complex: every reason to refuse is named at once, before any write: a critical table
# missing or empty, a table gone from the project, columns dropped (drift), a changed primary key,
# a relation the API cannot write. Each check is one branch adding to one list of problems; in
# helpers, the whole list of refusals would no longer read in one place.
def validate_backup(scan, live_tables, restore_tables, critical):
    """Step 2: refuse a backup that cannot be restored faithfully, before anything is written.

    Checks critical tables present and non-empty, every table and column still present in the
    live schema (drift is refused naming table and column), the same primary key, and a write
    order. Returns the write order; raises ValidationError.
    """
    problems = []
    for name in critical:
        table = scan.tables.get(name)
        if table is None:
            problems.append(f"critical table {name} is not in the backup")
        elif not table.get("row_count"):
            problems.append(f"critical table {name} is empty in the backup")
    for name in restore_tables:
        meta = scan.tables[name]["meta"]
        live = live_tables.get(name)
        if live is None:
            problems.append(f"table {name} no longer exists in the project")
            continue
        live_columns = {c["name"] for c in live["columns"]}
        gone = [c["name"] for c in meta["columns"] if c["name"] not in live_columns]
        if gone:
            problems.append(f"{name}.{gone[0]} no longer exists in the project (schema drift"
                            f"{'; also ' + ', '.join(gone[1:]) if gone[1:] else ''})")
        if list(live["primary_key"]) != list(meta.get("primary_key") or []):
            problems.append(f"{name}'s primary key is now ({', '.join(live['primary_key'])}), "
                            f"the backup's is ({', '.join(meta.get('primary_key') or [])})")
        if not live["writable"]:
            problems.append(f"{name} cannot be written through the API (a view?)")
    if problems:
        raise ValidationError("the backup does not fit the project: " + "; ".join(problems[:6])
                              + "; the database was not touched")
    order, _ = write_order(restore_tables, {n: scan.tables[n]["meta"].get("foreign_keys") or []
                                            for n in restore_tables})
    return order


def choose_restore_tables(scan, wanted):
    """(tables to restore, {skipped table: why}) from the backup and --tables."""
    if wanted:
        missing = [name for name in wanted if name not in scan.tables]
        if missing:
            raise ValidationError(f"{', '.join(missing)} not in {scan.path.name} (it holds "
                                  f"{', '.join(scan.tables) or 'no table'}); check --tables")
    tables, skipped = [], {}
    for name in wanted or scan.tables:
        meta = scan.tables[name]["meta"]
        if entry_kind(meta):
            if wanted:
                raise ValidationError(f"{name} in {scan.path.name} is not a table but the "
                                      f"{meta['kind']} entry: restore it with --auth, not "
                                      f"--tables")
            continue  # not a table: restored by its own option (--auth)
        if meta.get("writable") is False:
            skipped[name] = "read-only relation (a view?): nothing to write back"
        else:
            tables.append(name)
    return tables, skipped


# --- 11. A table's plan and outcome; rows to compare from a file ----------------------------------
# What a table's restore will do (TablePlan) and did (TablePlan.outcome: TableOutcome), and the
# local sources a comparison can read a table's live rows from instead of the project: the
# safety backup just taken (SafetyRows, LocalRows, LocalRange).

class RestoreFailure(Exception):
    """Control flow: a table (or, table None, the run) could not be restored; the caller rolls
    back (or keeps going)."""

    def __init__(self, table, message, named=False):
        # named: the message names the table itself
        super().__init__(f"{table}: {message}" if table and not named else message)
        self.table = table


@dataclass
class TablePlan:
    """What the restore will do to one table, and what it did."""

    name: str
    primary_key: list
    columns: list  # the backup's columns, in its order
    backup_rows: int = 0
    inserts: int = 0
    updates: int = 0
    unchanged: int = 0
    skip_columns: set = field(default_factory=set)  # generated columns the server refuses
    json_columns: set = field(default_factory=set)  # json/jsonb text, sent as raw JSON
    plain_json_columns: set = field(default_factory=set)  # of json_columns, the json (not jsonb)
    # (side, column, change) -> [rows, first keys]: values the API would change on the way in
    # (json_change), in rows of the file to write ("file") or live rows a rollback would write
    # back ("live").
    json_changes: dict = field(default_factory=dict)
    identity_always: str | None = None  # a GENERATED ALWAYS identity column: patch, never insert
    # The current setting when the plan is made (a test may set a smaller one).
    batch_size: int = field(default_factory=lambda: WRITE_BATCH_SIZE)
    extra_keys: list = field(default_factory=list)  # live rows the file lacks (rollback deletes)
    live_meta: dict | None = None  # the live table's metadata (from the OpenAPI document)
    spool: Path | None = None  # the rows to write, spooled by record_counts()
    safety_count: int | None = None  # rows in the safety backup
    rewrite: set = field(default_factory=set)  # a rollback's keys to write back from the file
    level_starts: list | None = None  # spool lines where each level of parents starts
    outcome: "TableOutcome" = field(default_factory=lambda: TableOutcome())  # what it did

    def mark_sent(self, batch):
        """Record that a write was sent for a batch: from then on its rows may have landed."""
        self.outcome.sent_rows[batch.start:batch.start + len(batch)] = b"\x01" * len(batch)

    @property
    def touched(self):
        outcome = self.outcome
        return bool(outcome.deleted_keys) or outcome.reconciled or 1 in outcome.sent_rows

    def sent_spool_keys(self):
        """(is_insert, key) of every spooled row a write was sent for, read from the spool."""
        if self.spool is None:
            return
        with open(self.spool, "rb") as spool:  # lines end at b"\n" only, as they were written
            for index, line in enumerate(spool):
                if self.outcome.sent_rows[index]:
                    is_insert, row = json.loads(line)
                    yield is_insert, row_key(row, self.primary_key)

    def summary(self):
        return {"inserted": self.outcome.inserted, "updated": self.outcome.updated,
                "deleted": self.outcome.deleted, "unchanged": self.unchanged,
                "errors": self.outcome.errors,
                "planned_inserts": self.inserts, "planned_updates": self.updates,
                "planned_deletes": len(self.extra_keys)}


@dataclass
class TableOutcome:
    """What a restore did to one table (TablePlan.outcome): rows written, deleted, refused, and
    what a rollback undoes, the spooled rows a write was sent for (one byte per spool line) and
    the live rows a rollback to a file deleted."""

    inserted: int = 0
    updated: int = 0
    deleted: int = 0  # rows a rollback to a file deleted (not in the file)
    errors: int = 0
    failure: str | None = None
    sent_rows: bytearray = field(default_factory=bytearray, repr=False)
    deleted_keys: set = field(default_factory=set, repr=False)
    reconciled: bool = False  # a keyless table a rollback to a file rewrote (KeylessReconcile)
    counting: threading.Lock = field(default_factory=threading.Lock, repr=False)


class SafetyRows:
    """The safety backup just taken (step 1), read beside the file in step 3 (record_counts),
    table by table in the same order: a table's live rows as they were read moments ago, from
    disk. Used for a table only where the two files can be merged row by row: a key, the same
    forms of every column, and keys that rose in Python's order in both files (ints, uuids,
    text in most collations); any other table is compared with the live table, as before."""

    def __init__(self, path, summary_tables):
        self.tables = read_tables(path)
        self.summary = summary_tables
        self.rising = {name: table.get("keys_rising") for name, table in summary_tables.items()}

    def holds_the_file_rows(self, name, plan, forms, scanned):
        """Whether the safety backup holds exactly the file's rows of a table, in the same forms:
        the same count and the same SHA-256 over the same compact JSON of each row (a restore
        onto an unchanged table). Then every row is unchanged, and none need be compared."""
        table = self.summary.get(name) or {}
        return (table.get("sha256") is not None and table.get("sha256") == scanned.get("sha256")
                and table.get("rows") == scanned.get("row_count")
                and stored_forms(with_stored_forms(plan.live_meta))
                == stored_forms(with_stored_forms(plan.live_meta, forms)))

    def rows_of(self, name, plan, forms, scanned):
        """LocalRows of a table, or None where its live rows must be read from the project."""
        if not (plan.primary_key and self.rising.get(name) and scanned.get("keys_rising")):
            return None
        for table in self.tables:
            if table.name != name:
                continue
            wanted = with_stored_forms(plan.live_meta, forms)
            if table.meta.get("primary_key") != plan.primary_key or \
                    stored_forms(table.meta) != stored_forms(wanted):
                return None
            return LocalRows(table.rows, plan.primary_key)
        return None

    def close(self):
        self.tables.close()


def stored_forms(meta):
    """(column, the form a file keeps it in) of each column of a table's metadata."""
    return [(column["name"], column.get("stored_as")) for column in meta.get("columns") or []]


class LocalRows:
    """One table's live rows from the safety backup, in key order, handed out range by range
    (upto) as RangeRead reads them from the project."""

    def __init__(self, rows, primary_key):
        self.rows, self.primary_key = iter(rows), primary_key
        self.next = next(self.rows, None)

    def upto(self, until):
        """The rows up to the key values until (all the rest for None): a LocalRange."""
        limit = None if until is None else seen_key(dict(zip(self.primary_key, until)),
                                                    self.primary_key)
        return LocalRange(self, limit)


class LocalRange:
    """A range of LocalRows, with RangeRead's ways: first_page(), its pages, join()."""

    class pages:  # noqa: N801 - RangeRead.pages.in_range: no count is asked for
        in_range = 0

    def __init__(self, source, limit):
        self.source, self.limit = source, limit
        self._first, self._taken = None, False

    def _page(self):
        source, rows = self.source, []
        while source.next is not None and len(rows) < PAGE_SIZE and (
                self.limit is None or
                not _rises(self.limit, seen_key(source.next, source.primary_key))):
            rows.append(source.next)
            source.next = next(source.rows, None)
        return rows or None

    def first_page(self):
        if not self._taken:
            self._first, self._taken = self._page(), True
        return self._first

    def join(self, timeout=None):
        """Nothing runs in the background."""

    def __iter__(self):
        page = self.first_page()
        while page:
            yield page
            page = self._page()


class PendingRange(NamedTuple):
    """A chunk of file lines and the live range asked for to compare it with."""
    chunk: list
    after: list | None
    until: list | None
    read: "RangeRead | None"


# --- 12. Comparing a file with the live rows ------------------------------------------------------
# Steps 3 and 5 and diff read the live rows in the file's forms, in key ranges (TableComparison;
# PlanComparison for step 3), or as a multiset for a table without a key (KeylessComparison).

class TableComparison:
    """One table's rows from a file against the live table, in memory bounded by a chunk.

    The file's rows are taken in chunks of COMPARE_CHUNK; for each chunk the live rows of its key
    range (after the previous chunk's last key, up to its own last key) are read and compared with
    it. The server compares the keys, so no key order is reproduced here, and memory holds two
    chunks (the one compared, and the next, whose range is read meanwhile: RangeRead), not the
    table. A row found on one side only is kept (key and digest) until finish(),
    which also matches the rows that turned up in another range than their file chunk's (a file
    whose order the server no longer sorts by, e.g. after a collation change): memory grows with
    the differences, never with the table.

    The file's rows come as their lines (read_backup with as_bytes): the compact JSON of each row
    as the server sent it. While the live rows of a range are the chunk's lines, byte for byte
    and in the same order (a table that did not change, or a restore just verified), nothing is
    parsed or keyed; from the first live row that is not, the rest of the range is compared by
    key and value.
    """

    def __init__(self, api, name, live_meta, primary_key, columns, forms, listed=DIFF_EXAMPLES,
                 live_total=None, json_null_ok=False, local=None):
        # Live rows are read in the form the file keeps each column in (forms: file_forms).
        self.api, self.name = api, name
        self.live_meta = with_stored_forms(live_meta, forms)
        # With json_null_ok (--accept-json-null), a json column's JSON null in the file equals
        # SQL NULL live: the one change the API makes to a value, and the user accepted it.
        self.json_null_ok = {c for c, form in forms.items() if form == "json_text"} \
            if json_null_ok else set()
        self.primary_key, self.columns, self.listed = primary_key, columns, listed
        self.chunk = []  # the file lines of the chunk being filled
        # Where the next range to compare starts (the end of the last that held rows), and the
        # end of the last range asked for, where the next one is asked to start.
        self.after = self.asked_until = None
        # Chunks whose ranges are read (up to api.jobs at once), oldest first.
        self.pending = collections.deque()
        # The live rows from a file instead (LocalRows: the safety backup just taken), in an
        # order merged with the file's: a range is then read from disk, exactly, at once.
        self.local = local
        # The live row count (counted once, when not given): once that many rows are read, the
        # ranges left are not asked for (into an empty table, no range is).
        self.live_total = live_total
        self.in_ranges = 0  # the live rows of the ranges asked for so far (their counts)
        self.file_rows = self.live_rows = self.changed = 0
        self.only_file, self.only_live = {}, {}  # key -> digest of the row
        self.changed_keys = {}  # key -> the columns that differ, for the first `listed` keys
        self.changed_live = {}  # key -> {column: live value} of those, for the same keys

    def add(self, line):
        """The next row of the file (in the file's order), as its line's bytes."""
        self.file_rows += 1
        self.chunk.append(line)
        if len(self.chunk) >= COMPARE_CHUNK:
            self._chunk_done(self._key_values(line))

    def _key_values(self, line):
        row = parse_row(line)
        return [row.get(column) for column in self.primary_key]

    def _by_key(self, lines):
        """{key: (line, row)} of file lines, in their order."""
        keyed = {}
        for line in lines:
            row = parse_row(line)
            keyed[row_key(row, self.primary_key)] = (line, row)
        return keyed

    def _count(self):
        if self.live_total is None and self.local is None:
            counted = exact_count(self.api, self.name)
            self.live_total = math.inf if counted is None else counted

    def _chunk_done(self, until):
        """A full chunk: its range is asked for at once; the oldest pending chunk is compared
        once api.jobs ranges are being read."""
        self._count()
        chunk, self.chunk = self.chunk, []
        after, self.asked_until = self.asked_until, until
        self.pending.append(PendingRange(chunk, after, until, self._read(after, until)))
        while len(self.pending) > (0 if self.local is not None else self.api.jobs):
            self._compare_next()

    def _compare_next(self):
        """Compare the oldest pending chunk with its range. That range was asked for from the
        end of the chunk before (its range was still being read); if that range held no rows,
        this one starts where that one did, and is asked for again. Only a range that held
        rows proves its end lies after its start: an empty one may be a chunk out of the
        server's order, and moving back would read rows twice. Not moving on after an empty
        range is always right: the next range covers it, and it was empty."""
        pending = self.pending.popleft()
        if pending.after != self.after and self.local is None:
            if pending.read is not None:
                pending.read.join(0)
            pending = pending._replace(after=self.after,
                                       read=self._read(self.after, pending.until))
        read = pending.read
        if read is not None and read.first_page() is not None:
            self.after = pending.until
            self.in_ranges += read.pages.in_range
        self._compare(pending.chunk, pending.until, read)

    def _read(self, after, until):
        """A RangeRead of the rows after `after` up to until, or None when every live row has
        been read already."""
        if self.local is not None:
            return self.local.upto(until)
        if self.in_ranges >= self.live_total:
            return None
        return RangeRead(self.api, self.name, self.live_meta, after, until)

    def _compare(self, chunk, until, read):
        # chunk[:same] equalled the first live rows of the range byte for byte; rest is None
        # until a live row does not, then {key: (line, row)} of the chunk's other rows.
        same, rest = 0, None
        for page in read or ():
            for live in page:
                self.live_rows += 1
                if rest is None:
                    if same < len(chunk) and chunk[same] == row_json(live).encode():
                        same += 1
                        continue
                    rest = self._by_key(chunk[same:])
                key = row_key(live, self.primary_key)
                found = rest.pop(key, None)
                if found is None:
                    self.only_live[key] = row_digest(live, self.columns)
                else:
                    line, row = found
                    if self.json_null_ok:
                        live = json_null_as_in_file(row, live, self.json_null_ok)
                    self.matched(key, line, row, live, self.same_values(row, live))
        self.unchanged_rows(same)
        if rest is None:
            for line in chunk[same:]:
                self.file_only(line)
        else:
            for line, row in rest.values():
                self.file_only(line, row)

    def same_values(self, row, live):
        """Whether two rows hold the same values in the compared columns, as JSON text: Python's
        == would take true for 1 and 1.0 for 1, which are different values in a column."""
        columns = self.columns
        return (compact_json([row.get(c) for c in columns])
                == compact_json([live.get(c) for c in columns]))

    def unchanged_rows(self, count):
        """count file rows equal, byte for byte, to the live rows with their keys."""

    def matched(self, key, line, row, live, equal):
        """A file row and the live row with its key, found in the same range."""
        if not equal:
            columns = [c for c in self.columns
                       if compact_json(row.get(c)) != compact_json(live.get(c))]
            self._changed(key, columns)
            if key in self.changed_keys:
                # Short values only (a time is): the log keeps them, and a value may be 5 MB.
                self.changed_live[key] = {c: live.get(c) if len(compact_json(live.get(c))) <= 80
                                          else "(long)" for c in columns}

    def file_only(self, line, row=None):
        """A file row whose key its range does not hold (yet: see reconcile)."""
        row = parse_row(line) if row is None else row
        self.only_file[row_key(row, self.primary_key)] = row_digest(row, self.columns)

    def _changed(self, key, columns):
        self.changed += 1
        if len(self.changed_keys) < self.listed:
            self.changed_keys[key] = columns

    def finish(self):
        """Compare the last chunks, then the live rows after the last range."""
        if self.chunk:
            self._chunk_done(self._key_values(self.chunk[-1]))
        self._count()
        while self.pending:
            self._compare_next()
        self._compare([], None, self._read(self.after, None))
        self.reconcile()
        return self

    def close(self):
        """After an error elsewhere (or Ctrl-C): give a range still being read a moment to end;
        its answer is dropped. The thread only reads, and does not outlive the process."""
        pending, self.pending = self.pending, collections.deque()
        deadline = time.monotonic() + THREAD_GRACE
        for chunk in pending:
            if chunk.read is not None:
                chunk.read.join(max(0.0, deadline - time.monotonic()))

    def reconcile(self):
        """Match the rows that turned up in different ranges on the two sides."""
        for key in [key for key in self.only_file if key in self.only_live]:
            if self.only_file.pop(key) != self.only_live.pop(key):
                self._changed(key, [])


def json_null_as_in_file(row, live, columns):
    """live, with SQL NULL in the given json columns taken as the file's JSON null there."""
    fixed = {c: row[c] for c in columns
             if live.get(c) is None and is_json_null(row.get(c))}
    return {**live, **fixed} if fixed else live


def is_json_null(value):
    """Whether a json_text value is the JSON document null (SQL NULL is None)."""
    return isinstance(value, str) and value.strip() == "null"


JSON_NULL = "JSON null, which it stores as SQL NULL"


def note_json_changes(plan, row, side):
    """Count the json values the API would change in a row to write (side "file") or in a live
    row a rollback would write back ("live"), by column and change (json_change)."""
    for column in plan.json_columns:
        change = json_change(row.get(column), column in plan.plain_json_columns)
        if change:
            found = plan.json_changes.setdefault((side, column, change), [0, []])
            found[0] += 1
            if len(found[1]) < 3:
                found[1].append(one_line(row_key(row, plan.primary_key or plan.columns), 120))


def json_change(value, plain):
    """How PostgREST would change a json_text value on the way in (its json_to_recordset), or
    None: a JSON null becomes SQL NULL; and in a json (not jsonb) column, which keeps its text,
    the spaces around the value are dropped, a top-level string comes back with its escapes
    decoded ("\u00e9" as "é"), and \u0000 is refused (22P05). Measured on PostgreSQL 17."""
    if not isinstance(value, str):
        return None
    if is_json_null(value):
        return JSON_NULL
    if not plain:
        return None
    if "\\u0000" in value:
        return "\\u0000, which it refuses"
    if value != value.strip():
        return "spaces around the value, which it drops"
    if value.startswith('"') and compact_json(json.loads(value)) != value:
        return "escapes in a top-level string, which it decodes"
    return None


class PlanComparison(TableComparison):
    """Step 3 for one table: the file against the live rows, in key ranges (TableComparison);
    the rows to write are spooled as they are found (their lines from the file, unparsed), and
    only the live rows the file lacks are kept (key and digest): memory does not grow with the
    rows restored.

    A file row its range does not hold is spooled as an insert at once. Were the file out of the
    server's order, the row may turn up live in another range: reconcile() then reads the spool
    again and makes such a row an update, or drops it when it is equal.
    """

    def __init__(self, api, plan, spool_path, forms, local=None):
        super().__init__(api, plan.name, plan.live_meta, plan.primary_key, plan.columns, forms,
                         local=local)
        self.plan, self.spool_path = plan, spool_path
        self.spool = None

    def add(self, line):
        self.plan.backup_rows += 1
        super().add(line)

    def unchanged_rows(self, count):
        self.plan.unchanged += count

    def matched(self, key, line, row, live, equal):
        if equal:
            self.plan.unchanged += 1
        else:
            self.plan.updates += 1
            self.write(False, line)
            # The rollback would write this live row back, through the same API.
            note_json_changes(self.plan, live, "live")

    def file_only(self, line, row=None):
        self.plan.inserts += 1
        self.write(True, line)


    def write(self, is_insert, line):
        """Spool one row to write: the line [is_insert,row] in JSON."""
        if self.plan.plain_json_columns or (self.plan.json_columns and b"null" in line):
            note_json_changes(self.plan, parse_row(line), "file")
        if self.spool is None:
            self.spool = open(self.spool_path, "wb", opener=private_opener)
            self.plan.spool = self.spool_path
        self.spool.write((b"[true," if is_insert else b"[false,") + line + b"]\n")

    def close(self):
        super().close()
        if self.spool is not None:
            self.spool.close()

    def reconcile(self):
        self.close()
        if not self.only_live or self.plan.spool is None:
            return
        plan, fixed = self.plan, self.spool_path.with_suffix(".fixed")
        changed = False
        with open(self.spool_path, "rb") as spool, \
                open(fixed, "wb", opener=private_opener) as out:
            for line in spool:
                is_insert, row = json.loads(line)
                key = row_key(row, plan.primary_key) if is_insert else None
                if key is not None and key in self.only_live:
                    changed = True
                    plan.inserts -= 1
                    if self.only_live.pop(key) == row_digest(row, plan.columns):
                        plan.unchanged += 1
                        continue
                    plan.updates += 1
                    line = compact_json([False, row]).encode() + b"\n"
                out.write(line)
        if changed:
            os.replace(fixed, self.spool_path)
        else:
            os.unlink(fixed)


def live_multiset(api, plan, forms, columns, where=(), json_null_ok=False):
    """Counter of the live rows of a keyless table (or those a filter matches), read in the
    file's forms, by row_value over columns (the file's)."""
    meta = with_stored_forms(plan.live_meta, forms)
    nulls = json_null_columns(forms) if json_null_ok else ()
    live = collections.Counter()
    for page in TablePages(api, plan.name, meta, where=where):
        live.update(row_value(row, columns, nulls) for row in page)
    return live


def row_value(row, columns, json_nulls=()):
    """A row's values over columns, as the text that tells rows of a keyless table apart; in
    the json_nulls columns a JSON null counts as SQL NULL (--accept-json-null)."""
    return compact_json([None if column in json_nulls and is_json_null(row.get(column))
                         else row.get(column) for column in columns])


def json_null_columns(forms):
    return {column for column, form in forms.items() if form == "json_text"}


class KeylessComparison:
    """Steps 3 and 5 for a table without a primary key: each file row takes one live copy of
    the same values, or is missing from the table (with spool_path: spooled as an insert). The
    live copies left over are rows the file lacks (only_live: one entry per copy); a restore
    leaves them, a rollback to the file deletes them (KeylessReconcile). Rows are compared
    over the file's columns (meta: the file's table metadata)."""

    def __init__(self, api, plan, meta, spool_path=None, json_null_ok=False):
        forms = file_forms(meta)
        self.api, self.plan, self.name = api, plan, plan.name
        self.columns = [c["name"] for c in meta.get("columns") or []]
        self.json_nulls = json_null_columns(forms) if json_null_ok else ()
        self.spool_path, self.spool = spool_path, None
        self.live = live_multiset(api, plan, forms, self.columns, json_null_ok=json_null_ok)
        self.live_rows = sum(self.live.values())
        if spool_path is not None and plan.json_columns:
            # A failed restore's rollback may write any live row back (KeylessReconcile).
            for value in self.live:
                note_json_changes(plan, dict(zip(self.columns, json.loads(value))), "live")
        self.missing, self.only_file, self.only_live, self.changed = 0, {}, [], 0
        self.changed_keys = {}

    def add(self, line):
        value = row_value(parse_row(line), self.columns, self.json_nulls)
        if self.spool_path is not None:
            self.plan.backup_rows += 1
        if self.live[value] > 0:
            self.live[value] -= 1
            if self.spool_path is not None:
                self.plan.unchanged += 1
            return
        self.missing += 1
        if len(self.only_file) < MISMATCHES_LISTED:
            self.only_file[value] = None
        if self.spool_path is not None:
            self.plan.inserts += 1
            if self.plan.json_columns:
                note_json_changes(self.plan, parse_row(line), "file")
            if self.spool is None:
                self.spool = open(self.spool_path, "wb", opener=private_opener)
                self.plan.spool = self.spool_path
            self.spool.write(b"[true," + line + b"]\n")

    def finish(self):
        self.close()
        self.only_live = list(self.live.elements())
        return self

    def close(self):
        if self.spool is not None:
            self.spool.close()


class KeylessReconcile:
    """Make a keyless table hold exactly the rows of a file, each as often as the file holds
    it, in two steps a rollback orders around its other writes: delete_surplus() (children
    first, before rows they may refer to are deleted) and insert_missing() (after the rows they
    may refer to are back).

    A row has no key to delete it by, so a surplus is deleted by its values: the rows a filter
    matches (as PostgreSQL's = sees them, which may take in rows whose text differs, such as
    '1 day' and '24 hours') are read first, deleted (the count checked), and those that must
    stay are written back exactly. Columns without an = operator (json, xml, point, ...) and
    values too long for a URL are left out of the filter, which then takes in more rows:
    nothing is lost by that, only more is written back. Many rows go in one filter."""

    FILTER_BUDGET = 4000  # characters of filter per request: well under a gateway's URL limit
    LONG_VALUE = 200  # characters: a longer value is left out of the filter

    def __init__(self, api, plan, path):
        self.api, self.plan = api, plan
        self.target, meta = collections.Counter(), None
        for table in read_tables(path):
            if table.name == plan.name:
                meta, self.columns = table.meta, table.columns
                self.target.update(row_value(row, self.columns) for row in table.rows)
        self.forms = file_forms(meta)
        live_meta = with_stored_forms(plan.live_meta, self.forms)
        formats = {c["name"]: (c.get("format") or "") for c in live_meta["columns"]}
        self.comparable = [c for c in self.columns
                           if formats.get(c, "").removesuffix("[]") not in NO_EQUALITY_FORMATS]
        self.writer = TablePlan(plan.name, [], self.columns)
        self.writer.json_columns = json_null_columns(self.forms)
        self.writer.skip_columns = set(plan.skip_columns)
        self.live, self.settled, self.deleted = None, set(), 0

    def delete_surplus(self):
        """Delete the rows the table holds more often than the file (with the rows the filter
        takes in with them, which insert_missing writes back)."""
        self.live = live_multiset(self.api, self.plan, self.forms, self.columns)
        surplus = [value for value, count in self.live.items() if count > self.target[value]]
        for where in self.filters(surplus):
            matched = live_multiset(self.api, self.plan, self.forms, self.columns, where)
            gone = self.api.delete_where(self.plan.name, where)
            if gone != sum(matched.values()):
                raise RestoreFailure(self.plan.name, f"{gone} row(s) deleted where "
                                     f"{sum(matched.values())} were read a moment before: the "
                                     f"table is changing while it is rolled back; stop the "
                                     f"app's writes and run the rollback again")
            self.deleted += gone
            self.settled.update(matched)

    def filters(self, values):
        """Filters (one or= each) matching the rows of these values, each within the budget."""
        branches, size = [], 0
        for value in values:
            row = dict(zip(self.columns, json.loads(value)))
            columns = [c for c in self.comparable
                       if len(filter_text(row.get(c))) <= self.LONG_VALUE]
            branch = equal_filter(columns, row)
            branch = f"{branch[0]}{branch[1]}"
            if branches and size + len(branch) > self.FILTER_BUDGET:
                yield [("or", "(" + ",".join(branches) + ")")]
                branches, size = [], 0
            branches.append(branch)
            size += len(branch) + 1
        if branches:
            yield [("or", "(" + ",".join(branches) + ")")]

    def insert_missing(self):
        """Write back the rows the table lacks, each as often as the file holds it; returns
        how many rows were written."""
        rows = []
        for value, count in self.target.items():
            have = 0 if value in self.settled else self.live[value]
            if count > have:
                row = dict(zip(self.columns, json.loads(value)))
                rows.extend([row] * (count - have))
        for part in chunks(rows, WRITE_BATCH_SIZE):
            write_rows(self.api, self.writer, Batch([(True, row) for row in part], 0,
                                                    [row_json(row).encode() for row in part]),
                       count=False)
        self.plan.skip_columns |= self.writer.skip_columns
        return len(rows)


# Types without an = operator (PostgreSQL 17, pg_catalog): a filter cannot compare them.
NO_EQUALITY_FORMATS = {"json", "xml", "point", "polygon", "jsonpath", "txid_snapshot",
                       "pg_snapshot", "refcursor"}


# --- 13. Restore step 3: the counts and the plan --------------------------------------------------
# record_counts compares the file with the live rows and spools the rows to write; a row no
# request can write (a NOT NULL foreign-key cycle) is found here, before the first write.

# Why complex: per table: not restored (skipped), the safety backup holding exactly the file's rows
# (unchanged, nothing compared), a keyed comparison (against the safety backup's rows if usable,
# else the live ones) or a keyless one, a rollback's extra keys; then, all spools written, rows-sent
# marks and parents-first self-references. Each comparison is its own class; this only picks one.
def record_counts(api, scan, plans, spool_dir, extra_keys=False, safety=None):
    """Step 3: which backup rows will be inserted, updated or left alone, by comparing the file
    with the live rows in key ranges; rows to write are spooled per table to spool_dir. Returns
    the live row count of each table (the count before the writes).

    With safety (a SafetyRows: the safety backup just taken), a table whose rows the safety
    backup holds in a form and order the file can be merged with is compared with those rows,
    read from disk: the live rows are read once for steps 1 and 3, not twice.

    With extra_keys, also the live rows whose keys the file does not hold (a rollback deletes
    them, so that the table ends up exactly as the file)."""
    counts = {}
    for table in read_tables(scan.path, as_bytes=True, label="comparing with the live rows"):
        plan = plans.get(table.name)
        if plan is None:
            continue
        spool = spool_dir / f"{len(counts)}.jsonl"
        forms = file_forms(table.meta)
        if safety and safety.holds_the_file_rows(table.name, plan, forms, scan.tables[table.name]):
            plan.backup_rows = plan.unchanged = counts[plan.name] = \
                scan.tables[table.name]["row_count"]
            continue
        local = safety.rows_of(table.name, plan, forms, scan.tables[table.name]) if safety \
            else None
        comparison = (PlanComparison(api, plan, spool, forms, local) if plan.primary_key
                      else KeylessComparison(api, plan, table.meta, spool))
        with contextlib.closing(comparison):
            for line in table.rows:
                comparison.add(line)
            comparison.finish()
        counts[plan.name] = comparison.live_rows
        if extra_keys:
            plan.extra_keys = list(comparison.only_live)
    for plan in plans.values():
        plan.outcome.sent_rows = bytearray(plan.inserts + plan.updates)
    for name, plan in plans.items():
        pk = plan.primary_key
        columns = [fk["column"] for fk in scan.tables[name]["meta"].get("foreign_keys") or []
                   if fk["references_table"] == name and [fk["references_column"]] == pk]
        if columns and plan.spool is not None:
            spool_parents_first(plan, columns)
    return counts


# Why complex: two stages sharing the edges: the NOT NULL foreign keys between planned tables,
# each to another table's whole primary key (out early when they form no cycle of tables), then
# the graph of the rows to insert along them; first_cycle searches it. Each condition on an edge
# is a case the API could in fact write, so they stay together.
def unwritable_cycle(scan, plans):
    """Rows to insert that refer to each other across tables through NOT NULL foreign keys:
    each request is its own transaction, so none of them can be written first. Returns the
    (table, key) of one such cycle, or []. Checked after the plan, before the first write."""
    edges = {}  # table -> [(column, parent table)] of NOT NULL references to another table
    for name in plans:
        meta = scan.tables[name]["meta"]
        required = {c["name"] for c in meta.get("columns") or [] if not c.get("nullable", True)}
        for fk in meta.get("foreign_keys") or []:
            parent = plans.get(fk["references_table"])
            if fk["column"] in required and parent is not None and parent.name != name and \
                    [fk["references_column"]] == parent.primary_key:
                edges.setdefault(name, []).append((fk["column"], parent.name))
    if not edges or not write_order(list(edges), {n: [{"references_table": p} for _, p in e]
                                                  for n, e in edges.items()})[1]:
        return []
    graph = {}  # (table, key) of a row to insert -> the (table, key) of the rows it needs
    for name in edges:
        for is_insert, key, row in spooled_rows(plans[name]):
            if is_insert:
                graph[(name, key)] = [(parent, compact_json([row.get(column)]))
                                      for column, parent in edges[name]]
    return first_cycle(graph)


def first_cycle(graph):
    """The nodes of the first cycle found in graph (node -> the nodes it needs; a node not in
    graph needs nothing), or []. Depth first with a path of its own: no recursion, whatever
    the length of a chain of rows."""
    state = {}  # 1: on the path, 2: done
    for start in graph:
        path = [(start, iter(graph[start]))]
        state[start] = 1
        while path:
            node, parents = path[-1]
            parent = next((p for p in parents if p in graph and state.get(p) != 2), None)
            if parent is None:
                state[node] = 2
                path.pop()
            elif state.get(parent) == 1:
                nodes = [n for n, _ in path]
                return nodes[nodes.index(parent):]
            else:
                state[parent] = 1
                path.append((parent, iter(graph[parent])))
    return []


def spooled_rows(plan):
    """(is_insert, key, row) of each row spooled to write."""
    if plan.spool is None:
        return
    with open(plan.spool, "rb") as spool:
        for line in spool:
            is_insert, row = json.loads(line)
            yield is_insert, row_key(row, plan.primary_key), row


def private_opener(path, flags):
    return os.open(path, flags, 0o600)


MAX_PARENT_DEPTH = 100  # deeper rows keep file order and wait for their parents (upsert_restore)


def spool_parents_first(plan, columns):
    """Reorder a table's spool so that each row comes after the rows it refers to through a
    self-reference (users.referred_by): batches then land whole, whatever the key order.

    Only keys are held in memory; the rows are sorted by depth through one file per level.
    """
    parents = {}
    with open(plan.spool, "rb") as spool:
        for line in spool:
            row = json.loads(line)[1]
            parents[row_key(row, plan.primary_key)] = [
                row_key({plan.primary_key[0]: row.get(column)}, plan.primary_key)
                for column in columns if row.get(column) is not None]
    depths = parent_depths(parents)
    if not any(depths.values()):
        return
    levels, sizes = {}, collections.Counter()
    try:
        with open(plan.spool, "rb") as spool:
            for line in spool:
                depth = depths[row_key(json.loads(line)[1], plan.primary_key)]
                if depth not in levels:
                    levels[depth] = open(plan.spool.with_name(f"{plan.spool.stem}.{depth}"), "w+b",
                                         opener=private_opener)
                levels[depth].write(line)
                sizes[depth] += 1
        with open(plan.spool, "wb") as spool:
            for depth in sorted(levels):
                levels[depth].seek(0)
                shutil.copyfileobj(levels[depth], spool)
        # Where each level starts in the spool: a batch is sent once the levels before its
        # last row's are written (upsert_restore writes several batches at once).
        plan.level_starts = list(itertools.accumulate(
            [0] + [sizes[depth] for depth in sorted(levels)][:-1]))
    finally:
        for level in levels.values():
            level.close()
            os.unlink(level.name)


def parent_depths(parents):
    """Each key's depth (key -> the keys of the rows it refers to): 0 when it refers to no key
    of parents, else one more than its deepest parent, at most MAX_PARENT_DEPTH. Walked
    without recursion; a cycle is cut where it closes (its rows are left to the retries)."""
    depths = {}
    for start in parents:
        path = [start] if start not in depths else []  # up the references to known depths
        while path:
            key = path[-1]
            unknown = [p for p in parents[key] if p in parents and p not in depths
                       and p not in path]  # a parent on the path is a cycle: left to the retries
            if unknown and len(path) <= MAX_PARENT_DEPTH:
                path.append(unknown[0])
                continue
            path.pop()
            depths[key] = min(MAX_PARENT_DEPTH, 1 + max(
                (depths.get(p, -1) for p in parents[key] if p in parents), default=-1))
    return depths


# --- 14. Restore step 4: writing ------------------------------------------------------------------
# upsert_restore writes the spooled rows in batches, parents before children, learning from
# refusals (a statement timeout, a generated column, a missing parent row).

class Batch(list):
    """Rows to write, (is_insert, row) pairs, that are consecutive lines of a table's spool
    from line `start` on: what a rollback undoes is then found by line, not kept by key.
    lines holds each row's JSON as the file has it, which is what is sent where it can be."""

    def __init__(self, items, start, lines):
        super().__init__(items)
        self.start, self.lines = start, lines

    def part(self, begin, end=None):
        end = len(self) if end is None else end
        return Batch(self[begin:end], self.start + begin, self.lines[begin:end])


def spooled_batches(plan):
    """The spooled rows of a table in Batches of plan.batch_size."""
    path = plan.spool
    if path is None:
        return
    lines, start = [], 0
    with open(path, "rb") as spool:
        for line in spool:
            lines.append(line)
            if len(lines) >= plan.batch_size:
                yield parse_batch(lines, start)
                start += len(lines)
                lines = []
    if lines:
        yield parse_batch(lines, start)


def parse_batch(lines, start):
    """A Batch from consecutive spool lines from line `start` on: one parse for the batch (a
    JSON array of the [is_insert, row] lines); each row's own bytes are its line less the
    "[true," or "[false," and the "]\n"."""
    return Batch([tuple(item) for item in json.loads(b"[" + b",".join(lines) + b"]")], start,
                 [line[6 if line.startswith(b"[true,") else 7:-2] for line in lines])


def at_most(batch, plan):
    """A batch in parts of at most plan.batch_size rows, read as each part is taken: batches made
    ahead (in_parallel's window) at a size a statement timeout has since halved are not sent whole."""
    begin = 0
    while begin < len(batch):
        size = plan.batch_size
        yield batch if begin == 0 and len(batch) <= size else batch.part(begin, begin + size)
        begin += size


def row_body(plan, batch):
    """(the JSON array of a batch's rows as sent, the columns sent): each row's bytes as the
    file holds them; or, where a json column's text must go as raw JSON or a generated column
    be left out, each row encoded again so."""
    raw, skip = plan.json_columns, plan.skip_columns
    columns = [c for c in plan.columns if c not in skip]
    if not raw and not skip:
        return b"[" + b",".join(batch.lines) + b"]", columns
    return ("[" + ",".join(encode_row(row, raw, skip) for _, row in batch) + "]").encode(), columns


def encode_row(row, raw=(), skip=()):
    """A row as the JSON object sent: the columns in raw hold a json document's text, which
    goes in as it is (a JSON string would be stored as a string); skip is left out."""
    return "{" + ",".join(json.encoder.encode_basestring(k) + ":"
                          + (v if k in raw and v is not None else row_json(v))
                          for k, v in row.items() if k not in skip) + "}"


def refused_row(plan, row, exc):
    """The RestoreFailure naming the one row the server refused (counted as the table's error),
    as every write names it."""
    with plan.outcome.counting:
        plan.outcome.errors += 1
    return RestoreFailure(plan.name, f"the row with key {row_key(row, plan.primary_key)} was "
                                     f"refused: {exc.code} {exc.message}"
                                     f"{' (' + exc.details + ')' if exc.details else ''}")


def refused_column(exc):
    """The column named by a 428C9 refusal ('cannot insert a non-DEFAULT value into column "x"')."""
    match = re.search(r'column "([^"]+)"', exc.message or "")
    return match.group(1) if match else None


# Why complex: each refusal needs its own answer: a statement timeout (halve the batch, or name
# the lone row), a GENERATED ALWAYS column (identity or key: patch by key; unnamed or already left
# out: fail; else leave it out, resend), a missing parent (raised, retried later), any other
# (bisect to the row, name it). One recursion over batch halves serves all, learning in the plan.
def write_rows(api, plan, batch, count=True):
    """Write one batch of (is_insert, row) to a table, learning as it goes; returns rows written.

    A statement timeout splits the batch and keeps the smaller size; a refused batch is split to
    find the offending row, which is named; a GENERATED ALWAYS column is left out from then on
    (an identity one means rows are patched by key, and missing rows cannot be re-inserted).
    A missing parent row (23503) raises MissingParent for the caller to retry later.
    """
    if plan.identity_always:
        return patch_rows(api, plan, batch)
    skipped = set(plan.skip_columns)  # as sent: another batch in flight may learn of a column
    try:
        api.upsert(plan.name, *row_body(plan, batch), plan.primary_key)
    except StatementTimeout:
        if len(batch) == 1:
            raise RestoreFailure(plan.name, f"writing the row with key "
                                 f"{row_key(batch[0][1], plan.primary_key)} hits the server's "
                                 f"statement timeout") from None
        plan.batch_size = max(1, len(batch) // 2)
        log.warning("%s: a batch hit the server's statement timeout; writing %d rows per "
                    "request from now on", plan.name, plan.batch_size)
        return sum(write_rows(api, plan, part, count) for part in halves(batch))
    except ApiRejected as exc:
        if exc.code == GENERATED_COLUMN:
            column = refused_column(exc)
            if column is None or column in skipped:
                raise RestoreFailure(plan.name, f"{exc.message}") from None
            if "identity" in (exc.details or "") or column in plan.primary_key:
                plan.identity_always = column
                log.warning("%s.%s is GENERATED ALWAYS AS IDENTITY: the API cannot write its "
                            "values, so rows are patched by key instead", plan.name, column)
                return patch_rows(api, plan, batch)
            skip_generated_column(plan, column)
            return write_rows(api, plan, batch, count)
        if exc.code == FK_VIOLATION:
            raise MissingParent(plan, batch, exc) from None
        if len(batch) == 1:
            raise refused_row(plan, batch[0][1], exc) from None
        written = 0
        for part in halves(batch):
            written += write_rows(api, plan, part, count)
        return written
    if count:
        count_written(plan, batch)
    return len(batch)


class MissingParent(Exception):
    """Control flow: a batch refers to parent rows not written yet (23503); retry it later."""

    def __init__(self, plan, batch, exc):
        super().__init__(exc.message)
        self.plan, self.batch, self.error = plan, batch, exc


def halves(batch):
    middle = len(batch) // 2
    return [batch.part(0, middle), batch.part(middle)]


def count_written(plan, batch):
    inserted = sum(1 for is_insert, _ in batch if is_insert)
    with plan.outcome.counting:  # batches of a table are written by several threads
        plan.outcome.inserted += inserted
        plan.outcome.updated += len(batch) - inserted


def patch_rows(api, plan, batch):
    """Rows of a table whose identity column is GENERATED ALWAYS: update each by its key.

    Such a column cannot be written through the API, so a row missing from the table cannot be
    put back with its key: that fails the table with the SQL that lifts the restriction.
    """
    missing = [row for is_insert, row in batch if is_insert]
    if missing:
        column = plan.identity_always
        raise RestoreFailure(
            plan.name, f"{plan.name}.{column} is GENERATED ALWAYS AS IDENTITY, so the API "
            f"cannot re-insert the {len(missing)} missing row(s) with their keys (first: "
            f"{row_key(missing[0], plan.primary_key)}); run in the SQL editor "
            f"`ALTER TABLE public.{quote_sql_ident(plan.name)} ALTER COLUMN "
            f"{quote_sql_ident(column)} SET GENERATED BY DEFAULT;`, restore again, then `... SET "
            f"GENERATED ALWAYS;`", named=True)
    for index, (_, row) in enumerate(batch):
        while True:
            skip = plan.skip_columns | {plan.identity_always}
            try:
                api.update_row(plan.name, plan.primary_key, row,
                               encode_row(row, plan.json_columns, skip).encode(),
                               [c for c in row if c not in skip])
                break
            except ApiRejected as exc:
                column = refused_column(exc) if exc.code == GENERATED_COLUMN else None
                if column is not None and column not in skip:
                    skip_generated_column(plan, column)
                    continue  # nothing was written: the same row again, without that column
                if exc.code == FK_VIOLATION:
                    count_written(plan, batch[:index])
                    raise MissingParent(plan, batch.part(index), exc) from None
                raise refused_row(plan, row, exc) from None
            except StatementTimeout:
                raise RestoreFailure(plan.name, f"updating the row with key "
                                     f"{row_key(row, plan.primary_key)} hits the server's "
                                     f"statement timeout") from None
    count_written(plan, batch)
    return len(batch)


def skip_generated_column(plan, column):
    """Leave a column the server refused as generated out of every row sent from now on."""
    plan.skip_columns.add(column)
    log.info("  %s.%s is a generated column: left out of the rows sent (PostgreSQL computes it)",
             plan.name, column)


def parents_written_first(plan, failed):
    """The batches of a table, each with the Event its write sets when done, each given only
    once the batches holding the parents of its rows (the levels of spool_parents_first before
    its last row's) are written: the rows of one request may refer to each other, those of
    requests in flight at once may not. Once a write has failed (failed is set), no more: the
    batches waited for may never be sent."""
    sent = []  # (first line, Event) of the batches given so far
    for batch in spooled_batches(plan):
        if plan.level_starts:
            last = batch.start + len(batch) - 1
            needed = plan.level_starts[bisect.bisect_right(plan.level_starts, last) - 1]
            for start, event in sent:
                while start < needed and not event.wait(0.1):
                    if failed.is_set():
                        return
            sent = [(start, event) for start, event in sent if not event.is_set()]
        event = threading.Event()
        sent.append((batch.start, event))
        yield batch, event


def upsert_restore(api, plans, order, progress):
    """Step 4: upsert the spooled rows, parents before children, in batches.

    Batches refused for a missing parent row are retried once the other batches are in (this is
    how cycles land; self-references are sorted parents first by record_counts); when a round
    makes no progress, the waiting batches are halved from round to round, and a row that still
    cannot land on its own is named. Raises RestoreFailure.
    """
    pending = write_tables_once(api, plans, order, progress)
    write_waiting_batches(api, pending)


def write_sent(api, plan, batch):
    """write_rows, with the batch marked sent first; a failure other than a missing parent
    becomes the table's failure."""
    # From the first attempt on, the rows may have landed, whatever the answer says.
    plan.mark_sent(batch)
    try:
        return write_rows(api, plan, batch)
    except MissingParent:
        raise
    except Exception as exc:
        plan.outcome.failure = plan.outcome.failure or one_line(exc, 400)
        raise


def write_tables_once(api, plans, order, progress):
    """Step 4's first pass: every batch of every table once, in order; returns the (plan,
    batch) parts refused for a missing parent row."""
    def first_try(plan, made, sent):
        """A batch made ahead, in parts of the size when it is sent; returns (rows written,
        the parts waiting for parent rows)."""
        written, waiting = 0, []
        try:
            for batch in at_most(made, plan):
                try:
                    written += write_sent(api, plan, batch)
                except MissingParent as missing:
                    waiting.append(missing.batch)
            return written, waiting
        except BaseException:
            failed.set()  # no batch is given after a failure (parents_written_first)
            raise
        finally:
            sent.set()

    failed = threading.Event()

    pending = []
    for number, name in enumerate(order, 1):
        plan = plans[name]
        progress.start(f"writing {name} (table {number} of {len(order)})",
                       plan.inserts + plan.updates)
        # Up to api.jobs batches of the table in flight; the table is done before the next
        # (its children) begins.
        for written, waiting in in_parallel(
                (functools.partial(first_try, plan, batch, sent)
                 for batch, sent in parents_written_first(plan, failed)), api.jobs,
                grace=None):
            pending.extend((plan, batch) for batch in waiting)
            progress.advance(written)
        progress.done(f"  {name}: {plan.outcome.inserted} inserted, {plan.outcome.updated} "
                      f"updated, {plan.unchanged} unchanged"
                      + (f", {sum(len(b) for p, b in pending if p is plan)} waiting for parent "
                         f"rows" if any(p is plan for p, _ in pending) else ""))
    return pending


def write_waiting_batches(api, pending):
    """Step 4's later rounds: the batches refused for a missing parent row, tried again while
    a round gets any through (halved, then written without their nullable references); the row
    that still cannot land is named. Raises RestoreFailure."""
    errors, unlinked, split = {}, [], []

    def attempt(plan, batch):
        refused = []
        # Once a round got nothing through, every batch is halved from round to round, to
        # narrow down the rows that cannot land.
        for part in (halves(batch) if split and len(batch) > 1 else [batch]):
            try:
                write_sent(api, plan, part)
            except MissingParent as missing:
                errors[id(missing.batch)] = missing.error
                refused.append(missing.batch)
        return refused

    def stuck(still):
        if any(len(batch) > 1 for _, batch in still):
            split.append(True)
            return still
        if not unlinked and write_unlinked(api, still):
            # Rows that refer to each other (a cycle) went in without their nullable
            # references; the next round writes them whole, which links them.
            unlinked.append(True)
            return still
        (plan, batch), error = still[0], errors[id(still[0][1])]
        plan.outcome.failure = (
            f"the row with key {row_key(batch[0][1], plan.primary_key)} refers to a row that is "
            f"neither in the backup nor in the project ({error.message}"
            f"{'; ' + error.details if error.details else ''})")
        raise RestoreFailure(plan.name, plan.outcome.failure)

    in_rounds(pending, attempt, stuck)


def in_rounds(pending, attempt, stuck):
    """The one way refused work is tried again: round after round, while a round gets anything
    through. pending holds (plan, part) items; attempt(plan, part) returns the parts of it still
    refused ([] when all went through); when a whole round gets nothing through, stuck(still)
    returns the items to go on with (to be halved, to find the rows that cannot go, or after
    clearing their way) or raises."""
    while pending:
        waiting = sum(len(part) for _, part in pending)
        still = [(plan, left) for plan, part in pending for left in attempt(plan, part)]
        if still and sum(len(part) for _, part in still) == waiting:
            still = stuck(still)
        pending = still


def halved(items):
    """(plan, part) items with each part of more than one row in two (a Batch by its lines)."""
    out = []
    for plan, part in items:
        middle = len(part) // 2
        pieces = ([part] if len(part) < 2 else halves(part) if isinstance(part, Batch)
                  else [part[:middle], part[middle:]])
        out.extend((plan, piece) for piece in pieces)
    return out


def write_unlinked(api, pending):
    """Write rows that wait for each other with their nullable foreign keys NULL (only the
    rows of tables that have such keys); returns whether any went in. Their counts wait for
    the write that links them."""
    wrote = False
    for plan, batch in pending:
        columns = nullable_references(plan)
        if not columns or not plan.primary_key:  # a keyless row would be inserted twice
            continue
        rows = [(is_insert, {**row, **{c: None for c in columns}}) for is_insert, row in batch]
        unlinked = Batch(rows, batch.start, [encode_row(row).encode() for _, row in rows])
        try:
            write_rows(api, plan, unlinked, count=False)
            wrote = True
        except MissingParent:
            continue  # a NOT NULL reference still waits: the row stays pending as it was
    return wrote


# --- 15. Restore steps 5 and 7: verify, roll back -------------------------------------------------
# verify_restore holds the live rows against the file; rollback brings touched tables back to the
# safety backup and verifies them against it.

def exact_count(api, name):
    """A table's exact row count, or None when counting hits the statement timeout."""
    try:
        return api.count(name)
    except StatementTimeout:
        return None


class Mismatches(list):
    """The mismatches a verification lists (the first MISMATCHES_LISTED of each kind per
    table), and in total how many it found."""

    total = 0


def verify_restore(api, plans, reference_path, expected_counts, ignore_columns=(),
                   json_null_ok=False):
    """Step 5: every row of the reference file is in the live table with equal values, and each
    table's count is as expected. Returns the Mismatches (dicts naming table and key).

    The file is streamed against the live rows of each chunk's key range (TableComparison), so
    memory does not grow with the table. Values are compared in the file's forms (exact text);
    ignore_columns are left out.
    """
    mismatches = Mismatches()
    # A count that hits the statement timeout is left to the comparison, which reads every live
    # row anyway (then it skips no range).
    counted = {name: exact_count(api, name) for name in plans}
    for table in read_tables(reference_path, as_bytes=True, label="verifying"):
        plan, name = plans.get(table.name), table.name
        if plan is None:
            continue
        if plan.primary_key:
            comparison = TableComparison(
                api, name, plan.live_meta, plan.primary_key,
                compared_columns(plan, ignore_columns, table.meta), file_forms(table.meta),
                listed=MISMATCHES_LISTED, json_null_ok=json_null_ok,
                live_total=math.inf if counted[name] is None else counted[name])
        else:
            comparison = KeylessComparison(api, plan, table.meta, json_null_ok=json_null_ok)
        with contextlib.closing(comparison):
            for line in table.rows:
                comparison.add(line)
            comparison.finish()
        if counted[name] is None:
            counted[name] = comparison.live_rows
        if name in expected_counts and counted[name] != expected_counts[name]:
            mismatches.append({"table": name, "key": None,
                               "problem": f"{counted[name]} rows, expected {expected_counts[name]}"})
            mismatches.total += 1
        mismatches.total += comparison.changed + (
            comparison.missing if isinstance(comparison, KeylessComparison)
            else len(comparison.only_file))
        mismatches.extend({"table": name, "key": one_line(key, 200), "problem": "missing"}
                          for key in itertools.islice(comparison.only_file, MISMATCHES_LISTED))
        mismatches.extend({"table": name, "key": key, "problem": "different values",
                           "columns": columns, "live_values": comparison.changed_live.get(key, {})}
                          for key, columns in comparison.changed_keys.items())
    return mismatches


def compared_columns(plan, ignore_columns, file_meta=None):
    """The columns verification compares: the file's (file_meta, the reference file's table
    metadata: a safety backup may hold a column added since the backup), else the plan's, less
    those ignored by name or as table.column."""
    columns = [c["name"] for c in file_meta["columns"]] if file_meta else plan.columns
    return [c for c in columns
            if c not in ignore_columns and f"{plan.name}.{c}" not in ignore_columns]


def mismatch_message(mismatches, what, since):
    """One line about verification mismatches, with the ignore-columns advice when the evidence
    says a trigger rewrote the values (see rewritten_columns)."""
    first = mismatches[:3]
    shown = "; ".join(f"{m['table']} key {m['key']}: {m['problem']}"
                      + (f" in {', '.join(m['columns'])}" if m.get("columns") else "")
                      if m["key"] else f"{m['table']}: {m['problem']}" for m in first)
    rewritten = rewritten_columns(mismatches, since)
    advice = ""
    if rewritten:
        names = ",".join(sorted({c for columns in rewritten.values() for c in columns}))
        advice = (f"; the differences are confined to {names}, which a trigger (e.g. "
                  f"moddatetime) may rewrite on every write: if so, leave it out of "
                  f"verification with --ignore-columns {names} (or VERIFY_IGNORE_COLUMNS={names})")
    total = getattr(mismatches, "total", len(mismatches))
    return f"{what} verification found {total} mismatch(es): {shown}{advice}"


# Why complex: the advice to ignore a column needs full evidence, gate after gate: every mismatch
# is "different values", every sampled one names its columns, a pair of columns at most in all,
# every live value there a time taken during this run. A failed gate gives no advice; together the
# gates are the argument that the advice cannot hide real corruption, so they stay in one place.
def rewritten_columns(mismatches, since):
    """{table: [columns]} when the evidence says a trigger rewrote them on every write
    (moddatetime): every mismatch is a row that differs only in the same column or two, and
    every live value there is a time taken during this run (since); else {}. Anything less is
    no evidence, and advising to ignore the column could hide real corruption."""
    if not mismatches or any(m["problem"] != "different values" for m in mismatches):
        return {}
    sampled = [m for m in mismatches if "columns" in m]
    if not sampled or not all(m["columns"] for m in sampled) or \
            len({c for m in sampled for c in m["columns"]}) > 2:
        return {}
    if not all(taken_since(value, since) for m in sampled
               for value in (m.get("live_values") or {None: None}).values()):
        return {}
    by_table = {}
    for m in sampled:
        by_table.setdefault(m["table"], set()).update(m["columns"])
    return {name: sorted(columns) for name, columns in by_table.items()}


def taken_since(value, since):
    """Whether a value is a timestamp (ISO or PostgreSQL's text) at or after since, less a
    second for clocks that differ."""
    if not isinstance(value, str) or since is None:
        return False
    text = re.sub(r"([+-]\d\d)$", r"\1:00", value.strip().replace("T", " ", 1))
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return False
    if moment.tzinfo is None:  # timestamp without time zone: taken as UTC, as Supabase runs
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment >= since - datetime.timedelta(seconds=1)


def delete_rows(api, plans, order, which, record=False, defer=False):
    """Delete rows by key, children before parents: which(plan) gives the key strings (any
    iterable; it is consumed a batch at a time). With record, the keys sent go into
    plan.outcome.deleted_keys, for a rollback of this deletion.

    A batch refused because other rows still refer to its rows (23503) is retried after the
    rest; when a round makes no progress that is a RestoreFailure naming the table. With defer,
    the refused batches are returned instead, for retry_deletes() once other writes have moved
    the rows that refer to them.
    """
    pending = []
    for name in reversed(order):
        plan = plans[name]
        for batch in chunks(which(plan), DELETE_BATCH_SIZE):
            if record:
                plan.outcome.deleted_keys.update(batch)
            keys = [json.loads(key) for key in batch]
            if deleted_or_refused(api, plan, keys) is not None:
                pending.append((plan, keys))
    if defer:
        return pending
    retry_deletes(api, pending)
    return []


def deleted_or_refused(api, plan, keys):
    """Delete rows by key; None when done, the ApiRejected when other rows still refer to them."""
    try:
        api.delete_keys(plan.name, plan.primary_key, keys)
        return None
    except ApiRejected as exc:
        if exc.code != FK_VIOLATION:
            raise RestoreFailure(plan.name, f"deleting rows was refused: {exc.code} "
                                 f"{exc.message}") from None
        return exc


def retry_deletes(api, pending):
    """Retry refused delete batches, round after round, while a round makes progress. When one
    does not, the batches are halved (one row still referred to holds back its whole batch),
    and once single rows stop moving, the rows left refer to each other (a cycle, a chain
    deeper than a batch): their nullable foreign keys are cleared, which loses nothing, since
    they are being deleted. Only rows that others outside them still refer to stay: that is a
    RestoreFailure naming the table."""
    refusals, cleared_at = [], []

    def attempt(plan, keys):
        refusal = deleted_or_refused(api, plan, keys)
        if refusal is None:
            return []
        refusals.append(refusal)
        return [keys]

    def stuck(still):
        if any(len(keys) > 1 for _, keys in still):
            return halved(still)
        left = sum(len(keys) for _, keys in still)
        if left not in cleared_at and clear_references(api, still):
            cleared_at.append(left)
            return still
        error = refusals[-1]
        raise RestoreFailure(still[0][0].name, f"rows cannot be deleted because other rows "
                             f"still refer to them ({error.message}"
                             f"{'; ' + error.details if error.details else ''})")

    in_rounds(pending, attempt, stuck)


def nullable_references(plan):
    """The columns of a table's foreign keys that may be NULL (single-column keys, as the API
    describes them)."""
    meta = plan.live_meta or {}
    nullable = {c["name"] for c in meta.get("columns") or [] if c.get("nullable")}
    return sorted({fk["column"] for fk in meta.get("foreign_keys") or []
                   if fk["column"] in nullable})


def clear_references(api, pending):
    """Set the nullable foreign keys of rows about to be deleted to NULL, so that rows that
    refer to each other can go; returns whether there was any to clear."""
    cleared = False
    for plan, keys in pending:
        columns = nullable_references(plan)
        if not columns:
            continue
        body = compact_json({column: None for column in columns}).encode()
        try:
            api.update_keys(plan.name, plan.primary_key, keys, body, columns)
        except ApiRejected as exc:
            raise RestoreFailure(plan.name, f"clearing the references of rows to delete was "
                                 f"refused: {exc.code} {exc.message}") from None
        cleared = True
    return cleared


def delete_extra(api, plans, order, path):
    """A rollback's last write: delete the live rows whose keys the file does not hold; a
    table without a key is made to hold exactly the file's rows (KeylessReconcile: its surplus
    goes first, children before parents, and its rows to write back come last)."""
    keyless = [KeylessReconcile(api, plans[name], path) for name in reversed(order)
               if not plans[name].primary_key and plans[name].extra_keys]
    for reconcile in keyless:
        reconcile.plan.outcome.reconciled = True
        reconcile.delete_surplus()
    keyed = {name: plan for name, plan in plans.items() if plan.primary_key}
    delete_rows(api, keyed, [n for n in order if n in keyed], lambda plan: plan.extra_keys,
                record=True)
    for reconcile in reversed(keyless):
        reconcile.insert_missing()


# Why complex: the order is the safety argument: keyless tables lose their surplus first, inserted
# rows are deleted (deferred when still referred to), the safety rows of updated or deleted rows
# are written back, deferred deletes retried, keyless rows put back, then all verified. The
# write-back plans and spools could be a helper; the sequence itself should stay in one place.
def rollback(api, plans, order, safety_path, progress, ignore_columns=(), json_null_ok=False):
    """Bring every touched table back to the safety backup: delete the rows the restore inserted,
    write back the safety rows of the rows it updated (or deleted), then verify the tables against
    the safety backup, leaving ignore_columns out (by name or as table.column).

    Only the rows a write was sent for are written back: the others are as they were, and
    writing them could only fire triggers, or undo what the app changed since. Returns the
    mismatches of that verification (empty: the rollback is exact).
    """
    touched = {name: plan for name, plan in plans.items() if plan.touched}
    # A table without a key has no key to delete or rewrite rows by: it is made to hold the
    # safety backup's rows again, as a multiset; its surplus goes first (children first, as
    # its rows may refer to rows deleted below), its missing rows last.
    keyless = [KeylessReconcile(api, touched[name], safety_path) for name in reversed(order)
               if name in touched and not touched[name].primary_key]
    for reconcile in keyless:
        reconcile.delete_surplus()
    plans = {name: plan for name, plan in plans.items() if plan.primary_key}
    order = [name for name in order if name in plans]
    # Deleted first (a row written back may need a unique value an inserted row holds), but a
    # delete that rows still refer to waits for the write-back, which points them back.
    refused = delete_rows(api, plans, order, lambda plan: (key for is_insert, key
                                                           in plan.sent_spool_keys() if is_insert),
                          defer=True)
    rollback_plans = {}
    for name, plan in plans.items():
        rollback_plans[name] = clone = TablePlan(name, plan.primary_key, plan.columns)
        clone.skip_columns, clone.identity_always = set(plan.skip_columns), plan.identity_always
        clone.live_meta = plan.live_meta
        clone.rewrite = {key for is_insert, key in plan.sent_spool_keys()
                         if not is_insert} | plan.outcome.deleted_keys
    with tempfile.TemporaryDirectory(dir=safety_path.parent, prefix=TEMP_PREFIX) as spool_dir:
        for table in read_tables(safety_path, label="reading the safety backup"):
            clone = rollback_plans.get(table.name)
            if clone is None:
                continue
            # The safety backup's own columns: it may hold one added since the backup.
            clone.json_columns, clone.columns = json_text_columns(table.meta), table.columns
            path = Path(spool_dir) / f"{list(rollback_plans).index(table.name)}.jsonl"
            with open(path, "w", encoding="utf-8", opener=private_opener) as spool:
                for row in table.rows:
                    if row_key(row, clone.primary_key) in clone.rewrite:
                        spool.write(compact_json([False, row]) + "\n")
                        clone.updates += 1
            if clone.updates:
                clone.spool = path
        for clone in rollback_plans.values():
            clone.outcome.sent_rows = bytearray(clone.updates)
        upsert_restore(api, rollback_plans, order, progress)
    retry_deletes(api, refused)
    for reconcile in reversed(keyless):
        reconcile.insert_missing()
    expected = {name: plan.safety_count for name, plan in touched.items()}
    return verify_restore(api, touched, safety_path, expected, ignore_columns, json_null_ok)


# --- 16. Auth users: backup and restore steps (--auth) --------------------------------------------
# The project's users, through the auth admin API (supabase/auth, GoTrue) with the service key:
# backed up as the entry "auth.users" (kind auth_users, one user object per row, as the API
# returns it), restored behind the same safety net as the tables, before them (a public table
# may refer to auth.users). The API never returns password hashes, and creates users with new
# timestamps; what cannot come back is said in the plan (AUTH_LIMITS) and in SAFETY.md.
#
# GoTrue lists users newest first (ORDER BY created_at DESC, nothing else) by page and offset:
# users created in one instant come in any order, and a user added or deleted between two pages
# shifts the rest: a user may be read twice, or missed, and a sign-up and a deletion together
# keep the count. So the list is read whole twice, and taken only when two readings in a row
# hold the same users and each adds up to the count the server gives (X-Total-Count).

AUTH_ENTRY = "auth.users"
AUTH_KIND = "auth_users"
AUTH_PAGE_SIZE = 1000  # users per page: GoTrue's most (MaxPerPage); its default is 50
AUTH_LIST_PASSES = 4  # whole listings before a list that keeps changing fails the backup
# app_metadata keys the auth server writes itself, from the user's identities, on every create
SERVER_APP_METADATA = ("provider", "providers")
AUTH_LIMITS = ("no password hashes come through the admin API: restored users sign in by magic "
               "link or password reset",
               "OAuth identities, MFA factors and sessions are not restored",
               "created and confirmation times become the time of the restore",
               "anonymous users cannot be created through the API and are not restored")


def wants_auth_users(args, config):
    """Whether a backup takes the auth users: --auth, else the setting BACKUP_AUTH."""
    if getattr(args, "auth", None):
        return True
    value = (config.settings.get("BACKUP_AUTH") or "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"BACKUP_AUTH is {value!r}: set it to 1 to back up the auth users, or 0 "
                      f"(or leave it out) not to")


def list_auth_users(api, what="listing the auth users"):
    """Every user the admin API returns, every page: ({id: user}, the server's count).

    Taken when two whole readings in a row hold the same users and each adds up to the
    server's count (see the section's comment); after AUTH_LIST_PASSES readings without that,
    it fails (IncompleteBackupError) rather than miss a user."""
    previous = None
    for attempt in range(1, AUTH_LIST_PASSES + 1):
        users, totals = read_auth_user_list(api, what)
        adds_up = len(totals) <= 1 and all(len(users) == total for total in totals)
        if adds_up and previous == set(users):
            return users, (totals.pop() if totals else len(users))
        then = (f"reading it again ({attempt + 1} of {AUTH_LIST_PASSES})"
                if attempt < AUTH_LIST_PASSES else "giving up")
        if not adds_up:
            log.warning("%s: %d users read, but the server counted %s: users were added or "
                        "deleted during the reading, or users created in one instant came in "
                        "another order from page to page; %s", what, len(users),
                        " then ".join(map(str, sorted(totals))), then)
        elif previous is not None:
            log.warning("%s: two readings in a row held different users (users were added or "
                        "deleted meanwhile); %s", what, then)
        previous = set(users) if adds_up else None
    raise IncompleteBackupError(f"{what}: in {AUTH_LIST_PASSES} readings, no two in a row held "
                                f"the same users adding up to the server's count, so none can "
                                f"be shown complete; run again when sign-ups are quieter")


def read_auth_user_list(api, what):
    """One reading of the whole user list, page after page: ({id: user}, the set of counts
    the pages' X-Total-Count gave). Pages follow the Link header; without one, a full page
    means there may be more."""
    users, totals, page = {}, set(), 1
    while True:
        response = api.request(f"{what} (page {page})", "GET",
                               params=[("page", str(page)), ("per_page", str(AUTH_PAGE_SIZE))],
                               auth_path="/admin/users")
        try:
            batch = json.loads(response.content)["users"]
            if not (isinstance(batch, list) and all(isinstance(u, dict) and "id" in u
                                                    for u in batch)):
                raise ValueError("not a list of users")
        except (ValueError, KeyError, TypeError):
            raise ConnectionFailure(f"{what}: {api.url}/auth/v1/admin/users answered "
                                    f"without a list of users; check SUPABASE_URL") from None
        total = response.headers.get("X-Total-Count", "")
        if total.isdigit():
            totals.add(int(total))
        users.update((user["id"], user) for user in batch)
        link = response.headers.get("Link")
        more = 'rel="next"' in link if link is not None else len(batch) == AUTH_PAGE_SIZE
        if not batch or not more:
            return users, totals
        page += 1


def back_up_auth_users(api, writer, summary, progress):
    """snapshot's last entry: every auth user, in id order, as the entry auth.users."""
    progress.start(f"{AUTH_ENTRY} (the auth admin API)", None, unit="users")
    try:
        users, counted = list_auth_users(api)
    except BackupError as exc:
        exc.args = (f"{AUTH_ENTRY}: {exc}; no backup file was written",)
        raise
    writer.begin_table(AUTH_ENTRY, {"kind": AUTH_KIND, "primary_key": ["id"], "columns": [],
                                    "source": "GET /auth/v1/admin/users",
                                    "not_included": "password hashes, identities' tokens, MFA "
                                                    "factors, sessions"})
    writer.write_rows([users[user_id] for user_id in sorted(users)])
    count, digest = writer.end_table(count_before=counted, count_after=len(users),
                                     count_method="exact")
    summary["tables"][AUTH_ENTRY] = {"rows": count, "sha256": digest, "kind": AUTH_KIND}
    summary["rows"] += count
    progress.done(f"  {AUTH_ENTRY}: {count} users (no password hashes: the API gives none)")


def scan_entry_rows(table, problems):
    """scan_backup's checks of an entry that is not a table (by its kind); returns True."""
    if table.kind == AUTH_KIND:
        seen = set()
        for user in table.rows:
            user_id = user.get("id") if isinstance(user, dict) else None
            if not isinstance(user_id, str) or not UUID_TEXT.fullmatch(user_id):
                problems.append(f"{table.name}: a user has no id that is a UUID")
            elif user_id in seen:
                problems.append(f"{table.name}: user {user_id} appears twice")
            seen.add(user_id)
    return True


UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                       r"[0-9a-fA-F]{12}")


def read_auth_entry(path):
    """The users of a file's auth.users entry, {id: user}; None when the file has no such
    entry (decided on the kind)."""
    for table in read_tables(path, as_bytes=True, kinds=(AUTH_KIND,)):  # scanned already
        if table.kind == AUTH_KIND:
            return {user["id"]: user for user in map(parse_row, table.rows)}
    return None


def user_metadata_of(user, key):
    """A user's user_metadata or app_metadata (the server's own app_metadata keys left out),
    with its top-level nulls dropped: an update cannot set one (a null removes the key)."""
    value = user.get(key) or {}
    return {k: v for k, v in value.items() if v is not None and
            not (key == "app_metadata" and k in SERVER_APP_METADATA)}


def banned_for(user, now):
    """The ban_duration that bans a user until its banned_until again ("123s"), or None."""
    until = parse_time(user.get("banned_until"))
    if until is None or until <= now:
        return None
    return f"{math.ceil((until - now).total_seconds())}s"


def parse_time(text):
    """An RFC 3339 time from the auth server, or None."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def create_user_body(user, now):
    """The admin API's create request for a user of the file: its id, email, phone, metadata,
    role, confirmed state and ban; no password (the auth server makes a random one)."""
    body = {"id": user["id"], "user_metadata": user.get("user_metadata") or {},
            "app_metadata": user_metadata_of(user, "app_metadata"),
            "email_confirm": bool(user.get("email_confirmed_at")),
            "phone_confirm": bool(user.get("phone_confirmed_at"))}
    for key in ("email", "phone", "role"):
        if user.get(key):
            body[key] = user[key]
    if user.get("aud") and user["aud"] != "authenticated":
        body["aud"] = user["aud"]
    ban = banned_for(user, now)
    if ban:
        body["ban_duration"] = ban
    return body


def metadata_update_body(target, live):
    """The update that makes a live user's metadata equal to target's: the admin API merges key
    by key, so a key target lacks is sent as null (which removes it)."""
    body = {}
    for key in ("user_metadata", "app_metadata"):
        want, have = user_metadata_of(target, key), user_metadata_of(live, key)
        if want != have:
            body[key] = {**{k: None for k in have if k not in want}, **want}
    return body


def user_differences(want, have, created):
    """What of a user the verification finds different (a list of field names)."""
    fields = ["user_metadata", "app_metadata"]
    if created:
        fields += ["email", "phone", "role"]
    found = [f for f in fields if (user_metadata_of(want, f) != user_metadata_of(have, f)
                                   if f.endswith("metadata") else
                                   (want.get(f) or "") != (have.get(f) or ""))]
    if created:
        found += [f for f in ("email_confirmed_at", "phone_confirmed_at", "banned_until")
                  if bool(want.get(f)) != bool(have.get(f)) and
                  (f != "banned_until" or banned_for(want, utc_now()))]
    return found


def auth_failure(what, exc):
    """One line for an auth admin API error (ApiRejected, or a BackupError's message)."""
    if isinstance(exc, ApiRejected):
        return f"{what}: the auth server answered {exc.status} {exc.code} {one_line(exc.message)}"
    return f"{what}: {one_line(exc)}"


class AuthRestore:
    """The auth users of one restore or rollback (RestoreRun calls one method per step): the
    plan (users to create, metadata to put back), the writes, the verification, the undo."""

    def __init__(self, file_users, update_metadata, mode):
        self.file_users, self.update_metadata, self.mode = file_users, update_metadata, mode
        self.live = {}
        self.to_create, self.to_update, self.anonymous, self.left = [], [], [], []
        self.created, self.updated = [], []  # ids written by this run, in order
        self.conflicts = []

    @classmethod
    def for_run(cls, run, path):
        """The auth part of a run, or None: a restore with --auth, or a rollback to a file that
        holds users; without --auth a file's users are left alone, in one line."""
        rollback = run.mode == "rollback"
        users = read_auth_entry(path)
        if users is None:
            if getattr(run.args, "auth", False):
                raise ValidationError(f"--auth: {path.name} holds no auth users (it was backed "
                                      f"up without --auth); the database was not touched")
            return None
        if not rollback and not getattr(run.args, "auth", False):
            log.info("%s holds %d auth users: left alone (add --auth to restore them)",
                     path.name, len(users))
            return None
        return cls(users, rollback or getattr(run.args, "update_users", False), run.mode)

    # -- step 3: the plan

    # Why complex: each user of the file is one of: not live and without email or phone (anonymous,
    # not creatable), not live with an email or phone a live user holds (a conflict), not live
    # otherwise (to create), live with other metadata (to update, or left alone without
    # --update-users). One loop over the users sorts them into the lists the plan reports.
    def plan(self, api):
        """Users to create (the file's, by id, that the project lacks), metadata to put back
        (only when asked); conflicts (a user to create whose email or phone a live user with
        another id holds) are collected for the run to refuse."""
        self.live, _ = list_auth_users(api, "reading the live auth users")
        emails = {u["email"].lower(): i for i, u in self.live.items() if u.get("email")}
        phones = {u["phone"]: i for i, u in self.live.items() if u.get("phone")}
        for user_id, user in sorted(self.file_users.items()):
            live = self.live.get(user_id)
            if live is None:
                if not user.get("email") and not user.get("phone"):
                    self.anonymous.append(user_id)
                    continue
                holder = (emails.get((user.get("email") or "").lower())
                          or phones.get(user.get("phone") or ""))
                if holder:
                    taken = "email " + user["email"] if emails.get(
                        (user.get("email") or "").lower()) else "phone " + user["phone"]
                    self.conflicts.append(f"{user_id} ({taken} belongs to live user {holder})")
                else:
                    self.to_create.append(user_id)
            elif metadata_update_body(user, live):
                (self.to_update if self.update_metadata else self.left).append(user_id)
        return self.conflicts

    def describe(self):
        """The plan's lines, the limits included (never hidden)."""
        lines = [f"{AUTH_ENTRY}: {len(self.file_users)} users in the file, {len(self.live)} "
                 f"live; {len(self.to_create)} to create, {len(self.to_update)} whose metadata "
                 f"to put back, none deleted"]
        if self.left:
            lines.append(f"  {len(self.left)} live user(s) differ from the file in metadata: "
                         f"left as they are (--update-users puts the file's back)")
        if self.anonymous:
            lines.append(f"  {len(self.anonymous)} anonymous user(s) of the file cannot be "
                         f"created through the admin API: not restored")
        lines += [f"  not restored: {limit}" for limit in AUTH_LIMITS[:3]]
        return lines

    def summary(self):
        return {"in_file": len(self.file_users), "live_before": len(self.live),
                "to_create": len(self.to_create), "to_update": len(self.to_update),
                "created": list(self.created), "updated": list(self.updated),
                "left_as_they_are": len(self.left), "anonymous_not_restored": self.anonymous,
                "limits": list(AUTH_LIMITS)}

    # -- step 4: the writes, before the tables

    def write(self, api, progress, on_change):
        """Create the planned users, then put back the planned metadata; on_change() after each
        write (the log keeps the ids written so far, for an interrupted run)."""
        now = utc_now()
        progress.start(f"{AUTH_ENTRY}: creating users", len(self.to_create), unit="users")
        for user_id in self.to_create:
            self.create(api, user_id, create_user_body(self.file_users[user_id], now))
            self.created.append(user_id)
            on_change()
            progress.advance(1)
        progress.done(f"  {AUTH_ENTRY}: {len(self.created)} users created" if self.created
                      else None)
        for user_id in self.to_update:
            self.put(api, user_id, metadata_update_body(self.file_users[user_id],
                                                        self.live[user_id]), "putting back")
            self.updated.append(user_id)
            on_change()
        if self.updated:
            log.info("  %s: metadata put back on %d users", AUTH_ENTRY, len(self.updated))

    def create(self, api, user_id, body):
        """One user created with its id. Sent once (a create is not idempotent); when the
        answer is lost or refused, the user is looked up: one that exists now was created."""
        what = f"creating auth user {user_id}"
        try:
            api.request(what, "POST", body=compact_json(body).encode(), writes="once",
                        auth_path="/admin/users")
            return
        except (ApiRejected, BackupError) as exc:
            failure = auth_failure(what, exc)
        if self.find(api, user_id) is None:
            raise RestoreFailure(AUTH_ENTRY, failure + " (the user was not created)",
                                 named=True)

    def put(self, api, user_id, body, verb):
        try:
            api.request(f"{verb} the metadata of auth user {user_id}", "PUT",
                        body=compact_json(body).encode(), writes=True,
                        auth_path=f"/admin/users/{user_id}")
        except ApiRejected as exc:
            raise RestoreFailure(AUTH_ENTRY, auth_failure(f"{verb} the metadata of auth user "
                                                          f"{user_id}", exc), named=True) from None

    @staticmethod
    def find(api, user_id):
        """The live user with this id, or None."""
        try:
            response = api.request(f"reading auth user {user_id}", "GET", writes=True,
                                   auth_path=f"/admin/users/{user_id}")
        except ApiRejected as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(response.content)

    # -- step 5: verify

    def verify(self, api):
        """Every user of the file (but the anonymous) live, as planned: the created ones with
        the file's email, phone, role, metadata and confirmed state; the updated ones with its
        metadata. Returns the problems (empty: verified)."""
        live, _ = list_auth_users(api, "verifying the auth users")
        problems = []
        for user_id, user in sorted(self.file_users.items()):
            if user_id in self.anonymous:
                continue
            have = live.get(user_id)
            if have is None:
                problems.append(f"user {user_id} is missing")
                continue
            created = user_id in self.created
            if created or user_id in self.updated:
                differ = user_differences(user, have, created)
                if differ:
                    problems.append(f"user {user_id} differs in {', '.join(differ)}")
        return problems

    # -- step 7: undo

    # Why complex: undo in reverse: metadata put back where it still differs, then each created user
    # deleted unless gone already (also a lost answer's not-found) or signed in since (kept and
    # reported); every failure is collected, not raised, and only a clean undo is verified against a
    # new listing. All cases feed the one list of problems the run reports.
    def roll_back(self, api):
        """Undo this run's writes: metadata put back as it was, users it created deleted (only
        while they have never signed in). Returns the problems (empty: exact)."""
        problems = []
        for user_id in reversed(self.updated):
            try:
                have = self.find(api, user_id)
                if have is not None:
                    body = metadata_update_body(self.live[user_id], have)
                    if body:
                        self.put(api, user_id, body, "rolling back")
            except (RestoreFailure, BackupError, ApiRejected) as exc:
                problems.append(one_line(exc))
        for user_id in reversed(self.created):
            try:
                have = self.find(api, user_id)
                if have is None:
                    continue
                if have.get("last_sign_in_at"):
                    problems.append(f"user {user_id}, created by this {self.mode}, has signed in "
                                    f"since: not deleted")
                    continue
                api.request(f"deleting auth user {user_id} (created by this {self.mode})",
                            "DELETE", body=b'{"should_soft_delete":false}', writes=True,
                            auth_path=f"/admin/users/{user_id}")
            except (BackupError, ApiRejected) as exc:
                if isinstance(exc, ApiRejected) and exc.status == 404:
                    continue  # gone already (an answer lost on the way)
                problems.append(auth_failure(f"deleting auth user {user_id}", exc))
        if not problems:
            live, _ = list_auth_users(api, "verifying the auth users after the rollback")
            problems = [f"user {i} created by this {self.mode} is still there"
                        for i in self.created if i in live]
            problems += [f"user {i} is missing after the rollback" for i in self.live
                         if i not in live]
        return problems

    def extra_live_users(self):
        """Live users the file does not hold (a rollback leaves them: see SAFETY.md)."""
        return sorted(set(self.live) - set(self.file_users))


# --- 17. Storage objects: backup, check, retention ------------------------------------------------
# Supabase Storage's buckets and objects (backup --storage, check, retention). Every request goes
# through SupabaseApi.request (its session, retries and redaction). An object's bytes are kept
# once, content-addressed, in objects/ beside the backup file (objects/ab/abcdef..., named by
# their SHA-256) and shared by every backup there; the file holds the manifest: "storage.buckets"
# (kind storage_buckets: each bucket's settings) and "storage.objects" (kind storage_objects: one
# row per object, with its SHA-256). An object whose listing (size, ETag, updated time) equals the
# newest kept manifest's entry, and whose bytes are in objects/, is not downloaded again.

STORAGE_BUCKETS, STORAGE_OBJECTS = "storage.buckets", "storage.objects"
KIND_BUCKETS, KIND_OBJECTS = "storage_buckets", "storage_objects"
STORAGE_KINDS = (KIND_BUCKETS, KIND_OBJECTS)
OBJECTS_DIR = "objects"
# Entries asked for per listing request. Storage's own default is 100; its search function
# returns min(limit, what is left), its limit capped at 1500 (migration 0059; uncapped before),
# so a page shorter than asked is the last one.
LIST_PAGE_SIZE = 1000
DOWNLOAD_CHUNK = 1 << 20
MANIFEST_BATCH = 500  # manifest rows written to the file at a time
BUCKET_FIELDS = ("id", "name", "public", "file_size_limit", "allowed_mime_types")
OBJECT_FIELDS = ("bucket", "name", "size", "sha256", "content_type", "cache_control",
                 "user_metadata", "etag", "updated_at", "created_at", "id")


def object_url_path(bucket, name):
    """bucket/name as a URL path: each part quoted, and a part that is "." or ".." written
    %2E, so that no HTTP library folds it away as a dot segment of the URL."""
    parts = [urllib.parse.quote(part, safe="") for part in name.split("/")]
    parts = [part.replace(".", "%2E") if part in (".", "..") else part for part in parts]
    return urllib.parse.quote(bucket, safe="") + "/" + "/".join(parts)


class ObjectStore:
    """objects/ beside backup files: each object's bytes once, at objects/ab/<sha256>."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def path(self, sha256):
        return self.folder / sha256[:2] / sha256

    def has(self, sha256, size):
        """Whether the bytes of this SHA-256 are here (with the size the manifest says)."""
        try:
            return self.path(sha256).stat().st_size == size
        except (OSError, TypeError):
            return False

    def digests(self):
        """The SHA-256 of every object here."""
        if not self.folder.is_dir():
            return set()
        return {p.name for p in self.folder.glob("??/*") if not p.name.startswith(TEMP_PREFIX)}

    def receive(self):
        """An ObjectReceiver: bytes written to a temporary file, hashed on the way."""
        make_private_dir(self.folder, tighten=False)
        return ObjectReceiver(self)

    def digest_of(self, sha256):
        """The SHA-256 of the file stored under sha256, read in chunks; None when it is missing."""
        digest = hashlib.sha256()
        try:
            with open(self.path(sha256), "rb") as f:
                for chunk in iter(lambda: f.read(DOWNLOAD_CHUNK), b""):
                    digest.update(chunk)
        except OSError:
            return None
        return digest.hexdigest()


class ObjectReceiver:
    """One object on its way into the store: a temporary name, SHA-256 while it streams, and a
    rename to its content's name by finish(); abort() throws it away. No fsync per object: one
    os.sync() makes the new objects durable before the manifest that refers to them is finished
    (back_up_storage). An fsync per object took 5.5 s of a 12 s first backup of the demo's 2,895
    objects (profiled)."""

    def __init__(self, store):
        self.store = store
        self.temp_path = store.folder / f"{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}"
        self.file = open(self.temp_path, "wb")
        self.sha, self.size = hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        self.file.write(data)

    def finish(self):
        """Put the object in place; returns (sha256, size). A file of that name already there
        is replaced by these bytes (the same, unless a crash before os.sync damaged it)."""
        self.file.close()
        sha256 = self.sha.hexdigest()
        target = self.store.path(sha256)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(self.temp_path, target)
        return sha256, self.size

    def abort(self):
        self.file.close()
        self.temp_path.unlink(missing_ok=True)


def storage_request(api, what, method, path, body=None, consume=None, rejected=()):
    """A request to the Storage API (/storage/v1/PATH) through api.request."""
    headers = dict(api.storage_headers)
    if isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
    return api.request(what, method, url=f"{api.storage_url}/{path}", headers=headers,
                       body=body, consume=consume, rejected=rejected)


def list_buckets(api):
    """Every bucket, with its settings (GET /bucket)."""
    response = storage_request(api, "listing the Storage buckets", "GET", "bucket")
    return json.loads(response.content)


def list_folder(api, bucket, prefix):
    """Every entry of one folder level of a bucket, page by page (POST /object/list/BUCKET):
    folders (id null) and objects. A bucket that is gone raises TableMissingError."""
    offset = 0
    while True:
        body = compact_json({"prefix": prefix, "limit": LIST_PAGE_SIZE, "offset": offset,
                             "sortBy": {"column": "name", "order": "asc"}}).encode()
        try:
            response = storage_request(api, f"listing {bucket}/{prefix}", "POST",
                                       "object/list/" + urllib.parse.quote(bucket, safe=""),
                                       body=body, rejected=("404",))
        except ApiRejected as exc:
            raise TableMissingError(f"the bucket {bucket} is gone ({exc.message})") from None
        page = json.loads(response.content)
        yield from page
        if len(page) < LIST_PAGE_SIZE:
            return
        offset += len(page)


def walk_bucket(api, bucket):
    """Every object of a bucket as (name, listing entry): every folder level, in name order.
    A name that starts with "/" or holds "//" has a folder named "" on the way: walked too.

    Storage matches the prefix of a listing case-insensitively, and its older search with ILIKE
    (% and _ as wildcards): the listing of photos/ also holds the objects of a sibling Photos/
    under the names they have there. Under such a folder every object is looked up by its exact
    name (object info), and kept only when it is the object listed (the same id)."""
    pending = [("", False)]
    while pending:
        prefix, ambiguous = pending.pop()
        folders = []
        for entry in list_folder(api, bucket, prefix):
            name = prefix + entry["name"]
            if entry.get("id") is None:
                folders.append(entry["name"])
            elif not ambiguous or (object_info(api, bucket, name) or {}).get("id") == \
                    entry["id"]:
                yield name, entry
        pending.extend((prefix + folder + "/", ambiguous or overlapping(folder, folders))
                       for folder in reversed(folders))


def overlapping(folder, siblings):
    """Whether Storage's prefix match of folder/ (ILIKE: any case, % and _ as wildcards, \\ an
    escape) also takes in a sibling folder."""
    if "\\" in folder:
        return True
    pattern = "".join(".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in folder)
    return any(other != folder and re.fullmatch(pattern, other, re.IGNORECASE | re.DOTALL)
               for other in siblings)


def download_object(api, store, bucket, name):
    """Stream an object into the store (memory flat whatever its size); returns (sha256, size),
    or None when the object is gone. A download cut off mid-way is tried again from the start
    (request's retries), its partial file thrown away."""
    received = []

    def consume(response):
        receiver = store.receive()
        try:
            for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                receiver.write(chunk)
            received.append(receiver.finish())
        except BaseException:
            receiver.abort()
            raise

    try:
        storage_request(api, f"downloading {bucket}/{name}", "GET",
                        "object/" + object_url_path(bucket, name), consume=consume,
                        rejected=("404",))
    except ApiRejected:
        return None
    return received[0]


def object_info(api, bucket, name):
    """An object's info by its exact name (GET /object/info/BUCKET/NAME: id, size, user
    metadata as "metadata", ...); None when there is no such object."""
    try:
        response = storage_request(api, f"reading the metadata of {bucket}/{name}", "GET",
                                   "object/info/" + object_url_path(bucket, name),
                                   rejected=("404",))
    except ApiRejected:
        return None
    return json.loads(response.content)


def listed_state(entry):
    """What the listing says of an object's content: (size, ETag, updated time)."""
    meta = entry.get("metadata") or {}
    return meta.get("size"), meta.get("eTag"), entry.get("updated_at")


def kept_manifest(folder):
    """{(bucket, name): manifest row} of the newest backup (or safety backup) in folder that has
    Storage objects (empty when none has): what need not be downloaded again."""
    names = sorted((p.name for p in folder.iterdir() if name_time(p.name) and
                    not p.name.endswith(AGE_SUFFIX)),
                   key=lambda n: (name_time(n), n), reverse=True)
    for name in names:
        manifest, found = {}, False
        try:
            for entry in read_tables(folder / name, as_bytes=True, kinds=(KIND_OBJECTS,)):
                found = True
                for line in entry.rows:
                    row = parse_row(line)
                    manifest[(row.get("bucket"), row.get("name"))] = row
        except ValidationError:
            continue
        if found:
            return manifest
    return {}


# Why complex: the order makes the entries trustworthy: buckets (a safety backup: the covered
# ones), each bucket's objects in batches, a bucket gone mid-walk or deleted meanwhile failing the
# backup, the entry closed, new objects synced to disk before the file is finished, vanished ones
# warned of. The bucket list read first is checked at the end; the steps share writer and summary.
def back_up_storage(api, writer, folder, progress, covered=None, reuse=None):
    """Write storage.buckets and storage.objects into the backup being written, each object's
    bytes into folder/objects/ unless they are there already; returns the summary. A bucket
    deleted during the backup fails it (IncompleteBackupError): no file is written.

    covered: only these buckets (a restore's safety backup; those that do not exist are
    recorded as covered, so that a rollback deletes them); reuse: (manifest, ObjectStore) of
    another folder whose bytes are linked instead of downloaded when the listing matches."""
    store = ObjectStore(folder / OBJECTS_DIR)
    previous = kept_manifest(folder)
    buckets = sorted((b for b in list_buckets(api) if covered is None or b.get("id") in covered),
                     key=lambda b: b.get("id") or "")
    writer.begin_table(STORAGE_BUCKETS, {"kind": KIND_BUCKETS, "columns": [
        {"name": name} for name in BUCKET_FIELDS],
        **({"covered": list(covered)} if covered is not None else {})})
    writer.write_rows([{name: bucket.get(name) for name in BUCKET_FIELDS} for bucket in buckets])
    writer.end_table(count_before=len(buckets), count_after=len(buckets))
    writer.begin_table(STORAGE_OBJECTS, {"kind": KIND_OBJECTS, "objects_folder": OBJECTS_DIR,
                                         "columns": [{"name": name} for name in OBJECT_FIELDS]})
    summary = {"buckets": len(buckets), "objects": 0, "bytes": 0, "downloaded": 0,
               "downloaded_bytes": 0, "unchanged": 0, "vanished": []}
    progress.start("Storage objects", None, unit="objects")
    for bucket in (b["id"] for b in buckets):
        rows = []
        try:
            for name, entry in walk_bucket(api, bucket):
                row = object_row(api, store, bucket, name, entry, previous.get((bucket, name)),
                                 summary, reuse)
                if row is None:
                    continue
                rows.append(row)
                summary["objects"] += 1
                summary["bytes"] += row["size"]
                progress.advance(1)
                if len(rows) >= MANIFEST_BATCH:
                    writer.write_rows(rows)
                    rows = []
        except TableMissingError as exc:
            raise IncompleteBackupError(f"Storage: {exc} (deleted during the backup?); no "
                                        f"backup file was written; run the backup again")
        writer.write_rows(rows)
    # Storage lists a bucket that is gone as an empty one: a bucket deleted while its objects
    # were listed is found by asking for the buckets again, as a table's count after reading.
    gone = sorted({b["id"] for b in buckets} - {b.get("id") for b in list_buckets(api)})
    if gone:
        raise IncompleteBackupError(f"Storage: the bucket(s) {', '.join(gone)} were deleted "
                                    f"during the backup; no backup file was written; run the "
                                    f"backup again")
    writer.end_table(count_before=summary["objects"], count_after=summary["objects"])
    if summary["downloaded"]:
        os.sync()  # the new objects on disk before the file that refers to them is finished
    progress.done(f"  Storage: {summary['objects']} objects in {len(buckets)} bucket(s), "
                  f"{human_size(summary['bytes'])}; {summary['downloaded']} downloaded "
                  f"({human_size(summary['downloaded_bytes'])}), {summary['unchanged']} "
                  f"unchanged since the last backup")
    for name in summary["vanished"][:MISMATCHES_LISTED]:
        log.warning("Storage: %s was deleted during the backup; it is not in this backup", name)
    return summary


# Why complex: an object's bytes come from the kept manifest (listing unchanged, bytes in the
# store), another folder's store (linked), or a download that may find it gone (vanished, no row)
# or changed (no ETag kept); an older Storage needs its user metadata asked per object. Every case
# fills the same manifest row and summary counts, so they read best side by side.
def object_row(api, store, bucket, name, entry, known, summary, reuse=None):
    """The manifest row of one listed object: from the kept manifest when the listing says it
    is unchanged and its bytes are in the store (or in reuse's store: linked), else downloaded;
    None when it is gone."""
    size, etag, updated_at = listed_state(entry)
    meta = entry.get("metadata") or {}
    row = {"bucket": bucket, "name": name, "size": size, "sha256": None,
           "content_type": meta.get("mimetype"), "cache_control": meta.get("cacheControl"),
           "user_metadata": None, "etag": etag, "updated_at": updated_at,
           "created_at": entry.get("created_at"), "id": entry.get("id")}
    if known and (known.get("size"), known.get("etag"), known.get("updated_at")) == \
            (size, etag, updated_at) and etag and store.has(known.get("sha256"), size):
        summary["unchanged"] += 1
        return {**row, "sha256": known["sha256"], "user_metadata": known.get("user_metadata")}
    other = reuse[0].get((bucket, name)) if reuse else None
    if other and same_object(other, entry) and reuse[1].has(other["sha256"], size):
        link_object(reuse[1], store, other["sha256"])
        summary["unchanged"] += 1
        return {**row, "sha256": other["sha256"], "user_metadata": other.get("user_metadata")}
    got = download_object(api, store, bucket, name)
    # Storage lists user metadata since its migration 0059; an older one is asked per object.
    info = {"metadata": entry.get("user_metadata")} if "user_metadata" in entry or not got \
        else object_info(api, bucket, name)
    present, user_metadata = bool(got and info is not None), (info or {}).get("metadata")
    if not present:
        summary["vanished"].append(f"{bucket}/{name}")
        return None
    sha256, downloaded = got
    summary["downloaded"] += 1
    summary["downloaded_bytes"] += downloaded
    if downloaded != size:
        # Changed between the listing and the download: the bytes are what was downloaded, and
        # no ETag is kept, so that the next backup downloads it again.
        row.update(size=downloaded, etag=None)
    return {**row, "sha256": sha256, "user_metadata": user_metadata}


def link_object(source, store, sha256):
    """Put an object of another store into this one: a hard link, a copy across file systems."""
    target = store.path(sha256)
    if target.exists():
        return
    make_private_dir(target.parent, tighten=False)
    try:
        os.link(source.path(sha256), target)
    except OSError:
        temp = target.parent / f"{TEMP_PREFIX}{os.getpid()}-link"
        shutil.copyfile(source.path(sha256), temp)
        os.replace(temp, target)


def verify_objects(path, entries):
    """check's part for Storage: every object the file's manifest names is in objects/ beside
    it with that SHA-256. Returns (objects, bytes) checked; raises ValidationError naming what
    is missing or damaged."""
    if not any(entry_kind(e["meta"]) == KIND_OBJECTS for e in entries.values()):
        return None
    store = ObjectStore(Path(path).parent / OBJECTS_DIR)
    checked, size, problems, seen = 0, 0, [], {}
    progress.start("checking Storage objects", None, unit="objects")
    for entry in read_tables(path, kinds=(KIND_OBJECTS,)):
        for row in entry.rows:
            sha256 = row.get("sha256")
            if sha256 not in seen:
                seen[sha256] = store.digest_of(sha256) if isinstance(sha256, str) else None
            actual = seen[sha256]
            if actual is None:
                problems.append(f"{row.get('bucket')}/{row.get('name')}: missing from "
                                f"{store.folder}")
            elif actual != sha256:
                problems.append(f"{row.get('bucket')}/{row.get('name')}: its bytes in "
                                f"{store.folder} do not match its SHA-256 (damaged)")
            checked += 1
            size += row.get("size") or 0
            progress.advance(1)
    progress.close()
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValidationError(f"{Path(path).name}: {len(problems)} Storage object(s) cannot be "
                              f"restored: {'; '.join(problems[:3])}{more}; use another backup")
    return checked, size


def referenced_objects(folder):
    """The SHA-256 of every object the backups and safety backups in folder refer to; None when
    one of them cannot be read (then nothing may be collected)."""
    referenced = set()
    for path in sorted(folder.iterdir()):
        if not (BACKUP_NAME_PATTERN.fullmatch(path.name) or
                SAFETY_NAME_PATTERN.fullmatch(path.name)) or path.name.endswith(AGE_SUFFIX):
            continue
        try:
            for entry in read_tables(path, kinds=(KIND_OBJECTS,)):
                referenced.update(row.get("sha256") for row in entry.rows)
        except ValidationError as exc:
            log.warning("Storage objects in %s/%s were not collected: %s", folder.name,
                        OBJECTS_DIR, exc)
            return None
    return referenced


def collect_objects(folder):
    """Delete the objects in folder/objects/ that no backup there refers to any more (after
    retention deleted backups); returns how many. Called under the data folder's lock."""
    store = ObjectStore(folder / OBJECTS_DIR)
    if not store.folder.is_dir():
        return 0
    clear_partial_files(store.folder)
    present = store.digests()
    if not present:
        return 0
    referenced = referenced_objects(folder)
    if referenced is None:
        return 0
    unreferenced = present - referenced
    for sha256 in unreferenced:
        store.path(sha256).unlink(missing_ok=True)
    if unreferenced:
        log.info("retention: deleted %d Storage object(s) from %s/%s that no kept backup "
                 "refers to", len(unreferenced), folder.name, OBJECTS_DIR)
    return len(unreferenced)


# --- 18. Storage objects: restore and rollback steps ----------------------------------------------
# The Storage side of a restore or rollback (StorageRestore), one method per step of RestoreRun:
# safety backup options, validate, plan, write (uploads streamed from objects/), verify, undo.

def object_key(row):
    """(bucket, name) of a manifest row."""
    return row.get("bucket"), row.get("name")


def same_object(row, entry):
    """Whether a live object (a listing entry) holds what a manifest row says: size, ETag,
    content type, cache control and user metadata. A row without an ETag (it changed during its
    backup) is never the same."""
    meta = entry.get("metadata") or {}
    return (row.get("etag") is not None and meta.get("size") == row.get("size")
            and meta.get("eTag") == row.get("etag")
            and meta.get("mimetype") == row.get("content_type")
            and meta.get("cacheControl") == row.get("cache_control")
            and ("user_metadata" not in entry
                 or entry.get("user_metadata") == row.get("user_metadata")))


def bucket_settings(row):
    return {name: row.get(name) for name in ("public", "file_size_limit", "allowed_mime_types")}


def upload_object(api, store, row, create):
    """Upload one object from the store (streamed from disk, SHA-256 and MD5 computed on the
    way); create sends x-upsert false, so that an object that appeared since the plan is never
    overwritten without a safety copy. Returns the MD5 of what was sent. Raises RestoreFailure
    naming the object when Storage refuses it, or when the stored bytes do not match their
    SHA-256."""
    bucket, name = object_key(row)
    headers = dict(api.storage_headers)
    headers.update({"Content-Type": row.get("content_type") or "application/octet-stream",
                    "cache-control": row.get("cache_control") or "no-cache",
                    "x-upsert": "false" if create else "true"})
    if row.get("user_metadata") is not None:
        headers["x-metadata"] = base64.b64encode(compact_json(row["user_metadata"]).encode()
                                                 ).decode()
    sums = {}

    def body():
        sha, md5 = hashlib.sha256(), hashlib.md5()
        sums.update(sha=sha, md5=md5)
        with open(store.path(row["sha256"]), "rb") as f:
            for chunk in iter(lambda: f.read(DOWNLOAD_CHUNK), b""):
                sha.update(chunk)
                md5.update(chunk)
                yield chunk

    headers["Content-Length"] = str(row["size"])
    try:
        api.request(f"uploading {bucket}/{name}", "POST",
                    url=f"{api.storage_url}/object/{object_url_path(bucket, name)}",
                    headers=headers, body=body, rejected=("400", "403", "404", "409", "413",
                                                          "415"))
    except ApiRejected as exc:
        raise RestoreFailure(None, f"Storage refused {bucket}/{name}: {exc.status} "
                                   f"{one_line(exc.message, 200)}") from None
    if sums["sha"].hexdigest() != row["sha256"]:
        raise RestoreFailure(None, f"the stored bytes of {bucket}/{name} no longer match their "
                                   f"SHA-256 (damaged on disk while restoring)")
    return sums["md5"].hexdigest()


def delete_objects(api, bucket, names):
    """Delete objects by name (DELETE /object/BUCKET with prefixes), a hundred at a time."""
    for batch in chunks(names, DELETE_BATCH_SIZE):
        storage_request(api, f"deleting {len(batch)} object(s) of {bucket}", "DELETE",
                        "object/" + urllib.parse.quote(bucket, safe=""),
                        body=compact_json({"prefixes": batch}).encode())


def storage_side(run, scan):
    """The file's Storage side (a StorageRestore) when the run restores it (restore --storage; a
    rollback always), else None. A file whose Storage entries are left alone says so in one
    line; restore --storage of a file without them is refused."""
    in_file = any(kind in STORAGE_KINDS for _, kind in scan.others)
    if in_file and not (run.deletes or getattr(run.args, "storage", False)):
        log.info("the file's Storage buckets and objects are left alone (restore --storage "
                 "restores them)")
        return None
    if not in_file:
        if getattr(run.args, "storage", False):
            raise ValidationError(f"{run.file_path.name} holds no Storage buckets or objects (it "
                                  f"was backed up without --storage); nothing was written")
        return None
    if run.safety_recipients:
        raise ConfigError("restore --storage cannot encrypt its safety backup (SAFETY_ENCRYPT_TO "
                          "is set): Storage objects are kept in safety_backups/objects/ "
                          "unencrypted; unset it for this restore, or restore without --storage")
    return StorageRestore.of_file(run.api, run.file_path, deletes=run.deletes)


def storage_totals(done):
    """What a run did to Storage, for its last line."""
    return (f"Storage: {done['objects_uploaded']} object(s) uploaded, "
            f"{done['objects_overwritten']} overwritten, {done['objects_deleted']} deleted, "
            f"{done['buckets_created']} bucket(s) created, {done['buckets_updated']} updated")


class StorageRestore:
    """The Storage side of a restore or a rollback to a file, one method per step of the run:
    read (the file's buckets and manifest), validate (every object's bytes in objects/ with its
    SHA-256), plan (live listing against the manifest), write (buckets, then uploads; a rollback
    also deletes what the file lacks), verify (listing again: sizes, and ETags against the MD5 of
    the bytes sent) and undo (what write did, from the safety backup). A restore never deletes an
    object; a rollback (deletes) returns the buckets the file covers to exactly its state."""

    def __init__(self, api, path, deletes=False):
        self.api, self.path, self.deletes = api, Path(path), deletes
        self.store = ObjectStore(self.path.parent / OBJECTS_DIR)
        self.buckets, self.covered, self.rows = {}, [], {}
        self.to_create, self.to_overwrite, self.to_delete = [], [], []
        self.buckets_to_create, self.buckets_to_update, self.buckets_to_delete = [], [], []
        self.unchanged = 0
        self.created, self.overwritten, self.deleted = [], [], []  # what write() did
        self.buckets_created, self.buckets_updated = [], {}  # id -> settings before

    @classmethod
    def of_file(cls, api, path, deletes=False):
        """The file's Storage side, or None when it has none."""
        restore = cls(api, path, deletes)
        return restore if restore.read() else None

    def read(self):
        found = False
        for entry in read_tables(self.path, kinds=STORAGE_KINDS):
            found = True
            if entry.kind == KIND_BUCKETS:
                for row in entry.rows:
                    self.buckets[row["id"]] = row
                self.covered = entry.meta.get("covered") or list(self.buckets)
            else:
                for row in entry.rows:
                    self.rows[object_key(row)] = row
        return found

    def validate(self):
        """Every object of the file in objects/ with its SHA-256 (ValidationError otherwise)."""
        verify_objects(self.path, {STORAGE_OBJECTS: {"meta": {"kind": KIND_OBJECTS}}})

    # Why complex: per covered bucket: to create, to update (other settings) or, in a rollback, to
    # delete; per live object: not in the file (deleted in a rollback only), the same (unchanged)
    # or not (overwritten); each file object not live is uploaded. Restore and rollback differ only
    # in the deletes, so one plan with that flag is clearer than two near-copies.
    def plan(self):
        """The live buckets and objects of the buckets the file covers, against the file."""
        live_buckets = {b["id"]: b for b in list_buckets(self.api)}
        for bucket_id in self.covered:
            row, live = self.buckets.get(bucket_id), live_buckets.get(bucket_id)
            if row and not live:
                self.buckets_to_create.append(row)
            elif row and bucket_settings(row) != bucket_settings(live):
                self.buckets_to_update.append((row, bucket_settings(live)))
            elif not row and live and self.deletes:
                self.buckets_to_delete.append(bucket_id)
        for bucket_id in self.covered:
            live_objects = {}
            if bucket_id in live_buckets:
                live_objects = {name: entry for name, entry in walk_bucket(self.api, bucket_id)}
            for name, entry in live_objects.items():
                row = self.rows.get((bucket_id, name))
                if row is None:
                    if self.deletes:
                        self.to_delete.append((bucket_id, name))
                elif same_object(row, entry):
                    self.unchanged += 1
                else:
                    self.to_overwrite.append(row)
            self.to_create += [row for (b, n), row in self.rows.items()
                               if b == bucket_id and n not in live_objects]
        return self.summary()

    def summary(self):
        size = lambda rows: sum(r.get("size") or 0 for r in rows)  # noqa: E731
        return {"buckets_to_create": [b["id"] for b in self.buckets_to_create],
                "buckets_to_update": [b["id"] for b, _ in self.buckets_to_update],
                "buckets_to_delete": self.buckets_to_delete,
                "objects_to_upload": len(self.to_create), "bytes_to_upload": size(self.to_create),
                "objects_to_overwrite": len(self.to_overwrite),
                "bytes_to_overwrite": size(self.to_overwrite),
                "objects_to_delete": len(self.to_delete), "objects_unchanged": self.unchanged}

    def plan_line(self):
        s = self.summary()
        return (f"Storage: {s['objects_to_upload']} object(s) to upload "
                f"({human_size(s['bytes_to_upload'])}), {s['objects_to_overwrite']} to overwrite "
                f"({human_size(s['bytes_to_overwrite'])})"
                + (f", {s['objects_to_delete']} to delete" if self.deletes else "")
                + f", {s['objects_unchanged']} unchanged; bucket(s) to create: "
                f"{', '.join(s['buckets_to_create']) or 'none'}, to update: "
                f"{', '.join(s['buckets_to_update']) or 'none'}"
                + (f", to delete: {', '.join(s['buckets_to_delete']) or 'none'}"
                   if self.deletes else ""))

    def safety_options(self):
        """snapshot's storage option for the run's safety backup: every live object of the
        buckets the file covers (all that the run may overwrite or, in a rollback, delete), the
        bytes the file holds already linked from its objects/ instead of downloaded."""
        return {"covered": list(self.covered), "reuse": (self.rows, self.store)}

    def write(self, progress):
        """Buckets first, then the objects (uploads streamed from objects/), then, in a
        rollback, the objects and buckets the file does not hold. Every action is recorded as
        it is done, for undo()."""
        api = self.api
        for row in self.buckets_to_create:
            storage_request(api, f"creating the bucket {row['id']}", "POST", "bucket",
                            body=compact_json({"id": row["id"], "name": row.get("name") or
                                               row["id"], **bucket_settings(row)}).encode())
            self.buckets_created.append(row["id"])
        for row, before in self.buckets_to_update:
            storage_request(api, f"updating the bucket {row['id']}", "PUT",
                            "bucket/" + urllib.parse.quote(row["id"], safe=""),
                            body=compact_json({"id": row["id"], "name": row.get("name") or
                                               row["id"], **bucket_settings(row)}).encode())
            self.buckets_updated[row["id"]] = before
        progress.start("Storage: uploading", len(self.to_create) + len(self.to_overwrite),
                       unit="objects")
        self.md5 = {}
        for row, create in [(r, True) for r in self.to_create] + \
                           [(r, False) for r in self.to_overwrite]:
            self.md5[object_key(row)] = upload_object(api, self.store, row, create)
            (self.created if create else self.overwritten).append(object_key(row))
            progress.advance(1)
        progress.close()
        for bucket_id in dict.fromkeys(b for b, _ in self.to_delete):
            names = [n for b, n in self.to_delete if b == bucket_id]
            delete_objects(api, bucket_id, names)
            self.deleted += [(bucket_id, n) for n in names]
        for bucket_id in self.buckets_to_delete:
            storage_request(api, f"deleting the bucket {bucket_id}", "DELETE",
                            "bucket/" + urllib.parse.quote(bucket_id, safe=""), body=b"{}")
        return {"buckets_created": len(self.buckets_created),
                "buckets_updated": len(self.buckets_updated), "objects_uploaded":
                len(self.created), "objects_overwritten": len(self.overwritten),
                "objects_deleted": len(self.deleted)}

    # Why complex: per covered bucket: missing, other settings, or (rollback) one the file lacks
    # still there; per file object: missing or differing (holds); in a rollback, live objects the
    # file lacks. Each bucket is listed once and every case adds to one list of mismatches; restore
    # and rollback differ only in the deletes.
    def verify(self):
        """Every object of the file in the covered buckets with its size, content type, cache
        control, user metadata and bytes: an uploaded object's ETag must be the MD5 of the bytes
        sent (whose SHA-256 was checked on the way); where Storage's ETag is not an MD5 the
        object is downloaded and its SHA-256 compared. In a rollback, no object the file lacks.
        Returns the mismatches ([] when exact)."""
        mismatches = []
        live_buckets = {b["id"]: b for b in list_buckets(self.api)}
        for bucket_id in self.covered:
            row = self.buckets.get(bucket_id)
            if row and bucket_id not in live_buckets:
                mismatches.append(f"the bucket {bucket_id} is missing")
                continue
            if row and bucket_settings(row) != bucket_settings(live_buckets[bucket_id]):
                mismatches.append(f"the bucket {bucket_id} has other settings")
            if not row:
                if self.deletes and bucket_id in live_buckets:
                    mismatches.append(f"the bucket {bucket_id} is still there")
                continue
            live = dict(walk_bucket(self.api, bucket_id))
            for (b, name), want in self.rows.items():
                if b != bucket_id:
                    continue
                entry = live.get(name)
                if entry is None:
                    mismatches.append(f"{b}/{name} is missing")
                    continue
                if not self.holds(want, entry):
                    mismatches.append(f"{b}/{name} differs from the file")
            if self.deletes:
                extra = [n for n in live if (bucket_id, n) not in self.rows]
                mismatches += [f"{bucket_id}/{n} is not in the file" for n in extra]
        return mismatches

    def holds(self, want, entry):
        meta = entry.get("metadata") or {}
        if (meta.get("size"), meta.get("mimetype"), meta.get("cacheControl")) != \
                (want.get("size"), want.get("content_type"), want.get("cache_control")):
            return False
        if "user_metadata" in entry and entry.get("user_metadata") != want.get("user_metadata"):
            return False
        sent = getattr(self, "md5", {}).get(object_key(want))
        etag = str(meta.get("eTag") or "").strip('"')
        if sent is None:  # not uploaded by this run: as the listing said before
            return same_object(want, entry)
        if re.fullmatch(r"[0-9a-f]{32}", etag):
            return etag == sent
        # Another backend's ETag: the bytes themselves, downloaded and hashed.
        got = download_object(self.api, ObjectStore(self.store.folder), *object_key(want))
        return got is not None and got[0] == want["sha256"]

    def undo(self, safety_path, progress):
        """Step 7 for Storage: what write() did, undone from the safety backup: the objects it
        overwrote or deleted uploaded again as the safety backup holds them, the ones it created
        deleted, bucket settings put back, buckets it created deleted. Returns the mismatches of
        the check that follows ([] when exact)."""
        safety = StorageRestore(self.api, safety_path)
        safety.read()
        before = [safety.rows[key] for key in self.overwritten + self.deleted
                  if key in safety.rows]
        for bucket_id in dict.fromkeys(b for b, _ in self.created):
            delete_objects(self.api, bucket_id, [n for b, n in self.created if b == bucket_id])
        progress.start("Storage: putting back", len(before), unit="objects")
        safety.md5 = {}
        for row in before:
            safety.md5[object_key(row)] = upload_object(self.api, safety.store, row, False)
            progress.advance(1)
        progress.close()
        for bucket_id, settings in self.buckets_updated.items():
            storage_request(self.api, f"putting back the settings of the bucket {bucket_id}",
                            "PUT", "bucket/" + urllib.parse.quote(bucket_id, safe=""),
                            body=compact_json({"id": bucket_id, "name": bucket_id,
                                               **settings}).encode())
        for bucket_id in self.buckets_created:
            storage_request(self.api, f"deleting the bucket {bucket_id}", "DELETE",
                            "bucket/" + urllib.parse.quote(bucket_id, safe=""), body=b"{}")
        return self.undo_mismatches(safety, before)

    def undo_mismatches(self, safety, before):
        """The check after undo(): each object written back (before) holds the safety backup's
        bytes, and no object this run created is left. Returns what is not so."""
        live = {}
        mismatches = []
        for bucket_id in dict.fromkeys([b for b, _ in self.created] +
                                       [object_key(r)[0] for r in before]):
            if bucket_id in self.buckets_created:
                continue
            live[bucket_id] = dict(walk_bucket(self.api, bucket_id))
        for row in before:
            entry = live.get(row["bucket"], {}).get(row["name"])
            if entry is None or not safety.holds(row, entry):
                mismatches.append(f"{row['bucket']}/{row['name']} was not put back")
        for bucket_id, name in self.created:
            if name in live.get(bucket_id, {}) and (bucket_id, name) not in safety.rows:
                mismatches.append(f"{bucket_id}/{name}, created by the restore, is still there")
        return mismatches


# --- 19. What a restore run's steps share ---------------------------------------------------------
# RunParts: the numbered step lines and their log (step, done, fail_step), the settings a run
# reads, the refusals before any write (json values the API would change, rows that only a
# transaction could write), writing a safety backup, and step 7's way back to one. RestoreRun
# (section 20) is the flow made of them.

class RunParts:
    """What the steps of a restore run share. RestoreRun (the flow, below) sets the attributes
    these use in its __init__ (api, config, paths, args, file_path, dry_run, progress, plans,
    order, auth, storage, restore_log, safety_path, safety_read_path, safety_recipients,
    plain_copies, _step) and its class attribute mode."""

    @property
    def accept_json_null(self):
        return bool(getattr(self.args, "accept_json_null", False))

    # Why complex: one list of findings ends three ways (refused; refused, but only JSON nulls,
    # which --accept-json-null lets through; warned), and the dry run's plan shows them all:
    # each message names the fix for its own case.
    def check_json_changes(self):
        """Before any write: the json values the API would change on the way in (json_change),
        in rows of the file to write, or in live rows the restore overwrites (a rollback would
        write them back). Refused; a JSON null only unless --accept-json-null. Returns what was
        found, for the plan and the log."""
        found = [{"table": plan.name, "column": column, "change": change, "rows": count,
                  "first_keys": keys,
                  "in": "the file" if side == "file" else "live rows the restore overwrites"}
                 for plan in self.plans.values()
                 for (side, column, change), (count, keys) in sorted(plan.json_changes.items())]
        if not found:
            return []
        refused = [f for f in found if f["change"] != JSON_NULL or not self.accept_json_null]
        text = "; ".join(f"{f['table']}.{f['column']}: {f['change']}, in {f['rows']} row(s) of "
                         f"{f['in']} (first key(s) {', '.join(f['first_keys'])})"
                         for f in (refused or found)[:5])
        if refused and not self.dry_run:
            self.fail_step("refused", text)
            nulls_only = all(f["change"] == JSON_NULL for f in refused)
            error = (f"the API would change these json values on the way in: {text}; the "
                     f"database was not touched; "
                     + ("to restore them as SQL NULL, run again with --accept-json-null"
                        if nulls_only else
                        "restore the other tables (--tables) and put these rows back in the SQL "
                        "editor"))
            if self.restore_log:
                write_restore_log(self.restore_log, status="refused", error=error)
            raise ValidationError(error)
        log.warning("the API will change these json values on the way in%s: %s",
                    " (refused without --accept-json-null)" if refused else "", text)
        return found

    def check_cycles(self, scan):
        """Before any write: refuse rows that only a transaction could write (see
        unwritable_cycle)."""
        cycle = unwritable_cycle(scan, self.plans)
        if not cycle:
            return
        rows = " -> ".join(f"{table} {key}" for table, key in cycle[:6])
        columns = ", ".join(f"{table}.{fk['column']} -> {fk['references_table']}"
                            for table in dict.fromkeys(t for t, _ in cycle)
                            for fk in scan.tables[table]["meta"].get("foreign_keys") or []
                            if fk["references_table"] in {t for t, _ in cycle})
        error = (f"rows to insert refer to each other through NOT NULL foreign keys ({columns}: "
                 f"{rows} -> back to the first): the API writes each request in its own transaction, so "
                 f"none of them can be written first; the database was not touched; insert "
                 f"these rows in one transaction in the SQL editor, or make one of the foreign "
                 f"keys nullable, then restore again")
        self.fail_step("refused", error)
        if self.restore_log:
            write_restore_log(self.restore_log, status="refused", error=error)
        raise ValidationError(error)

    def safety_file_path(self, prefix):
        """A new name in safety_backups/ (.json.gz.age when safety backups are encrypted)."""
        return new_file_path(self.paths.safety_backups, prefix,
                             ".json.gz" + (AGE_SUFFIX if self.safety_recipients else ""))

    def safety_snapshot(self, path, tables, live, note, storage=False):
        """Snapshot tables to path, a safety backup; returns (summary, the plain file a rollback
        reads). Encrypted to SAFETY_ENCRYPT_TO when it is set: the plain file is then written
        and verified under a temporary name, encrypted to path, and kept for this run's
        automatic rollback only."""
        auth = self.auth is not None  # the live users too, when the run writes users
        if not self.safety_recipients:
            return snapshot(self.api, tables, live, path, self.config.host, SERVICE_ROLE,
                            self.progress, note=note, auth=auth, storage=storage), path
        plain = path.parent / f"{TEMP_PREFIX}{os.getpid()}-plain-{plain_name(path.name)}"
        self.plain_copies.append(plain)
        summary = snapshot(self.api, tables, live, plain, self.config.host, SERVICE_ROLE,
                           self.progress, note=note, auth=auth)
        encrypt_backup(plain, path, self.safety_recipients)
        return summary, plain

    def roll_back(self, leave_out):
        """Step 7: a snapshot of the failed state (double safety), then back to the safety
        backup (rollback), verified; returns (the failed state's file, the mismatches). From its
        announcement on, a Ctrl-C stops the rollback with the command that finishes it."""
        failed_path = self.safety_file_path("failed_state")
        try:
            self.step(7, "ROLLBACK", f"snapshot of the failed state -> {failed_path}, then back "
                      f"to {self.safety_path.name}")
            self.safety_snapshot(failed_path, list(self.plans),
                                 discover_tables(self.api.openapi()),
                                 f"state after a failed {self.mode} of {self.file_path.name}")
            mismatches = rollback(self.api, self.plans, self.order, self.safety_read_path,
                                  self.progress, leave_out, self.accept_json_null)
            if self.storage:
                mismatches += [{"table": None, "key": None, "problem": f"Storage: {problem}"}
                               for problem in self.storage.undo(self.safety_read_path,
                                                                self.progress)]
            if self.auth:  # after the tables: their rows may refer to the users it deletes
                mismatches = [{"table": None, "key": None, "problem": f"{AUTH_ENTRY}: {problem}"}
                              for problem in self.auth.roll_back(self.api)] + mismatches
            return failed_path, mismatches
        except KeyboardInterrupt:
            write_restore_log(self.restore_log, status="interrupted",
                              error="interrupted during rollback")
            raise InterruptedRestore(self.rollback_hint()) from None
        except Exception as rollback_exc:  # whatever it was, the rollback did not finish
            if not isinstance(rollback_exc, (RestoreFailure, BackupError)):
                log.error("unexpected error during the rollback", exc_info=True,
                          extra={FILE_ONLY: True})
            return failed_path, [{"table": None, "key": None,
                                  "problem": one_line(rollback_exc, 300)}]

    def left_out(self, leave_out):
        """({table: rows written back}, {table: columns left out of the rollback's
        verification}) for the tables whose rows were written back."""
        not_verified, written_back = {}, {}
        for name, plan in self.plans.items():
            columns = [c for c in plan.columns if c not in compared_columns(plan, leave_out)]
            written_back[name] = sum(1 for is_insert, _ in plan.sent_spool_keys()
                                     if not is_insert)
            if written_back[name] and columns:
                not_verified[name] = columns
        return written_back, not_verified

    def rollback_hint(self):
        if self.safety_path is None:
            return "(no safety backup was taken)"
        identity = (" --identity YOUR_AGE_IDENTITY_FILE" if self.safety_recipients and not
                    self.config.settings.get("BACKUP_AGE_IDENTITY") else "")
        return f"python {PROG} rollback {self.safety_path.name}{identity}"

    def critical(self):
        return getattr(self.args, "critical", None) or self.setting_list("CRITICAL_TABLES")

    def ignore_columns(self):
        return set(getattr(self.args, "ignore_columns", None) or
                   self.setting_list("VERIFY_IGNORE_COLUMNS"))

    def setting_list(self, name):
        """A comma-separated setting as a list ([] when unset); ConfigError when malformed."""
        try:
            return table_list(self.config.settings[name]) if self.config.settings.get(name) else []
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{name}: {exc}") from None

    def step(self, number, tag, text):
        self._step = (number, tag)
        log.info("%d. [%s] %s", number, tag, text)
        if self.restore_log:
            self.restore_log.step(number, tag)

    def done(self, detail):
        log.info("   -> %s", detail)
        if self.restore_log:
            self.restore_log.step(*self._step, detail=detail, status="ok")

    def fail_step(self, status, detail):
        if self.restore_log and self._step:
            self.restore_log.step(*self._step, detail=detail, status=status)


# --- 20. The restore run: SAFETY.md's flow, step by step ------------------------------------------
# RestoreRun.run() is the flow; one method per step, made of section 19's parts. A rollback to a
# file is the same run with the differences in RollbackRun (section 21).

class RestoreRun(RunParts):
    """One restore: SAFETY.md's numbered flow, one method per step, run() in that order. A
    rollback to a file is the same run; RollbackRun holds what differs."""

    mode = "restore"
    deletes = False  # whether the run deletes the live rows the file lacks (a rollback does)

    def __init__(self, api, config, paths, args, file_path, source=None):
        self.api, self.config, self.paths, self.args = api, config, paths, args
        self.file_path = file_path
        self.source = source or str(file_path)  # as the user named it: a path or an s3:// URL
        self.progress = progress
        self.safe = self.deletes or args.safe
        self.dry_run = args.dry_run
        self.plans, self.order, self.live, self.safety_path = {}, [], {}, None
        self.auth = None  # the auth users the run writes (AuthRestore), if any
        self.restore_log = None
        self.rewritten = {}  # table -> columns the failed verification found rewritten
        self.started = None  # when the run began: a trigger's rewritten times come after it
        self._step, self.writing = None, False
        self.safety_recipients = None  # SAFETY_ENCRYPT_TO, read when the run starts
        self.safety_read_path = None  # the plain safety backup a rollback reads
        self.safety_tables = {}  # what the safety backup holds of each table (its summary)
        self.plain_copies = []  # plain copies of encrypted safety backups, removed at the end
        self.storage = None  # the file's Storage side (StorageRestore), when the run restores it

    def run(self):
        """0 read the file, 1 safety backup, 2 validate, 3 record the counts and the plan,
        4 restore, 5 verify, 6 log; a failure in 4 or 5 (Ctrl-C included) is rolled back (7)."""
        try:
            scan = self.read_file()
            self.safety_backup()
            self.validate(scan)
            with tempfile.TemporaryDirectory(dir=self.paths.safety_backups,
                                             prefix=TEMP_PREFIX) as spool_dir:
                before = self.record(scan, Path(spool_dir))
                if self.dry_run:
                    return self.show_plan(before)
                self.writing = True
                try:
                    self.restore()
                    self.verify(before)
                except BaseException as exc:
                    return self.recover(self.failure(exc))
            return self.write_log()
        except BaseException as exc:
            self.close_log(exc)
            raise
        finally:
            for path in self.plain_copies:  # the encrypted safety backups stay
                with contextlib.suppress(OSError):
                    path.unlink()

    def close_log(self, exc):
        """Whatever stopped the run, its log must not read like a run still going on."""
        if self.restore_log is None or self.restore_log.data["status"] != "in_progress":
            return
        reason = ("interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt)
                  else one_line(exc, 800))
        steps = self.restore_log.data["steps"]
        if steps and steps[-1]["status"] == "running":
            self.fail_step("failed", reason)
        if self.writing:
            write_restore_log(self.restore_log, status="failed", error=reason)
        else:
            write_restore_log(self.restore_log, status="aborted",
                              error=f"{reason}; stopped before writing anything")

    # -- 0. Read the file, then the live schema; the plans and the log --------------------------

    def read_file(self):
        """Step 0: the whole file checked (scan_backup) before any request writes; the live
        schema read; the restore log started and a plan made for each table."""
        self.started = utc_now()
        # Read now: a typo in a setting must not fail a restore half-way.
        self.critical_tables, self.ignored = self.critical(), self.ignore_columns()
        if self.config.settings.get("SAFETY_ENCRYPT_TO") and self.safe and not self.dry_run:
            self.safety_recipients = age_recipients(self.config.settings["SAFETY_ENCRYPT_TO"],
                                                    "SAFETY_ENCRYPT_TO")
        log.info("reading %s", self.source)
        try:
            scan = scan_backup(self.file_path)
        except ValidationError as exc:
            raise ValidationError(f"{exc}; the database was not touched") from None
        self.tables, skipped = choose_restore_tables(scan, getattr(self.args, "tables", None))
        for name, why in skipped.items():
            log.warning("%s is left alone: %s", name, why)
        self.storage = storage_side(self, scan)
        self.live = discover_tables(self.api.openapi())
        if not self.dry_run:
            self.restore_log = RestoreLog(
                new_file_path(self.paths.summaries, f"{self.mode}_log", ".json"),
                kind=self.mode, started_at=self.started.isoformat(),
                backup_file=self.source, safe=self.safe, tables=self.tables,
                tables_skipped=skipped, pid=os.getpid())
        for name in self.tables:
            meta = scan.tables[name]["meta"]
            plan = self.plans[name] = TablePlan(name, list(meta["primary_key"]),
                                                [c["name"] for c in meta["columns"]])
            plan.live_meta, plan.json_columns = self.live.get(name), json_text_columns(meta)
            plan.plain_json_columns = {c["name"] for c in meta["columns"]
                                       if c["name"] in plan.json_columns
                                       and c.get("format") == "json"}
        self.auth = AuthRestore.for_run(self, self.file_path)  # None: no users to write
        return scan

    # -- 1. Safety backup -------------------------------------------------------------------------

    def safety_backup(self):
        """Step 1: every table the run will touch, backed up completely first (snapshot)."""
        present = [name for name in self.tables if name in self.live]
        if not self.safe or self.dry_run:
            self.step(1, "SAFETY", f"skipped ({'dry run' if self.dry_run else 'no --safe'})")
            self.done("no safety backup")
            return
        self.safety_path = self.safety_file_path("safety_backup")
        self.step(1, "SAFETY", f"safety backup of {len(present)} table(s)"
                  + (" and the auth users" if self.auth else "")
                  + (f" and every object of the Storage bucket(s) "
                     f"{', '.join(self.storage.covered)}" if self.storage else "")
                  + f" -> {self.safety_path}")
        summary, self.safety_read_path = self.safety_snapshot(
            self.safety_path, present, self.live,
            f"safety backup before {self.mode} of {self.file_path.name}",
            storage=self.storage.safety_options() if self.storage else False)
        self.restore_log.update(safety_backup_file=str(self.safety_path))
        self.done(f"{summary['rows']} rows in {len(present)} tables"
                  + (f", {summary['storage']['objects']} Storage objects" if self.storage else "")
                  + ", re-read and checked")
        for name, table in summary["tables"].items():
            if name in self.plans:
                self.plans[name].safety_count = table["rows"]  # what a rollback brings back
        self.safety_tables = summary["tables"]  # step 3 compares the file with these rows

    # -- 2. Validate ------------------------------------------------------------------------------

    def validate(self, scan):
        """Step 2: the file against the live schema (validate_backup); the write order."""
        critical = self.critical_tables
        self.step(2, "VALIDATE", f"{self.file_path.name}: checksums, keys, critical tables, "
                  f"schema")
        try:
            self.order = validate_backup(scan, self.live, self.tables, critical)
            if self.storage:
                self.storage.validate()
        except ValidationError as exc:
            self.refuse(str(exc))
        self.done("ok" + (f"; critical tables present: {', '.join(critical)}" if critical else ""))

    def refuse(self, error):
        """Before the first write: refused, the log says so, nothing written (exit 7)."""
        self.fail_step("refused", error)
        if self.restore_log:
            write_restore_log(self.restore_log, status="refused", error=error)
        raise ValidationError(error)

    # -- 3. Record the counts before, and the plan ------------------------------------------------

    def record(self, scan, spool_dir):
        """Step 3: the live row counts and, per row of the file, insert, update or nothing
        (record_counts); rows no request could write are refused here. Returns the counts."""
        self.step(3, "RECORD", "row counts before, and which rows will be inserted or updated"
                  + (" or deleted" if self.deletes else ""))
        safety = SafetyRows(self.safety_read_path, self.safety_tables) \
            if self.safety_read_path else None
        try:
            before = record_counts(self.api, scan, self.plans, spool_dir,
                                   extra_keys=self.deletes, safety=safety)
        finally:
            if safety is not None:
                safety.close()
        self.log_counts(before)
        self.json_changes = self.check_json_changes()
        self.check_cycles(scan)
        self.plan_summary = {name: {"insert": p.inserts, "update": p.updates,
                                    "delete": len(p.extra_keys), "unchanged": p.unchanged}
                             for name, p in self.plans.items()}
        if self.auth:
            self.plan_auth_users()
        self.storage_plan = self.storage.plan() if self.storage else None
        if self.storage:
            log.info("  %s", self.storage.plan_line())
        if not self.dry_run:
            self.confirm()
            self.restore_log.update(before_counts=before, plan=self.plan_summary)
            if self.storage:
                self.restore_log.update(storage_plan=self.storage_plan)
            if self.json_changes:
                self.restore_log.update(json_changes=self.json_changes)
            self.done(self.totals(inserts=sum(p.inserts for p in self.plans.values()),
                                  updates=sum(p.updates for p in self.plans.values()),
                                  deletes=sum(len(p.extra_keys) for p in self.plans.values()),
                                  verb="to "))
        return before

    def log_counts(self, before):
        """Step 3's line per table: its live rows and what the plan does with them."""
        for name in self.order:
            plan = self.plans[name]
            log.info("  %s: %d rows now; %d to insert, %d to update, %s%d unchanged", name,
                     before.get(name, 0), plan.inserts, plan.updates,
                     f"{len(plan.extra_keys)} to delete, " if self.deletes else "",
                     plan.unchanged)
            # Live rows whose key (or, without a key, whose values) the file does not hold.
            extra = before.get(name, 0) - plan.unchanged - plan.updates
            if extra > 0 and not self.deletes:
                log.info("    %d row(s) added since the backup: left alone", extra)

    def plan_auth_users(self):
        """Step 3 for the auth users: the plan and its limits, printed; conflicts refused."""
        conflicts = self.auth.plan(self.api)
        if conflicts:
            self.refuse(f"{AUTH_ENTRY}: {len(conflicts)} user(s) of the file cannot be created, "
                        f"their email or phone is another live user's: "
                        f"{'; '.join(conflicts[:5])}{' ...' if len(conflicts) > 5 else ''}; the "
                        f"database was not touched; change or delete those live users, or "
                        f"restore without --auth")
        for line in self.auth.describe():
            log.info("  %s", line)
        self.plan_summary[AUTH_ENTRY] = {"create": len(self.auth.to_create),
                                         "update_metadata": len(self.auth.to_update),
                                         "delete": 0, "limits": list(AUTH_LIMITS)}

    def totals(self, inserts, updates, deletes, verb=""):
        """"3 to insert, 1 to update" (and deletes where the run deletes)."""
        return (f"{inserts} {verb}insert{'' if verb else 'ed'}, {updates} {verb}update"
                f"{'' if verb else 'd'}" + (f", {deletes} {verb}delete{'' if verb else 'd'}"
                                            if self.deletes else ""))

    def confirm(self):
        """Before the first write: nothing to ask for a restore (rollback asks)."""

    def show_plan(self, before):
        """A dry run ends after step 3: the plan, nothing written."""
        self.done("dry run: nothing written")
        if self.args.json:
            emit(json.dumps({"status": "dry_run", "file": self.source, "before_counts": before,
                             "plan": self.plan_summary, "json_changes": self.json_changes,
                             **({"storage_plan": self.storage_plan} if self.storage else {})},
                            indent=2))
        return EXIT_OK

    # -- 4. Restore -------------------------------------------------------------------------------

    def restore(self):
        """Step 4: the planned rows written, parents before children (upsert_restore)."""
        self.step(4, "RESTORE", "upsert on the primary key, parents before children"
                  + ("; then delete the rows the file does not hold, children first"
                     if self.deletes else ""))
        if self.auth:
            self.write_auth_users()
        upsert_restore(self.api, self.plans, self.order, self.progress)
        self.delete_extra()
        self.restore_log.tables(self.plans)
        if self.storage:  # after the tables: auth users, tables, then Storage
            self.restore_log.update(storage=self.storage.write(self.progress))
        data = self.restore_log.data
        self.done(self.totals(data["total_inserted"], data["total_updated"],
                              data["total_deleted"])
                  + (f"; {storage_totals(data['storage'])}" if self.storage else ""))

    def write_auth_users(self):
        """Step 4's first writes: the auth users, before the tables that may refer to them. The
        log holds the ids written so far, so that an interrupted run leaves them on record."""
        saved = [time.monotonic()]

        def save_now_and_then():
            # The log holds every id written: saved at most every 2 s, not after each user, so
            # that a restore of many users does not rewrite a growing log once per user.
            if time.monotonic() - saved[0] >= 2:
                self.restore_log.update(auth_users=self.auth.summary())
                saved[0] = time.monotonic()

        self.auth.write(self.api, self.progress, save_now_and_then)
        self.restore_log.update(auth_users=self.auth.summary())
        if self.auth.anonymous:
            self.restore_log.update(tables_skipped={
                **self.restore_log.data["tables_skipped"],
                AUTH_ENTRY: f"{len(self.auth.anonymous)} anonymous user(s): the admin API "
                            f"cannot create them"})
        extra = self.auth.extra_live_users() if self.mode == "rollback" else []
        if extra:
            log.warning("%s: %d live user(s) are not in %s (created since, by a restore or by "
                        "sign-ups): a rollback never deletes users; they are listed in %s",
                        AUTH_ENTRY, len(extra), self.file_path.name, self.restore_log.path)
            self.restore_log.update(auth_users_left={"count": len(extra), "ids": extra[:1000]})

    def delete_extra(self):
        """A restore deletes nothing (rollback deletes the rows the file lacks)."""

    # -- 5. Verify --------------------------------------------------------------------------------

    def verify(self, before):
        """Step 5: counts, and every row of the file in the table with equal values."""
        self.step(5, "VERIFY", "counts, and every row of the file in the table with equal values"
                  + ("; every object of the file in Storage with its size and bytes (the MD5 "
                     "ETag of what was sent)" if self.storage else ""))
        problems = self.auth.verify(self.api) if self.auth else []
        if problems:
            self.restore_log.update(auth_mismatches=problems[:100])
            raise RestoreFailure(None, f"{AUTH_ENTRY}: {len(problems)} user(s) not as planned: "
                                       f"{'; '.join(problems[:3])}")
        expected = {name: (before.get(name, 0) + p.outcome.inserted - len(p.extra_keys))
                    for name, p in self.plans.items()}
        mismatches = verify_restore(self.api, self.plans, self.file_path, expected, self.ignored,
                                    self.accept_json_null)
        storage_mismatches = self.storage.verify() if self.storage else []
        if storage_mismatches and not mismatches:
            self.restore_log.update(storage_mismatches=storage_mismatches[:100])
            raise RestoreFailure(None, f"Storage: {len(storage_mismatches)} difference(s) "
                                       f"after writing: {'; '.join(storage_mismatches[:3])}")
        if mismatches:
            self.restore_log.update(mismatches=mismatches[:100])
            self.rewritten = rewritten_columns(mismatches, self.started)
            raise RestoreFailure(None, mismatch_message(mismatches, self.mode, self.started))
        self.done("every row matches")

    def failure(self, exc):
        """A failure in step 4 or 5, as the RestoreFailure that recover() rolls back. Ctrl-C is
        a failure like any other (a second Ctrl-C stops the rollback, and its message names the
        command that finishes it); a bug must not bypass the safety net either."""
        if isinstance(exc, (RestoreFailure, BackupError)):
            return exc
        if isinstance(exc, KeyboardInterrupt):
            progress.close()
            if self.safe and not getattr(self.args, "no_rollback", False):
                log.warning("interrupted (Ctrl-C): rolling back to %s; press Ctrl-C again to "
                            "stop the rollback", self.safety_path.name)
            return RestoreFailure(None, "interrupted (Ctrl-C)")
        if not isinstance(exc, Exception):
            raise exc  # SystemExit and the like: not the run's to handle
        log.error("unexpected error during the %s", self.mode, exc_info=exc,
                  extra={FILE_ONLY: True})
        return RestoreFailure(None, f"unexpected internal error: {type(exc).__name__}: {exc} "
                                    f"(a bug: the traceback is in {current_log_file()})")

    # -- 6. The log -------------------------------------------------------------------------------

    def write_log(self):
        """Step 6: the restore log in summaries/; the sequences' SQL; the last line."""
        after = {name: exact_count(self.api, name) for name in self.plans}
        sql = sequence_sql(self.plans, self.live)
        self.step(6, "LOG", f"{self.restore_log.path}")
        write_restore_log(self.restore_log, status="succeeded", after_counts=after,
                          sequence_sql=sql)
        self.done("saved")
        if sql:
            log.warning("run this in the SQL editor so that new rows do not collide with "
                        "restored keys:\n  %s", "\n  ".join(sql))
        data = self.restore_log.data
        skipped = data.get("tables_skipped") or {}
        log.info("%s complete: %s, %d unchanged%s%s%s", self.mode,
                 self.totals(data["total_inserted"], data["total_updated"],
                             data["total_deleted"]),
                 sum(p.unchanged for p in self.plans.values()),
                 f"; {AUTH_ENTRY}: {len(self.auth.created)} created, {len(self.auth.updated)} "
                 f"with metadata put back" if self.auth else "",
                 f"; {storage_totals(data['storage'])}" if self.storage else "",
                 "; NOT restored: " + "; ".join(f"{name} ({why})" for name, why in skipped.items())
                 if skipped else "")
        if self.args.json:
            emit(json.dumps(data, indent=2, default=str))
        return EXIT_NOT_ALL_RESTORED if skipped else EXIT_OK

    def recover(self, exc):
        """A step 4 or 5 failure: roll back to the safety backup, or say what is left."""
        reason = one_line(exc, 800)
        failed = self.plans.get(getattr(exc, "table", None))
        if failed is not None and failed.outcome.failure is None:
            failed.outcome.failure = reason
        self.restore_log.tables(self.plans)
        self.fail_step("failed", reason)
        # A warning: the one error line is the outcome, printed last, after the rollback.
        log.warning("%s failed: %s", self.mode, reason)
        if not self.safe:
            write_restore_log(self.restore_log, status="failed", error=reason)
            raise PartialRestoreError(f"{self.mode} failed and there is no safety backup to "
                                      f"return to (no --safe): {reason}; the tables may be "
                                      f"partly restored, see {self.restore_log.path}")
        if getattr(self.args, "no_rollback", False):
            write_restore_log(self.restore_log, status="failed_kept", error=reason)
            raise PartialRestoreError(f"{self.mode} failed: {reason}; kept as it is "
                                      f"(--no-rollback); to undo it run: {self.rollback_hint()}")
        # A column a trigger rewrites on every write (the failed verification found one, or the
        # user named it) is rewritten by the rollback's writes too: no API write can put its old
        # values back, so it is left out of the rollback's verification, and the message says so.
        leave_out = self.ignore_columns() | {f"{name}.{column}" for name, columns
                                             in self.rewritten.items() for column in columns}
        failed_path, mismatches = self.roll_back(leave_out)
        written_back, not_verified = self.left_out(leave_out)
        rollback_info = {"failed_state_file": str(failed_path), "mismatches": mismatches[:100],
                         "verified": not mismatches, "not_verified": not_verified}
        if mismatches:
            write_restore_log(self.restore_log, status="rollback_failed", error=reason,
                              rollback=rollback_info)
            problem = (mismatch_message(mismatches, "rollback", self.started)
                       if mismatches[0]["table"]
                       else mismatches[0]["problem"])
            self.fail_step("failed", problem)
            raise RollbackFailedError(f"{self.mode} failed ({reason}) and so did the automatic "
                                      f"rollback ({problem})", self.rollback_hint())
        after = {name: exact_count(self.api, name) for name in self.plans}
        write_restore_log(self.restore_log, status="rolled_back", error=reason,
                          rollback=rollback_info, after_counts=after)
        except_columns = "".join(
            f", except {name}.{', '.join(columns)} in the {written_back[name]} "
            f"row(s) written back, left out of the comparison because a trigger may rewrite it "
            f"on every write (then it holds the time of the rollback)"
            for name, columns in not_verified.items())
        self.done(f"rolled back and verified against the safety backup{except_columns}")
        raise RestoreError(f"{self.mode} failed ({reason}); every table it touched was rolled "
                           f"back to {self.safety_path.name} and verified: the database is as "
                           f"before{except_columns} (log: {self.restore_log.path})")


# --- 21. The rollback run; what a restore asks first and prints last ------------------------------
# RollbackRun: a rollback to a file is RestoreRun with what differs overridden. Without --safe a
# restore asks first (confirm_unsafe_restore); step 6 prints sequence_sql, the SQL that moves each
# integer key's sequence past the restored rows.

class RollbackRun(RestoreRun):
    """A rollback to a file (a safety backup): a restore that also deletes the live rows the
    file lacks, so that every table ends up exactly as the file; always behind its own safety
    backup, asking first on a terminal."""

    mode = "rollback"
    deletes = True

    def critical(self):
        return []  # a rollback brings back the recorded state, empty tables included

    def confirm(self):
        """On a terminal, a rollback (which deletes rows) shows its plan and asks before the
        first write; --yes answers for the person, and elsewhere (cron, scripts) it goes on."""
        if getattr(self.args, "yes", False) or not sys.stdin.isatty():
            return
        plans = self.plans.values()
        totals = (f"{sum(p.inserts for p in plans)} to insert, "
                  f"{sum(p.updates for p in plans)} to update, "
                  f"{sum(len(p.extra_keys) for p in plans)} to DELETE"
                  + (f"; {len(self.auth.to_create)} auth user(s) to create, "
                     f"{len(self.auth.to_update)} whose metadata to put back, none deleted"
                     if self.auth else ""))
        progress.close()
        answer = input(f"Roll back {len(self.plans)} table(s) to {self.file_path.name}: {totals}. "
                       f"Type 'rollback' to go on: ")
        if answer.strip() != "rollback":
            self.fail_step("cancelled", "the person answered no")
            write_restore_log(self.restore_log, status="aborted",
                              error="cancelled at the question; nothing was written")
            raise Cancelled("rollback cancelled; nothing was written")

    def delete_extra(self):
        """Step 4's last writes: the live rows the file does not hold, children first."""
        delete_extra(self.api, self.plans, self.order, self.file_path)
        for name in self.order:
            plan = self.plans[name]
            plan.outcome.deleted = len(plan.extra_keys)
            if plan.outcome.deleted:
                log.info("  %s: %d deleted (rows the file does not hold)", name,
                         plan.outcome.deleted)


def confirm_unsafe_restore(args, backup_path):
    """Without --safe there is no safety net: warn loudly, and ask (or insist on --yes)."""
    log.warning("restore WITHOUT --safe: no safety backup is taken, so a failed restore cannot be "
                "rolled back; use `restore --safe` on production data")
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise ConfigError("restore without --safe needs --yes when not run from a terminal "
                          "(better: use --safe); the database was not touched")
    answer = input(f"Restore {backup_path.name} without a safety backup? Type 'restore' to go on: ")
    if answer.strip() != "restore":
        raise Cancelled("restore cancelled; nothing was done")


def sequence_sql(plans, live):
    """The SQL that moves each integer key's sequence past the restored maximum."""
    statements = []
    for name, plan in plans.items():
        if plan.outcome.inserted == 0 or len(plan.primary_key) != 1:
            continue
        column = plan.primary_key[0]
        formats = {c["name"]: c.get("format") for c in live[name]["columns"]}
        if formats.get(column) not in INTEGER_FORMATS:
            continue
        # The API does not show whether a key has a sequence (PostgREST's OpenAPI leaves a
        # nextval() default out), so the statement finds out itself, and does nothing without
        # one. pg_get_serial_sequence parses its first argument as SQL (quoted identifiers) and
        # takes the second literally.
        table = sql_literal(f"public.{quote_sql_ident(name)}")
        statements.append(
            f"SELECT setval(s, m) FROM (SELECT pg_get_serial_sequence({table}, "
            f"{sql_literal(column)}) AS s, (SELECT max({quote_sql_ident(column)}) FROM "
            f"public.{quote_sql_ident(name)}) AS m) AS x WHERE s IS NOT NULL AND m IS NOT NULL;")
    return statements


def sql_literal(text):
    return "'" + text.replace("'", "''") + "'"


def quote_sql_ident(name):
    """An identifier as SQL: bare when it can be, double-quoted otherwise."""
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name) and name not in SQL_RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


# PostgreSQL's reserved key words (its documentation's appendix C, "reserved" and "reserved (can
# be function or type)"): not an identifier unless quoted.
SQL_RESERVED = set("""all analyse analyze and any array as asc asymmetric authorization binary both
case cast check collate collation column concurrently constraint create cross current_catalog
current_date current_role current_schema current_time current_timestamp current_user default
deferrable desc distinct do else end except false fetch for foreign freeze from full grant group
having ilike in initially inner intersect into is isnull join lateral leading left like limit
localtime localtimestamp natural not notnull null offset on only or order outer overlaps placing
primary references returning right select session_user similar some symmetric system_user table
tablesample then to trailing true union unique user using variadic verbose when where window
with""".split())


# --- 22. Retention and the heartbeat --------------------------------------------------------------
# Which backups to keep, in backups/ and at the off-site location alike, judged by the UTC time
# in their names; and the pings that tell a monitor (healthchecks.io and the like) how a
# scheduled backup went.

@dataclass(frozen=True)
class RetentionPolicy:
    """The retention options: --keep and --keep-days (each deletes), or the calendar rules
    --keep-last/--keep-daily/--keep-weekly/--keep-monthly (each keeps; the rest is deleted)."""

    keep: int = None
    keep_days: int = None
    last: int = None
    daily: int = None
    weekly: int = None
    monthly: int = None

    @property
    def calendar(self):
        return any((self.last, self.daily, self.weekly, self.monthly))

    @property
    def active(self):
        return self.calendar or bool(self.keep or self.keep_days)

    @classmethod
    def from_args(cls, args):
        return cls(*(getattr(args, name, None) for name in (
            "keep", "keep_days", "keep_last", "keep_daily", "keep_weekly", "keep_monthly")))


CALENDAR_PERIODS = (("daily", lambda t: t.strftime("%Y-%m-%d")),
                    ("weekly", lambda t: "%04d-W%02d" % t.isocalendar()[:2]),
                    ("monthly", lambda t: t.strftime("%Y-%m")))


def backup_time(name):
    """The UTC time in a backup's name (supabase_backup_YYYYMMDD_HHMMSS...)."""
    stamp = BACKUP_NAME_PATTERN.fullmatch(name).group(1)
    return datetime.datetime.strptime(stamp, "%Y%m%d_%H%M%S").replace(
        tzinfo=datetime.timezone.utc)


# Why complex: two kinds of policy give each backup its reasons: the calendar rules (--keep-last,
# then the newest backup of each day, week and month, up to each rule's count) or --keep and
# --keep-days (both must hold); the backup just written is always kept. One list of reasons built
# here is what prune prints, whichever kind applies.
def retention_plan(names, policy, protect=None, now=None):
    """[(name, reasons kept)] for backup names, newest first; a name with no reason is to be
    deleted. The calendar rules mean what restic's mean: --keep-daily N keeps the newest backup
    of each of the last N days that have one, and so on; --keep-last N the newest N. protect
    (the backup just written) is always kept."""
    now = now or utc_now()
    ordered = sorted(names, key=lambda n: (backup_time(n), n), reverse=True)
    reasons = {name: [] for name in ordered}
    if protect in reasons:
        reasons[protect].append("the backup just written")
    if policy.calendar:
        for index, name in enumerate(ordered[:policy.last or 0]):
            reasons[name].append(f"last {policy.last}")
        for rule, period_of in CALENDAR_PERIODS:
            count, periods = getattr(policy, rule) or 0, []
            for name in ordered:
                period = period_of(backup_time(name))
                if period in periods:
                    continue
                if len(periods) >= count:
                    break
                periods.append(period)
                reasons[name].append(f"{rule} {period}")
    else:
        for index, name in enumerate(ordered):
            newest = policy.keep is None or index < policy.keep
            young = (policy.keep_days is None or
                     now - backup_time(name) <= datetime.timedelta(days=policy.keep_days))
            if newest and young:
                reasons[name].append(" and ".join(
                    (["one of the newest %d" % policy.keep] if policy.keep else [])
                    + (["younger than %d days" % policy.keep_days] if policy.keep_days else [])))
    return [(name, reasons[name]) for name in ordered]


def local_backup_names(folder):
    """The names of the backups in a folder (plain and encrypted)."""
    return [p.name for p in folder.iterdir()
            if BACKUP_NAME_PATTERN.fullmatch(p.name) and p.is_file()]


def apply_retention(folder, policy, protect=None, now=None, dry_run=False):
    """Delete the backups in folder that policy does not keep (never protect, never anything but
    backup files); returns (plan, names deleted). Every backup is self-contained, so deleting one
    never breaks another."""
    plan = retention_plan(local_backup_names(folder), policy, protect, now)
    deleted = []
    for name, reasons in plan:
        if reasons or dry_run:
            continue
        try:
            (folder / name).unlink()
        except OSError as exc:
            log.warning("retention: could not delete %s (%s); the new backup is complete, but "
                        "old backups will pile up until this is fixed", name,
                        exc.strerror or exc)
            continue
        deleted.append(name)
        log.info("retention: deleted %s", name)
    if deleted:
        collect_objects(folder)
    return plan, deleted


def apply_remote_retention(client, location, policy, protect=None, now=None, dry_run=False):
    """apply_retention for the backups at an s3:// location."""
    plan = retention_plan([name for name, _ in remote_backups(client, location)], policy,
                          protect, now)
    doomed = [name for name, reasons in plan if not reasons]
    deleted = [] if dry_run else delete_remote(client, location, doomed)
    for name in deleted:
        log.info("retention: deleted %s", location.url(name))
    return plan, deleted


def retention_lines(where, plan, dry_run):
    """What prune prints: each backup deleted (or that would be), and why each kept one stays."""
    lines = []
    for name, reasons in plan:
        if reasons:
            lines.append(f"keep    {where}{name}  ({', '.join(reasons)})")
        else:
            lines.append(f"{'would delete' if dry_run else 'deleted'}  {where}{name}  "
                         f"(no rule keeps it)")
    return lines


PING_TIMEOUT = 10  # seconds per ping; a monitor that does not answer never holds a backup up


class Heartbeat:
    """Pings in the healthchecks.io convention: URL/start when the backup starts, URL when it
    succeeds, URL/fail with the exit code and the error line in the body when it fails. A ping
    that cannot be sent is a warning, never a failure; its body passes the secret filter."""

    def __init__(self, url):
        self.url = url.rstrip("/") if url else None

    def start(self):
        self.send("/start", "")

    def success(self, text):
        self.send("", text)

    def fail(self, code, text):
        self.send("/fail", f"exit {code}: {text}")

    def send(self, suffix, body):
        if not self.url:
            return
        import urllib.request
        request = urllib.request.Request(
            self.url + suffix, data=redactor.redact(one_line(body, 10000)).encode(),
            method="POST", headers={"Content-Type": "text/plain; charset=utf-8",
                                    "User-Agent": f"supabase_backup/{TOOL_VERSION}"})
        host = urllib.parse.urlsplit(self.url).netloc
        try:
            with urllib.request.urlopen(request, timeout=PING_TIMEOUT) as response:
                response.read(1024)
            log.debug("heartbeat: pinged %s%s", host, suffix or " (success)")
        except Exception as exc:  # whatever it is, the backup's own outcome stands
            log.warning("heartbeat: could not ping %s%s (%s); the backup itself is not "
                        "affected", host, suffix, one_line(redactor.redact(str(exc)), 160))


def ping_url(text):
    """argparse type for --ping: an http(s) URL."""
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", text):
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r}")
    return text


# --- 23. Inventory: what backups/ and safety_backups/ hold, and diff ------------------------------

def backup_summary(path, settings=None, identity=None, data_dir=None):
    """created_at, tables and rows of a backup, read from its content (the whole file, decrypted
    when it is encrypted and an identity is at hand); status says what was found."""
    stat = path.stat()
    entry = {"file": path.name, "bytes": stat.st_size}
    encrypted = is_encrypted(path)
    # The index is the data folder's: a folder named on the command line is read, not written to.
    indexed = data_dir is not None and path.parent.parent.resolve() == Path(data_dir).resolve()
    known = read_index(index_path(path)).get(index_key(path)) if indexed else None
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return {**entry, "created_at": known["created_at"], "encrypted": encrypted,
                "tables": known["tables"], "rows": known["rows"], "status": "ok"}
    if encrypted and not (identity or (settings or {}).get("BACKUP_AGE_IDENTITY")):
        return {**entry, "created_at": name_time(path.name), "encrypted": True,
                "status": "encrypted (age): give --identity or BACKUP_AGE_IDENTITY to check it"}
    try:
        with readable_backup(path, settings or {}, identity, data_dir) as backup:
            header, tables = check_backup(backup.path)
    except (ValidationError, ConfigError) as exc:
        kind = "damaged" if isinstance(exc, ValidationError) else "unreadable"
        return {**entry, "status": f"{kind}: {exc}"}
    if indexed:
        record_in_index(path, header, tables)
    tables = only_tables(tables)
    return {**entry, "created_at": header.get("created_at"), "encrypted": encrypted,
            "tables": len(tables), "rows": sum(t["row_count"] for t in tables.values()),
            "status": "ok"}


# Beside backups/ in the data folder: what list shows of each backup (created, tables, rows), by
# its size and modification time, recorded when a backup is finished or first checked, so that
# `list` need not read every file every time (`check` always does).
INDEX_FILE_NAME = ".backup_index.json"


def index_path(path):
    return path.parent.parent / INDEX_FILE_NAME


def index_key(path):
    """A file's key in the index: its folder and name (backups/NAME, safety_backups/NAME)."""
    return f"{path.parent.name}/{path.name}"


def record_in_index(path, header, tables):
    """Record what list shows of a backup just checked (a read-only folder: not recorded)."""
    stat = path.stat()
    index = {key: entry for key, entry in read_index(index_path(path)).items()
             if (path.parent.parent / key).exists()}
    tables = only_tables(tables)
    index[index_key(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                        "created_at": header.get("created_at"), "tables": len(tables),
                        "rows": sum(t["row_count"] for t in tables.values())}
    try:
        write_json_atomically(index_path(path), index)
    except OSError:
        pass


def read_index(path):
    """The backups folder's index ({} when missing or unreadable: it is only a shortcut)."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def name_time(name):
    """The ISO time in a backup's or safety backup's name, or None."""
    match = BACKUP_NAME_PATTERN.fullmatch(name) or SAFETY_NAME_PATTERN.fullmatch(name)
    if not match:
        return None
    stamp = datetime.datetime.strptime(match.groups()[-1], "%Y%m%d_%H%M%S")
    return stamp.replace(tzinfo=datetime.timezone.utc).isoformat()


def remote_listing(url, settings):
    """The backups at an s3:// location, newest first, from their objects' metadata (recorded at
    upload; `check --file` fetches one and verifies it)."""
    location = parse_remote(url, "list")
    client = s3_client(settings)
    entries = []
    for name, size in sorted(remote_backups(client, location), reverse=True):
        head = s3_call("cannot read", location, client.head_object, location.prefix + name,
                       Bucket=location.bucket, Key=location.prefix + name)
        meta = head.get("Metadata") or {}
        entries.append({"file": location.url(name), "bytes": size,
                        "created_at": meta.get("created-at") or name_time(name),
                        "encrypted": meta.get("encrypted") == "age",
                        "tables": int(meta["tables"]) if meta.get("tables", "").isdigit() else None,
                        "rows": int(meta["rows"]) if meta.get("rows", "").isdigit() else None,
                        "sha256": meta.get("sha256"),
                        "status": "listed" if meta.get("sha256") else
                                  "no SHA-256 recorded: not uploaded by this tool"})
    return entries


SAFETY_NAME_PATTERN = re.compile(r"(safety_backup|failed_state)_(\d{8}_\d{6})\.json\.gz(?:\.age)?")
RUN_LOG_PATTERN = re.compile(r"(restore|rollback)_log_\d{8}_\d{6}\.json")
# The outcome of the run a safety backup protected, as list-safety shows it, and whether the
# tables may be left half-restored (then the safety backup is needed: flagged, never cleaned up).
OUTCOMES = {
    "succeeded": ("succeeded", False),
    "rolled_back": ("failed, rolled back automatically and verified", False),
    "refused": ("refused by validation; nothing was written", False),
    "aborted": ("stopped before writing anything", False),
    "dry_run": ("dry run", False),
    "failed_kept": ("FAILED and kept as it is (--no-rollback)", True),
    "failed": ("FAILED and kept as it is", True),
    "rollback_failed": ("FAILED, and its automatic rollback failed too", True),
    "interrupted": ("INTERRUPTED (Ctrl-C)", True),
    "in_progress": ("INTERRUPTED (the process died half-way)", True),
}


def read_run_logs(summaries):
    """The restore and rollback logs in summaries/, oldest first (unreadable ones skipped)."""
    runs = []
    if not summaries.is_dir():
        return runs
    for path in sorted(summaries.iterdir()):
        if not RUN_LOG_PATTERN.fullmatch(path.name):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s cannot be read (%s); left out", path.name, one_line(exc, 100))
            continue
        if isinstance(data, dict):
            runs.append((path, data))
    return runs


def lock_holder(data_dir):
    """Who holds the data folder's lock now (text), or None when no run holds it."""
    path = Path(data_dir) / LOCK_FILE_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another run"
    finally:
        os.close(fd)


def safety_inventory(data_dir, running=None, now=None):
    """Every safety backup in safety_backups/, newest first, with the run it belongs to.

    Each entry: file, path, kind (safety_backup: taken before a restore or rollback;
    failed_state: the tables after a failed one), created_at (from the name, UTC), age_days,
    bytes, the run (its log, command, file, outcome), needs_rollback (the run may have left
    the tables half-restored and no later rollback to this file succeeded), and rolled_back_by
    (the rollback logs that brought the tables back to this file). running: who holds the lock
    (lock_holder()), so that a log still in_progress is told apart from an interrupted run.
    """
    now = now or utc_now()
    folder = Path(data_dir) / SAFETY_DIR
    if not folder.is_dir():
        return []
    runs = read_run_logs(Path(data_dir) / SUMMARY_DIR)
    entries = []
    for path in folder.iterdir():
        match = SAFETY_NAME_PATTERN.fullmatch(path.name)
        if not match or not path.is_file():
            continue
        entries.append(safety_entry(path, match, runs, running, now))
    # Names hold whole seconds: the modification time orders two files of the same second.
    entries.sort(key=lambda e: (e["created_at"], Path(e["path"]).stat().st_mtime_ns),
                 reverse=True)
    return entries


# Why complex: each run log may name this file as the backup that protected its run or as the
# failed state it kept; a run in progress may be the live one holding the lock; the outcome says
# whether a rollback is needed, and a later successful rollback to this file clears that. All of
# it builds one entry in one pass over the logs.
def safety_entry(path, match, runs, running, now):
    """One safety backup's entry of safety_inventory(), its run found among the run logs."""
    created = datetime.datetime.strptime(match.group(2), "%Y%m%d_%H%M%S").replace(
        tzinfo=datetime.timezone.utc)
    entry = {"file": path.name, "path": str(path), "kind": match.group(1),
             "created_at": created.isoformat(),
             "age_days": round((now - created).total_seconds() / 86400, 3),
             "bytes": path.stat().st_size, "run": None, "needs_rollback": False,
             "rolled_back_by": []}
    rollbacks = []
    for log_path, data in runs:
        rollback_info = data.get("rollback") or {}
        if Path(str(data.get("safety_backup_file"))).name == path.name:
            role = "protected"
        elif Path(str(rollback_info.get("failed_state_file"))).name == path.name:
            role = "failed_state_of"
        else:
            role = None
        if role:
            status = data.get("status") or "in_progress"
            # Running now only if the run that holds the lock is the one that wrote this log.
            live_run = (status == "in_progress" and running is not None
                        and f"(pid {data.get('pid')})" in running)
            if live_run:
                outcome = f"running now ({running})"
            else:
                outcome = OUTCOMES.get(status, (status, True))[0]
            entry["run"] = {"log": log_path.name, "kind": data.get("kind", "restore"),
                            "role": role, "file": data.get("backup_file"),
                            "started_at": data.get("started_at"), "status": status,
                            "outcome": outcome, "error": data.get("error")}
            entry["needs_rollback"] = (role == "protected" and not live_run and
                                       OUTCOMES.get(status, (None, True))[1])
        if (data.get("kind") == "rollback" and data.get("status") == "succeeded" and
                Path(str(data.get("backup_file"))).name == path.name):
            entry["rolled_back_by"].append(log_path.name)
            rollbacks.append(str(data.get("started_at")))
    # A later rollback to this file succeeded: what the run left is undone.
    if entry["run"] and any(started >= str(entry["run"]["started_at"])
                            for started in rollbacks):
        entry["needs_rollback"] = False
    return entry


def diff_tables(api, path, tables, live_tables):
    """Compare the given tables of a backup file with the live data; returns {table: result}.

    A table with the same primary key in the file and live is compared in key ranges
    (TableComparison): memory holds a chunk of rows and the differences, not the table. A table
    without one is compared as a multiset of whole rows, which holds a digest per live row.
    Values are compared over the columns both sides have, read in the file's forms.
    """
    results = {}
    for table in read_tables(path, as_bytes=True, label="comparing"):
        if table.name in tables:
            results[table.name] = diff_table(api, table, live_tables.get(table.name))
    for name in tables:
        if name not in results:
            raise ValidationError(f"{name} is not in {Path(path).name}; check --tables")
    return results


def diff_table(api, table, live_meta):
    """diff_tables for one table of the file (a BackupTable) against its live rows."""
    result = {"file_rows": 0, "live_rows": 0, "only_in_file": 0, "only_live": 0, "changed": 0,
              "only_in_file_keys": [], "only_live_keys": [], "changed_keys": [],
              "changed_columns": {}, "columns_only_in_file": [], "columns_only_live": []}
    if live_meta is None:
        result["missing_live"] = True
        result["file_rows"] = result["only_in_file"] = sum(1 for _ in table.rows)
        return result
    live_columns = [c["name"] for c in live_meta["columns"]]
    result["columns_only_in_file"] = [c for c in table.columns if c not in live_columns]
    result["columns_only_live"] = [c for c in live_columns if c not in table.columns]
    columns = [c for c in table.columns if c in live_columns]
    return diff_rows(api, table, live_meta, columns, result)


def diff_rows(api, table, live_meta, columns, result):
    """diff_table's rows: matched by key where the file's primary key is the live one, else
    compared as whole rows."""
    pk = list(table.meta.get("primary_key") or [])
    if not pk or pk != list(live_meta["primary_key"]):
        return diff_whole_rows(api, table, live_meta, columns, result,
                               "no primary key" if not pk else
                               "the file's primary key is not the live one")
    with contextlib.closing(TableComparison(api, table.name, live_meta, pk, columns,
                                            file_forms(table.meta))) as comparison:
        for line in table.rows:
            result["file_rows"] += 1
            comparison.add(line)
        comparison.finish()
    result.update(live_rows=comparison.live_rows, only_in_file=len(comparison.only_file),
                  only_live=len(comparison.only_live), changed=comparison.changed,
                  only_in_file_keys=list(itertools.islice(comparison.only_file, DIFF_EXAMPLES)),
                  only_live_keys=list(itertools.islice(comparison.only_live, DIFF_EXAMPLES)),
                  changed_keys=list(comparison.changed_keys),
                  changed_columns={k: v for k, v in comparison.changed_keys.items() if v})
    return result


def diff_whole_rows(api, table, live_meta, columns, result, why):
    """diff_table for a table compared as a multiset of whole rows (why: no key to match rows
    by): a file row is in the live table when an equal live row is left over for it."""
    result["compared_as"] = f"whole rows ({why})"
    live_rows = collections.Counter()
    for page in TablePages(api, table.name, with_stored_forms(live_meta, file_forms(table.meta))):
        result["live_rows"] += len(page)
        live_rows.update(row_digest(row, columns) for row in page)
    for line in table.rows:
        result["file_rows"] += 1
        digest = row_digest(parse_row(line), columns)
        if live_rows[digest] > 0:
            live_rows[digest] -= 1
        else:
            result["only_in_file"] += 1
    result["only_live"] = sum(live_rows.values())
    return result


def has_differences(result):
    return bool(result["only_in_file"] or result["only_live"] or result["changed"] or
                result["columns_only_in_file"] or result["columns_only_live"] or
                result.get("missing_live"))


# --- 24. Logs and output --------------------------------------------------------------------------
# The restore log in summaries/; the one logging setup (stderr for people, the log file in
# logs/); data for stdout (emit).

class RestoreLog:
    """The restore log in summaries/: written when the restore starts and after every step,
    atomically, so that a restore that is killed leaves an honest log (status in_progress)."""

    def __init__(self, path, **fields):
        self.path = Path(path)
        self.data = {"kind": "restore", "status": "in_progress", "started_at": None,
                     "finished_at": None, "backup_file": None, "safety_backup_file": None,
                     "before_counts": {}, "after_counts": {}, "tables_restored": {},
                     "tables_failed": [], "tables_skipped": {}, "total_inserted": 0,
                     "total_updated": 0, "total_deleted": 0, "total_errors": 0,
                     "mismatches": [], "steps": [],
                     "rollback": None, "sequence_sql": [], "error": None}
        self.data.update(fields)
        self._step_started = None
        self.save()

    def step(self, number, name, detail=None, status="running"):
        """Record the start (or outcome) of a numbered step, print it, and save."""
        now = time.monotonic()
        if status == "running":
            self._step_started = now
            self.data["steps"].append({"step": number, "name": name, "status": status})
        else:
            entry = self.data["steps"][-1]
            entry.update(status=status, seconds=round(now - (self._step_started or now), 3))
            if detail:
                entry["detail"] = detail
        self.save()

    def update(self, **fields):
        self.data.update(fields)
        self.save()

    def tables(self, plans):
        """Copy the per-table outcome of the plans into the log."""
        tables = self.data["tables_restored"] = {name: plan.summary()
                                                 for name, plan in plans.items()}
        for total, key in (("total_inserted", "inserted"), ("total_updated", "updated"),
                           ("total_deleted", "deleted"), ("total_errors", "errors")):
            self.data[total] = sum(table[key] for table in tables.values())
        self.data["tables_failed"] = [name for name, plan in plans.items()
                                      if plan.outcome.failure]

    def save(self):
        write_json_atomically(self.path, self.data)


def write_json_atomically(path, data):
    """Write a JSON file under a temporary name, fsync, rename: never a half-written file."""
    temp = path.parent / f"{TEMP_PREFIX}{os.getpid()}-{path.name}"
    with open(temp, "w", encoding="utf-8", opener=private_opener) as out:
        json.dump(data, out, indent=2, ensure_ascii=False, default=str)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)


def write_restore_log(restore_log, **fields):
    """Step 6: the final state of the restore log."""
    restore_log.update(finished_at=utc_now().isoformat(), **fields)
    return restore_log.path


FILE_ONLY = "file_only"  # log(..., extra={FILE_ONLY: True}) keeps a record out of the terminal


class SecretRedactor(logging.Filter):
    """Replace the text of every registered secret (the service key) with [redacted]."""

    def __init__(self):
        super().__init__()
        self.secrets = set()

    def add(self, secret):
        """Register a secret to hide from every log line from now on."""
        self.secrets.add(secret)

    def redact(self, text):
        """The text with every registered secret replaced."""
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def filter(self, record):
        if self.secrets:
            record.msg, record.args = self.redact(record.getMessage()), None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.redact(record.exc_text)
            if record.stack_info:
                record.stack_info = self.redact(record.stack_info)
        return True


# The key is checked in code and never logged on purpose; this filter is belt and braces.
redactor = SecretRedactor()


class ConsoleHandler(logging.StreamHandler):
    """stderr for people: a line logged while a progress bar is up clears the bar first and
    draws it again below the line."""

    def emit(self, record):
        bar = progress.bar
        if bar is None:
            return super().emit(record)
        bar.clear()
        super().emit(record)
        bar.refresh()


class ConsoleFormatter(logging.Formatter):
    """Progress as plain lines; warnings and errors prefixed like argparse's own messages."""

    def format(self, record):
        message = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"supabase_backup: error: {message}"
        if record.levelno >= logging.WARNING:
            return f"supabase_backup: warning: {message}"
        return message


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file that only its owner can read (0600), rotated files included."""

    def _open(self):
        stream = open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                      opener=private_opener)
        os.chmod(self.baseFilename, 0o600)
        return stream


def emit(text=""):
    """Data for stdout (a listing, a JSON document), a line at a time. A reader that went away
    (`| head`) ends the output quietly: the command's work and exit code stand, and no
    BrokenPipeError is reported as a bug."""
    global stdout_closed
    if stdout_closed:
        return
    try:
        sys.stdout.write(f"{text}\n")
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_closed = True
        # Whatever is still buffered goes nowhere, instead of failing again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


stdout_closed = False


def setup_console_logging(quiet=False, verbose=False):
    """Send log records to stderr for people: errors only with quiet, debug detail with verbose."""
    close_logging()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    progress.configure(quiet)
    console = ConsoleHandler(sys.stderr)
    console.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(ConsoleFormatter("%(message)s"))
    console.addFilter(redactor)
    console.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
    log.addHandler(console)


def attach_log_file(log_dir):
    """Append this run's records, every level, to log_dir/supabase_backup.log; return its path."""
    make_private_dir(log_dir)
    log_file = log_dir / LOG_FILE_NAME
    handler = PrivateRotatingFileHandler(log_file, maxBytes=LOG_FILE_MAX_BYTES,
                                         backupCount=LOG_FILE_BACKUPS, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(message)s"))
    handler.addFilter(redactor)
    log.addHandler(handler)
    return log_file


def current_log_file():
    """The log file of this run, or None before a command has started one."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    return None


def close_logging():
    """Detach and close every handler, so that main() can run again in the same process."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


# --- 25. Commands: backup, check, list ------------------------------------------------------------

def begin_run(args):
    """Every command's first step: load the configuration, make the data folders, start the log."""
    config = load_config(args)
    paths = data_paths(config)
    attach_log_file(paths.logs)
    log.debug("supabase_backup %s: %s started; project host %s, key from %s, data folder %s, "
              "settings from %s", TOOL_VERSION, args.command, config.host, config.key_setting,
              config.data_dir, ", ".join(config.sources))
    return config, paths


def connect_project(config, jobs):
    """The SupabaseApi of a command's run (the one place a run connects to the project); what
    is live by then stays out of the cyclic collector's reach for the rest of the process."""
    api = SupabaseApi(config, jobs)
    # The ~100,000 objects importing the client made live for the whole run: keep them out
    # of the cyclic collector's way, so that collecting after each page costs next to
    # nothing (see read_table).
    gc.freeze()
    return api


def local_data_dir(args):
    """The data folder for the commands that only read local files (no URL or key needed)."""
    return resolve_data_dir(args, merge_settings(setting_layers()))


def setup_local_run(args):
    """Start the log file of a command that reads only local files."""
    logs = local_data_dir(args) / LOG_DIR
    if logs.is_dir():
        attach_log_file(logs)


def local_settings():
    """Every setting (environment over .env files), for the commands that need no project."""
    return merge_settings(setting_layers())


def wanted_tables(args, config):
    """--tables, else BACKUP_TABLES, else None (every table)."""
    if args.tables:
        return args.tables
    if config.settings.get("BACKUP_TABLES"):
        try:
            return table_list(config.settings["BACKUP_TABLES"])
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"BACKUP_TABLES: {exc}") from None
    return None


def resolve_tables(args, config, discovered):
    """--tables, else BACKUP_TABLES, else every writable table (less --exclude)."""
    return select_tables(discovered, wanted_tables(args, config), args.exclude)


def guess_tables(api, names):
    """Table metadata without the OpenAPI document, which only the service role may read:
    the columns of the first row, no key known (so rows are paged by offset in an order on
    every column). Used with --allow-rls-limited, and says so in the file."""
    if not names:
        raise ConfigError("with a key that is not the service role the table list cannot be "
                          "read (the API shows it to the service role only); name the tables "
                          "with --tables or BACKUP_TABLES")
    tables = {}
    for name in names:
        try:
            first = api.page(name, "*", [], None, 1)
        except TableMissingError:
            raise ConfigError(f"no table named {name} that this key can read; check --tables / "
                              f"BACKUP_TABLES") from None
        columns = [{"name": column, "type": None, "format": None, "nullable": True}
                   for column in (first[0] if first else {})]
        tables[name] = {"columns": columns, "primary_key": [], "foreign_keys": [],
                        "writable": True, "relation": "table",
                        "metadata": "guessed from the rows (the table list needs the service "
                                    "role key); no primary key known"}
    return tables


def new_file_path(folder, prefix, suffix=".json.gz"):
    """folder/prefix_<UTC time><suffix> under a name no file has yet: a run that ends within the
    same second as the last one waits, so that no file ever replaces another."""
    path = folder / timestamp_name(prefix, utc_now(), suffix)
    while path.exists():
        time.sleep(0.2)
        path = folder / timestamp_name(prefix, utc_now(), suffix)
    return path


def backup_output_path(args, paths, suffix=".json.gz"):
    """Where the new backup goes: --output, else backups/supabase_backup_<UTC time><suffix>
    (.json.gz, or .json.gz.age when it is encrypted)."""
    if args.output:
        output = Path(args.output).expanduser()
        if output.is_dir():
            output = output / timestamp_name("supabase_backup", utc_now(), suffix)
        elif suffix.endswith(AGE_SUFFIX) and not output.name.endswith(AGE_SUFFIX):
            output = output.with_name(output.name + AGE_SUFFIX)
        if not output.parent.is_dir():
            raise ConfigError(f"--output {args.output}: the folder {output.parent} does not "
                              f"exist; create it or choose another path")
        if output.exists() and not args.force:
            raise ConfigError(f"--output {args.output} exists already: a backup never replaces "
                              f"a file silently; choose another name, or add --force to "
                              f"replace it")
        if not output.name.endswith((".json.gz", ".json")):
            log.warning("--output %s: the file is gzip-compressed JSON; a name ending in "
                        ".json.gz says so to the next person (and to list)", args.output)
        return output.resolve()
    return new_file_path(paths.backups, "supabase_backup", suffix)


def backup_remote(args, settings):
    """The off-site location of a backup (--to, else BACKUP_REMOTE), or None."""
    if args.to:
        return parse_remote(args.to, "--to")
    if settings.get("BACKUP_REMOTE"):
        return parse_remote(settings["BACKUP_REMOTE"], "BACKUP_REMOTE")
    return None


def backup_recipients(args, settings, option="--encrypt-to", setting="BACKUP_ENCRYPT_TO"):
    """The age recipients to encrypt to (the option, else the setting), or None."""
    if getattr(args, option[2:].replace("-", "_"), None):
        return age_recipients(getattr(args, option[2:].replace("-", "_")), option)
    if settings.get(setting):
        return age_recipients(settings[setting], setting)
    return None


def backup_storage_wanted(args, settings):
    """Whether the backup takes Storage too: --storage, else BACKUP_STORAGE=1 (true, yes)."""
    if getattr(args, "storage", False):
        return True
    value = (settings.get("BACKUP_STORAGE") or "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ConfigError(f"BACKUP_STORAGE is {value!r}; set it to 1 to back up Storage's buckets and "
                      f"objects, or 0 (or remove it) not to")


def heartbeat_for(args):
    """The Heartbeat of a backup: --ping, else BACKUP_PING_URL (an unusable URL is a warning)."""
    url = args.ping
    if not url:
        try:
            url = local_settings().get("BACKUP_PING_URL")
        except BackupError:
            url = None  # the run's own configuration check reports it
        if url and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
            log.warning("BACKUP_PING_URL is not an http(s) URL; no heartbeat is sent")
            url = None
    return Heartbeat(url)


def cmd_backup(args):
    """Back up tables to a gzip JSON file in backups/, then encrypt, copy off-site and thin it as
    asked; the heartbeat hears how it went."""
    heartbeat = heartbeat_for(args)
    heartbeat.start()
    try:
        summary = run_backup(args)
    except BackupError as exc:
        heartbeat.fail(exc.exit_code, exc)
        raise
    except KeyboardInterrupt:
        heartbeat.fail(EXIT_INTERRUPTED, "interrupted (Ctrl-C)")
        raise
    except Exception as exc:
        heartbeat.fail(EXIT_INTERNAL, f"unexpected internal error: {type(exc).__name__}")
        raise
    heartbeat.success(f"{Path(summary['file']).name}: {len(summary['tables'])} tables, "
                      f"{summary['rows']} rows, {human_size(summary['bytes'])}"
                      + (f", copied to {summary['remote']}" if summary.get("remote") else ""))
    if args.json:
        emit(json.dumps(summary, indent=2))
    return EXIT_OK


def run_backup(args):
    """The backup itself: snapshot, then encryption, the off-site copy and retention; returns
    its summary."""
    config, paths = begin_run(args)
    role = check_key_role(config, args.allow_rls_limited)
    # Every setting is checked (and boto3, pyrage imported) before the first request, so that a
    # typo does not cost a whole backup.
    recipients = backup_recipients(args, config.settings)
    remote = backup_remote(args, config.settings)
    if backup_storage_wanted(args, config.settings) and (recipients or remote):
        raise ConfigError(f"--storage cannot be combined with "
                          f"{'--encrypt-to' if recipients else '--to'} (or its setting): Storage "
                          f"objects are kept in {BACKUP_DIR}/{OBJECTS_DIR}/, neither encrypted "
                          f"nor copied off-site; back up Storage in a run of its own without them")
    client = s3_client(config.settings) if remote else None
    policy = RetentionPolicy.from_args(args)
    started = time.monotonic()
    with data_lock(config.data_dir, "backup"):
        clear_partial_files(paths.backups)
        output = backup_output_path(args, paths, ".json.gz" + (AGE_SUFFIX if recipients else ""))
        if output.parent != paths.backups:
            clear_partial_files(output.parent)
        # Encrypted: the plain file is written and verified under a temporary name, then
        # encrypted to the final name and removed.
        written = (output.parent / f"{TEMP_PREFIX}{os.getpid()}-plain-{plain_name(output.name)}"
                   if recipients else output)
        summary = back_up_tables(args, config, role, written, output)
        if recipients:
            try:
                encrypt_backup(written, output, recipients)
            finally:
                written.unlink(missing_ok=True)
            summary.update(file=str(output), bytes=output.stat().st_size, encrypted=True)
            log.info("encrypted to %d age recipient(s): %s", len(recipients), output.name)
        if remote:
            try:
                summary["remote"] = upload_backup(client, remote, output, summary)
            except UploadError as exc:
                exc.args = (f"{exc}; the local backup {output.name} is complete and kept; no "
                            f"retention ran",)
                raise
            abort_dead_uploads(client, output.parent)
            log.info("copied to %s and checked (size and SHA-256)", summary["remote"])
        summary["deleted"] = thin_backups(paths, output, policy, client, remote)
    summary.update(seconds=round(time.monotonic() - started, 3), status="ok")
    for warning in summary["warnings"]:
        log.warning("%s", warning)
    log.info("backup complete: %s (%d tables, %d rows, %s, %d requests, %.1fs)", output,
             len(summary["tables"]), summary["rows"], human_size(summary["bytes"]),
             summary["requests"], summary["seconds"])
    return summary


def back_up_tables(args, config, role, path, shown):
    """The tables the run asks for, read from the project into a new file at path (snapshot);
    returns the backup's summary, with the requests it took. shown is the file's final name."""
    api = connect_project(config, args.jobs)
    try:
        if role == SERVICE_ROLE:
            discovered = discover_tables(api.openapi())
        else:
            discovered = guess_tables(api, wanted_tables(args, config))
        tables = resolve_tables(args, config, discovered)
        if not tables:
            raise ConfigError("there is no table to back up: the service role sees none in the "
                              "public schema (or --exclude left none)")
        for name in tables:
            if not discovered[name]["writable"]:
                log.info("  %s is read-only (a view?): backed up as asked, marked so that "
                         "restore leaves it alone", name)
        log.info("backing up %d table(s) from %s to %s", len(tables), config.host, shown)
        note = ("made with a key that is not the service role (--allow-rls-limited): row level "
                "security may have hidden rows" if role != SERVICE_ROLE else None)
        summary = snapshot(api, tables, discovered, path, config.host, role, progress, note,
                           auth=wants_auth_users(args, config),
                           storage=backup_storage_wanted(args, config.settings))
    finally:
        api.close()
    summary["requests"] = api.requests
    return summary


def thin_backups(paths, output, policy, client, remote):
    """Retention after a complete backup (never the one just written), locally and off-site;
    returns what it deleted. Off-site retention that fails is a warning: the backup stands."""
    if not policy.active:
        return []
    protect = output.name if output.parent == paths.backups else None
    _, deleted = apply_retention(paths.backups, policy, protect)
    if remote:
        try:
            _, gone = apply_remote_retention(client, remote, policy, output.name)
            deleted += [remote.url(name) for name in gone]
        except BackupError as exc:
            log.warning("retention at %s did not run: %s", remote.url(), exc)
    return deleted


def human_size(size):
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def find_backup_file(name, data_dir):
    """A file named on the command line: a path as given, else a file of that name in the data
    folder's backups/, else in its safety_backups/. FileMissingError (exit 12) when none is."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if path.parent == Path("."):
        for folder in (BACKUP_DIR, SAFETY_DIR):
            if (Path(data_dir) / folder / name).exists():
                return Path(data_dir) / folder / name
        where = (f"the working directory, {Path(data_dir) / BACKUP_DIR} and "
                 f"{Path(data_dir) / SAFETY_DIR}")
    else:
        where = "that path"
    raise FileMissingError(f"no file {name} (looked in {where}); `python {PROG} list` and "
                           f"`python {PROG} list-safety` show the backups; nothing was done")


def cmd_check(args):
    """Verify a backup file offline: structure, per-table row counts and checksums (an s3://
    object is fetched and checked against its recorded SHA-256 first; an age file decrypted)."""
    setup_local_run(args)
    data_dir = local_data_dir(args)
    source = args.file if is_remote(args.file) else find_backup_file(args.file, data_dir)
    with readable_backup(source, local_settings(), args.identity, data_dir) as backup:
        header, tables = check_backup(backup.path)
        objects = verify_objects(backup.path, tables)
    shown = backup.shown
    if args.json:
        emit(json.dumps({"file": shown, "status": "ok", "encrypted": backup.encrypted,
                          "created_at": header.get("created_at"),
                          "tables": {n: {"rows": t["row_count"], "sha256": t["sha256"]}
                                     for n, t in only_tables(tables).items()},
                          **({"storage_objects": {"objects": objects[0], "bytes": objects[1]}}
                             if objects else {})}, indent=2))
        return EXIT_OK
    emit(f"{shown}: intact (format v{header['format_version']}, "
          f"{'age-encrypted, ' if backup.encrypted else ''}created "
          f"{header.get('created_at')}, project {header.get('project_host')})")
    width = max([len(n) for n in tables] + [5])
    emit(f"  {'table':<{width}}  {'rows':>9}  sha256")
    for name, table in tables.items():
        emit(f"  {name:<{width}}  {table['row_count']:>9}  {table['sha256'][:16]}..."
             + (f"  ({entry_kind(table['meta'])})" if entry_kind(table["meta"]) else ""))
    plain = only_tables(tables)
    emit(f"  {len(plain)} tables, {sum(t['row_count'] for t in plain.values())} rows")
    if objects:
        emit(f"  Storage: {objects[0]} objects ({human_size(objects[1])}) present in "
             f"{OBJECTS_DIR}/ with their SHA-256")
    return EXIT_OK


# Why complex: backups from a folder or an off-site location; printed as JSON, as "no backups",
# or as a table whose rows tell readable, damaged and otherwise unreadable backups apart; damaged
# ones set the exit code; a remote listing ends with how to check one. The table's rows could
# move to a helper; the rest is the command's one flow.
def cmd_list(args):
    """List the backups in backups/ (or at an s3:// location), newest first."""
    setup_local_run(args)
    settings = local_settings()
    data_dir = local_data_dir(args)
    if args.location and is_remote(args.location):
        where = args.location
        entries = remote_listing(args.location, settings)
    else:
        folder = Path(args.location).expanduser() if args.location else data_dir / BACKUP_DIR
        where = str(folder)
        files = sorted((p for p in folder.glob("supabase_backup_*") if
                        BACKUP_NAME_PATTERN.fullmatch(p.name)), key=lambda p: p.name,
                       reverse=True)
        entries = [backup_summary(path, settings, args.identity, data_dir) for path in files]
    damaged = [entry["file"] for entry in entries if entry["status"].startswith("damaged")]
    if args.json:
        emit(json.dumps(entries, indent=2))
    elif not entries:
        emit(f"no backups in {where}")
    else:
        emit(f"{'backup':<41}  {'created (UTC)':<19}  {'size':>10}  {'tables':>6}  {'rows':>10}")
        for entry in entries:
            created = (entry.get("created_at") or "?")[:19].replace("T", " ")
            if entry["status"] in ("ok", "listed"):
                emit(f"{entry['file']:<41}  {created:<19}  {human_size(entry['bytes']):>10}  "
                     f"{entry['tables']:>6}  {entry['rows']:>10}"
                     + ("  (age)" if entry.get("encrypted") else ""))
            else:
                emit(f"{entry['file']:<41}  "
                     f"{'DAMAGED' if entry['file'] in damaged else created:<19}  "
                     f"{human_size(entry['bytes']):>10}  {entry['status']}")
    if damaged:
        log.error("%d damaged backup(s): %s; do not rely on them (check --file NAME says what "
                  "is wrong)", len(damaged), ", ".join(damaged))
        return EXIT_INVALID_BACKUP
    if is_remote(where):
        log.info("listed from the objects' metadata; `python %s check --file %s<NAME>` fetches "
                 "one and verifies it", PROG, parse_remote(where, "list").url())
    return EXIT_OK


# --- 26. Commands: restore, rollback, list-safety, cleanup-safety, prune, diff --------------------

def cmd_restore(args):
    """Restore a backup file behind the safety net (SAFETY.md's numbered flow)."""
    config, paths = begin_run(args)
    check_key_role(config)
    source = args.file
    if not is_remote(source):
        source = find_backup_file(args.file, config.data_dir)
    # Fetched, checked against its recorded SHA-256 and decrypted before any request to the
    # project: a wrong identity or a changed byte stops here.
    with readable_backup(source, config.settings, args.identity, config.data_dir) as backup:
        if not args.safe and not args.dry_run:
            confirm_unsafe_restore(args, backup.path)
        with data_lock(config.data_dir, "restore"):
            for folder in (paths.safety_backups, paths.summaries):
                clear_partial_files(folder)
            api = connect_project(config, args.jobs)
            try:
                return RestoreRun(api, config, paths, args, backup.path, source=backup.shown).run()
            finally:
                api.close()


def cmd_rollback(args):
    """Bring tables back to exactly the state recorded in a safety backup."""
    config, paths = begin_run(args)
    check_key_role(config)
    source = args.file
    if not is_remote(source):
        source = find_backup_file(args.file, config.data_dir)
    with readable_backup(source, config.settings, args.identity, config.data_dir) as backup:
        with data_lock(config.data_dir, "rollback"):
            for folder in (paths.safety_backups, paths.summaries):
                clear_partial_files(folder)
            api = connect_project(config, args.jobs)
            try:
                return RollbackRun(api, config, paths, args, backup.path,
                                  source=backup.shown).run()
            finally:
                api.close()


def local_time(moment):
    """An aware datetime as local time, e.g. '2026-11-24 20:15:03 CET'."""
    local = moment.astimezone()
    return f"{local:%Y-%m-%d %H:%M:%S} {local.tzname() or ''}".rstrip()


def age_text(days):
    """0.04 -> '1 h ago'."""
    seconds = days * 86400
    if seconds < 3600:
        return f"{max(0, int(seconds // 60))} min ago"
    if seconds < 2 * 86400:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(days)} days ago"


def rollback_command(entry):
    return f"python {PROG} rollback {entry['file']}"


def cmd_list_safety(args):
    """List the safety backups, newest first, with the restore each protected and its outcome."""
    setup_local_run(args)
    data_dir = local_data_dir(args)
    entries = safety_inventory(data_dir, running=lock_holder(data_dir))
    settings = local_settings()
    for entry in entries:
        summary = backup_summary(Path(entry["path"]), settings, args.identity, data_dir)
        entry.update(status=summary["status"], tables=summary.get("tables"),
                     rows=summary.get("rows"))
        if entry["needs_rollback"]:
            entry["rollback_command"] = rollback_command(entry)
            if entry["run"]["kind"] == "rollback":
                # What a user most likely wants is the rollback done, not undone.
                entry["rerun_command"] = (f"python {PROG} rollback "
                                          f"{Path(str(entry['run']['file'])).name}")
    if args.json:
        emit(json.dumps(entries, indent=2))
        return EXIT_OK
    if not entries:
        emit(f"no safety backups in {Path(data_dir) / SAFETY_DIR}")
        return EXIT_OK
    for entry in entries:
        created = datetime.datetime.fromisoformat(entry["created_at"])
        contents = (f"{entry['tables']} tables  {entry['rows']} rows" if entry["status"] == "ok"
                    else entry["status"])
        emit(f"{entry['file']}  {local_time(created)} ({age_text(entry['age_days'])})  "
              f"{human_size(entry['bytes'])}  {contents}")
        run = entry["run"]
        if run is None:
            emit("    no restore or rollback log in summaries/ names this file")
        else:
            what = "before" if run["role"] == "protected" else "the tables after"
            emit(f"    {what} {run['kind']} of {Path(str(run['file'])).name}: {run['outcome']} "
                  f"({run['log']})")
        if entry["rolled_back_by"]:
            emit(f"    rolled back to by: {', '.join(entry['rolled_back_by'])}")
        if entry.get("rerun_command"):
            emit(f"    the rollback did not finish; to finish it run again: "
                  f"{entry['rerun_command']}; or, to return to the state before it: "
                  f"{entry['rollback_command']}")
        elif entry["needs_rollback"]:
            emit(f"    the tables may be partly restored; to return to this state run: "
                  f"{entry['rollback_command']}")
    return EXIT_OK


def cmd_cleanup_safety(args):
    """Delete old safety backups, never the newest nor one a user may still need."""
    setup_local_run(args)
    data_dir = local_data_dir(args)
    if not (data_dir / SAFETY_DIR).is_dir():
        emit(f"no safety backups in {data_dir / SAFETY_DIR}")
        return EXIT_OK
    with data_lock(data_dir, "cleanup-safety"):
        entries = safety_inventory(data_dir)  # we hold the lock: no other run is going on
        deleted, kept, freed = delete_old_safety_backups(entries, args)
        if deleted and not args.dry_run:
            collect_objects(data_dir / SAFETY_DIR)
    verb = "would delete" if args.dry_run else "deleted"
    if args.json:
        emit(json.dumps({"dry_run": args.dry_run, "older_than_days": args.older_than,
                          "deleted": [e["file"] for e in deleted], "bytes_freed": freed,
                          "kept": {e["file"]: why for e, why in kept}}, indent=2))
        return EXIT_OK
    for entry in deleted:
        emit(f"{verb} {entry['file']} ({human_size(entry['bytes'])}, "
              f"{age_text(entry['age_days'])})")
    for entry, why in kept:
        emit(f"kept {entry['file']}: {why}")
    emit(f"{verb} {len(deleted)} safety backup(s) older than {args.older_than} days, "
          f"{human_size(freed)} {'would be ' if args.dry_run else ''}freed; "
          f"{len(entries) - len(deleted)} kept")
    return EXIT_OK


def delete_old_safety_backups(entries, args):
    """cleanup-safety's choice, under the data lock: each safety backup older than
    --older-than deleted (not under --dry-run) or kept for one reason. Returns (the entries
    deleted, [(entry, why it was kept)], the bytes freed)."""
    deleted, kept, freed = [], [], 0
    # The newest snapshot taken before a run (not a failed-state one): what the data was last
    # known good as.
    newest = next((e for e in entries if e["kind"] == "safety_backup"), None)
    for entry in entries:
        if entry["age_days"] < args.older_than:
            continue
        if entry is newest:
            kept.append((entry, "the newest safety backup is always kept"))
            continue
        run = entry["run"] or {}
        needed = entry["needs_rollback"] or (
            run.get("role") == "failed_state_of" and OUTCOMES.get(run["status"], (None, True))[1])
        if needed and not args.force:
            kept.append((entry, f"its {run.get('kind', 'restore')} {run.get('outcome', '')}; it "
                                f"may be needed to recover (--force deletes it anyway)"))
            continue
        if not args.dry_run:
            try:
                Path(entry["path"]).unlink()
            except OSError as exc:
                kept.append((entry, f"could not delete it: {exc.strerror or exc}"))
                continue
        deleted.append(entry)
        freed += entry["bytes"]
    return deleted, kept, freed


def cmd_prune(args):
    """Apply the retention rules to backups/ and the off-site copies, without a backup."""
    policy = RetentionPolicy.from_args(args)
    setup_local_run(args)
    settings = local_settings()
    remote = backup_remote(args, settings)
    folder = local_data_dir(args) / BACKUP_DIR
    client = s3_client(settings) if remote else None
    report = {"dry_run": args.dry_run, "local": None, "remote": None}
    lines = []
    if folder.is_dir():
        with data_lock(local_data_dir(args), "prune"):
            plan, deleted = apply_retention(folder, policy, dry_run=args.dry_run)
        report["local"] = prune_report("folder", str(folder), plan, deleted, args.dry_run)
        lines += retention_lines(str(folder) + "/", plan, args.dry_run)
    if remote:
        plan, deleted = apply_remote_retention(client, remote, policy, dry_run=args.dry_run)
        report["remote"] = prune_report("location", remote.url(), plan, deleted, args.dry_run)
        lines += retention_lines(remote.url(), plan, args.dry_run)
    if args.json:
        emit(json.dumps(report, indent=2))
        return EXIT_OK
    for line in lines:
        emit(line)
    for side in (report["local"], report["remote"]):
        if side is not None:
            log.info("%s: %d kept, %d %s", side.get("folder") or side["location"],
                     len(side["kept"]), len(side["deleted"]),
                     "would be deleted (dry run)" if args.dry_run else "deleted")
    return EXIT_OK


def prune_report(side, where, plan, deleted, dry_run):
    """One side of prune's report (side "folder": backups/; "location": the off-site copies):
    each kept backup with its reasons, and the backups deleted (under --dry-run, those that
    would be)."""
    return {side: where, "kept": {name: reasons for name, reasons in plan if reasons},
            "deleted": [name for name, reasons in plan if not reasons] if dry_run else deleted}


def cmd_diff(args):
    """Compare a backup file with the live data, table by table."""
    config, paths = begin_run(args)
    check_key_role(config)
    source = args.file
    if not is_remote(source):
        source = find_backup_file(args.file, config.data_dir)
    with readable_backup(source, config.settings, args.identity, config.data_dir) as backup:
        return diff_backup(args, config, backup)


# Why complex: refusals before any request (names that are not tables, names not in the file),
# the comparison with the connection closed after it, then JSON or text, and the exit code for
# differences or none. It is cmd_diff's body once the file is readable; each branch is an outcome
# the user sees, in the order they happen.
def diff_backup(args, config, backup):
    """diff for a readable backup (see cmd_diff)."""
    path = backup.path
    log.info("reading %s", backup.shown)
    header, in_file = check_backup(path)
    tables = args.tables or list(only_tables(in_file))
    entries = [name for name in tables if name in in_file and entry_kind(in_file[name]["meta"])]
    if entries:
        raise ValidationError(f"{', '.join(entries)} in {path.name} is not a table (its kind: "
                              f"{in_file[entries[0]]['meta']['kind']}); diff compares tables")
    missing = [name for name in tables if name not in in_file]
    if missing:
        raise ValidationError(f"{', '.join(missing)} not in {path.name} (it holds "
                              f"{', '.join(in_file) or 'no table'}); check --tables")
    api = connect_project(config, args.jobs)
    try:
        live = discover_tables(api.openapi())
        results = diff_tables(api, path, tables, live)
    finally:
        api.close()
    differing = {name: r for name, r in results.items() if has_differences(r)}
    if args.json:
        emit(json.dumps({"file": backup.shown, "created_at": header.get("created_at"),
                          "identical": not differing, "tables": results}, indent=2))
    else:
        for name, result in differing.items():
            emit(diff_text(name, result))
    compared = sum(r["file_rows"] for r in results.values())
    if differing:
        log.info("%d of %d table(s) differ from %s", len(differing), len(results), path.name)
        return EXIT_DIFFERENCES
    log.info("no differences: %d table(s), %d rows of %s equal the live data", len(results),
             compared, path.name)
    return EXIT_OK


def diff_text(name, result):
    """The lines diff prints for one table that differs."""
    if result.get("missing_live"):
        return f"{name}: the table no longer exists in the project ({result['file_rows']} rows " \
               f"in the file)"
    lines = [f"{name}: {result['file_rows']} rows in the file, {result['live_rows']} live"
             + (f" (compared as {result['compared_as']})" if result.get("compared_as") else "")]
    if result["columns_only_in_file"]:
        lines.append(f"  columns only in the file: {', '.join(result['columns_only_in_file'])}")
    if result["columns_only_live"]:
        lines.append(f"  columns only live: {', '.join(result['columns_only_live'])}")
    for label, count, keys in (("only in the file", "only_in_file", "only_in_file_keys"),
                               ("only live", "only_live", "only_live_keys"),
                               ("changed", "changed", "changed_keys")):
        if result[count]:
            shown = result[keys]
            columns = result.get("changed_columns", {}) if count == "changed" else {}
            examples = ", ".join(k + (f" ({', '.join(columns[k])})" if columns.get(k) else "")
                                 for k in shown)
            more = ", ..." if result[count] > len(shown) else ""
            lines.append(f"  {label}: {result[count]}"
                         + (f"  keys {examples}{more}" if shown else ""))
    return "\n".join(lines)


# --- 27. Command line -----------------------------------------------------------------------------

def table_list(text):
    """argparse type: 'a, b,c' -> ['a', 'b', 'c'], refusing empty names."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty table name in {text!r}; "
                                         f"separate names with commas")
    return list(dict.fromkeys(names))


def positive_int(text):
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def jobs_count(text):
    """argparse type of --jobs: 1 to MAX_JOBS."""
    value = positive_int(text)
    if value > MAX_JOBS:
        raise argparse.ArgumentTypeError(f"at most {MAX_JOBS} requests at once, not {value}: "
                                         f"more only wait for the project's database "
                                         f"connections")
    return value


def add_jobs_argument(parser):
    """--jobs, shared by the commands that read or write many rows."""
    parser.add_argument("--jobs", type=jobs_count, default=DEFAULT_JOBS, metavar="N",
                        help=f"requests in flight at once (default {DEFAULT_JOBS}; 1 to "
                             f"{MAX_JOBS}): more is faster across the internet, 1 is gentlest "
                             f"on a busy shared project")


def add_global_arguments(parser, in_command=False):
    """--data-dir, --quiet, --verbose: accepted before the command and also after it."""
    # After the command the defaults are SUPPRESS, so that an option given before it is kept.
    default = argparse.SUPPRESS if in_command else None
    flag_default = argparse.SUPPRESS if in_command else False
    group = parser.add_argument_group("global options")
    group.add_argument("--data-dir", metavar="DIR", default=default,
                       help="folder holding backups/, safety_backups/, summaries/ and logs/ "
                            "(default: SUPABASE_BACKUP_DIR, else the script's folder)")
    group.add_argument("-q", "--quiet", action="store_true", default=flag_default,
                       help="print only errors (for cron)")
    group.add_argument("-v", "--verbose", action="store_true", default=flag_default,
                       help="print debug detail")


def add_json_argument(parser):
    """--json: a machine-readable summary on stdout."""
    parser.add_argument("--json", action="store_true",
                        help="print a machine-readable summary on stdout")


def add_write_guard_arguments(parser):
    """--dry-run and --yes, shared by the commands that write to the database."""
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything and print the per-table plan; write nothing")
    parser.add_argument("--yes", action="store_true",
                        help="answer yes to the confirmation question "
                             "(required when not on a terminal)")


def add_accept_json_null_argument(parser):
    """--accept-json-null, shared by restore and rollback."""
    parser.add_argument("--accept-json-null", action="store_true",
                        help="go on where a json/jsonb column holds JSON null (not SQL NULL) in "
                             "a row to write: the API can only store SQL NULL there (refused "
                             "without this option, naming table, column and rows)")


def add_identity_argument(parser):
    """--identity, shared by the commands that read backups."""
    parser.add_argument("--identity", metavar="FILE",
                        help="the age identity file (from age-keygen) that decrypts .age backups "
                             "(default: BACKUP_AGE_IDENTITY)")


def add_retention_arguments(parser, after="after a complete backup, "):
    """--keep, --keep-days and the calendar rules, shared by backup and prune."""
    parser.add_argument("--keep", type=positive_int, metavar="N",
                        help=f"{after}keep only the newest N backups in backups/")
    parser.add_argument("--keep-days", type=positive_int, metavar="D",
                        help=f"{after}delete backups older than D days")
    for period, what in (("last", "the newest N backups"),
                         ("daily", "the newest backup of each of the last N days that have one"),
                         ("weekly", "the newest backup of each of the last N ISO weeks"),
                         ("monthly", "the newest backup of each of the last N months")):
        parser.add_argument(f"--keep-{period}", type=positive_int, metavar="N",
                            help=f"keep {what} (restic's rule; a backup any rule keeps stays, "
                                 f"the rest is deleted, locally and off-site)")


def add_command(subparsers, name, handler, summary, examples):
    """A subcommand parser with its summary, an Examples epilog and the global options."""
    parser = subparsers.add_parser(
        name, help=summary, description=summary[:1].upper() + summary[1:] + ".",
        epilog="Examples:\n" + "\n".join(f"  python {PROG} {example}" for example in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=handler)
    add_global_arguments(parser, in_command=True)
    return parser


def build_parser():
    """The command line: global options, then one subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Examples:\n"
               f"  python {PROG} --quiet backup --keep 14     # nightly, from cron\n"
               f"  python {PROG} restore --safe --dry-run --file supabase_backup_20251128_074723"
               f".json.gz\n"
               f"  python {PROG} list-safety                  # after a bad restore\n\n"
               f"Run 'python {PROG} COMMAND --help' for the options and examples of a command.\n"
               f"README.md and SAFETY.md tell the rest.")
    parser.add_argument("--version", action="version",
                        version=f"supabase_backup {TOOL_VERSION} "
                                f"(backup format {FORMAT_NAME} v{FORMAT_VERSION})")
    add_global_arguments(parser)
    # The commands are listed once, in the description (the docstring), not again here.
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND",
                                       help=argparse.SUPPRESS)
    add_backup_parser(subparsers)
    add_check_parser(subparsers)
    add_list_parser(subparsers)
    add_prune_parser(subparsers)
    add_restore_parser(subparsers)
    add_rollback_parser(subparsers)
    add_list_safety_parser(subparsers)
    add_cleanup_safety_parser(subparsers)
    add_diff_parser(subparsers)
    return parser


def add_backup_parser(subparsers):
    """The backup command and its options."""
    backup = add_command(
        subparsers, "backup", cmd_backup,
        "back up tables to a .json.gz file in backups/",
        ["backup", "--quiet backup --keep 14",
         "backup --tables users,packages,bookings --output /mnt/offsite/today.json.gz",
         "backup --exclude audit_log --json",
         "--quiet backup --auth --keep 14     # tables and auth users",
         "--quiet backup --storage --keep 30     # tables, Storage buckets and objects",
         "--quiet backup --encrypt-to age1... --to s3://my-bucket/supabase/ --keep-daily 7 "
         "--keep-weekly 5 --keep-monthly 12 --ping https://hc-ping.com/UUID"])
    backup.add_argument("--tables", type=table_list, action="extend", metavar="A,B",
                        help="back up only these tables (default: BACKUP_TABLES, else every table "
                             "the service role sees)")
    backup.add_argument("--exclude", type=table_list, action="extend", metavar="C",
                        help="leave these tables out of the discovered ones (comma-separated, "
                             "repeatable)")
    backup.add_argument("--output", metavar="PATH",
                        help="write the backup here instead of backups/ (a file or a folder)")
    backup.add_argument("--force", action="store_true",
                        help="let --output replace a file that exists")
    backup.add_argument("--storage", action="store_true",
                        help="also back up Storage: every bucket and object, the objects kept "
                             "once each in backups/objects/ (default: BACKUP_STORAGE=1)")
    add_retention_arguments(backup)
    backup.add_argument("--encrypt-to", metavar="RECIPIENT",
                        help="encrypt the backup to this age public key (age1..., comma-separated "
                             "for several): backups/...json.gz.age, readable by `age -d` "
                             "(default: BACKUP_ENCRYPT_TO)")
    backup.add_argument("--to", metavar="s3://BUCKET/PREFIX/",
                        help="copy the complete backup to S3-compatible storage (default: "
                             "BACKUP_REMOTE); credentials and endpoint from the AWS_* settings")
    backup.add_argument("--ping", type=ping_url, metavar="URL",
                        help="heartbeat: ping URL/start, then URL on success or URL/fail "
                             "(default: BACKUP_PING_URL)")
    backup.add_argument("--auth", action="store_true", default=None,
                        help="also back up every auth user through the auth admin API, as the "
                             "entry auth.users (default: BACKUP_AUTH=1); the API gives no "
                             "password hashes (see SAFETY.md)")
    backup.add_argument("--allow-rls-limited", action="store_true",
                        help="accept a key that is not the service role; row level security may "
                             "then hide rows (the file and the log say so); needs --tables")
    add_json_argument(backup)
    add_jobs_argument(backup)


def add_check_parser(subparsers):
    """The check command and its options."""
    check = add_command(
        subparsers, "check", cmd_check,
        "verify a backup file offline: structure, row counts and checksums of every table",
        ["check --file supabase_backup_20251128_074723.json.gz",
         "check --file /mnt/offsite/today.json.gz --json"])
    check.add_argument("--file", required=True, metavar="FILE",
                       help="the backup to check: a path, a file name in backups/, or "
                            "s3://bucket/prefix/NAME")
    add_identity_argument(check)
    add_json_argument(check)


def add_list_parser(subparsers):
    """The list command and its options."""
    listing = add_command(subparsers, "list", cmd_list,
                          "list the backups in backups/ (or a folder, or at s3://bucket/prefix/), "
                          "newest first, with tables and rows",
                          ["list", "list --json", "list s3://my-bucket/supabase/",
                           "list --identity ~/.config/age/backup.txt"])
    listing.add_argument("location", nargs="?", metavar="WHERE",
                         help="a folder, or s3://bucket/prefix/ (default: backups/)")
    add_identity_argument(listing)
    add_json_argument(listing)


def add_prune_parser(subparsers):
    """The prune command and its options."""
    prune = add_command(
        subparsers, "prune", cmd_prune,
        "delete the backups the retention rules do not keep, in backups/ and off-site",
        ["prune --keep-daily 7 --keep-weekly 5 --keep-monthly 12 --dry-run",
         "prune --keep-last 30 --remote s3://my-bucket/supabase/"])
    add_retention_arguments(prune, after="")
    prune.add_argument("--remote", dest="to", metavar="s3://BUCKET/PREFIX/",
                       help="also apply the rules to the backups there (default: BACKUP_REMOTE)")
    prune.add_argument("--dry-run", action="store_true",
                       help="print what would be deleted, and why each kept backup is kept; "
                            "delete nothing")
    add_json_argument(prune)


def add_restore_parser(subparsers):
    """The restore command and its options."""
    restore = add_command(
        subparsers, "restore", cmd_restore,
        "restore a backup file; with --safe behind a safety backup and an automatic rollback",
        ["restore --safe --file supabase_backup_20251128_074723.json.gz",
         "restore --safe --dry-run --file supabase_backup_20251128_074723.json.gz",
         "restore --safe --tables bookings --critical users,packages,bookings --file FILE",
         "restore --safe --auth --file FILE     # auth users first, then the tables",
         "restore --safe --storage --dry-run --file FILE   # Storage too: the plan"])
    restore.add_argument("--file", required=True, metavar="FILE",
                         help="the backup to restore: a path, a file name in backups/, or "
                              "s3://bucket/prefix/NAME")
    add_identity_argument(restore)
    restore.add_argument("--safe", action="store_true",
                         help="take a safety backup first and roll back automatically if the "
                              "restore fails (recommended)")
    add_write_guard_arguments(restore)
    restore.add_argument("--tables", type=table_list, action="extend", metavar="A,B",
                         help="restore only these tables")
    restore.add_argument("--storage", action="store_true",
                         help="also restore the file's Storage buckets and objects: upload the "
                              "missing and differing ones (none is deleted); without it they "
                              "are left alone")
    restore.add_argument("--critical", type=table_list, action="extend", metavar="A,B",
                         help="tables that must be present and non-empty in the backup "
                              "(default: CRITICAL_TABLES, else none)")
    restore.add_argument("--ignore-columns", type=table_list, action="extend", metavar="C",
                         help="columns left out of verification, e.g. updated_at kept current by "
                              "a trigger (default: VERIFY_IGNORE_COLUMNS)")
    restore.add_argument("--auth", action="store_true",
                         help="also restore the file's auth users: create those the project "
                              "lacks (original id, email, phone, metadata, confirmed state), "
                              "before the tables; never deletes a user (see SAFETY.md for what "
                              "cannot come back)")
    restore.add_argument("--update-users", action="store_true",
                         help="with --auth: also put back the user and app metadata of users "
                              "that exist but differ from the file")
    restore.add_argument("--no-rollback", action="store_true",
                         help="on failure keep what was restored instead of rolling back "
                              "(the safety backup stays available for rollback)")
    add_accept_json_null_argument(restore)
    add_json_argument(restore)
    add_jobs_argument(restore)


def add_rollback_parser(subparsers):
    """The rollback command and its options."""
    rollback = add_command(
        subparsers, "rollback", cmd_rollback,
        "bring tables back to exactly the state in a safety backup (its own safety backup first)",
        ["rollback safety_backup_20251128_074820.json.gz",
         "rollback --dry-run safety_backup_20251128_074820.json.gz",
         "list-safety   (shows which file to roll back to)"])
    rollback.add_argument("file", metavar="FILE",
                          help="the safety backup: a file name in safety_backups/, a path, or "
                               "s3://bucket/prefix/NAME")
    add_identity_argument(rollback)
    rollback.add_argument("--dry-run", action="store_true",
                          help="print per table the rows that would be inserted, updated and "
                               "deleted; write nothing")
    rollback.add_argument("--yes", action="store_true",
                          help="do not ask before writing (on a terminal a rollback shows its "
                               "plan and asks; elsewhere it never asks)")
    rollback.add_argument("--tables", type=table_list, action="extend", metavar="A,B",
                          help="roll back only these tables of the file")
    rollback.add_argument("--ignore-columns", type=table_list, action="extend", metavar="C",
                          help="columns left out of verification, e.g. updated_at kept current "
                               "by a trigger (default: VERIFY_IGNORE_COLUMNS)")
    add_accept_json_null_argument(rollback)
    add_json_argument(rollback)
    add_jobs_argument(rollback)


def add_list_safety_parser(subparsers):
    """The list-safety command and its options."""
    list_safety = add_command(
        subparsers, "list-safety", cmd_list_safety,
        "list the safety backups, newest first, with the restore each protected and its outcome",
        ["list-safety", "list-safety --json"])
    add_identity_argument(list_safety)
    add_json_argument(list_safety)


def add_cleanup_safety_parser(subparsers):
    """The cleanup-safety command and its options."""
    cleanup = add_command(
        subparsers, "cleanup-safety", cmd_cleanup_safety,
        "delete old safety backups, never the newest nor one whose restore failed or was "
        "interrupted",
        ["cleanup-safety --dry-run", "cleanup-safety --older-than 30",
         "cleanup-safety --older-than 1 --force"])
    cleanup.add_argument("--older-than", type=positive_int, default=7, metavar="DAYS",
                         help="delete safety backups older than DAYS days (default: 7)")
    cleanup.add_argument("--dry-run", action="store_true",
                         help="print what would be deleted; delete nothing")
    cleanup.add_argument("--force", action="store_true",
                         help="also delete the safety backups of failed or interrupted restores "
                              "(never the newest)")
    add_json_argument(cleanup)


def add_diff_parser(subparsers):
    """The diff command and its options."""
    diff = add_command(
        subparsers, "diff", cmd_diff,
        "compare a backup (or safety backup) with the live data; exit 10 when they differ",
        ["diff --file supabase_backup_20251128_074723.json.gz",
         "diff --file safety_backup_20251128_074820.json.gz --tables bookings --json"])
    diff.add_argument("--file", required=True, metavar="FILE",
                      help="a path, a file name in backups/ or safety_backups/, or "
                           "s3://bucket/prefix/NAME")
    add_identity_argument(diff)
    diff.add_argument("--tables", type=table_list, action="extend", metavar="A,B",
                      help="compare only these tables of the file")
    add_json_argument(diff)
    add_jobs_argument(diff)


# Why complex: one flat list of usage mistakes argparse cannot see (options that need or exclude
# others, a bare run, retention rules that clash or are missing, a --to that is not an off-site
# URL), each one condition and one parser.error. STYLE.md wants them checked in one place after
# parsing.
def check_usage(parser, args):
    """Usage mistakes argparse cannot see by itself; each one exits 2 through parser.error."""
    if getattr(args, "update_users", False) and not args.auth:
        parser.error("--update-users applies to the auth users a restore writes: add --auth")
    if args.command is None:
        # A bare run: the whole help (the commands, examples, exit codes), not just "COMMAND
        # is required".
        parser.print_help(sys.stderr)
        parser.exit(EXIT_USAGE)
    if args.quiet and args.verbose:
        parser.error("--quiet and --verbose cannot be used together")
    if args.command == "backup" and args.tables and args.exclude:
        parser.error("--exclude applies to the discovered tables; with --tables, "
                     "name only the tables you want")
    if args.command in ("backup", "prune"):
        policy = RetentionPolicy.from_args(args)
        if policy.calendar and (policy.keep or policy.keep_days):
            parser.error("--keep/--keep-days cannot be combined with --keep-last/--keep-daily/"
                         "--keep-weekly/--keep-monthly (--keep N is --keep-last N)")
        if args.command == "prune" and not policy.active:
            parser.error("prune needs a rule: --keep-last, --keep-daily, --keep-weekly, "
                         "--keep-monthly, --keep or --keep-days")
    if getattr(args, "to", None) and not is_remote(args.to):
        parser.error(f"--to/--remote takes an s3://bucket/prefix/ URL, not {args.to!r}")


def one_line(text, limit=300):
    """Text squeezed onto one line of at most limit characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fallback_log_file(args):
    """Start the log file for a failure that came before the command started it; or None."""
    try:
        settings = merge_settings(setting_layers())
    except Exception:  # e.g. an unreadable .env: the environment alone then places the data folder
        settings = os.environ
    try:
        return attach_log_file(resolve_data_dir(args, settings) / LOG_DIR)
    except Exception:
        return None


def report_internal_error(args, exc):
    """One line on stderr naming the log file; the traceback goes into the log file only."""
    log_file = current_log_file() or fallback_log_file(args)
    summary = f"unexpected internal error: {type(exc).__name__}: {one_line(exc)}"
    if log_file is None:
        log.error("%s (no log file could be written, so the traceback follows)", summary,
                  exc_info=True)
        return
    log.error("%s", summary, exc_info=True, extra={FILE_ONLY: True})
    log.error("%s; this is a bug, please report it with the traceback from %s", summary, log_file)


def main(argv=None):
    """Run the command line; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_usage(parser, args)
    except SystemExit as exc:  # --help, --version and usage errors: argparse has printed them
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    setup_console_logging(quiet=args.quiet, verbose=args.verbose)
    try:
        return args.func(args)
    except Cancelled as exc:
        log.info("%s", exc)
        return EXIT_OK
    except BackupError as exc:
        log.error("%s", exc)
        return json_error(args, exc, exc.exit_code)
    except KeyboardInterrupt:
        progress.close()
        log.error("interrupted (Ctrl-C)")
        return json_error(args, "interrupted (Ctrl-C)", EXIT_INTERRUPTED)
    except Exception as exc:
        report_internal_error(args, exc)
        return json_error(args, f"unexpected internal error: {type(exc).__name__}: "
                                f"{one_line(exc)}", EXIT_INTERNAL)
    finally:
        progress.close()
        close_logging()


def json_error(args, error, exit_code):
    """With --json, a failure is a JSON document on stdout too ({"error", "exit_code"}), so that
    a script reading stdout can tell it from a result; returns exit_code."""
    if getattr(args, "json", False):
        emit(json.dumps({"error": redactor.redact(one_line(error, 2000)),
                         "exit_code": exit_code}))
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
