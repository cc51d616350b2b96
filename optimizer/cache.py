"""Persistent tuning cache: one JSON file, one entry per (device, model, settings) key.

Several replicas start at once and may write at once, so every write takes a file lock, re-reads
the file under it (to keep the others' entries) and replaces it atomically (write a temporary file,
then os.replace). A file that cannot be read as this version's cache (binary, nested past what
the parser takes, another shape, a malformed entry) is never fatal: it is set aside as
`<name>.corrupt-<timestamp>`, with one warning naming that path, and rebuilt (its well-formed
entries kept). A location that cannot be written or locked (a read-only filesystem, /proc, a
directory, a lock held past `lock_timeout_s`) is never fatal nor a hang either: the cache then
keeps its entries in this process's memory, after one warning, and still reads what the file holds.
An entry is returned only when its stored key fields equal the ones asked for, so a hash collision
or a hand-edited file can never hand one device's answer to another, and only as a `Tuning` that
`Tuning.from_dict` accepts: an entry it refuses (another version's shape, a hand edit) is a miss,
so the model is tuned again and the entry replaced.

`optimizer.cache_store.open_cache(location)` picks this file or, for a URL, the shared store there.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from .trust import check_against_key

from .tuning import Tuning, TuningFormatError

log = logging.getLogger("autobatch.cache")

FORMAT = "autobatch-tuning-cache"
FORMAT_VERSION = 2  # 2: an entry's result is Tuning.stored(); files of version 1 are re-tuned


LOCK_TIMEOUT_ENV = "AUTOBATCH_CACHE_LOCK_TIMEOUT_S"
# A write holds the lock for milliseconds; a lock held this long has a stuck holder.
DEFAULT_LOCK_TIMEOUT_S = 30.0
WHAT_TO_CHANGE = ("point AUTOBATCH_CACHE (the CLI's --cache, the app's cache_path) at a file in a "
                  "writable directory, e.g. ~/.cache/autobatch/tuning.json")


class CacheUnavailable(OSError):
    """The cache file cannot be changed here (read-only, /proc, a directory...); the message says
    what to change. Only an explicit change of the file (`delete`, `check_writable`) raises it:
    reading and tuning fall back to memory instead."""


def default_cache_path() -> Path:
    if os.environ.get("AUTOBATCH_CACHE"):
        return Path(os.environ["AUTOBATCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autobatch" / "tuning.json"


def cache_key(key_fields: dict) -> str:
    canonical = json.dumps(key_fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


class TuningCache:
    def __init__(self, path: str | os.PathLike | None = None, *, lock_timeout_s: float | None = None):
        self.path = Path(path) if path else default_cache_path()
        if lock_timeout_s is None:
            lock_timeout_s = float(os.environ.get(LOCK_TIMEOUT_ENV) or DEFAULT_LOCK_TIMEOUT_S)
        self.lock_timeout_s = lock_timeout_s
        # Why the file cannot be used, once found out; from then on `_memory` holds the entries
        # (the file's, read once, plus this process's writes) and the file is never touched again.
        self.unavailable: str | None = None
        self._memory: dict | None = None
        self._file_lock: FileLock | None = None
        self._say_fallback = True  # log the fallback to memory (check_writable raises instead)
        self._distrusted: set[tuple[str, tuple[str, ...]]] = set()  # (key, reasons) already warned about
        self._lock = _CacheLock(self)
        self._refused_keys: set[str] = set()  # entries Tuning.from_dict refused: one warning each

    def _read(self) -> dict:
        """The entries: the file's (set aside when unreadable), or this process's in memory mode."""
        if self._memory is not None:
            return dict(self._memory)
        entries = self._read_file()
        if self.unavailable is not None:
            self._memory = dict(entries)
        return entries

    def _read_raw(self) -> bytes:
        """The stored document's bytes; FileNotFoundError when there is none yet."""
        return self.path.read_bytes()

    def _exists(self) -> bool:
        return self.path.exists()

    def _read_file(self) -> dict:
        try:
            raw = self._read_raw()
        except FileNotFoundError:
            return {}
        except IsADirectoryError:
            self._use_memory(self._is_a_directory())
            return {}
        except OSError as exc:
            self._use_memory(f"it cannot be read ({exc.strerror or exc})")
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return self._set_aside(f"is corrupt ({type(exc).__name__}: {str(exc)[:120]})")
        if (not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION
                or not isinstance(data.get("entries"), dict)):
            return self._set_aside(f"is not an autobatch cache of version {FORMAT_VERSION}")
        entries = data["entries"]
        well_formed = {key: entry for key, entry in entries.items() if _well_formed(entry)}
        if len(well_formed) < len(entries):
            malformed = ", ".join(sorted(set(entries) - set(well_formed)))
            return self._set_aside(f"has malformed entries ({malformed}: each must be an object with key_fields "
                                   f"and a non-empty result)", keep=well_formed)
        return entries

    def _set_aside(self, problem: str, keep: dict | None = None) -> dict:
        """Rename an unreadable file out of the way (kept for a person to look at) and rebuild it
        from `keep`; only under the file lock, so no other process is reading or writing it."""
        keep = keep or {}
        if self.unavailable is not None:
            log.warning("tuning cache %s %s; ignoring it (it cannot be set aside: %s)", self.path, problem,
                        self.unavailable)
            return keep
        aside = Path(f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        for n in range(1, 1000):
            if not aside.exists():
                break
            aside = Path(f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{n}")
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            self._use_memory(f"it {problem} and cannot be set aside ({exc.strerror or exc})")
            return keep
        log.warning("tuning cache %s %s; set aside as %s, the cache will be rebuilt", self.path, problem, aside)
        if keep:
            self._write(keep)
        return keep

    def _is_a_directory(self) -> str:
        return f"it is a directory (name a file in it, e.g. {self.path / 'tuning.json'})"

    def _use_memory(self, reason: str) -> None:
        if self.unavailable is None:
            self.unavailable = reason
            if self._say_fallback:
                log.warning("tuning cache %s cannot be used: %s; tunings are kept in this process's memory only "
                            "(a restart tunes again); to keep them, %s", self.path, reason, WHAT_TO_CHANGE)

    def _take_file_lock(self) -> bool:
        """True when the file lock is now held; False (memory mode, one warning) when it cannot be."""
        if self.unavailable is not None:
            return False
        if self.path.is_dir():  # not even a lock file beside it: `--cache /tmp` must not leave /tmp.lock
            self._use_memory(self._is_a_directory())
            return False
        lock_path = f"{self.path}.lock"
        try:
            # filelock retries a lock file it cannot create until its timeout (by default forever):
            # find that out at once instead.
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644))
        except OSError as exc:
            self._use_memory(f"its lock file {lock_path} cannot be created ({exc.strerror or exc})")
            return False
        if self._file_lock is None:
            self._file_lock = FileLock(lock_path)
        try:
            self._file_lock.acquire(timeout=self.lock_timeout_s)
        except Timeout:
            self._use_memory(f"its lock {lock_path} was held by another process for over "
                             f"{self.lock_timeout_s:g} s ({LOCK_TIMEOUT_ENV} sets how long to wait)")
            return False
        except OSError as exc:
            self._use_memory(f"its lock file {lock_path} cannot be locked ({exc.strerror or exc})")
            return False
        return True

    def check_writable(self) -> None:
        """Raise CacheUnavailable unless the file can be changed: a command that exists to change
        it (`autobatch cache clear`) says so instead of changing a copy in memory. The exception is
        the one report: the fallback's warning is not logged as well."""
        self._say_fallback = False
        try:
            with self._lock:
                self._read()
        finally:
            self._say_fallback = True
        if self.unavailable is not None:
            raise CacheUnavailable(f"tuning cache {self.path} cannot be changed: {self.unavailable}; {WHAT_TO_CHANGE}")

    def get(self, key_fields: dict) -> Tuning | None:
        """The cached tuning for exactly these key fields, or None."""
        key = cache_key(key_fields)
        with self._lock:
            entry = self._read().get(key)
        if not isinstance(entry, dict) or entry.get("key_fields") != json.loads(json.dumps(key_fields, default=str)):
            return None
        try:
            return Tuning.from_dict(entry.get("result"))
        except TuningFormatError as exc:
            if key in self._refused_keys:
                return None
            self._refused_keys.add(key)
            log.warning("tuning cache %s: entry %s is not a tuning this version can use (%s); tuning again",
                        self.path, key, exc)
            return None

    def put(self, key_fields: dict, tuning: Tuning) -> str:
        key = cache_key(key_fields)
        with self._lock:
            entries = self._read()
            entries[key] = {
                "key_fields": json.loads(json.dumps(key_fields, default=str)),
                "result": tuning.stored(),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            self._write(entries)
        return key

    def delete(self, key: str | None = None) -> int:
        """Remove one entry (by key or key prefix), or all; returns how many were removed."""
        self.check_writable()
        with self._lock:
            entries = self._read()
            doomed = [k for k in entries if key is None or k.startswith(key)]
            for k in doomed:
                del entries[k]
            if doomed or not self._exists():
                self._write(entries)
        return len(doomed)

    def get_trusted(self, key_fields: dict, check: Callable[[Any, dict], list[str]] | None = None):
        """`get`, then `check` (trust.check_against_key by default) on the hit: a hit with reasons
        not to trust it is a miss, with one warning listing them, so the caller tunes again and its
        `put` replaces the entry."""
        hit = self.get(key_fields)
        if hit is None:
            return None
        reasons = (check or check_against_key)(hit, json.loads(json.dumps(key_fields, default=str)))
        if not reasons:
            return hit
        key = cache_key(key_fields)
        if (key, tuple(reasons)) not in self._distrusted:
            self._distrusted.add((key, tuple(reasons)))
            log.warning("tuning cache %s: entry %s cannot be trusted: %s; tuning again", self.path, key,
                        "; ".join(reasons))
        return None

    def entries(self) -> dict:
        with self._lock:
            return self._read()

    def _write(self, entries: dict) -> None:
        if self.unavailable is None:
            payload = {"format": FORMAT, "version": FORMAT_VERSION, "entries": entries}
            tmp = None
            try:
                fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".json", dir=self.path.parent)
                with os.fdopen(fd, "w") as f:
                    json.dump(payload, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                return
            except OSError as exc:
                self._use_memory(f"it cannot be written ({exc.strerror or exc})")
            finally:
                if tmp is not None and os.path.exists(tmp):
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
        self._memory = dict(entries)


def _well_formed(entry) -> bool:
    """An entry `get` can compare and hand on; whether its result is a tuning to trust is trust.py's."""
    return (isinstance(entry, dict) and isinstance(entry.get("key_fields"), dict)
            and isinstance(entry.get("result"), dict) and bool(entry["result"]))


class _CacheLock:
    """Every read and read-modify-write of the file runs under this: a lock for this process's
    threads, then the file lock for other processes, which is never waited on forever (see
    `TuningCache._take_file_lock`: a lock that cannot be had puts the cache in memory)."""

    def __init__(self, cache: TuningCache):
        self._cache = cache
        self._thread_lock = threading.RLock()
        self._file_lock_taken: list[bool] = []  # one per nested `with`, innermost last

    @property
    def holds_file_lock(self) -> bool:
        return any(self._file_lock_taken)

    def __enter__(self) -> "_CacheLock":
        self._thread_lock.acquire()
        try:
            self._file_lock_taken.append(not self.holds_file_lock and self._cache._take_file_lock())
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if self._file_lock_taken.pop():
                self._cache._file_lock.release()
        finally:
            self._thread_lock.release()
