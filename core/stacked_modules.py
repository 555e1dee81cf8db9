"""The stacked twins of the modules a run trains: Linear, LayerNorm and Embedding with a leading run axis (bmm
instead of mm), `stack_models` that builds one model of N runs from them, and `stack_problem`, why a model cannot
be stacked. The training steps of such a model are `core.stacked.StackedRuns`.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.model import find_backbone, freeze, frozen_modules
from core.prefix_cache import error_phrase, gap_beyond_rounding


class RunAxis:
    """Shared by the stacked modules of one model: how many runs, and how many batch rows each run has now."""

    def __init__(self, runs: int):
        self.runs, self.rows = runs, 1


class StackedLinear(nn.Module):
    def __init__(self, linears: list[nn.Linear], axis: RunAxis):
        super().__init__()
        self.axis = axis
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]))           # [N, out, in]
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in linears])) if linears[0].bias is not None \
            else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(self.axis.runs, -1, x.shape[-1])  # rows are run-major: run n owns a contiguous block
        weight = self.weight.transpose(1, 2)
        out = torch.bmm(flat, weight) if self.bias is None else torch.baddbmm(self.bias[:, None], flat, weight)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class StackedLayerNorm(nn.Module):
    def __init__(self, norms: list[nn.LayerNorm], axis: RunAxis):
        super().__init__()
        self.axis, self.eps, self.shape = axis, norms[0].eps, norms[0].normalized_shape
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in norms]))
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in norms])) if norms[0].bias is not None \
            else None  # LayerNorm(bias=False), as ModernBERT's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = F.layer_norm(x.reshape(self.axis.runs, -1, x.shape[-1]), self.shape, eps=self.eps)
        if self.bias is None:
            return (flat * self.weight[:, None]).reshape(x.shape)
        return torch.addcmul(self.bias[:, None], flat, self.weight[:, None]).reshape(x.shape)


class StackedEmbedding(nn.Module):
    def __init__(self, embeddings: list[nn.Embedding], axis: RunAxis):
        super().__init__()
        if any(m.max_norm is not None or m.sparse for m in embeddings):
            raise ValueError("stacking supports plain nn.Embedding (no max_norm, no sparse gradients)")
        self.axis, self.padding_idx = axis, embeddings[0].padding_idx
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in embeddings]))        # [N, V, H]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        runs, vocab, hidden = self.weight.shape
        shared = ids.shape[0] == 1 and runs > 1  # a buffer every row uses alike (position ids)
        if shared:
            ids = ids.expand(runs, *ids.shape[1:])
        rows_per_run = ids.shape[0] // runs
        # expand/reshape rather than repeat_interleave: shapes known on the host, nothing to sync in a capture
        offset = (torch.arange(runs, device=ids.device) * vocab).view(runs, 1).expand(runs, rows_per_run)
        out = F.embedding(ids + offset.reshape(-1, *[1] * (ids.ndim - 1)), self.weight.reshape(runs * vocab, hidden))
        if not shared:
            return out
        return out.unsqueeze(1).expand(runs, self.axis.rows, *out.shape[1:]).reshape(-1, *out.shape[1:])

    def zero_padding_grad(self) -> None:
        """nn.Embedding(padding_idx) never updates the padding row: neither does its stacked twin."""
        if self.padding_idx is not None and self.weight.grad is not None:
            self.weight.grad[:, self.padding_idx].zero_()


STACKED = {nn.Linear: StackedLinear, nn.LayerNorm: StackedLayerNorm, nn.Embedding: StackedEmbedding}


def stack_problem(model: nn.Module, depth: int, batches: Sequence[dict] | dict | None = None,
                  pad_id: int = 0) -> str | None:
    """Why runs of `model` frozen to `depth` cannot be stacked, or None when they can: checked on one model,
    before any run of a group is prepared. A module they train must have a stacked twin (`STACKED`), and, given
    `batches` (token ids; two of other lengths where the data has them), two different runs stacked must each
    compute what they compute alone: a module used in another way than per row (MPNet's relative-position buckets
    are looked up in an Embedding by position, not by token) fails there, and so does a model whose rows depend on
    how far they are padded (FNet mixes every position, padding included: it takes no attention mask), since a
    stacked step pads each run's batch to the longest of the step."""
    frozen = {id(m) for top in frozen_modules(find_backbone(model), depth) for m in top.modules()}
    for name, module in model.named_modules():
        if id(module) in frozen or not list(module.parameters(recurse=False)):
            continue
        if type(module) not in STACKED:
            return f"it trains {type(module).__name__} {name!r}, and stacking supports Linear, LayerNorm and " \
                   "Embedding modules"
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
            return f"its embedding {name!r} has max_norm or sparse gradients"
    if batches is None:
        return None
    return _stacked_forward_mismatch(model, depth, [batches] if isinstance(batches, dict) else list(batches), pad_id)


