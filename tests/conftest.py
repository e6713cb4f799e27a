"""Shared test setup: real weights and datasets from ../shared, quiet TensorFlow."""

import os
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
