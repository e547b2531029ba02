"""The auth admin API of the local Supabase (tests/local_supabase.py serves it under /auth/v1).

A stand-in for supabase/auth (GoTrue) over an auth.users table in the same PostgreSQL, so that
a public table can refer to its users (the demo's public.profiles.id -> auth.users.id). Only the
admin endpoints a backup tool uses, each as GoTrue's source has it (internal/api/admin.go,
internal/api/shared/pagination.go, internal/models/user.go, internal/api/errors.go):

  GET    /admin/users             page (from 1), per_page (50 by default, at most 1000); newest
                                  first: ORDER BY created_at DESC and nothing else, offset paging
                                  (pop's Paginate); a Link header (rel="next" while pages are
                                  left, rel="last") and X-Total-Count; body {"users": [...],
                                  "aud": ...}. A bad page or per_page: 400 validation_failed.
  POST   /admin/users             AdminUserParams: id, aud, role, email, phone, password,
                                  password_hash, email_confirm, phone_confirm, user_metadata,
                                  app_metadata, ban_duration. Neither email nor phone: 400; a
                                  taken email: 422 email_exists; a taken phone: 422 phone_exists;
                                  a bad id: 400; an id already taken reaches the INSERT and fails
                                  there: 500 unexpected_failure "Database error creating new user".
  GET    /admin/users/{id}        the user, or 404 user_not_found
  PUT    /admin/users/{id}        the same params; metadata MERGED key by key (a null value
                                  removes the key), as User.UpdateAppMetaData/UpdateUserMetaData
  DELETE /admin/users/{id}        hard delete (a foreign key that restricts: 500), or
                                  {"should_soft_delete": true}

Every endpoint needs a JWT whose role is an admin role (service_role, supabase_admin): none is
401 no_authorization, a bad one 403 bad_jwt, another role 403 not_admin. Errors are JSON in the
form the request's X-Supabase-Api-Version asks for (supabase_auth sends 2024-01-01:
{"code": error_code, "message": ...}, and the answer says so in its own X-Supabase-Api-Version;
older clients get {"code": status, "error_code", "msg"}).

Users' confirmation times are set to the time of the request that confirms them (email_confirm
/ phone_confirm), as User.Confirm does; created_at is the time of creation: nothing of the API
sets a past time. Password hashes never leave the server.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import secrets
import urllib.parse
import uuid

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 1000
ADMIN_ROLES = ("service_role", "supabase_admin")
DEFAULT_AUD = "authenticated"
NIL_INSTANCE = "00000000-0000-0000-0000-000000000000"
API_VERSION_2024 = "2024-01-01"
DUPLICATE_EMAIL = "A user with this email address has already been registered"

# Supabase's auth.users (the columns a backup of users may meet; the token columns are left out).
AUTH_USERS_SQL = r"""
CREATE TABLE auth.users (
  instance_id uuid,
  id uuid NOT NULL PRIMARY KEY,
  aud varchar(255),
  role varchar(255),
  email varchar(255),
  encrypted_password varchar(255),
  email_confirmed_at timestamptz,
  invited_at timestamptz,
  confirmation_sent_at timestamptz,
  recovery_sent_at timestamptz,
  last_sign_in_at timestamptz,
  raw_app_meta_data jsonb,
  raw_user_meta_data jsonb,
  is_super_admin boolean,
  created_at timestamptz,
  updated_at timestamptz,
  phone text UNIQUE DEFAULT NULL,
  phone_confirmed_at timestamptz,
  confirmed_at timestamptz GENERATED ALWAYS AS (LEAST(email_confirmed_at, phone_confirmed_at)) STORED,
  banned_until timestamptz,
  is_sso_user boolean NOT NULL DEFAULT false,
  deleted_at timestamptz,
  is_anonymous boolean NOT NULL DEFAULT false
);
CREATE UNIQUE INDEX users_email_partial_key ON auth.users (email) WHERE (is_sso_user = false);
CREATE INDEX users_instance_id_idx ON auth.users (instance_id);
GRANT SELECT ON auth.users TO service_role;
"""


class GoTrueError(Exception):
    """An error answer of the auth server: HTTP status, GoTrue's error_code, message."""

    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(f"{status} {error_code}: {message}")
        self.status, self.error_code, self.message = status, error_code, message

    @staticmethod
    def headers(api_version: str | None) -> dict:
        """The version the body is in, as the answer's header (the client reads it there)."""
        return {"X-Supabase-Api-Version": API_VERSION_2024} if (
            (api_version or "") >= API_VERSION_2024) else {}

    def body(self, api_version: str | None) -> bytes:
        if (api_version or "") >= API_VERSION_2024:
            return json.dumps({"code": self.error_code, "message": self.message}).encode()
        return json.dumps({"code": self.status, "error_code": self.error_code,
                           "msg": self.message}).encode()