def probe_runs(model: nn.Module, depth: int) -> list[nn.Module]:
    """The two runs a stack check compares, in fp32 and frozen to `depth`: the model, and a copy with every trained
    weight moved by noise (so that a stacked twin mixing up its runs shows)."""
    runs = [copy.deepcopy(model).float() for _ in range(2)]
    noise = torch.Generator().manual_seed(0)
    for run in runs:
        freeze(run, depth)
    with torch.no_grad():
        for param in runs[1].parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn(param.shape, generator=noise))
    return runs


def stacked_probe(runs: list[nn.Module], own: list[dict], pad_id: int) -> tuple[nn.Module, RunAxis, dict]:
    """`runs` stacked, and their batches `own` padded and stacked as a training step does
    (`core.stacked.pad_and_stack`): (the stacked model, its run axis set to the step's rows, its inputs)."""
    from core.stacked import pad_and_stack  # core.stacked builds on this module
    inputs, labels, _ = pad_and_stack(own, [torch.zeros(len(b["input_ids"]), dtype=torch.long) for b in own], pad_id)
    stacked, axis = stack_models(runs)
    axis.rows = labels.shape[1]
    return stacked, axis, inputs


def logits_gap(together: torch.Tensor, alone: list[torch.Tensor]) -> float | None:
    """How far each run's rows of the stacked logits ([runs, rows, labels]) are from its logits alone, where that is
    beyond rounding (`core.prefix_cache.gap_beyond_rounding`), else None."""
    mine = torch.cat([together[run, :len(a)] for run, a in enumerate(alone)])
    return gap_beyond_rounding(mine, torch.cat(alone))


@torch.no_grad()
def _stacked_forward_mismatch(model: nn.Module, depth: int, batches: list[dict], pad_id: int) -> str | None:
    """Two runs (`probe_runs`) stacked, in eval mode and full precision, run 0 on the first batch and run 1 on the
    last, each padded to the pair's rows and length as a stacked step pads them: why their logits are not each
    run's own, or None."""
    runs = [run.eval() for run in probe_runs(model, depth)]
    own = [batches[0], batches[-1]]
    try:
        alone = [run(**batch).logits for run, batch in zip(runs, own)]
        stacked, axis, inputs = stacked_probe(runs, own, pad_id)
        together = stacked.eval()(**inputs).logits.view(2, axis.rows, -1)
    except Exception as error:  # any failure of the stacked forward means: do not stack this model
        return f"two runs stacked fail ({error_phrase(error)})"
    if (gap := logits_gap(together, alone)) is not None:
        return f"two runs stacked compute other logits than each alone (up to {gap:.2g} apart)"
    return None


def stack_models(models: list[nn.Module]) -> tuple[nn.Module, RunAxis]:
    """One model whose trainable modules carry every run's weights; frozen modules are shared (checked equal)."""
    axis = RunAxis(len(models))
    stacked = copy.deepcopy(models[0])
    by_name = [dict(m.named_modules()) for m in models]
    for name, module in list(stacked.named_modules()):
        own = list(module.parameters(recurse=False))
        trainable = [p.requires_grad for p in own]
        if not own:
            continue
        if not any(trainable):
            for other in by_name[1:]:
                if not all(torch.equal(a, b) for a, b in zip(own, other[name].parameters(recurse=False))):
                    raise ValueError(f"frozen module {name!r} differs between runs: they cannot share it")
            continue
        kind = STACKED.get(type(module))
        if kind is None or not all(trainable):
            raise ValueError(f"cannot stack {type(module).__name__} {name!r}: stacking supports trainable "
                             "Linear, LayerNorm and Embedding modules")
        parent, _, attr = name.rpartition(".")
        setattr(stacked.get_submodule(parent) if parent else stacked, attr, kind([m[name] for m in by_name], axis))
    return stacked, axis
