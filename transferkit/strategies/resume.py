"""Where a fine-tuning run stands in its output folder: finished, unfinished (resumable from its
checkpoint in ``<output>.partial``) or not started, and the checkpoint state a run starts from."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from transferkit.outputs import OutputFolder
from transferkit.training.checkpoints import Checkpoints
from transferkit.training.trainer import TrainingError

log = logging.getLogger("transferkit")


def unfinished_run(output: str | Path) -> dict | None:
    """The checkpoint state of an unfinished run into ``output``, or None."""
    output = Path(output)
    return Checkpoints.of(output.with_name(f"{output.name}.partial")).state()


def finished_run(output: str | Path) -> dict | None:
    """The ``run.json`` of a finished run in ``output``, or None (nothing there, or a newer run unfinished)."""
    import json

    summary = Path(output) / "run.json"
    if not summary.is_file() or unfinished_run(output) is not None:
        return None
    return json.loads(summary.read_text())


def finished(state: dict) -> bool:
    """Whether the checkpoint ``state`` is of a run that has trained all its epochs (or stopped early)."""
    return state["epoch"] >= state["total_epochs"] or bool(state.get("early_stopping", {}).get("stopped"))


def adopt_earlier_checkpoint(out: OutputFolder, restart: bool) -> None:
    """A ``checkpoint/`` inside the output folder itself is either what a finished run had not yet
    dropped when it was killed (removed), or an unfinished run of an earlier transferkit, which
    checkpointed there (moved beside, so that ``--resume`` continues it; ``--restart`` removes it)."""
    earlier = Checkpoints.of(out.path)
    state = earlier.state() if earlier.folder.is_dir() else None
    if state is not None and not restart and not finished(state) and Checkpoints.of(out.partial).state() is None:
        shutil.rmtree(Checkpoints.of(out.partial).folder, ignore_errors=True)
        earlier.folder.rename(Checkpoints.of(out.partial).folder)
    else:
        earlier.clear()


def starting_state(checkpoints: Checkpoints, output: Path, resume: bool) -> dict | None:
    """The state to go on from (None: start over), or TrainingError for an unfinished run without ``resume``."""
    state = checkpoints.state()
    if state is not None and not resume:
        raise TrainingError(f"{output} has an unfinished run in {checkpoints.folder.parent.name} (stopped after epoch "
                            f"{state['epoch']} of {state['total_epochs']}): add --resume to continue it "
                            "or --restart to start over")
    if state is None and resume:
        log.info("nothing to resume in %s: starting from epoch 1", checkpoints.folder.parent)
    return state
