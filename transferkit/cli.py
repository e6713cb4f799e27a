"""The `transferkit` command: a thin skin over the Python API.

Exit codes: 0 success, 1 failure, 2 a usage or input error (one line on stderr, no traceback).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings

import click
import yaml

from transferkit.errors import TransferkitError
from transferkit.logs import start_keras_quietly

EXAMPLES = """\b
Examples:
  transferkit recommend --size small --similar yes
  transferkit recommend --data photos/ --similar no --write recipe.yaml
  transferkit validate recipes/digits.yaml
  transferkit extract recipes/digits.yaml
  transferkit finetune recipes/flowers5_finetune.yaml
  transferkit compare recipes/digits8_imag.yaml --seeds 3
  transferkit predict runs/digits image.png folder/
  transferkit evaluate runs/digits --data other_images/
  transferkit export runs/digits
  transferkit backbones
  transferkit cache --clear --older-than 30
"""


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="transferkit")
@click.option("-v", "--verbose", is_flag=True, help="Show debug logging.")
def cli(verbose):
    """Turn a folder of labelled images into the best classifier a pretrained ImageNet backbone can give."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


@cli.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def backbones(name, as_json):
    """List the backbones, or one backbone's details and cut points.

    \b
    Examples:
      transferkit backbones
      transferkit backbones mobilenet_v2
    """
    from transferkit.models.registry import get_backbone_info, list_backbones

    infos = [get_backbone_info(name)] if name else list_backbones()
    if as_json:
        click.echo(json.dumps([_backbone_dict(i) for i in infos], indent=2))
        return
    if name:
        info = infos[0]
        click.echo(f"{info.name}  (keras.applications.{info.constructor})  {info.description}")
        click.echo(f"  default size: {info.default_size}px (min {info.min_size})")
        if info.alphas:
            click.echo(f"  alpha: {', '.join(map(str, info.alphas))}")
        click.echo(f"  earlier cut for data unlike ImageNet: {info.mid_cut}")
        click.echo(f"  fine-tune from: {info.finetune_from}")
        click.echo(f"  cut points (shallow to deep, 'top' = the last, pooled): {', '.join(info.cut_points)}")
        return
    width = max(len(i.name) for i in infos)
    for info in infos:
        click.echo(f"{info.name:<{width}}  {info.default_size:>3}px  {info.description}")


def _backbone_dict(info) -> dict:
    from dataclasses import asdict
    return asdict(info)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set finetune.epochs=2 (repeatable).")
def validate(recipe, overrides):
    """Check a recipe as the run would, and print it with every default filled in.

    Checks everything known before the slow work: keys, types, finite numbers and bounds, the
    weights file, layer names against the backbone, import paths and their signatures, optimizer,
    schedule, classifier and augmentation settings; and the data folders, listed (classes, images
    per split, skipped links and special files) but not read: a file that cannot be decoded is
    found and skipped when the run starts. Nothing is trained.

    \b
    Example:
      transferkit validate recipes/digits.yaml --set data.batch_size=16
    """
    from transferkit.recipe import load_recipe
    from transferkit.recipe import recipe_splits

    checked = _checked(load_recipe(recipe, overrides=overrides), recipe)
    with _naming(recipe):
        splits = recipe_splits(checked, screen=False)
    click.echo(checked.to_yaml(), nl=False)
    counts = ", ".join(f"{name} {len(part)}" for name, part in
                       (("train", splits.train), ("val", splits.val), ("test", splits.test)) if part is not None)
    skipped = f"; {len(splits.skipped)} files skipped (listed above)" if splits.skipped else ""
    click.echo(f"data: {len(splits.class_names)} classes; images: {counts}{skipped}", err=True)


def _checked(recipe, source=None, weights: bool = True):
    """``recipe``, checked as `transferkit validate` checks it (the start of every command that runs one).

    Args:
        source: the recipe file, named at the start of an error as ``load_recipe`` names it.
        weights: also check that the backbone's weights file is there (or can be downloaded).
    """
    from transferkit.strategies import check_recipe, check_recipe_weights

    with _naming(source):
        if weights:
            check_recipe_weights(recipe)  # a missing weights file fails in a second, before TensorFlow starts
        if recipe.strategy != "extract":  # its checks build Keras objects; extract's need Keras only rarely
            start_keras_quietly()
        check_recipe(recipe, weights=False)
    return recipe


