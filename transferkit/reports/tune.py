"""What a search reports: the leaderboard of its trials, ``tune.md`` and the optimisation history plot.

Everything here works on plain rows (one per trial) so that it knows nothing of how trials ran.
"""

from __future__ import annotations

import yaml

from transferkit.reports.evaluate import new_figure, save_png

#: Leaderboard order of the trial states: finished trials first (by score), then the rest.
_STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "WAITING": 4}


def leaderboard_rows(trials, maximize: bool) -> list[dict]:
    """One row per plan (Optuna's frozen trials; a plan the sampler asked for again counts in its first
    trial's ``asked``), best first: number, state, strategy, params, val top-1 and loss, seconds, epochs, note."""
    rows, by_folder = [], {}
    for trial in trials:
        attrs = trial.user_attrs
        if attrs.get("reused") and attrs.get("folder") in by_folder:
            by_folder[attrs["folder"]]["asked"] += 1
            continue
        rows.append({"trial": trial.number, "state": trial.state.name.lower(), "strategy": attrs.get("strategy"),
                     "params": {k: v for k, v in trial.params.items() if k != "strategy"},
                     "value": trial.value if trial.state.name == "COMPLETE" else None,
                     "val_top1": attrs.get("val_top1"), "val_balanced_accuracy": attrs.get("val_balanced_accuracy"),
                     "val_loss": attrs.get("val_loss"),
                     "seconds": attrs.get("seconds"), "epochs": attrs.get("epochs"), "reused": attrs.get("reused"),
                     "plan": attrs.get("plan"), "note": attrs.get("note") or "", "folder": attrs.get("folder"),
                     "fitted": attrs.get("fitted"),
                     "asked": 1})
        by_folder.setdefault(attrs.get("folder"), rows[-1])
    sign = -1 if maximize else 1
    return sorted(rows, key=lambda r: (_STATE_ORDER.get(r["state"].upper(), 9),
                                       sign * r["value"] if r["value"] is not None else 0, r["trial"]))


def to_markdown(summary: dict, recipe_text: bool = True, top: int = 15) -> str:
    """``tune.md``: the winner, its test figure (if any), the leaderboard, importances and the best recipe."""
    best, test = summary["best"], summary.get("test")
    metric = summary["metric"].replace("_", "-")
    ran = [row for row in summary["trials"] if not row["note"].startswith("not run")]
    counts = {state: sum(row["state"] == state for row in ran) for state in ("complete", "pruned", "fail")}
    lines = [f"# Search: {summary['name']}", "",
             f"{len(ran)} plans tried ({counts['complete']} finished, {counts['pruned']} pruned or stopped by the "
             f"budget, {counts['fail']} failed) in {summary['seconds_spent']:.0f} s of a "
             f"{summary['budget_seconds']:.0f} s budget, picked by validation {metric}; "
             f"{len(summary['trials']) - len(ran)} more sampled but not run (too long for the time left).", "",
             f"**Winner: trial {best['trial']}** ({_describe(best.get('plan'), best['params'])}"
             f"{'; ' + best['fitted'] if best.get('fitted') else ''}): val top-1 {_f(best['val']['top1'])}, "
             f"balanced accuracy {_f(best['val'].get('balanced_accuracy'))}, loss {_f(best['val']['loss'])} "
             f"(n={best['val']['n']})."]
    if test:
        lines += ["", f"Test split, evaluated once on the winner: top-1 {_f(test['top1'])}, balanced accuracy "
                      f"{_f(test.get('balanced_accuracy'))}, loss {_f(test['loss'])} (n={test['n']})."]
    lines += ["", "| trial | strategy | plan | val top-1 | val balanced acc. | val loss | seconds | epochs | note |",
              "|---|---|---|---|---|---|---|---|---|"]  # seconds: the trial's own (0 where a finished run was reused)
    for row in ran[:top]:
        lines.append(f"| {row['trial']} | {row['strategy'] or '-'} | {_describe(row['plan'], row['params'])} | "
                     f"{_f(row['val_top1'])} | {_f(row.get('val_balanced_accuracy'))} | {_f(row['val_loss'])} | "
                     f"{_f(row['seconds'], '.0f')} | {row['epochs'] or '-'} | {_note(row)} |")
    if len(ran) > top:
        lines.append(f"\n{len(ran) - top} more in tune.json.")
    important = {key: value for key, value in (summary.get("importances") or {}).items() if value >= 0.01}
    if important:
        lines += ["", "Parameter importances (Optuna's fANOVA over the finished trials; the rest below 0.01): " +
                  ", ".join(f"{key} {value:.2f}" for key, value in important.items()) + "."]
    if recipe_text:
        lines += ["", "The winning recipe (best.yaml):", "", "```yaml",
                  yaml.safe_dump(summary["recipe"], sort_keys=False, default_flow_style=None, width=100).rstrip(),
                  "```"]
    return "\n".join(lines) + "\n"


def _note(row: dict) -> str:
    asked = f"asked {row['asked']} times" if row.get("asked", 1) > 1 else ""
    if row["state"] == "complete":
        return "; ".join(filter(None, [row.get("fitted"), "reused a finished run" if row["reused"] else "", asked]))
    return row["state"] + (f": {row['note']}" if row["note"] else "")


def _describe(plan: str | None, params: dict) -> str:
    return (f"{plan}: " if plan else "") + (describe_values(params) or "the recipe as it is")


def describe_values(values: dict) -> str:
    """A trial's values in one line: each key by its last part where that is unambiguous."""
    keys = [key for key in values if key != "strategy"]
    lasts = [key.split(".")[-1] for key in keys]
    return ", ".join(f"{last if lasts.count(last) == 1 else key}={_value(values[key])}"
                     for key, last in zip(keys, lasts))


def _value(value) -> str:
    from transferkit.recipe.search import label

    return f"{value:.3g}" if isinstance(value, float) else label(value)


def _f(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def plot_history(rows: list[dict], path, *, maximize: bool, title: str) -> None:
    """Each finished trial's score by trial number (colour: strategy) and the best so far as a line."""
    finished = sorted((row for row in rows if row["value"] is not None), key=lambda row: row["trial"])
    fig = new_figure((7, 4))
    ax = fig.add_subplot()
    for strategy in sorted({row["strategy"] for row in finished}):
        points = [row for row in finished if row["strategy"] == strategy]
        ax.scatter([row["trial"] for row in points], [row["value"] for row in points], label=strategy, zorder=3)
    best, line = None, []
    for row in finished:
        if best is None or (row["value"] > best if maximize else row["value"] < best):
            best = row["value"]
        line.append((row["trial"], best))
    if line:
        ax.step(*zip(*line), where="post", color="black", linewidth=1, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation " + ("top-1" if maximize else "log-loss"))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_png(fig, path)
