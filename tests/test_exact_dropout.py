"""With --exact-dropout, stacked runs draw the dropout masks each run draws alone (core.exact_dropout)."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import quick_config, save_tiny
from core import group as group_module
from core.group import run_group
from core.prefix_cache import PrefixCache
from core.session import Session
from core.stacked import StackedRuns
from core.train import run
from test_stacked import configs, prepare, solo_weights, stacked_error


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    from conftest import write_toy_dataset
    return str(write_toy_dataset(tmp_path_factory.mktemp("exact-data"), train=140, validation=48))


@pytest.fixture(scope="module", params=["bert", "distilbert"])
def dropout_model(request, tmp_path_factory) -> str:
    """A tiny model with every dropout on, and high (0.3), so that a mask drawn otherwise shows at once."""
    rates = {"bert": dict(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3, classifier_dropout=0.3),
             "distilbert": dict(dropout=0.3, attention_dropout=0.3, seq_classif_dropout=0.3)}[request.param]
    return str(save_tiny(tmp_path_factory.mktemp(f"exact-{request.param}"), request.param, layers=2, **rates))


def prepared_runs(group, cache):
    """Each run as its prepare stage leaves it, with its random state then (what its solo twin starts from)."""
    runs = []
    for config in group:
        run, _, pad_id = prepare(config, cache=cache)
        run.random = torch.get_rng_state()
        runs.append(run)
    return runs, pad_id


@pytest.mark.parametrize("depth", [0, 1])
def test_stacked_runs_with_exact_dropout_match_solo_runs(dropout_model, data, depth):
    group, cache = configs(dropout_model, data, depth), PrefixCache()
    runs, pad_id = prepared_runs(group, cache)
    engine = StackedRuns(runs, steps_per_epoch=30, pad_id=pad_id, device="cpu", cached=depth > 0, exact_dropout=True)
    engine.train_epoch(1)
    for i, member in enumerate(runs):
        torch.set_rng_state(member.random)
        reference = solo_weights(member)  # the run's own model, from the random state it had after its prepare
        whole, worst = stacked_error(engine.run_weights(i), reference)
        assert whole < 1e-5 and worst < 1e-4, f"seed {member.config.seed}: {whole:.1e} whole, {worst:.1e} worst"


@pytest.mark.parametrize("depth", [0, 1])
def test_a_group_with_exact_dropout_records_what_each_run_alone_records(dropout_model, data, depth):
    """Through the group engine, dropout on: runs of 1 and 2 epochs (the group narrowed after the first, each run's
    random state carried over), each record the solo run's — the same per-epoch losses, kept epoch, predictions."""
    base = quick_config(dropout_model, data, freeze_depth=depth, batch_size=8, max_train_samples=64, warmup_ratio=0.1,
                        dev_size=16)
    group = [base.replace(seed=0, epochs=2), base.replace(seed=1, epochs=1, scheduler="cosine", learning_rate=3e-3),
             base.replace(seed=2, epochs=2, learning_rate=5e-4, select_by="loss")]
    together = run_group(group, Session(timing_repeats=0), "cpu", exact_dropout=True)
    for config, record in zip(group, together):
        alone = run(config, "cpu", progress=False, session=Session(timing_repeats=0))
        assert record.engine == "stacked (3 runs, exact dropout)"
        assert [e["train_loss"] for e in record.history] == \
            pytest.approx([e["train_loss"] for e in alone.history], rel=1e-5)
        assert record.best_epoch == alone.best_epoch and record.loss == pytest.approx(alone.loss, rel=1e-5)
        assert record.validation_predictions == alone.validation_predictions


