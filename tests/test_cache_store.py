"""The tuning cache at a URL (optimizer/cache_store.py), through fsspec's own filesystems: its memory
filesystem stands for an object store (no rename: one PUT replaces the document), its local one for
a shared filesystem (write aside, rename over)."""
from __future__ import annotations

import json
import logging
import uuid

import fsspec
from tuning_samples import simulated_tuning

from optimizer.cache import TuningCache
from optimizer.cache_store import open_cache
from optimizer.cache_store import FsspecTuningCache

KEY = {"device": {"kind": "cuda", "name": "NVIDIA H200", "total_memory_bytes": 141 * 2**30},
       "model": {"model": "resnet50"}, "dtype": "float16", "memory_budget_bytes": 2**31}
RESULT = simulated_tuning("resnet50", max_safe_batch=256, batch_size=64)


def memory_url() -> str:
    return f"memory://autobatch-test-{uuid.uuid4().hex[:8]}/tuning.json"


def test_open_cache_picks_the_file_for_paths_and_file_urls_and_fsspec_for_other_urls(tmp_path):
    assert type(open_cache(tmp_path / "t.json")) is TuningCache
    local = open_cache(f"file://{tmp_path}/t.json")
    assert type(local) is TuningCache and str(local.path) == f"{tmp_path}/t.json"
    remote = open_cache(memory_url())
    assert isinstance(remote, FsspecTuningCache) and not remote.renames


def test_an_object_store_holds_one_whole_document_written_by_a_single_put():
    url = memory_url()
    cache = open_cache(url)
    cache.put(KEY, RESULT)
    fs, path = fsspec.core.url_to_fs(url)
    assert fs.ls(fs._parent(path), detail=False) == [path]  # no temporary object left beside it
    document = json.loads(fs.cat_file(path))
    assert document["format"] == "autobatch-tuning-cache" and len(document["entries"]) == 1
    assert open_cache(url).get(KEY) == RESULT  # another replica (another process, another node) reads it
    assert open_cache(url).get({**KEY, "dtype": "float32"}) is None


def test_a_filesystem_with_rename_is_written_aside_and_renamed_over(tmp_path):
    url = f"local://{tmp_path}/shared/tuning.json"
    cache = FsspecTuningCache(url)
    assert cache.renames
    cache.put(KEY, RESULT)
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["tuning.json"]
    assert TuningCache(tmp_path / "shared" / "tuning.json").get(KEY) == RESULT  # the same document format


def test_two_writers_keep_each_others_entries():
    url = memory_url()
    first, second = open_cache(url), open_cache(url)
    other = {**KEY, "dtype": "bfloat16"}
    first.put(KEY, RESULT)
    second.put(other, RESULT)
    assert open_cache(url).get(KEY) == RESULT and open_cache(url).get(other) == RESULT


def test_a_corrupt_document_is_set_aside_and_rebuilt(caplog):
    url = memory_url()
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(path, b"\x00not json")
    with caplog.at_level(logging.WARNING, "autobatch.cache"):
        cache = open_cache(url)
        assert cache.get(KEY) is None
        cache.put(KEY, RESULT)
    assert "set aside as memory://" in caplog.text
    assert any(".corrupt-" in p for p in fs.ls(fs._parent(path), detail=False))
    assert open_cache(url).get(KEY) == RESULT


def test_a_store_that_cannot_be_written_keeps_tunings_in_memory_with_one_warning(caplog):
    class ReadOnlyMemory(fsspec.implementations.memory.MemoryFileSystem):
        def pipe_file(self, path, value, **kwargs):
            raise PermissionError(13, "Access Denied")

    url = memory_url()
    with caplog.at_level(logging.WARNING, "autobatch.cache"):
        cache = FsspecTuningCache(url, filesystem=ReadOnlyMemory())
        cache.put(KEY, RESULT)
        cache.put({**KEY, "dtype": "float32"}, RESULT)
    assert cache.get(KEY) == RESULT and cache.unavailable and "cannot be written" in cache.unavailable
    assert caplog.text.count("cannot be used") == 1


def test_a_protocol_without_its_package_says_which_to_install(caplog):
    with caplog.at_level(logging.WARNING, "autobatch.cache"):
        cache = open_cache("nosuchproto://bucket/tuning.json")
    assert cache.unavailable is not None
    cache.put(KEY, RESULT)
    assert cache.get(KEY) == RESULT  # memory mode: tuning still works
