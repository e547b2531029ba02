"""The type matrix (issue 12, deliverable 6): every kind of value PostgreSQL ships that the API can
carry comes back EXACTLY through backup, restore, rollback and diff.

"Exactly" is PostgreSQL's own text of the value: for each table, the multiset of
`SELECT t::text, t.col1::text, t.col2::text, ... FROM tbl AS t` read through psycopg (never
through the tool) must be identical before and after. tests/types_schema.sql holds the tables:
more than 40 kinds of column and key, each value at an edge, awkward names, a 5 MB value, JSON
nested 2,000 levels, a table without a primary key holding duplicate rows, a partitioned table and
foreign-key cycles.

Some values cannot be carried by the API, and a restore must refuse them before writing anything
(exit 7, naming the table and the column): JSON `null` as the whole value of a json/jsonb column
(the API writes it as SQL NULL; `--accept-json-null` goes on anyway and logs it); three more json
values that PostgREST's json_to_recordset cannot write as they are (spaces around the value, the
escapes of a bare string, an escaped NUL); and a NOT NULL foreign-key cycle whose rows refer to
each other (each request is its own transaction).

The stack is this module's own (tests/local_supabase.py over an empty schema, the type schema
loaded, a row cap of 7 so that every table of more than 7 rows is read in pages): the `stack`
fixture below stands in for conftest's, so conftest's `db` and `data` use it. After each test the
tables are put back exactly as loaded, from a copy in a schema the API does not serve.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from helpers import (  # noqa: E402
    OUTLASTS_RETRIES, error_line, make_backup, restore_log, run, safety_backup, write_requests)
from local_supabase import LocalSupabase  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:supabase")

TYPES_SCHEMA = Path(__file__).resolve().parent / "types_schema.sql"
MAX_ROWS = 7  # the API's row cap here: tables of more than 7 rows are read in pages
WEIRD = 'Weird "Table", with.dots'
OPTIONAL_TABLES = {"t_citext"}  # only where the citext extension is available

# The tables, in groups closed under foreign keys (TRUNCATE ... CASCADE empties a whole group).
CARRIABLE_GROUPS = [
    ("t_integers",), ("t_numerics",), ("t_floats",), ("t_money",), ("t_texts",),
    ("t_big_text",), ("t_bytea",), ("t_bool",), ("t_datetimes",), ("t_times",), ("t_network",),
    ("t_bits",), ("t_text_search",), ("t_xml",), ("t_geometry",), ("t_ranges",),
    ("t_multiranges",), ("t_system",), ("t_citext",), ("t_arrays",), ("t_enums",),
    ("t_domains",), ("t_composites",), ("t_json",), ("t_json_deep",), (WEIRD,), ("select",),
    ("Ünïcødé 表 🎉",), ("t_text_keys", "t_text_key_refs"), ("t_float_keys",),
    ("t_numeric_keys",), ("t_uuid_keys",), ("t_date_keys",), ("t_serial_keys",),
    ("t_composite_keys", "t_composite_key_children"), ("t_collated_keys_c",),
    ("t_collated_keys_locale",), ("t_no_pk",), ("t_partitioned",),
    ("t_cycle_a", "t_cycle_b"), ("t_chain",),
]
# (tables, the columns the refusal must name, words one of which its reason must hold)
CANNOT_CARRY = [
    (("t_json_null",), ("doc_json", "doc_jsonb"), ("null",)),
    (("t_json_outer_space",), ("doc_json",), ("space",)),
    (("t_json_string_escapes",), ("doc_json",), ("escape",)),
    (("t_json_nul",), ("doc_json",), ("\\u0000", "nul character", "nul byte", "u+0000")),
    (("t_nn_cycle_x", "t_nn_cycle_y"), ("y_id", "x_id"), ("cycle", "not null")),
]
CANNOT_CARRY_TABLES = tuple(t for tables, _, _ in CANNOT_CARRY for t in tables)
CARRIABLE_TABLES = tuple(t for group in CARRIABLE_GROUPS for t in group)
ALL_TABLES = CARRIABLE_TABLES + CANNOT_CARRY_TABLES
PARTITIONS = ("t_partitioned_low", "t_partitioned_high")


# --- reading the database through psycopg ---------------------------------------------------------

@dataclass
class Texts:
    """A table's rows as PostgreSQL's text: (row::text, col1::text, ...) as a multiset."""
    columns: tuple
    rows: Counter


def table_texts(db, table, where=None, schema="public"):
    relation = sql.Identifier(schema, table)
    columns = tuple(name for (name,) in db.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum", [relation.as_string(db)]))
    alias = "row"
    while alias in columns:  # `t::text` would read a column named t, not the row
        alias += "_"
    a = sql.Identifier(alias)
    query = sql.SQL("SELECT {a}::text{cols} FROM {rel} AS {a}{where}").format(
        a=a, rel=relation,
        cols=sql.SQL("").join(sql.SQL(", {}.{}::text").format(a, sql.Identifier(c))
                              for c in columns),
        where=sql.SQL(" WHERE ") + sql.SQL(where) if where else sql.SQL(""))
    return Texts(columns, Counter(db.execute(query).fetchall()))


def texts_of(db, tables):
    return {table: table_texts(db, table) for table in tables}


def short(value, limit=70):
    if value is None:
        return "NULL"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(value)} chars)"


def differences(table, have, want):
    """What differs between two multisets of a table's rows, in words: for a row whose first
    column is on both sides, the columns that differ, before and after."""
    lost, extra = want.rows - have.rows, have.rows - want.rows
    if not lost and not extra:
        return []
    lines = [f"{table}: {sum(lost.values())} row(s) lost or changed, "
             f"{sum(extra.values())} unexpected"]
    extra_by_first = {}
    for row in extra:
        extra_by_first.setdefault(row[1], row)
    for row in list(lost)[:4]:
        other = extra_by_first.pop(row[1], None)
        if other is None:
            lines.append(f"  lost: {short(row[0], 150)}")
            continue
        changed = [f"{name}: {short(a)} -> {short(b)}"
                   for name, a, b in zip(want.columns, row[1:], other[1:]) if a != b]
        lines.append(f"  row {want.columns[0]}={short(row[1], 40)}: " + "; ".join(changed))
    for row in list(extra_by_first.values())[:2]:
        lines.append(f"  unexpected: {short(row[0], 150)}")
    return lines


def assert_same_texts(actual, expected, what):
    problems = [line for table in expected
                for line in differences(table, actual[table], expected[table])]
    assert not problems, what + "\n" + "\n".join(problems)


def empty(db, tables):
    db.execute(sql.SQL("TRUNCATE {} CASCADE").format(
        sql.SQL(", ").join(sql.Identifier(t) for t in tables)))


def public_tables(db):
    """The tables of public as the API lists them: partitions only through their parent."""
    return {name for (name,) in db.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition")}


def foreign_key_groups(db):
    """The groups of public's tables joined by foreign keys (either way)."""
    groups = {table: {table} for table in public_tables(db)}
    for child, parent in db.execute(
            "SELECT c.relname, p.relname FROM pg_constraint f "
            "JOIN pg_class c ON c.oid = f.conrelid JOIN pg_class p ON p.oid = f.confrelid "
            "WHERE f.contype = 'f' AND f.connamespace = 'public'::regnamespace"):
        merged = groups[child] | groups[parent]
        for table in merged:
            groups[table] = merged
    return {frozenset(group) for group in groups.values()}


