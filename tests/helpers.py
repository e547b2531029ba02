"""Small helpers the test files share (fixtures live in conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import supabase_backup  # noqa: E402

# Every setting the tool reads: tests clear them so that no real .env or environment leaks in.
SETTINGS = ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_KEY", "SUPABASE_BACKUP_DIR",
            "BACKUP_TABLES", "CRITICAL_TABLES", "VERIFY_IGNORE_COLUMNS")
FAST_RETRIES = (0.01, 0.01, 0.01)


def run(capsys, data, *argv):
    """main() in-process with --data-dir; returns (exit code, stdout, stderr)."""
    code = supabase_backup.main(["--data-dir", str(data), *argv])
    out, err = capsys.readouterr()
    return code, out, err
