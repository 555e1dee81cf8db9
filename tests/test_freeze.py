"""Freezing a prefix: exact trainable counts, every supported family, clear refusals, and an exact prefix cache."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
from conftest import save_tiny
from transformers import AutoModelForSequenceClassification, DistilBertConfig, GPT2Config

from core import UsageError
from core.data import load_text_data
from core.model import count_parameters, find_backbone, freeze, load_model, load_tokenizer
from core.prefix_cache import PrefixCache, layer_view, prefix_states

FAMILIES = ("bert", "distilbert", "roberta", "electra")
TINY_LAYERS = 3


@pytest.fixture(scope="module")
def distilbert_base():
    """The shape of distilbert-base-uncased (random weights): what the reference study's counts refer to."""
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(DistilBertConfig(num_labels=2))


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_family(request, tmp_path_factory) -> tuple[str, str]:
    folder = save_tiny(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param, layers=TINY_LAYERS)
    return request.param, str(folder)


@pytest.mark.parametrize("depth, trainable", [(0, 66_955_010), (4, 14_767_874), (6, 592_130)])
def test_distilbert_trainable_counts_are_exact(distilbert_base, depth, trainable):
    freeze(distilbert_base, depth)
    assert count_parameters(distilbert_base) == (trainable, 66_955_010)


def test_deeper_freezing_trains_strictly_fewer_parameters(distilbert_base):
    counts = []
    for depth in range(7):
        freeze(distilbert_base, depth)
        counts.append(count_parameters(distilbert_base)[0])
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 7
    assert counts[0] == 66_955_010 and counts[6] == 592_130


def test_freezing_again_replaces_the_previous_depth(distilbert_base):
    freeze(distilbert_base, 6)
    freeze(distilbert_base, 4)
    assert count_parameters(distilbert_base)[0] == 14_767_874


def test_depth_beyond_the_layers_is_refused(distilbert_base):
    with pytest.raises(UsageError, match="--freeze-depth 7 .* has 6 layers: use 0 to 6"):
        freeze(distilbert_base, 7)


def test_every_family_exposes_embeddings_and_layers(tiny_family):
    kind, folder = tiny_family
    model = load_model(folder, ["0", "1"])
    backbone = find_backbone(model)
    assert len(backbone.layers) == TINY_LAYERS
    expected = ("embeddings", "embeddings_project") if kind == "electra" else ("embeddings",)
    assert backbone.embedding_names == expected


def test_every_family_freezes_embeddings_and_the_first_layers(tiny_family):
    _, folder = tiny_family
    model = load_model(folder, ["0", "1"])
    backbone = find_backbone(model)
    total = count_parameters(model)[1]
    size = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    embeddings = sum(size(m) for m in backbone.embedding_modules())
    for depth in range(TINY_LAYERS + 1):
        freeze(model, depth)
        frozen = (embeddings if depth else 0) + sum(size(layer) for layer in backbone.layers[:depth])
        assert count_parameters(model) == (total - frozen, total)
        for index, layer in enumerate(backbone.layers):
            assert all(p.requires_grad == (index >= depth) for p in layer.parameters())
    # Fully frozen: only the classification head (and BERT's pooler, which feeds it) still learns.
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith(("classifier", "pre_classifier")) or ".pooler." in name
                             for name in trainable)


def test_depth_beyond_a_tiny_model_is_refused(tiny_family):
    _, folder = tiny_family
    model = load_model(folder, ["0", "1"])
    with pytest.raises(UsageError, match=f"--freeze-depth {TINY_LAYERS + 1} .* has {TINY_LAYERS} layers"):
        freeze(model, TINY_LAYERS + 1)


def test_architecture_without_embeddings_is_refused():
    gpt2 = AutoModelForSequenceClassification.from_config(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0))
    with pytest.raises(UsageError, match="'gpt2'.*BERT-like encoders"):
        freeze(gpt2, 1)


def test_model_without_a_layer_list_is_refused():
    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = torch.nn.Embedding(8, 4)
            self.blocks = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))

    class Classifier(torch.nn.Module):
        base_model_prefix = "base"

        def __init__(self):
            super().__init__()
            self.base = Base()
            self.config = DistilBertConfig(n_layers=2)

    with pytest.raises(UsageError, match="cannot find the 2 encoder layers"):
        freeze(Classifier(), 1)


