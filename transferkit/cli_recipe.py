"""The commands that take a recipe (validate, extract, finetune, compare) or write one (recommend).

Each checks its recipe as `transferkit validate` does before any slow work, and names the recipe
file at the start of an error about it. :mod:`transferkit.cli` adds them to the `transferkit` group.
"""

from __future__ import annotations

import contextlib
import json

import click

from transferkit.errors import TransferkitError
from transferkit.logs import start_keras_quietly


@click.command()
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
    from transferkit.strategies import check_data

    checked = _checked(load_recipe(recipe, overrides=overrides), recipe)
    with _naming(recipe):
        splits = check_data(checked)
    click.echo(checked.to_yaml(), nl=False)
    click.echo(f"data: {splits.describe()}", err=True)


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


@click.command()
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


@click.command()
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


@click.command()
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
    from transferkit.reports.compare import to_markdown
    from transferkit.strategies.compare import compare as run_compare
    from transferkit.recipe import load_recipe

    recipe = _checked(load_recipe(recipe, overrides=overrides), recipe)
    start_keras_quietly()
    summary = run_compare(recipe, modes=[m.strip() for m in modes.split(",") if m.strip()], seeds=seeds,
                          output=output)  # checks the recipe for every mode before the first run
    click.echo(to_markdown(summary), nl=False)


class SizeType(click.ParamType):
    """small, large, or a number of images per class."""
    name = "small|large|N"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value in ("small", "large"):
            return value
        if str(value).isdigit() and int(value) > 0:
            return int(value)
        self.fail(f"{value!r}: expected small, large or a number of images per class (e.g. 300)", param, ctx)


@click.command()
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
    from transferkit.recommend import command_for, format_recommendation, rank_backbones_on, recipe_data_path
    from transferkit.recommend import recommend as recommend_strategy, write_recipe

    if data is not None and (similar is None or candidates):
        start_keras_quietly()
    rec = recommend_strategy(size=size, similar=similar, data=data, backbone=backbone, alpha=alpha)
    recipe = rec.recipe(data=recipe_data_path(data), name=Path(write_to).stem if write_to else "my-run")
    ranking = rank_backbones_on(data, _backbones_option(candidates, data)) if candidates else None
    plot = plot or (str(Path(write_to).with_suffix(".depth.png")) if write_to and rec.measurement else None)
    if plot and rec.measurement:
        from transferkit.features.measure import Measurement, plot_depth
        plot_depth(Measurement(**rec.measurement), plot)
    if write_to:  # what it writes runs: checked like any recipe (but for the weights file, which may come later)
        _checked(load_recipe(recipe, base_dir=Path(write_to).resolve().parent), weights=False)
        write_recipe(write_to, recipe, rec, placeholder=data is None)
        if data is not None and rec.strategy == "extract":
            from transferkit.strategies.extract import cache_features
            cache_features(load_recipe(write_to), progress=not as_json)
    if as_json:
        click.echo(json.dumps({**rec.to_dict(), "recipe": recipe, "written_to": write_to, "plot": plot,
                               "backbone_ranking": ranking}, indent=2))
        return
    click.echo(format_recommendation(rec, ranking))
    if plot and rec.measurement:
        click.echo(f"wrote {plot}")
    if write_to:
        hint = " (fill in data.train first)" if data is None else ""
        cached = "; its features are cached" if data is not None and rec.strategy == "extract" else ""
        click.echo(f"wrote {write_to}{hint}{cached}; run it with: transferkit {command_for(rec.strategy)} {write_to}")


def _backbones_option(candidates: str, data) -> list[tuple[str, float | None]]:
    """``--backbones`` (``name`` or ``name:alpha``, comma-separated) as ``(name, alpha)`` pairs."""
    if data is None:
        raise click.UsageError("--backbones ranks backbones on your images: give --data too")
    parsed = []
    for item in filter(None, (c.strip() for c in candidates.split(","))):
        name, _, alpha = item.partition(":")
        try:
            parsed.append((name, float(alpha) if alpha else None))
        except ValueError:
            raise click.UsageError(f"--backbones: {item!r}: expected name or name:alpha, e.g. mobilenet:0.25") from None
    return parsed
