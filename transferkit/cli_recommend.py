"""`transferkit recommend`: the decision table's answer, measured from the data, written as a recipe;
with ``--budget``, the plan that wins a search on the data (:mod:`transferkit.strategies.tune`).

:mod:`transferkit.cli` adds it to the `transferkit` group.
"""

from __future__ import annotations

import json

import click

from transferkit.cli_recipe import checked
from transferkit.logs import start_keras_quietly


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
@click.option("--data", type=str, help="Class-per-folder images, a labels CSV (path,label[,split]) or builtin:digits: "
              "counts the images, measures similarity and the best layer, and goes into the written recipe.")
@click.option("--backbone", default="mobilenet_v2", show_default=True, help="Backbone the settings refer to.")
@click.option("--alpha", type=float, help="The backbone's width multiplier (MobileNet families).")
@click.option("--backbones", "candidates", help="Rank these backbones on --data by LogME and by the probe, "
              "e.g. mobilenet_v2,mobilenet_v2:0.35,mobilenet:0.25 (name:alpha).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the accuracy-vs-depth PNG here "
              "(default with --write: beside the recipe).")
@click.option("--write", "write_to", type=click.Path(dir_okay=False), help="Write a runnable recipe here.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--budget", help="Search the plans on --data for this long (e.g. 20m) and write the one that wins "
              "on the validation split: the table's answer is the first trial.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key of the written (or searched) recipe, e.g. --set data.test=0.2 (repeatable); "
              "a test split is left out of the measurement too.")
@click.option("--resume", is_flag=True, help="With --budget: go on with an interrupted search.")
@click.option("--restart", is_flag=True, help="With --budget: start the search again (finished trials are reused).")
def recommend(size, similar, data, backbone, alpha, candidates, plot, write_to, as_json, budget, overrides,
              resume, restart):
    """Recommend a strategy from dataset size x similarity to ImageNet, measured from --data.

    \b
    Examples:
      transferkit recommend --size small --similar yes
      transferkit recommend --size 2000 --similar no --json
      transferkit recommend --data photos/ --write recipe.yaml      # measures size, similarity, layer
      transferkit recommend --data photos/ --backbones mobilenet_v2,mobilenet:0.25
      transferkit recommend --data photos/ --budget 20m --set data.test=0.2 --write recipe.yaml
    """
    from pathlib import Path

    from transferkit.recipe import load_recipe
    from transferkit.recommend import command_for, format_recommendation, images_to_measure, rank_backbones_on
    from transferkit.recommend import recipe_data_path, recommend as recommend_strategy, write_recipe

    from transferkit.recipe.reading import apply_overrides

    if budget is not None:
        return _recommend_by_search(size, similar, data, backbone, alpha, write_to, budget, overrides, resume, restart)
    if resume or restart:
        raise click.UsageError("--resume and --restart go with --budget")
    if data is not None and (similar is None or candidates):
        start_keras_quietly()
    rec = recommend_strategy(size=size, similar=similar, data=data, backbone=backbone, alpha=alpha,
                             measure_on=images_to_measure(data, overrides))
    recipe = apply_overrides(rec.recipe(data=recipe_data_path(data), name=Path(write_to).stem if write_to else
                                        "my-run"), overrides)
    ranking = rank_backbones_on(data, _backbones_option(candidates, data)) if candidates else None
    plot = plot or (str(Path(write_to).with_suffix(".depth.png")) if write_to and rec.measurement else None)
    if plot and rec.measurement:
        from transferkit.features.measure import Measurement, plot_depth
        plot_depth(Measurement(**rec.measurement), plot)
    if write_to:  # what it writes runs: checked like any recipe (but for the weights file, which may come later)
        checked(load_recipe(recipe, base_dir=Path(write_to).resolve().parent), weights=False)
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


def _recommend_by_search(size, similar, data, backbone, alpha, write_to, budget, overrides, resume, restart):
    """`recommend --budget`: :func:`transferkit.recommend_search.recommend_by_search`, printed and written."""
    from pathlib import Path

    from transferkit.recipe import parse_duration
    from transferkit.recommend import command_for, format_recommendation
    from transferkit.recommend_search import recommend_by_search, write_searched_recipe
    from transferkit.reports.tune import to_markdown

    seconds = parse_duration(budget, key="--budget")
    if data is None:
        raise click.UsageError("--budget searches plans on your images: give --data")
    if resume and restart:
        raise click.UsageError("give --resume or --restart, not both")
    start_keras_quietly()
    rec, tuning = recommend_by_search(data, seconds, size=size, similar=similar, backbone=backbone, alpha=alpha,
                                      name=Path(write_to).stem if write_to else None, overrides=overrides,
                                      resume=resume, restart=restart)
    click.echo(format_recommendation(rec))
    click.echo(to_markdown(tuning.summary, recipe_text=False), nl=False)
    if write_to:
        write_searched_recipe(write_to, tuning, rec)
        click.echo(f"wrote {write_to}; run it with: transferkit {command_for(tuning.best_recipe.strategy)} {write_to}")


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
