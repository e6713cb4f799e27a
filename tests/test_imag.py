"""imag mode: the episode plan, label mappings, and the engine's head swapping on real images."""

import numpy as np
import pytest

from transferkit.errors import RecipeError
from transferkit.training.imag import episode_plan, label_mapping
from transferkit.recipe import load_recipe
from transferkit.run import Run
from transferkit.strategies import finetune as engine
from transferkit.strategies.finetune import finetune
from transferkit.training.trainer import Trainer, get_head_weights

pytestmark = [pytest.mark.slow, pytest.mark.backends]


@pytest.mark.parametrize("epochs, normal, imag", [(7, 2, 1), (10, 4, 1), (5, 1, 3), (3, 4, 1), (1, 1, 1), (9, 2, 2)])
def test_episode_plan_fills_the_budget_and_ends_normal(epochs, normal, imag):
    plan = episode_plan(epochs, normal, imag)
    assert sum(length for _, length in plan) == epochs
    assert plan[-1][0] == "finetune" and plan[0][0] == "finetune"
    assert all(a != b for (a, _), (b, _) in zip(plan, plan[1:]))  # kinds alternate
    assert all(length == imag for kind, length in plan if kind == "imag")


def test_episode_plan_example():
    assert episode_plan(7, 2, 1) == [("finetune", 2), ("imag", 1), ("finetune", 2), ("imag", 1), ("finetune", 1)]
    assert episode_plan(0, 2, 1) == []


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_derangement_has_no_fixed_points_and_depends_on_the_seed(n):
    names = [f"c{i}" for i in range(n)]
    mappings = [label_mapping("derangement", names, seed) for seed in range(20)]
    for mapping in mappings:
        assert sorted(mapping) == list(range(n)) and not np.any(mapping == np.arange(n))
    if n > 2:
        assert len({tuple(m) for m in mappings}) > 1


def test_swap_and_explicit_mappings():
    assert label_mapping("swap", list("abcd"), 0).tolist() == [1, 0, 3, 2]
    odd = label_mapping("swap", list("abcde"), 0)
    assert sorted(odd) == list(range(5)) and not np.any(odd == np.arange(5))
    names = ["cat", "deer", "ship", "truck"]
    assert label_mapping({"deer": "cat", "ship": "truck"}, names, 0).tolist() == [0, 0, 3, 3]


def test_mapping_errors_name_the_problem():
    with pytest.raises(RecipeError, match="imag.mapping: unknown class 'shp': did you mean ship?"), \
            RecipeError.under("imag"):  # as the strategies call it
        label_mapping({"shp": "cat"}, ["cat", "ship"], 0)
    with pytest.raises(RecipeError, match="at least two classes"):
        label_mapping("derangement", ["only"], 0)


def imag_recipe(data, output, epochs=7, normal=2, imag=1, warmup=1, **imag_keys):
    return load_recipe({
        "name": "cd-imag", "seed": 0, "strategy": "imag",
        "data": {"train": str(data), "val": 0.25, "image_size": 96, "batch_size": 8},
        "backbone": {"name": "mobilenet", "alpha": 0.25},
        "warmup": {"epochs": warmup, "optimizer": {"name": "adam", "learning_rate": 1e-3}},
        "finetune": {"epochs": epochs, "unfreeze": {"from": "conv_dw_13"},
                     "optimizer": {"name": "adam", "learning_rate": 1e-4}},
        "imag": {"normal_epochs": normal, "imag_epochs": imag, **imag_keys},
        "output": str(output)})


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def after_each_epoch(monkeypatch, then):
    """Calls ``then(trainer, phase)`` at the end of every epoch, after the trainer's own callbacks
    (the checkpoint among them)."""
    import keras

    callbacks = Trainer.callbacks
    def with_then(self, phase):
        return [*callbacks(self, phase), keras.callbacks.LambdaCallback(on_epoch_end=lambda *_: then(self, phase))]
    monkeypatch.setattr(Trainer, "callbacks", with_then)


@pytest.fixture
def spy(monkeypatch):
    """Records per imag episode the normal and the fresh imag head, and per imag epoch both heads again."""
    record = {"normal_at_start": [], "imag_at_start": [], "normal_intact": [], "imag_after_epoch": [],
              "imag_labels": []}

    imag_model = Trainer._imag_model
    def spied_imag_model(self, phase, resuming):
        model = imag_model(self, phase, resuming)
        record["normal_at_start"].append(get_head_weights(self.model))
        record["imag_at_start"].append(get_head_weights(model))
        return model
    monkeypatch.setattr(Trainer, "_imag_model", spied_imag_model)

    def spied_end(self, phase):
        if phase.name == "imag":
            record["normal_intact"].append(same(get_head_weights(self.model), record["normal_at_start"][-1]))
            record["imag_after_epoch"].append(get_head_weights(self.trained))
    after_each_epoch(monkeypatch, spied_end)

    imagined = engine.imagined
    def spied_imagined(images, recipe, episode):
        result = imagined(images, recipe, episode)
        record["imag_labels"].append((images.labels, result.labels))
        return result
    monkeypatch.setattr(engine, "imagined", spied_imagined)
    return record


