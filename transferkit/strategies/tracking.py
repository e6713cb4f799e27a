"""A run's record outside its folder, as the recipe's ``log`` section asks: TensorBoard event files in
``<run>/tensorboard/`` (see :mod:`transferkit.training.tensorboard`) and an MLflow run.

:func:`check_tracking` says at validate time which package a ``log`` key needs; :func:`track_run` ends a
run's record once its reports are written: the recipe as hyper-parameters, each split's final metrics,
the confusion matrices (TensorBoard), the history per epoch and the report files (MLflow).

Example:
    >>> track_run(run, folder, step=trainer.epoch * steps)   # after the reports, before run.save
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

from transferkit.errors import RecipeError
from transferkit.recipe import Recipe

log = logging.getLogger("transferkit")

#: What each ``log`` key needs installed, and how to install it.
NEEDS = {"tensorboard": ("tensorboard", "pip install 'transferkit[tensorboard]'"),
         "mlflow": ("mlflow", "pip install mlflow")}
#: The report files of a run folder that go to MLflow as artifacts.
REPORT_SUFFIXES = (".json", ".csv", ".png", ".txt", ".html")


def check_tracking(recipe: Recipe) -> None:
    """Raises RecipeError, one line, when a ``log`` key is set whose package is not installed."""
    for key, (package, install) in NEEDS.items():
        if getattr(recipe.log, key) and importlib.util.find_spec(package) is None:
            raise RecipeError(f"needs {package}: {install}", key=f"log.{key}")


def flat_recipe(recipe: Recipe) -> dict[str, bool | int | float | str]:
    """The recipe as ``{"finetune.optimizer.learning_rate": 0.001, ...}``: dotted YAML keys to bools,
    numbers and strings (lists, empty mappings and null written as JSON)."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    walk("", recipe.to_dict())
    return flat


def track_run(run, folder: Path, step: int = 0) -> None:
    """Writes the end of ``run`` (its reports written to ``folder``) to TensorBoard and MLflow, as
    ``run.recipe.log`` asks; ``step`` is the training step it ended at (0: nothing trained). In a
    multi-host run process 0 alone writes it."""
    from transferkit.training.multihost import is_main_process

    spec = run.recipe.log
    if not is_main_process():
        return
    if spec.tensorboard:
        from transferkit.training.tensorboard import write_run_summary

        images = {f"confusion_matrix/{split}": Path(folder) / f"{split}_confusion_matrix.png" for split in run.metrics}
        write_run_summary(Path(folder) / "tensorboard", step=step, hparams=flat_recipe(run.recipe),
                          metrics=run.metrics, images=images, texts={"recipe": _as_code(run.recipe.to_yaml())})
    if spec.mlflow:
        try:
            _log_to_mlflow(run, Path(folder), spec.mlflow, spec.mlflow_experiment)
        except Exception as error:  # noqa: BLE001 - the run folder is complete: a tracking server's trouble is told
            log.warning("log.mlflow: could not log the run to %s (%s: %s); the run folder has everything",
                        spec.mlflow, type(error).__name__, str(error).splitlines()[0] if str(error) else "")


def _as_code(text: str) -> str:
    """``text`` as a markdown code block (TensorBoard's text dashboard renders markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


def _log_to_mlflow(run, folder: Path, uri: str, experiment: str) -> None:
    """One MLflow run in ``experiment`` at ``uri``: the flat recipe as params, the history per epoch
    and each split's final metrics (``val/top1``) as metrics, the recipe and report files as artifacts."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run_id = client.create_run(experiment_id, run_name=run.recipe.name).info.run_id
    now = int(time.time() * 1000)
    params = [Param(key, str(value)) for key, value in flat_recipe(run.recipe).items()]
    metrics = [Metric(key, float(value), now, epoch) for key, values in run.history.items() if key != "phase"
               for epoch, value in enumerate(values, 1) if isinstance(value, (int, float))]
    metrics += [Metric(f"{split}/{key}", float(value), now, 0) for split, values in run.metrics.items()
                for key, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    try:
        for start in range(0, max(len(params), len(metrics)), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(run_id, metrics=metrics[start:start + 100], params=params[start:start + 100])
        client.log_text(run_id, run.recipe.to_yaml(), "recipe.yaml")
        for path in sorted(Path(folder).iterdir()):
            if path.is_file() and path.suffix in REPORT_SUFFIXES:
                client.log_artifact(run_id, str(path))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    log.info("logged to MLflow at %s (experiment %s, run %s)", uri, experiment, run_id)
