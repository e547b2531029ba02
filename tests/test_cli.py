"""The command-line skeleton: configuration, exit codes, messages and files, without a server.

Layers (see STYLE.md): pure functions imported from the module, main([...]) in-process with
tmp_path, and a few subprocess runs of `python supabase_backup.py ...`.
"""

import os
import stat
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import supabase_backup  # noqa: E402
from helpers import SETTINGS, isolated_work_dir  # noqa: E402

URL = "https://abcdefghijklmnop.supabase.co"
# Distinctive, so that any leak into output or files is found by a plain substring search.
FAKE_KEY = "sb_secret_TESTKEY-d0-not-leak-7f3a9c1e5b2d4f6a8c0e"
COMMANDS = ["backup", "check", "list", "restore", "rollback", "list-safety", "cleanup-safety",
            "diff"]
# A command that loads the configuration, starts the log and then fails offline, before any
# request (the file does not exist): the configuration tests need no server.
CONFIGURED_COMMAND = ["restore", "--safe", "--file", "no_such_backup.json.gz"]
CONFIGURED_EXIT = 12  # the file does not exist: nothing done


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A working directory with no settings anywhere: no environment, no .env, empty script dir."""
    return isolated_work_dir(tmp_path, monkeypatch)


@pytest.fixture
def configured(home, monkeypatch):
    monkeypatch.setenv("SUPABASE_URL", URL)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", FAKE_KEY)
    return home


def run(capsys, *argv):
    """main() in-process; returns (exit code, stdout, stderr)."""
    code = supabase_backup.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


# --- pure functions -----------------------------------------------------------------------------

def test_load_config_precedence_environment_then_working_directory_then_script(home):
    (supabase_backup.SCRIPT_DIR / ".env").write_text(
        "SUPABASE_URL=https://script.supabase.co\nSUPABASE_SERVICE_ROLE_KEY=script-key\n"
        "BACKUP_TABLES=from_script\n")
    (home / ".env").write_text("SUPABASE_URL=https://cwd.supabase.co/\n")
    environ = {"SUPABASE_SERVICE_ROLE_KEY": FAKE_KEY}

    config = supabase_backup.load_config(Namespace(data_dir=None), environ)

    assert config.url == "https://cwd.supabase.co"
    assert config.key == FAKE_KEY
    assert config.settings["BACKUP_TABLES"] == "from_script"
    assert config.data_dir == supabase_backup.SCRIPT_DIR
    assert FAKE_KEY not in repr(config)


def test_load_config_leaves_os_environ_alone(home):
    (home / ".env").write_text(f"SUPABASE_URL={URL}\nSUPABASE_SERVICE_ROLE_KEY={FAKE_KEY}\n")
    supabase_backup.load_config(Namespace(data_dir=None), {})
    assert "SUPABASE_URL" not in os.environ


@pytest.mark.parametrize("url", ["abcd.supabase.co", "ftp://abcd.supabase.co", "https://",
                                 "https://abcd supabase.co", "https://abcd.supabase.co/rest/v1"])
def test_malformed_url_is_a_config_error_naming_the_setting(home, url):
    with pytest.raises(supabase_backup.ConfigError, match="SUPABASE_URL"):
        supabase_backup.load_config(Namespace(data_dir=None),
                                    {"SUPABASE_URL": url, "SUPABASE_SERVICE_ROLE_KEY": FAKE_KEY})


def test_key_pasted_into_url_is_refused_without_echoing_it(home):
    with pytest.raises(supabase_backup.ConfigError) as caught:
        supabase_backup.load_config(Namespace(data_dir=None), {"SUPABASE_URL": FAKE_KEY})
    assert FAKE_KEY not in str(caught.value)


def test_data_folders_are_created_private(home):
    config = supabase_backup.load_config(
        Namespace(data_dir="data"), {"SUPABASE_URL": URL, "SUPABASE_SERVICE_ROLE_KEY": FAKE_KEY})
    (home / "data" / "backups").mkdir(parents=True, mode=0o755)  # e.g. from a git checkout

    paths = supabase_backup.data_paths(config)

    assert [p.name for p in paths] == ["backups", "safety_backups", "summaries", "logs"]
    for folder in paths:
        assert folder.parent == home / "data"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


# --- main() in-process --------------------------------------------------------------------------

def test_missing_url_exits_3_with_one_line_naming_it(home, capsys):
    code, out, err = run(capsys, "--data-dir", str(home), "backup")
    assert code == 3
    assert out == ""
    assert len(err.splitlines()) == 1
    assert "SUPABASE_URL" in err and ".env" in err


def test_malformed_url_exits_3(home, capsys, monkeypatch):
    monkeypatch.setenv("SUPABASE_URL", "abcd.supabase.co")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", FAKE_KEY)
    code, _, err = run(capsys, "--data-dir", str(home), "backup")
    assert code == 3
    assert "SUPABASE_URL" in err and "not a valid URL" in err


def test_missing_key_exits_3_naming_the_setting(home, capsys, monkeypatch):
    monkeypatch.setenv("SUPABASE_URL", URL)
    code, _, err = run(capsys, "--data-dir", str(home), "backup")
    assert code == 3
    assert len(err.splitlines()) == 1
    assert "SUPABASE_SERVICE_ROLE_KEY" in err


def test_supabase_key_is_accepted_as_fallback(home, capsys, monkeypatch):
    monkeypatch.setenv("SUPABASE_URL", URL)
    monkeypatch.setenv("SUPABASE_KEY", FAKE_KEY)
    code, _, _ = run(capsys, "--data-dir", str(home), *CONFIGURED_COMMAND)
    assert code == CONFIGURED_EXIT


def test_environment_wins_over_dotenv(home, capsys, monkeypatch):
    (home / ".env").write_text("SUPABASE_URL=not a url\nSUPABASE_SERVICE_ROLE_KEY=x\n")
    monkeypatch.setenv("SUPABASE_URL", URL)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", FAKE_KEY)
    code, _, _ = run(capsys, "--data-dir", str(home), *CONFIGURED_COMMAND)
    assert code == CONFIGURED_EXIT


def test_dotenv_in_working_directory_is_read(home, capsys):
    (home / ".env").write_text(f"SUPABASE_URL={URL}\nSUPABASE_SERVICE_ROLE_KEY={FAKE_KEY}\n")
    code, _, _ = run(capsys, "--data-dir", str(home), *CONFIGURED_COMMAND)
    assert code == CONFIGURED_EXIT


def test_dotenv_next_to_script_is_read_and_data_goes_next_to_script(home, capsys):
    script_dir = supabase_backup.SCRIPT_DIR
    (script_dir / ".env").write_text(f"SUPABASE_URL={URL}\nSUPABASE_SERVICE_ROLE_KEY={FAKE_KEY}\n")
    code, _, _ = run(capsys, *CONFIGURED_COMMAND)
    assert code == CONFIGURED_EXIT
    assert (script_dir / "logs" / "supabase_backup.log").is_file()
    assert not (home / "logs").exists()


def test_supabase_backup_dir_moves_the_data_folder(configured, capsys, monkeypatch):
    monkeypatch.setenv("SUPABASE_BACKUP_DIR", str(configured / "elsewhere"))
    code, _, _ = run(capsys, *CONFIGURED_COMMAND)
    assert code == CONFIGURED_EXIT
    assert (configured / "elsewhere" / "logs" / "supabase_backup.log").is_file()


def test_the_configured_command_fails_offline_with_one_line_and_writes_only_the_log(configured,
                                                                                    capsys):
    code, out, err = run(capsys, "--data-dir", str(configured), *CONFIGURED_COMMAND)
    assert code == CONFIGURED_EXIT
    assert out == ""
    assert err.splitlines() == [err.strip()]
    assert err.startswith("supabase_backup: error: no file no_such_backup.json.gz")
    assert files_under(configured) == ["logs/supabase_backup.log"]


def test_service_key_never_appears_in_output_or_log(configured, capsys):
    code, out, err = run(capsys, "--data-dir", str(configured), "--verbose", *CONFIGURED_COMMAND)
    assert code == CONFIGURED_EXIT
    assert "started" in err  # verbose output was really produced
    log_text = (configured / "logs" / "supabase_backup.log").read_text()
    assert FAKE_KEY not in out + err + log_text


def test_a_log_line_carrying_the_key_is_redacted(configured):
    supabase_backup.setup_console_logging(quiet=True)
    try:
        supabase_backup.begin_run(Namespace(data_dir=str(configured), command="backup"))
        supabase_backup.log.info("request failed with headers apikey=%s", FAKE_KEY)
        try:
            raise RuntimeError(f"Bearer {FAKE_KEY}")
        except RuntimeError:
            supabase_backup.log.exception("boom")
    finally:
        supabase_backup.close_logging()
    log_text = (configured / "logs" / "supabase_backup.log").read_text()
    assert "apikey=[redacted]" in log_text and "Bearer [redacted]" in log_text
    assert FAKE_KEY not in log_text


def test_help_lists_every_command_and_the_exit_codes(home, capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in COMMANDS:
        assert command in out
    for line in ("0    success", "3    configuration error", "5    another run holds the lock",
                 "7    backup file invalid", "8    restore failed and was rolled back",
                 "9    restore failed AND rollback failed", "11   restore failed and was kept",
                 "10   differences found (diff)", "130  interrupted (Ctrl-C)"):
        assert line in out
    assert files_under(home) == [] and files_under(supabase_backup.SCRIPT_DIR) == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_help_has_examples(home, capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert "Examples:" in out and f"python supabase_backup.py {command}" in out


@pytest.mark.parametrize("argv", [["frobnicate"], ["restore"], ["check"],
                                  ["backup", "--keep", "0"], ["backup", "--keep", "two"],
                                  ["backup", "--keep-days", "-1"], ["backup", "--tables", "a,,b"],
                                  ["backup", "--exclude", ","], ["backup", "--frobnicate"],
                                  ["-q", "-v", "backup"],
                                  ["backup", "--tables", "a", "--exclude", "b"]])
def test_usage_errors_exit_2_and_create_no_files(home, capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "error:" in err
    assert files_under(home) == [] and files_under(supabase_backup.SCRIPT_DIR) == []


def test_global_options_are_also_accepted_after_the_command(configured, capsys):
    code, _, err = run(capsys, *CONFIGURED_COMMAND, "--verbose", "--data-dir", str(configured))
    assert code == CONFIGURED_EXIT
    assert "started" in err  # --verbose after the command took effect
    assert (configured / "logs" / "supabase_backup.log").is_file()


def test_unexpected_error_is_one_line_naming_the_log_with_traceback_in_it(configured, capsys,
                                                                          monkeypatch):
    def broken(args):
        raise RuntimeError("something nobody expected")
    monkeypatch.setattr(supabase_backup, "cmd_backup", broken)

    code, _, err = run(capsys, "--data-dir", str(configured), "backup")

    log_file = configured / "logs" / "supabase_backup.log"
    assert code == 1
    assert err.splitlines() == [err.strip()]
    assert "something nobody expected" in err and str(log_file) in err
    assert "Traceback" not in err
    assert "Traceback" in log_file.read_text()


def test_ctrl_c_exits_130(configured, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(supabase_backup, "cmd_backup", interrupted)
    code, _, err = run(capsys, "--data-dir", str(configured), "backup")
    assert code == 130
    assert "interrupted" in err


# --- subprocess: what cron and a person at a terminal see ---------------------------------------

def run_script(script, *argv, **settings):
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(settings)
    return subprocess.run([sys.executable, str(script), *argv], cwd=script.parent.parent, env=env,
                          capture_output=True, text=True, timeout=60)


def test_script_without_configuration_exits_3_with_one_line(script):
    result = run_script(script, "backup")
    assert result.returncode == 3
    assert len(result.stderr.splitlines()) == 1
    assert "SUPABASE_URL" in result.stderr and "Traceback" not in result.stderr
    assert not (script.parent / "logs").exists()


def test_script_failing_offline_exits_with_one_line_and_keeps_the_key_out_of_everything(script):
    result = run_script(script, *CONFIGURED_COMMAND, SUPABASE_URL=URL,
                        SUPABASE_SERVICE_ROLE_KEY=FAKE_KEY)
    assert result.returncode == CONFIGURED_EXIT
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert "no file no_such_backup" in result.stderr and "Traceback" not in result.stderr
    log_file = script.parent / "logs" / "supabase_backup.log"  # the data folder is the script's
    assert FAKE_KEY not in result.stderr + log_file.read_text()
    assert files_under(script.parent / "backups") == []


def test_script_help_exits_0(script):
    result = run_script(script, "--help")
    assert result.returncode == 0
    assert "Exit codes:" in result.stdout and "list-safety" in result.stdout
    assert result.stderr == ""
