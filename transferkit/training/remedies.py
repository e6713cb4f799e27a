"""What to change for a verdict of :mod:`transferkit.training.curves`, naming the recipe keys to set."""

from __future__ import annotations

from transferkit.training.curves import (DIVERGED, FLAT_CHANGE, OVER, TOO_SHORT, UNDER, UNSTABLE, WELL_BEFORE_END,
                                         overfit_by_val_loss, still_learning)

_AUGMENT = ("More augmentation: `data.augment: [random_flip, rand_augment]`, plus `finetune.mixup: 0.2` "
            "or `finetune.cutmix: 1.0`.")
_REGULARISE = ("Stronger regularisation: `head.dropout: 0.3` (up to 0.5), `head.l2: 1.0e-4`, "
               "`finetune.label_smoothing: 0.1`.")
_MORE_DATA = "More data: more images per class narrows the train/val gap most reliably."
_SMALLER = ("Fewer trainable weights: unfreeze fewer layers (`finetune.unfreeze: {top_blocks: 1}`), a "
            "smaller `backbone.name`, or `strategy: extract` (a linear classifier on frozen features).")
_UNFREEZE = "Train more of the backbone: `finetune.unfreeze: {fraction: 0.5}` or `finetune.unfreeze: all`."
_CAPACITY = ("More capacity: a larger `backbone.name` (e.g. resnet50 or efficientnet_b3), a hidden head "
             "layer (`head.layers: [{dense: 256, dropout: 0.2}]`), or with `strategy: extract` a cut nearer "
             "the top (`extract.layer: top`).")
_LESS_REGULARISATION = ("Less regularisation: lower `head.dropout`, `head.l2`, `finetune.label_smoothing` "
                        "and `finetune.mixup`/`finetune.cutmix`, and drop some `data.augment` layers.")
_ADD_VAL = "Add a validation split to see over-fitting: `data.val: 0.2`."


def _early_stopping(m: dict, lead: str) -> str:
    """The early-stopping remedy, naming the epoch of the best val loss when known."""
    best = f" (epoch {m['val_loss_best_epoch']} here)" if m["val_loss_best_epoch"] else ""
    return f"{lead}: `finetune.early_stopping: {{patience: 2}}` keeps the weights of the best val loss{best}."


def remedies_for(verdict: str, m: dict, section: str, imag: bool = False, ran: int | None = None) -> list[str]:
    """Concrete changes for the verdict; ``section`` is the recipe section of the judged phase,
    ``imag`` whether the run had imag episodes, ``ran`` how many epochs that section trained."""
    n = max(ran if ran is not None else m["epochs_judged"], 1)
    has_val = m["val_loss"] is not None or m["val_accuracy"] is not None
    if verdict == DIVERGED:
        now = f" (it ended at {m['learning_rate']:.3g})" if m.get("learning_rate") is not None else ""
        return [f"A much lower learning rate: `{section}.optimizer.learning_rate` 10x lower or more{now}.",
                "Warm the rate up over the first epoch: `finetune.schedule: {name: cosine, warmup_epochs: 1}`, "
                "and give the new head warm-up epochs (`warmup.epochs: 2`) before the body is unfrozen.",
                "With `precision: mixed_float16` or `mixed_bfloat16`, try `precision: float32`."]
    if verdict == TOO_SHORT:
        return [f"Train longer (`{section}.epochs: 5` or more) with a validation split (`data.val: 0.2`) "
                "so the curves can be compared."]
    if verdict == OVER:
        remedies = [_AUGMENT, _REGULARISE, _early_stopping(m, "Early stopping"), _MORE_DATA, _SMALLER]
        if overfit_by_val_loss(m):  # val loss already turned: stopping at its minimum is the first fix
            remedies.insert(0, remedies.pop(2))
        return remedies
    if verdict == UNSTABLE:
        remedies = [f"A lower learning rate: `{section}.optimizer.learning_rate` about 3x lower, or one that "
                    f"decays (`{section}.schedule: {{name: cosine}}`).",
                    _early_stopping(m, "Keep the best epoch")]
        if imag:
            remedies.insert(0, "After an imag episode the normal head needs epochs to recover: raise "
                               "`imag.normal_epochs` (fewer episodes, longer normal stretches after them), or use "
                               "`imag.train: head` so that episodes leave the body alone.")
        return remedies
    if verdict == UNDER:
        longer = (f"Train longer: `{section}.epochs: {2 * n}` (this phase ran {n})"
                  + (", as the loss curves are still falling." if still_learning(m) else "."))
        faster = f"A higher learning rate: raise `{section}.optimizer.learning_rate` about 3x."
        remedies = [faster, _UNFREEZE, _CAPACITY, _LESS_REGULARISATION]
        return ([longer, *remedies] if still_learning(m) else [*remedies, longer]) \
            + ([] if has_val else [_ADD_VAL])
    if not has_val:
        return [_ADD_VAL]
    still_improving = m["epochs_since_best"] == 0 or (m["val_loss_change"] or 0.0) < -FLAT_CHANGE
    if m["val_loss_best"] is not None and still_improving:
        return [f"Val loss is still improving: a few more epochs may help, `{section}.epochs: "
                f"{n + max(2, n // 2)}`."]
    if (m["epochs_since_best"] or 0) >= WELL_BEFORE_END:
        return [_early_stopping(m, "Val loss stopped improving, so stop there")]
    return ["The curves have converged; for a last point or two try `finetune.label_smoothing: 0.1` "
            "or compare another `backbone.name`."]

