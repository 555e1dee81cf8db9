"""Dropout masks drawn per run, bit for bit those of the run alone, in a stacked group (`--exact-dropout`).

A stacked step (`core.stacked`) draws each dropout mask once over every run's rows, so with dropout on a stacked
run equals its solo twin in distribution, not bit for bit. Here every dropout of the stacked model draws run by
run instead: the random state the run would have alone (taken after its prepare stage, which seeds it) is put in
place, the mask is drawn over the run's own rows and tokens — its batch as it is padded alone, not as the step
pads it — with the very call a solo step makes, and the state is kept for the run's next draw. The same draws in
the same order give the same masks. That covers `nn.Dropout` modules and the attention's own dropout (called once
per run on the run's part of the queries, keys, values and mask: the kernel draws its mask inside).

It costs a draw per run at every dropout (and, where attention drops out, an attention call per run) and cannot
be captured as a CUDA graph (each run's random state is set from the host); the stack check
(`exact_dropout_problem`) says where a model drops out in a way this does not reach, and its runs then train one
at a time.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMPLEMENTATIONS = {"sdpa": "exact_dropout_sdpa", "eager": "exact_dropout_eager"}


def random_state(device: torch.device | str) -> torch.Tensor:
    """The state of the generator a dropout on `device` draws from."""
    device = torch.device(device)
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_random_state(state: torch.Tensor, device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RunRandom:
    """Each run's random state (kept in `states`, one per run, updated after every draw), and where each run's
    batch lies in the current stacked step: `rows` rows per run, and per run the rows and tokens it has alone."""

    def __init__(self, states: list[torch.Tensor], device):
        self.states, self.device = states, torch.device(device)
        self.rows, self.length = 1, 0
        self.shapes: list[tuple[int, int]] = []

    def begin_step(self, rows: int, length: int, shapes: Sequence[tuple[int, int]]) -> None:
        self.rows, self.length, self.shapes = rows, length, list(shapes)

    @contextlib.contextmanager
    def as_run(self, run: int):
        """Draws inside come from run `run`'s generator state; the state outside is put back after."""
        outside = random_state(self.device)
        set_random_state(self.states[run], self.device)
        try:
            yield
        finally:
            self.states[run] = random_state(self.device)
            set_random_state(outside, self.device)

    def part(self, run: int, tensor: torch.Tensor, token_dims: Sequence[int]) -> tuple[slice, ...]:
        """The index of run `run`'s own rows (dim 0) and tokens (`token_dims`) in a stacked tensor."""
        rows, tokens = self.shapes[run]
        index = [slice(None)] * tensor.dim()
        index[0] = slice(run * self.rows, run * self.rows + rows)
        for dim in token_dims:
            index[dim] = slice(0, tokens)
        return tuple(index)

    def token_dims(self, tensor: torch.Tensor, candidates: Sequence[int]) -> list[int]:
        return [d for d in candidates if d < tensor.dim() and tensor.shape[d] == self.length]