# The frozen-prefix cache must compute the same function as the full model: cached + upper layers == full.

@pytest.fixture(scope="module")
def family_setup(tiny_family, toy_data):
    kind, folder = tiny_family
    data = load_text_data(toy_data, load_tokenizer(folder), max_length=32)
    model = load_model(folder, data.label_names).eval()
    return kind, folder, data, model


def _full_outputs(model, backbone, data, split):
    batch = split.batch(np.arange(len(split)), data.pad_id, "cpu")
    with torch.inference_mode():
        return model(**batch).logits, backbone.base(**batch).last_hidden_state, batch["attention_mask"].bool()


def test_prefix_cache_plus_upper_layers_equals_the_full_model(family_setup):
    kind, folder, data, model = family_setup
    split = data.splits["validation"]
    backbone = find_backbone(model)
    logits, hidden, mask = _full_outputs(model, backbone, data, split)
    for depth in range(1, TINY_LAYERS + 1):
        freeze(model, depth)
        key = ("test-exact", folder, data.fingerprint, depth)
        states, reused = prefix_states(PrefixCache(), model, backbone, split, key, depth, data.pad_id, "cpu",
                                       contextlib.nullcontext)
        assert not reused and states.depth == depth and states.flat.dtype == torch.float32
        assert states.flat.shape[0] == int(split.lengths.sum())
        batch = states.batch(np.arange(len(split)), "cpu")
        with layer_view(backbone, depth, TINY_LAYERS, skip_embeddings=True), torch.inference_mode():
            cached_logits = model(**batch).logits
            cached_hidden = backbone.base(**batch).last_hidden_state
        torch.testing.assert_close(cached_logits, logits, atol=1e-3, rtol=0, msg=f"{kind} depth {depth}")
        # A random head's logits are tiny (about 0.01), so compare the final hidden states too: a layer run
        # twice or skipped moves them by 0.03 or more; batching rows apart, at most by fp32 rounding.
        torch.testing.assert_close(cached_hidden[mask], hidden[mask], atol=4e-3, rtol=2e-3,
                                   msg=f"{kind} depth {depth}")
    # The view is temporary: the model is whole again afterwards.
    assert len(backbone.layers) == TINY_LAYERS
    torch.testing.assert_close(_full_outputs(model, backbone, data, split)[0], logits)


def test_deeper_cache_derived_from_a_shallower_one_equals_one_built_from_scratch(family_setup, monkeypatch):
    kind, folder, data, model = family_setup
    split = data.splits["validation"]
    backbone = find_backbone(model)
    key = ("test-derive", folder, data.fingerprint)
    args = (data.pad_id, "cpu", contextlib.nullcontext)

    cache = PrefixCache()
    shallow, _ = prefix_states(cache, model, backbone, split, key, 1, *args)
    derived, reused = prefix_states(cache, model, backbone, split, key, 2, *args)
    assert not reused and derived.build_seconds >= shallow.build_seconds
    again, reused = prefix_states(cache, model, backbone, split, key, 2, *args)
    assert reused and again is derived

    scratch, _ = prefix_states(PrefixCache(), model, backbone, split, key, 2, *args)
    np.testing.assert_array_equal(derived.offsets, scratch.offsets)
    torch.testing.assert_close(derived.flat.float(), scratch.flat.float(), atol=4e-3, rtol=2e-3,
                               msg=f"{kind}: depth 2 from depth 1 differs from depth 2 from scratch")
    # ...while one layer more or less is a visible change, so the comparison above can fail.
    assert (derived.flat.float() - shallow.flat.float()).abs().max() > 0.02


def test_cache_beyond_its_memory_budget_spills_to_disk_unchanged(family_setup, monkeypatch):
    _, folder, data, model = family_setup
    split = data.splits["validation"]
    backbone = find_backbone(model)
    key = ("test-spill", folder, data.fingerprint)
    args = (data.pad_id, "cpu", contextlib.nullcontext)
    in_memory, _ = prefix_states(PrefixCache(), model, backbone, split, key, 2, *args)
    on_disk, _ = prefix_states(PrefixCache(device_budget_gb=0, host_budget_gb=0), model, backbone, split, key, 2,
                               *args)
    torch.testing.assert_close(on_disk.flat, in_memory.flat, atol=0, rtol=0)


