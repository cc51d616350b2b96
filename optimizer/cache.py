"""Persistent tuning cache: one JSON file, one entry per (device, model, settings) key.

Several replicas start at once and may write at once, so every write takes a file lock, re-reads
the file under it (to keep the others' entries) and replaces it atomically (write a temporary file,
then os.replace). A corrupt or foreign file is not fatal: it is logged, ignored and rewritten.
An entry is returned only when its stored key fields equal the ones asked for, so a hash collision
or a hand-edited file can never hand one device's answer to another, and only as a `Tuning` that
`Tuning.from_dict` accepts: an entry it refuses (another version's shape, a hand edit) is a miss,
so the model is tuned again and the entry replaced.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from filelock import FileLock

from .tuning import Tuning, TuningFormatError

log = logging.getLogger("autobatch.cache")

FORMAT = "autobatch-tuning-cache"
FORMAT_VERSION = 2  # 2: an entry's result is Tuning.stored(); files of version 1 are re-tuned


def default_cache_path() -> Path:
    if os.environ.get("AUTOBATCH_CACHE"):
        return Path(os.environ["AUTOBATCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autobatch" / "tuning.json"


def cache_key(key_fields: dict) -> str:
    canonical = json.dumps(key_fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


class TuningCache:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_cache_path()
        self._lock = FileLock(str(self.path) + ".lock")
        self._refused_keys: set[str] = set()  # entries already warned about: one warning each

    def _read(self) -> dict:
        """The entries on disk; {} (with a warning) for a missing, corrupt or foreign file."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("tuning cache %s unreadable (%s); ignoring it", self.path, exc)
            return {}
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            log.warning("tuning cache %s is corrupt (%s); ignoring it, it will be rewritten", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            log.warning(
                "tuning cache %s is not an autobatch cache of version %d; ignoring it, it will be rewritten",
                self.path, FORMAT_VERSION,
            )
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        with self._lock:
            entries = self._read()
            doomed = [k for k in entries if key is None or k.startswith(key)]
            for k in doomed:
                del entries[k]
            if doomed or not self.path.exists():
                self._write(entries)
        return len(doomed)

    def entries(self) -> dict:
        with self._lock:
            return self._read()

    def _write(self, entries: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "version": FORMAT_VERSION, "entries": entries}
        fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
