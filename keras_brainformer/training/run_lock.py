"""One writer per run folder.

Two `train` commands into one folder would both run to the end and
interleave their checkpoints and `history.csv` (measured: two headers, epochs
0,1,2,0,1,3,2,3). `RunFolderLock` makes the second one stop before it
writes anything: the first holds `run_dir/.lock` (created with `O_EXCL`, so
exactly one process can create it) naming its process id and host. A lock
left by a process that no longer runs on this host (killed with SIGKILL, the
machine rebooted) is stale and taken over; a lock held from another host
cannot be checked and is respected (the message says which file to delete).
"""

import json
import os
import pathlib
import socket

from keras_brainformer.errors import TrainingError

LOCK_FILE = ".lock"


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunFolderLock:
    """Context manager holding `run_dir/.lock` for this process.

    Creates `run_dir` if needed; on exit removes the lock, and the folder too
    if this lock created it and nothing else was written there.

    Raises:
        TrainingError: another live process holds the folder.
    """

    def __init__(self, run_dir):
        self.run_dir = pathlib.Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._created_dir = False
        self._held = False

    def __enter__(self):
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True)
            self._created_dir = True
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    self._cleanup_dir()
                    raise TrainingError(
                        f"Run folder {str(self.run_dir)!r} is in use by process "
                        f"{holder.get('pid')} on {holder.get('host')!r} (lock file "
                        f"{self.path}). Wait for it to finish, use another --out, or "
                        "delete the lock file if that process is gone."
                    ) from None
                self.path.unlink(missing_ok=True)  # stale or unreadable: take over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            self._held = True
            return self
        self._cleanup_dir()
        raise TrainingError(f"Could not take the lock {self.path}: another process races for it.")

    def _holder(self):
        try:
            with open(self.path) as f:
                holder = json.load(f)
            int(holder["pid"])
            return holder
        except (OSError, ValueError, KeyError, TypeError):
            return None  # half-written by a process killed while locking

    @staticmethod
    def _stale(holder):
        if holder.get("host") != socket.gethostname():
            return False
        return not _process_alive(int(holder["pid"]))

    def _cleanup_dir(self):
        if self._created_dir:
            try:
                self.run_dir.rmdir()  # only if empty
            except OSError:
                pass

    def __exit__(self, *exc_info):
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False
        self._cleanup_dir()
        return False
