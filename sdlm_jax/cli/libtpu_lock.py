"""Why libtpu would not load when another process holds its lock file, and which process that is.

libtpu lets one process per machine load it and marks that with /tmp/libtpu_lockfile; a
second process fails with "Internal error when accessing libtpu multi-process lockfile. Run
"$ sudo rm /tmp/libtpu_lockfile"". Deleting the file under a live process is the wrong advice:
this module finds the holders (processes with the file open, from /proc/*/fd) so that the
message can name them, and suggests deleting the file only when none is alive.
"""

import os

LOCK_FILE = "/tmp/libtpu_lockfile"


def is_lock_error(message: str) -> bool:
  """Whether a libtpu error is the lock-file one."""
  return "libtpu_lockfile" in message or "multi-process lockfile" in message


def holders(path: str = LOCK_FILE) -> list[tuple[int, str]]:
  """(pid, command line) of every other process with `path` open, by pid.

  Read from /proc/<pid>/fd: processes of other users are invisible without privileges.
  """
  target = os.path.realpath(path)
  found = []
  for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
    if pid == os.getpid():
      continue
    try:
      fd_dir = f"/proc/{pid}/fd"
      if not any(os.path.realpath(os.path.join(fd_dir, fd)) == target for fd in os.listdir(fd_dir)):
        continue
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:  # gone, or not ours to read
      continue
    found.append((pid, command))
  return found


def explain(path: str, held_by: list[tuple[int, str]]) -> str:
  """One line: who holds the lock and what to do."""
  if held_by:
    who = ", ".join(f"pid {pid} ({command or '?'})" for pid, command in held_by)
    return (f"libtpu is in use by {who}: it lets one process per machine load it, so that one must finish "
            f"first (do not delete {path} while it runs); a compile-only command such as this one may instead "
            "run alongside it with ALLOW_MULTIPLE_LIBTPU_LOAD=1")
  return (f"libtpu could not take its lock file {path}, and no running process of this user holds it: it was "
          f"left by a process that ended, or belongs to another user; if no TPU program is running, delete it "
          f"(rm {path}) and retry")
