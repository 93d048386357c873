"""The render cache: the same pairs bit for bit, shared between readers, robust to bad or planted chunks."""

import numpy as np
import pytest
import torch

from clipforge.config import ConfigError
from clipforge.data import render_cache
from clipforge.data.render_cache import CachedSyntheticPairs, stream_key
from clipforge.data.synthetic import STREAM_EVAL, STREAM_TRAIN, SyntheticConfig, SyntheticPairs, SyntheticWorld
from clipforge.train.config import load_train_config
from clipforge.train.data import build_train_dataset


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(render_cache, "CHUNK", 8)


def _pairs(**cfg) -> SyntheticPairs:
    return SyntheticPairs(SyntheticWorld(SyntheticConfig(image_size=32, **cfg)), STREAM_TRAIN)


def _same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1]


def test_cached_pairs_equal_rendered_pairs_and_are_rendered_once(tmp_path):
    plain = _pairs()
    writer = CachedSyntheticPairs(plain, tmp_path)
    indices = [0, 5, 7, 8, 9, 23, 17, 3]  # across three chunks, back and forth
    assert all(_same(writer[i], plain[i]) for i in indices)
    assert writer.rendered == 3 and len(list(writer.folder.glob("*.npz"))) == 3
    reader = CachedSyntheticPairs(_pairs(), tmp_path)  # another run on the same world
    assert all(_same(reader[i], plain[i]) for i in indices)
    assert reader.rendered == 0 and reader.read >= 3


def test_each_world_and_stream_has_its_own_folder():
    keys = {stream_key(_pairs()), stream_key(_pairs(random_colour_prob=0.1)), stream_key(_pairs(seed=1)),
            stream_key(SyntheticPairs(SyntheticWorld(SyntheticConfig(image_size=32)), STREAM_EVAL))}
    assert len(keys) == 4 and stream_key(_pairs()) == stream_key(_pairs())


def test_a_damaged_chunk_is_rendered_again(tmp_path):
    plain = _pairs()
    CachedSyntheticPairs(plain, tmp_path)[0]
    cached = CachedSyntheticPairs(plain, tmp_path)
    chunk = next(cached.folder.glob("*.npz"))
    chunk.write_bytes(chunk.read_bytes()[:100])  # a torn write from some other tool
    assert _same(cached[1], plain[1]) and cached.rendered == 1
    wrong = CachedSyntheticPairs(plain, tmp_path)
    np.savez(chunk, images=np.zeros((8, 16, 16, 3), np.uint8), captions=np.array(["x"] * 8))  # wrong shape
    assert _same(wrong[2], plain[2]) and wrong.rendered == 1


def test_a_planted_pickle_is_never_loaded(tmp_path):
    plain = _pairs()
    folder = CachedSyntheticPairs(plain, tmp_path).folder

    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("a pickle in the cache was executed",))

    captions = np.empty(8, dtype=object)
    captions[:] = [Boom()] * 8
    np.savez(folder / "0000000.npz", images=np.zeros((8, 32, 32, 3), np.uint8), captions=captions)
    cached = CachedSyntheticPairs(plain, tmp_path)
    assert _same(cached[0], plain[0]) and cached.rendered == 1


def test_an_unwritable_cache_only_costs_the_caching(tmp_path, monkeypatch):
    plain = _pairs()
    cached = CachedSyntheticPairs(plain, tmp_path)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(render_cache.np, "savez", full)
    with pytest.warns(UserWarning, match="No space left"):
        assert _same(cached[0], plain[0])
    assert _same(cached[9], plain[9]) and not list(cached.folder.iterdir())


def test_training_config_uses_the_cache_for_the_synthetic_source_only(tmp_path):
    cfg = load_train_config(None, ["--data.synthetic.image_size=32", f"--data.render_cache={tmp_path}"])
    dataset, shuffle = build_train_dataset(cfg, 32)
    assert isinstance(dataset, CachedSyntheticPairs) and not shuffle
    assert _same(dataset[3], _pairs()[3])
    with pytest.raises(ConfigError, match="'data.render_cache'"):
        load_train_config(None, ["--data.source=manifest", "--data.path=x.csv", f"--data.render_cache={tmp_path}"])
