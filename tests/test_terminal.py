"""A bad day, seen from the terminal (issue 15): what a person at the terminal sees and is asked,
on a normal day and a bad one. Runs where a terminal matters go through a pseudo-terminal (the
pty module), as a person's shell would run them; the rest call main() in-process or run the
script with pipes, as cron and scripts do.
"""

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import supabase_backup  # noqa: E402
from helpers import (  # noqa: E402
    REPO_ROOT, SETTINGS, assert_same_state, database_state, error_line, make_backup, run,
    safety_backup, wait_for)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """The script in a pseudo-terminal of 120 columns: stdin, stdout and stderr are the
    terminal, as when a person runs it; what it shows is collected as it comes."""

    def __init__(self, stack, data, *argv):
        self.master, slave = pty.openpty()
        # A real terminal's size (a new pseudo-terminal has none: 0 columns).
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.set_blocking(self.master, False)
        env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
        env.update(SUPABASE_URL=stack.url, SUPABASE_SERVICE_ROLE_KEY=stack.service_role_key,
                   SUPABASE_BACKUP_DIR=str(data), COLUMNS="120", LINES="40", TERM="xterm")
        self.process = subprocess.Popen([sys.executable, str(REPO_ROOT / "supabase_backup.py"),
                                         *argv], stdin=slave, stdout=slave, stderr=slave,
                                        env=env, cwd=data.parent, start_new_session=True)
        os.close(slave)
        self.shown = b""

    def read(self, timeout=0.1):
        while select.select([self.master], [], [], timeout)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the other end is closed: the process has ended
                return
            if not chunk:
                return
            self.shown += chunk
            timeout = 0.05

    def wait_for_text(self, text, timeout=30):
        deadline = time.monotonic() + timeout
        while text not in self.text:
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.read()
                assert text in self.text, f"{text!r} never shown:\n{self.text}"
            self.read()

    def type(self, line):
        os.write(self.master, line.encode() + b"\r")

    def interrupt(self):
        os.killpg(self.process.pid, signal.SIGINT)  # as Ctrl-C: the whole foreground group

    def finish(self, timeout=60):
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self.read()
        self.read()
        if self.process.poll() is None:
            self.process.kill()
        os.close(self.master)
        return self.process.wait()

    @property
    def text(self):
        return self.shown.decode(errors="replace")

    def lines(self):
        """What stays on the screen, line by line: each line as its last carriage return left
        it (a progress bar redraws itself after one), escape sequences removed."""
        return [ANSI.sub("", line.split("\r")[-1]) for line in
                self.text.replace("\r\n", "\n").split("\n")]


# --- progress -----------------------------------------------------------------------------------

def test_a_restore_on_a_terminal_shows_progress_with_percentages(fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--tables", "users,bookings")
    db.execute("UPDATE bookings SET notes = 'changed'")
    terminal = Terminal(fresh_stack, data, "restore", "--safe", "--file", path.name)

    assert terminal.finish() == 0, terminal.text
    # tqdm's bars: the percentage, the table and its place, while the file is read, the safety
    # backup taken, the plan made, the rows written and verified.
    for label in ("reading " + path.name, "users (table 1 of 2)", "comparing with the live rows",
                  "writing bookings (table 2 of 2)", "verifying"):
        assert re.search(re.escape(label) + r".*\d+%\|", terminal.text), label
    assert "restore complete" in terminal.lines()[-2]


def test_no_progress_bars_under_quiet_or_without_a_terminal(fresh_stack, data, capsys):
    path = make_backup(capsys, data, "--tables", "users")
    terminal = Terminal(fresh_stack, data, "--quiet", "restore", "--safe", "--file", path.name)
    assert terminal.finish() == 0, terminal.text
    assert terminal.text == ""
    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)  # not a terminal
    assert code == 0 and "%|" not in err


# --- Ctrl-C -------------------------------------------------------------------------------------

def test_ctrl_c_on_a_terminal_rolls_back_and_never_glues_a_message_to_a_bar(fresh_stack, db, data,
                                                                            slow_restore_of_users):
    before = database_state(db)
    terminal = Terminal(fresh_stack, data, "restore", "--safe", "--file", slow_restore_of_users.name)
    wait_for(lambda: fresh_stack.writes("users") >= 1, what="the restore to write")
    terminal.read()
    terminal.interrupt()

    assert terminal.finish() == 8, terminal.text
    messages = [line for line in terminal.lines() if "supabase_backup:" in line]
    assert messages and all(line.startswith("supabase_backup:") for line in messages), messages
    assert any("interrupted (Ctrl-C): rolling back" in line for line in messages)
    assert "the database is as before" in messages[-1]
    assert_same_state(database_state(db), before)


