"""The cache of features and classifier fits under $TRANSFERKIT_HOME: listing, last use, clearing."""

import os
import time

import numpy as np

from test_cli import assert_one_line_error, transferkit
from transferkit.cache import cache_entries, clear_cache
from transferkit.classifiers import build_classifier, fit_cached
from transferkit.features import FeatureStore
from transferkit.recipe import ClassifierSpec

DAY = 86400


def make_home(root):
    """A home with an old feature file, a fresh classifier fit and a built-in dataset."""
    files = {"old": root / "features" / "mobilenet-1.h5", "new": root / "classifiers" / "abc.joblib",
             "builtin": root / "builtin" / "digits" / "0" / "a.png"}
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    forty_days_ago = time.time() - 40 * DAY
    os.utime(files["old"], (forty_days_ago, forty_days_ago))
    return files


def test_entries_and_clearing_by_last_use(tmp_path):
    files = make_home(tmp_path)
    entries = cache_entries(tmp_path)
    assert [(e.kind, e.path, e.size) for e in entries] == [("features", files["old"], 1000),
                                                         ("classifiers", files["new"], 1000)]  # oldest first
    assert [e.path for e in clear_cache(older_than_days=30, home=tmp_path)] == [files["old"]]
    assert not files["old"].exists() and files["new"].exists()
    assert [e.path for e in clear_cache(home=tmp_path)] == [files["new"]]
    assert cache_entries(tmp_path) == [] and files["builtin"].exists()  # datasets are not a cache


def test_reuse_marks_the_files_as_used(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 4))
    y = np.repeat([0, 1], 20)
    spec = ClassifierSpec(grid={})
    fit_cached(build_classifier(spec, seed=0, n_samples_per_class=20), x, y, tmp_path)
    (path,) = tmp_path.glob("*.joblib")
    os.utime(path, (0, 0))
    _, reused = fit_cached(build_classifier(spec, seed=0, n_samples_per_class=20), x, y, tmp_path)
    assert reused and path.stat().st_mtime > time.time() - DAY

    store = FeatureStore(tmp_path / "features.h5")
    paths = [f"image{i}.png" for i in range(4)]
    store.compute("train", paths, [0, 1, 0, 1], lambda p: np.ones((len(p), 3)), key="k", progress=False)
    os.utime(store.path, (0, 0))
    store.compute("train", paths, [0, 1, 0, 1], lambda p: np.ones((len(p), 3)), key="k", progress=False)
    assert store.path.stat().st_mtime > time.time() - DAY


def test_cache_command(tmp_path):
    files = make_home(tmp_path)
    env = {"TRANSFERKIT_HOME": str(tmp_path)}
    shown = transferkit("cache", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "features        1 files" in shown.stdout and "least recently used 40 days ago" in shown.stdout
    cleared = transferkit("cache", "--clear", "--older-than", "30", env=env)
    assert cleared.returncode == 0 and cleared.stdout.startswith("removed 1 files (0.0 MB)")
    assert not files["old"].exists() and files["new"].exists()
    assert_one_line_error(transferkit("cache", "--older-than", "30", env=env), "--older-than goes with --clear")
