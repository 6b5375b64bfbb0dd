"""WORKDIR/lock.json: one training job per run directory.

The job's process 0 writes {host, pid, start_time, heartbeat} when it starts and rewrites the
heartbeat every HEARTBEAT_S seconds from a background thread while it runs; it deletes the file
when it ends. A second `sdlm-train` on the directory stops at once, naming the holder, unless the
lock is stale: its holder ran on this host and its pid is gone, or its heartbeat is older than
`stale_after_s` (a holder on another host, e.g. a preempted TPU VM). A stale lock is taken over
with a warning.

Locally the lock is created atomically (a hard link that fails if the file exists). On gs://
objects have no such primitive through this path layer: the lock is written, then read back to
check that it is still this process's (two starts within the same second can both pass).
docs/run_directories.md lists the lock's fields.
"""

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid

from sdlm_jax import storage
from sdlm_jax.errors import UserInputError

LOCK_FILE = "lock.json"
HEARTBEAT_S = 60
STALE_AFTER_S = 15 * 60


class RunLockedError(UserInputError):
  """Another live job holds the run directory's lock."""


def _now_text(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


class RunLock:
  """The lock of one run directory, held by this process between `acquire` and `release`."""

  def __init__(self, workdir: str, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S):
    self.path = storage.path(workdir) / LOCK_FILE
    self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
    self.host = socket.gethostname()
    self._record = None
    self._stop = threading.Event()
    self._thread = None

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (json.JSONDecodeError, KeyError):  # a torn write: nobody can be shown to hold it
      return {}

  def stale_reason(self, record: dict) -> str | None:
    """Why `record`'s holder is gone (None: it is live)."""
    if not record:
      return "the lock file is unreadable"
    age = time.time() - float(record.get("heartbeat_unix", 0))
    if record.get("host") == self.host and not pid_alive(int(record.get("pid", -1))):
      return f"its process {record.get('pid')} on this host is gone"
    if age > self.stale_after_s:
      return f"its last heartbeat was {age / 60:.0f} min ago (stale after {self.stale_after_s / 60:g} min)"
    return None

  def _write(self, exclusive: bool) -> bool:
    """Writes this process's record; with `exclusive`, only if no lock file exists (local only)."""
    text = json.dumps(self._record, indent=1)
    if exclusive and not storage.is_remote(self.path):
      tmp = self.path.parent / f"{LOCK_FILE}.{self._record['token']}"
      storage.write_text(tmp, text)
      try:
        os.link(os.fspath(tmp), os.fspath(self.path))
        return True
      except FileExistsError:
        return False
      finally:
        os.remove(os.fspath(tmp))
    storage.write_text(self.path, text)
    return True

  def acquire(self):
    """Takes the lock, or raises RunLockedError naming the live holder."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    self._record = {"host": self.host, "pid": os.getpid(), "start_time": _now_text(start),
                    "heartbeat": _now_text(start), "heartbeat_unix": start, "token": uuid.uuid4().hex}
    existing = self._read()
    if existing is not None:
      reason = self.stale_reason(existing)
      if reason is None:
        raise RunLockedError(self._held_message(existing))
      sys.stderr.write(f"warning: taking over the stale lock {self.path} of host {existing.get('host')} pid "
                       f"{existing.get('pid')} (started {existing.get('start_time')}): {reason}\n")
      sys.stderr.flush()
    if not self._write(exclusive=existing is None) or (self._read() or {}).get("token") != self._record["token"]:
      raise RunLockedError(self._held_message(self._read() or {}))
    self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
    self._thread.start()

  def _held_message(self, holder: dict) -> str:
    return (f"{self.path.parent} is in use by another sdlm-train: host {holder.get('host')}, pid "
            f"{holder.get('pid')}, started {holder.get('start_time')}, last heartbeat {holder.get('heartbeat')}; "
            f"wait for it to end or stop it (a lock whose holder is gone, or silent for "
            f"{self.stale_after_s / 60:g} min, is taken over)")

  def _beat(self):
    while not self._stop.wait(self.heartbeat_s):
      self.heartbeat()

  def heartbeat(self):
    """Rewrites the heartbeat time (if the lock is still this process's)."""
    if (self._read() or {}).get("token") != self._record["token"]:
      return
    now = time.time()
    self._record.update(heartbeat=_now_text(now), heartbeat_unix=now)
    self._write(exclusive=False)

  def release(self):
    """Stops the heartbeat and deletes the lock file if it is still this process's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._record and (self._read() or {}).get("token") == self._record["token"]:
      self.path.unlink()
