"""TensorBoard event files, written with the ``tensorboard`` package's own event writer and protocol
buffers: no TensorFlow summary op runs, so a run writes the same files under the TensorFlow, JAX
and PyTorch backends (``pip install 'transferkit[tensorboard]'``; ``tensorboard --logdir runs/`` shows them).

The layout of ``<run>/tensorboard/`` is the one Keras' own ``TensorBoard`` callback writes:

    train/        epoch_loss, epoch_accuracy, epoch_learning_rate, epoch_seconds   (x: the epoch, from 1)
                  batch_loss, batch_accuracy, batch_learning_rate every ``every`` steps (x: the training step)
    validation/   epoch_loss, epoch_accuracy, ... of the val split
    .             the hyper-parameters (HParams dashboard), the recipe as text, the confusion matrices as
                  images and each split's final metrics (val/top1, test/loss, ...)

An imag episode's own logs are ``epoch_imag_loss``, ``batch_imag_loss``, .... The epoch values are
the run's history (``history.json``). The steps of an epoch are written at its end with its epoch
values, after the epoch is checkpointed, so a resumed run's curves do not repeat the steps of the
epoch it stopped in.

Example:
    >>> with EventWriter("runs/a/tensorboard") as writer:
    ...     writer.scalar("val/top1", 0.93, step=10)
"""

from __future__ import annotations

import io
import numbers
import time
from pathlib import Path

import keras

from transferkit.training.schedules import learning_rate_at


class EventWriter:
    """A new event file in ``folder``, with scalars, PNG images, text and summaries added at a step;
    a context manager that closes (and so flushes) it."""

    def __init__(self, folder: str | Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.events = EventFileWriter(str(folder))

    def scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.summary(Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]), step)

    def image(self, tag: str, png: bytes, step: int) -> None:
        """A PNG file's bytes as an image."""
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        with Image.open(io.BytesIO(png)) as picture:
            (width, height), channels = picture.size, len(picture.getbands())
        image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
        self.summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def text(self, tag: str, text: str, step: int) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        self.summary(text_pb(tag, text), step)

    def hparams(self, values: dict) -> None:
        """The HParams dashboard's record of this run: ``values`` maps names to bools, numbers or strings."""
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb

        self.summary(hparams_pb(values), 0)

    def summary(self, summary, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self.events.add_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        self.events.flush()

    def close(self) -> None:
        self.events.close()

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardLogger(keras.callbacks.Callback):
    """Writes a fitting phase to ``folder``'s ``train/`` and ``validation/``: each epoch's logs as
    recorded in ``record`` (the trainer's :class:`~transferkit.training.trainer.TrainingRecord`), and
    every ``every`` training steps Keras' running loss and metrics of the epoch with the learning rate
    of the step: ``schedule``'s (the phase's ``EpochSchedule``; None: ``optimizer``'s constant rate).
    ``prefix`` goes in front of the training keys (``imag_`` in an imag episode)."""

    def __init__(self, folder: str | Path, record, optimizer, schedule=None, every: int = 10, prefix: str = ""):
        super().__init__()
        self.folder, self.record, self.optimizer, self.schedule = Path(folder), record, optimizer, schedule
        self.every, self.prefix = every, prefix
        self.writers: dict[str, EventWriter] = {}
        self.steps: list[tuple[int, dict, float]] = []  # this epoch's (step, logs, learning rate)
        self.rates: dict[int, float] = {}  # batch -> its learning rate, for the batches this epoch logs
        self.epoch = 0

    def on_train_begin(self, logs=None):
        self.writers = {name: EventWriter(self.folder / name) for name in ("train", "validation")}

    def on_epoch_begin(self, epoch, logs=None):
        # the optimizer's variables are up to date between epochs under every backend (JAX's trainer
        # holds them apart during an epoch), so the rates of this epoch's logged steps are read now
        steps, first = self.params["steps"], int(keras.ops.convert_to_numpy(self.optimizer.iterations))
        self.epoch, self.steps = epoch, []
        logged = [batch for batch in range(steps) if (epoch * steps + batch + 1) % self.every == 0]
        if self.schedule is None:  # the warm-up's constant rate
            rate = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
            self.rates = dict.fromkeys(logged, rate)
        else:
            self.rates = {batch: learning_rate_at(self.schedule, first + batch) for batch in logged}

    def on_train_batch_end(self, batch, logs=None):
        if batch in self.rates:
            values = {key: float(value) for key, value in (logs or {}).items()}
            self.steps.append((self.epoch * self.params["steps"] + batch + 1, values, self.rates[batch]))

    def on_epoch_end(self, epoch, logs=None):
        train, validation = self.writers["train"], self.writers["validation"]
        for step, values, rate in self.steps:
            for key, value in values.items():
                train.scalar(f"batch_{self.prefix}{key}", value, step)
            train.scalar("batch_learning_rate", rate, step)
        for key, value in self.record.last.items():
            if key.startswith("val_"):
                validation.scalar(f"epoch_{key[4:]}", value, self.record.epoch)
            elif value is not None:
                train.scalar(f"epoch_{key}", value, self.record.epoch)
        train.flush()
        validation.flush()

    def on_train_end(self, logs=None):
        for writer in self.writers.values():
            writer.close()
        self.writers = {}


def phase_loggers(trainer, phase) -> list:
    """A :class:`TensorBoardLogger` for ``trainer``'s ``phase`` (after its optimizer is prepared) into
    ``trainer.folder / "tensorboard"``, when ``trainer.settings.tensorboard_steps`` asks for one."""
    every = trainer.settings.tensorboard_steps
    if every is None:
        return []
    return [TensorBoardLogger(Path(trainer.folder) / "tensorboard", trainer.record, trainer.optimizer, trainer.schedule,
                              every=every, prefix="imag_" if phase.name == "imag" else "")]


def write_run_summary(folder: str | Path, *, step: int, hparams: dict, metrics: dict[str, dict],
                      images: dict[str, Path] = (), texts: dict[str, str] = ()) -> None:
    """The end of a run in ``folder``: its ``hparams`` (names -> bools, numbers or strings), each split's
    ``metrics`` (float values) as ``split/metric`` scalars at ``step``, PNG ``images`` (tag -> file; missing
    files are left out) and ``texts`` (tag -> markdown)."""
    with EventWriter(folder) as writer:
        writer.hparams(hparams)
        for split, values in metrics.items():
            for key, value in values.items():
                if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):  # not n, the count
                    writer.scalar(f"{split}/{key}", value, step)
        for tag, path in dict(images).items():
            if Path(path).is_file():
                writer.image(tag, Path(path).read_bytes(), step)
        for tag, text in dict(texts).items():
            writer.text(tag, text, step)
