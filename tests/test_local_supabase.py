"""The local Supabase stack (tests/local_supabase.py) against the real supabase client.

Every other test stands on this server, so it must answer as PostgREST answers
(../shared/POSTGREST.md) and be as strict: a lenient fake lets through what
Supabase would refuse. Each test drives it with supabase-py (or httpx where a
status code or a header must be seen) and checks the outcome in PostgreSQL
through psycopg (the `db` fixture), never through the server under test.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import http.client
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
import zlib
from pathlib import Path

import httpx
import jwt
import psycopg
import pytest
from dotenv import dotenv_values
from postgrest.exceptions import APIError

from helpers import make_client  # noqa: E402
from local_supabase import LocalSupabase

HERE = Path(__file__).resolve().parent
DUMP_SAMPLE = HERE / "fixtures" / "supabase_dump_sample.sql"
ERROR_KEYS = {"code", "details", "hint", "message"}
BOOKINGS = 5000
CAP = 1000


def demo_user_id(i: int) -> str:
    """The id of demo user i (demo_schema.sql: md5('user-' || i)::uuid)."""
    return str(uuid.UUID(hashlib.md5(f"user-{i}".encode()).hexdigest()))


def rest(stack, key: str | None) -> httpx.Client:
    """An httpx client for /rest/v1 that sends the key as supabase-py does (or no key)."""
    headers = {"apikey": key, "Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=f"{stack.url}/rest/v1", headers=headers, timeout=30)


@pytest.fixture
def api(stack):
    with rest(stack, stack.service_role_key) as http:
        yield http


@pytest.fixture
def answers(client):
    """The HTTP responses the supabase client received, as it received them."""
    seen: list[httpx.Response] = []

    def keep(response: httpx.Response) -> None:
        response.read()
        seen.append(response)

    client.postgrest.session.event_hooks["response"].append(keep)
    return seen


def column(db, sql: str, params=()) -> list:
    return [row[0] for row in db.execute(sql, params).fetchall()]


def scalar(db, sql: str, params=()):
    return db.execute(sql, params).fetchone()[0]


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    """PostgREST's error shape: the status, exactly four keys, the Proxy-Status header."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ERROR_KEYS, body
    assert body["code"] == code, body
    assert response.headers["Proxy-Status"] == f"PostgREST; error={code}"
    return body


def booking_row(db, booking_id: int, **changes) -> dict:
    """A complete bookings row as the API would take it: the stored one, changed."""
    row = db.execute(
        "SELECT to_jsonb(b) - 'created_at' - 'updated_at' FROM bookings b WHERE id = %s",
        [booking_id]).fetchone()
    if row is None:
        row = {"id": booking_id, "user_id": demo_user_id(1), "package_id": 1,
               "status": "confirmed", "travel_date": "2025-05-01", "guests": 2,
               "total_price": 500, "notes": None}
    else:
        row = row[0]
    row.update(changes)
    return row


# --- Paging and the row cap ---------------------------------------------------


def test_range_pages_past_the_cap_return_every_row_once_with_the_count(client, db, answers):
    rows, counts, offset = [], set(), 0
    while True:
        # Each page asks for more than the cap, as a naive client would.
        page = (client.table("bookings").select("*", count="exact").order("id")
                .range(offset, offset + 1499).execute())
        counts.add(page.count)
        if not page.data:
            break
        rows.extend(page.data)
        offset += len(page.data)
    assert counts == {BOOKINGS}
    assert [len(a.json()) for a in answers] == [CAP] * 5 + [0]
    assert [a.status_code for a in answers] == [206] * 6
    expected = scalar(db, "SELECT json_agg(b ORDER BY id) FROM bookings b")
    assert len({r["id"] for r in rows}) == BOOKINGS
    assert rows == expected


def test_a_limit_above_the_cap_returns_the_cap(client):
    assert len(client.table("bookings").select("id").limit(1500).execute().data) == CAP
    assert len(client.table("bookings").select("id").execute().data) == CAP


def test_the_cap_is_settable(stack, client):
    stack.max_rows = 7
    page = client.table("bookings").select("id", count="exact").order("id").execute()
    assert [r["id"] for r in page.data] == [1, 2, 3, 4, 5, 6, 7]
    assert page.count == BOOKINGS  # the count is not capped
    page = client.table("bookings").select("id").order("id").range(100, 199).execute()
    assert [r["id"] for r in page.data] == list(range(101, 108))


# --- Statuses and Content-Range -----------------------------------------------


@pytest.mark.parametrize("table, params, prefer, status, content_range, n", [
    ("bookings", {"limit": "10"}, None, 200, "0-9/*", 10),
    ("bookings", {"limit": "10"}, "count=exact", 206, "0-9/5000", 10),
    ("bookings", {"offset": "4990", "limit": "10"}, "count=exact", 206, "4990-4999/5000", 10),
    ("bookings", {"offset": "4995", "limit": "10"}, "count=exact", 206, "4995-4999/5000", 5),
    ("bookings", {}, "count=exact", 206, "0-999/5000", CAP),
    ("bookings", {"id": "lte.10"}, "count=exact", 200, "0-9/10", 10),
    ("app_settings", {}, "count=exact", 200, "0-4/5", 5),
    ("bookings", {"id": "lt.0"}, "count=exact", 200, "*/0", 0),
    ("bookings", {"id": "lt.0"}, None, 200, "*/*", 0),
    ("bookings", {"offset": "5000"}, "count=exact", 206, "*/5000", 0),
    ("bookings", {"offset": "6000"}, None, 200, "*/*", 0),
], ids=["no-count", "partial", "last-page-full", "last-page-short", "capped", "all-fit",
        "small-table", "no-rows", "no-rows-no-count", "offset-at-total", "far-offset-no-count"])
