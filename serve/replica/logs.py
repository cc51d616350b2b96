"""Where a replica's autobatch lines go: its Serve log file, flushed, and warnings to the console.

Why: with `make serve`'s HAProxy ingress Ray runs "throughput optimized", which turns Serve's stderr
handler off and buffers the replica's log file 1,000 records deep (`RAY_SERVE_LOG_TO_STDERR=0`,
`RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1000`). The optimizer's loggers (`autobatch`,
`autobatch.cache`) had no handler at all in a replica, so their warnings went through Python's
last-resort handler into Serve's redirected stderr, into that buffer. A corrupt cache set aside, an
entry re-tuned or an out-of-memory split reached neither the console nor a file, and a replica
killed for its memory left an empty log.

`setup_replica_logging()` (called once per replica process):
- sends `autobatch.*` records into the `ray.serve` logger, so they land in the replica's log file
  (`<session>/logs/serve/replica_<app>_<deployment>_<id>.log`) with Serve's format;
- flushes Serve's buffered file handler after every autobatch record (the records before it go too);
- where Serve writes nothing to stderr, adds a console handler for autobatch's warnings, and its
  INFO lines marked `extra=CONSOLE`, on the process's real stderr, line-buffered: Ray streams a
  replica's stderr to `serve run`'s console, prefixed with the replica's name and pid.
`ShedLog` turns refusals into one line per interval with counts by reason, not one line per shed.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import threading
import time
from collections import Counter

SERVE_LOGGER = "ray.serve"
AUTOBATCH_LOGGER = "autobatch"
CONSOLE = {"autobatch_console": True}  # log.info(..., extra=CONSOLE): a line a person should see
SHED_LOG_INTERVAL_S = 10.0

_lock = threading.Lock()
_installed = False


def _ours(record: logging.LogRecord) -> bool:
    return record.name.startswith(AUTOBATCH_LOGGER) or str(record.msg).startswith("autobatch")


class _ToServeLogger(logging.Handler):
    """Hands `autobatch.*` records to the `ray.serve` logger's handlers (its file, its filters)."""

    def emit(self, record: logging.LogRecord) -> None:
        serve_logger = logging.getLogger(SERVE_LOGGER)
        if record.levelno >= serve_logger.getEffectiveLevel():
            serve_logger.handle(record)


class _FlushServeFiles(logging.Handler):
    """Last handler on `ray.serve`: after an autobatch record, flush the buffering handlers before it."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _ours(record):
            return
        for h in logging.getLogger(SERVE_LOGGER).handlers:
            if isinstance(h, (logging.handlers.MemoryHandler, logging.FileHandler)):
                try:
                    h.flush()
                except (OSError, ValueError):
                    pass


class _ConsoleFormatter(logging.Formatter):
    """Every console line says it is autobatch's (the optimizer's messages do not start with it)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        message = record.getMessage()
        return line if message.startswith("autobatch") else line.replace(message, "autobatch: " + message, 1)


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _ours(record) and (record.levelno >= logging.WARNING or getattr(record, "autobatch_console", False))


def _console_stream():
    """The process's real stderr (fd 2; Serve may have replaced sys.stderr with a logger), line-buffered."""
    return open(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")


def _serve_writes_stderr(serve_logger: logging.Logger) -> bool:
    return any(type(h) is logging.StreamHandler for h in serve_logger.handlers)


def setup_replica_logging() -> None:
    """Install the routing above once in this process (a replica's; see the module docstring)."""
    global _installed
    with _lock:
        if _installed:
            return
        serve_logger = logging.getLogger(SERVE_LOGGER)
        ours = logging.getLogger(AUTOBATCH_LOGGER)
        ours.setLevel(logging.INFO)
        ours.propagate = False  # not also into Python's last-resort handler
        ours.addHandler(_ToServeLogger())
        if not _serve_writes_stderr(serve_logger):
            console = logging.StreamHandler(_console_stream())
            console.setFormatter(_ConsoleFormatter("%(levelname)s %(asctime)s %(message)s"))
            console.addFilter(_ConsoleFilter())
            serve_logger.addHandler(console)
        serve_logger.addHandler(_FlushServeFiles())
        _installed = True


class ShedLog:
    """Requests refused (shed) by a replica: the first one logged at once, then at most one line per
    `interval_s` with the counts since the last line, by reason (serve/replica/admission.py's reasons)."""

    def __init__(self, name: str, log: logging.Logger, detail: str = "", interval_s: float = SHED_LOG_INTERVAL_S,
                 clock=time.monotonic):
        self.name, self.log, self.detail, self.interval_s, self.clock = name, log, detail, interval_s, clock
        self._pending: Counter = Counter()
        self._since: float | None = None
        self._last: float | None = None
        self.total = 0

    def note(self, reason: str) -> None:
        now = self.clock()
        self.total += 1
        self._pending[reason] += 1
        if self._since is None:
            self._since = now
        if self._last is None or now - self._last >= self.interval_s:
            counts = ", ".join(f"{r}: {n}" for r, n in sorted(self._pending.items()))
            span = now - self._since
            self.log.warning("autobatch: %s shed %d request(s) in the last %.1f s (%s; %d since start)%s",
                             self.name, sum(self._pending.values()), span, counts, self.total,
                             f"; {self.detail}" if self.detail else "")
            self._pending.clear()
            self._since, self._last = None, now
