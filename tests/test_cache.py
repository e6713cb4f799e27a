"""The cache of features and classifier fits under $TRANSFERKIT_HOME: listing, last use, clearing."""

import os
import time

import numpy as np

from test_cli import assert_one_line_error, transferkit
from transferkit.features.cache import cache_entries, clear_cache, format_cache
from transferkit.features.classifiers import build_classifier, fit_cached
from transferkit.features.store import FeatureStore

DAY = 86400


def make_home(root):
    """A home with an old feature file, a fresh classifier fit and a built-in dataset."""
    files = {"old": root / "features" / "mobilenet-0123456789ab.h5",
             "new": root / "classifiers" / f"{'ab' * 16}.npz",
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
    fit_cached(build_classifier(grid={}, seed=0, n_samples_per_class=20), x, y, tmp_path)
    (path,) = tmp_path.glob("*.npz")
    os.utime(path, (0, 0))
    _, reused = fit_cached(build_classifier(grid={}, seed=0, n_samples_per_class=20), x, y, tmp_path)
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


TRANSFERKIT_FILES = {  # folder -> names transferkit writes there
    "features": ["mobilenet_v2-0123456789ab.h5", "efficientnet_b0-abcdef012345.h5",
                 "mobilenet_v2-0123456789ab.h5.corrupt-20240101-120000-123456",
                 ".mobilenet_v2-0123456789ab.k2j_x9a0.tmp.h5"],
    "classifiers": [f"{'0f' * 16}.npz", f"{'1e' * 16}.skops", f"{'2d' * 16}.joblib",
                    f".{'3c' * 16}.abcd_123.tmp.npz"],
}
OTHER_FILES = {  # names that are not transferkit's, in the same folders
    "features": ["mine.h5", "notes.txt", "mobilenet_v2-0123456789ab.h5.bak", "model-0123456789AB.h5",
                 "backup-0123456789ab.h5.old", ".hidden.h5"],
    "classifiers": ["model.joblib", "abc.joblib", f"{'0f' * 16}.pkl", f"{'0f' * 15}.npz", "weights.npz",
                    f"{'0f' * 16}.npz.orig"],
}


def test_only_files_transferkit_wrote_are_listed_and_cleared(tmp_path):
    for kind, names in TRANSFERKIT_FILES.items():
        for name in names + OTHER_FILES[kind]:
            (tmp_path / kind).mkdir(exist_ok=True)
            (tmp_path / kind / name).write_bytes(b"x" * 10)
    listed = {(entry.kind, entry.path.name) for entry in cache_entries(tmp_path)}
    assert listed == {(kind, name) for kind, names in TRANSFERKIT_FILES.items() for name in names}
    assert {(e.kind, e.path.name) for e in clear_cache(home=tmp_path)} == listed
    for kind, names in OTHER_FILES.items():
        assert sorted(p.name for p in (tmp_path / kind).iterdir()) == sorted(names)  # left alone


def test_folders_and_links_named_like_cache_files_are_ignored(tmp_path):
    features = tmp_path / "features"
    (features / "x-0123456789ab.h5").mkdir(parents=True)  # a directory with a feature store's name
    (features / "x-0123456789ab.h5" / "inside.txt").write_text("kept")
    outside = tmp_path / "precious.h5"
    outside.write_bytes(b"x" * 10)
    (features / "y-0123456789ab.h5").symlink_to(outside)
    (tmp_path / "classifiers").write_text("a file where a folder should be")
    assert cache_entries(tmp_path) == [] and clear_cache(home=tmp_path) == []
    assert (features / "x-0123456789ab.h5" / "inside.txt").is_file() and outside.is_file()
    assert (features / "y-0123456789ab.h5").is_symlink()


def test_clear_command_with_a_directory_named_like_a_store_does_not_crash(tmp_path):
    files = make_home(tmp_path)
    (tmp_path / "features" / "x.h5").mkdir()
    (tmp_path / "features" / "z-0123456789ab.h5").mkdir()
    (tmp_path / "classifiers" / "other-program.joblib").write_bytes(b"y")
    cleared = transferkit("cache", "--clear", env={"TRANSFERKIT_HOME": str(tmp_path)})
    assert cleared.returncode == 0 and cleared.stdout.startswith("removed 2 files"), cleared.stderr
    assert not files["old"].exists() and not files["new"].exists()
    assert (tmp_path / "features" / "x.h5").is_dir() and (tmp_path / "classifiers" / "other-program.joblib").exists()


def test_the_names_written_by_the_feature_store_and_the_fit_cache_are_recognised(tmp_path, monkeypatch):
    """Real writers, not hand-made names: a classifier fit and a feature store file named as extraction names it."""
    from transferkit.strategies.extract import _digest

    monkeypatch.setenv("TRANSFERKIT_HOME", str(tmp_path))
    x = np.random.default_rng(0).normal(size=(40, 4))
    y = np.repeat([0, 1], 20)
    for name in ("logistic_regression", "knn"):
        fit_cached(build_classifier(name, grid={}, seed=0), x, y, tmp_path / "classifiers")
    store = FeatureStore(tmp_path / "features" / f"mobilenet_v2-{_digest({'any': 'config'})}.h5")
    store.compute("train", ["a.png", "b.png"], [0, 1], lambda p: np.ones((len(p), 3)), key="k", progress=False)
    assert sorted(e.path.suffix for e in cache_entries(tmp_path)) == [".h5", ".npz", ".skops"]
    assert len(clear_cache(home=tmp_path)) == 3
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_the_listing_gives_each_kind_its_count_size_and_least_recent_use(tmp_path):
    make_home(tmp_path)
    assert format_cache(cache_entries(tmp_path), tmp_path).splitlines() == [
        f"{tmp_path}:",
        "  features        1 files     0.0 MB, least recently used 40 days ago",
        "  classifiers     1 files     0.0 MB, least recently used today"]
