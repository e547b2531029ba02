#!/usr/bin/env python3
"""Benchmark `backup --storage` of supabase_backup.py (issue 17, item 6).

    python bench/storage.py [--repeat 3] [--out bench/RESULTS-storage.md]

Starts the local stack (tests/local_supabase.py) with its demo Storage (three buckets, about
2,900 objects, 76 MiB, one object of 52 MiB) and measures, interleaved so that noise on this
shared machine spreads over all of them, each in a child process of its own (its peak RSS,
VmHWM, is its own):

  first backup    `backup --storage --tables app_settings` into an empty data folder: lists
                  every folder, downloads every object, SHA-256 while streaming to disk
  bare loop       the same objects (names taken from the database) downloaded one after the
                  other with httpx through one kept-alive connection, each streamed to a file;
                  no listing, no hashing, no manifest: the least any client of this server pays
  second night    the same backup again into the folder of the first: nothing changed, so
                  only listing requests are expected, and no download

The server counts what it was asked (stack.requests), so the report gives the requests of each
run by kind. Writes a Markdown report with the command, the machine and every figure.
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from local_supabase import LocalSupabase  # noqa: E402

import supabase_backup  # noqa: E402

# The child: one measurement in a process of its own; prints its peak RSS (kB) last.
CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
mode = sys.argv[2]
if mode == "tool":
    import supabase_backup
    code = supabase_backup.main(["--quiet", "--data-dir", sys.argv[3], "backup", "--storage",
                                 "--tables", "app_settings"])
    assert code == 0, code
else:
    import httpx, urllib.parse
    url, key, listing, folder = sys.argv[3:7]
    headers = {"apikey": key, "Authorization": "Bearer " + key}
    with httpx.Client(http2=True, timeout=120) as client, open(listing, encoding="utf-8") as f:
        for number, line in enumerate(f):
            bucket, name = line.rstrip("\\n").split("\\t", 1)
            path = urllib.parse.quote(bucket, safe="") + "/" + "/".join(
                urllib.parse.quote(p, safe="") for p in name.split("/"))
            with client.stream("GET", f"{url}/storage/v1/object/{path}", headers=headers) as r:
                r.raise_for_status()
                with open(f"{folder}/{number}", "wb") as out:
                    for chunk in r.iter_bytes(1 << 20):
                        out.write(chunk)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(line.split()[1])
"""


def child(stack, mode, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE", "BACKUP"))}
    env.update(SUPABASE_URL=stack.url, SUPABASE_SERVICE_ROLE_KEY=stack.service_role_key)
    stack.requests.clear()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO), mode, *args], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    kinds = Counter(r.table for r in stack.requests if r.table)
    return {"seconds": seconds, "rss_mb": int(proc.stdout.split()[-1]) / 1024,
            "requests": dict(kinds)}


def median_range(values, digits=2):
    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS-storage.md"))
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    results = {"first backup": [], "bare loop": [], "second night": []}
    with LocalSupabase() as stack, tempfile.TemporaryDirectory() as work:
        import psycopg
        with psycopg.connect(stack.database_url) as conn:
            objects = conn.execute("SELECT bucket_id, name, (metadata->>'size')::bigint FROM "
                                   "storage.objects ORDER BY bucket_id, name").fetchall()
        total = sum(size for _, _, size in objects)
        listing = Path(work) / "objects.tsv"
        listing.write_text("".join(f"{b}\t{n}\n" for b, n, _ in objects), encoding="utf-8")
        for run in range(args.repeat):
            data = Path(work) / f"data{run}"
            results["first backup"].append(child(stack, "tool", str(data)))
            bare = Path(work) / f"bare{run}"
            bare.mkdir()
            results["bare loop"].append(child(stack, "bare", stack.url, stack.service_role_key,
                                              str(listing), str(bare)))
            results["second night"].append(child(stack, "tool", str(data)))
            for folder in (data, bare):
                subprocess.run(["rm", "-rf", str(folder)], check=True)
    load_end = os.getloadavg()
    mib = total / 1024 / 1024
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        "# Benchmark: Storage objects (backup --storage)", "",
        f"Written by `bench/storage.py` on {now:%Y-%m-%d %H:%M} UTC. Command:", "", "```",
        "python bench/storage.py" + (f" --repeat {args.repeat}" if args.repeat != 3 else ""),
        "```", "",
        f"Tool: supabase_backup.py {supabase_backup.TOOL_VERSION}; the local stack's demo "
        f"Storage: {len(objects)} objects in 3 buckets, {mib:.1f} MiB, the largest "
        f"{max(s for _, _, s in objects) / 1024 / 1024:.0f} MiB; {args.repeat} run(s) each, "
        f"interleaved, median with the range (min-max). Client and server (a Python "
        f"ThreadingHTTPServer over PostgreSQL and files) share this machine's cores, so read "
        f"the ratio, not the MB/s.", "",
        "## Machine", "",
        f"- nproc: {os.cpu_count()}",
        f"- python: {platform.python_version()}",
        f"- load average at the start (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load_start)}",
        f"- load average at the end (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load_end)}",
        "", "## Figures", "",
        "| what | seconds | MiB/s | objects/s | peak RSS of the process (MB) | requests "
        "(last run, by kind) |",
        "| --- | --- | --- | --- | --- | --- |"]
    for what, runs in results.items():
        seconds = [r["seconds"] for r in runs]
        kinds = ", ".join(f"{k.removeprefix('storage.')}: {v}" for k, v in
                          sorted(runs[-1]["requests"].items()))
        lines.append(f"| {what} | {median_range(seconds)} | "
                     f"{median_range([mib / s for s in seconds], 1)} | "
                     f"{median_range([len(objects) / s for s in seconds], 0)} | "
                     f"{median_range([r['rss_mb'] for r in runs], 1)} | {kinds} |")
    first = [r["seconds"] for r in results["first backup"]]
    bare = [r["seconds"] for r in results["bare loop"]]
    second = results["second night"]
    ratios = [b / f for b, f in zip(bare, first)]
    lines += ["", f"Throughput, first backup / bare download loop: "
                  f"**{median_range(ratios)}** (the backup also lists every folder, hashes every "
                  f"byte, syncs the new objects to disk and writes the manifest). Peak RSS: the "
                  f"largest object is {max(s for _, _, s in objects) / 1024 / 1024:.0f} MiB; a "
                  f"backup's memory does not grow with it (compare the second night, which "
                  f"downloads nothing).", "",
              f"Second night, nothing changed: downloads "
              f"{sorted({r['requests'].get('storage.download', 0) for r in second})}, listing "
              f"requests {sorted({r['requests'].get('storage.list', 0) for r in second})} "
              f"(one per folder per page), "
              f"{median_range([r['seconds'] for r in second])} s.", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
