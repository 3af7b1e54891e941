"""One writer at a time per cache folder (`CacheWriterLock`).

`precompute` and `rebuild` take an exclusive lock on the cache folder before touching the manifest and release it
when they end, finished or failed; a second writer is refused with an error naming the folder and the holder.
Readers never look at the lock. On a local file system (a shared NFS mount included) the lock file is created
atomically (``O_CREAT | O_EXCL``); a lock left by a process that no longer exists on this host (killed, machine
rebooted) is stale and taken over with a warning, while a lock of another host is never judged from here (its
pid means nothing on this host): the error says to delete it by hand once that writer is known to be gone. Other
pyarrow file systems (s3://, gs://, hdfs://) have no atomic create-if-absent through pyarrow: there the lock is
advisory and best effort (checked, then written, then read back after a short pause to catch a writer that
raced in), and never taken over automatically.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from curriculum.errors import CacheLockedError
from curriculum.files import exists, read_bytes

if TYPE_CHECKING:
    from teachers.cache import TeacherCache

log = logging.getLogger(__name__)

LOCK_NAME = "writer.lock"
_REMOTE_SETTLE_S = 0.5  # pause before reading a remote lock back (another writer's overwrite becomes visible)
_BREAK_STALE_S = 60.0  # a takeover marker older than this was left by a takeover that died half way


def _proc_start(pid: int) -> str | None:
    """The start time of a process in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime); the name in () may hold spaces
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: never break a lock on a guess
    return True


class CacheWriterLock:
    """Exclusive writer lock on one cache folder (``<cache>/writer.lock``; the module docstring says how it
    behaves on local and remote file systems). Use as a context manager, or `acquire()` / `release()`."""

    def __init__(self, fs: pafs.FileSystem, path: str, uri: str | None = None) -> None:
        self.fs, self.path, self.uri = fs, path, uri or path
        self.lock_path = posixpath.join(path, LOCK_NAME)
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self.token = uuid.uuid4().hex
        self.held = False

    @classmethod
    def for_cache(cls, cache: TeacherCache) -> CacheWriterLock:
        return cls(cache.fs, cache.path, cache.uri)

    def _record(self) -> dict[str, Any]:
        import socket
        import sys

        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "proc_start": _proc_start(pid),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self.token,
                "command": " ".join(sys.argv)[:300]}

    def holder(self) -> dict[str, Any] | None:
        """The lock file's record; None when there is no lock; ``{}`` when it exists but cannot be parsed (a
        writer between creating and filling it, or a damaged file)."""
        try:
            if self.local:
                with open(self.lock_path, "rb") as f:
                    data = f.read()
            else:
                if not exists(self.fs, self.lock_path):
                    return None
                data = read_bytes(self.fs, self.lock_path)
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(data)
            return rec if isinstance(rec, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def _is_stale(self, rec: dict[str, Any]) -> bool:
        import socket

        if not rec:  # unparsable: stale only once it is clearly not a writer that is just starting
            try:
                return time.time() - os.stat(self.lock_path).st_mtime > _BREAK_STALE_S
            except OSError:
                return False
        if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
            return False
        pid = rec["pid"]
        if not _pid_alive(pid):
            return True
        # The pid lives, but is it still the holder? A reboot or pid wrap-around may have given it to another.
        started = rec.get("proc_start")
        now = _proc_start(pid)
        return started is not None and now is not None and now != started

    def _refuse(self, rec: dict[str, Any] | None) -> CacheLockedError:
        import socket

        rec = rec or {}
        who = (f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')}, since {rec.get('started', '?')}"
               + (f", command {rec['command']!r}" if rec.get("command") else ""))
        same = rec.get("host") == socket.gethostname() and rec.get("pid") == os.getpid()
        hint = (" This process holds it already: does the config name the same teacher cache twice?" if same else
                f" Wait for that writer to finish (readers are not blocked). If it is gone for sure (e.g. it ran on "
                f"another host, or on a file system where this host cannot check it), delete {self.lock_path} and "
                "run again.")
        return CacheLockedError(f"teacher cache {self.uri} is being written by another precompute/rebuild ({who}; "
                                f"lock file {self.lock_path}).{hint}")

    def acquire(self) -> CacheWriterLock:
        """Take the lock, or raise CacheLockedError naming the holder."""
        if self.held:
            return self
        if self.local:
            self._acquire_local()
        else:
            self._acquire_remote()
        self.held = True
        return self

    def _acquire_local(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        data = json.dumps(self._record(), indent=1).encode()
        for attempt in range(50):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                rec = self.holder()
                if rec is None:  # released between our two calls: try again
                    continue
                if rec == {} and attempt < 20 and not self._is_stale(rec):
                    time.sleep(0.05)  # a writer between creating and filling it: read it again
                    continue
                if not self._is_stale(rec):
                    raise self._refuse(rec) from None
                self._break_stale(rec)
                continue
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        raise CacheLockedError(f"teacher cache {self.uri}: could not take the writer lock {self.lock_path} (other "
                               "processes keep taking it); run again")

    def _break_stale(self, rec: dict[str, Any]) -> None:
        """Remove a stale lock. Two processes may find it stale at once: a takeover marker (itself O_EXCL) lets
        only one remove it, and only if the lock still holds the record judged stale, never a fresh lock that
        the other one just took."""
        marker = self.lock_path + ".takeover"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - os.stat(marker).st_mtime > _BREAK_STALE_S:
                    os.unlink(marker)
            except OSError:
                pass
            time.sleep(0.05)
            return
        os.close(fd)
        try:
            if self.holder() == rec:
                os.unlink(self.lock_path)
                log.warning("teacher cache %s: taking over the writer lock of host %s, pid %s (since %s): that "
                            "process is gone", self.uri, rec.get("host"), rec.get("pid"), rec.get("started"))
        finally:
            try:
                os.unlink(marker)
            except OSError:
                pass

    def _acquire_remote(self) -> None:
        self.fs.create_dir(self.path, recursive=True)
        rec = self.holder()
        if rec is not None:
            raise self._refuse(rec)
        with self.fs.open_output_stream(self.lock_path) as f:
            f.write(json.dumps(self._record(), indent=1).encode())
        time.sleep(_REMOTE_SETTLE_S)
        back = self.holder()
        if not back or back.get("token") != self.token:  # another writer raced in and overwrote ours
            raise self._refuse(back)

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        if not self.held:
            return
        self.held = False
        rec = self.holder()
        if not rec or rec.get("token") != self.token:
            log.warning("teacher cache %s: the writer lock %s was no longer ours at the end (%s); left as is",
                        self.uri, self.lock_path, rec)
            return
        try:
            if self.local:
                os.unlink(self.lock_path)
            else:
                self.fs.delete_file(self.lock_path)
        except (FileNotFoundError, OSError) as e:
            log.warning("teacher cache %s: could not remove the writer lock %s (%s)", self.uri, self.lock_path, e)

    def __enter__(self) -> CacheWriterLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