# --- questions before rows are deleted -----------------------------------------------------------

def test_rollback_on_a_terminal_shows_its_plan_and_asks_before_writing(fresh_stack, db, data,
                                                                       capsys):
    path = make_backup(capsys, data, "--tables", "app_settings")
    db.execute("DELETE FROM app_settings WHERE key = 'f(x)'")
    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)
    assert code == 0, err
    after_restore = database_state(db)
    writes = fresh_stack.writes()
    safety = safety_backup(data).name  # the restore's (each rollback takes one of its own)

    terminal = Terminal(fresh_stack, data, "rollback", safety)
    terminal.wait_for_text("Type 'rollback' to go on: ")
    terminal.type("no")

    assert terminal.finish() == 0, terminal.text
    assert "0 to insert, 0 to update, 1 to DELETE" in terminal.text
    assert "rollback cancelled; nothing was written" in terminal.text
    assert fresh_stack.writes() == writes and database_state(db) == after_restore

    terminal = Terminal(fresh_stack, data, "rollback", safety)
    terminal.wait_for_text("Type 'rollback' to go on: ")
    terminal.type("rollback")
    assert terminal.finish() == 0, terminal.text
    assert "app_settings: 1 deleted" in terminal.text
    assert db.execute("SELECT count(*) FROM app_settings WHERE key = 'f(x)'").fetchone()[0] == 0


def test_rollback_totals_and_table_lines_say_what_is_deleted(fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--tables", "app_settings")
    db.execute("DELETE FROM app_settings WHERE key IN ('f(x)', 'default currency')")
    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)
    assert code == 0, err

    code, _, err = run(capsys, data, "rollback", "--yes", safety_backup(data).name)

    assert code == 0, err
    assert "app_settings: 5 rows now; 0 to insert, 0 to update, 2 to delete, 3 unchanged" in err
    assert "-> 0 to insert, 0 to update, 2 to delete" in err
    assert "app_settings: 2 deleted (rows the file does not hold)" in err


# --- pipes, interpreters, --json -----------------------------------------------------------------

def script_env(stack, data):
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(SUPABASE_URL=stack.url, SUPABASE_SERVICE_ROLE_KEY=stack.service_role_key,
               SUPABASE_BACKUP_DIR=str(data))
    return env


@pytest.mark.parametrize("argv", [["list"], ["list", "--json"], ["list-safety"],
                                  ["--help"]])
def test_a_pipe_closed_early_is_no_error(stack, data, argv):
    # `... | head -1`: the reader goes away before the tool writes.
    data.mkdir(exist_ok=True)
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "supabase_backup.py"), *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=script_env(stack, data))
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0, stderr
    assert "Traceback" not in stderr and "bug" not in stderr and "BrokenPipe" not in stderr


def test_a_python_without_the_packages_is_told_which_to_use(stack, data):
    # -S: no site-packages, as a system python3 without the requirements.
    done = subprocess.run([sys.executable, "-S", str(REPO_ROOT / "supabase_backup.py"), "backup"],
                          capture_output=True, text=True, env=script_env(stack, data),
                          timeout=60)
    assert done.returncode == 3
    line = error_line(done.stderr, alone=True)
    assert "lacks the package python-dotenv" in line and "-m pip install -r requirements.txt" in line


def test_json_on_failure_prints_the_error_as_json(stack, data, capsys):
    code, out, err = run(capsys, data, "restore", "--safe", "--json", "--file", "nothing.json.gz")
    assert code == 12
    assert json.loads(out) == {"error": error_line(err)[len("supabase_backup: error: "):],
                               "exit_code": 12}


# --- help -----------------------------------------------------------------------------------------

def test_help_lists_each_command_once_with_examples_and_exit_codes(capsys):
    code, out, _ = run(capsys, Path("unused"), "--help")
    assert code == 0
    for command in ("backup", "check", "list", "restore", "rollback", "list-safety",
                    "cleanup-safety", "diff"):
        assert len(re.findall(rf"^  {re.escape(command)}\s", out, re.M)) == 1, command
    assert "Examples:" in out and "Exit codes:" in out and "12   a file named" in out


def test_a_bare_run_prints_the_help_not_just_command_required(capsys):
    code = supabase_backup.main([])
    _, err = capsys.readouterr()
    assert code == 2
    assert "Examples:" in err and "Exit codes:" in err and "restore" in err


# --- files, names, settings -------------------------------------------------------------------------

