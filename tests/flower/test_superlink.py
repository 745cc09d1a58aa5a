"""fedssl-superlink: Flower's SuperLink with a longer SQLite lock wait.

The SuperLink's object store (every model in transit) is a real SQLite file here; another
connection holds the write lock for a few seconds, as a burst of hospitals pushing their
replies does, and a store write must wait for it instead of failing.
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time

import pytest
from flwr.supercore import sql_mixin
from flwr.supercore.object_store import ObjectStoreFactory

from fedssl_core import names
from fedssl_flower import superlink
from tests.support.processes import VENV_BIN

HOLD_SECONDS = 6.5  # longer than Flower's own 5 s busy_timeout


@pytest.fixture
def pragmas(monkeypatch):
    """Whatever a test does to Flower's SQLite settings is undone after it."""
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)


def _store_write_while_locked(db) -> float:
    store = ObjectStoreFactory(str(db)).store()
    store.delete_objects_in_run(1)  # creates the tables and opens the store's connection
    holder = sqlite3.connect(db, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, as a writer in the SuperLink holds it
    release = threading.Timer(HOLD_SECONDS, holder.commit)
    release.start()
    start = time.monotonic()
    try:
        store.delete_objects_in_run(1)  # a mutation: needs the write lock
        return time.monotonic() - start
    finally:
        release.join()
        holder.close()


def test_flowers_own_timeout_fails_a_write_behind_a_long_lock(tmp_path, pragmas):
    assert dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"] == "5000"
    with pytest.raises(Exception, match="database is locked"):
        _store_write_while_locked(tmp_path / "superlink.db")


def test_the_raised_timeout_makes_the_write_wait_and_succeed(tmp_path, pragmas):
    superlink.set_busy_timeout(30)
    assert dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"] == "30000"
    waited = _store_write_while_locked(tmp_path / "superlink.db")
    assert waited >= HOLD_SECONDS - 0.5  # it really waited for the lock, then wrote


def test_the_other_pragmas_are_kept(pragmas):
    before = dict(sql_mixin.SQLITE_PRAGMAS)
    superlink.set_busy_timeout(12.5)
    after = dict(sql_mixin.SQLITE_PRAGMAS)
    assert after.pop("busy_timeout") == "12500"
    before.pop("busy_timeout")
    assert after == before


def test_a_flower_without_the_setting_is_refused(monkeypatch):
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", (("journal_mode", "WAL"),))
    with pytest.raises(SystemExit, match="busy_timeout"):
        superlink.set_busy_timeout(60)


@pytest.mark.parametrize("raw, expected", [("", superlink.DEFAULT_BUSY_TIMEOUT_SECONDS), ("90", 90.0), (" 0.5 ", 0.5)])
def test_busy_timeout_from_the_environment(raw, expected):
    assert superlink.busy_timeout_seconds({names.ENV_SUPERLINK_BUSY_TIMEOUT: raw}) == expected


@pytest.mark.parametrize("raw", ["0", "-3", "ten", "3601", "nan"])
def test_a_bad_busy_timeout_is_refused_with_the_variable_named(raw):
    with pytest.raises(SystemExit, match=f"{names.ENV_SUPERLINK_BUSY_TIMEOUT}='{raw}'.*seconds in"):
        superlink.busy_timeout_seconds({names.ENV_SUPERLINK_BUSY_TIMEOUT: raw})


def test_the_command_is_flower_superlink_with_its_arguments():
    out = subprocess.run([str(VENV_BIN / "fedssl-superlink"), "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: flower-superlink")
    assert "--database" in out.stdout and "--disable-runtime-dependency-installation" in out.stdout