def tail(err, lines=4):
    return "\n".join(err.strip().splitlines()[-lines:])


def names(tables):
    return ",".join(tables)


# --- the stack --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def types_stack():
    skipped = []
    with LocalSupabase(schema="empty", sql_files=[TYPES_SCHEMA], max_rows=MAX_ROWS,
                       note=skipped.append) as stack:
        assert skipped == [], "types_schema.sql did not load whole:\n" + "\n".join(skipped)
        with psycopg.connect(stack.database_url, autocommit=True) as db:
            tables = public_tables(db)
            assert tables == set(ALL_TABLES) - (OPTIONAL_TABLES - tables)
            groups = {frozenset(g) for g in CARRIABLE_GROUPS if g[0] in tables}
            groups |= {frozenset(g) for g, _, _ in CANNOT_CARRY}
            assert foreign_key_groups(db) == groups
            stack.tables = sorted(tables)
            db.execute("CREATE SCHEMA pristine")
            for table in stack.tables:
                db.execute(sql.SQL("CREATE TABLE {} AS SELECT * FROM {}").format(
                    sql.Identifier("pristine", table), sql.Identifier("public", table)))
            stack.pristine = texts_of(db, stack.tables)
        yield stack


def put_back_pristine(stack):
    """Every table exactly as loaded (foreign keys unchecked while the rows go back)."""
    with psycopg.connect(stack.database_url, autocommit=True) as db:
        with db.transaction():
            db.execute("SET LOCAL session_replication_role = replica")
            db.execute(sql.SQL("TRUNCATE {}").format(
                sql.SQL(", ").join(sql.Identifier("public", t) for t in stack.tables)))
            for table in stack.tables:
                db.execute(sql.SQL("INSERT INTO {} SELECT * FROM {}").format(
                    sql.Identifier("public", table), sql.Identifier("pristine", table)))