class RunDropout(nn.Dropout):
    """`nn.Dropout` over a stacked batch, each run's part dropped with that run's generator as alone; padding is
    left as it is (nothing reads it: a padded token is masked, a padding row weighs nothing)."""

    def __init__(self, dropout: nn.Dropout, random: RunRandom):
        super().__init__(dropout.p, dropout.inplace)
        self.random = random
        self.train(dropout.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        dims = self.random.token_dims(x, (1,)) if x.dim() >= 3 else []
        out = x.clone()
        for run in range(len(self.random.shapes)):
            index = self.random.part(run, x, dims)
            with self.random.as_run(run):
                out[index] = F.dropout(x[index].contiguous(), self.p, True, self.inplace)
        return out


def _solo_layout(tensor: torch.Tensor) -> torch.Tensor:
    """[rows, heads, tokens, dim] laid out as a solo step's attention gets it: a transposed contiguous
    [rows, tokens, heads, dim], so the kernel sees the strides it sees alone."""
    return tensor.transpose(1, 2).contiguous().transpose(1, 2)


def _attends_everywhere(mask: torch.Tensor) -> bool:
    """Whether a 4-d attention mask is one Hugging Face's mask code would not have made alone: a boolean mask (its
    sdpa mask) that masks nothing, which it drops for a batch without padding (sdpa gets no mask). An additive
    mask is kept: a model that builds its own (LayoutLM) hands sdpa one alone too, padding or not (and the eager
    attention adds it, which changes nothing where it is 0)."""
    return mask.dtype == torch.bool and bool(mask.all())


def _attention(inner: Callable[[nn.Module], Callable]) -> Callable:
    """An attention function for the registry: the model's own (`inner(module)`), called once per run on the
    run's part where it drops out, on the whole stacked batch where it does not."""
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, **kwargs):
        function = inner(module)
        random: RunRandom | None = getattr(module, "run_random", None)
        if not dropout or random is None:
            return function(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
        out = None
        for run in range(len(random.shapes)):
            q, k, v = (_solo_layout(t[random.part(run, t, (2,))]) for t in (query, key, value))
            mask = None
            if attention_mask is not None:
                dims = random.token_dims(attention_mask, (2, 3))
                mask = attention_mask[random.part(run, attention_mask, dims)] \
                    if attention_mask.shape[0] == query.shape[0] else attention_mask[..., :q.shape[2], :k.shape[2]]
                if _attends_everywhere(mask):
                    mask = None  # as the run's unpadded batch gets it alone: a GPU picks its kernel (and draws) by that
            with random.as_run(run):
                part, _ = function(module, q, k, v, mask, dropout=dropout, **kwargs)
            if out is None:  # [rows, tokens, heads, dim], as the model's attention functions return it
                out = part.new_zeros(query.shape[0], query.shape[2], *part.shape[2:])
            out[random.part(run, out, (1,))] = part
        return out, None
    return attention


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if IMPLEMENTATIONS["sdpa"] in ALL_ATTENTION_FUNCTIONS:
        return
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    AttentionInterface.register(IMPLEMENTATIONS["sdpa"], _attention(lambda module: sdpa))
    AttentionInterface.register(IMPLEMENTATIONS["eager"], _attention(
        lambda module: sys.modules[type(module).__module__].eager_attention_forward))
    for name, wrapped in IMPLEMENTATIONS.items():
        AttentionMaskInterface.register(wrapped, ALL_MASK_ATTENTION_FUNCTIONS[name])


def install(model: nn.Module, random: RunRandom) -> None:
    """Make the stacked `model` draw its dropout per run from `random`: its `nn.Dropout` modules become
    `RunDropout`, its attention (sdpa or eager) the per-run wrapper. Raises ValueError where the model's
    attention is neither."""
    implementation = model.config._attn_implementation
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"its attention implementation {implementation!r} is not sdpa or eager")
    _register()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, RunDropout(child, random))
        if hasattr(module, "config"):
            module.run_random = random
    model.config._attn_implementation = IMPLEMENTATIONS[implementation]


@torch.no_grad()
def exact_dropout_problem(model: nn.Module, depth: int, batches: list[dict], pad_id: int,
                          frozen_dropout: bool = False) -> str | None:
    """Why runs of `model` frozen to `depth` cannot draw their dropout per run when stacked, or None: two runs
    (the model, and a copy with every trained weight moved by noise), in training mode with dropout on (in the
    frozen layers too where `frozen_dropout`: they drop out in training then), run 0 on the first batch and run 1
    on the last (`core.session.probe_batches`: of another length), each alone from a seed of its own, then stacked
    with the same seeds: their logits must be each run's own. A dropout this module does not reach (a functional call, a
    subclass of its own, an `nn.Dropout` over more than one tokens dim) draws other masks and fails here."""
    from core.model import frozen_modules, find_backbone
    from core.prefix_cache import error_phrase
    from core.stacked_modules import logits_gap, probe_runs, stacked_probe

    runs = probe_runs(model, depth)
    for run in runs:
        run.train()
        for module in [] if frozen_dropout else frozen_modules(find_backbone(run), depth):
            module.eval()
    own = [batches[0], batches[-1]]
    outside = torch.get_rng_state()
    try:
        states, alone = [], []
        for seed, (run, batch) in enumerate(zip(runs, own)):
            states.append(torch.Generator().manual_seed(seed).get_state())  # the CPU's generator only (no CUDA's)
            torch.set_rng_state(states[-1])
            alone.append(run(**batch).logits)
        stacked, axis, inputs = stacked_probe(runs, own, pad_id)
        random = RunRandom(states, "cpu")
        install(stacked, random)
        random.begin_step(axis.rows, inputs["attention_mask"].shape[1],
                          [(len(b["input_ids"]), b["attention_mask"].shape[1]) for b in own])
        together = stacked(**inputs).logits.view(2, axis.rows, -1)
    except Exception as error:  # any failure means: train these runs one at a time
        return f"two runs stacked with their own dropout masks fail ({error_phrase(error)})"
    finally:
        torch.set_rng_state(outside)
    if (gap := logits_gap(together, alone)) is not None:
        return f"two runs stacked draw other dropout masks than each alone (logits up to {gap:.2g} apart)"
    return None
