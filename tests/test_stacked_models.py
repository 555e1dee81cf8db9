"""Runs of a model that stacks compute, stacked, what each computes alone; a model whose runs would not is trained one
run at a time (core.stacked_modules.stack_problem, core.group.run_group). Likewise for the frozen-prefix cache: a
model whose cut would compute something else trains with its frozen layers live (core.prefix_cache)."""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import VOCAB, quick_config, write_tokenizer
from transformers import AutoConfig, AutoModelForSequenceClassification

from core import group as group_module
from core.group import run_group, train_group
from core.prepare import prepare
from core.session import Session
from core.train import run, train_epochs

SMALL = dict(vocab_size=len(VOCAB), max_position_embeddings=64, num_hidden_layers=2, hidden_size=32,
             intermediate_size=64, num_attention_heads=2, pad_token_id=0)

def save_family(folder, kind: str, **settings) -> str:
    """A tiny random-weight model of `kind` without dropout, so that stacked and alone compute one function."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, num_labels=2, **SMALL, **settings)
    for name, value in config.to_dict().items():
        if "dropout" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    write_tokenizer(folder)
    return str(folder)


def test_a_model_whose_rows_depend_on_their_padding_trains_one_run_at_a_time(tmp_path, toy_data, monkeypatch,
                                                                              caplog):
    """FNet takes no attention mask: its Fourier mixing runs over every position, padding included. A stacked step
    pads each run's batch to the longest of the step, so stacked FNet runs trained on other numbers than alone (train
    loss 0.69077 and 0.68775 against 0.6905 and 0.68588 alone, weights 1e-2 apart), while the stack check, which
    gave both runs the same batch, passed. Now the check pads two batches of other lengths as a step does: FNet's
    runs train one at a time, each as alone, and one line says why."""
    folder = save_family(tmp_path / "fnet", "fnet")
    configs = [quick_config(folder, toy_data, seed=seed, batch_size=8, epochs=2) for seed in (0, 1)]
    monkeypatch.setattr(group_module, "_said", set())
    with caplog.at_level(logging.WARNING, logger="core.group"):
        together = run_group(configs, Session(timing_repeats=0), "cpu")
    for config, record in zip(configs, together):
        alone = run(config, "cpu", progress=False, session=Session(timing_repeats=0))
        assert [e["train_loss"] for e in record.history] == \
            pytest.approx([e["train_loss"] for e in alone.history], rel=1e-6)
        assert record.loss == pytest.approx(alone.loss, rel=1e-6)
        assert record.validation_predictions == alone.validation_predictions
    assert [r.getMessage().split(" (up to")[0] for r in caplog.records] == [
        f"runs of {folder} at freeze depth 0 train one at a time: they cannot be stacked (two runs stacked compute "
        "other logits than each alone"]


def test_a_weight_the_loss_never_reaches_is_left_as_alone(tmp_path, toy_data):
    """BigBird's classifier reads the first token's state, not its pooler, so the pooler gets no gradient: a solo
    run's AdamW skips it, weight decay included. Stacked, its gradient was a zero buffer and weight decay shrank it
    every step (weights 1.6e-4 relative from alone in fp64, at weight decay 0.1). Now it stays as it was, as alone,
    and each run's weights are those of the run alone."""
    folder = save_family(tmp_path / "big_bird", "big_bird", attention_type="original_full")
    configs = [quick_config(folder, toy_data, seed=seed, batch_size=8, learning_rate=3e-3, weight_decay=0.1)
               for seed in (0, 1)]
    session = Session(timing_repeats=0)
    prepared = [prepare(c, session, "cpu", False, True) for c in configs]
    names = [n for n, q in prepared[0].model.named_parameters() if q.requires_grad]
    pooler = names.index("bert.pooler.weight")
    initial = [q.params[pooler].detach().clone() for q in prepared]
    group = train_group(prepared, session, [None, None])
    for config, together, before in zip(configs, group, initial):
        p = prepare(config, session, "cpu", False, True)
        alone = train_epochs(p, p.model, session, None, False, False, ())
        assert torch.equal(alone.best["weights"][pooler], before)  # what a solo run does with it: nothing
        assert torch.equal(together.best["weights"][pooler], before)
        moved = [i for i, n in enumerate(names) if not n.endswith("key.bias")]
        error = float((torch.cat([together.best["weights"][i].flatten() for i in moved])
                       - torch.cat([alone.best["weights"][i].flatten() for i in moved])).norm()
                      / torch.cat([alone.best["weights"][i].flatten() for i in moved]).norm())
        assert error < 1e-5, f"seed {config.seed}: weights {error:.1e} relative from alone"


def test_a_model_whose_rows_depend_on_their_padding_is_not_cut_for_the_prefix_cache(tmp_path, toy_data, capsys):
    """The cache keeps each row's frozen-prefix states as built beside other rows (padded to their longest) and
    hands them back padded with zeros; FNet's states change with both, so a cached FNet run at depth 1 trained on
    other numbers than the same run with its frozen layer live (train loss 0.69031 against 0.6897). The check compared
    the cut with the whole model on one batch, padding states included, and passed. Now each row's states are
    checked against the row alone, and the later layers get zeros for padding, as from the cache: FNet's runs keep
    their frozen layers live, and one note says why."""
    folder = save_family(tmp_path / "fnet", "fnet")
    config = quick_config(folder, toy_data, freeze_depth=1, batch_size=8, epochs=2)
    cached = run(config, "cpu", progress=False, session=Session(timing_repeats=0))
    live = run(config, "cpu", progress=False, use_prefix_cache=False, session=Session(timing_repeats=0))
    assert cached.prefix_cache["cached"] is False
    assert [e["train_loss"] for e in cached.history] == pytest.approx([e["train_loss"] for e in live.history], rel=1e-6)
    assert cached.validation_predictions == live.validation_predictions
    notes = [line for line in capsys.readouterr().err.splitlines() if "frozen-prefix cache cannot cut" in line]
    assert len(notes) == 1 and "states change with the row's padding" in notes[0]
