"""Multi-host fine-tuning on one machine: the same run as 1 process and as N local processes (JAX).

Runs `transferkit finetune` on the same images and global batch, first as one process, then as
`--processes` processes joined through a localhost coordinator (JAX's CPU collectives), and prints
training images/s of each (the mean of epochs 2.., as the first compiles) and the speed-up. On one
machine the processes share its cores, so this measures the cost of the collectives more than a
gain: the gain comes from hosts that bring their own devices.

    KERAS_HOME=../shared/keras_home python benchmarks/multihost.py --images 256 --size 96
    KERAS_HOME=../shared/keras_home python benchmarks/multihost.py --processes 2 --backbone mobilenet
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from common import SHARED, pick_images, training_arguments


def train(recipe: Path, processes: int, env: dict) -> None:
    """`transferkit finetune recipe` as ``processes`` processes at once (one: no multi-host options)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    options = [[]] if processes == 1 else [["--coordinator", f"localhost:{port}", "--num-processes", str(processes),
                                             "--process-id", str(i)] for i in range(processes)]
    running = [subprocess.Popen([sys.executable, "-m", "transferkit", "finetune", str(recipe), "--quiet", *extra],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for extra in options]
    for process in running:
        _, err = process.communicate(timeout=3600)
        if process.returncode:
            sys.exit(f"training with {processes} processes failed:\n{err[-3000:]}")


def main():
    parser = training_arguments(__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="local processes of the multi-host run")
    args = parser.parse_args()
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    env.setdefault("KERAS_HOME", str(SHARED / "keras_home"))
    env.pop("XLA_FLAGS", None)

    chosen = pick_images(args.data, args.images + args.images // 8)
    rates = {}
    with tempfile.TemporaryDirectory() as home:
        env["TRANSFERKIT_HOME"] = home
        subset = chosen.copy_to(Path(home) / "images")  # copies: links out of a data folder are skipped
        for processes in (1, args.processes):
            recipe = Path(home) / f"recipe{processes}.yaml"
            recipe.write_text(yaml.safe_dump({
                "seed": 0, "strategy": "finetune", "output": str(Path(home) / f"run{processes}"), "calibrate": "none",
                "data": {"train": str(subset), "val": 1 / 9, "image_size": args.size, "batch_size": args.batch,
                         "cache": True},
                "backbone": {"name": args.backbone}, "head": {"dropout": 0.2}, "warmup": {"epochs": 0},
                "finetune": {"epochs": args.epochs, "unfreeze": "all", "schedule": {"name": "constant"},
                             "optimizer": {"name": "adam", "learning_rate": 1e-4}}}))
            train(recipe, processes, env)
            run = json.loads((Path(home) / f"run{processes}" / "run.json").read_text())
            seconds = json.loads((Path(home) / f"run{processes}" / "history.json").read_text())["seconds"][1:]
            rates[processes] = run["info"]["images"]["train"] / (sum(seconds) / len(seconds))
            rates[processes, "epochs"] = [round(s, 2) for s in seconds]

    print(f"{args.backbone} @ {args.size}px, global batch {args.batch}, {run['info']['images']['train']} training "
          f"images, whole body trained, JAX on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for processes in (1, args.processes):
        print(f"{processes} process{'es' if processes > 1 else '  '} {rates[processes]:8.1f} img/s  "
              f"(epochs 2-{args.epochs}: {rates[processes, 'epochs']} s)")
    print(f"speed-up of {args.processes} processes: {rates[args.processes] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