def _file_backed(tensor: torch.Tensor) -> bool:
    """Whether the tensor's memory is a mapping of a prefix-cache file (/proc/self/maps), not host memory."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        span, *rest = line.split()
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high:
            return "prefix-cache-" in line
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_states_beyond_the_host_budget_are_built_into_their_file(tiny_bert, toy_data, monkeypatch):
    """A split whose states fit neither budget is written into its memory-mapped file as it is built: building it in
    host memory first (and copying it out after) needed that memory, which is what the budget is there to spare."""
    from core import Session
    session = Session(timing_repeats=0)
    data = session.text_data(toy_data, session.tokenizer(tiny_bert), None, None, 32)
    split, model = data.splits["validation"].subset(progress=False), session.model(tiny_bert, data.label_names)
    backbone = find_backbone(model)
    freeze(model, 1)
    built, store = [], PrefixCache._store
    monkeypatch.setattr(PrefixCache, "_store", lambda self, entry, states, device: built.append(
        _file_backed(states.flat)) or store(self, entry, states, device))
    states, _ = prefix_states(PrefixCache(device_budget_gb=0, host_budget_gb=0), model, backbone, split, ("k",), 1,
                              data.pad_id, "cpu", contextlib.nullcontext)
    assert built == [True] and _file_backed(states.flat)
    in_memory, _ = prefix_states(PrefixCache(), model, backbone, split, ("k",), 1, data.pad_id, "cpu",
                                 contextlib.nullcontext)
    assert not _file_backed(in_memory.flat) and torch.equal(in_memory.flat, states.flat)


@pytest.mark.parametrize("saved_as", [torch.float16, torch.bfloat16])
def test_a_half_precision_checkpoint_trains_with_fp32_weights(tmp_path, saved_as):
    """Hub checkpoints are often stored in fp16/bf16; transformers 5 would load them so, and AdamW on 16-bit
    weights loses small updates. The run keeps fp32 weights (autocast computes in bf16 where it helps)."""
    folder = save_tiny(tmp_path / "half")
    AutoModelForSequenceClassification.from_pretrained(folder, dtype=saved_as).save_pretrained(folder)
    assert AutoModelForSequenceClassification.from_pretrained(folder).dtype == saved_as  # what a plain load gives
    model = load_model(str(folder), ["neg", "pos"])
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_the_checkpoint_is_read_once_and_every_load_equals_a_fresh_from_pretrained(tiny_family, monkeypatch):
    tiny_family = tiny_family[1]
    """Later cells of a grid copy the pristine model; under the same seed they get bit for bit the weights (and
    leave the RNG where) a fresh from_pretrained would, whatever the head's shape."""
    import transformers

    import core.model
    from core import Session
    session = Session()
    labels = ["neg", "pos", "mixed"]
    torch.manual_seed(1)
    session.model(tiny_family, labels)                              # reads the checkpoint
    reads = []
    original = core.model._from_pretrained
    monkeypatch.setattr(core.model, "_from_pretrained", lambda *a: reads.append(a) or original(*a))
    for seed in (2, 3):
        torch.manual_seed(seed)
        ours = session.model(tiny_family, labels).state_dict()
        rng_after_ours = torch.random.get_rng_state()
        torch.manual_seed(seed)
        fresh = transformers.AutoModelForSequenceClassification.from_pretrained(
            tiny_family, num_labels=3, ignore_mismatched_sizes=True, dtype=torch.float32).state_dict()
        assert torch.equal(rng_after_ours, torch.random.get_rng_state())
        assert all(torch.equal(ours[k], fresh[k]) for k in fresh)
    assert reads == []                                              # both came from the copy
    first = session.model(tiny_family, labels)
    with torch.no_grad():
        next(first.parameters()).add_(1.0)                          # training one copy leaves the next untouched
    assert not torch.equal(next(first.parameters()), next(session.model(tiny_family, labels).parameters()))