@contextlib.contextmanager
def _naming(source):
    """Errors about the recipe (not the environment) start with the recipe file ``source``."""
    from transferkit.errors import ResourceError

    try:
        yield
    except TransferkitError as error:
        if source is None or isinstance(error, ResourceError):
            raise
        raise type(error)(f"{source}: {error}") from None


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set extract.layer=block_12_add (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress output.")
def extract(recipe, overrides, quiet):
    """Cut the backbone, cache features in HDF5, fit a scikit-learn classifier, write the run folder.

    \b
    Examples:
      transferkit extract recipes/digits.yaml
      transferkit extract recipes/dtd10_extract.yaml --set extract.layer=block_12_add
    """
    from transferkit.recipe import load_recipe
    from transferkit.strategies.extract import extract as run_extract

    recipe = _checked(load_recipe(recipe, overrides=overrides), recipe)
    start_keras_quietly()
    run = run_extract(recipe, progress=not quiet)
    click.echo(f"run folder: {run.folder}")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set finetune.epochs=2 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished epoch.")
@click.option("--restart", is_flag=True, help="Discard an interrupted run's checkpoint and start over.")
@click.option("--quiet", is_flag=True, help="No per-batch progress bar (epoch summaries still print).")
def finetune(recipe, overrides, resume, restart, quiet):
    """Attach a new head, warm it up on the frozen body, unfreeze and fine-tune (strategy finetune or imag).

    Training happens in OUTPUT.partial/ beside the output folder: every epoch is checkpointed there
    and history.json, history.csv and curves.png are rewritten there; the finished run replaces the
    output folder in one step. After an interruption (even kill -9) run the same command with --resume.

    \b
    Examples:
      transferkit finetune recipes/flowers5_finetune.yaml
      transferkit finetune recipes/flowers5_finetune.yaml --resume
      transferkit finetune recipe.yaml --set finetune.epochs=2 --set data.image_size=128
    """
    from transferkit.recipe import load_recipe
    from transferkit.strategies.finetune import finetune as run_finetune

    if resume and restart:
        raise click.UsageError("give --resume or --restart, not both")
    source, recipe = recipe, load_recipe(recipe, overrides=overrides)
    if recipe.strategy == "extract":
        raise click.UsageError("the recipe's strategy is extract: run `transferkit extract RECIPE`, "
                               "or --set strategy=finetune")
    _checked(recipe, source)
    run = run_finetune(recipe, resume=resume, restart=restart, progress=not quiet)
    click.echo(f"run folder: {run.folder}")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--modes", default="normal,imag", show_default=True, help="Comma-separated modes to compare.")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(2), help="Seeds per mode.")
@click.option("--output", type=click.Path(file_okay=False), help="Default: the recipe's output/compare.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set imag.imag_epochs=2 (repeatable).")
def compare(recipe, modes, seeds, output, overrides):
    """Train each mode with several seeds on the same split and budget; compare the validation curves.

    Writes compare.json, compare.md (mean ± std per mode, the paired difference with a 95%
    confidence interval and a paired t-test) and curves.png. Rerun the same command after an
    interruption: finished runs are reused and an unfinished one resumes.

    \b
    Example:
      transferkit compare recipes/digits8_imag.yaml --modes normal,imag --seeds 3
    """
    from transferkit.reports.compare import compare as run_compare, to_markdown
    from transferkit.recipe import load_recipe

    recipe = _checked(load_recipe(recipe, overrides=overrides), recipe)
    start_keras_quietly()
    summary = run_compare(recipe, modes=[m.strip() for m in modes.split(",") if m.strip()], seeds=seeds,
                          output=output)  # checks the recipe for every mode before the first run
    click.echo(to_markdown(summary), nl=False)


_TRUST = click.option("--trust", "trusted", multiple=True, metavar="TYPE",
                      help="Open a classifier of this type (module.Class, as the error names it) though it is not "
                           "one of transferkit's own; only for a run folder whose source you trust (repeatable).")


@cli.command()
@click.argument("run_folder", type=click.Path(file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path())
@_TRUST
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1), help="Classes listed per image.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines for machines.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV for machines.")
def predict(run_folder, images, trusted, top_k, as_json, as_csv):
    """Classify images (files or folders, searched recursively) with a trained run.

    \b
    Examples:
      transferkit predict runs/digits photo1.png photo2.png
      transferkit predict runs/flowers new_photos/ --csv > predictions.csv
    """
    import csv

    from transferkit.run import Run

    start_keras_quietly()
    rows, _ = Run.load(run_folder, trusted=trusted).classify(images, top_k=top_k)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
    elif as_csv:
        writer = csv.writer(click.get_text_stream("stdout"))
        writer.writerow(["path", "class", "probability", "top"])
        for row in rows:
            writer.writerow([row["path"], row["class"], f"{row['probability']:.4f}",
                             ";".join(f"{name}:{p:.4f}" for name, p in row["top"])])
    else:
        for row in rows:
            others = ", ".join(f"{name} {p:.2f}" for name, p in row["top"][1:])
            click.echo(f"{row['path']}: {row['class']} ({row['probability']:.2f})" + (f"  [{others}]" if others else ""))