def _time(value) -> str | None:
    """A time as Go's encoding/json writes a time.Time (RFC 3339, UTC here)."""
    if value is None:
        return None
    return value.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def user_json(row: dict) -> dict:
    """A user as models.User marshals it (omitempty fields left out when empty)."""
    user = {"id": str(row["id"]), "aud": row["aud"] or "", "role": row["role"] or "",
            "email": row["email"] or "", "phone": row["phone"] or ""}
    for name in ("email_confirmed_at", "phone_confirmed_at", "confirmation_sent_at",
                 "confirmed_at", "recovery_sent_at", "last_sign_in_at", "invited_at"):
        if row[name] is not None:
            user[name] = _time(row[name])
    user["app_metadata"] = row["raw_app_meta_data"] or {}
    user["user_metadata"] = row["raw_user_meta_data"] or {}
    user["identities"] = []  # auth.identities is not kept by the stand-in
    user["created_at"] = _time(row["created_at"])
    user["updated_at"] = _time(row["updated_at"])
    if row["banned_until"] is not None:
        user["banned_until"] = _time(row["banned_until"])
    if row["deleted_at"] is not None:
        user["deleted_at"] = _time(row["deleted_at"])
    user["is_anonymous"] = bool(row["is_anonymous"])
    return user


EMAIL_FORMAT = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
PHONE_FORMAT = re.compile(r"[1-9][0-9]{1,14}")


def validate_email(email: str) -> str:
    """api.validateEmail: required, at most 255 characters, a valid form; lower-cased."""
    if email == "":
        raise GoTrueError(400, "validation_failed", "An email address is required")
    if len(email) > 255:
        raise GoTrueError(400, "validation_failed", "An email address is too long")
    if not EMAIL_FORMAT.fullmatch(email):
        raise GoTrueError(400, "validation_failed",
                          "Unable to validate email address: invalid format")
    return email.lower()


def validate_phone(phone: str) -> str:
    """api.validatePhone: spaces and a leading + dropped, then E.164 digits."""
    phone = phone.strip().lstrip("+").replace(" ", "")
    if not PHONE_FORMAT.fullmatch(phone):
        raise GoTrueError(400, "validation_failed",
                          "Invalid phone number format (E.164 required)")
    return phone


GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> datetime.timedelta:
    """Go's time.ParseDuration ("876000h", "1h30m", "90s")."""
    if not text or GO_DURATION.sub("", text) not in ("", "-", "+"):
        raise GoTrueError(400, "validation_failed",
                          f"invalid format for ban duration: time: invalid duration {text!r}")
    seconds = sum(float(n) * GO_UNITS[u] for n, u in GO_DURATION.findall(text))
    return datetime.timedelta(seconds=-seconds if text.startswith("-") else seconds)


def merged(current: dict | None, updates: dict) -> dict:
    """UpdateAppMetaData / UpdateUserMetaData: key by key, a null value removes the key."""
    result = dict(current or {})
    for key, value in updates.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def fake_hash(password: str) -> str:
    """What encrypted_password holds: not bcrypt (the stand-in never checks passwords), but
    never the password itself."""
    salt = secrets.token_hex(8)
    return "$local$" + salt + "$" + hashlib.sha256((salt + password).encode()).hexdigest()


