"""Tests of the per-image feature cache (SQLite in write-ahead-log mode)."""

import multiprocessing
import os
import signal
import sqlite3

import numpy as np

from skdeep._feature_cache import FILENAME, FeatureCache


def keys(n, offset=0):
    """Return ``n`` distinct 16-byte fingerprints."""
    return [int(i + offset).to_bytes(16, "little") for i in range(n)]


def test_lookup_finds_what_was_stored(tmp_path):
    """Lookup finds what was stored, fills repeated images and reports the rest missing."""
    cache = FeatureCache(tmp_path, "settings")
    fingerprints = keys(5)
    features, missing = cache.lookup(fingerprints, 3)
    assert missing.tolist() == [0, 1, 2, 3, 4]
    rows = np.arange(15, dtype=np.float32).reshape(5, 3)
    cache.store(fingerprints[:3], rows[:3])
    cache.store(fingerprints[3:], rows[3:])
    features, missing = cache.lookup(
        [fingerprints[4], fingerprints[0], fingerprints[4], b"x" * 16], 3
    )
    assert missing.tolist() == [3]
    np.testing.assert_array_equal(features[:3], rows[[4, 0, 4]])


def test_settings_are_kept_apart(tmp_path):
    """Rows of one extractor setting are never returned for another."""
    FeatureCache(tmp_path, "a").store([b"k" * 16], np.ones((1, 2), np.float32))
    _, missing = FeatureCache(tmp_path, "b").lookup([b"k" * 16], 2)
    assert missing.tolist() == [0]


def test_more_keys_than_one_query_holds(tmp_path):
    """Lookups of thousands of images are split into queries SQLite accepts."""
    cache = FeatureCache(tmp_path, "s")
    rows = np.random.default_rng(0).random((2500, 4), dtype=np.float32)
    cache.store(keys(2500), rows)
    features, missing = cache.lookup(keys(2600), 4)
    assert missing.tolist() == list(range(2500, 2600))
    np.testing.assert_array_equal(features[:2500], rows)


def _write_rows(location, offset, n):
    cache = FeatureCache(location, "s")
    for start in range(0, n, 10):
        cache.store(keys(10, offset + start), np.full((10, 2), offset, np.float32))


def test_concurrent_writers_lose_nothing(tmp_path):
    """Four processes writing at once store every row."""
    context = multiprocessing.get_context("fork")
    writers = [
        context.Process(target=_write_rows, args=(tmp_path, 1000 * i, 200)) for i in range(4)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    info = FeatureCache(tmp_path).info()
    assert info["images"] == 800 and info["settings"] == {"s": 800}
    features, missing = FeatureCache(tmp_path, "s").lookup(keys(200, 3000), 2)
    assert not len(missing) and (features == 3000).all()


def _die_inside_a_transaction(location):
    connection = sqlite3.connect(os.path.join(location, FILENAME))
    connection.execute("BEGIN")
    connection.execute(
        "INSERT INTO features (settings, key, value) VALUES ('s', ?, ?)",
        (b"half-written-key", np.ones(2, np.float32).tobytes()),
    )
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_writer_killed_mid_write_leaves_no_entry(tmp_path):
    """A process killed inside its transaction leaves the cache readable and that row absent."""
    cache = FeatureCache(tmp_path, "s")
    cache.store(keys(3), np.zeros((3, 2), np.float32))
    process = multiprocessing.get_context("fork").Process(
        target=_die_inside_a_transaction, args=(str(tmp_path),)
    )
    process.start()
    process.join(timeout=60)
    assert process.exitcode == -signal.SIGKILL
    _, missing = cache.lookup([*keys(3), b"half-written-key"], 2)
    assert missing.tolist() == [3]
    cache.store([b"half-written-key"], np.ones((1, 2), np.float32))
    assert not len(cache.lookup([b"half-written-key"], 2)[1])


def test_info_and_clear(tmp_path):
    """Info counts rows per setting and bytes; clear empties the cache and frees space."""
    assert FeatureCache(tmp_path).info() == {"images": 0, "settings": {}, "bytes": 0}
    FeatureCache(tmp_path, "a").store(keys(300), np.ones((300, 64), np.float32))
    FeatureCache(tmp_path, "b").store(keys(5), np.ones((5, 64), np.float32))
    info = FeatureCache(tmp_path).info()
    assert info["settings"] == {"a": 300, "b": 5} and info["bytes"] > 300 * 64 * 4
    freed = FeatureCache(tmp_path).clear()
    assert freed > 0 and FeatureCache(tmp_path).info()["images"] == 0
    assert len(FeatureCache(tmp_path, "a").lookup(keys(3), 64)[1]) == 3