@cli.command()
@click.option("--clear", is_flag=True, help="Delete cached features and classifier fits.")
@click.option("--older-than", type=click.FloatRange(min=0), metavar="DAYS",
              help="With --clear: only those no run has used for DAYS days.")
def cache(clear, older_than):
    """Show (or clear) the features and classifier fits cached under $TRANSFERKIT_HOME.

    \b
    Examples:
      transferkit cache
      transferkit cache --clear --older-than 30
    """
    from transferkit.features.cache import KINDS, cache_entries, clear_cache
    from transferkit.io import transferkit_home

    if older_than is not None and not clear:
        raise click.UsageError("--older-than goes with --clear: transferkit cache --clear --older-than 30")
    if clear:
        removed = clear_cache(older_than)
        click.echo(f"removed {len(removed)} files ({_megabytes(sum(e.size for e in removed))}) from {transferkit_home()}")
        return
    entries = cache_entries()
    click.echo(f"{transferkit_home()}:")
    for kind in KINDS:
        mine = [entry for entry in entries if entry.kind == kind]
        oldest = f", least recently used {_days_ago(mine[0].last_used)}" if mine else ""
        click.echo(f"  {kind:12s} {len(mine):4d} files {_megabytes(sum(e.size for e in mine)):>10s}{oldest}")


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def _days_ago(timestamp: float) -> str:
    import time

    days = (time.time() - timestamp) / 86400
    return "today" if days < 1 else f"{days:.0f} days ago"


@cli.command()
@click.argument("run_folder", type=click.Path(file_okay=False))
@click.option("--data", type=click.Path(file_okay=False), help="A class-per-folder set with the run's classes. "
              "Default: the run's own test (else val) split.")
@_TRUST
def evaluate(run_folder, data, trusted):
    """Evaluate a trained run again, on its own held-out split or on other data.

    \b
    Examples:
      transferkit evaluate runs/flowers
      transferkit evaluate runs/flowers --data more_flowers/
    """
    from transferkit.reports.evaluate import format_metrics
    from transferkit.run import Run

    start_keras_quietly()
    run = Run.load(run_folder, trusted=trusted)
    click.echo(format_metrics(run.evaluate(data)))


@cli.command()
@click.argument("run_folder", type=click.Path(file_okay=False))
@click.option("--output", type=click.Path(), help="Where to write the model. Default: RUN_FOLDER/model/model.keras, "
              "RUN_FOLDER/export/saved_model or RUN_FOLDER/export/model.tflite.")
@click.option("--format", "format_", type=click.Choice(["keras", "saved_model", "tflite"]), default="keras",
              show_default=True, help="saved_model and tflite need the TensorFlow backend.")
