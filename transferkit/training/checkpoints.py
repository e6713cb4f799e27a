"""The ``checkpoint/`` folder of a fine-tuning run: per-epoch weights and optimizer state, ``state.json``.

    epoch-N.weights.npz, epoch-N.optimizer.npz   model and optimizer state of epoch N
    epoch-N.imag_head.npz                        inside an imag episode: its head
    best.weights.npz                             best epoch so far (early stopping)
    state.json                                   epoch, phase, history, early stopping

``state.json`` is written last, so it only ever names complete files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from transferkit.io import atomic_path, atomic_write_json, require_space

RESUME_HINT = ", then run the same command again with --resume (the last finished epoch is kept)"


class Checkpoints:
    """The ``checkpoint/`` folder of a run: per-epoch weights and optimizer state, ``state.json``.

    Arrays are written with NumPy (``.npz``, atomically), not HDF5: on a full disk a write fails with
    an ordinary error and the earlier epoch stays, where HDF5 leaves its library unusable.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def of(cls, run_folder: Path) -> "Checkpoints":
        return cls(Path(run_folder) / "checkpoint")

    def state(self) -> dict | None:
        """The last saved state, or None when there is no unfinished run."""
        path = self.folder / "state.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def weights(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch}.weights.npz"

    @property
    def best(self) -> Path:
        return self.folder / "best.weights.npz"

    def optimizer(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch}.optimizer.npz"

    def imag_head(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch}.imag_head.npz"

    def save(self, model, optimizer, epoch: int, state: dict, imag_head: list | None = None) -> None:
        """The model's weights, the optimizer's state (and inside an imag episode the imag head's
        weights) of ``epoch``, then ``state.json``, then older epochs go."""
        import keras

        optimizer_state = [keras.ops.convert_to_numpy(v) for v in optimizer.variables]
        weights = model.get_weights()
        require_space(self.folder, sum(a.nbytes for a in [*weights, *optimizer_state, *(imag_head or [])]),
                      f"the epoch {epoch} checkpoint", then=RESUME_HINT)
        try:
            save_arrays(self.weights(epoch), weights)
            save_arrays(self.optimizer(epoch), optimizer_state)
            if imag_head is not None:
                save_arrays(self.imag_head(epoch), imag_head)
            atomic_write_json(self.folder / "state.json", {**state, "epoch": epoch})
        except BaseException:  # state.json still names the last complete epoch: give the space back
            self._remove_epochs(keep=(self.state() or {}).get("epoch"))
            raise
        self._remove_epochs(keep=epoch)

    def _remove_epochs(self, keep: int | None) -> None:
        for path in self.folder.glob("epoch-*"):
            if not path.name.startswith(f"epoch-{keep}."):
                path.unlink()

    def save_best(self, model) -> None:
        weights = model.get_weights()
        require_space(self.folder, sum(a.nbytes for a in weights), "the best epoch's weights", then=RESUME_HINT)
        save_arrays(self.best, weights)

    def has_weights(self, epoch: int | None = None) -> bool:
        """Whether the weights of ``epoch`` (None: the best epoch) are saved, in either format."""
        path = self.best if epoch is None else self.weights(epoch)
        return path.is_file() or _earlier_format(path).is_file()

    def load_weights(self, model, epoch: int | None = None) -> None:
        """Put the weights of ``epoch`` (None: the best epoch) into ``model``."""
        path = self.best if epoch is None else self.weights(epoch)
        if not path.is_file() and _earlier_format(path).is_file():  # written by an earlier transferkit
            model.load_weights(_earlier_format(path))
            return
        model.set_weights(load_arrays(path))

    def load_optimizer(self, epoch: int) -> list[np.ndarray]:
        """The optimizer variables saved with ``epoch``, in ``optimizer.variables`` order."""
        return load_arrays(self.optimizer(epoch))

    def load_imag_head(self, epoch: int) -> list[np.ndarray]:
        """The imag head's weights saved with ``epoch`` (see ``transferkit.training.trainer.get_head_weights``)."""
        return load_arrays(self.imag_head(epoch))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class ReadOnlyCheckpoints(Checkpoints):
    """The checkpoints as a process other than process 0 of a multi-host run sees them: it reads the
    folder (shared with process 0) to resume, and writes nothing. The best epoch's weights, which it
    restores when process 0 does, it keeps in memory."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self._best: list | None = None

    def save(self, model, optimizer, epoch: int, state: dict, imag_head: list | None = None) -> None:
        pass

    def save_best(self, model) -> None:
        self._best = model.get_weights()

    def has_weights(self, epoch: int | None = None) -> bool:
        return (epoch is None and self._best is not None) or super().has_weights(epoch)

    def load_weights(self, model, epoch: int | None = None) -> None:
        if epoch is None and self._best is not None:
            model.set_weights(self._best)
        else:
            super().load_weights(model, epoch)

    def clear(self) -> None:
        pass


def _earlier_format(path: Path) -> Path:
    """Where an earlier transferkit kept the weights that ``path`` holds (Keras' ``.weights.h5``)."""
    return path.with_name(path.name.replace(".weights.npz", ".weights.h5"))


def save_arrays(path: Path, arrays: list) -> None:
    """Writes ``arrays`` to the ``.npz`` file ``path`` atomically (a failed write leaves no file)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            np.savez(file, **{f"v{i}": array for i, array in enumerate(arrays)})


def load_arrays(path: Path) -> list[np.ndarray]:
    """The arrays :func:`save_arrays` wrote, in order."""
    with np.load(path) as saved:
        return [saved[f"v{i}"] for i in range(len(saved.files))]
