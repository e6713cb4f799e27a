"""The commands that take a recipe: validate, extract, finetune, lr-find, compare, tune.

Each checks its recipe as `transferkit validate` does before any slow work, and names the recipe
file at the start of an error about it. :mod:`transferkit.cli` adds them to the `transferkit` group.
"""

from __future__ import annotations

import contextlib

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

    from transferkit.recipe import TuneSpec

    loaded = checked(load_recipe(recipe, overrides=overrides), recipe)
    with _naming(recipe):
        splits = check_data(loaded)
        if loaded.tune != TuneSpec():  # a search is configured: every value it may try, checked too
            from transferkit.strategies.space import check_tune

            start_keras_quietly()
            check_tune(loaded)
    click.echo(loaded.to_yaml(), nl=False)
    click.echo(f"data: {splits.describe()}", err=True)


def checked(recipe, source=None, weights: bool = True):
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
@click.option("--shard", metavar="I/N", callback=lambda ctx, param, value: _shard(value),
              help="Only extract shard I of N (1 <= I <= N) of the features into its own file, and stop; "
                   "shards run at once in separate processes, then a run without --shard fits the classifier.")
def extract(recipe, overrides, quiet, shard):
    """Cut the backbone, cache features in HDF5, fit a scikit-learn classifier, write the run folder.

    With --shard I/N, compute only shard I of N of the features (N processes, e.g. a job array, at
    the same time); the run without --shard then reads the N shard files as one and fits.

    \b
    Examples:
      transferkit extract recipes/digits.yaml
      transferkit extract recipes/dtd10_extract.yaml --set extract.layer=block_12_add
      transferkit extract recipe.yaml --shard $SLURM_ARRAY_TASK_ID/8   # then: transferkit extract recipe.yaml
    """
    from transferkit.features.shards import ShardsMissing
    from transferkit.recipe import load_recipe
    from transferkit.strategies.extract import extract as run_extract

    source, recipe = recipe, checked(load_recipe(recipe, overrides=overrides), recipe)
    start_keras_quietly()
    try:
        run = run_extract(recipe, progress=not quiet, shard=shard)
    except ShardsMissing as error:
        raise error.for_recipe(source) from None
    if run is not None:
        click.echo(f"run folder: {run.folder}")


def _shard(value):
    """``--shard I/N`` as ``(I, N)``; a bad value is a usage error (one line, exit 2)."""
    if value is None:
        return None
    from transferkit.features.shards import parse_shard

    try:
        return parse_shard(value)
    except TransferkitError as error:
        raise click.BadParameter(str(error)) from None


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set finetune.epochs=2 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished epoch.")
@click.option("--restart", is_flag=True, help="Discard an interrupted run's checkpoint and start over.")
@click.option("--quiet", is_flag=True, help="No per-batch progress bar (epoch summaries still print).")
@click.option("--coordinator", metavar="HOST:PORT", help="Multi-host training (KERAS_BACKEND=jax): process 0's "
              "address, the same on every process (or KERAS_DISTRIBUTION_JOB_ADDRESSES).")
@click.option("--num-processes", type=click.IntRange(1), help="Multi-host training: how many processes run this "
              "command, one per host (or KERAS_DISTRIBUTION_NUM_PROCESSES).")
@click.option("--process-id", type=click.IntRange(0), help="Multi-host training: this process's number, 0 to N-1; "
              "process 0 writes the run (or KERAS_DISTRIBUTION_PROCESS_ID).")
