"""The HDF5 feature store: layout, cache hits, cache keys, resuming after errors and kill -9.

Run as a script, this file is the worker that the kill -9 tests start and kill.
"""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transferkit.features.store import FeatureStore, cache_key  # noqa: E402

DIM, CHUNK, N_IMAGES = 6, 4, 40  # 10 chunks
N_CHUNKS = N_IMAGES // CHUNK


def fake_embed(paths):
    """Deterministic features: the first DIM bytes of each path's sha256, scaled to [0, 1]."""
    digests = [hashlib.sha256(p.encode()).digest()[:DIM] for p in paths]
    return np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(paths), DIM) / 255.0


class CountingEmbed:
    """fake_embed that counts its calls and can fail on one of them."""

    def __init__(self, fail_on_call=None):
        self.calls, self.fail_on_call = 0, fail_on_call

    def __call__(self, paths):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("embed failed")
        return fake_embed(paths)


def make_images(folder: Path, n=N_IMAGES) -> list[str]:
    folder.mkdir(exist_ok=True)
    for i in range(n):
        (folder / f"img{i:03d}.jpg").write_bytes(b"x" * (i + 1))
    return sorted(str(p) for p in folder.glob("*.jpg"))


def labels_for(paths):
    return np.arange(len(paths)) % 3


def compute(store, paths, embed, key="k1", **kwargs):
    kwargs.setdefault("chunk_size", CHUNK)
    kwargs.setdefault("progress", False)
    return store.compute("train", paths, labels_for(paths), embed, key=key, **kwargs)


@pytest.fixture
def paths(tmp_path):
    return make_images(tmp_path / "images")


@pytest.fixture
def reference(tmp_path, paths):
    """(features, labels, paths) of an uninterrupted run."""
    store = FeatureStore(tmp_path / "reference.h5")
    compute(store, paths, fake_embed)
    return store.load("train")


def assert_same_store(store, reference):
    features, labels, paths = store.load("train")
    assert np.array_equal(features, reference[0])
    assert np.array_equal(labels, reference[1])
    assert paths == reference[2]


def test_compute_returns_features_in_order_and_writes_the_documented_layout(tmp_path, paths):
    store = FeatureStore(tmp_path / "store.h5")
    attrs = {"backbone": "mobilenet_v2", "image_size": 224, "class_names": ["a", "b", "c"]}
    features, labels = compute(store, paths, fake_embed, attrs=attrs)

    assert features.dtype == np.float32 and features.shape == (N_IMAGES, DIM)
    assert labels.dtype == np.int64 and np.array_equal(labels, labels_for(paths))
    assert np.array_equal(features, fake_embed(paths).astype(np.float32))
    with h5py.File(store.path, "r") as file:
        group = file["train"]
        assert group["features"].chunks[0] == CHUNK
        assert list(group["paths"].asstr()[()]) == paths
        assert group["done"][()].all()
        assert group.attrs["key"] == "k1" and group.attrs["complete"]
        assert group.attrs["backbone"] == "mobilenet_v2"
        assert json.loads(group.attrs["class_names"]) == ["a", "b", "c"]
    info = store.info()["train"]
    assert (info["n"], info["dim"], info["complete"], info["key"]) == (N_IMAGES, DIM, True, "k1")
    assert info["attrs"]["image_size"] == 224


def test_second_call_with_the_same_key_does_not_embed(tmp_path, paths):
    store = FeatureStore(tmp_path / "store.h5")
    first = compute(store, paths, fake_embed)
    embed = CountingEmbed()
    second = compute(store, paths, embed)
    assert embed.calls == 0
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_load_returns_none_until_a_split_is_complete(tmp_path, paths):
    store = FeatureStore(tmp_path / "store.h5")
    assert store.load("train") is None and store.info() == {}
    with pytest.raises(RuntimeError):
        compute(store, paths, CountingEmbed(fail_on_call=2))
    assert store.load("train") is None and store.info()["train"]["complete"] is False