def test_status_and_content_range(api, table, params, prefer, status, content_range, n):
    headers = {"Prefer": prefer} if prefer else {}
    r = api.get(f"/{table}", params={"select": "*", **params}, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["Content-Range"] == content_range
    assert len(r.json()) == n


def test_offset_past_the_total_is_416(api, client):
    r = api.get("/bookings", params={"select": "id", "offset": "5001", "limit": "10"},
                headers={"Prefer": "count=exact"})
    body = assert_error(r, 416, "PGRST103")
    assert "5001" in body["details"] and "5000" in body["details"]
    with pytest.raises(APIError) as err:
        client.table("bookings").select("id", count="exact").range(6000, 6009).execute()
    assert err.value.code == "PGRST103"


def test_head_answers_the_count_without_a_body(api, client):
    r = api.head("/bookings", params={"select": "*"}, headers={"Prefer": "count=exact"})
    assert r.status_code == 206
    assert r.headers["Content-Range"] == "0-999/5000"
    assert r.content == b""
    res = client.table("bookings").select("*", count="exact", head=True).execute()
    assert res.count == BOOKINGS and res.data == []
    r = api.head("/app_settings", headers={"Prefer": "count=exact"})
    assert (r.status_code, r.headers["Content-Range"]) == (200, "0-4/5")


# --- Filters and ordering -----------------------------------------------------

NOTES = ['Celebrating our "anniversary" 💍', "Late check-in; arriving ~23:00",
         "Price agreed: 1,299.00 €", "Guest's passport: see C:\\docs\\pass.pdf", "null"]

FILTERS = [
    ("eq", lambda q: q.eq("status", "cancelled"), "status = 'cancelled'"),
    ("neq", lambda q: q.neq("status", "pending"), "status <> 'pending'"),
    ("gt", lambda q: q.gt("guests", 4), "guests > 4"),
    ("gte", lambda q: q.gte("travel_date", "2025-06-01"), "travel_date >= '2025-06-01'"),
    ("lt", lambda q: q.lt("total_price", 1500), "total_price < 1500"),
    ("lte-timestamptz", lambda q: q.lte("created_at", "2023-06-20T10:30:00+02:00"),
     "created_at <= '2023-06-20T10:30:00+02:00'"),
    ("in-int", lambda q: q.in_("package_id", [14, 27, 40, 300]), "package_id IN (14, 27, 40, 300)"),
    ("in-text", lambda q: q.in_("notes", NOTES), "notes = ANY(%(notes)s)"),
    ("eq-text-with-comma", lambda q: q.eq("notes", "Price agreed: 1,299.00 €"),
     "notes = 'Price agreed: 1,299.00 €'"),
    ("eq-the-text-null", lambda q: q.eq("notes", "null"), "notes = 'null'"),
    ("eq-empty-text", lambda q: q.eq("notes", ""), "notes = ''"),
    ("is-null", lambda q: q.is_("notes", None), "notes IS NULL"),
    ("not-is-null", lambda q: q.not_.is_("notes", None), "notes IS NOT NULL"),
    ("or-with-nested-and",
     lambda q: q.or_("status.eq.cancelled,and(guests.gte.5,travel_date.lt.2024-03-01)"),
     "(status = 'cancelled' OR (guests >= 5 AND travel_date < '2024-03-01'))"),
    ("or-with-quoted-value", lambda q: q.or_('notes.eq."Price agreed: 1,299.00 €",id.eq.2'),
     "(notes = 'Price agreed: 1,299.00 €' OR id = 2)"),
    ("or-with-negation-inside", lambda q: q.or_("notes.not.is.null,id.in.(1,2)"),
     "(notes IS NOT NULL OR id IN (1, 2))"),
    ("not-eq", lambda q: q.not_.eq("status", "confirmed"), "NOT (status = 'confirmed')"),
    ("not-in", lambda q: q.not_.in_("status", ["pending", "confirmed"]),
     "status NOT IN ('pending', 'confirmed')"),
    ("not-or", lambda q: q.not_.or_("guests.lt.3,notes.is.null"),
     "NOT (guests < 3 OR notes IS NULL)"),
]


@pytest.mark.parametrize("build, where", [f[1:] for f in FILTERS], ids=[f[0] for f in FILTERS])
def test_filters_select_the_rows_postgresql_selects(client, db, build, where):
    # id <= 900 keeps every answer under the cap; it also shows filters combine with AND.
    query = client.table("bookings").select("id").lte("id", 900).order("id")
    got = [r["id"] for r in build(query).execute().data]
    expected = column(db, f"SELECT id FROM bookings WHERE id <= 900 AND {where} ORDER BY id",
                      {"notes": NOTES})
    assert expected, "the case must select something"
    assert len(expected) < 900, "the case must leave something out"
    assert got == expected


def test_in_with_commas_quotes_parentheses_and_spaces(client):
    keys = ["feature,flags", 'say "hi"', "f(x)", "default currency"]
    got = client.table("app_settings").select("key").in_("key", keys).execute().data
    assert sorted(r["key"] for r in got) == sorted(keys)
    got = client.table("app_settings").select("key").not_.in_("key", keys).execute().data
    assert [r["key"] for r in got] == ["maintenance.mode"]
    got = client.table("app_settings").select("key").eq("key", 'say "hi"').execute().data
    assert got == [{"key": 'say "hi"'}]


def test_in_with_backslashes_apostrophes_and_emoji(client, db):
    names = ['O\'Brien, "Jr."', "Back\\slash C:\\Users\\31", "Zoë 🚀"]
    got = client.table("users").select("full_name").in_("full_name", names).execute().data
    assert sorted(r["full_name"] for r in got) == sorted(
        column(db, "SELECT full_name FROM users WHERE full_name = ANY(%s)", [names]))
    assert len(got) == 3


def test_is_true_and_false(client, db):
    for value, where in ((True, "is_active"), (False, "NOT is_active")):
        got = client.table("packages").select("id").is_("is_active", value).order("id").execute()
        expected = column(db, f"SELECT id FROM packages WHERE {where} ORDER BY id")
        assert expected and [r["id"] for r in got.data] == expected


ORDERS = [
    ([("notes", False, True), ("id", True, None)], "notes ASC NULLS FIRST, id DESC"),
    ([("updated_at", True, False), ("id", False, None)], "updated_at DESC NULLS LAST, id ASC"),
    ([("guests", True, None), ("notes", False, False), ("id", False, None)],
     "guests DESC, notes ASC NULLS LAST, id ASC"),
    ([("status", False, None), ("total_price", True, True), ("id", True, None)],
     "status ASC, total_price DESC NULLS FIRST, id DESC"),
]


@pytest.mark.parametrize("terms, order_by", ORDERS, ids=[o[1] for o in ORDERS])
def test_multi_column_order_matches_postgresql(client, db, terms, order_by):
    query = client.table("bookings").select("id").lte("id", 900)
    for name, desc, nullsfirst in terms:
        query = query.order(name, desc=desc, nullsfirst=nullsfirst)
    got = [r["id"] for r in query.execute().data]
    assert got == column(db, f"SELECT id FROM bookings WHERE id <= 900 ORDER BY {order_by}")


def test_order_on_unicode_text_with_nulls(client, db):
    got = (client.table("users").select("id").like("email", "user1__@*")
           .order("full_name", desc=True, nullsfirst=True).order("id").execute().data)
    expected = column(db, "SELECT id::text FROM users WHERE email LIKE %s "
                          "ORDER BY full_name DESC NULLS FIRST, id", ["user1__@%"])
    assert len(expected) == 100
    assert [r["id"] for r in got] == expected


def test_select_columns_and_values_formatted_by_postgresql(client, db):
    got = client.table("users").select("id,tags,profile,avatar,created_at").eq(
        "id", demo_user_id(12)).execute().data
    expected = scalar(db, "SELECT json_agg(u) FROM (SELECT id, tags, profile, avatar, created_at "
                          "FROM users WHERE id = %s) u", [demo_user_id(12)])
    assert got == expected
    assert got[0]["avatar"].startswith("\\x89504e47")


# --- Upserts and inserts ------------------------------------------------------


def test_upsert_updates_and_inserts_in_one_request(fresh_stack, client, db, answers):
    rows = [booking_row(db, 1, notes="changed 1"), booking_row(db, 2, notes="changed, 2"),
            booking_row(db, 6001, notes="new 6001"), booking_row(db, 6002, notes="new 6002")]
    res = client.table("bookings").upsert(rows, on_conflict="id", default_to_null=False).execute()
    assert answers[-1].status_code == 201
    assert sorted(r["id"] for r in res.data) == [1, 2, 6001, 6002]
    assert dict(db.execute("SELECT id, notes FROM bookings WHERE id IN (1, 2, 6001, 6002)")
                .fetchall()) == {1: "changed 1", 2: "changed, 2", 6001: "new 6001",
                                 6002: "new 6002"}
    assert scalar(db, "SELECT count(*) FROM bookings") == BOOKINGS + 2


def test_a_merge_that_inserts_nothing_answers_200(fresh_stack, client, db, answers):
    rows = [booking_row(db, 3, guests=6), booking_row(db, 4, guests=6)]
    client.table("bookings").upsert(rows).execute()
    assert answers[-1].status_code == 200
    assert column(db, "SELECT guests FROM bookings WHERE id IN (3, 4)") == [6, 6]
    assert scalar(db, "SELECT count(*) FROM bookings") == BOOKINGS


def test_ignore_duplicates_leaves_existing_rows_alone(fresh_stack, client, db, answers):
    before = booking_row(db, 5)
    rows = [booking_row(db, 5, notes="must not win"), booking_row(db, 6003, notes="inserted")]
    res = client.table("bookings").upsert(rows, ignore_duplicates=True).execute()
    assert answers[-1].status_code == 201
    assert [r["id"] for r in res.data] == [6003]  # only what was inserted comes back
    assert booking_row(db, 5) == before
    assert scalar(db, "SELECT notes FROM bookings WHERE id = 6003") == "inserted"
    res = client.table("bookings").upsert([booking_row(db, 5, notes="again")],
                                          ignore_duplicates=True).execute()
    assert (answers[-1].status_code, res.data) == (201, [])
    assert booking_row(db, 5) == before


def test_upsert_on_a_unique_column(fresh_stack, client, db):
    user_id = demo_user_id(5)
    res = client.table("users").upsert(
        [{"email": "user5@example.com", "full_name": "Renamed Five"},
         {"email": "newcomer@example.com", "full_name": "New Comer"}],
        on_conflict="email", default_to_null=False).execute()
    assert len(res.data) == 2
    assert scalar(db, "SELECT full_name FROM users WHERE id = %s", [user_id]) == "Renamed Five"
    assert scalar(db, "SELECT count(*) FROM users") == 2001
    assert scalar(db, "SELECT role::text FROM users WHERE email = 'newcomer@example.com'") \
        == "customer"


def test_missing_default_fills_defaults_and_without_it_a_missing_key_is_null(
        fresh_stack, client, db):
    client.table("payments").upsert(
        [{"id": 9001, "booking_id": 3, "amount": 10, "currency": "USD"},
         {"id": 9002, "booking_id": 3, "amount": 20}], default_to_null=False).execute()
    client.table("payments").upsert(
        [{"id": 9003, "booking_id": 3, "amount": 10, "currency": "USD"},
         {"id": 9004, "booking_id": 3, "amount": 20}]).execute()
    assert dict(db.execute("SELECT id, currency FROM payments WHERE id > 9000").fetchall()) == {
        9001: "USD", 9002: "EUR", 9003: "USD", 9004: None}
    # An identity key and a NOT NULL column with a default, missing from one row.
    res = client.table("bookings").insert(
        [booking_row(db, 7001, status="confirmed"),
         {k: v for k, v in booking_row(db, 0).items() if k not in ("id", "status")}],
        default_to_null=False).execute()
    # PostgREST merges each row over jsonb_build_object(column, default, ...), evaluated for
    # every row (SqlFragment.hs fromJsonBodyF): the row that brings its own id (7001) still
    # draws nextval, so the row without one gets 5002.
    assert [(r["id"], r["status"]) for r in res.data] == [(7001, "confirmed"), (5002, "pending")]
    with pytest.raises(APIError) as err:
        client.table("bookings").insert(
            [booking_row(db, 7002, status="confirmed"),
             {k: v for k, v in booking_row(db, 7003).items() if k != "status"}]).execute()
    assert err.value.code == "23502"  # status: NULL, not its default
    assert scalar(db, "SELECT count(*) FROM bookings WHERE id IN (7002, 7003)") == 0


def test_returning_minimal_gives_an_empty_body(fresh_stack, client, db, answers):
    res = client.table("bookings").upsert([booking_row(db, 6004)], returning="minimal").execute()
    assert (answers[-1].status_code, answers[-1].content, res.data) == (201, b"", [])
    assert scalar(db, "SELECT count(*) FROM bookings WHERE id = 6004") == 1


def test_an_empty_upsert_changes_nothing(fresh_stack, api, db):
    r = api.post("/bookings", json=[], headers={
        "Prefer": "return=representation,resolution=merge-duplicates"})
    assert (r.status_code, r.json()) == (200, [])
    r = api.post("/bookings", json=[], headers={"Prefer": "return=representation"})
    assert (r.status_code, r.json()) == (201, [])
    assert scalar(db, "SELECT count(*) FROM bookings") == BOOKINGS


def test_a_generated_always_column_is_refused(fresh_stack, client, db, answers):
    package = {"name": "Lisbon Again", "price": 499.0, "duration_days": 4}
    for extra in ({"id": 1}, {"nights": 3}):
        with pytest.raises(APIError) as err:
            client.table("packages").upsert([{**package, **extra}]).execute()
        assert err.value.code == "428C9"
        assert answers[-1].status_code == 400
    assert scalar(db, "SELECT count(*) FROM packages") == 300
    assert scalar(db, "SELECT name FROM packages WHERE id = 1") != "Lisbon Again"
    res = client.table("packages").insert(package).execute()
    assert (res.data[0]["id"], res.data[0]["nights"]) == (301, 3)


def test_an_unknown_column_is_pgrst204(fresh_stack, api, client, db):
    with pytest.raises(APIError) as err:
        client.table("app_settings").upsert([{"key": "k", "value": 1, "colour": "red"}]).execute()
    assert err.value.code == "PGRST204"
    r = api.post("/app_settings", json={"key": "k", "colour": "red"})
    body = assert_error(r, 400, "PGRST204")
    assert "colour" in body["message"]
    assert scalar(db, "SELECT count(*) FROM app_settings") == 5


def test_differing_keys_without_columns_is_pgrst102(fresh_stack, api, db):
    r = api.post("/app_settings", json=[{"key": "a", "value": 1}, {"key": "b"}],
                 headers={"Prefer": "return=representation"})
    assert_error(r, 400, "PGRST102")
    r = api.post("/app_settings", content=b"{not json",
                 headers={"Content-Type": "application/json"})
    assert_error(r, 400, "PGRST102")
    assert scalar(db, "SELECT count(*) FROM app_settings") == 5


@pytest.mark.parametrize("row, status, code", [
    ({"id": 1}, 409, "23505"),
    ({"id": 7100, "user_id": str(uuid.UUID(int=7))}, 409, "23503"),
    ({"id": 7101, "package_id": 999}, 409, "23503"),
    ({"id": 7102, "guests": "many"}, 400, "22P02"),
    ({"id": 7103, "status": "lost"}, 400, "22P02"),
    ({"id": 7104, "user_id": None}, 400, "23502"),
], ids=["duplicate", "fk-user", "fk-package", "bad-int", "bad-enum", "not-null"])
def test_insert_errors_map_to_postgrest_statuses(fresh_stack, client, db, answers,
                                                 row, status, code):
    with pytest.raises(APIError) as err:
        client.table("bookings").insert(booking_row(db, 7100, **row)).execute()
    assert err.value.code == code
    assert answers[-1].status_code == status
    assert set(answers[-1].json()) == ERROR_KEYS
    assert scalar(db, "SELECT count(*) FROM bookings") == BOOKINGS


def test_on_conflict_without_a_unique_constraint_is_42p10(fresh_stack, client, db, answers):
    with pytest.raises(APIError) as err:
        client.table("bookings").upsert([booking_row(db, 1)], on_conflict="notes").execute()
    assert (err.value.code, answers[-1].status_code) == ("42P10", 400)


def test_an_upsert_without_conflict_columns_is_a_plain_insert(fresh_stack, client, db, answers):
    """audit_events has no primary key: PostgREST writes no ON CONFLICT clause."""
    event = {"event": "user.login", "actor": None, "payload": {"seq": 1},
             "at": "2024-01-01T00:47:11+00:00"}
    client.table("audit_events").upsert([event, event]).execute()
    assert answers[-1].status_code == 201
    client.table("audit_events").upsert([event], ignore_duplicates=True).execute()
    assert scalar(db, "SELECT count(*) FROM audit_events") == 1503


def test_writes_through_views_are_left_to_postgresql(fresh_stack, db, api):
    body = assert_error(api.post("/booking_summary", json={"booking_id": 1}), 500, "55000")
    assert body["message"] == 'cannot insert into view "booking_summary"'
    assert_error(api.patch("/booking_summary", params={"booking_id": "eq.1"},
                           json={"guests": 1}), 500, "55000")
    assert_error(api.delete("/booking_summary", params={"booking_id": "eq.1"}), 500, "55000")
    db.execute("CREATE VIEW public.settings_view AS SELECT key, value FROM public.app_settings")
    r = api.post("/settings_view", json={"key": "via view", "value": 1},
                 headers={"Prefer": "return=representation"})
    assert (r.status_code, r.json()) == (201, [{"key": "via view", "value": 1}])
    assert api.patch("/settings_view", params={"key": "eq.via view"},
                     json={"value": 2}).status_code == 204
    assert scalar(db, "SELECT value FROM app_settings WHERE key = 'via view'") == 2
    assert api.delete("/settings_view", params={"key": "eq.via view"}).status_code == 204
    assert scalar(db, "SELECT count(*) FROM app_settings") == 5


def test_one_request_is_one_transaction(fresh_stack, client, db):
    rows = [booking_row(db, 6005), booking_row(db, 6006, package_id=999)]
    with pytest.raises(APIError):
        client.table("bookings").upsert(rows).execute()
    assert scalar(db, "SELECT count(*) FROM bookings WHERE id IN (6005, 6006)") == 0


# --- PATCH and DELETE ---------------------------------------------------------


def test_patch_changes_only_the_filtered_rows(fresh_stack, client, db):
    res = client.table("bookings").update({"notes": "patched"}).in_("id", [10, 11, 12]).execute()
    assert sorted(r["id"] for r in res.data) == [10, 11, 12]
    assert column(db, "SELECT id FROM bookings WHERE notes = 'patched' ORDER BY id") == [10, 11, 12]
    res = (client.table("bookings").update({"guests": 1}).eq("status", "cancelled")
           .lte("id", 100).execute())
    assert sorted(r["id"] for r in res.data) == column(
        db, "SELECT id FROM bookings WHERE status = 'cancelled' AND id <= 100 ORDER BY id")
    assert scalar(db, "SELECT count(*) FROM bookings WHERE guests = 1 AND status = 'cancelled' "
                      "AND id <= 100") == len(res.data) == 10


def test_delete_removes_only_the_filtered_rows(fresh_stack, client, db, answers):
    res = client.table("payments").delete().in_("id", [1, 2, 3]).execute()
    assert answers[-1].request.content == b"{}"  # the client sends a body; it is tolerated
    assert answers[-1].status_code == 200
    assert sorted(r["id"] for r in res.data) == [1, 2, 3]
    assert column(db, "SELECT id FROM payments WHERE id <= 5 ORDER BY id") == [4, 5]
    keys = ["feature,flags", 'say "hi"', "f(x)"]
    client.table("app_settings").delete().in_("key", keys).execute()
    assert column(db, "SELECT key FROM app_settings ORDER BY key") == [
        "default currency", "maintenance.mode"]
    res = client.table("payments").delete(returning="minimal").eq("id", 4).execute()
    assert (answers[-1].status_code, answers[-1].content, res.data) == (204, b"", [])
    assert scalar(db, "SELECT count(*) FROM payments") == 2996


def test_patch_and_delete_statuses_and_content_range(fresh_stack, api, db):
    r = api.patch("/payments", params={"id": "lt.0"}, json={"method": "cash"},
                  headers={"Prefer": "count=exact"})
    assert (r.status_code, r.headers["Content-Range"], r.content) == (204, "*/0", b"")
    r = api.patch("/payments", params={"id": "in.(7,8)"}, json={"method": "cash"},
                  headers={"Prefer": "return=representation,count=exact"})
    assert (r.status_code, r.headers["Content-Range"]) == (200, "0-1/2")
    assert sorted(p["id"] for p in r.json()) == [7, 8]
    r = api.request("DELETE", "/payments", params={"id": "in.(7,8,9)"}, content=b"{}",
                    headers={"Content-Type": "application/json", "Prefer": "count=exact"})
    assert (r.status_code, r.headers["Content-Range"], r.content) == (204, "0-2/3", b"")
    assert column(db, "SELECT id FROM payments WHERE id BETWEEN 6 AND 10 ORDER BY id") == [6, 10]


def test_delete_and_patch_without_a_filter_are_refused(fresh_stack, api, client, db):
    with pytest.raises(APIError) as err:
        client.table("payments").delete().execute()
    assert err.value.code == "21000"
    with pytest.raises(APIError) as err:
        client.table("payments").update({"method": "cash"}).execute()
    assert err.value.code == "21000"
    assert_error(api.request("DELETE", "/payments", content=b"{}",
                             headers={"Content-Type": "application/json"}), 400, "21000")
    assert_error(api.patch("/payments", json={"method": "cash"}), 400, "21000")
    assert scalar(db, "SELECT count(*) FROM payments") == 3000
    assert scalar(db, "SELECT count(*) FROM payments WHERE method = 'cash'") == 0


# --- PostgREST v12's grammar, bodies and schema cache -------------------------


def test_a_partition_is_not_served_and_its_parent_is_a_table(fresh_stack, db, api):
    """SchemaCache.hs leaves out partitions (relispartition); the partitioned parent is a
    table like any other, and PostgreSQL routes what is written to it."""
    db.execute("""
        CREATE TABLE public.events_log (id int, region text, note text,
                                        PRIMARY KEY (id, region)) PARTITION BY LIST (region);
        CREATE TABLE public.events_log_eu PARTITION OF public.events_log FOR VALUES IN ('eu');
        CREATE TABLE public.events_log_us PARTITION OF public.events_log FOR VALUES IN ('us');
    """)
    doc = api.get("/").json()
    assert "events_log" in doc["definitions"]
    assert set(doc["paths"]["/events_log"]) == {"get", "post", "patch", "delete"}
    assert "<pk/>" in doc["definitions"]["events_log"]["properties"]["region"]["description"]
    assert not {"events_log_eu", "events_log_us", "/events_log_eu"} & (
        set(doc["definitions"]) | set(doc["paths"]))
    assert_error(api.get("/events_log_eu"), 404, "PGRST205")
    rows = [{"id": 1, "region": "eu", "note": "a"}, {"id": 2, "region": "us", "note": "b"}]
    prefer = {"Prefer": "return=representation,resolution=merge-duplicates"}
    r = api.post("/events_log", json=rows, params={"columns": '"id","region","note"'},
                 headers=prefer)
    assert (r.status_code, r.json()) == (201, rows)
    assert db.execute("SELECT tableoid::regclass::text, id FROM public.events_log "
                      "ORDER BY id").fetchall() == [("events_log_eu", 1), ("events_log_us", 2)]
    # The same rows again: all merged, none inserted, so 200.
    r = api.post("/events_log", json=rows, params={"columns": '"id","region","note"'},
                 headers=prefer)
    assert r.status_code == 200
    r = api.patch("/events_log", params={"region": "eq.us"}, json={"note": "patched"},
                  headers={"Prefer": "return=representation"})
    assert (r.status_code, r.json()) == (200, [{"id": 2, "region": "us", "note": "patched"}])
    assert api.delete("/events_log", params={"id": "eq.1"}).status_code == 204
    assert column(db, "SELECT id FROM public.events_log_eu") == []


def test_domain_columns_show_their_base_type_and_are_written_as_the_domain(fresh_stack, db, api):
    """SchemaCache.hs data_type: a domain over a pg_catalog type shows that type without
    its typmod, a domain over another type its own name; maxLength, enum and required
    look through the domain. Writes still cast to the domain, checks and all."""
    db.execute("""
        CREATE DOMAIN public.amount AS numeric(20,2) CHECK (VALUE >= 0);
        CREATE DOMAIN public.short_code AS varchar(5) NOT NULL;
        CREATE DOMAIN public.status_d AS public.booking_status;
        CREATE TABLE public.ledger (id int PRIMARY KEY, total public.amount,
                                    code public.short_code, state public.status_d,
                                    totals public.amount[]);
    """)
    props = api.get("/").json()["definitions"]["ledger"]
    total, code, state = (props["properties"][c] for c in ("total", "code", "state"))
    assert (total["format"], total["type"]) == ("numeric", "number")
    assert (code["format"], code["type"], code["maxLength"]) == ("character varying", "string", 5)
    assert (state["format"], state["type"]) == ("status_d", "string")
    assert state["enum"] == ["pending", "confirmed", "cancelled", "completed"]
    assert props["properties"]["totals"]["format"] == "amount[]"
    assert props["required"] == ["id", "code"]
    r = api.post("/ledger", json={"id": 1, "total": "12.345", "code": "ab", "state": "pending",
                                  "totals": ["1.005"]}, headers={"Prefer": "return=representation"})
    assert (r.status_code, r.json()[0]["total"], r.json()[0]["totals"]) == (201, 12.35, [1.01])
    assert_error(api.post("/ledger", json={"id": 2, "total": -1, "code": "ab"}), 400, "23514")
    assert_error(api.post("/ledger", json={"id": 3, "code": "toolong"}), 400, "22001")
    assert scalar(db, "SELECT total::text FROM public.ledger WHERE id = 1") == "12.35"


QUOTED_TABLE = """
    CREATE TABLE public.odd_names (id int PRIMARY KEY, "a,b" int, "k.1" text UNIQUE,
                                   "c d" text, "q""x" text);
    INSERT INTO public.odd_names VALUES (1, 3, 'x', 'm', 'p'), (2, 7, 'x2', 'z', 'q'),
                                        (3, 9, 'x3', 'a', 'r'), (4, 1, 'y', 'b', 's');
"""


def test_quoted_column_names_in_select_order_and_filters(fresh_stack, db, api):
    """QueryParams.hs pFieldName: a double-quoted name may hold , . : ( ) and blanks; in it
    a backslash takes the next character as it is (\\" is a quote)."""
    db.execute(QUOTED_TABLE)
    r = api.get("/odd_names", params={"select": '"a,b",alias:"k.1","c d","q\\"x"',
                                      "order": '"k.1".asc,"c d".desc', "id": "lte.3"})
    assert r.status_code == 200, r.text
    assert r.json() == [{"a,b": 3, "alias": "x", "c d": "m", 'q"x': "p"},
                        {"a,b": 7, "alias": "x2", "c d": "z", 'q"x': "q"},
                        {"a,b": 9, "alias": "x3", "c d": "a", 'q"x': "r"}]
    r = api.get("/odd_names", params={"select": "id", "order": '"c d".desc', '"a,b"': "gt.5"})
    assert r.json() == [{"id": 2}, {"id": 3}]
    r = api.get("/odd_names", params={"select": "id", "order": "id",
                                      "or": '("a,b".gt.8,and("k.1".eq.x,"c d".gt.a))'})
    assert r.json() == [{"id": 1}, {"id": 3}]
    r = api.get("/odd_names", params={"select": "id", "order": "id",
                                      "not.or": '("a,b".gt.8,"q\\"x".eq.p)'})
    assert r.json() == [{"id": 2}, {"id": 4}]
    # Unquoted, a dot ends the name: "k.1" would be the embedding k and its column 1.
    assert_error(api.get("/odd_names", params={"k.1": "eq.x"}), 400, "PGRST108")
    assert_error(api.get("/odd_names", params={"order": "k.1.asc"}), 400, "PGRST100")


def test_quoted_column_names_in_columns_and_on_conflict(fresh_stack, db, api):
    db.execute(QUOTED_TABLE)
    rows = [{"id": 5, "a,b": 50, "k.1": "x", "c d": "upserted"},
            {"id": 6, "a,b": 60, "k.1": "new", "c d": "inserted"}]
    r = api.post("/odd_names", json=rows,
                 params={"on_conflict": '"k.1"', "columns": '"id","a,b","k.1","c d"'},
                 headers={"Prefer": "return=representation,resolution=merge-duplicates"})
    assert r.status_code == 201, r.text
    assert db.execute('SELECT id, "a,b", "c d", "q""x" FROM public.odd_names '
                      """WHERE "k.1" IN ('x', 'new') ORDER BY id""").fetchall() == [
        (5, 50, "upserted", "p"), (6, 60, "inserted", None)]
    body = assert_error(api.post("/odd_names", json=rows, params={"columns": '"a,b","nope"'}),
                        400, "PGRST204")
    assert body["message"] == "Could not find the 'nope' column of 'odd_names' in the schema cache"


@pytest.mark.parametrize("value, expected", [
    ("in.( a , b )", ["a ", " b "]),  # blanks kept, except before the first element
    ('in.("a ", b)', ["a ", " b"]),
    ('in.("say \\"hi\\"","back\\\\slash")', ['say "hi"', "back\\slash"]),
    ('in.("a" ,c)', ['"a" ']),  # a quote not followed by , or ) is an ordinary character
    ('in.(c,"\\"a\\" ")', ['"a" ']),
    ("in.()", []),
    ('in.("")', []),  # both are the one-empty-string list: = ANY('{}')
    ("in.(f(x),b)", ["f(x"]),  # ')' ends the list; what follows it is ignored
    ("eq. b ", [" b "]),  # a top-level value is taken as it is
    ("eq.a ", ["a "]),
    ("not.in.(a,b)", ['say "hi"', "back\\slash", '"a" ', "a ", " b ", " b", "f(x"]),
], ids=["blanks", "quoted-blank", "escapes", "quote-then-blank", "escaped-quotes", "empty",
        "empty-quoted", "paren", "eq-blanks", "eq-trailing-blank", "not-in"])
def test_list_and_filter_values_are_read_as_postgrest_reads_them(stack, db, api,
                                                                  value, expected):
    """QueryParams.hs pListVal/pListElement/pQuotedValue and pSingleVal."""
    db.execute("CREATE TABLE public.words (w text PRIMARY KEY)")
    try:
        db.execute("INSERT INTO public.words SELECT unnest(%s::text[])",
                   [['say "hi"', "back\\slash", '"a" ', "a ", " b ", " b", "f(x", "a", "b"]])
        r = api.get("/words", params={"w": value, "select": "w"})
        assert r.status_code == 200, r.text
        assert sorted(x["w"] for x in r.json()) == sorted(expected)
    finally:
        db.execute("DROP TABLE public.words")


def test_a_number_filter_with_blanks_is_left_to_postgresql(api):
    r = api.get("/bookings", params={"select": "id", "id": "eq.  5"})
    assert r.json() == [{"id": 5}]  # int4in allows the blanks
    r = api.get("/bookings", params={"select": "id", "id": "in.( 5, 6 )", "order": "id"})
    assert r.json() == [{"id": 5}, {"id": 6}]


DEEP = 2000


def deep_json(depth: int = DEEP) -> str:
    return '{"k": ' * depth + "1" + "}" * depth


def test_deeply_nested_bodies_are_left_to_postgresql(fresh_stack, db, api):
    """ApiRequest.hs getPayload: with columns= the body is not decoded (RawJSON) and goes
    to PostgreSQL as it came; without, only its keys are needed. Neither may trip over
    Python's recursion limit."""
    db.execute("CREATE TABLE public.docs (id int PRIMARY KEY, doc jsonb)")
    headers = {"Content-Type": "application/json"}
    deep = deep_json()
    r = api.post("/docs", params={"columns": '"id","doc"'}, headers=headers,
                 content=f'[{{"id": 1, "doc": {deep}}}]')
    assert r.status_code == 201, r.text[:300]
    r = api.post("/docs", headers=headers, content=f'{{"id": 2, "doc": {deep}}}')
    assert r.status_code == 201, r.text[:300]
    r = api.patch("/docs", params={"id": "eq.1", "columns": '"doc"'}, headers=headers,
                  content=f'{{"doc": [{deep}]}}')
    assert r.status_code == 204, r.text[:300]
    r = api.patch("/docs", params={"id": "eq.2"}, headers=headers,
                  content=f'{{"doc": [{deep}], "id": 2}}')
    assert r.status_code == 204, r.text[:300]
    assert column(db, "SELECT doc = %s::jsonb FROM public.docs ORDER BY id",
                  [f"[{deep}]"]) == [True, True]
    # Broken deep JSON: PostgREST's own check without columns=, PostgreSQL's with.
    broken = f'{{"id": 3, "doc": {deep[:-1]}}}'
    body = assert_error(api.post("/docs", headers=headers, content=broken), 400, "PGRST102")
    assert body["message"] == "Empty or invalid json"
    assert_error(api.post("/docs", params={"columns": '"id","doc"'}, headers=headers,
                          content=broken), 400, "22P02")
    assert scalar(db, "SELECT count(*) FROM public.docs") == 2


@pytest.mark.parametrize("body, status, code, added", [
    (b"{}", 201, None, 1),  # one row of defaults
    (b"[{}, {}]", 201, None, 2),
    (b"[]", 201, None, 0),
    (b"5", 201, None, 0),  # any other JSON value counts as an empty array
    (b"null", 201, None, 0),
    (b"[1, 2]", 400, "PGRST102", 0),  # All object keys must match
    (b'[{"value": 1}, 2]', 400, "PGRST102", 0),
    (b"", 400, "PGRST102", 0),  # Empty or invalid json
    (b'{"value": NaN}', 400, "PGRST102", 0),
], ids=["object", "objects", "empty-array", "number", "null", "array-of-numbers", "mixed",
        "empty", "nan"])
def test_bodies_are_read_as_postgrest_reads_them(fresh_stack, db, api, body, status, code,
                                                 added):
    db.execute("CREATE TABLE public.counters (id int GENERATED BY DEFAULT AS IDENTITY, "
               "value int DEFAULT 7)")
    r = api.post("/counters", content=body, headers={"Content-Type": "application/json"})
    if code:
        assert_error(r, status, code)
    else:
        assert (r.status_code, r.content) == (status, b"")
    assert column(db, "SELECT value FROM public.counters") == [7] * added


def test_a_patch_without_columns_changes_nothing_even_without_a_filter(fresh_stack, db, api):
    """QueryBuilder.hs: an update with no columns is `SELECT ... WHERE false`, so
    pg-safeupdate never sees it."""
    r = api.patch("/payments", json={}, headers={"Prefer": "return=representation"})
    assert (r.status_code, r.json()) == (200, [])
    assert api.patch("/payments", content=b"[]").status_code == 204


def test_json_keeps_its_text_unless_missing_default_makes_it_jsonb(fresh_stack, db, api):
    """fromJsonBodyF: the body is a json parameter read by json_to_recordset, so a json
    column keeps the text as sent; with Prefer: missing=default it is jsonb (merged over
    the defaults, read by jsonb_to_recordset) and the text is jsonb's."""
    db.execute("CREATE TABLE public.raw_docs (id int PRIMARY KEY, doc json, tag text "
               "DEFAULT 'dflt')")
    sent = '{"b": 1,  "a": [1 , 2], "a": "last"}'
    headers = {"Content-Type": "application/json"}
    for row_id, params, prefer in ((1, {}, "return=minimal"),
                                   (2, {"columns": '"id","doc"'}, "return=minimal"),
                                   (3, {"columns": '"id","doc","tag"'}, "missing=default"),
                                   (4, {}, "missing=default")):
        r = api.post("/raw_docs", params=params, content=f'[{{"id": {row_id}, "doc": {sent}}}]',
                     headers={**headers, "Prefer": prefer})
        assert r.status_code == 201, r.text
    assert db.execute("SELECT id, doc::text, tag FROM public.raw_docs ORDER BY id").fetchall() == [
        (1, sent, "dflt"), (2, sent, "dflt"), (3, '{"a": "last", "b": 1}', "dflt"),
        (4, '{"a": "last", "b": 1}', "dflt")]


# --- Limited DELETE and PATCH (v12: limit= with order=) -----------------------


@pytest.fixture
def dupes(fresh_stack, db):
    """A table without any unique column: five identical rows and two others."""
    db.execute("CREATE TABLE public.dupes (v int, label text)")
    db.execute("INSERT INTO public.dupes SELECT 1, 'same' FROM generate_series(1, 5)")
    db.execute("INSERT INTO public.dupes VALUES (2, 'other'), (3, 'other')")
    return db


def test_a_limit_on_delete_or_patch_needs_an_order(dupes, api):
    for method, kwargs in (("DELETE", {}), ("PATCH", {"json": {"label": "x"}})):
        for params in ({"v": "eq.1", "limit": "2"}, {"v": "eq.1", "offset": "1"},
                       {"v": "eq.1", "limit": "many"}):
            body = assert_error(api.request(method, "/dupes", params=params, **kwargs),
                                400, "PGRST109")
            assert body["message"] == "A 'limit' was applied without an explicit 'order'"
            assert body["hint"] == "Apply an 'order' using unique column(s)"
    assert scalar(dupes, "SELECT count(*) FROM public.dupes WHERE label = 'same'") == 5


def test_order_by_ctid_deletes_and_patches_exactly_n_identical_rows(dupes, api):
    r = api.delete("/dupes", params={"v": "eq.1", "limit": "2", "order": "ctid"},
                   headers={"Prefer": "return=representation"})
    assert (r.status_code, r.json()) == (200, [{"v": 1, "label": "same"}] * 2)
    assert scalar(dupes, "SELECT count(*) FROM public.dupes WHERE v = 1") == 3
    r = api.patch("/dupes", params={"v": "eq.1", "limit": "1", "order": "ctid.desc"},
                  json={"label": "changed"})
    assert r.status_code == 204
    assert dupes.execute("SELECT label, count(*) FROM public.dupes WHERE v = 1 GROUP BY 1 "
                         "ORDER BY 1").fetchall() == [("changed", 1), ("same", 2)]
    # No filter at all is fine: the limited statement has its own WHERE (the join).
    assert api.delete("/dupes", params={"limit": "1", "order": "ctid"}).status_code == 204
    assert scalar(dupes, "SELECT count(*) FROM public.dupes") == 4
    assert api.delete("/dupes", params={"limit": "0", "order": "ctid"}).status_code == 204
    assert scalar(dupes, "SELECT count(*) FROM public.dupes") == 4
    assert_error(api.delete("/dupes", params={"limit": "-1", "order": "ctid"}), 416, "PGRST103")


def test_a_limited_delete_reaches_every_row_sharing_the_ordered_values(dupes, api):
    """mutRangeF joins the picked rows back on the ordered columns: with limit=2 and an
    order on a non-unique column, every row with a picked value goes."""
    r = api.delete("/dupes", params={"v": "lte.2", "limit": "2", "order": "v"},
                   headers={"Prefer": "count=exact"})
    assert (r.status_code, r.headers["Content-Range"]) == (204, "0-4/5")
    assert column(dupes, "SELECT v FROM public.dupes ORDER BY v") == [2, 3]


def test_limited_delete_and_patch_with_offset_on_a_key(fresh_stack, db, api):
    booking = scalar(db, "SELECT booking_id FROM payments GROUP BY 1 HAVING count(*) >= 2 "
                         "ORDER BY 1 LIMIT 1")
    ids = column(db, "SELECT id FROM payments WHERE booking_id = %s ORDER BY id DESC", [booking])
    r = api.delete("/payments", params={"booking_id": f"eq.{booking}", "order": "id.desc",
                                        "limit": "1", "offset": "1"},
                   headers={"Prefer": "return=representation"})
    assert (r.status_code, [p["id"] for p in r.json()]) == (200, [ids[1]])
    assert column(db, "SELECT id FROM payments WHERE booking_id = %s ORDER BY id DESC",
                  [booking]) == [ids[0]] + ids[2:]
    r = api.patch("/payments", params={"order": "id", "limit": "3"}, json={"method": "cash"},
                  headers={"Prefer": "return=representation"})
    assert sorted(p["id"] for p in r.json()) == [1, 2, 3]
    assert column(db, "SELECT id FROM payments WHERE method = 'cash' ORDER BY id") == [1, 2, 3]


# --- Auth and RLS -------------------------------------------------------------


def count_rows(client, table: str) -> int:
    return client.table(table).select("*", count="exact", head=True).execute().count


def test_the_service_role_sees_everything(client):
    assert count_rows(client, "bookings") == BOOKINGS
    assert count_rows(client, "audit_events") == 1500


@pytest.mark.parametrize("who", ["anon-jwt", "publishable-key", "no-key"])
def test_anonymous_callers_see_no_bookings_and_no_error(stack, db, who):
    key = {"anon-jwt": stack.anon_key, "publishable-key": stack.publishable_key,
           "no-key": None}[who]
    with rest(stack, key) as http:
        r = http.get("/bookings", params={"select": "id"}, headers={"Prefer": "count=exact"})
        assert (r.status_code, r.json(), r.headers["Content-Range"]) == (200, [], "*/0")
        r = http.get("/packages", params={"select": "id"}, headers={"Prefer": "count=exact"})
        assert r.headers["Content-Range"] == "0-269/270"  # the policy shows active packages
    if key:
        anon = make_client(stack.url, key)
        assert anon.table("bookings").select("*", count="exact").execute().count == 0
    assert scalar(db, "SELECT count(*) FROM bookings") == BOOKINGS


def test_anonymous_writes_are_refused_by_rls(stack, db):
    with rest(stack, stack.anon_key) as http:
        r = http.post("/app_settings", json={"key": "sneaky", "value": 1})
    body = assert_error(r, 403, "42501")  # a JWT was given: 403, as PostgREST
    assert "row-level security" in body["message"]
    with rest(stack, None) as http:
        assert_error(http.post("/app_settings", json={"key": "sneaky"}), 401, "42501")
    assert scalar(db, "SELECT count(*) FROM app_settings") == 5


def test_a_signed_in_user_sees_only_their_own_rows(stack, db):
    user_id = demo_user_id(38)
    expected = column(db, "SELECT id FROM bookings WHERE user_id = %s ORDER BY id", [user_id])
    assert len(expected) >= 2
    user = make_client(stack.url, stack.user_key(user_id))
    got = user.table("bookings").select("id,user_id").order("id").execute().data
    assert [r["id"] for r in got] == expected
    assert {r["user_id"] for r in got} == {user_id}
    assert user.table("users").select("id").execute().data == [{"id": user_id}]


def test_the_secret_key_acts_as_service_role(stack):
    secret = make_client(stack.url, stack.secret_key)
    assert count_rows(secret, "audit_events") == 1500


@pytest.mark.parametrize("make_token", [
    lambda stack: "not-a-jwt",
    lambda stack: jwt.encode({"role": "service_role"}, "another-secret-another-secret-0123",
                             algorithm="HS256"),
    lambda stack: stack.service_role_key[:-4] + "AAAA",
    lambda stack: "sb_secret_" + "x" * 32,
    lambda stack: "sb_publishable_" + "x" * 32,
], ids=["garbage", "wrong-secret", "tampered", "unknown-secret-key", "unknown-publishable-key"])
def test_a_bad_token_is_401_pgrst301(stack, make_token):
    with rest(stack, make_token(stack)) as http:
        assert_error(http.get("/bookings", params={"select": "id"}), 401, "PGRST301")
    with pytest.raises(APIError) as err:
        make_client(stack.url, make_token(stack)).table("bookings").select("id").execute()
    assert err.value.code == "PGRST301"


@pytest.mark.parametrize("claim, message", [
    ({"exp": -60}, "JWT expired"),
    ({"nbf": 600}, "JWT not yet valid"),
    ({"iat": 600}, "JWT issued at future"),
])
def test_a_jwt_outside_its_validity_is_401_pgrst303(stack, claim, message):
    claims = {"role": "service_role", **{k: int(time.time()) + v for k, v in claim.items()}}
    with rest(stack, jwt.encode(claims, stack.jwt_secret, algorithm="HS256")) as http:
        r = http.get("/bookings", params={"select": "id"})
    assert assert_error(r, 401, "PGRST303")["message"] == message


def test_a_jwt_role_that_does_not_exist_is_401(stack):
    token = jwt.encode({"role": "nobody_here"}, stack.jwt_secret, algorithm="HS256")
    with rest(stack, token) as http:
        r = http.get("/bookings", params={"select": "id"})
    assert r.status_code == 401
    assert set(r.json()) == ERROR_KEYS


# --- OpenAPI ------------------------------------------------------------------


def test_openapi_document(api, stack):
    r = api.get("/")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/openapi+json")
    doc = r.json()
    assert doc["swagger"] == "2.0"
    defs = doc["definitions"]
    users, bookings, payments = defs["users"], defs["bookings"], defs["payments"]
    assert set(users["required"]) == {"id", "email", "role", "created_at"}
    assert set(bookings["required"]) == {"id", "user_id", "package_id", "status"}
    assert users["properties"]["id"]["type"] == "string"
    assert users["properties"]["id"]["format"] == "uuid"
    assert "<pk/>" in users["properties"]["id"]["description"]
    assert (bookings["properties"]["id"]["type"], bookings["properties"]["id"]["format"]) == (
        "integer", "bigint")
    assert (bookings["properties"]["total_price"]["type"],
            bookings["properties"]["total_price"]["format"]) == ("number", "numeric")
    assert bookings["properties"]["total_price"]["description"].startswith("packages.price")
    assert users["properties"]["profile"]["format"] == "jsonb"
    assert "type" not in users["properties"]["profile"]
    assert users["properties"]["tags"]["type"] == "array"
    assert users["properties"]["tags"]["items"] == {"type": "string"}
    assert users["properties"]["created_at"]["format"] == "timestamp with time zone"
    assert bookings["properties"]["status"]["enum"] == [
        "pending", "confirmed", "cancelled", "completed"]
    assert payments["properties"]["reference"]["maxLength"] == 40
    assert payments["properties"]["reference"]["format"] == "character varying"
    assert payments["properties"]["currency"]["maxLength"] == 3
    tags = defs["package_tags"]["properties"]
    assert "<pk/>" in tags["package_id"]["description"]
    assert "<pk/>" in tags["tag"]["description"]
    assert "<fk table='packages' column='id'/>" in tags["package_id"]["description"]
    assert "<pk/>" not in tags["weight"].get("description", "")
    assert "<fk table='users' column='id'/>" in bookings["properties"]["user_id"]["description"]
    assert "<fk table='users' column='id'/>" in users["properties"]["referred_by"]["description"]
    assert users["properties"]["referred_by"]["description"].startswith("The user who referred")
    # Defaults as PostgREST shows them: strings unwrapped, JSON literals, no expressions.
    assert users["properties"]["role"]["default"] == "customer"
    assert defs["packages"]["properties"]["is_active"]["default"] is True
    assert tags["weight"]["default"] == 1
    assert users["properties"]["created_at"]["default"] == "now()"
    assert "default" not in defs["packages"]["properties"]["nights"]  # generated
    assert "default" not in bookings["properties"]["id"]  # identity: nextval(...)
    assert set(doc["paths"]["/booking_summary"]) == {"get"}
    assert set(doc["paths"]["/bookings"]) == {"get", "post", "patch", "delete"}
    assert "booking_summary" in defs and "audit_events" in defs


@pytest.mark.parametrize("who", ["anon-jwt", "publishable-key", "no-key"])
def test_openapi_is_for_the_service_role_only(stack, who):
    key = {"anon-jwt": stack.anon_key, "publishable-key": stack.publishable_key,
           "no-key": None}[who]
    with rest(stack, key) as http:
        r = http.get("/")
    assert r.status_code == 403
    assert set(r.json()) == ERROR_KEYS
    with rest(stack, stack.secret_key) as http:
        assert http.get("/").status_code == 200


# --- Errors, timeouts, schema changes -----------------------------------------


@pytest.mark.parametrize("path, params, status, code", [
    ("/no_such_table", {"select": "*"}, 404, "PGRST205"),
    ("/bookings", {"id": "eq.abc"}, 400, "22P02"),
    ("/bookings", {"colour": "eq.red"}, 400, "42703"),
    ("/bookings", {"select": "id,colour"}, 400, "42703"),
    ("/bookings", {"order": "id.sideways"}, 400, "PGRST100"),
    ("/bookings", {"order": "id.nullsfirst.asc"}, 400, "PGRST100"),
    ("/bookings", {"id": "equals.1"}, 400, "PGRST100"),
    ("/bookings", {"limit": "-1"}, 416, "PGRST103"),
    ("/bookings", {"limit": "0", "offset": "5"}, 416, "PGRST103"),
], ids=["missing-table", "bad-value", "unknown-filter-column", "unknown-select-column",
        "bad-order", "nulls-before-direction", "bad-operator", "negative-limit",
        "limit-0-with-offset"])
def test_error_bodies_and_statuses(api, path, params, status, code):
    assert_error(api.get(path, params=params), status, code)


def test_limit_and_offset_are_read_as_postgrest_reads_them(api):
    """RangeQuery.hs/getRanges: a limit that is no integer is ignored (the cap applies),
    limit=0 is an empty page, a negative offset counts as 0."""
    r = api.get("/bookings", params={"select": "id", "limit": "many"})
    assert (r.status_code, len(r.json())) == (200, CAP)
    r = api.get("/bookings", params={"select": "id", "limit": "0"},
                headers={"Prefer": "count=exact"})
    assert (r.status_code, r.headers["Content-Range"], r.json()) == (206, f"*/{BOOKINGS}", [])
    r = api.get("/bookings", params={"select": "id", "order": "id", "offset": "-3"})
    assert (r.status_code, r.json()[:2]) == (200, [{"id": 1}, {"id": 2}])
    # The range is cut to rows 0.. before it is judged: offset=-3&limit=2 is rows -3..-2,
    # which is nothing, so 416.
    assert_error(api.get("/bookings", params={"offset": "-3", "limit": "2"}), 416, "PGRST103")


def test_a_missing_table_through_the_client(client):
    with pytest.raises(APIError) as err:
        client.table("bookingz").select("*").execute()
    assert err.value.code == "PGRST205"
    assert err.value.message == "Could not find the table 'public.bookingz' in the schema cache"


def test_a_schema_that_is_not_exposed_is_406(client, api):
    with pytest.raises(APIError) as err:
        client.schema("auth").table("users").select("id").execute()
    assert err.value.code == "PGRST106"
    assert_error(api.get("/users", headers={"Accept-Profile": "auth"}), 406, "PGRST106")
    assert_error(api.post("/users", json={}, headers={"Content-Profile": "auth"}), 406, "PGRST106")
    assert api.get("/app_settings", headers={"Accept-Profile": "public"}).status_code == 200


def test_errors_raised_in_the_database_keep_their_sqlstate_and_status(stack, db, api):
    """Triggers, constraints and privileges as a real schema has them."""
    db.execute("""
        CREATE TABLE public.guarded (id int PRIMARY KEY, qty int CHECK (qty >= 0), note text);
        CREATE FUNCTION public.guard() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.note = 'teapot' THEN
            RAISE SQLSTATE 'PT418' USING MESSAGE = 'short and stout';
          END IF;
          IF NEW.note = 'raise' THEN
            RAISE EXCEPTION 'refused: %', NEW.id USING HINT = 'ask';
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER guard BEFORE INSERT ON public.guarded
          FOR EACH ROW EXECUTE FUNCTION public.guard();
        CREATE VIEW public.two_rows_in_one AS SELECT (SELECT id FROM public.bookings) AS id;
        CREATE TABLE public.no_grants (id int);
        REVOKE ALL ON public.no_grants FROM anon, authenticated, service_role;
    """)
    try:
        assert_error(api.post("/guarded", json={"id": 1, "note": "teapot"}), 418, "PT418")
        body = assert_error(api.post("/guarded", json={"id": 2, "note": "raise"}), 400, "P0001")
        assert (body["message"], body["hint"]) == ("refused: 2", "ask")
        assert_error(api.post("/guarded", json={"id": 3, "qty": -1}), 400, "23514")
        assert_error(api.get("/two_rows_in_one"), 500, "21000")
        assert_error(api.get("/no_grants"), 403, "42501")
        with rest(stack, None) as anonymous:
            assert_error(anonymous.get("/no_grants"), 401, "42501")
        assert scalar(db, "SELECT count(*) FROM public.guarded") == 0
    finally:
        db.execute("DROP TABLE public.guarded; DROP FUNCTION public.guard(); "
                   "DROP VIEW public.two_rows_in_one; DROP TABLE public.no_grants")


def test_a_statement_timeout_is_57014_500(stack, db, api):
    db.execute("CREATE VIEW public.slow_rows AS SELECT pg_sleep(2)::text AS slept")
    try:
        stack.statement_timeout = "100ms"
        started = time.monotonic()
        body = assert_error(api.get("/slow_rows"), 500, "57014")
        assert time.monotonic() - started < 1.5
        assert "statement timeout" in body["message"]
    finally:
        db.execute("DROP VIEW public.slow_rows")


def test_ddl_is_picked_up_at_once(stack, db, client):
    db.execute("CREATE TABLE public.just_created (id int PRIMARY KEY, label text)")
    try:
        db.execute("INSERT INTO public.just_created VALUES (1, 'one'), (2, 'two')")
        got = client.table("just_created").select("*").order("id").execute().data
        assert got == [{"id": 1, "label": "one"}, {"id": 2, "label": "two"}]
        db.execute("ALTER TABLE public.just_created ADD COLUMN extra int DEFAULT 7")
        assert client.table("just_created").select("extra").eq("id", 1).execute().data == [
            {"extra": 7}]
    finally:
        db.execute("DROP TABLE public.just_created")
    with pytest.raises(APIError) as err:
        client.table("just_created").select("*").execute()
    assert err.value.code == "PGRST205"


# --- Fault injection ----------------------------------------------------------


def insert_payments(client, ids):
    """Insert one payment per request; the outcome of each ("ok" or the error code)."""
    outcomes = []
    for payment_id in ids:
        try:
            client.table("payments").insert(
                {"id": payment_id, "booking_id": 3, "amount": 1}).execute()
            outcomes.append("ok")
        except APIError as exc:
            outcomes.append(exc.code)
    return outcomes


def payment_ids(db, low=9000):
    return column(db, "SELECT id FROM payments WHERE id >= %s ORDER BY id", [low])


def test_a_write_fault_fails_the_nth_and_later_writes(fresh_stack, client, db, answers):
    fresh_stack.faults.add(kind="write", table="payments", after=3, status=507, code="PT507")
    assert insert_payments(client, [9001, 9002, 9003, 9004]) == ["ok", "ok", "PT507", "PT507"]
    assert [a.status_code for a in answers] == [201, 201, 507, 507]
    assert payment_ids(db) == [9001, 9002]  # "before": nothing written
    client.table("app_settings").insert({"key": "other table"}).execute()  # not this table
    assert client.table("payments").select("id").eq("id", 9001).execute().data  # nor reads
    fresh_stack.faults.clear()
    assert insert_payments(client, [9005]) == ["ok"]
    assert payment_ids(db) == [9001, 9002, 9005]


def test_times_limits_a_fault(fresh_stack, client, db):
    fresh_stack.faults.add(kind="write", table="payments", after=2, times=1, status=500)
    assert insert_payments(client, [9001, 9002, 9003]) == ["ok", "XX000", "ok"]
    assert payment_ids(db) == [9001, 9003]


def test_a_fault_after_the_commit_loses_only_the_answer(fresh_stack, client, db, answers):
    fresh_stack.faults.add(kind="write", table="payments", when="after", status=500)
    assert insert_payments(client, [9001]) == ["XX000"]
    assert answers[-1].status_code == 500
    assert payment_ids(db) == [9001]  # committed all the same


def test_a_read_fault(stack, client):
    stack.faults.add(kind="read", table="bookings", after=2, status=500, code="PT500")
    assert client.table("bookings").select("id").limit(1).execute().data == [{"id": 1}]
    with pytest.raises(APIError) as err:
        client.table("bookings").select("id").limit(1).execute()
    assert err.value.code == "PT500"
    assert client.table("packages").select("id").limit(1).execute().data  # other tables read
    stack.faults.clear()
    assert client.table("bookings").select("id").limit(1).execute().data == [{"id": 1}]


def test_a_dropped_connection_raises_in_the_client(fresh_stack, client, db):
    fresh_stack.faults.add(kind="write", table="payments", action="drop")
    with pytest.raises(httpx.TransportError):
        client.table("payments").insert({"id": 9001, "booking_id": 3, "amount": 1}).execute()
    assert payment_ids(db) == []
    fresh_stack.faults.clear()
    fresh_stack.faults.add(kind="write", table="payments", action="drop", when="after")
    with pytest.raises(httpx.TransportError):
        client.table("payments").insert({"id": 9002, "booking_id": 3, "amount": 1}).execute()
    assert payment_ids(db) == [9002]  # committed, then cut off mid-answer
    fresh_stack.faults.add(kind="read", table="bookings", action="drop")
    with pytest.raises(httpx.TransportError):
        client.table("bookings").select("id").limit(5).retry(False).execute()


def test_a_read_dropped_once_is_retried_by_the_client(stack, client):
    stack.faults.add(kind="read", table="bookings", action="drop", times=1)
    assert len(client.table("bookings").select("id").limit(5).execute().data) == 5


def test_a_latency_fault_delays_and_clear_restores(stack, client):
    stack.faults.add(kind="read", table="bookings", action="latency", delay=0.4)
    started = time.monotonic()
    assert client.table("bookings").select("id").limit(1).execute().data
    assert time.monotonic() - started >= 0.4
    stack.faults.clear()
    started = time.monotonic()
    assert client.table("bookings").select("id").limit(1).execute().data
    assert time.monotonic() - started < 0.3


def test_the_fault_control_endpoint(fresh_stack, client, db):
    control = f"{fresh_stack.url}/_local/faults"
    for key in (fresh_stack.anon_key, fresh_stack.publishable_key, None, "not-a-jwt"):
        headers = {"apikey": key, "Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(control, json={"kind": "write"}, headers=headers)
        assert r.status_code == 401
        assert httpx.delete(control, headers=headers).status_code == 401
    assert fresh_stack.faults.describe() == []
    service = {"apikey": fresh_stack.service_role_key,
               "Authorization": f"Bearer {fresh_stack.service_role_key}"}
    r = httpx.post(control, json={"kind": "write", "table": "payments", "after": 2,
                                  "status": 503}, headers=service)
    assert r.status_code == 200
    listed = httpx.get(control, headers=service).json()["faults"]
    assert [(f["table"], f["after"], f["status"]) for f in listed] == [("payments", 2, 503)]
    assert insert_payments(client, [9001, 9002]) == ["ok", "XX000"]
    assert httpx.delete(control, headers=service).status_code == 200
    assert insert_payments(client, [9003]) == ["ok"]
    assert payment_ids(db) == [9001, 9003]


# --- Compression (Supabase's gateway gzips answers; PostgREST does not) -------


def raw_get(stack, path: str, accept_encoding: str | None, method: str = "GET"):
    """(status, headers, body bytes exactly as sent) through http.client, which decompresses
    nothing and sends no Accept-Encoding of its own when given one."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    headers = {"apikey": stack.service_role_key,
               "Authorization": f"Bearer {stack.service_role_key}"}
    if accept_encoding is not None:
        headers["Accept-Encoding"] = accept_encoding
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        try:
            body = response.read()
        except http.client.IncompleteRead as cut:
            body = cut.partial
        return response.status, response.headers, body
    finally:
        conn.close()


PAGE_PATH = "/rest/v1/bookings?select=*&order=id&limit=300"


def test_a_client_that_accepts_gzip_gets_gzip_of_the_same_json(stack, db):
    status, headers, plain = raw_get(stack, PAGE_PATH, "identity")
    assert status == 200 and "Content-Encoding" not in headers
    assert headers["Vary"] == "Accept-Encoding"
    assert int(headers["Content-Length"]) == len(plain)
    expected = scalar(db, "SELECT json_agg(b ORDER BY id) FROM (SELECT * FROM bookings "
                          "ORDER BY id LIMIT 300) b")
    assert json.loads(plain) == expected
    for accept in ("gzip", "gzip, deflate", "br;q=1.0, gzip;q=0.5", "*"):
        status, headers, packed = raw_get(stack, PAGE_PATH, accept)
        assert status == 200, accept
        assert headers["Content-Encoding"] == "gzip", accept
        assert headers["Vary"] == "Accept-Encoding"
        assert int(headers["Content-Length"]) == len(packed)
        assert packed[:2] == b"\x1f\x8b" and len(packed) < len(plain) / 3, accept
        assert gzip.decompress(packed) == plain, accept
    for refused in ("gzip;q=0", "identity", "*;q=0", "deflate"):
        assert "Content-Encoding" not in raw_get(stack, PAGE_PATH, refused)[1], refused
    # Without the header at all: as sent, as PostgREST sends it.
    status, headers, body = raw_get(stack, PAGE_PATH, None)
    assert "Content-Encoding" not in headers and body == plain


def test_the_range_and_count_headers_are_the_same_compressed(stack):
    path = "/rest/v1/bookings?select=id&order=id&offset=10&limit=20"
    answers = []
    for accept in ("identity", "gzip"):
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
        conn.request("GET", path, headers={"apikey": stack.service_role_key,
                                           "Authorization": f"Bearer {stack.service_role_key}",
                                           "Accept-Encoding": accept, "Prefer": "count=exact"})
        response = conn.getresponse()
        answers.append((response.status, response.headers["Content-Range"], response.read()))
        conn.close()
    (status, plain_range, plain), (gz_status, gz_range, packed) = answers
    assert (status, plain_range) == (gz_status, gz_range) == (206, "10-29/5000")
    assert gzip.decompress(packed) == plain


def test_httpx_and_the_supabase_client_read_compressed_answers_as_before(stack, api, client,
                                                                          answers):
    r = api.get("/bookings", params={"select": "id", "order": "id", "limit": "50"})
    assert "gzip" in r.request.headers["Accept-Encoding"]  # httpx asks for it by default
    assert r.headers["Content-Encoding"] == "gzip"
    assert [row["id"] for row in r.json()] == list(range(1, 51))
    rows = client.table("bookings").select("id").order("id").limit(50).execute().data
    assert [row["id"] for row in rows] == list(range(1, 51))
    assert answers[-1].headers["Content-Encoding"] == "gzip"


def test_head_and_small_answers_are_not_compressed(stack):
    status, headers, body = raw_get(stack, "/rest/v1/bookings?select=*", "gzip", method="HEAD")
    assert status == 200 and body == b""
    assert "Content-Encoding" not in headers
    # Under the gateway's 100 bytes: as they are.
    status, headers, body = raw_get(stack, "/rest/v1/bookings?select=id&id=eq.1", "gzip")
    assert status == 200 and body == b'[{"id":1}]' and "Content-Encoding" not in headers
    status, headers, body = raw_get(stack, "/rest/v1/bookings?select=id&id=eq.-1", "gzip")
    assert status == 200 and body == b"[]" and "Content-Encoding" not in headers


def test_error_bodies_are_compressed_and_still_read(stack, api):
    status, headers, packed = raw_get(stack, "/rest/v1/bookings?colour=eq.red", "gzip")
    assert status == 400 and headers["Content-Encoding"] == "gzip"
    assert headers["Proxy-Status"] == "PostgREST; error=42703"
    assert set(json.loads(gzip.decompress(packed))) == ERROR_KEYS
    assert_error(api.get("/bookings", params={"colour": "eq.red"}), 400, "42703")


def test_a_dropped_answer_cuts_the_compressed_body_in_half(stack):
    whole = raw_get(stack, PAGE_PATH, "gzip")[2]
    stack.faults.add(kind="read", table="bookings", action="drop", when="after", times=1)
    status, headers, cut = raw_get(stack, PAGE_PATH, "gzip")
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert int(headers["Content-Length"]) == len(whole)
    assert cut == whole[:len(whole) // 2]
    # What arrived is the start of the JSON and no more: a gzip stream without its end.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    start = inflater.decompress(cut)
    assert start.startswith(b'[{"id":1,') and not inflater.eof
    with pytest.raises(json.JSONDecodeError):
        json.loads(start)


def test_gzip_can_be_turned_off():
    with LocalSupabase(schema="empty", gzip=False) as plain:
        status, headers, body = raw_get(plain, "/rest/v1/", "gzip")
    assert status == 200 and "Content-Encoding" not in headers and "Vary" not in headers
    assert json.loads(body)["swagger"] == "2.0"


# --- Concurrency and keep-alive -----------------------------------------------


def test_requests_are_served_concurrently(stack):
    stack.faults.add(kind="read", table="bookings", action="latency", delay=0.5)

    def one_read() -> int:
        with rest(stack, stack.service_role_key) as http:
            return http.get("/bookings", params={"select": "id", "limit": "1"}).status_code

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: one_read(), range(4)))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 4
    assert elapsed < 1.2, f"4 reads of 0.5 s took {elapsed:.2f} s: served one at a time"


def test_connections_are_kept_alive(stack, api, client):
    for _ in range(3):
        assert api.get("/app_settings", params={"select": "key"}).status_code == 200
    assert len({r.peer for r in stack.requests}) == 1
    with rest(stack, stack.service_role_key) as other:
        other.get("/app_settings")
    assert stack.requests[-1].peer != stack.requests[0].peer
    stack.requests.clear()
    client.table("app_settings").select("key").execute()
    client.table("bookings").select("id").limit(1).execute()
    assert len(stack.requests) == 2 and stack.requests[0].peer == stack.requests[1].peer


# --- --sql: a user's own schema dump ------------------------------------------


def test_a_supabase_schema_dump_loads_and_is_served():
    notes: list[str] = []
    with LocalSupabase(schema=None, sql_files=[DUMP_SAMPLE], note=notes.append) as own:
        noted = "\n".join(notes)
        for skipped in ("pg_graphql", "supabase_vault", "uuid-ossp", '"prisma"',
                        "supabase_functions_admin", "supabase_realtime"):
            assert skipped in noted, f"{skipped} not noted:\n{noted}"
        for loaded in ("CREATE TABLE", "CREATE POLICY", "ENABLE ROW LEVEL SECURITY",
                       "CREATE TYPE", 'ADD CONSTRAINT "trips_owner_id_fkey"',
                       'CREATE OR REPLACE FUNCTION "public"."handle_new_user"'):
            assert loaded not in noted, f"{loaded} was skipped:\n{noted}"
        owner = str(uuid.uuid4())
        with psycopg.connect(own.database_url, autocommit=True) as conn:
            conn.execute("INSERT INTO auth.users (id, email) VALUES (%s, 'ana@example.com')",
                         [owner])
        service = make_client(own.url, own.service_role_key)
        trip = service.table("trips").insert(
            {"owner_id": owner, "title": "Lisbon; again, with \"friends\""}).execute().data[0]
        assert uuid.UUID(trip["id"]) and trip["status"] == "draft" and trip["stops"] == []
        item = service.table("trip_items").insert({"trip_id": trip["id"]}).execute().data[0]
        assert (item["id"], item["kind"], item["details"]) == (1, "activity", {})
        with pytest.raises(APIError) as err:
            service.table("profiles").insert({"id": owner, "display_name": "ab"}).execute()
        assert err.value.code == "23514"
        with pytest.raises(APIError) as err:
            service.table("trips").insert({"owner_id": str(uuid.uuid4()), "title": "x"}).execute()
        assert err.value.code == "23503"  # the FK to auth.users loaded
        anon = make_client(own.url, own.anon_key)
        assert anon.table("trips").select("id").execute().data == []
        user = make_client(own.url, own.user_key(owner))
        assert [t["id"] for t in user.table("trips").select("id").execute().data] == [trip["id"]]
        with rest(own, own.service_role_key) as http:
            defs = http.get("/").json()["definitions"]
        assert defs["trips"]["properties"]["title"]["maxLength"] == 120
        assert defs["trips"]["properties"]["status"]["enum"] == [
            "draft", "booked", "travelling", "done"]
        assert "<fk table='trips' column='id'/>" in defs["trip_items"]["properties"][
            "trip_id"]["description"]


# --- The command line ---------------------------------------------------------


def stack_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("local_supabase_*"))


def folder_of_port(folders: set[Path], port: int) -> Path:
    """The cluster folder whose PostgreSQL listens on port (line 4 of postmaster.pid)."""
    for folder in folders:
        try:
            lines = (folder / "data" / "postmaster.pid").read_text().splitlines()
        except OSError:
            continue
        if len(lines) > 3 and lines[3].strip() == str(port):
            return folder
    raise AssertionError(f"no cluster folder for port {port} among {sorted(folders)}")


def test_the_command_line_serves_until_ctrl_c_and_cleans_up(tmp_path):
    env_file = tmp_path / "x.env"
    before = stack_folders()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "local_supabase.py"), "--env-file", str(env_file),
         "--max-rows", "500"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = ""
    try:
        deadline = time.monotonic() + 30
        while not env_file.exists() or not env_file.read_text().endswith("\n"):
            if proc.poll() is not None:
                pytest.fail("local_supabase.py exited early:\n" + proc.communicate()[1])
            assert time.monotonic() < deadline, "no env file after 30 s"
            time.sleep(0.1)
        env = dotenv_values(env_file)
        assert {"SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_ANON_KEY",
                "DATABASE_URL"} <= set(env)
        folder = folder_of_port(stack_folders() - before,
                                urllib.parse.urlsplit(env["DATABASE_URL"]).port)
        client = make_client(env["SUPABASE_URL"], env["SUPABASE_SERVICE_ROLE_KEY"])
        ids, offset = [], 0
        while True:
            page = (client.table("bookings").select("id", count="exact").order("id")
                    .range(offset, offset + 999).execute())
            assert page.count == BOOKINGS and len(page.data) <= 500
            if not page.data:
                break
            ids.extend(r["id"] for r in page.data)
            offset += len(page.data)
        assert ids == list(range(1, BOOKINGS + 1))
        anon = make_client(env["SUPABASE_URL"], env["SUPABASE_ANON_KEY"])
        assert anon.table("bookings").select("id").execute().data == []
    finally:
        # Ctrl-C even when the test failed: a killed stack would leave PostgreSQL running.
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                _, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert not env_file.exists()
    assert not folder.exists()
    assert "Traceback" not in stderr


def test_the_command_line_never_takes_over_an_existing_env_file(tmp_path):
    # --env-file is removed again on Ctrl-C: an existing .env (a real project's key) must not
    # be overwritten, nor deleted afterwards.
    env_file = tmp_path / ".env"
    env_file.write_text("SUPABASE_SERVICE_ROLE_KEY=the-real-one\n")

    done = subprocess.run([sys.executable, str(HERE / "local_supabase.py"), "--env-file",
                           str(env_file)], capture_output=True, text=True, timeout=60)

    assert done.returncode == 2
    assert "exists already" in done.stderr
    assert env_file.read_text() == "SUPABASE_SERVICE_ROLE_KEY=the-real-one\n"
