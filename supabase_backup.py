#!/usr/bin/env python3
"""Back up and restore the data in a Supabase project, with a safety net.

supabase_backup reads the tables of a Supabase project through its REST API
with the service role key and writes them to one gzip-compressed JSON file.
It restores such a file only behind a safety net: a safety backup of the
current data first, validation before anything is written, verification
afterwards, and an automatic rollback if anything fails (see SAFETY.md).

Status of version 0.1.0: this is the skeleton. The configuration and the
command line below work; every command checks the configuration and then
refuses with exit code 69, reading and writing no data.

Commands:
  backup       back up tables to backups/supabase_backup_YYYYMMDD_HHMMSS.json.gz
               (coming with issue #3)
  restore      restore a backup file; with --safe a safety backup is taken
               first and a failed restore is rolled back (coming with issue #4)
  rollback     bring tables back to a safety backup (coming with issue #5)
  list-safety  list the safety backups, newest first (coming with issue #5)

Exit codes:
  0    success
  1    unexpected internal error (one line on stderr, traceback only in the
       log file)
  2    usage error (argparse)
  3    configuration error (missing/invalid SUPABASE_URL or key, key that is
       not the service role)
  4    connection or API failure
  5    another run holds the lock
  6    backup incomplete (a table could not be read completely; no backup
       file written)
  7    backup file invalid (validation refused it; database untouched)
  8    restore failed and was rolled back (database as before)
  9    restore failed AND rollback failed (critical: the message names the
       rollback command)
  10   differences found (diff)
  69   not implemented yet in this version
  130  interrupted (Ctrl-C)

Configuration, read from the environment, else from .env in the working
directory, else from .env next to this script (see .env.example):
  SUPABASE_URL               the project URL, e.g. https://abcd.supabase.co
  SUPABASE_SERVICE_ROLE_KEY  the service role key (SUPABASE_KEY is accepted
                             when SUPABASE_SERVICE_ROLE_KEY is not set)
  SUPABASE_BACKUP_DIR        the data folder holding backups/, safety_backups/,
                             summaries/ and logs/ (default: the folder of
                             this script; --data-dir overrides it)
Every run of a command appends to logs/supabase_backup.log in the data folder.
The service key is never printed or logged.
"""

import argparse
import logging
import logging.handlers
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple

from dotenv import dotenv_values

TOOL_VERSION = "0.1.0"
FORMAT_NAME = "supabase_backup"
FORMAT_VERSION = 1

PROG = "supabase_backup.py"
# The data folder defaults to the script's own folder, so that cron, which starts jobs in $HOME,
# still writes next to the script.
SCRIPT_DIR = Path(__file__).resolve().parent

BACKUP_DIR = "backups"
SAFETY_DIR = "safety_backups"
SUMMARY_DIR = "summaries"
LOG_DIR = "logs"
LOG_FILE_NAME = "supabase_backup.log"
LOG_FILE_MAX_BYTES = 5 * 1024 * 1024
LOG_FILE_BACKUPS = 5

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_CONNECTION = 4
EXIT_LOCKED = 5
EXIT_INCOMPLETE = 6
EXIT_INVALID_BACKUP = 7
EXIT_ROLLED_BACK = 8
EXIT_ROLLBACK_FAILED = 9
EXIT_DIFFERENCES = 10
EXIT_NOT_IMPLEMENTED = 69
EXIT_INTERRUPTED = 130

log = logging.getLogger("supabase_backup")


class BackupError(Exception):
    """A failure a person can act on: main() prints the message as one line, exits exit_code."""

    exit_code = EXIT_INTERNAL


class ConfigError(BackupError):
    """The configuration is missing or invalid (SUPABASE_URL, the key, the data folder)."""

    exit_code = EXIT_CONFIG


class ConnectionFailure(BackupError):
    """The Supabase API could not be reached or answered with an error."""

    exit_code = EXIT_CONNECTION


class LockedError(BackupError):
    """Another backup or restore holds the lock on the data folder."""

    exit_code = EXIT_LOCKED


class IncompleteBackupError(BackupError):
    """A table could not be read completely, so no backup file was written."""

    exit_code = EXIT_INCOMPLETE


class ValidationError(BackupError):
    """A backup file was refused before anything was written to the database."""

    exit_code = EXIT_INVALID_BACKUP


class RestoreError(BackupError):
    """A restore failed and was rolled back: the database is as it was before."""

    exit_code = EXIT_ROLLED_BACK