class AuthAdmin:
    """The admin endpoints over auth.users; serve() answers one request."""

    def __init__(self, dsn: str):
        self.pool = ConnectionPool(dsn, min_size=1, max_size=6, open=True, timeout=30,
                                   kwargs={"row_factory": dict_row, "autocommit": True})

    def close(self) -> None:
        self.pool.close()

    def serve(self, method: str, path: str, query: str, body: bytes, role: str | None,
              has_token: bool) -> tuple[int, bytes, dict]:
        """(status, body, headers) for a request to /auth/v1<path>; raises GoTrueError."""
        if not path.startswith("/admin/users"):
            raise GoTrueError(404, "not_found", f"no route for {method} /auth/v1{path}")
        # requireAuthentication, then requireAdmin (api.go's admin router).
        if not has_token:
            raise GoTrueError(401, "no_authorization",
                              "This endpoint requires a valid Bearer token")
        if role is None:
            raise GoTrueError(403, "bad_jwt", "invalid JWT: unable to parse or verify signature")
        if role not in ADMIN_ROLES:
            raise GoTrueError(403, "not_admin", "User not allowed")
        rest = path[len("/admin/users"):].strip("/")
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        if not rest:
            if method == "GET":
                return self.list_users(params, query)
            if method == "POST":
                return self.create_user(self.params(body))
            raise GoTrueError(405, "method_not_allowed", f"{method} not allowed")
        try:
            user_id = str(uuid.UUID(rest))
        except ValueError:
            raise GoTrueError(404, "validation_failed", "user_id must be an UUID") from None
        with self.pool.connection() as conn:
            row = self.find(conn, user_id)
            if row is None:
                raise GoTrueError(404, "user_not_found", "User not found")
            if method == "GET":
                return 200, json.dumps(user_json(row)).encode(), {}
            if method == "PUT":
                return self.update_user(conn, row, self.params(body))
            if method == "DELETE":
                return self.delete_user(conn, row, body)
        raise GoTrueError(405, "method_not_allowed", f"{method} not allowed")

    @staticmethod
    def params(body: bytes) -> dict:
        try:
            params = json.loads(body or b"{}")
        except ValueError as exc:
            raise GoTrueError(400, "bad_json",
                              f"Could not parse request body as JSON: {exc}") from None
        if not isinstance(params, dict):
            raise GoTrueError(400, "bad_json", "Could not parse request body as JSON: "
                              "json: cannot unmarshal into Go value of type AdminUserParams")
        return params

    @staticmethod
    def find(conn, user_id: str) -> dict | None:
        return conn.execute("SELECT * FROM auth.users WHERE id = %s", [user_id]).fetchone()

    # -- GET /admin/users

    def list_users(self, params: dict, query: str) -> tuple[int, bytes, dict]:
        def number(name: str, default: int) -> int:
            text = (params.get(name) or [""])[0]
            if text == "":
                return default
            if not text.isdigit():
                raise GoTrueError(400, "validation_failed", f"Bad Pagination Parameters: "
                                  f"strconv.ParseUint: parsing {text!r}: invalid syntax")
            value = int(text)
            if value == 0:
                raise GoTrueError(400, "validation_failed",
                                  f"Bad Pagination Parameters: {name} must be greater than 0")
            if name == "per_page" and value > MAX_PER_PAGE:
                raise GoTrueError(400, "validation_failed", f"Bad Pagination Parameters: "
                                  f"per_page must not exceed {MAX_PER_PAGE}")
            return value

        page, per_page = number("page", 1), number("per_page", DEFAULT_PER_PAGE)
        with self.pool.connection() as conn:
            where = "instance_id = %s AND aud = %s"
            args = [NIL_INSTANCE, DEFAULT_AUD]
            # created_at DESC and nothing else: users created in the same instant come in
            # whatever order PostgreSQL picks, from one page to the next.
            rows = conn.execute(f"SELECT * FROM auth.users WHERE {where} "
                                f"ORDER BY created_at DESC LIMIT %s OFFSET %s",
                                [*args, per_page, (page - 1) * per_page]).fetchall()
            total = conn.execute(f"SELECT count(*) AS n FROM auth.users WHERE {where}",
                                 args).fetchone()["n"]
        pages = max(-(-total // per_page), 1)
        links = []
        if pages > page:
            links.append(f'<{self.page_url(query, page + 1)}>; rel="next"')
        links.append(f'<{self.page_url(query, pages)}>; rel="last"')
        body = json.dumps({"users": [user_json(r) for r in rows], "aud": DEFAULT_AUD}).encode()
        return 200, body, {"Link": ", ".join(links), "X-Total-Count": str(total)}

    @staticmethod
    def page_url(query: str, page: int) -> str:
        pairs = [(k, v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)
                 if k != "page"]
        return "/admin/users?" + urllib.parse.urlencode(sorted(pairs + [("page", str(page))]))

    # -- POST /admin/users

    def create_user(self, params: dict) -> tuple[int, bytes, dict]:
        aud = params.get("aud") or DEFAULT_AUD
        email, phone = params.get("email") or "", params.get("phone") or ""
        if not email and not phone:
            raise GoTrueError(400, "validation_failed",
                              "Cannot create a user without either an email or phone")
        providers = []
        with self.pool.connection() as conn:
            if email:
                email = validate_email(email)
                if conn.execute("SELECT 1 FROM auth.users WHERE email = %s AND aud = %s AND "
                                "NOT is_sso_user", [email, aud]).fetchone():
                    raise GoTrueError(422, "email_exists", DUPLICATE_EMAIL)
                providers.append("email")
            if phone:
                phone = validate_phone(phone)
                if conn.execute("SELECT 1 FROM auth.users WHERE phone = %s AND aud = %s",
                                [phone, aud]).fetchone():
                    raise GoTrueError(422, "phone_exists",
                                      "Phone number already registered by another user")
                providers.append("phone")
            password, password_hash = params.get("password"), params.get("password_hash") or ""
            if password is not None and password_hash:
                raise GoTrueError(400, "validation_failed",
                                  "Only a password or a password hash should be provided")
            encrypted = password_hash or fake_hash(password or secrets.token_urlsafe(48))
            user_id = str(uuid.uuid4())
            if params.get("id"):
                try:
                    user_id = str(uuid.UUID(str(params["id"])))
                except ValueError:
                    raise GoTrueError(400, "validation_failed",
                                      "ID must conform to the uuid v4 format") from None
                if user_id == NIL_INSTANCE:
                    raise GoTrueError(400, "validation_failed", "ID cannot be a nil uuid")
            ban = None
            if params.get("ban_duration"):
                ban = (datetime.timedelta(0) if params["ban_duration"] == "none"
                       else parse_duration(params["ban_duration"]))
            app_metadata = merged({"provider": providers[0], "providers": providers},
                                  params.get("app_metadata") or {})
            try:
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO auth.users (instance_id, id, aud, role, email, phone, "
                        "encrypted_password, raw_app_meta_data, raw_user_meta_data, "
                        "is_super_admin, created_at, updated_at, email_confirmed_at, "
                        "phone_confirmed_at, banned_until) VALUES (%s, %s, %s, %s, %s, %s, %s, "
                        "%s, %s, false, now(), now(), CASE WHEN %s THEN now() END, "
                        "CASE WHEN %s THEN now() END, CASE WHEN %s::interval > '0' THEN "
                        "now() + %s::interval END)",
                        [NIL_INSTANCE, user_id, aud, params.get("role") or DEFAULT_AUD,
                         email or None, phone or None, encrypted, json.dumps(app_metadata),
                         json.dumps(params.get("user_metadata") or {}),
                         bool(params.get("email_confirm")), bool(params.get("phone_confirm")),
                         ban, ban])
            except psycopg.Error:
                raise GoTrueError(500, "unexpected_failure",
                                  "Database error creating new user") from None
            row = self.find(conn, user_id)
        return 200, json.dumps(user_json(row)).encode(), {}

    # -- PUT /admin/users/{id}

    def update_user(self, conn, row: dict, params: dict) -> tuple[int, bytes, dict]:
        sets, args = ["updated_at = now()"], []
        if params.get("email"):
            sets.append("email = %s")
            args.append(validate_email(params["email"]))
        if params.get("phone"):
            sets.append("phone = %s")
            args.append(validate_phone(params["phone"]))
        if params.get("ban_duration"):
            ban = (datetime.timedelta(0) if params["ban_duration"] == "none"
                   else parse_duration(params["ban_duration"]))
            sets.append("banned_until = CASE WHEN %s::interval > '0' THEN now() + %s::interval "
                        "END")
            args += [ban, ban]
        if params.get("password") is not None:
            sets.append("encrypted_password = %s")
            args.append(fake_hash(params["password"]))
        if params.get("role"):
            sets.append("role = %s")
            args.append(params["role"])
        if params.get("email_confirm"):
            sets.append("email_confirmed_at = now()")
        if params.get("phone_confirm"):
            sets.append("phone_confirmed_at = now()")
        if params.get("app_metadata") is not None:
            sets.append("raw_app_meta_data = %s")
            args.append(json.dumps(merged(row["raw_app_meta_data"], params["app_metadata"])))
        if params.get("user_metadata") is not None:
            sets.append("raw_user_meta_data = %s")
            args.append(json.dumps(merged(row["raw_user_meta_data"], params["user_metadata"])))
        try:
            with conn.transaction():
                conn.execute(f"UPDATE auth.users SET {', '.join(sets)} WHERE id = %s",
                             [*args, row["id"]])
        except psycopg.Error:
            raise GoTrueError(500, "unexpected_failure", "Error updating user") from None
        return 200, json.dumps(user_json(self.find(conn, str(row["id"])))).encode(), {}

    # -- DELETE /admin/users/{id}

    def delete_user(self, conn, row: dict, body: bytes) -> tuple[int, bytes, dict]:
        soft = bool(self.params(body).get("should_soft_delete")) if body else False
        try:
            with conn.transaction():
                if soft:
                    conn.execute("UPDATE auth.users SET deleted_at = now() WHERE id = %s "
                                 "AND deleted_at IS NULL", [row["id"]])
                else:
                    conn.execute("DELETE FROM auth.users WHERE id = %s", [row["id"]])
        except psycopg.Error:
            raise GoTrueError(500, "unexpected_failure", "Database error deleting user") from None
        return 200, b"{}", {}
