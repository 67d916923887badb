"""The workdir lock: a live holder is refused, a dead one taken over, release is owner-only."""

import json
import os
import socket
import subprocess
import sys

import pytest

from cimjax import lock
from cimjax.errors import CimjaxError, WorkdirBusyError


def test_second_holder_is_refused_with_the_holder_named(tmp_path):
  path = lock.acquire(tmp_path / "wd")
  info = json.loads(path.read_text())
  assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
  # A live process other than us (our parent) holds it: simulate by rewriting the pid.
  path.write_text(json.dumps({**info, "pid": os.getppid()}))
  with pytest.raises(WorkdirBusyError, match=f"process {os.getppid()} on host") as e:
    lock.acquire(tmp_path / "wd")
  assert isinstance(e.value, CimjaxError)
  assert path.is_file()  # the refused run did not remove it


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
  p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
  dead = int(p.stdout)
  wd = tmp_path / "wd"
  wd.mkdir()
  stale = {"pid": dead, "host": socket.gethostname(), "start": "earlier", "argv": []}
  (wd / lock.LOCK_NAME).write_text(json.dumps(stale))
  path = lock.acquire(wd)
  assert json.loads(path.read_text())["pid"] == os.getpid()
  lock.release(path)
  assert not path.exists()


def test_lock_from_another_host_is_respected(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  other = {"pid": 1, "host": "not-" + socket.gethostname(), "start": "s", "argv": []}
  (wd / lock.LOCK_NAME).write_text(json.dumps(other))
  with pytest.raises(WorkdirBusyError, match="not-"):
    lock.acquire(wd)


def test_release_leaves_a_lock_held_by_someone_else(tmp_path):
  path = lock.acquire(tmp_path)
  path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
  lock.release(path)
  assert path.exists()


def test_context_manager_and_disabled(tmp_path):
  with lock.workdir_lock(tmp_path):
    assert (tmp_path / lock.LOCK_NAME).exists()
  assert not (tmp_path / lock.LOCK_NAME).exists()
  with lock.workdir_lock(tmp_path / "x", enabled=False):
    assert not (tmp_path / "x").exists()


def test_a_workdir_that_cannot_be_created_is_an_os_error(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError):
    lock.acquire(tmp_path / "file" / "wd")