@_TRUST
def export(run_folder, output, format_, trusted):
    """One model, raw images in, probabilities out (an extract run's linear classifier folded in).

    \b
    Examples:
      transferkit export runs/digits
      transferkit export runs/flowers-finetune --format tflite
    """
    from transferkit.export import export_model

    start_keras_quietly()
    from transferkit.run import Run

    click.echo(f"wrote {export_model(Run.load(run_folder, trusted=trusted), output, format=format_)}")


class SizeType(click.ParamType):
    """small, large, or a number of images per class."""
    name = "small|large|N"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value in ("small", "large"):
            return value
        if str(value).isdigit() and int(value) > 0:
            return int(value)
        self.fail(f"{value!r}: expected small, large or a number of images per class (e.g. 300)", param, ctx)


@cli.command()
@click.option("--size", type=SizeType(), help="small, large, or images per class (large from 1000). "
              "Default: counted in --data.")
@click.option("--similar", type=click.Choice(["yes", "no"]), help="Do the images look like ImageNet's photos? "
              "Default with --data: measured.")
@click.option("--data", type=str, help="Class-per-folder images (or builtin:digits): counts the images, "
              "measures similarity and the best layer, and goes into the written recipe.")
@click.option("--backbone", default="mobilenet_v2", show_default=True, help="Backbone the settings refer to.")
@click.option("--alpha", type=float, help="The backbone's width multiplier (MobileNet families).")
@click.option("--backbones", "candidates", help="Rank these backbones on --data by LogME and by the probe, "
              "e.g. mobilenet_v2,mobilenet_v2:0.35,mobilenet:0.25 (name:alpha).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the accuracy-vs-depth PNG here "
              "(default with --write: beside the recipe).")
