"""The frozen prefix as its own stage: run embeddings + layers 0..k-1 once, train the rest on their outputs.

Frozen layers run in eval mode so that their outputs are a pure function of the input and can be cached:
across epochs, seeds, schedulers and learning rates of a grid, and from a shallower depth to a deeper one
(depth 6 = layers 3-5 run on the depth-3 states). States are stored unpadded in the dtype the frozen layers hand
on (fp32, also under autocast: LayerNorm computes in fp32), so the layers after them read what they would read live.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core.batches import eval_tokens, sorted_batches
from core.data import Split, to_device
from core.errors import first_line
from core.model import Backbone, num_layers


class _Passthrough(nn.Module):
    """Stands in for the embedding modules: hands the cached hidden states to the first trainable layer."""

    def forward(self, *args, **kwargs):
        for value in (kwargs.get("inputs_embeds"), kwargs.get("input_embeds"), *args):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value
        raise RuntimeError("the prefix cache expected hidden states as inputs_embeds")


@contextlib.contextmanager
def layer_view(backbone: Backbone, start: int, stop: int, skip_embeddings: bool):
    """Temporarily make the model run only layers start..stop-1 (and no embeddings when skipping them)."""
    layers = backbone.layers
    saved = {n: getattr(backbone.base, n) for n in backbone.embedding_names}
    setattr(backbone.layers_parent, backbone.layers_name, nn.ModuleList(list(layers)[start:stop]))
    if skip_embeddings:
        for name in backbone.embedding_names:
            setattr(backbone.base, name, _Passthrough() if name == "embeddings" else nn.Identity())
    try:
        yield
    finally:
        setattr(backbone.layers_parent, backbone.layers_name, layers)
        for name, module in saved.items():
            setattr(backbone.base, name, module)


@torch.no_grad()
def split_forward_mismatch(model: nn.Module, backbone: Backbone, depth: int, inputs: dict) -> str | None:
    """Why the model cut at `depth` (embeddings + layers 0..depth-1 run on their own, the later layers run on
    their output, as a run with a cached prefix does) would not compute what the whole model computes, or None
    when it does. Checked in eval mode and full precision on a few real rows: a model whose layers are not one
    plain sequence (blocks that pool, embeddings that return more than hidden states, an encoder that needs one
    layer at least) fails here instead of training on something else or failing mid-run."""
    was_training = model.training
    model.eval()
    mask = inputs["attention_mask"]
    try:
        whole = model(**inputs).logits, backbone.base(**inputs).last_hidden_state
        lengths = mask.sum(1).tolist()
        with layer_view(backbone, 0, depth, skip_embeddings=False):
            states = backbone.base(**inputs).last_hidden_state
            alone = [backbone.base(**{k: v[row:row + 1, :n] for k, v in inputs.items()}).last_hidden_state[0]
                     for row, n in enumerate(lengths)]
        if states.shape[:2] != mask.shape:
            return f"its layers give {states.shape[1]} states for {mask.shape[1]} tokens"
        # The cache keeps each row's states as built beside other rows (padded to their longest) and hands them back
        # padded with zeros: a row's states must not change with its padding (FNet mixes every position, padding
        # included), and the later layers must not read the padding's states.
        gap = max(gap_beyond_rounding(states[row, :n], own) or 0.0 for row, (n, own) in enumerate(zip(lengths, alone)))
        if gap:
            return f"its frozen layers' states change with the row's padding (by up to {gap:.2g})"
        states = states * mask[..., None].to(states.dtype)
        with layer_view(backbone, depth, num_layers(model.config), skip_embeddings=True):
            cut = (model(inputs_embeds=states, attention_mask=mask).logits,
                   backbone.base(inputs_embeds=states, attention_mask=mask).last_hidden_state)
    except Exception as error:  # any failure of the cut forward means: do not cut this model
        return error_phrase(error)
    finally:
        model.train(was_training)
    # Logits and the last hidden states (a random head's logits are small: a layer run twice or skipped shows
    # in the states first), padding positions aside.
    for what, a, b in (("logits", cut[0], whole[0]), ("last hidden states", cut[1], whole[1])):
        if a.shape != b.shape:
            return f"its {what} come out as {tuple(a.shape)}, not {tuple(b.shape)}"
        if what != "logits" and a.shape[:2] == mask.shape:
            a, b = a[mask.bool()], b[mask.bool()]
        if (gap := gap_beyond_rounding(a, b)) is not None:
            return f"its {what} differ from the whole model's by up to {gap:.2g}"
    return None


def error_phrase(error: BaseException) -> str:
    """A failed check's reason in a one-line note: the exception's type and first line."""
    return f"{type(error).__name__}: {first_line(error)}"


def gap_beyond_rounding(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """The largest |a - b| where it exceeds fp32 rounding of two ways to compute one function (1e-4 of b's scale,
    1 + max |b|), else None: what the cut and the stacked forward checks (`core.stacked`) allow."""
    gap = float((a - b).abs().max())
    return gap if gap > 1e-4 * (1.0 + float(b.abs().max())) else None


@dataclass
class PrefixStates:
    """Hidden states after layer depth-1 for every example of one split, unpadded and concatenated."""
    flat: torch.Tensor          # [total tokens, hidden], in the dtype the frozen layers output
    offsets: np.ndarray         # example i owns flat[offsets[i]:offsets[i+1]]
    depth: int
    build_seconds: float        # what building it cost, cumulative over the shallower caches it came from
    contended: str | None = None  # the evidence where that build (or a shallower one it came from) met foreign load

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def batch(self, indices, device) -> dict[str, torch.Tensor]:
        rows = [self.flat[self.offsets[i]:self.offsets[i + 1]] for i in indices]
        states = to_device(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), device)
        lengths = torch.as_tensor(self.offsets[np.asarray(indices) + 1] - self.offsets[np.asarray(indices)])
        mask = (torch.arange(states.shape[1])[None, :] < lengths[:, None]).long()
        return {"inputs_embeds": states, "attention_mask": to_device(mask, device)}


@torch.inference_mode()
def _run_layers(model: nn.Module, backbone: Backbone, source, lengths: np.ndarray, start: int, stop: int,
                pad_id: int, device, autocast, allocate=None) -> torch.Tensor:
    """Run layers start..stop-1 on tokens (start == 0) or on cached states; return unpadded states, written into
    allocate(shape, dtype) (host memory by default)."""
    allocate = allocate or (lambda shape, dtype: torch.empty(shape, dtype=dtype))
    out = None
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    was_training = model.training
    model.eval()
    with layer_view(backbone, start, stop, skip_embeddings=start > 0):
        for indices in sorted_batches(lengths, eval_tokens(device)):
            inputs = source.batch(indices, pad_id, device) if start == 0 else source.batch(indices, device)
            with autocast():
                hidden = backbone.base(**inputs).last_hidden_state
            hidden = hidden.to("cpu")
            if out is None:  # the dtype the live layers hand on: a run on cached states reads what they compute
                out = allocate((int(lengths.sum()), hidden.shape[-1]), hidden.dtype)
            for row, i in enumerate(indices):
                out[offsets[i]:offsets[i + 1]] = hidden[row, :lengths[i]]
    model.train(was_training)
    return out if out is not None else torch.empty((0, model.config.hidden_size))


class PrefixCache:
    """A session's store of prefix states, keyed by (model, data, split, rows, depth), within a memory budget.

    States stay on the run's device while they fit `device_budget_gb`, else in host memory while they fit
    `host_budget_gb`, else in a memory-mapped file; the least recently used entries are dropped first. States that
    can only end in a file are built into one: the build never holds more host memory than the budget.
    """

    def __init__(self, device_budget_gb: float = 4.0, host_budget_gb: float = 4.0):
        self.device_budget = device_budget_gb * 2**30
        self.host_budget = host_budget_gb * 2**30
        self.entries: OrderedDict[tuple, PrefixStates] = OrderedDict()
        self._disk = None
        self._mapped = weakref.WeakValueDictionary()  # id -> tensor backed by a file

    def has(self, key: tuple, depth: int) -> bool:
        return (key, depth) in self.entries

    def get(self, key: tuple, depth: int, build, device) -> tuple[PrefixStates, bool]:
        """Return (states at `depth`, reused?) building them with build(shallower_states_or_None, start_depth)."""
        if (key, depth) in self.entries:
            self.entries.move_to_end((key, depth))
            return self.entries[(key, depth)], True
        shallower = [d for (k, d) in self.entries if k == key and d < depth]
        base = self.entries[(key, max(shallower))] if shallower else None
        started = time.perf_counter()
        flat = build(base, base.depth if base else 0)
        cost = time.perf_counter() - started + (base.build_seconds if base else 0.0)
        states = PrefixStates(flat, np.concatenate([[0], np.cumsum(build.lengths)]), depth, cost,
                              base.contended if base else None)  # its cost includes the base's build
        self._store((key, depth), states, torch.device(device))
        return states, False

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """Where a build writes its states: host memory, or a file where they can be kept neither on the device nor
        in host memory (`_store`'s rule for an entry alone)."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        on_device = torch.device(device).type != "cpu" and nbytes <= self.device_budget
        if nbytes > self.host_budget and not on_device:
            return self._file(shape, dtype)
        return torch.empty(shape, dtype=dtype)

    def _store(self, entry: tuple, states: PrefixStates, device: torch.device) -> None:
        while self.entries and self._used() + states.nbytes > self.device_budget + self.host_budget:
            self.entries.popitem(last=False)
        on_device = sum(s.nbytes for s in self.entries.values() if s.flat.device.type != "cpu")
        if device.type != "cpu" and on_device + states.nbytes <= self.device_budget:
            states.flat = states.flat.to(device)
        elif self._used() - on_device + states.nbytes > self.host_budget and not self._in_file(states.flat):
            states.flat = self._file(states.flat.shape, states.flat.dtype).copy_(states.flat)
        self.entries[entry] = states

    def _used(self) -> int:
        return sum(s.nbytes for s in self.entries.values())

    def _in_file(self, tensor: torch.Tensor) -> bool:
        return self._mapped.get(id(tensor)) is tensor

    def _file(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An empty tensor in a memory-mapped file, unlinked once mapped: its disk space goes when the entry does."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        self._disk = self._disk or tempfile.TemporaryDirectory(prefix="prefix-cache-")
        path = f"{self._disk.name}/{len(self.entries)}-{time.monotonic_ns()}.bin"
        array = np.memmap(path, dtype=np.uint8, mode="w+", shape=(nbytes,))  # bytes: numpy has no bfloat16
        with contextlib.suppress(OSError):
            os.unlink(path)
        tensor = torch.from_numpy(array).view(dtype).view(shape)
        self._mapped[id(tensor)] = tensor
        return tensor

    def clear(self) -> None:
        self.entries.clear()


def prefix_states(cache: PrefixCache, model: nn.Module, backbone: Backbone, split: Split, split_key: tuple, depth: int,
                  pad_id: int, device, autocast) -> tuple[PrefixStates, bool]:
    """States after layer depth-1 for `split`, from `cache` when this prefix was built before."""

    def build(shallower: PrefixStates | None, start: int) -> torch.Tensor:
        source = split if shallower is None else shallower
        return _run_layers(model, backbone, source, split.lengths, start, depth, pad_id, device, autocast,
                           lambda shape, dtype: cache.allocate(shape, dtype, device))

    build.lengths = split.lengths
    return cache.get(split_key, depth, build, device)