@pytest.fixture
def stack(types_stack):
    """This module's stack, as conftest's `stack` fixture (so `db` and `data` use it)."""
    types_stack.faults.clear()
    types_stack.requests.clear()
    yield types_stack
    types_stack.faults.clear()
    types_stack.max_rows = MAX_ROWS
    put_back_pristine(types_stack)


def present(stack, tables):
    missing = [t for t in tables if t not in stack.tables]
    if missing:
        assert set(missing) <= OPTIONAL_TABLES
        pytest.skip(f"{', '.join(missing)}: the extension is not available in this build")
    return tables


def arm_after_first_write(monkeypatch, stack, **fault):
    """Add the fault when the first write request arrives (so that it fires after a write)."""
    faults, armed = stack.faults, []
    pick = faults.pick

    def pick_and_arm(method, table):
        if not armed and method in ("POST", "PATCH", "DELETE", "PUT"):
            armed.append(faults.add(**fault))
        return pick(method, table)

    monkeypatch.setattr(faults, "pick", pick_and_arm)
    return armed


# --- changes made after a backup -------------------------------------------------------------------

# Deletions, updates (many of them visible only in the exact text: 1.50 -> 1.5, -0 -> 0, a lower
# bound, 1 day -> 24:00:00) and additions in every table the API can carry but t_citext.
CHANGES = [
    "DELETE FROM t_integers WHERE id = 2",
    "UPDATE t_numerics SET n = 1.5 WHERE id = 3",
    "UPDATE t_numerics SET n = n + 1 WHERE id = 9",
    "UPDATE t_floats SET d = 0, r = 0 WHERE id = 1",
    "DELETE FROM t_floats WHERE id = 2",
    "UPDATE t_money SET m = 0 WHERE id = 1",
    "UPDATE t_texts SET t = 'trail' WHERE id = 8",
    "DELETE FROM t_texts WHERE id = 3",
    "UPDATE t_big_text SET body = overlay(body PLACING 'X' FROM 2500000 FOR 1) WHERE id = 1",
    "DELETE FROM t_bytea WHERE id = 3",
    "UPDATE t_bool SET b = NOT b WHERE id IN (1, 2)",
    "UPDATE t_datetimes SET ts = '2024-01-01 00:00:00' WHERE id = 5",
    "DELETE FROM t_datetimes WHERE id = 1",
    "UPDATE t_times SET i = '24:00:00' WHERE id = 5",
    "UPDATE t_network SET ip = '192.168.0.1' WHERE id = 1",
    "DELETE FROM t_bits WHERE id = 3",
    "UPDATE t_text_search SET v = 'a' WHERE id = 2",
    "UPDATE t_xml SET x = '<a/>' WHERE id = 1",
    "DELETE FROM t_geometry WHERE id = 2",
    "UPDATE t_ranges SET n = '[1.5,2.5]' WHERE id = 3",
    "DELETE FROM t_multiranges WHERE id = 2",
    "DELETE FROM t_system WHERE id = 2",
    "UPDATE t_arrays SET ia = '{1,2,3}', na = '{1,2.5}' WHERE id = 1",
    "UPDATE t_arrays SET ja[1] = NULL WHERE id = 1",
    "UPDATE t_enums SET mood = 'plain' WHERE id = 7",
    "UPDATE t_domains SET amount = 0 WHERE id = 1",
    "UPDATE t_composites SET p = ROW(1.5, '{\"price\": 19.9, \"n\": null}') WHERE id = 1",
    "UPDATE t_json SET doc_json = '19.9', doc_jsonb = '19.9' WHERE id = 1",
    "UPDATE t_json SET doc_json = '{\"b\":1,\"a\":2,\"a\":3}' WHERE id = 11",
    "DELETE FROM t_json_deep WHERE id = 2",
    'UPDATE "Weird ""Table"", with.dots" SET "with space" = \'changed\', "a.b" = NULL '
    'WHERE "Row ID" = 1',
    'DELETE FROM "select" WHERE "from" = \'order by\'',
    'DELETE FROM "Ünïcødé 表 🎉" WHERE "ключ" = \'🎉\'',
    "DELETE FROM t_text_key_refs WHERE id = 1",
    "DELETE FROM t_text_keys WHERE id = ' a7'",
    "UPDATE t_text_keys SET v = -1 WHERE id = 'a7 '",
    "INSERT INTO t_text_keys VALUES ('added since', 99)",
    "DELETE FROM t_float_keys WHERE k = '-0'",
    "DELETE FROM t_numeric_keys WHERE k = 1.50",
    "UPDATE t_uuid_keys SET v = 0 WHERE k = '7fffffff-ffff-ffff-ffff-ffffffffffff'",
    "DELETE FROM t_date_keys WHERE k = '4714-11-24 BC'",
    "DELETE FROM t_serial_keys WHERE id = 9223372036854775807",
    "DELETE FROM t_composite_key_children WHERE id = 2",
    "DELETE FROM t_composite_keys WHERE \"Tenant ID\" = 't,1'",
    "UPDATE t_composite_keys SET payload = 1.5 "
    "WHERE \"Tenant ID\" = ' t1' AND \"order\" = 1 AND \"a.b\" = '2020-01-01'",
    "DELETE FROM t_collated_keys_c WHERE k IN ('B', 'ä')",
    "DELETE FROM t_collated_keys_locale WHERE k IN ('B', 'ä')",
    # One of the two copies of a row of the table without a primary key.
    "DELETE FROM t_no_pk WHERE ctid = (SELECT ctid FROM t_no_pk "
    "WHERE a = 1 AND c::text = '{\"v\": 2}' LIMIT 1)",
    "INSERT INTO t_no_pk VALUES (3, 'added since', '{\"x\": 1.10}', 0, '(0,0)')",
    "DELETE FROM t_partitioned WHERE id IN (2, 150)",
    "UPDATE t_cycle_a SET b_id = NULL WHERE id = 1",
    "DELETE FROM t_cycle_b WHERE id = 1",
    "DELETE FROM t_chain WHERE id <= 10",
    "UPDATE t_chain SET parent_id = NULL WHERE id = 100",
]
# The rows CHANGES adds, which a restore leaves alone.
ADDED = {"t_text_keys": "id = 'added since'", "t_no_pk": "b = 'added since'"}