def finetune(recipe, overrides, resume, restart, quiet, coordinator, num_processes, process_id):
    """Attach a new head, warm it up on the frozen body, unfreeze and fine-tune (strategy finetune or imag).

    Training happens in OUTPUT.partial/ beside the output folder: every epoch is checkpointed there
    and history.json, history.csv and curves.png are rewritten there; the finished run replaces the
    output folder in one step. After an interruption (even kill -9) run the same command with --resume.

    Multi-host (KERAS_BACKEND=jax): the same command on every host with --coordinator, --num-processes
    and --process-id (or under srun); data.batch_size is the global batch; process 0 writes the run.

    \b
    Examples:
      transferkit finetune recipes/flowers5_finetune.yaml
      transferkit finetune recipes/flowers5_finetune.yaml --resume
      transferkit finetune recipe.yaml --set finetune.epochs=2 --set data.image_size=128
      transferkit finetune recipe.yaml --coordinator node0:1234 --num-processes 2 --process-id 0
    """
    from transferkit.recipe import load_recipe
    from transferkit.strategies.finetune import finetune as run_finetune
    from transferkit.training import multihost

    if resume and restart:
        raise click.UsageError("give --resume or --restart, not both")
    source, recipe = recipe, load_recipe(recipe, overrides=overrides)
    if recipe.strategy == "extract":
        raise click.UsageError("the recipe's strategy is extract: run `transferkit extract RECIPE`, "
                               "or --set strategy=finetune")
    multihost.initialize(coordinator, num_processes, process_id)  # before Keras starts its backend
    checked(recipe, source)
    run = run_finetune(recipe, resume=resume, restart=restart, progress=not quiet)
    click.echo(f"run folder: {run.folder}" if run.folder else "done: process 0 writes the run folder")


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--modes", default="normal,imag", show_default=True,
              help="Comma-separated modes: normal, imag, or names of your own given a strategy by --set-per-mode.")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(2), help="Seeds per mode.")
@click.option("--set-per-mode", "per_mode", multiple=True, metavar="MODE:KEY=VALUE",
              help="Override a recipe key for one mode's runs, e.g. --set-per-mode imag_head:imag.train=head "
                   "(repeatable).")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(0),
              help="Runs trained at once, each in its own process (0: one per two CPU cores).")
@click.option("--output", type=click.Path(file_okay=False), help="Default: the recipe's output/compare.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key for every mode, e.g. --set imag.imag_epochs=2 (repeatable).")
def compare(recipe, modes, seeds, per_mode, jobs, output, overrides):
    """Train each mode with several seeds on the same split and budget; compare the train and validation curves.

    Writes compare.json, compare.md (mean ± std per mode, the paired difference with a 95%
    confidence interval and a paired t-test) and curves.png. Rerun the same command after an
    interruption: finished runs are reused and an unfinished one resumes.

    \b
    Examples:
      transferkit compare recipes/digits8_imag.yaml --modes normal,imag --seeds 3
      transferkit compare recipes/digits8_imag.yaml --modes normal,imag,imag_head --seeds 5 --jobs 0 \\
          --set-per-mode imag_head:strategy=imag --set-per-mode imag_head:imag.train=head
    """
    from transferkit.reports.compare import to_markdown
    from transferkit.strategies.compare import compare as run_compare
    from transferkit.recipe import load_recipe

    settings: dict[str, list[str]] = {}
    for item in per_mode:
        mode, colon, setting = item.partition(":")
        if not colon or not mode or "=" not in setting:
            raise click.UsageError(f"--set-per-mode {item}: expected MODE:KEY=VALUE, e.g. imag_head:imag.train=head")
        settings.setdefault(mode, []).append(setting)
    recipe = checked(load_recipe(recipe, overrides=overrides), recipe)
    start_keras_quietly()
    summary = run_compare(recipe, modes=[m.strip() for m in modes.split(",") if m.strip()], seeds=seeds,
                          settings=settings, jobs=jobs, output=output)  # checks every mode before the first run
    click.echo(to_markdown(summary), nl=False)


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--budget", help="Wall-clock time for the whole search: 90s, 25m, 2h, 1h30m. "
              "Default: the recipe's tune.budget (30m).")
@click.option("--trials", type=click.IntRange(1), help="At most this many trials.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set tune.metric=accuracy (repeatable).")
@click.option("--output", type=click.Path(file_okay=False), help="The study folder. Default: the recipe's output/tune.")
@click.option("--resume", is_flag=True, help="Go on with the study in the folder: finished trials are kept, an "
              "interrupted one runs again (fine-tuning from its last epoch).")