class RollbackFailedError(BackupError):
    """A restore failed and so did its rollback: the message names the command that recovers."""

    exit_code = EXIT_ROLLBACK_FAILED

    def __init__(self, message, rollback_command):
        super().__init__(f"{message}; CRITICAL: the database may be partly restored, "
                         f"run now: {rollback_command}")
        self.rollback_command = rollback_command


class NotImplementedYetError(BackupError):
    """A command this version does not have yet; it has touched nothing."""

    exit_code = EXIT_NOT_IMPLEMENTED

    def __init__(self, command, issue, untouched):
        super().__init__(f"{command} is not implemented yet in this version ({TOOL_VERSION}, "
                         f"tracked in issue #{issue}); {untouched}")


# --- Configuration ----------------------------------------------------------------------------

URL_PATTERN = re.compile(r"https?://[^/\s]+(/\S*)?")


@dataclass(frozen=True)
class Config:
    """The settings of one run, validated."""

    url: str
    key: str = field(repr=False)
    key_setting: str  # which setting held the key: SUPABASE_SERVICE_ROLE_KEY or SUPABASE_KEY
    data_dir: Path
    sources: tuple  # where the settings were read, highest precedence first
    # Every setting (environment over .env files), for the settings later versions read,
    # such as BACKUP_TABLES. It holds the key too, hence repr=False.
    settings: Mapping = field(repr=False)

    @property
    def host(self):
        """The project's host name, safe to print and to record in a backup file."""
        return self.url.split("://", 1)[1].split("/", 1)[0]


class DataPaths(NamedTuple):
    """The four folders of the data folder."""

    backups: Path
    safety_backups: Path
    summaries: Path
    logs: Path


def dotenv_files():
    """The .env files to read, highest precedence first: the working directory's, the script's."""
    candidates = []
    try:
        candidates.append(Path.cwd() / ".env")
    except OSError:  # the working directory was deleted under us
        pass
    candidates.append(SCRIPT_DIR / ".env")
    files = []
    for candidate in candidates:
        if candidate.is_file() and not any(candidate.samefile(known) for known in files):
            files.append(candidate)
    return files


def setting_layers(environ=None):
    """Each source of settings as (name, values), highest precedence first; empty means unset."""
    environ = os.environ if environ is None else environ
    layers = [("environment", environ)]
    for env_file in dotenv_files():
        try:
            values = dotenv_values(env_file, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {env_file}: {exc}; fix or remove that file") from None
        layers.append((str(env_file), values))
    return [(name, {key: value.strip() for key, value in values.items()
                    if value is not None and value.strip()})
            for name, values in layers]


def merge_settings(layers):
    """One mapping of every setting, each taken from the highest-precedence layer that sets it."""
    settings = {}
    for _, values in reversed(layers):
        settings.update(values)
    return settings


def resolve_data_dir(args, settings):
    """The data folder: --data-dir, else SUPABASE_BACKUP_DIR, else the script's folder."""
    value = getattr(args, "data_dir", None) or settings.get("SUPABASE_BACKUP_DIR")
    if not value:
        return SCRIPT_DIR
    # Relative paths are taken from the working directory, like any other path on a command line.
    return (Path.cwd() / Path(value).expanduser()).resolve()


def check_url(url, setting="SUPABASE_URL"):
    """Return the project URL without a trailing slash, or raise ConfigError saying what to fix."""
    example = "e.g. https://abcd.supabase.co (Project Settings > API in the dashboard)"
    if url.startswith(("eyJ", "sb_")):
        # A key pasted into the URL setting: say so without echoing it.
        raise ConfigError(f"{setting} holds what looks like an API key; set {setting} to the "
                          f"project URL, {example}")
    if not URL_PATTERN.fullmatch(url):
        shown = url if len(url) <= 60 else url[:57] + "..."
        raise ConfigError(f"{setting} is not a valid URL ({shown!r}); set it to the project URL, "
                          f"{example}")
    url = url.rstrip("/")
    if url.endswith("/rest/v1"):
        raise ConfigError(f"{setting} must be the project URL without /rest/v1, {example}")
    return url


def load_config(args, environ=None):
    """Read and validate the settings: the environment, then .env in the working directory, then
    .env next to the script. os.environ is never changed."""
    layers = setting_layers(environ)
    settings = merge_settings(layers)

    # The first source that sets either name wins, as for every setting: a key in the environment is
    # never overridden by one in a .env file, whatever its name.
    key_setting, key = next(((name, values[name]) for _, values in layers
                             for name in ("SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_KEY")
                             if name in values), (None, None))
    if key:
        # Registered before any other check, so that no message of this run can show it.
        redactor.add(key)

    url = settings.get("SUPABASE_URL")
    if not url:
        raise ConfigError("SUPABASE_URL is not set; set SUPABASE_URL in .env (see .env.example) "
                          "or in the environment to the project URL, e.g. https://abcd.supabase.co")
    url = check_url(url)
    if not key:
        raise ConfigError("SUPABASE_SERVICE_ROLE_KEY is not set; set it in .env (see .env.example) "
                          "or in the environment to the service_role key from the dashboard "
                          "(Project Settings > API)")

    return Config(url=url, key=key, key_setting=key_setting,
                  data_dir=resolve_data_dir(args, settings),
                  sources=tuple(name for name, values in layers if values), settings=settings)


def make_private_dir(path, tighten=True):
    """Create a folder only its owner can read (0700); with tighten, also narrow an existing one."""
    advice = "choose a data folder you can write to with --data-dir or SUPABASE_BACKUP_DIR"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"cannot use {path} as a folder: it is a file; {advice}")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if tighten and path.stat().st_mode & 0o077:
            # Backups hold the users' data: other accounts on the machine must not read them.
            os.chmod(path, 0o700)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot use the folder {path}: {reason}; {advice}") from None
    return path


