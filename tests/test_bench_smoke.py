"""The benchmark in miniature, so that bench/bench.py never rots.

bench/bench.py is not part of the test suite: the real run takes about 25 minutes. This runs it
with two tiny tables (1,000 and 2,000 rows, one repeat, a few seconds) through every operation and
every section of its report, in its own local stack. It asserts that it completes and what the
report holds, never anything about speed.
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "bench.py"

SECTIONS = ["## Machine", "## Ratios", "## Targets (issue #7, item 2)", "## All figures",
            "## Scaling: 2k against 1k rows", "## The local server as the bottleneck",
            "## The tables"]
OPERATIONS = ["backup (tool)", "pg_dump \\| gzip", "API read floor", "API read + file format floor",
              "restore (tool, plain)",
              "restore --safe (tool)", "API write floor", "psql COPY",
              "restore --safe onto the full, unchanged table", "diff of the backup with the full table",
              "rollback to the backup, onto the full table"]


def test_quick_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--sizes", "1000,2000",
                           "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    for heading in SECTIONS:
        assert heading in report, heading
    for label in OPERATIONS:
        assert f"| {label} |" in report, label
    assert "python bench/bench.py --quick --sizes 1000,2000 --out" in report
    assert "nproc: " in report and "postgresql: 17" in report
    # Every operation ran against the right table: the report counts its rows and requests.
    assert "| 2k | backup (tool) |" in report
    assert "backup requests = ceil(rows / cap) + a small constant (2k): 6 = 2 + 4" in report


def test_quick_benchmark_refuses_bad_sizes(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--sizes", "ten"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "expected sizes like 100000,1000000" in proc.stderr