def change_everything(db):
    for statement in CHANGES:
        db.execute(statement)


def added_rows(db):
    return {table: table_texts(db, table, where) for table, where in ADDED.items()}


def plus(state, added):
    return {table: Texts(texts.columns,
                         texts.rows + (added[table].rows if table in added else Counter()))
            for table, texts in state.items()}


# --- (a) restore into emptied tables ----------------------------------------------------------------

# The table whose name holds a comma cannot be named in --tables (a comma-separated list); it is
# restored with every other table by the whole-file test below.
NAMEABLE_GROUPS = [g for g in CARRIABLE_GROUPS if not any("," in t for t in g)]


@pytest.mark.parametrize("group", NAMEABLE_GROUPS, ids="+".join)
def test_restore_into_emptied_tables_brings_every_value_back_exactly(stack, db, data, capsys,
                                                                     group):
    present(stack, group)
    path = make_backup(capsys, data, "--tables", names(group))
    before = texts_of(db, group)
    assert before == {t: stack.pristine[t] for t in group}
    empty(db, group)

    code, _, err = run(capsys, data, "restore", "--safe", "--tables", names(group),
                       "--file", path.name)

    after = texts_of(db, group)
    if code == 0:
        assert_same_texts(after, before, "exit 0, but values came back changed:")
    assert code == 0, f"the restore of a table the API can carry exited {code}:\n{tail(err)}"