@click.option("--restart", is_flag=True, help="Start a new study in the folder (finished trial runs are reused).")
@click.option("--progress", is_flag=True, help="Show each trial's own output (epochs, reports), not one line per trial.")
def tune(recipe, budget, trials, overrides, output, resume, restart, progress):
    """Search the recipe's plans within a time budget and keep the one that wins on the validation split.

    Optuna's TPE sampler over each strategy's default space around the recipe (and the recipe's
    tune.space), a pruner for weak fine-tuning trials, the study in OUTPUT/study.db (SQLite). Every
    trial is a run folder under OUTPUT/trials/; a test split is evaluated once, on the winner.
    Writes tune.md, tune.json, history.png and best.yaml (the winning recipe).

    \b
    Examples:
      transferkit tune recipes/flowers5_finetune.yaml --budget 30m
      transferkit tune recipe.yaml --budget 2h --resume
      transferkit tune recipe.yaml --set "tune.space={strategy: [extract, finetune]}"
    """
    from transferkit.recipe import load_recipe, parse_duration
    from transferkit.reports.tune import to_markdown
    from transferkit.strategies.tune import tune as run_tune

    if resume and restart:
        raise click.UsageError("give --resume or --restart, not both")
    if budget is not None:
        parse_duration(budget, key="--budget")
    loaded = checked(load_recipe(recipe, overrides=overrides), recipe)
    start_keras_quietly()
    with _naming(recipe):
        result = run_tune(loaded, budget=budget, trials=trials, resume=resume, restart=restart, output=output,
                          progress=progress)
    click.echo(to_markdown(result.summary, recipe_text=False), nl=False)
    click.echo(f"study folder: {result.folder}; the winning recipe: {result.folder / 'best.yaml'}")


@click.command("lr-find")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--steps", default=100, show_default=True, type=int,
              help="Steps of the sweep, one batch each (10 or more).")
@click.option("--start", default=1e-7, show_default=True, type=float, help="The first step's learning rate.")
@click.option("--end", default=10.0, show_default=True, type=float, help="The last step's learning rate.")
@click.option("--suggest", type=click.Choice(["auto", "rise", "valley", "steepest"]), default="auto",
              show_default=True,
              help="The suggestion to give (and --write): a third of the rate where the loss starts to climb (rise), "
              "fastai's valley, or the steepest fall of the loss; auto: rise after a linear probe or warm-up, "
              "else valley.")
@click.option("--output", type=click.Path(file_okay=False), help="Where lr_find.png and lr_find.json go. "
              "Default: the recipe's output/lr_find.")
@click.option("--write", "write_to", type=click.Path(dir_okay=False),
              help="Write the recipe with finetune.optimizer.learning_rate set to the suggestion here.")
@click.option("--force", is_flag=True, help="Let --write replace an existing file (the recipe itself too).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set data.batch_size=16 (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def lr_find(recipe, steps, start, end, suggest, output, write_to, force, overrides, quiet):
    """Find a fine-tuning learning rate: sweep it exponentially over short training and watch the loss.

    Builds and warms up the model as `transferkit finetune` would (linear probe or warm-up epochs),
    unfreezes it, then trains one batch per step with the recipe's fine-tuning optimizer while the
    learning rate grows from --start to --end, until the smoothed loss passes 4x its minimum. The
    model is thrown away. Suggests a rate (--suggest); writes lr_find.png and lr_find.json, and with
    --write a recipe that uses the rate.

    \b
    Examples:
      transferkit lr-find recipes/flowers5_finetune.yaml
      transferkit lr-find recipes/flowers5_finetune.yaml --write flowers5_lr.yaml
      transferkit lr-find recipe.yaml --steps 60 --end 1 --suggest steepest
    """
    from transferkit.recipe import load_recipe
    from transferkit.strategies.lr_find import check_lr_find, lr_find as run_lr_find

    loaded = load_recipe(recipe, overrides=overrides)
    with _naming(recipe):
        check_lr_find(loaded, steps=steps, start=start, end=end, suggest=suggest, write=write_to, force=force)
    checked(loaded, recipe)
    found = run_lr_find(loaded, steps=steps, start=start, end=end, suggest=suggest, output=output, write=write_to,
                        force=force, progress=not quiet)
    click.echo(f"suggested learning rate: {found.learning_rate:g} ({found.suggest}; {found.other_suggestions()}; "
               f"the recipe has {loaded.finetune.optimizer.learning_rate:g})")
    click.echo(f"curve: {found.folder / 'lr_find.png'}" + (f"; recipe with it: {found.written}" if found.written else ""))