def test_restore_and_diff_find_a_file_in_either_folder_and_a_missing_one_is_exit_12(
        stack, data, capsys):
    path = make_backup(capsys, data, "--tables", "app_settings")
    moved = data / "safety_backups" / path.name
    path.rename(moved)

    code, _, err = run(capsys, data, "restore", "--safe", "--dry-run", "--file", path.name)
    assert code == 0, err
    code, _, err = run(capsys, data, "diff", "--file", path.name)
    assert code == 0, err
    code, _, err = run(capsys, data, "rollback", "--dry-run", "supabase_backup_19990101_000000.json.gz")
    assert code == 12
    assert "no file supabase_backup_19990101_000000.json.gz" in error_line(err)


def test_backup_output_never_replaces_a_file_without_force(stack, data, capsys, tmp_path):
    target = tmp_path / "today.json.gz"
    target.write_bytes(b"precious")
    code, _, err = run(capsys, data, "backup", "--tables", "app_settings", "--output",
                       str(target))
    assert code == 3 and "exists already" in error_line(err) and "--force" in err
    assert target.read_bytes() == b"precious"

    code, _, err = run(capsys, data, "backup", "--tables", "app_settings", "--output",
                       str(target), "--force")
    assert code == 0, err and target.read_bytes() != b"precious"
    code, _, err = run(capsys, data, "backup", "--tables", "app_settings", "--output",
                       str(tmp_path / "today.backup"))
    assert code == 0 and "a name ending in .json.gz" in err


def test_exclude_naming_no_table_is_an_error_even_when_quiet(stack, data, capsys):
    code, out, err = run(capsys, data, "--quiet", "backup", "--exclude", "boookings")
    assert code == 3 and out == ""
    assert "--exclude names no table called boookings" in error_line(err, alone=True)
    assert not list((data / "backups").glob("supabase_backup_*"))


def test_auth_users_is_said_to_be_outside_a_backup(stack, data, capsys):
    code, _, err = run(capsys, data, "backup", "--tables", "auth.users")
    assert code == 3
    line = error_line(err)
    assert "auth.users is not in the public schema" in line and "with --auth the auth users" in line


def test_a_url_error_says_where_the_url_was_set(stack, data, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("SUPABASE_URL")
    env_file = Path.cwd() / ".env"
    env_file.write_text("SUPABASE_URL=not-a-url\n")
    code, _, err = run(capsys, data, "backup")
    assert code == 3
    assert f"SUPABASE_URL (set in {env_file}) is not a valid URL" in error_line(err)


def test_a_restore_that_leaves_a_table_of_the_file_says_so_in_its_last_line_and_exit_code(
        stack, data, capsys):
    path = make_backup(capsys, data, "--tables", "app_settings,booking_summary")

    code, _, err = run(capsys, data, "restore", "--safe", "--file", path.name)

    assert code == 13, err
    last = err.splitlines()[-1]
    assert last.startswith("restore complete") and "NOT restored: booking_summary" in last


def test_the_plan_shows_rows_added_since_the_backup(fresh_stack, db, data, capsys):
    path = make_backup(capsys, data, "--tables", "app_settings")
    db.execute("INSERT INTO app_settings (key, value) VALUES ('added.later', '1')")
    code, _, err = run(capsys, data, "restore", "--safe", "--dry-run", "--file", path.name)
    assert code == 0, err
    assert "1 row(s) added since the backup: left alone" in err


# --- list -----------------------------------------------------------------------------------------

def test_list_reads_what_the_backup_recorded_and_check_reads_the_file(stack, data, capsys):
    path = make_backup(capsys, data, "--tables", "app_settings,package_tags")
    # The same size and modification time, other bytes: list shows what the backup recorded
    # when it was written and checked (it does not read every file on every call), check reads.
    stat = path.stat()
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    code, out, _ = run(capsys, data, "list")
    assert code == 0 and out.splitlines()[1].split()[-2:] == ["2", "905"]
    code, _, err = run(capsys, data, "check", "--file", path.name)
    assert code == 7 and path.name in error_line(err)
    # A file the index does not know (copied in) is read, and a damaged one is marked.
    copy = path.with_name("supabase_backup_20000101_000000.json.gz")
    copy.write_bytes(bytes(content))
    code, out, err = run(capsys, data, "list")
    assert code == 7 and "DAMAGED" in out.splitlines()[-1]


def test_list_of_another_folder_reads_it_and_writes_nothing_there(stack, data, capsys, tmp_path):
    elsewhere = tmp_path / "offsite" / "copies"
    elsewhere.mkdir(parents=True)
    code, _, err = run(capsys, data, "backup", "--tables", "app_settings", "--output",
                       str(elsewhere))
    assert code == 0, err

    code, out, err = run(capsys, data, "list", str(elsewhere))

    assert code == 0, err
    assert out.splitlines()[1].split()[-2:] == ["1", "5"]
    assert sorted(p.name for p in (tmp_path / "offsite").iterdir()) == ["copies"]