def data_paths(config):
    """The four folders of the data folder, created on demand with mode 0700."""
    make_private_dir(config.data_dir, tighten=False)
    return DataPaths(*(make_private_dir(config.data_dir / name)
                       for name in (BACKUP_DIR, SAFETY_DIR, SUMMARY_DIR, LOG_DIR)))


# --- Supabase access --------------------------------------------------------------------------
# Filled by issue #3: the only code that talks to the API (client, OpenAPI discovery, paging).


# --- Backup file format -----------------------------------------------------------------------
# Filled by issue #3: reading and writing the gzip JSON format, checksums, atomic writes.


# --- Snapshot, validate, record counts, restore, verify, rollback -----------------------------
# Filled by issue #3 (snapshot, the lock), issue #4 (validate_backup, record_counts, upsert_restore,
# verify_restore, write_restore_log) and issue #5 (rollback, safety backup listing).


# --- Logs and summaries -----------------------------------------------------------------------
# Restore logs in summaries/ come with issue #4; this section holds the one logging setup.

FILE_ONLY = "file_only"  # log(..., extra={FILE_ONLY: True}) keeps a record out of the terminal


class SecretRedactor(logging.Filter):
    """Replace the text of every registered secret (the service key) with [redacted]."""

    def __init__(self):
        super().__init__()
        self.secrets = set()

    def add(self, secret):
        """Register a secret to hide from every log line from now on."""
        self.secrets.add(secret)

    def redact(self, text):
        """The text with every registered secret replaced."""
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def filter(self, record):
        if self.secrets:
            record.msg, record.args = self.redact(record.getMessage()), None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.redact(record.exc_text)
            if record.stack_info:
                record.stack_info = self.redact(record.stack_info)
        return True


# The key is checked in code and never logged on purpose; this filter is belt and braces.
redactor = SecretRedactor()