@click.option("--write", "write_to", type=click.Path(dir_okay=False), help="Write a runnable recipe here.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def recommend(size, similar, data, backbone, alpha, candidates, plot, write_to, as_json):
    """Recommend a strategy from dataset size x similarity to ImageNet, measured from --data.

    \b
    Examples:
      transferkit recommend --size small --similar yes
      transferkit recommend --size 2000 --similar no --json
      transferkit recommend --data photos/ --write recipe.yaml      # measures size, similarity, layer
      transferkit recommend --data photos/ --backbones mobilenet_v2,mobilenet:0.25
    """
    from pathlib import Path

    from transferkit.recipe import load_recipe
    from transferkit.recommend import recommend as recommend_strategy

    if data is not None and (similar is None or candidates):
        start_keras_quietly()
    rec = recommend_strategy(size=size, similar=similar, data=data, backbone=backbone, alpha=alpha)
    recipe = rec.recipe(data=_absolute(data), name=Path(write_to).stem if write_to else "my-run")
    ranking = _rank(data, candidates) if candidates else None
    plot = plot or (str(Path(write_to).with_suffix(".depth.png")) if write_to and rec.measurement else None)
    if plot and rec.measurement:
        from transferkit.features.measure import Measurement, plot_depth
        plot_depth(Measurement(**rec.measurement), plot)
    if write_to:  # what it writes runs: checked like any recipe (but for the weights file, which may come later)
        _checked(load_recipe(recipe, base_dir=Path(write_to).resolve().parent), weights=False)
        _write_recipe(write_to, recipe, rec, placeholder=data is None)
        if data is not None and rec.strategy == "extract":
            from transferkit.strategies.extract import cache_features
            cache_features(load_recipe(write_to), progress=not as_json)
    if as_json:
        click.echo(json.dumps({**rec.to_dict(), "recipe": recipe, "written_to": write_to, "plot": plot,
                               "backbone_ranking": ranking}, indent=2))
        return
    click.echo(f"{rec.size} dataset, {'similar to' if rec.similar else 'different from'} ImageNet "
               f"-> {rec.strategy}: {rec.summary}")
    for key, value in rec.evidence.items():
        click.echo(f"  {key}: {value}")
    click.echo("why:")
    for line in rec.rationale:
        click.echo(f"  - {line}")
    click.echo("settings:")
    click.echo("  " + yaml.safe_dump(rec.settings, sort_keys=False).rstrip().replace("\n", "\n  "))
    if ranking:
        click.echo("backbones (by LogME; probe accuracy at each one's best layer):")
        for row in ranking:
            name = row["backbone"] + (f":{row['alpha']}" if row["alpha"] else "")
            click.echo(f"  {name}: skipped ({row['skipped']})" if "skipped" in row else
                       f"  {row['rank_logme']}. {name}: LogME {row['logme']:.3f}, probe {row['probe']:.3f} "
                       f"(rank {row['rank_probe']}) at {row['best_layer']}, {row['seconds']:.0f}s")
    if plot and rec.measurement:
        click.echo(f"wrote {plot}")
    if write_to:
        hint = " (fill in data.train first)" if data is None else ""
        cached = "; its features are cached" if data is not None and rec.strategy == "extract" else ""
        click.echo(f"wrote {write_to}{hint}{cached}; run it with: transferkit {_command_for(rec.strategy)} {write_to}")


def _rank(data, candidates: str) -> list[dict]:
    from transferkit.data.folders import scan_folder
    from transferkit.data.sources import resolve_source
    from transferkit.features.measure import rank_backbones

    if data is None:
        raise click.UsageError("--backbones ranks backbones on your images: give --data too")
    parsed = []
    for item in filter(None, (c.strip() for c in candidates.split(","))):
        name, _, alpha = item.partition(":")
        try:
            parsed.append((name, float(alpha) if alpha else None))
        except ValueError:
            raise click.UsageError(f"--backbones: {item!r}: expected name or name:alpha, e.g. mobilenet:0.25") from None
    return rank_backbones(scan_folder(resolve_source(data), screen=False), parsed)


def _absolute(data):
    from pathlib import Path
    return None if data is None or data.startswith("builtin:") else str(Path(data).resolve())


def _command_for(strategy: str) -> str:
    return "extract" if strategy == "extract" else "finetune"


def _write_recipe(path, recipe: dict, rec, placeholder: bool) -> None:
    from transferkit.io import atomic_write_text
    from transferkit.recommend import PLACEHOLDER_DATA

    header = [f"# transferkit recipe: {rec.summary}", *(f"# - {line}" for line in rec.rationale)]
    text = "\n".join(header) + "\n" + yaml.safe_dump(recipe, sort_keys=False)
    if placeholder:  # a YAML comment keeps the placeholder visible and the file loadable
        text = text.replace(f"train: {PLACEHOLDER_DATA}\n",
                            f"train: {PLACEHOLDER_DATA}  # FILL IN: one sub-folder per class\n")
    atomic_write_text(path, text)


def main(argv=None) -> None:
    """Entry point: run the CLI with one-line errors and exit codes 0 / 1 / 2.

    Input errors (`TransferkitError`) exit 2; problems of the machine (`ResourceError`, and a full
    disk or exhausted memory wherever it happens) exit 1; each prints one line. Any other exception
    is a bug and keeps its traceback.
    """
    from transferkit.errors import ResourceError

    try:
        cli.main(args=argv, prog_name="transferkit", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # usage errors: one line, with where to find help
        command = f" {e.ctx.command_path.split(' ', 1)[1]}" if getattr(e, "ctx", None) and " " in e.ctx.command_path else ""
        click.echo(f"error: {e.format_message()} (see: transferkit{command} --help)", err=True)
        sys.exit(e.exit_code)
    except TransferkitError as e:
        _fail(e)
    except OSError as e:
        if not _disk_full(e):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        _fail(ResourceError(f"no space left on the disk{where}: free some space there (or point the output, or "
                            "TRANSFERKIT_HOME for caches, to a disk with room) and run the command again"))
    except MemoryError:
        _fail(ResourceError("out of memory: lower data.batch_size or data.image_size, or set data.cache: false, "
                            "and run the command again"))
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


def _fail(error: TransferkitError) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(error.exit_code)


def _disk_full(error: OSError) -> bool:
    """Whether an OSError says the disk (or the user's quota) is full; some libraries give only the text."""
    import errno

    return error.errno in (errno.ENOSPC, errno.EDQUOT) or any(
        text in str(error) for text in ("No space left on device", "Disk quota exceeded"))