def test_cache_key_follows_files_and_configuration(tmp_path, paths):
    config = {"backbone": "mobilenet_v2", "layers": ["top"], "image_size": 224}
    key = cache_key(files=paths, **config)
    assert cache_key(files=list(paths), **config) == key
    assert cache_key(files=paths, **{**config, "layers": ["block_13_expand"]}) != key
    assert cache_key(files=paths, **{**config, "image_size": 160}) != key
    assert cache_key(files=paths + make_images(tmp_path / "more", 1), **config) != key

    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    touched = cache_key(files=paths, **config)
    assert touched != key
    Path(paths[1]).write_bytes(b"a new size")
    assert cache_key(files=paths, **config) not in (key, touched)


def test_cache_key_folds_in_a_weights_file(tmp_path, paths):
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"1")
    key = cache_key(weights=str(weights), files=paths)
    weights.write_bytes(b"22")
    assert cache_key(weights=str(weights), files=paths) != key
    assert cache_key(weights="imagenet", files=paths) != cache_key(weights=None, files=paths)


def test_cache_key_is_the_same_in_another_process(datasets):
    files = sorted(str(p) for p in (datasets / "cats_dogs" / "cat").glob("*.jpg"))[:20]
    code = ("import json, sys; from transferkit.features.store import cache_key; "
            "print(cache_key(backbone='mobilenet_v2', layers=['top'], files=json.loads(sys.argv[1])))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(files)], cwd=REPO,
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == cache_key(backbone="mobilenet_v2", layers=["top"], files=files)


def test_a_changed_key_recomputes_and_says_why(tmp_path, paths, caplog):
    store = FeatureStore(tmp_path / "store.h5")
    compute(store, paths, fake_embed, key="old")
    embed = CountingEmbed()
    with caplog.at_level(logging.INFO, logger="transferkit"):
        compute(store, paths, embed, key="new")
    assert embed.calls == N_CHUNKS and store.info()["train"]["key"] == "new"
    assert "cache key changed" in caplog.text

    fewer = paths[:-CHUNK]
    with caplog.at_level(logging.INFO, logger="transferkit"):
        features, _ = compute(store, fewer, fake_embed, key="fewer")
    assert features.shape == (len(fewer), DIM) and "file list changed" in caplog.text


def test_resume_after_an_embed_error_computes_only_the_missing_chunks(tmp_path, paths, reference):
    store = FeatureStore(tmp_path / "store.h5")
    with pytest.raises(RuntimeError, match="embed failed"):
        compute(store, paths, CountingEmbed(fail_on_call=3))
    embed = CountingEmbed()
    compute(store, paths, embed)
    assert embed.calls == N_CHUNKS - 2
    assert_same_store(store, reference)


def start_worker(store_path, paths, log_path, *, kill_at_flush=-1, sleep=0.0):
    args = [str(store_path), json.dumps(paths), str(log_path), str(kill_at_flush), str(sleep)]
    return subprocess.Popen([sys.executable, __file__, *args], stderr=subprocess.PIPE)


def done_chunks_on_disk(store_path) -> int:
    """How many chunks the killed run left marked done (0 if the file is unreadable)."""
    try:
        with h5py.File(store_path, "r") as file:
            return int(file["train/done"][()].sum())
    except (OSError, KeyError):
        return 0


def resume_and_check(store, paths, reference) -> int:
    """Resume in-process; check the result equals the reference; return embed calls."""
    expected_calls = N_CHUNKS - done_chunks_on_disk(store.path)
    embed = CountingEmbed()
    compute(store, paths, embed)
    assert embed.calls == expected_calls
    assert_same_store(store, reference)
    return embed.calls


# Flushes of a fresh run: 1 group created, 2 features dataset created, then per chunk i
# 3+2i its features, 4+2i its done mark, and last 2+2*N_CHUNKS+1 the complete flag.
@pytest.mark.parametrize("flush", [1, 2, 3, 4, 5, 12, 2 * N_CHUNKS + 3])
def test_resume_after_kill_9_at_each_stage(tmp_path, paths, reference, flush):
    store = FeatureStore(tmp_path / "store.h5")
    worker = start_worker(store.path, paths, tmp_path / "log", kill_at_flush=flush)
    assert worker.wait(timeout=20) == -signal.SIGKILL, worker.stderr.read().decode()
    calls = resume_and_check(store, paths, reference)
    if flush > 4:
        assert calls < N_CHUNKS


@pytest.mark.parametrize("flush", [1, 2])
def test_kill_9_while_adding_a_split_keeps_the_other_splits(tmp_path, paths, reference, flush):
    store = FeatureStore(tmp_path / "store.h5")
    test_split = store.compute("test", paths[:5], [0] * 5, fake_embed, key="t", progress=False)
    worker = start_worker(store.path, paths, tmp_path / "log", kill_at_flush=flush)
    assert worker.wait(timeout=20) == -signal.SIGKILL
    assert np.array_equal(store.load("test")[0], test_split[0])
    resume_and_check(store, paths, reference)
    assert not list(tmp_path.glob("store.h5.corrupt-*"))


@pytest.mark.parametrize("after_calls", [0, 2, 6])
def test_resume_after_an_external_kill_9(tmp_path, paths, reference, after_calls):
    store, log = FeatureStore(tmp_path / "store.h5"), tmp_path / "log"
    worker = start_worker(store.path, paths, log, sleep=0.05)
    deadline = time.monotonic() + 20
    while not (store.path.exists() if after_calls == 0 else
               log.exists() and len(log.read_text()) >= after_calls):
        assert worker.poll() is None and time.monotonic() < deadline, worker.stderr.read().decode()
        time.sleep(0.001)
    worker.send_signal(signal.SIGKILL)
    assert worker.wait(timeout=20) == -signal.SIGKILL
    calls = resume_and_check(store, paths, reference)
    assert calls <= N_CHUNKS - max(after_calls - 1, 0)


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_an_unreadable_file_is_moved_aside_and_rebuilt(tmp_path, paths, reference, caplog, damage):
    store = FeatureStore(tmp_path / "store.h5")
    if damage == "truncated":
        compute(store, paths, fake_embed)
        content = store.path.read_bytes()[:5000]
    else:
        content = np.random.default_rng(0).bytes(5000)
    store.path.write_bytes(content)
    assert store.load("train") is None

    with caplog.at_level(logging.WARNING, logger="transferkit"):
        compute(store, paths, fake_embed)
    assert_same_store(store, reference)
    [aside] = tmp_path.glob("store.h5.corrupt-*")
    assert aside.read_bytes() == content and "moved it to" in caplog.text


def test_progress_prints_about_every_tenth_when_not_a_terminal(tmp_path, paths, capsys):
    compute(FeatureStore(tmp_path / "store.h5"), paths, fake_embed, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == N_CHUNKS
    assert lines[-1].startswith(f"extracting train: {N_IMAGES}/{N_IMAGES} images (100%), ")
    assert "img/s, eta 0s" in lines[-1]


def _worker(store_path, paths_json, log_path, kill_at_flush, sleep):
    """Compute a store, logging one character per embed call; SIGKILL self at a given flush."""
    kill_at_flush, flushes = int(kill_at_flush), []
    original_flush = h5py.File.flush

    def flush(file):
        flushes.append(1)
        if len(flushes) == kill_at_flush:
            os.kill(os.getpid(), signal.SIGKILL)
        original_flush(file)

    def embed(batch):
        with open(log_path, "a") as log:
            log.write(".")
        time.sleep(float(sleep))
        return fake_embed(batch)

    h5py.File.flush = flush
    compute(FeatureStore(store_path), json.loads(paths_json), embed)


if __name__ == "__main__":
    _worker(*sys.argv[1:])


def test_alpha_null_and_its_default_share_one_cache_entry():
    from transferkit.recipe import load_recipe
    from transferkit.strategies.extract import _digest, _feature_config

    def config(backbone):
        return _feature_config(load_recipe({"data": {"train": "photos"}, "backbone": backbone}), 224)

    default = config({"name": "mobilenet_v2"})
    assert default == config({"name": "mobilenet_v2", "alpha": 1.0}) == config({"name": "mobilenet_v2", "alpha": 1})
    assert _digest(default) == _digest(config({"name": "mobilenet_v2", "alpha": 1.0}))
    assert default != config({"name": "mobilenet_v2", "alpha": 0.35})
    assert config({"name": "resnet50"})["alpha"] is None  # no width multipliers at all
