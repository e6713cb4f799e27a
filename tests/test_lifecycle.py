"""A run's life: its folder appears all at once or not at all, one run at a time uses it, a full
disk is one line, a resumed run equals an uninterrupted one, and scripts see progress."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from transferkit.errors import ResourceError, TransferkitError
from transferkit.outputs import OutputFolder

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    """Every file below ``folder`` (relative path -> sha256), or None when there is no folder."""
    if not folder.exists():
        return None
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def write_run(folder: Path, marker: str) -> None:
    (folder / "model").mkdir(parents=True, exist_ok=True)
    for name in ("run.json", "val_metrics.json", "model/model.keras"):
        (folder / name).write_text(f"{marker} {name}")


# --------------------------------------------------------------------------------------------
# The output folder: all or nothing, one run at a time
# --------------------------------------------------------------------------------------------

def test_commit_puts_the_new_run_in_place_and_keeps_what_a_run_does_not_write(tmp_path):
    output = tmp_path / "run"
    with OutputFolder(output) as out:
        write_run(out.partial, "old")
        out.commit()
    (output / "notes.txt").write_text("mine")
    (output / "compare" / "runs").mkdir(parents=True)
    (output / "compare" / "compare.md").write_text("a comparison")
    (output / "test_metrics.json").write_text("old test split")  # the new run has no test split
    with OutputFolder(output) as out:
        assert snapshot(output)["run.json"] == hashlib.sha256(b"old run.json").hexdigest()  # untouched meanwhile
        write_run(out.partial, "new")
        (out.partial / "checkpoint").mkdir()
        out.commit(drop=("checkpoint",))
    assert (output / "run.json").read_text() == "new run.json"
    assert (output / "notes.txt").read_text() == "mine" and (output / "compare" / "compare.md").is_file()
    assert not (output / "test_metrics.json").exists() and not (output / "checkpoint").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "run"]


def test_a_failed_run_leaves_the_previous_folder_as_it_was(tmp_path):
    output = tmp_path / "run"
    with OutputFolder(output) as out:
        write_run(out.partial, "old")
        out.commit()
    before = snapshot(output)
    with pytest.raises(RuntimeError, match="boom"):
        with OutputFolder(output) as out:
            write_run(out.partial, "new")
            raise RuntimeError("boom")
    assert snapshot(output) == before and not out.partial.exists()


def test_a_resumable_sibling_is_kept_until_restart(tmp_path):
    output = tmp_path / "run"
    resumable = lambda partial: (partial / "state.json").is_file()  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        with OutputFolder(output, resumable=resumable) as out:
            (out.partial / "state.json").write_text("{}")
            raise KeyboardInterrupt
    with OutputFolder(output, resumable=resumable) as out:
        assert (out.partial / "state.json").is_file()  # found again, for --resume
    with OutputFolder(output, resumable=resumable, restart=True) as out:
        assert not (out.partial / "state.json").exists()


def test_a_second_run_into_the_same_folder_fails_at_once(tmp_path):
    with OutputFolder(tmp_path / "run"):
        with pytest.raises(ResourceError, match=rf"^{tmp_path / 'run'} is in use by another transferkit run "
                                                rf"\(process {os.getpid()}\): wait for it"):
            OutputFolder(tmp_path / "run").__enter__()
    with OutputFolder(tmp_path / "run"):  # released with the first
        pass


def test_a_folder_that_is_not_a_run_folder_is_never_replaced(tmp_path):
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    with pytest.raises(TransferkitError, match="is not a transferkit run folder"):
        OutputFolder(tmp_path / "photos").__enter__()
    assert (tmp_path / "photos" / "cat").is_dir()


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from transferkit import outputs

    output, exchange, kill_at = Path(sys.argv[1]), sys.argv[2] == "exchange", int(sys.argv[3])
    calls = 0
    def counted(function):
        def call(*args, **kwargs):
            global calls
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return call
    if not exchange:
        outputs._exchange = lambda first, second: False
    outputs._exchange = counted(outputs._exchange)
    outputs.os.rename = counted(os.rename)
    outputs.shutil.rmtree = counted(outputs.shutil.rmtree)
    with outputs.OutputFolder(output) as out:
        (out.partial / "model").mkdir()
        for name in ("run.json", "val_metrics.json", "model/model.keras"):
            (out.partial / name).write_text("new " + name)
        out.commit()
    print(calls)
""")


