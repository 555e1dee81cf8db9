"""Every encoder family transformers can classify with trains here, or is refused in one line.

Tiny random-weight models of each family, built in the test: one run with a frozen prefix (cached where the model
can be cut after it, `core.prefix_cache.split_forward_mismatch`; with the frozen layers live where not), one run
that trains only the head, and a group of two runs (stacked where the modules they train have stacked twins,
`core.stacked_modules.stack_problem`; one at a time where not). What is asserted is that each run completes and that the
record says which way it ran, not which families can be cut or stacked: that is the models' business, and the
code asks them.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import VOCAB, quick_config, write_tokenizer
from transformers import AutoConfig, AutoModelForSequenceClassification

from core import UsageError
from core.group import run_group
from core.model import find_backbone, load_model, preflight, token_limit
from core.prefix_cache import split_forward_mismatch
from core.session import Session, probe_batches
from core.stacked_modules import stack_problem
from core.train import run

LAYERS = 2
SMALL = dict(vocab_size=len(VOCAB), max_position_embeddings=64, num_hidden_layers=LAYERS, hidden_size=32,
             intermediate_size=64, num_attention_heads=2, pad_token_id=0)
FAMILIES = {  # model_type: settings beyond SMALL (None: its own names for everything)
    "bert": {}, "roberta": {}, "xlm-roberta": {}, "camembert": {}, "data2vec-text": {}, "xlm-roberta-xl": {},
    "electra": dict(embedding_size=16), "deberta": {}, "deberta-v2": {}, "mpnet": {}, "ernie": {},
    "megatron-bert": {}, "big_bird": dict(attention_type="original_full"), "layoutlm": {}, "fnet": {},
    "rembert": dict(input_embedding_size=16, output_embedding_size=16), "roformer": dict(embedding_size=32),
    "modernbert": dict(global_attn_every_n_layers=1, local_attention=16), "longformer": dict(attention_window=[8, 8]),
    "convbert": dict(embedding_size=32), "squeezebert": dict(embedding_size=32), "ibert": {},
    "mobilebert": dict(embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=1),
    "xmod": dict(languages=["en_XX"], default_language="en_XX"),
    "distilbert": None, "funnel": None,
}
OWN = {"distilbert": dict(n_layers=LAYERS, dim=32, hidden_dim=64, n_heads=2, max_position_embeddings=64),
       "funnel": dict(block_sizes=[1] * LAYERS, d_model=32, n_head=2, d_head=16, d_inner=64)}
REFUSED = {"albert": ("layers", dict(embedding_size=16)),  # one layer shared by every depth: nothing to freeze apart
           "gpt2": ("embeddings", dict(n_layer=LAYERS, n_embd=32, n_head=2, n_positions=64)),
           "llama": ("embeddings", dict(num_key_value_heads=2))}


def save_family(folder, kind: str, settings: dict) -> str:
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, num_labels=2, **settings)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    write_tokenizer(folder)
    return str(folder)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_each_family_trains_cut_or_live_and_stacked_or_alone(kind, tmp_path, toy_data):
    settings = {"vocab_size": len(VOCAB), **OWN[kind]} if FAMILIES[kind] is None else {**SMALL, **FAMILIES[kind]}
    folder = save_family(tmp_path / kind, kind, settings)
    session = Session(timing_repeats=0)
    base = quick_config(folder, toy_data, batch_size=8)
    data = session.text_data(toy_data, session.tokenizer(folder), None, None, base.max_length)
    model = load_model(folder, data.label_names)
    for depth in (1, LAYERS):
        expected = all(split_forward_mismatch(model, find_backbone(model), depth, inputs) is None
                       for inputs in probe_batches(data))
        record = run(base.replace(freeze_depth=depth), "cpu", progress=False, session=session)
        assert record.prefix_cache["cached"] is expected, f"{kind} depth {depth}"
        assert math.isfinite(record.loss) and record.trainable_params < record.total_params
    stackable = stack_problem(model, 0, probe_batches(data), data.pad_id) is None
    group = run_group([base.replace(seed=0), base.replace(seed=1)], session, "cpu")
    assert [type(r).__name__ for r in group] == ["RunRecord"] * 2, group
    assert {r.engine for r in group} == {"stacked (2 runs)" if stackable else "eager"}, kind


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_the_token_limit_is_the_longest_input_each_family_takes(kind, tmp_path):
    """`core.model.token_limit` reads each family's position table, RoBERTa-style offsets included: an input of
    that many tokens runs, one more does not (the error --max-length is refused to spare a run). A family without
    a table (relative or rotary positions) has no limit and takes twice the configured positions."""
    settings = {"vocab_size": len(VOCAB), **OWN[kind]} if FAMILIES[kind] is None else {**SMALL, **FAMILIES[kind]}
    folder = save_family(tmp_path / kind, kind, settings)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()

    def forward(length: int) -> None:
        ids = torch.arange(length).remainder(len(VOCAB) - 5)[None, :] + 5
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))

    limit = token_limit(folder)
    if limit is None:
        forward(2 * 64)
        return
    forward(limit)
    with pytest.raises((IndexError, RuntimeError)):
        forward(limit + 1)


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_a_family_freezing_cannot_read_is_refused_in_one_line(kind, tmp_path, toy_data):
    what, settings = REFUSED[kind]
    base = {} if kind == "gpt2" else {**SMALL}
    folder = save_family(tmp_path / kind, kind, {**base, "vocab_size": len(VOCAB), **settings})
    with pytest.raises(UsageError, match=f"cannot find the .*{what} of a '{kind}' model"):
        preflight(quick_config(folder, toy_data), Session(timing_repeats=0))


def test_the_readme_counts_the_families_tested_here():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"{len(FAMILIES)} families\n  train here (`tests/test_architectures.py`" in readme