def save_family(folder, kind: str) -> str:
    """A tiny `kind` model (two layers) with its hidden and attention dropout at 0.3."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from conftest import VOCAB, write_tokenizer
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, num_labels=2, vocab_size=len(VOCAB), max_position_embeddings=64,
                                  num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                  pad_token_id=0, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    write_tokenizer(folder)
    return str(folder)


def assert_records_alone(configs, together, engine: str) -> None:
    for config, record in zip(configs, together):
        alone = run(config, "cpu", progress=False, session=Session(timing_repeats=0))
        assert record.engine == engine and record.validation_predictions == alone.validation_predictions
        assert [e["train_loss"] for e in record.history] == [e["train_loss"] for e in alone.history]


def test_a_model_whose_dropout_is_not_reached_trains_one_run_at_a_time(tmp_path, data, monkeypatch, caplog):
    """DeBERTa-v2 drops out through a module of its own (StableDropout), which the per-run draw does not replace:
    stacked, its runs would draw other masks than alone. The check sees it, and its runs train alone (exactly)."""
    folder = save_family(tmp_path / "deberta", "deberta-v2")
    configs = [quick_config(str(folder), data, seed=seed, batch_size=8, max_train_samples=32) for seed in (0, 1)]
    monkeypatch.setattr(group_module, "_said", set())
    with caplog.at_level(logging.WARNING, logger="core.group"):
        together = run_group(configs, Session(timing_repeats=0), "cpu", exact_dropout=True)
    assert [r.getMessage().split(" (logits")[0] for r in caplog.records] == [
        f"runs of {folder} at freeze depth 0 train one at a time: they cannot be stacked (two runs stacked draw "
        "other dropout masks than each alone"]
    assert_records_alone(configs, together, "eager")


def test_frozen_layers_whose_dropout_is_not_reached_train_one_run_at_a_time_under_frozen_dropout(tmp_path, data):
    """Megatron-BERT drops its attention probabilities out through an `nn.Dropout` over [rows, heads, tokens,
    tokens], which the per-run draw cuts to the run's rows only. Frozen to its full depth only its head trains, so
    the check passed with the frozen layers in eval mode; but `--frozen-dropout` keeps them dropping out, and the
    runs stacked drew other masks (weights 2.5 % apart after one epoch). The check now runs the frozen layers as
    training does, and the runs train one at a time; without --frozen-dropout they still stack, exactly."""
    folder = save_family(tmp_path / "megatron", "megatron-bert")
    base = quick_config(folder, data, freeze_depth=2, batch_size=8, max_train_samples=32)
    for frozen_dropout, engine in ((True, "eager"), (False, "stacked (2 runs, exact dropout)")):
        configs = [base.replace(seed=seed, frozen_dropout=frozen_dropout) for seed in (0, 1)]
        assert_records_alone(configs, run_group(configs, Session(timing_repeats=0), "cpu", exact_dropout=True), engine)


def one_length_first(folder) -> str:
    """Data whose first 70 training rows all reach --max-length 8 (9 tokens or more), the rest 3 to 8 tokens."""
    import random
    from conftest import FILLER, POSITIVE, NEGATIVE, write_split
    rng = random.Random(0)

    def rows(n: int, long: int) -> list:
        labels = [rng.randrange(2) for _ in range(n)]
        return [(" ".join([rng.choice([NEGATIVE, POSITIVE][y])] + rng.sample(FILLER, 8 if i < long else
                                                                               rng.randint(1, 6))), y)
                for i, y in enumerate(labels)]
    write_split(folder / "train.tsv", rows(140, 70))
    write_split(folder / "validation.tsv", rows(24, 0))
    return str(folder)


def test_the_check_sees_runs_of_other_lengths_where_the_first_training_rows_are_all_one_length(tmp_path):
    """The check runs two probe batches; where both padded to one length (the first training rows all reach
    --max-length), Megatron-BERT's dropout over [rows, heads, tokens, tokens] drew the masks it draws alone there
    and passed, yet training batches of other lengths drew others (weights 7 % apart after an epoch). The second
    probe batch is cut a token shorter there (`core.session.probe_batches`), and the runs train one at a time."""
    data = one_length_first(tmp_path / "data")
    folder = save_family(tmp_path / "megatron", "megatron-bert")
    configs = [quick_config(folder, data, seed=seed, batch_size=8, max_train_samples=48, max_length=8)
               for seed in (0, 1)]
    assert_records_alone(configs, run_group(configs, Session(timing_repeats=0), "cpu", exact_dropout=True), "eager")


def test_a_model_that_treats_a_batch_by_its_length_does_not_stack_where_the_first_rows_are_one_length(tmp_path):
    """The same blind spot without --exact-dropout: FNet mixes tokens by a Fourier transform over the padded
    length, so two runs stacked (padded to the longer) compute other logits than alone. Probed on two batches of
    one length, it looked stackable; with the second cut shorter it is not."""
    from conftest import VOCAB, write_tokenizer
    from transformers import AutoConfig, AutoModelForSequenceClassification
    torch.manual_seed(0)
    config = AutoConfig.for_model("fnet", num_labels=2, vocab_size=len(VOCAB), max_position_embeddings=64,
                                  num_hidden_layers=2, hidden_size=32, intermediate_size=64, pad_token_id=0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "fnet")
    write_tokenizer(tmp_path / "fnet")
    session = Session(timing_repeats=0)
    text = session.text_data(one_length_first(tmp_path / "data"), session.tokenizer(str(tmp_path / "fnet")), None,
                             None, 8)
    assert "compute other logits than each alone" in session.stack_problem(str(tmp_path / "fnet"), text, 0)


def test_a_model_that_builds_its_own_additive_mask_stacks_exactly(tmp_path, data):
    """LayoutLM hands sdpa a mask of its own making (additive, all 0 without padding) where Hugging Face's mask
    code would hand none: a run's part of it is kept as it is, as alone; dropping it (as a boolean mask that masks
    nothing is dropped) changed the attention's draws, and the check refused a model whose runs stack exactly."""
    folder = save_family(tmp_path / "layoutlm", "layoutlm")
    configs = [quick_config(folder, data, seed=seed, batch_size=8, max_train_samples=32) for seed in (0, 1)]
    together = run_group(configs, Session(timing_repeats=0), "cpu", exact_dropout=True)
    assert_records_alone(configs, together, "stacked (2 runs, exact dropout)")


