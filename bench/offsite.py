#!/usr/bin/env python3
"""Benchmark the off-site copy and the encryption of supabase_backup.py (issue #16).

    python bench/offsite.py [--size-mb 200] [--repeat 3] [--quick] [--out PATH]

Starts moto's S3 server (moto[server], requirements-dev.txt) in a process of its own on
127.0.0.1, makes a file of --size-mb random bytes (a .json.gz does not compress further), and
measures, interleaved so that noise on this shared machine spreads over both:

  tool upload   supabase_backup.upload_backup: SHA-256 of the file, the upload (parts of
                S3_PART_SIZE, S3_CONCURRENCY at once, the SHA-256 as metadata), HEAD and compare
  bare upload   boto3's client.upload_file of the same file with boto3's defaults
                (8 MiB parts, 10 threads): the least any client of this server pays

then encryption and decryption of the same file (supabase_backup.encrypt_backup and
decrypt_backup, pyrage's streaming encrypt_io/decrypt_io), each in a child process of its own so
that its peak RSS is its own. Writes a Markdown report (default bench/RESULTS-offsite.md) with
the command, the machine and every figure. Not a test; tests/test_offsite.py runs --quick so
that it never rots.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import boto3  # noqa: E402

import supabase_backup  # noqa: E402

BUCKET = "bench-offsite"
CREDENTIALS = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench-secret",
               "region_name": "us-east-1"}

# Each measurement runs in a process of its own, so that its peak RSS (VmHWM, which execve
# resets, unlike getrusage's ru_maxrss) is its own.
CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import boto3, pyrage, supabase_backup as s
from pathlib import Path
mode, source, target, key = sys.argv[2:6]
if mode.endswith("upload"):
    settings = {"AWS_ENDPOINT_URL": key, "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1"}
    client = (s.s3_client(settings) if mode == "tool upload" else
              boto3.client("s3", endpoint_url=key, region_name="us-east-1",
                           aws_access_key_id="bench", aws_secret_access_key="bench-secret"))
started = time.perf_counter()
if mode == "imports only":
    pass
elif mode == "tool upload":
    s.upload_backup(client, s.RemoteLocation(target, "tool/"), Path(source), {"tables": {}})
elif mode == "bare upload":
    client.upload_file(source, target, "bare/" + Path(source).name)
elif mode == "encrypt":
    s.encrypt_backup(Path(source), Path(target), [pyrage.x25519.Recipient.from_str(key)])
else:
    s.decrypt_backup(Path(source), Path(target), [pyrage.x25519.Identity.from_str(key)], source)
seconds = time.perf_counter() - started
status = open("/proc/self/status").read()
peak = int(status.split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server():
    """moto's S3 server in a process of its own; returns (process, endpoint URL)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, url
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise SystemExit("moto's server did not start")
            time.sleep(0.1)


def make_file(path, size):
    with open(path, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))


def child(mode, source, target, key):
    result = subprocess.run([sys.executable, "-c", CHILD, str(REPO), mode, str(source),
                             str(target), key], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def commit():
    """The repository's commit, with + when the work tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "supabase_backup.py"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return head + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def spread(values):
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 MB, once: a smoke run")
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS-offsite.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb, args.repeat = 8, 1
    command = "python bench/offsite.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started_at = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    process, url = start_server()
    try:
        client = boto3.client("s3", endpoint_url=url, **CREDENTIALS)
        client.create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory(prefix="bench-offsite-") as folder:
            folder = Path(folder)
            size = args.size_mb << 20
            path = folder / "supabase_backup_20260101_000000.json.gz"
            make_file(path, size)
            runs = {"tool upload": [], "bare upload": []}
            for round_number in range(args.repeat):
                # Alternate which goes first, so that neither always meets a warm server.
                order = list(runs) if round_number % 2 == 0 else list(runs)[::-1]
                for mode in order:
                    runs[mode].append(child(mode, path, BUCKET, url))
                    client.delete_object(Bucket=BUCKET, Key=mode.split()[0] + "/" + path.name)
            tool = [r["seconds"] for r in runs["tool upload"]]
            bare = [r["seconds"] for r in runs["bare upload"]]
            import pyrage
            identity = pyrage.x25519.Identity.generate()
            encrypt, decrypt = [], []
            baseline = child("imports only", path, path, "")
            for _ in range(args.repeat):
                encrypt.append(child("encrypt", path, folder / (path.name + ".age"),
                                     str(identity.to_public())))
                decrypt.append(child("decrypt", folder / (path.name + ".age"),
                                     folder / "plain.json.gz", str(identity)))
                (folder / "plain.json.gz").unlink()
    finally:
        process.kill()
        process.wait()
    mb = size / 1e6
    tool_rate = [mb / s for s in tool]
    bare_rate = [mb / s for s in bare]
    ratios = [t / b for t, b in zip(tool_rate, bare_rate)]
    per_100 = lambda runs: [r["seconds"] * 100 / mb for r in runs]  # noqa: E731
    lines = [
        "# Benchmark: the off-site copy and encryption",
        "",
        f"Written by `bench/offsite.py` on {started_at:%Y-%m-%d %H:%M} UTC. Command:",
        "",
        "```",
        command.strip(),
        "```",
        "",
        f"Tool: supabase_backup.py {supabase_backup.TOOL_VERSION} (commit {commit()}); file: "
        f"{args.size_mb} MiB of "
        f"random bytes ({size} bytes); {args.repeat} run(s) each, median with the range "
        f"(min-max). The S3 server is moto's (a Python process on the same 2 cores): it, not "
        f"the network, bounds both uploads, so read the ratio, not the MB/s.",
        "",
        "## Machine",
        "",
        f"- nproc: {os.cpu_count()}",
        f"- python: {platform.python_version()}",
        f"- boto3: {boto3.__version__}; pyrage: {importlib.metadata.version('pyrage')}",
        f"- load average at the start (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load_before)}",
        f"- load average at the end (1, 5, 15 min): "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
        "## Upload",
        "",
        "| what | seconds | MB/s | peak RSS of the process (MB) |",
        "| --- | --- | --- | --- |",
        f"| tool upload (SHA-256, upload, HEAD) | {spread(tool)} | {spread(tool_rate)} | "
        f"{spread([r['peak_rss_mb'] for r in runs['tool upload']])} |",
        f"| bare boto3 upload_file | {spread(bare)} | {spread(bare_rate)} | "
        f"{spread([r['peak_rss_mb'] for r in runs['bare upload']])} |",
        "",
        f"Throughput, tool / bare: **{spread(ratios)}** (goal: at least 0.80).",
        "",
        "## Encryption (age, pyrage's streaming encrypt_io / decrypt_io)",
        "",
        "| what | seconds per 100 MB | peak RSS of the process (MB) |",
        "| --- | --- | --- |",
        f"| encrypt_backup | {spread(per_100(encrypt))} | "
        f"{spread([r['peak_rss_mb'] for r in encrypt])} |",
        f"| decrypt_backup | {spread(per_100(decrypt))} | "
        f"{spread([r['peak_rss_mb'] for r in decrypt])} |",
        "",
        f"Each figure is a process of its own; its peak RSS is the whole process (VmHWM). The "
        f"same process that only imports boto3, pyrage and supabase_backup peaks at "
        f"{baseline['peak_rss_mb']:.1f} MB: what a measurement adds is the difference.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