class ConsoleFormatter(logging.Formatter):
    """Progress as plain lines; warnings and errors prefixed like argparse's own messages."""

    def format(self, record):
        message = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"supabase_backup: error: {message}"
        if record.levelno >= logging.WARNING:
            return f"supabase_backup: warning: {message}"
        return message


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file that only its owner can read (0600), rotated files included."""

    def _open(self):
        stream = open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                      opener=lambda path, flags: os.open(path, flags, 0o600))
        os.chmod(self.baseFilename, 0o600)
        return stream


def setup_console_logging(quiet=False, verbose=False):
    """Send log records to stderr for people: errors only with quiet, debug detail with verbose."""
    close_logging()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(ConsoleFormatter("%(message)s"))
    console.addFilter(redactor)
    console.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
    log.addHandler(console)


def attach_log_file(log_dir):
    """Append this run's records, every level, to log_dir/supabase_backup.log; return its path."""
    make_private_dir(log_dir)
    log_file = log_dir / LOG_FILE_NAME
    handler = PrivateRotatingFileHandler(log_file, maxBytes=LOG_FILE_MAX_BYTES,
                                         backupCount=LOG_FILE_BACKUPS, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(message)s"))
    handler.addFilter(redactor)
    log.addHandler(handler)
    return log_file


def current_log_file():
    """The log file of this run, or None before a command has started one."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    return None


def close_logging():
    """Detach and close every handler, so that main() can run again in the same process."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


# --- Commands ---------------------------------------------------------------------------------

def begin_run(args):
    """Every command's first step: load the configuration, make the data folders, start the log."""
    config = load_config(args)
    paths = data_paths(config)
    attach_log_file(paths.logs)
    log.debug("supabase_backup %s: %s started; project host %s, key from %s, data folder %s, "
              "settings from %s", TOOL_VERSION, args.command, config.host, config.key_setting,
              config.data_dir, ", ".join(config.sources))
    return config, paths


def cmd_backup(args):
    """Back up tables to a gzip JSON file in backups/."""
    begin_run(args)
    raise NotImplementedYetError("backup", 3, "nothing was read from the database or written "
                                 "to backups/")


def cmd_restore(args):
    """Restore a backup file behind the safety net."""
    begin_run(args)
    raise NotImplementedYetError("restore", 4, "the database was not touched")


def cmd_rollback(args):
    """Bring tables back to the state recorded in a safety backup."""
    begin_run(args)
    raise NotImplementedYetError("rollback", 5, "the database was not touched")


def cmd_list_safety(args):
    """List the safety backups, newest first."""
    begin_run(args)
    raise NotImplementedYetError("list-safety", 5, "nothing was read or written")


# --- Command line -----------------------------------------------------------------------------

def table_list(text):
    """argparse type: 'a, b,c' -> ['a', 'b', 'c'], refusing empty names."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty table name in {text!r}; "
                                         f"separate names with commas")
    return list(dict.fromkeys(names))


def positive_int(text):
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def add_global_arguments(parser, in_command=False):
    """--data-dir, --quiet, --verbose: accepted before the command and also after it."""
    # After the command the defaults are SUPPRESS, so that an option given before it is kept.
    default = argparse.SUPPRESS if in_command else None
    flag_default = argparse.SUPPRESS if in_command else False
    group = parser.add_argument_group("global options")
    group.add_argument("--data-dir", metavar="DIR", default=default,
                       help="folder holding backups/, safety_backups/, summaries/ and logs/ "
                            "(default: SUPABASE_BACKUP_DIR, else the script's folder)")
    group.add_argument("-q", "--quiet", action="store_true", default=flag_default,
                       help="print only errors (for cron)")
    group.add_argument("-v", "--verbose", action="store_true", default=flag_default,
                       help="print debug detail")


def add_json_argument(parser):
    """--json: a machine-readable summary on stdout."""
    parser.add_argument("--json", action="store_true",
                        help="print a machine-readable summary on stdout")


def add_write_guard_arguments(parser):
    """--dry-run and --yes, shared by the commands that write to the database."""
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything and print the per-table plan; write nothing")
    parser.add_argument("--yes", action="store_true",
                        help="answer yes to the confirmation question "
                             "(required when not on a terminal)")


def add_command(subparsers, name, handler, summary, examples):
    """A subcommand parser with its summary, an Examples epilog and the global options."""
    parser = subparsers.add_parser(
        name, help=summary, description=summary[:1].upper() + summary[1:] + ".",
        epilog="Examples:\n" + "\n".join(f"  python {PROG} {example}" for example in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=handler)
    add_global_arguments(parser, in_command=True)
    return parser


def build_parser():
    """The command line: global options, then one subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Run 'python {PROG} COMMAND --help' for the options and examples of a command.\n"
               f"README.md and SAFETY.md tell the rest.")
    parser.add_argument("--version", action="version",
                        version=f"supabase_backup {TOOL_VERSION} "
                                f"(backup format {FORMAT_NAME} v{FORMAT_VERSION})")
    add_global_arguments(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    backup = add_command(
        subparsers, "backup", cmd_backup,
        "back up tables to a .json.gz file in backups/ (not in 0.1.0: exits 69)",
        ["backup", "--quiet backup --keep 14",
         "backup --tables users,packages,bookings --output /mnt/offsite/today.json.gz",
         "backup --exclude audit_log --json"])
    backup.add_argument("--tables", type=table_list, action="extend", metavar="A,B",
                        help="back up only these tables (default: BACKUP_TABLES, else every table "
                             "the service role sees)")
    backup.add_argument("--exclude", type=table_list, action="extend", metavar="C",
                        help="leave these tables out of the discovered ones (comma-separated, "
                             "repeatable)")
    backup.add_argument("--output", metavar="PATH",
                        help="write the backup here instead of backups/")
    backup.add_argument("--keep", type=positive_int, metavar="N",
                        help="after a complete backup, keep only the newest N backups in backups/")
    backup.add_argument("--keep-days", type=positive_int, metavar="D",
                        help="after a complete backup, delete backups older than D days")
    add_json_argument(backup)

    restore = add_command(
        subparsers, "restore", cmd_restore,
        "restore a backup file, safely with --safe (not in 0.1.0: exits 69)",
        ["restore --safe --file supabase_backup_20251128_074723.json.gz",
         "restore --safe --dry-run --file supabase_backup_20251128_074723.json.gz",
         "restore --safe --tables bookings --critical users,packages,bookings --file FILE"])
    restore.add_argument("--file", required=True, metavar="FILE",
                         help="the backup to restore: a path, or a file name in backups/")
    restore.add_argument("--safe", action="store_true",
                         help="take a safety backup first and roll back automatically if the "
                              "restore fails (recommended)")
    add_write_guard_arguments(restore)
    restore.add_argument("--tables", type=table_list, action="extend", metavar="A,B",
                         help="restore only these tables")
    restore.add_argument("--critical", type=table_list, action="extend", metavar="A,B",
                         help="tables that must be present and non-empty in the backup "
                              "(default: CRITICAL_TABLES, else none)")
    restore.add_argument("--no-rollback", action="store_true",
                         help="on failure keep what was restored instead of rolling back "
                              "(the safety backup stays available for rollback)")
    add_json_argument(restore)

    rollback = add_command(
        subparsers, "rollback", cmd_rollback,
        "bring tables back to a safety backup (not in 0.1.0: exits 69)",
        ["rollback safety_backup_20251128_074820.json.gz",
         "rollback --dry-run safety_backup_20251128_074820.json.gz"])
    rollback.add_argument("file", metavar="FILE",
                          help="the safety backup: a file name in safety_backups/, or a path")
    add_write_guard_arguments(rollback)

    list_safety = add_command(
        subparsers, "list-safety", cmd_list_safety,
        "list the safety backups, newest first (not in 0.1.0: exits 69)",
        ["list-safety", "list-safety --json"])
    add_json_argument(list_safety)
    return parser


def check_usage(parser, args):
    """Usage mistakes argparse cannot see by itself; each one exits 2 through parser.error."""
    if args.quiet and args.verbose:
        parser.error("--quiet and --verbose cannot be used together")
    if args.command == "backup" and args.tables and args.exclude:
        parser.error("--exclude applies to the discovered tables; with --tables, "
                     "name only the tables you want")


def one_line(text, limit=300):
    """Text squeezed onto one line of at most limit characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fallback_log_file(args):
    """Start the log file for a failure that came before the command started it; or None."""
    try:
        settings = merge_settings(setting_layers())
    except Exception:  # e.g. an unreadable .env: the environment alone then places the data folder
        settings = os.environ
    try:
        return attach_log_file(resolve_data_dir(args, settings) / LOG_DIR)
    except Exception:
        return None


def report_internal_error(args, exc):
    """One line on stderr naming the log file; the traceback goes into the log file only."""
    log_file = current_log_file() or fallback_log_file(args)
    summary = f"unexpected internal error: {type(exc).__name__}: {one_line(exc)}"
    if log_file is None:
        log.error("%s (no log file could be written, so the traceback follows)", summary,
                  exc_info=True)
        return
    log.error("%s", summary, exc_info=True, extra={FILE_ONLY: True})
    log.error("%s; this is a bug, please report it with the traceback from %s", summary, log_file)


def main(argv=None):
    """Run the command line; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_usage(parser, args)
    except SystemExit as exc:  # --help, --version and usage errors: argparse has printed them
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    setup_console_logging(quiet=args.quiet, verbose=args.verbose)
    try:
        return args.func(args)
    except BackupError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted (Ctrl-C)")
        return EXIT_INTERRUPTED
    except Exception as exc:
        report_internal_error(args, exc)
        return EXIT_INTERNAL
    finally:
        close_logging()


if __name__ == "__main__":
    sys.exit(main())
