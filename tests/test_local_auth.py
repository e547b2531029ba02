"""The auth admin stand-in (tests/local_auth.py), called as a user of Supabase calls the real
one: through supabase_auth (client.auth.admin), with raw HTTP only for the headers the client
does not return."""

from __future__ import annotations

import uuid

import httpx
import pytest
from supabase_auth.errors import AuthApiError

from helpers import make_client

DEMO_USERS = 300


def admin_get(stack, query, key=None):
    key = key or stack.service_role_key
    return httpx.get(f"{stack.url}/auth/v1/admin/users", params=query,
                     headers={"apikey": key, "Authorization": f"Bearer {key}"})


def test_list_users_is_50_a_page_newest_first_with_the_total_and_links(stack, client, db):
    users = client.auth.admin.list_users()
    assert len(users) == 50
    created = [u.created_at for u in users]
    assert created == sorted(created, reverse=True)
    newest = db.execute("SELECT max(created_at) FROM auth.users").fetchone()[0]
    assert users[0].created_at == newest
    answer = admin_get(stack, {"page": 2, "per_page": 100})
    assert answer.headers["X-Total-Count"] == str(DEMO_USERS)
    assert answer.headers["Link"] == ('</admin/users?page=3&per_page=100>; rel="next", '
                                      '</admin/users?page=3&per_page=100>; rel="last"')
    last = admin_get(stack, {"page": 3, "per_page": 100})
    assert 'rel="next"' not in last.headers["Link"] and len(last.json()["users"]) == 100
    assert admin_get(stack, {"page": 4, "per_page": 100}).json()["users"] == []


def test_every_page_together_holds_every_user_but_ties_are_not_ordered(stack, client, db):
    seen = []
    for page in range(1, 8):
        seen += [u.id for u in client.auth.admin.list_users(page=page, per_page=50)]
    ids = {str(r[0]) for r in db.execute("SELECT id FROM auth.users")}
    # The demo has 20 users created in one instant: their order is PostgreSQL's choice, so a
    # reader that pages by offset must not assume it (the set is what matters here).
    assert len(seen) == DEMO_USERS and set(seen) <= ids


def test_bad_paging_is_refused_as_gotrue_does(stack):
    for query, message in (({"per_page": 1001}, "per_page must not exceed 1000"),
                           ({"page": 0}, "page must be greater than 0"),
                           ({"per_page": "x"}, "invalid syntax")):
        answer = admin_get(stack, query)
        assert answer.status_code == 400 and message in answer.json()["msg"]


def test_create_user_keeps_the_given_id_email_phone_metadata_and_confirmation(
        fresh_stack, client, db):
    user_id = str(uuid.uuid4())
    created = client.auth.admin.create_user({
        "id": user_id, "email": "New.Person@Example.com", "phone": "+351 912345678",
        "email_confirm": True, "user_metadata": {"full_name": "Zoë", "n": [1, {"a": None}]},
        "app_metadata": {"roles": ["editor"]}}).user
    assert created.id == user_id and created.email == "new.person@example.com"
    assert created.phone == "351912345678" and created.email_confirmed_at is not None
    assert created.phone_confirmed_at is None
    assert created.app_metadata == {"provider": "email", "providers": ["email", "phone"],
                                    "roles": ["editor"]}
    row = db.execute("SELECT email, raw_user_meta_data, encrypted_password FROM auth.users "
                     "WHERE id = %s", [user_id]).fetchone()
    assert row[0] == "new.person@example.com" and row[1] == {"full_name": "Zoë",
                                                             "n": [1, {"a": None}]}
    assert row[2] and "password" not in client.auth.admin.get_user_by_id(user_id).user.model_dump()


def test_create_user_refusals_carry_gotrue_codes(fresh_stack, client, db):
    taken_id, taken_email = db.execute(
        "SELECT id, email FROM auth.users ORDER BY email LIMIT 1").fetchone()
    cases = [({"email": taken_email.upper()}, 422, "email_exists"),
             ({"phone": "447000000005"}, 422, "phone_exists"),
             ({}, 400, "validation_failed"),
             ({"email": "not-an-email"}, 400, "validation_failed"),
             ({"email": "x@example.com", "id": "nope"}, 400, "validation_failed"),
             ({"email": "y@example.com", "id": str(taken_id)}, 500, "unexpected_failure"),
             ({"email": "z@example.com", "ban_duration": "forever"}, 400, "validation_failed")]
    for attributes, status, code in cases:
        with pytest.raises(AuthApiError) as err:
            client.auth.admin.create_user(attributes)
        assert (err.value.status, err.value.code) == (status, code), attributes
    assert db.execute("SELECT count(*) FROM auth.users").fetchone()[0] == DEMO_USERS


def test_only_an_admin_role_may_call_it(stack):
    anon = make_client(stack.url, stack.anon_key)
    with pytest.raises(AuthApiError) as err:
        anon.auth.admin.list_users()
    assert (err.value.status, err.value.code) == (403, "not_admin")
    answer = httpx.get(f"{stack.url}/auth/v1/admin/users")
    assert answer.status_code == 401 and answer.json()["error_code"] == "no_authorization"
    assert admin_get(stack, {}, key=stack.anon_key[:-3] + "abc").status_code == 403
    assert admin_get(stack, {}, key=stack.secret_key).status_code == 200


def test_update_merges_metadata_and_a_null_removes_a_key(fresh_stack, client, db):
    user_id = str(db.execute("SELECT id FROM auth.users WHERE email = 'user3@example.com'")
                  .fetchone()[0])
    user = client.auth.admin.update_user_by_id(
        user_id, {"user_metadata": {"full_name": None, "added": "yes"},
                  "ban_duration": "24h"}).user
    assert "full_name" not in user.user_metadata and user.user_metadata["added"] == "yes"
    assert user.user_metadata["prefs"] == {"lang": "pt", "news": False}
    assert user.banned_until is not None
    unbanned = client.auth.admin.update_user_by_id(user_id, {"ban_duration": "none"}).user
    assert unbanned.banned_until is None


def test_delete_removes_the_user_and_its_profile_by_the_foreign_key(fresh_stack, client, db):
    user_id = str(db.execute("SELECT id FROM public.profiles LIMIT 1").fetchone()[0])
    client.auth.admin.delete_user(user_id)
    assert db.execute("SELECT count(*) FROM auth.users WHERE id = %s", [user_id]).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM public.profiles WHERE id = %s",
                      [user_id]).fetchone()[0] == 0
    with pytest.raises(AuthApiError) as err:
        client.auth.admin.get_user_by_id(user_id)
    assert (err.value.status, err.value.code) == (404, "user_not_found")


def test_an_injected_fault_answers_as_the_auth_server(stack, client):
    stack.faults.add(kind="read", table="auth.users", status=500, code="unexpected_failure",
                     message="injected", times=1)
    with pytest.raises(AuthApiError) as err:
        client.auth.admin.list_users()
    assert (err.value.status, err.value.code) == (500, "unexpected_failure")
    assert len(client.auth.admin.list_users()) == 50  # once only
