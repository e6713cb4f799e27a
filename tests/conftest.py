"""Shared test setup: real weights and datasets from ../shared, quiet TensorFlow."""

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():  # a checkout whose ../shared sits elsewhere can say where
    SHARED = Path(os.environ.get("TRANSFERKIT_SHARED", SHARED))
DATASETS = SHARED / "datasets"
KERAS_HOME = SHARED / "keras_home"

# Before anything imports Keras: the real ImageNet weights, and no TensorFlow log spam.
os.environ.setdefault("KERAS_HOME", str(KERAS_HOME))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Never the developer's real cache: every test, and every process a test starts, gets a fresh home
# (tests that need their own set it again).
os.environ["TRANSFERKIT_HOME"] = tempfile.mkdtemp(prefix="transferkit-tests-home-")


@pytest.fixture(scope="session")
def datasets() -> Path:
    """The folder of real class-per-folder datasets (flowers5, cats_dogs, dtd10, ...)."""
    if not DATASETS.is_dir():
        pytest.fail(f"no datasets at {DATASETS}: set TRANSFERKIT_SHARED to the shared/ folder")
    return DATASETS


@pytest.fixture(scope="session")
def keras_home() -> Path:
    """The folder holding Keras' ImageNet weight files under models/."""
    return KERAS_HOME


@pytest.fixture(scope="session")
def small_cats_dogs(datasets, tmp_path_factory) -> Path:
    """20 cats and 20 dogs (copies of the real files: links out of a data folder are not followed)."""
    return copy_first_images(datasets / "cats_dogs", tmp_path_factory.mktemp("cats_dogs20"), 20)


def copy_first_images(source: Path, root: Path, per_class: int, classes=("cat", "dog")) -> Path:
    """``root`` holding copies of the first ``per_class`` files of each class folder of ``source``."""
    for cls in classes:
        (root / cls).mkdir()
        for path in sorted((source / cls).iterdir())[:per_class]:
            shutil.copyfile(path, root / cls / path.name)
    return root


@pytest.fixture(scope="session")
def home(tmp_path_factory):
    """A fresh TRANSFERKIT_HOME (feature store, classifier cache) for the whole session."""
    path = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFERKIT_HOME", str(path))
        yield path


@pytest.fixture
def in_process(monkeypatch, capsys):
    """Runs `transferkit ARGS` through `transferkit.cli.main` in the test process: (exit code, stdout,
    stderr). For checks that start Keras, which a fresh process would take seconds to do."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # the CLI installs its own

    from transferkit.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            main([str(arg) for arg in args])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
        return (code, *capsys.readouterr())

    return run