# A model that cannot be cut after its frozen prefix (layers that pool tokens, embeddings that return more than
# hidden states, an encoder that needs one layer at least) trains with its frozen layers live instead.

def test_the_prefix_cache_check_passes_every_supported_family_at_every_depth(family_setup):
    from core.prefix_cache import split_forward_mismatch
    kind, _, data, model = family_setup
    split = data.splits["validation"]
    batch = split.batch(np.arange(8), data.pad_id, "cpu")
    for depth in range(1, TINY_LAYERS + 1):
        assert split_forward_mismatch(model, find_backbone(model), depth, batch) is None, f"{kind} depth {depth}"


def test_the_prefix_cache_check_sees_a_cut_that_computes_something_else(family_setup, monkeypatch):
    """A cut whose upper part runs the last frozen layer a second time differs from the whole model."""
    import core.prefix_cache
    from core.prefix_cache import split_forward_mismatch
    kind, _, data, model = family_setup
    batch = data.splits["validation"].batch(np.arange(8), data.pad_id, "cpu")
    view = core.prefix_cache.layer_view
    monkeypatch.setattr(core.prefix_cache, "layer_view",
                        lambda backbone, start, stop, skip_embeddings: view(backbone, start - skip_embeddings, stop,
                                                                             skip_embeddings))
    reason = split_forward_mismatch(model, find_backbone(model), 2, batch)
    assert reason is not None and "differ from the whole model's" in reason, kind
    assert model.training is False  # the model is left in the mode it was in


def test_a_model_the_cache_cannot_cut_trains_with_its_frozen_layers_live(tmp_path, toy_data, capsys):
    """Funnel pools tokens: cut after its blocks, the cache would store 5 states for 9 tokens and the run would fail
    (it did, with a traceback). The check sees it, says so once per session, and the runs train uncached."""
    from conftest import quick_config

    from core.prefix_cache import split_forward_mismatch
    from core.session import Session
    from core.train import run
    folder = str(save_tiny(tmp_path / "funnel", "funnel", layers=2))
    data = load_text_data(toy_data, load_tokenizer(folder), max_length=32)
    model = load_model(folder, data.label_names)
    batch = data.splits["train"].batch(np.arange(4), data.pad_id, "cpu")
    assert "states for" in split_forward_mismatch(model, find_backbone(model), 2, batch)
    session = Session(timing_repeats=0)
    records = [run(quick_config(folder, toy_data, freeze_depth=2, seed=seed), "cpu", progress=False, session=session)
               for seed in (0, 1)]
    assert [r.prefix_cache["cached"] for r in records] == [False, False]
    assert all(r.trainable_params < r.total_params and 0 <= r.accuracy <= 1 for r in records)
    notes = [line for line in capsys.readouterr().err.splitlines() if "frozen-prefix cache cannot cut" in line]
    assert len(notes) == 1 and "'funnel' model after 2 layers" in notes[0]


def test_a_pre_norm_model_is_not_cut_where_its_final_norm_would_land_mid_model(tmp_path, toy_data):
    """Megatron-BERT normalises after its last layer inside the encoder: cut after layer 0, the cache stored
    normalised states and layer 1 ran on them. Runs at depth 1 trained on that, silently, until the check."""
    from conftest import VOCAB, quick_config, write_tokenizer
    from transformers import MegatronBertConfig

    from core.prefix_cache import split_forward_mismatch
    from core.session import Session
    from core.train import run
    torch.manual_seed(0)
    config = MegatronBertConfig(vocab_size=len(VOCAB), max_position_embeddings=64, num_hidden_layers=2,
                                hidden_size=32, intermediate_size=64, num_attention_heads=2, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    data = load_text_data(toy_data, load_tokenizer(str(tmp_path)), max_length=32)
    model = load_model(str(tmp_path), data.label_names)
    batch = data.splits["train"].batch(np.arange(4), data.pad_id, "cpu")
    assert "differ from the whole model's" in split_forward_mismatch(model, find_backbone(model), 1, batch)
    record = run(quick_config(str(tmp_path), toy_data, freeze_depth=1), "cpu", progress=False,
                 session=Session(timing_repeats=0))
    assert record.prefix_cache["cached"] is False and record.trainable_params < record.total_params
