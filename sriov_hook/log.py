"""A small append-only step log.

The hook's stdout/stderr are thrown away by runtimes on success, so every
step goes to the configured log file, one line each, tagged with the
container id, so an operator can replay what happened. The stdlib
``logging`` package is avoided on purpose: it costs import time on every
container start and we need none of its machinery.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
import time
from typing import Optional, TextIO

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# Root appends container-controlled text here: not readable by everyone, and
# never through a symlink someone planted (O_NOFOLLOW), nor into a FIFO
# (O_NONBLOCK, then a regular-file check) that would hang the hook.
LOG_MODE = 0o640
_LOG_FLAGS = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
              | os.O_CLOEXEC)


def open_log(path: str) -> TextIO:
    """Open ``path`` for appending, 0640; OSError if a symlink or not a file."""
    fd = os.open(path, _LOG_FLAGS, LOG_MODE)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    if st.st_mode & ~LOG_MODE & 0o777 and st.st_uid == os.geteuid():
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & LOG_MODE)   # a 0644 log from before
    return os.fdopen(fd, "a", encoding="utf-8")


class StepLog:
    def __init__(self, path: Optional[str] = None, level: str = "info",
                 stage: str = "-") -> None:
        self.path = path
        self.threshold = LEVELS.get(level, 20)
        self.stage = stage
        self.cid = "-"
        self._fh: Optional[TextIO] = None
        self._failed = False

    def bind(self, cid: str) -> None:
        self.cid = cid

    def _open(self) -> Optional[TextIO]:
        if self._fh is None and self.path and not self._failed:
            try:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                self._fh = open_log(self.path)
            except OSError as err:
                # Logging must never fail a container start.
                self._failed = True
                why = "it is a symlink" if err.errno == errno.ELOOP else err.strerror
                print(f"sriov-hook: warning: cannot open log {self.path}: {why}",
                      file=sys.stderr)
        return self._fh

    def log(self, level: str, msg: str) -> None:
        if LEVELS[level] < self.threshold:
            return
        fh = self._open()
        if fh is None:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
        line = (f"{stamp}.{int(now * 1000) % 1000:03d} pid={os.getpid()} "
                f"stage={self.stage} cid={self.cid} {level.upper()} {msg}\n")
        try:
            fh.write(line)
            fh.flush()  # a SIGKILLed hook must still leave its trail
        except OSError:
            pass

    def debug(self, msg: str) -> None:
        self.log("debug", msg)

    def info(self, msg: str) -> None:
        self.log("info", msg)

    def warning(self, msg: str) -> None:
        self.log("warning", msg)

    def error(self, msg: str) -> None:
        self.log("error", msg)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


NULL_LOG = StepLog(None)
