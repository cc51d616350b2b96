"""The tuning cache on shared storage: one JSON document at a URL that fsspec opens, so every node of
a cluster reads the answers any node measured (s3://, gs://, az://, a shared filesystem...), and
`open_cache`, which picks it or the local file (optimizer/cache.py) by the location's form.

The document, its format and what is trusted in it are TuningCache's (optimizer/cache.py); only how
the bytes are stored differs from the local file:
- Writes are whole documents, never partial: where the filesystem can rename (local, sftp, hdfs...),
  written aside and renamed over; an object store (s3, gs, az, memory) has no rename, and there a
  single PUT of the whole document is what replaces it whole (readers see the old or the new one).
- There is no lock across nodes (a file lock holds on one host only). Concurrent writers of
  different entries may race: each `put` re-reads, merges, writes and reads back, and writes again
  (up to PUT_ATTEMPTS times) when another writer's document replaced its entry. One writer per key
  at a time is serve/replica/single_flight.py's job (one replica per GPU type tunes; the others wait).
- Unreadable, unwritable or unreachable storage is never fatal: as with the local file, the entries
  are kept in this process's memory after one warning (a restart tunes again).

fsspec comes with autobatch; the protocol's own package is the user's choice: `pip install s3fs`
for s3://, `gcsfs` for gs://, `adlfs` for az:// (credentials as those packages read them: the
environment, the instance's role, ~/.aws, ...).
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid

from .cache import FORMAT, FORMAT_VERSION, TuningCache, cache_key
from .tuning import Tuning

log = logging.getLogger("autobatch.cache")

# Filesystems that rename a file in one step; every other protocol is treated as an object store.
RENAME_PROTOCOLS = {"file", "local", "sftp", "ssh", "hdfs", "arrow_hdfs", "webhdfs", "smb"}
PUT_ATTEMPTS = 3


class FsspecTuningCache(TuningCache):
    """TuningCache whose document lives at `url` (anything `fsspec.core.url_to_fs` opens)."""

    def __init__(self, url: str, *, lock_timeout_s: float | None = None, filesystem=None):
        super().__init__("unused", lock_timeout_s=lock_timeout_s)
        self.path = url  # a URL, not a Path: log messages and `autobatch cache show` print it as given
        self._fs, self._fs_path = filesystem, None
        if filesystem is None:
            try:
                import fsspec.core

                self._fs, self._fs_path = fsspec.core.url_to_fs(url)
            except ImportError as exc:  # the protocol's package (s3fs, gcsfs...) is not installed
                self._use_memory(f"no filesystem for it ({exc}); install the package its protocol needs "
                                 f"(s3fs for s3://, gcsfs for gs://, adlfs for az://)")
            except Exception as exc:  # noqa: BLE001 - a malformed URL, bad credentials config, ...
                self._use_memory(f"it cannot be opened ({type(exc).__name__}: {exc})")
        else:
            self._fs_path = filesystem._strip_protocol(url)
        protocols = getattr(self._fs, "protocol", ()) if self._fs is not None else ()
        protocols = {protocols} if isinstance(protocols, str) else set(protocols)
        self.renames = bool(protocols & RENAME_PROTOCOLS)

    # --- the byte layer TuningCache reads and writes through
    def _read_raw(self) -> bytes:
        if self._fs is None:
            raise FileNotFoundError(self.path)
        try:
            return self._fs.cat_file(self._fs_path)
        except OSError:  # FileNotFoundError, IsADirectoryError, PermissionError: TuningCache tells them apart
            raise
        except Exception as exc:  # noqa: BLE001 - a client library's own errors (botocore...) count as unreadable
            raise OSError(f"{type(exc).__name__}: {exc}") from None

    def _exists(self) -> bool:
        try:
            return self._fs is not None and bool(self._fs.exists(self._fs_path))
        except Exception:  # noqa: BLE001
            return False

    def _is_a_directory(self) -> str:
        return f"it is a directory (name a file in it, e.g. {self.path.rstrip('/')}/tuning.json)"

    def _take_file_lock(self) -> bool:
        """No lock spans nodes: reads and writes go straight to the store (see `put`)."""
        if self.unavailable is None and self._fs is not None:
            try:
                if self._fs.isdir(self._fs_path):
                    self._use_memory(self._is_a_directory())
            except Exception:  # noqa: BLE001 - an unreachable store shows up on the read, with its reason
                pass
        return False

    def _write(self, entries: dict) -> None:
        if self.unavailable is None:
            payload = {"format": FORMAT, "version": FORMAT_VERSION, "entries": entries}
            data = json.dumps(payload, indent=1, sort_keys=True).encode()
            try:
                self._store(data)
                return
            except Exception as exc:  # noqa: BLE001 - OSError or a client library's error: memory mode either way
                self._use_memory(f"it cannot be written ({type(exc).__name__}: {exc})")
        self._memory = dict(entries)

    def _store(self, data: bytes) -> None:
        """Replace the whole document: rename over it where the filesystem can, else one PUT."""
        if not self.renames:
            self._fs.pipe_file(self._fs_path, data)
            return
        parent = self._fs._parent(self._fs_path)
        if parent:
            self._fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tuning-{uuid.uuid4().hex}.json" if parent else f".tuning-{uuid.uuid4().hex}.json"
        try:
            self._fs.pipe_file(tmp, data)
            self._fs.mv(tmp, self._fs_path)
        finally:
            try:
                if self._fs.exists(tmp):
                    self._fs.rm_file(tmp)
            except Exception:  # noqa: BLE001
                pass

    def _set_aside(self, problem: str, keep: dict | None = None) -> dict:
        keep = keep or {}
        if self.unavailable is not None:
            log.warning("tuning cache %s %s; ignoring it (it cannot be set aside: %s)", self.path, problem,
                        self.unavailable)
            return keep
        aside = f"{self._fs_path}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        try:
            self._fs.mv(self._fs_path, aside)
        except Exception as exc:  # noqa: BLE001
            self._use_memory(f"it {problem} and cannot be set aside ({type(exc).__name__}: {exc})")
            return keep
        log.warning("tuning cache %s %s; set aside as %s, the cache will be rebuilt", self.path, problem,
                    self._fs.unstrip_protocol(aside))
        if keep:
            self._write(keep)
        return keep

    def put(self, key_fields: dict, tuning: Tuning) -> str:
        """Read, merge, write, read back: another node's write in between may have replaced this
        entry (there is no lock across nodes), and then it is written again."""
        key = cache_key(key_fields)
        for attempt in range(PUT_ATTEMPTS):
            super().put(key_fields, tuning)
            if self.unavailable is not None:
                return key
            stored = self._read().get(key)
            if isinstance(stored, dict) and stored.get("result") == json.loads(json.dumps(tuning.stored())):
                return key
            log.info("tuning cache %s: entry %s was overwritten by another writer; writing it again (%d/%d)",
                     self.path, key, attempt + 2, PUT_ATTEMPTS)
        log.warning("tuning cache %s: entry %s kept being overwritten by other writers; it may be missing "
                    "(the next start of this model tunes again)", self.path, key)
        return key


__all__ = ["FsspecTuningCache", "RENAME_PROTOCOLS"]


def is_remote(location: str | os.PathLike | None) -> bool:
    """A URL fsspec opens (s3://, gs://, memory://...); a plain path or file:// is this host's file."""
    text = str(location or "")
    return "://" in text and not text.startswith("file://")


def open_cache(location: str | os.PathLike | None = None, **kwargs) -> "TuningCache":
    """The tuning cache at `location` (else $AUTOBATCH_CACHE, else ~/.cache/autobatch/tuning.json):
    a local path or file:// URL is the hardened file below; another URL (s3://, gs://, a shared
    filesystem fsspec opens) is FsspecTuningCache, so replicas on many nodes share it."""
    location = location or os.environ.get("AUTOBATCH_CACHE") or None
    if is_remote(location):
        return FsspecTuningCache(str(location), **kwargs)
    if location is not None and str(location).startswith("file://"):
        location = str(location)[len("file://"):]
    return TuningCache(location, **kwargs)
