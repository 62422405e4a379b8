"""hypervisord start-up failures are one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import sqlite3
import subprocess
import sys


def _hypervisord(tmp_path, db, url: str = "") -> subprocess.CompletedProcess:
    """hypervisord with the store at `db` (or database.url `url`), pointed at a bus that
    does not exist."""
    config = tmp_path / "config.yaml"
    config.write_text(f"database: {{path: {db}, url: '{url}'}}\n")
    return subprocess.run([sys.executable, "-m", "hypersdk.service.daemon", "--config",
                           str(config), "--bus", "unix:path=/nonexistent"],
                          capture_output=True, text=True, timeout=60)


def test_hypervisord_refuses_a_newer_store_with_one_line_not_a_traceback(tmp_path):
    db = tmp_path / "db.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 999")
    result = _hypervisord(tmp_path, db)
    assert result.returncode == 1
    assert "schema version 999 is newer" in result.stderr
    assert "Traceback" not in result.stderr


def test_hypervisord_without_a_bus_says_so_in_one_line(tmp_path):
    result = _hypervisord(tmp_path, tmp_path / "db.sqlite")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "ERROR hypervisord: cannot connect to the unix:path=/nonexistent bus: "
        "No such file or directory (is dbus running?)"]


def test_hypervisord_without_its_postgresql_server_says_so_in_one_line(tmp_path):
    url = f"postgresql://postgres@/jobs?host={tmp_path}"  # no server listens there
    result = _hypervisord(tmp_path, tmp_path / "db.sqlite", url)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"ERROR hypervisord: database.url: cannot connect to the "
                           f"postgresql database 'jobs' on {tmp_path}: ")
