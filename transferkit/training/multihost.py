"""Multi-host training: one process per host, joined by JAX's multi-controller runtime under Keras'
distribution API (``KERAS_BACKEND=jax`` only).

Every process runs the same command. :func:`initialize` joins them through process 0's address
before JAX starts (``keras.distribution.initialize``); fine-tuning then trains data-parallel over
the devices of all processes (:func:`transferkit.training.accelerator.distribution`), each process
reads its own share of every global batch (:func:`data_shard`), and process 0 alone writes the run
folder, checkpoints, logs and reports (:func:`is_main_process`); the others take part in every
step, evaluation included, and read the same checkpoint to resume.

Example (two hosts, the same recipe; the output folder on a filesystem both see):
    host-a$ transferkit finetune recipe.yaml --coordinator host-a:1234 --num-processes 2 --process-id 0
    host-b$ transferkit finetune recipe.yaml --coordinator host-a:1234 --num-processes 2 --process-id 1
"""

from __future__ import annotations

import logging
import os
import sys

from transferkit.errors import RecipeError, TransferkitError

log = logging.getLogger("transferkit")

#: What cluster launchers set for ``keras.distribution.initialize`` (read when the options are not given).
KERAS_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                   "KERAS_DISTRIBUTION_PROCESS_ID")
JAX_ONLY = ("multi-host training needs KERAS_BACKEND=jax; under TensorFlow use MultiWorkerMirroredStrategy "
            "with TF_CONFIG")


def requested(coordinator: str | None = None, num_processes: int | None = None,
              process_id: int | None = None) -> bool:
    """Whether this process is asked to join a multi-host run: by the arguments, by Keras' variables
    (:data:`KERAS_VARIABLES`) or by a Slurm job step of more than one task (``srun -n 2 ...``)."""
    return (any(value is not None for value in (coordinator, num_processes, process_id))
            or any(os.environ.get(name) for name in KERAS_VARIABLES)
            or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins a multi-host run when :func:`requested`, before any JAX computation of this process.

    Args:
        coordinator: ``HOST:PORT`` of process 0, the same for every process.
        num_processes: how many processes take part (one per host, or per group of devices).
        process_id: this process's number, 0 to ``num_processes - 1``; process 0 writes the run.
        What is not given comes from :data:`KERAS_VARIABLES`; with none of them, JAX reads a Slurm
        job step's variables.

    Returns:
        Whether it joined one (False: nothing asked for it, or a single process).

    Raises:
        TransferkitError: another Keras backend than JAX, arguments that do not fit together, or
            JAX already started in this process.
    """
    if not requested(coordinator, num_processes, process_id) or num_processes == 1:
        return False
    _check_arguments(coordinator, num_processes, process_id)
    import keras

    if keras.backend.backend() != "jax":
        raise TransferkitError(JAX_ONLY)
    import jax

    if jax.distributed.is_initialized():  # joined already
        return True
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:  # CPU processes talk over gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        keras.distribution.initialize(coordinator, num_processes, process_id)
    except RuntimeError as error:
        if "before" not in str(error):
            raise
        raise TransferkitError("multi-host training must start before any Keras or JAX work in the process: "
                               "call transferkit.training.multihost.initialize first") from None
    except ValueError as error:  # nothing (or too little) said where process 0 is
        raise TransferkitError(f"multi-host training cannot start: {error} Give --coordinator, --num-processes "
                               "and --process-id") from None
    if jax.process_index() == 0:
        log.info("multi-host run: %d processes, %d devices", jax.process_count(), jax.device_count())
    else:  # process 0 alone logs the run
        log.warning("process %d of %d: training in step with process 0, which writes the run and its log",
                    jax.process_index(), jax.process_count())
        log.setLevel(logging.WARNING)
    return True


def _check_arguments(coordinator, num_processes, process_id) -> None:
    """One line naming the option to fix where the given arguments cannot make a run."""
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    missing = [option for (option, value), variable in zip(given.items(), KERAS_VARIABLES)
               if value is None and not os.environ.get(variable)]
    if missing and len(missing) < len(given):
        raise TransferkitError(f"multi-host training needs {', '.join(missing)} too (or the "
                               f"{', '.join(KERAS_VARIABLES)} variables)")
    if coordinator is not None and (":" not in coordinator or not coordinator.rpartition(":")[2].isdigit()):
        raise TransferkitError(f"--coordinator {coordinator}: expected HOST:PORT of process 0, e.g. node0:1234")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise TransferkitError(f"--process-id {process_id}: expected 0 to {num_processes - 1} "
                               f"for --num-processes {num_processes}")


def process_count() -> int:
    """The processes of the multi-host run this process joined (1 when it joined none)."""
    jax = sys.modules.get("jax")
    return jax.process_count() if jax is not None and jax.distributed.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this process writes the run: the only one, or process 0 of a multi-host run."""
    jax = sys.modules.get("jax")
    return process_count() == 1 or jax.process_index() == 0


def data_shard():
    """This process's :class:`~transferkit.data.shards.Shard` of every global batch, or None when it is
    the only process."""
    if process_count() == 1:
        return None
    import jax

    from transferkit.data.shards import Shard

    return Shard(index=jax.process_index(), count=jax.process_count(), devices=jax.device_count())


def same_on_every_process(value: int, what: str) -> None:
    """Raises TransferkitError unless ``value`` is process 0's (every process calls it at the same
    point: a collective step)."""
    if process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    first = int(multihost_utils.broadcast_one_to_all(np.int64(value)))
    if first != value:
        raise TransferkitError(f"{what}: {value} here, {first} on process 0: every process must see the same "
                               "output folder (a filesystem shared by the hosts) and the same recipe and data")


def start_in_step(epoch: int, batch_size: int, **images: int):
    """This process's :class:`~transferkit.data.shards.Shard` of the batches (None when it is the only
    process), once every process resumes after the same ``epoch`` and the global ``batch_size`` splits
    evenly over the devices; logs how many of the ``images`` (split=count) an epoch leaves out.

    Raises:
        RecipeError: (key ``batch_size``) a batch size that is not a multiple of the devices.
        TransferkitError: a process that resumes after another epoch than process 0.
    """
    if process_count() == 1:
        return None
    same_on_every_process(epoch, "the epoch to resume after")
    shard = data_shard()
    if batch_size % shard.devices:
        raise RecipeError(f"{batch_size} does not split over the {shard.devices} devices of {shard.count} processes: "
                          f"give a multiple of {shard.devices}", key="batch_size")
    left_out = {split: (count - shard.used(count, batch_size), count) for split, count in images.items()}
    if any(out for out, _ in left_out.values()):
        log.info("an epoch leaves out %s images, so that every device gets as many (the final reports use all)",
                 " and ".join(f"{out} of the {count} {split}" for split, (out, count) in left_out.items()))
    return shard
