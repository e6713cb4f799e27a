"""The `transferkit` command: a thin skin over the Python API.

This module holds the command group, :func:`main` and the commands that need no recipe (backbones,
predict, cache, evaluate, export); the commands that take or write a recipe are in
:mod:`transferkit.cli_recipe`.

Exit codes: 0 success, 1 failure, 2 a usage or input error (one line on stderr, no traceback).
"""

from __future__ import annotations

import json
import logging
import sys
import warnings

import click

from transferkit.cli_recipe import compare, extract, finetune, lr_find, tune, validate
from transferkit.cli_recommend import recommend
from transferkit.errors import TransferkitError
from transferkit.logs import start_keras_quietly

EXAMPLES = """\b
Examples:
  transferkit recommend --size small --similar yes
  transferkit recommend --data photos/ --similar no --write recipe.yaml
  transferkit validate recipes/digits.yaml
  transferkit extract recipes/digits.yaml
  transferkit finetune recipes/flowers5_finetune.yaml
  transferkit lr-find recipes/flowers5_finetune.yaml --write flowers5_lr.yaml
  transferkit compare recipes/digits8_imag.yaml --seeds 3
  transferkit tune recipes/flowers5_finetune.yaml --budget 30m
  transferkit recommend --data photos/ --budget 20m --write recipe.yaml
  transferkit predict runs/digits image.png folder/
  transferkit evaluate runs/digits --data other_images/
  transferkit report runs/digits
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


# from cli_recipe.py and cli_recommend.py
for _command in (validate, extract, finetune, lr_find, compare, tune, recommend):
    cli.add_command(_command)


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
@click.option("--min-confidence", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Call an image 'uncertain' when its top probability is below this, instead of guessing.")
def predict(run_folder, images, trusted, top_k, as_json, as_csv, min_confidence):
    """Classify images (files or folders, searched recursively) with a trained run.

    \b
    Examples:
      transferkit predict runs/digits photo1.png photo2.png
      transferkit predict runs/flowers new_photos/ --csv > predictions.csv
      transferkit predict runs/flowers new_photos/ --min-confidence 0.8
    """
    import csv

    from transferkit.run import Run

    start_keras_quietly()
    rows, _ = Run.load(run_folder, trusted=trusted).classify(images, top_k=top_k, min_confidence=min_confidence)
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
    from transferkit.features.cache import cache_entries, clear_cache, format_cache, megabytes
    from transferkit.io import transferkit_home

    if older_than is not None and not clear:
        raise click.UsageError("--older-than goes with --clear: transferkit cache --clear --older-than 30")
    if clear:
        removed = clear_cache(older_than)
        click.echo(f"removed {len(removed)} files ({megabytes(sum(e.size for e in removed))}) from {transferkit_home()}")
        return
    click.echo(format_cache(cache_entries()))


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
def report(run_folder):
    """Write RUN_FOLDER/report.html: metrics, curves, confusion matrices, reliability diagrams, worst mistakes,
    recipe and versions on one page that opens offline and runs no code.

    \b
    Examples:
      transferkit report runs/flowers
    """
    from transferkit.reports.html import write_html_report

    click.echo(f"wrote {write_html_report(run_folder)}")


@cli.command()
@click.argument("run_folder", type=click.Path(file_okay=False))
@click.option("--output", type=click.Path(), help="Where to write the model. Default: RUN_FOLDER/model/model.keras, "
              "RUN_FOLDER/export/saved_model, RUN_FOLDER/export/model.tflite or RUN_FOLDER/export/model.onnx.")
@click.option("--format", "format_", type=click.Choice(["keras", "saved_model", "tflite", "onnx"]), default="keras",
              show_default=True, help="saved_model and tflite need the TensorFlow backend; onnx needs "
              "pip install 'transferkit[onnx]'.")
@_TRUST
def export(run_folder, output, format_, trusted):
    """One model, raw images in, probabilities out (an extract run's linear classifier folded in).

    \b
    Examples:
      transferkit export runs/digits
      transferkit export runs/flowers-finetune --format tflite
      transferkit export runs/flowers-finetune --format onnx
    """
    from transferkit.export import check_onnx_converter, export_model

    start_keras_quietly()
    if format_ == "onnx":
        check_onnx_converter()  # before the run's model is loaded
    from transferkit.run import Run

    click.echo(f"wrote {export_model(Run.load(run_folder, trusted=trusted), output, format=format_)}")


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
