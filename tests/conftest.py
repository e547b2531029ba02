"""Shared fixtures: one local Supabase stack for the whole run (tests/local_supabase.py).

`stack` hands each test the running stack with faults cleared, the row cap and
statement timeout back at their defaults, and the demo data as demo_schema.sql makes
it. A test that writes asks for `fresh_stack`, which marks the data dirty so that the
next test reloads it (one reload per writing test, none for the tests that only read). `db` is a superuser psycopg connection, for checking the
database through a path that is not the tool's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import FAST_RETRIES, SETTINGS  # noqa: E402
from local_supabase import LocalSupabase  # noqa: E402

import supabase_backup  # noqa: E402

DEFAULT_MAX_ROWS = 1000
DEFAULT_STATEMENT_TIMEOUT = "8s"


@pytest.fixture(scope="session")
def local_stack():
    with LocalSupabase(max_rows=DEFAULT_MAX_ROWS,
                       statement_timeout=DEFAULT_STATEMENT_TIMEOUT) as stack:
        stack.dirty = False
        yield stack


@pytest.fixture
def stack(local_stack):
    if local_stack.dirty:
        local_stack.reset()
        local_stack.dirty = False
    local_stack.faults.clear()
    local_stack.requests.clear()
    yield local_stack
    local_stack.faults.clear()
    local_stack.max_rows = DEFAULT_MAX_ROWS
    local_stack.statement_timeout = DEFAULT_STATEMENT_TIMEOUT


@pytest.fixture
def fresh_stack(stack):
    stack.dirty = True
    return stack


@pytest.fixture
def db(stack):
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def client(stack):
    from supabase import create_client

    return create_client(stack.url, stack.service_role_key)


@pytest.fixture
def data(stack, tmp_path, monkeypatch):
    """A data folder, the stack's URL and service key in the environment, and no other settings."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    script_dir = tmp_path / "script"
    script_dir.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(supabase_backup, "SCRIPT_DIR", script_dir)
    monkeypatch.setattr(supabase_backup, "RETRY_DELAYS", FAST_RETRIES)
    monkeypatch.setenv("SUPABASE_URL", stack.url)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", stack.service_role_key)
    return tmp_path / "data"