@pytest.mark.parametrize("exchange", ["exchange", "rename"])
def test_kill_9_at_every_step_of_the_swap_leaves_one_complete_folder(tmp_path, exchange):
    script = tmp_path / "swap.py"
    script.write_text(KILL_SCRIPT)
    output = tmp_path / "run"

    def run(kill_at):
        return subprocess.run([sys.executable, str(script), str(output), exchange, str(kill_at)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    def fresh_old():
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        for leftover in tmp_path.glob("*run.*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        write_run(output, "old")
        return snapshot(output)

    old = fresh_old()
    steps = int(run(0).stdout)  # how many renames and deletions an uninterrupted swap makes
    new = snapshot(output)
    assert new != old and new["run.json"] == hashlib.sha256(b"new run.json").hexdigest()
    for kill_at in range(1, steps + 1):
        fresh_old()
        assert run(kill_at).returncode == -signal.SIGKILL
        with OutputFolder(output):  # the next run finds the folder whole: the old one or the new one
            assert snapshot(output) in (old, new), f"killed at step {kill_at} of {steps}"
        assert not (tmp_path / ".run.old").exists()


# --------------------------------------------------------------------------------------------
# Full disks
# --------------------------------------------------------------------------------------------

def test_disk_full_errors_become_one_line(tmp_path):
    from transferkit.io import disk_full, disk_full_is_one_line, require_space

    with pytest.raises(ResourceError, match=rf"the disk is full writing to {tmp_path / 'x.npz'} \(.* free\): "
                                            "free some space, then again$"):
        with disk_full_is_one_line(tmp_path, then=", then again"):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.npz"))
    with pytest.raises(ValueError):  # anything else passes unchanged
        with disk_full_is_one_line(tmp_path):
            raise ValueError("not a disk problem")
    wrapped = RuntimeError("Can't write data")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert disk_full(wrapped) and not disk_full(OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(ResourceError, match=rf"not enough space for the big file in {tmp_path}: it needs .* free"):
        require_space(tmp_path, 10**18, "the big file")


def test_a_feature_store_that_does_not_fit_fails_before_writing(tmp_path, monkeypatch):
    import transferkit.io as tkio
    from transferkit.features.store import FeatureStore

    store = FeatureStore(tmp_path / "store.h5")
    embed = lambda paths: np.ones((len(paths), 64), np.float32)  # noqa: E731
    paths = [str(tmp_path / f"{i}.png") for i in range(10)]
    for path in paths:
        Path(path).write_bytes(b"")
    free = shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(tkio.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(free, free, tkio.SPACE_MARGIN))
    with pytest.raises(ResourceError, match=r"not enough space for the features of 10 images \(train\) in .*: it needs "
                                            ".*TRANSFERKIT_HOME"):
        store.compute("train", paths, [0] * 10, embed, key="k", progress=False, dim=64)
    assert store.load("train") is None


# --------------------------------------------------------------------------------------------
# Progress for Python users
# --------------------------------------------------------------------------------------------

def test_scripts_see_progress_lines_unless_they_configured_logging():
    script = textwrap.dedent("""
        import logging, sys
        from transferkit.logs import log_to_stderr_unless_configured
        if sys.argv[1] == "configured":
            logging.basicConfig(level=logging.WARNING)
        log_to_stderr_unless_configured()
        log_to_stderr_unless_configured()  # twice: still one line per message
        logging.getLogger("transferkit").info("epoch 1/3 [warmup]")
    """)
    plain = subprocess.run([sys.executable, "-c", script, "plain"], capture_output=True, text=True, cwd=ROOT)
    assert plain.stderr == "epoch 1/3 [warmup]\n"
    configured = subprocess.run([sys.executable, "-c", script, "configured"], capture_output=True, text=True, cwd=ROOT)
    assert configured.stderr == ""  # the application's WARNING level rules


# --------------------------------------------------------------------------------------------
# Real runs (small: 16 images at 32 px, MobileNet alpha 0.25)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(small_cats_dogs, tmp_path_factory):
    """8 cats and 8 dogs."""
    root = tmp_path_factory.mktemp("tiny")
    for cls in ("cat", "dog"):
        (root / cls).mkdir()
        for path in sorted((small_cats_dogs / cls).iterdir())[:8]:
            shutil.copy(path, root / cls / path.name)
    return root


def tiny_recipe(data, output, strategy="finetune", **finetune_keys):
    from transferkit.recipe import load_recipe

    return load_recipe({
        "name": "tiny", "seed": 3, "strategy": strategy, "output": str(output),
        "data": {"train": str(data), "val": 0.25, "image_size": 32, "batch_size": 4,
                 "augment": ["random_flip", {"random_rotation": 0.2}]},
        "backbone": {"name": "mobilenet", "alpha": 0.25},
        "head": {"dropout": 0.3},
        "warmup": {"epochs": 1, "optimizer": {"name": "adam", "learning_rate": 1e-3}},
        "finetune": {"epochs": 3, "mixup": 0.4, "unfreeze": {"top_blocks": 1},
                     "optimizer": {"name": "adam", "learning_rate": 1e-3}, **finetune_keys},
        "extract": {"classifier": {"name": "logistic_regression"}}})


def interrupt_after_epoch(monkeypatch, epoch, error=KeyboardInterrupt):
    """Stop a run right after epoch ``epoch`` is checkpointed, as a kill or Ctrl-C would."""
    from transferkit.training.checkpoints import Checkpoints

    save = Checkpoints.save

    def saving(self, model, optimizer, saved, *args, **kwargs):
        save(self, model, optimizer, saved, *args, **kwargs)
        if saved == epoch:
            raise error
    monkeypatch.setattr(Checkpoints, "save", saving)


@pytest.mark.slow
@pytest.mark.backends
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tiny, home, tmp_path, monkeypatch):
    from transferkit.strategies.finetune import finetune, unfinished_run

    # augmentation in the input pipeline, MixUp, dropout in the head, Adam and a cosine schedule
    whole = finetune(tiny_recipe(tiny, tmp_path / "whole"), progress=False)
    with monkeypatch.context() as patch:
        interrupt_after_epoch(patch, 2)  # inside the fine-tuning phase, after the warm-up epoch
        with pytest.raises(KeyboardInterrupt):
            finetune(tiny_recipe(tiny, tmp_path / "resumed"), progress=False)
    assert unfinished_run(tmp_path / "resumed")["epoch"] == 2 and not (tmp_path / "resumed").exists()
    resumed = finetune(tiny_recipe(tiny, tmp_path / "resumed"), resume=True, progress=False)
    assert resumed.history["phase"] == ["warmup"] + ["finetune"] * 3
    for a, b in zip(whole.model.get_weights(), resumed.model.get_weights()):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    for key in whole.history:
        if key != "seconds":
            assert whole.history[key] == resumed.history[key], key
    assert whole.metrics == resumed.metrics


@pytest.mark.slow
def test_a_full_disk_at_each_write_keeps_every_earlier_checkpoint(tiny, home, tmp_path, monkeypatch):
    import keras

    import transferkit.io as tkio
    import transferkit.strategies.finetune as engine
    import transferkit.training.checkpoints as checkpoints

    enospc = OSError(errno.ENOSPC, "No space left on device")
    sites = {  # what fails, when epoch 2 of 2 is written
        "space check": lambda patch: patch.setattr(tkio.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(
            2**30, 2**30 - 2**20, 2**20)),
        "checkpoint arrays": lambda patch: patch.setattr(checkpoints.np, "savez", lambda *a, **k: (_ for _ in ()).throw(enospc)),
        "state.json": lambda patch: patch.setattr(checkpoints, "atomic_write_json",
                                                  lambda *a, **k: (_ for _ in ()).throw(enospc)),
        "run folder": lambda patch: patch.setattr(keras.Model, "save", lambda *a, **k: (_ for _ in ()).throw(enospc)),
    }
    output = tmp_path / "run"
    write_run(output, "previous")
    previous = snapshot(output)
    recipe = tiny_recipe(tiny, output, epochs=0)
    recipe.warmup.epochs = 2
    for site, inject in sites.items():
        with monkeypatch.context() as patch:
            after_first = checkpoints.Checkpoints.save

            def save(self, model, optimizer, epoch, *args, **kwargs):
                if epoch == 2:
                    inject(patch)
                after_first(self, model, optimizer, epoch, *args, **kwargs)
            patch.setattr(checkpoints.Checkpoints, "save", save)
            with pytest.raises(ResourceError) as failure:
                engine.finetune(recipe, progress=False, resume=True)
        message = str(failure.value)
        assert "\n" not in message and f"{output}.partial" in message and "--resume" in message, (site, message)
        state = engine.unfinished_run(output)
        assert state["epoch"] == (2 if site == "run folder" else 1), site  # the last complete epoch
        checkpoint = Path(f"{output}.partial") / "checkpoint"
        assert sorted(p.name for p in checkpoint.iterdir()) == sorted(
            [f"epoch-{state['epoch']}.weights.npz", f"epoch-{state['epoch']}.optimizer.npz", "state.json"]), site
        assert snapshot(output) == previous, site
        if site != "run folder":
            checkpoints.Checkpoints.of(Path(f"{output}.partial")).clear()  # the next site starts from epoch 1 again
    run = engine.finetune(recipe, progress=False, resume=True)
    assert run.history["phase"] == ["warmup", "warmup"] and (output / "run.json").is_file()


EXTRACT_KILLED = textwrap.dedent("""
    import os, signal, sys
    import transferkit.features.classifiers, transferkit.reports.evaluate, transferkit.outputs, transferkit.run
    from transferkit.recipe import load_recipe
    from transferkit.strategies import extract, finetune
    from transferkit.training import checkpoints

    def kill(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def later(module, name, after=1):  # kill on a later call, when earlier ones have written
        original, calls = getattr(module, name), []
        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) > after:
                kill()
            return original(*args, **kwargs)
        setattr(module, name, call)

    recipe, moment = load_recipe(sys.argv[1]), sys.argv[2]
    if moment == "extracting":
        extract._Embedder.forward = kill
    elif moment == "classifier fit":
        transferkit.features.classifiers.fit_cached = kill
    elif moment == "reports":
        later(transferkit.reports.evaluate, "_write_csv")
    elif moment == "run.json":
        transferkit.run.atomic_write_json = kill
    elif moment == "moving into place":
        transferkit.outputs._exchange = kill  # the output folder exists: the swap starts with the exchange
    elif moment == "fine-tuning":
        later(checkpoints.Checkpoints, "save")
    if recipe.strategy == "extract":
        extract.extract(recipe, progress=False)
    else:
        finetune.finetune(recipe, progress=False)
""")


@pytest.mark.slow
def test_kill_9_at_any_point_leaves_the_previous_run_folder(tiny, home, tmp_path):
    from test_cli import transferkit

    from transferkit.strategies.extract import extract

    output = tmp_path / "run"
    extract(tiny_recipe(tiny, output, strategy="extract"), progress=False)
    previous = snapshot(output)
    script = tmp_path / "killed.py"
    script.write_text(EXTRACT_KILLED)
    for moment in ("extracting", "classifier fit", "reports", "run.json", "moving into place", "fine-tuning"):
        recipe = tiny_recipe(tiny, output, strategy="finetune" if moment == "fine-tuning" else "extract")
        recipe.seed = 4  # another split: another run
        (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
        killed = subprocess.run([sys.executable, str(script), str(tmp_path / "recipe.yaml"), moment], cwd=ROOT,
                                capture_output=True, text=True, timeout=300,  # a fresh cache: nothing reused
                                env={**os.environ, "TRANSFERKIT_HOME": str(tmp_path / moment)})
        assert killed.returncode == -signal.SIGKILL, (moment, killed.stderr[-2000:])
        assert snapshot(output) == previous, moment
    # the killed fine-tuning run left its checkpoint: a plain run says so, --resume finishes it
    result = transferkit("finetune", tmp_path / "recipe.yaml", "--quiet")
    assert result.returncode == 2 and "unfinished run" in result.stderr and snapshot(output) == previous
    result = transferkit("finetune", tmp_path / "recipe.yaml", "--resume", "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads((output / "run.json").read_text())["strategy"] == "finetune"
    assert not Path(f"{output}.partial").exists()


@pytest.mark.slow
def test_a_second_command_into_a_folder_in_use_fails_at_once(tiny, home, tmp_path):
    from test_cli import transferkit

    (tmp_path / "recipe.yaml").write_text(tiny_recipe(tiny, tmp_path / "run").to_yaml())
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from transferkit.outputs import OutputFolder\n"
                               "with OutputFolder(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)",
                               str(tmp_path / "run")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        result = transferkit("finetune", tmp_path / "recipe.yaml")
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'run'} is in use by another transferkit run (process {holder.pid}): wait for it to "
        "finish, or choose another output"]


FULL_DISK = """
set -u
mount -t tmpfs -o size=2400k tmpfs "$MOUNT" || exit 77
"$PYTHON" -m transferkit finetune "$RECIPE" --quiet 2> "$OUT/first.err"; echo $? > "$OUT/first.rc"
cp "$MOUNT/run.partial/checkpoint/state.json" "$OUT/state.json"; ls "$MOUNT/run.partial/checkpoint" > "$OUT/files"
mount -o remount,size=50m "$MOUNT"
"$PYTHON" -m transferkit finetune "$RECIPE" --resume --quiet 2> "$OUT/second.err"; echo $? > "$OUT/second.rc"
ls "$MOUNT/run" > "$OUT/run"
mkdir "$OUT/home" && mount -t tmpfs -o size=512k tmpfs "$OUT/home" || exit 77
TRANSFERKIT_HOME="$OUT/home" "$PYTHON" -m transferkit extract "$RECIPE" --set strategy=extract 2> "$OUT/third.err"
echo $? > "$OUT/third.rc"
"""


@pytest.mark.slow
def test_a_really_full_disk_is_one_line_and_resumable(tiny, tmp_path):
    """On a small tmpfs (needs `unshare -rm` and mount; skipped where refused): the epoch 2
    checkpoint does not fit, epoch 1 stays; with room again --resume finishes; a feature store
    that does not fit fails before writing. Exit 1, one line each, no traceback, no segfault."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    recipe = tiny_recipe(tiny, tmp_path / "mount" / "run", epochs=0)
    recipe.warmup.epochs = 3
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    (tmp_path / "mount").mkdir()
    (tmp_path / "out").mkdir()
    env = {**os.environ, "MOUNT": str(tmp_path / "mount"), "OUT": str(tmp_path / "out"),
           "RECIPE": str(tmp_path / "recipe.yaml"), "PYTHON": sys.executable}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", FULL_DISK], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if done.returncode == 77 or "unshare:" in done.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    out = tmp_path / "out"
    first = error_line(out / "first.err")
    assert (out / "first.rc").read_text().strip() == "1"
    assert first.startswith("error: not enough space for the epoch 2 checkpoint in") and "--resume" in first
    assert json.loads((out / "state.json").read_text())["epoch"] == 1
    assert (out / "files").read_text().split() == ["epoch-1.optimizer.npz", "epoch-1.weights.npz", "state.json"]
    assert (out / "second.rc").read_text().strip() == "0", (out / "second.err").read_text()
    assert "resuming after epoch 1 of 3" in (out / "second.err").read_text()
    assert {"run.json", "model", "val_metrics.json"} <= set((out / "run").read_text().split())
    assert (out / "third.rc").read_text().strip() == "1"
    assert "not enough space for the feature store" in error_line(out / "third.err")


def error_line(stderr: Path) -> str:
    """The one error line a failed command ends with, after its progress lines; no traceback."""
    text = stderr.read_text()
    lines = text.strip().splitlines()
    assert "Traceback" not in text and [line for line in lines if line.startswith("error:")] == lines[-1:], text
    return lines[-1]


@pytest.mark.slow
def test_a_script_sees_what_the_command_shows(tiny, tmp_path):
    recipe = tiny_recipe(tiny, tmp_path / "run", strategy="extract")
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    script = "import sys, transferkit as tk\ntk.extract(tk.load_recipe(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "recipe.yaml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TRANSFERKIT_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "extracting " in done.stderr and "\r" not in done.stderr  # not a terminal: whole lines
    assert any(line.startswith("val: top-1") for line in lines) and any(line.startswith("run saved to") for line in lines)