def test_a_whole_backup_of_the_tables_the_api_can_carry_comes_back_exactly(stack, db, data,
                                                                           capsys):
    path = make_backup(capsys, data, "--exclude", names(CANNOT_CARRY_TABLES))
    before = texts_of(db, stack.tables)
    carriable = [t for t in stack.tables if t not in CANNOT_CARRY_TABLES]
    empty(db, carriable)

    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)

    after = texts_of(db, stack.tables)
    if code == 0:
        assert_same_texts(after, before, "exit 0, but values came back changed:")
    assert code == 0, f"the restore exited {code}:\n{tail(err)}"


@pytest.mark.parametrize("group, columns, reasons", CANNOT_CARRY,
                         ids=["+".join(g) for g, _, _ in CANNOT_CARRY])
def test_a_table_the_api_cannot_carry_is_refused_before_any_write(stack, db, data, capsys, group,
                                                                  columns, reasons):
    path = make_backup(capsys, data, "--tables", names(group))
    empty(db, group)
    stack.requests.clear()

    code, _, err = run(capsys, data, "restore", "--safe", "--tables", names(group),
                       "--file", path.name)

    writes = write_requests(stack)
    assert code == 7 and not writes, f"exit {code} after {len(writes)} write request(s) " \
        f"({', '.join(sorted({w.table for w in writes}))}):\n{tail(err)}"
    assert all(not texts.rows for texts in texts_of(db, group).values())
    line = error_line(err)
    assert any(t in line for t in group), line
    assert any(c in line for c in columns), line
    assert any(reason in line.lower() for reason in reasons), line


def test_a_whole_backup_holding_a_table_the_api_cannot_carry_is_refused_before_any_write(
        stack, db, data, capsys):
    path = make_backup(capsys, data)
    empty(db, stack.tables)
    stack.requests.clear()

    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)

    writes = write_requests(stack)
    assert code == 7 and not writes, f"exit {code} after {len(writes)} write request(s) " \
        f"({', '.join(sorted({w.table for w in writes}))}):\n{tail(err)}"
    assert all(not texts.rows for texts in texts_of(db, stack.tables).values())
    line = error_line(err)
    assert any(t in line and any(c in line for c in columns)
               for tables, columns, _ in CANNOT_CARRY for t in tables), line


def test_accept_json_null_restores_json_null_as_sql_null_and_the_log_says_so(stack, db, data,
                                                                              capsys):
    path = make_backup(capsys, data, "--tables", "t_json_null")
    # What the API can write: every value as it was, but JSON null as the whole value -> NULL.
    db.execute("CREATE SCHEMA expected")
    try:
        db.execute("CREATE TABLE expected.t_json_null AS SELECT id, "
                   "CASE WHEN json_typeof(doc_json) = 'null' THEN NULL ELSE doc_json END "
                   "AS doc_json, CASE WHEN jsonb_typeof(doc_jsonb) = 'null' THEN NULL "
                   "ELSE doc_jsonb END AS doc_jsonb FROM t_json_null")
        expected = {"t_json_null": table_texts(db, "t_json_null", schema="expected")}
    finally:
        db.execute("DROP SCHEMA expected CASCADE")
    assert expected["t_json_null"] != stack.pristine["t_json_null"]
    empty(db, ["t_json_null"])

    code, _, err = run(capsys, data, "restore", "--safe", "--accept-json-null",
                       "--tables", "t_json_null", "--file", path.name)

    assert code == 0, tail(err)
    assert_same_texts(texts_of(db, ["t_json_null"]), expected,
                      "with --accept-json-null, only JSON null may become SQL NULL:")
    log = json.dumps(restore_log(data), ensure_ascii=False)
    assert "doc_json" in log and "doc_jsonb" in log, "the restore log does not name the columns"


