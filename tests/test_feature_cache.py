"""Tests of the per-image feature cache."""

import numpy as np

from skdeep._feature_cache import FeatureCache


def test_lookup_finds_what_was_stored(tmp_path):
    """Lookup finds what was stored."""
    cache = FeatureCache(tmp_path, "settings")
    keys = [bytes([i]) * 16 for i in range(5)]
    features, missing = cache.lookup(keys, 3)
    assert missing.tolist() == [0, 1, 2, 3, 4]
    rows = np.arange(15, dtype=np.float32).reshape(5, 3)
    cache.store(keys[:3], rows[:3])
    cache.store(keys[3:], rows[3:])
    features, missing = cache.lookup([keys[4], keys[0], keys[4], b"x" * 16], 3)
    assert missing.tolist() == [3]
    np.testing.assert_array_equal(features[:3], rows[[4, 0, 4]])
    assert not list(tmp_path.rglob("*.partial"))


def test_settings_are_kept_apart(tmp_path):
    """Settings are kept apart."""
    FeatureCache(tmp_path, "a").store([b"k" * 16], np.ones((1, 2), np.float32))
    _, missing = FeatureCache(tmp_path, "b").lookup([b"k" * 16], 2)
    assert missing.tolist() == [0]
