"""The benchmark in miniature, so that bench/bench.py never rots.

bench/bench.py is not part of the test suite: the real run takes about 25 minutes. This runs it
with two tiny tables (1,000 and 2,000 rows, one repeat, a few seconds) through every operation and
every section of its report, in its own local stack, and once more with one tiny table across a
link (--link 10/100, bench/wanlink.py). It asserts that it completes and what the report holds,
never anything about speed.
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


def test_quick_benchmark_across_a_link(tmp_path):
    """--link: the same operations across bench/wanlink.py (one tiny table, RTT 10 ms), side by
    side with loopback, with the bytes that crossed."""
    out = tmp_path / "RESULTS-wan.md"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--sizes", "1000",
                           "--link", "10/100", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    for heading in ("## Across the internet (issue 14)", "### Wall time", "### Ratios",
                    "### Bytes on the wire and round trips", "### What bounds each operation",
                    "## Ratios", "## All figures"):
        assert heading in report, heading
    assert "| rows | operation | loopback | RTT 10 ms, 100 Mbit/s |" in report
    assert "| 1k | RTT 10 ms, 100 Mbit/s | **" in report  # the ratios across the link
    rows = {}
    for line in report.splitlines():
        if line.startswith("| 1k | RTT 10 ms, 100 Mbit/s | ") and " MB | " in line:
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[2]] = cells
    assert set(rows) == {"backup (tool)", "pg_dump \\| gzip", "API read floor",
                         "restore (tool, plain)", "API write floor", "psql COPY",
                         "restore --safe onto the full, unchanged table",
                         "diff of the backup with the full table",
                         "rollback to the backup, onto the full table"}
    # wall, down, up, API requests, turns, connections: a backup reads its bytes down in one
    # turn per request, on one connection; a restore sends its rows up.
    backup, restore = rows["backup (tool)"], rows["restore (tool, plain)"]
    assert float(backup[4].split()[0]) > 0.01 and backup[6] == backup[7] and backup[8] == "1"
    assert float(restore[5].split()[0]) > float(restore[4].split()[0]) > 0
    assert rows["pg_dump \\| gzip"][6] == "0" and int(rows["pg_dump \\| gzip"][7]) > 1
    assert "| 1k | RTT 10 ms, 100 Mbit/s | backup (tool) | " in report


def test_quick_benchmark_refuses_bad_links(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--link", "50ms"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "expected RTT_MS/MBIT like 50/50" in proc.stderr


def test_quick_benchmark_refuses_bad_sizes(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--sizes", "ten"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "expected sizes like 100000,1000000" in proc.stderr