def test_the_grid_with_exact_dropout_records_what_one_at_a_time_records(dropout_model, data, tmp_path, monkeypatch,
                                                                          capsys):
    """`--exact-dropout --max-parallel-runs 3`: three seeds in one stacked group, dropout on, each record the one
    `--max-parallel-runs 1` stores (same predictions, metrics and losses); with `--engine captured` it is refused
    in one line, before anything trains."""
    from conftest import run_command
    from ablations.grid import main
    from test_group import grid_argv

    def records(name: str, *extra: str) -> dict:
        out = tmp_path / name
        out.mkdir()
        assert run_command(monkeypatch, main, *grid_argv(dropout_model, data, out, *extra)) == 0
        import optuna
        trials = optuna.load_study(study_name="grid", storage=f"sqlite:///{out}/grid.db").get_trials()
        return {t.user_attrs["record"]["config"]["seed"]: t.user_attrs["record"] for t in trials}
    alone = records("one", "--max-parallel-runs", "1")
    together = records("three", "--max-parallel-runs", "3", "--exact-dropout")
    assert sorted(alone) == sorted(together) == [0, 1, 2]
    for seed, record in together.items():
        assert alone[seed]["engine"] == "eager" and record["engine"] == "stacked (3 runs, exact dropout)"
        assert record["validation_predictions"] == alone[seed]["validation_predictions"]
        assert (record["accuracy"], record["f1"]) == (alone[seed]["accuracy"], alone[seed]["f1"])
        assert record["history"][0]["train_loss"] == pytest.approx(alone[seed]["history"][0]["train_loss"], rel=1e-5)
    capsys.readouterr()
    out = tmp_path / "captured"
    out.mkdir()
    assert run_command(monkeypatch, main, *grid_argv(dropout_model, data, out, "--exact-dropout", "--engine",
                                                     "captured")) == 2
    assert capsys.readouterr().err.strip() == ("error: --exact-dropout draws each run's masks from the host, which a "
                                               "captured graph cannot: use --engine stacked or auto")


def test_stacked_runs_with_exact_dropout_are_solo_runs_to_fp64_rounding(dropout_model, data):
    """In fp64 no rounding noise hides a small slip (a mask drawn one token off, a state not carried): three runs
    with dropout 0.3 end where each alone does, to rounding (1e-16 measured)."""
    group = configs(dropout_model, data, 0)
    runs = []
    for config in group:
        runs.append(prepare(config, dtype=torch.float64, cached=False)[0])
        runs[-1].random = torch.get_rng_state()
    engine = StackedRuns(runs, steps_per_epoch=30, pad_id=0, device="cpu", exact_dropout=True)
    engine.train_epoch(1)
    for i, config in enumerate(group):
        alone, _, _ = prepare(config, dtype=torch.float64, cached=False)
        whole, worst = stacked_error(engine.run_weights(i), solo_weights(alone, cached=False))
        assert whole < 1e-11 and worst < 1e-10, f"seed {config.seed}: {whole:.1e} whole, {worst:.1e} worst"