def test_imag_episodes_train_fresh_heads_and_leave_the_normal_one_untouched(small_cats_dogs, home, tmp_path, spy):
    run = finetune(imag_recipe(small_cats_dogs, tmp_path), progress=False)
    phases = run.history["phase"]
    assert phases == ["warmup", "finetune", "finetune", "imag", "finetune", "finetune", "imag", "finetune"]
    assert len(spy["imag_at_start"]) == 2 and spy["normal_intact"] == [True, True]
    first, second = spy["imag_at_start"]
    assert not same(first, second)  # each episode starts from its own fresh weights
    assert not any(same(fresh, normal) for fresh, normal in zip(spy["imag_at_start"], spy["normal_at_start"]))
    assert not same(spy["imag_after_epoch"][0], first)  # the imag head did train
    for true, trained_on in spy["imag_labels"]:
        assert np.all(trained_on != true)  # a derangement: no image keeps its label
    imag_epochs = [i for i, phase in enumerate(phases) if phase == "imag"]
    assert all(run.history["imag_loss"][i] is not None and run.history["loss"][i] is None for i in imag_epochs)
    assert all(run.history["val_accuracy"][i] is not None for i in range(len(phases)))  # val: normal head


def test_the_recipe_can_name_another_head_for_imag_episodes(small_cats_dogs, home, tmp_path, spy):
    recipe = imag_recipe(small_cats_dogs, tmp_path, epochs=3, normal=1, imag=1, warmup=0,
                         head={"layers": [{"dense": 8}], "dropout": 0.1})
    run = finetune(recipe, progress=False)
    assert run.history["phase"] == ["finetune", "imag", "finetune"]
    assert len(spy["imag_at_start"][0]) == 4 and len(spy["normal_at_start"][0]) == 2  # two Dense vs one
    assert "head_dense_1" not in [layer.name for layer in run.model.layers]  # the saved model keeps its own head


def test_resume_inside_an_imag_episode_reloads_both_heads(small_cats_dogs, home, tmp_path, spy, monkeypatch):
    recipe = imag_recipe(small_cats_dogs, tmp_path, epochs=5, normal=2, imag=2, warmup=0)
    callbacks = Trainer.callbacks  # the spy's

    def crash_after_first_imag_epoch(self, phase):
        if phase.name == "imag" and self.epoch == phase.first + 1:
            raise KeyboardInterrupt  # as if killed right after the checkpoint
    after_each_epoch(monkeypatch, crash_after_first_imag_epoch)
    with pytest.raises(KeyboardInterrupt):
        finetune(recipe, progress=False)
    monkeypatch.setattr(Trainer, "callbacks", callbacks)
    run = finetune(recipe, resume=True, progress=False)
    assert run.history["phase"] == ["finetune", "finetune", "imag", "imag", "finetune"]
    assert same(spy["imag_at_start"][1], spy["imag_after_epoch"][0])  # the imag head as checkpointed
    assert same(spy["normal_at_start"][1], spy["normal_at_start"][0])  # and the normal head as it was
    assert spy["normal_intact"] == [True, True]


def small_cnn(dropout: float):
    import keras

    layers = [keras.Input((64, 64, 3)), keras.layers.Rescaling(1 / 255),
              keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.MaxPooling2D(),
              keras.layers.Conv2D(16, 3, activation="relu")]
    return keras.Sequential(layers + ([keras.layers.Dropout(dropout)] if dropout else []), name="small_cnn")


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_a_custom_cnn_trains_from_scratch_in_imag_mode(small_cats_dogs, home, tmp_path, dropout):
    recipe = imag_recipe(small_cats_dogs, tmp_path, epochs=4, normal=1, imag=1, warmup=0)
    recipe.data.image_size, recipe.finetune.unfreeze.from_layer = 64, None
    run = finetune(recipe, backbone=lambda: small_cnn(dropout), progress=False)
    assert run.history["phase"] == ["finetune", "imag", "finetune", "finetune"]
    assert run.info["parameters"]["finetune"]["trainable"] == run.info["parameters"]["finetune"]["total"]
    assert np.isfinite([v for v in run.history["val_loss"]]).all()
    assert Run.load(run.folder).predict(np.zeros((1, 64, 64, 3), "float32")).shape == (1, 2)