def read_backup(path):
    """The backup file as a user's script reads it (deep JSON needs a deeper recursion limit)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    finally:
        sys.setrecursionlimit(limit)


def test_a_backup_holds_every_table_once_and_a_partitioned_table_through_its_parent(
        stack, db, data, capsys):
    path = make_backup(capsys, data)

    document = read_backup(path)

    assert sorted(document["tables"]) == sorted(stack.tables)
    assert not set(PARTITIONS) & set(document["tables"])
    partitioned = document["tables"]["t_partitioned"]
    assert partitioned["row_count"] == len(partitioned["rows"]) == 6
    no_pk = document["tables"]["t_no_pk"]
    assert no_pk["row_count"] == len(no_pk["rows"]) == 10


def test_a_keyless_tie_larger_than_a_page_is_read_with_a_warning(stack, db, data, capsys):
    # Six rows of t_no_pk tie in every column PostgreSQL can sort (a, b, d); with pages of 3,
    # PostgreSQL may order them differently from page to page, and the person must know.
    stack.max_rows = 3
    try:
        code, _, err = run(capsys, data, "backup", "--tables", "t_no_pk")
    finally:
        stack.max_rows = MAX_ROWS
    assert code == 0, err
    assert "t_no_pk has no primary key and more rows that tie" in err
    assert "give the table a primary key" in err


# --- (b) a failed restore's automatic rollback -----------------------------------------------------

@pytest.mark.parametrize("failure", [
    "a write to t_text_key_refs fails, after its parent table t_text_keys was written",
    "a read of t_floats fails after the writes (while verifying)",
])
def test_a_restore_failing_late_is_rolled_back_to_exactly_the_state_before(
        stack, db, data, capsys, monkeypatch, failure):
    path = make_backup(capsys, data, "--exclude", names(CANNOT_CARRY_TABLES))
    change_everything(db)
    before_restore = texts_of(db, stack.tables)
    if failure.startswith("a write"):
        stack.faults.add(kind="write", table="t_text_key_refs", after=1,
                         times=OUTLASTS_RETRIES, status=500, code="XX000",
                         message="injected: write refused")
    else:
        armed = arm_after_first_write(monkeypatch, stack, kind="read", table="t_floats",
                                      times=OUTLASTS_RETRIES, status=500, code="XX000",
                                      message="injected: cannot read")
    stack.requests.clear()

    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)

    assert write_requests(stack), "the restore failed before writing anything"
    if failure.startswith("a write"):
        assert write_requests(stack, "t_text_keys"), "the parent table was not written first"
    else:
        assert armed and armed[0].fired, "the read fault did not fire"
    assert_same_texts(texts_of(db, stack.tables), before_restore,
                      f"exit {code}; the database is not as before the restore:")
    assert code == 8, f"exit {code}:\n{tail(err)}"


# --- (c) rollback after a successful restore -------------------------------------------------------

def test_rollback_after_a_successful_restore_returns_every_value_to_the_state_before(
        stack, db, data, capsys):
    path = make_backup(capsys, data, "--exclude", names(CANNOT_CARRY_TABLES))
    at_backup = texts_of(db, stack.tables)
    change_everything(db)
    added = added_rows(db)
    before_restore = texts_of(db, stack.tables)

    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)

    assert code == 0, tail(err)
    # The backup's rows are back (each row of the table without a primary key as many times as
    # the file holds it) and the rows added since are still there.
    assert_same_texts(texts_of(db, stack.tables), plus(at_backup, added),
                      "after the restore, not the backup's rows plus the rows added since:")

    code, _, err = run(capsys, data, "rollback", safety_backup(data).name)

    assert code == 0, tail(err)
    assert_same_texts(texts_of(db, stack.tables), before_restore,
                      "after the rollback, not the state before the restore:")


# --- (d) diff --------------------------------------------------------------------------------------

def test_diff_right_after_a_backup_finds_every_table_identical(stack, db, data, capsys):
    path = make_backup(capsys, data)

    code, out, err = run(capsys, data, "diff", "--file", path.name)

    assert code == 0, f"{out}\n{tail(err)}"
    assert out == ""


# Changes that only the exact text shows: equal as numbers, as JSON, as intervals, as sets...
EXACT_ONLY_CHANGES = [
    ("numeric 1.50 -> 1.5", "t_numerics", "UPDATE t_numerics SET n = 1.5 WHERE id = 3"),
    ("numeric 1.000000 -> 1", "t_numerics", "UPDATE t_numerics SET n = 1 WHERE id = 1"),
    ("real -0 -> 0", "t_floats", "UPDATE t_floats SET r = 0 WHERE id = 1"),
    ("double -0 -> 0", "t_floats", "UPDATE t_floats SET d = 0 WHERE id = 1"),
    ("jsonb 19.90 -> 19.9", "t_json", "UPDATE t_json SET doc_jsonb = '19.9' WHERE id = 1"),
    ("jsonb nested 2.200 -> 2.2", "t_json",
     "UPDATE t_json SET doc_jsonb = '[1.10, 2.2, {\"x\": 19.90}]' WHERE id = 23"),
    ("json whitespace", "t_json",
     "UPDATE t_json SET doc_json = '{\"b\":1,\"a\":2,\"a\":3}' WHERE id = 11"),
    ("json duplicate key dropped", "t_json",
     "UPDATE t_json SET doc_json = '{\"b\":1, \"a\":3}' WHERE id = 11"),
    ("json unicode escapes decoded", "t_json",
     "UPDATE t_json SET doc_json = '[\"é😀 A \\\" \\\\ /\"]' WHERE id = 12"),
    ("int[] lower bound 0 -> 1", "t_arrays", "UPDATE t_arrays SET ia = '{1,2,3}' WHERE id = 1"),
    ("numeric[] {1.000,2.50} -> {1,2.5}", "t_arrays",
     "UPDATE t_arrays SET na = '{1,2.5}' WHERE id = 1"),
    ("jsonb[] JSON null element -> SQL NULL", "t_arrays",
     "UPDATE t_arrays SET ja[1] = NULL WHERE id = 1"),
    ("interval 1 day -> 24:00:00", "t_times", "UPDATE t_times SET i = '24:00:00' WHERE id = 5"),
    ("numrange [1.50,2.500] -> [1.5,2.5]", "t_ranges",
     "UPDATE t_ranges SET n = '[1.5,2.5]' WHERE id = 3"),
    ("composite field 1.50 -> 1.5", "t_composites",
     "UPDATE t_composites SET p.amount = 1.5 WHERE id = 1"),
    ("numeric key 1.50 -> 1.5", "t_numeric_keys",
     "UPDATE t_numeric_keys SET k = 1.5 WHERE k = 1.50"),
    ("float8 key -0 -> 0", "t_float_keys", "UPDATE t_float_keys SET k = 0 WHERE k = '-0'"),
    ("one of two copies of a row deleted (no primary key)", "t_no_pk",
     "DELETE FROM t_no_pk WHERE ctid = (SELECT ctid FROM t_no_pk WHERE a = 2 LIMIT 1)"),
]


@pytest.mark.parametrize("change, table, statement", EXACT_ONLY_CHANGES,
                         ids=[c[0] for c in EXACT_ONLY_CHANGES])
def test_diff_sees_a_change_only_the_exact_text_shows(stack, db, data, capsys, change, table,
                                                      statement):
    path = make_backup(capsys, data, "--tables", table)
    before = table_texts(db, table)
    db.execute(statement)
    assert table_texts(db, table) != before, "the change changed nothing"

    code, out, err = run(capsys, data, "diff", "--file", path.name)

    assert code == 10, f"{change}: diff exited {code}\n{out}\n{tail(err)}"
    assert table in out
