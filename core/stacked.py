"""Many runs of one work shape trained at once, as one stacked model (horizontal fusion, HFTA-style).

Runs that share model, freeze depth, batch size, max length, precision and training-set size but differ in
seed, schedule (its length in epochs included), learning rate or weight decay become ONE model: every trainable
Linear, LayerNorm and Embedding gets a leading run axis (bmm instead of mm; `core.stacked_modules`) and the batch
holds run 0's rows, then run 1's, ... Everything between those modules (attention, masks, activations) works per
row and is the Hugging Face code unchanged, so BERT/MiniLM, DistilBERT, RoBERTa and ELECTRA stack without a table
of architectures.
(`torch.func.vmap` over `functional_call` was tried first: transformers 5.24's mask code hits vmap's
data-dependent control-flow error on all four families.)

Each run keeps its own arithmetic: its own batches and their order, its own head (drawn from its seed), its
own learning-rate schedule over its own epochs, its own gradient norm clipped to 1.0, its own AdamW state and
update (torch's fused AdamW kernel called on the run's slice: the same kernel and arithmetic as a solo run), in
fp16 its own loss scale (a step whose gradients overflow is skipped for that run alone, as its GradScaler would),
its own evaluation. Dropout draws independent masks per run (one draw over the stacked rows); they are not the masks
a solo run would draw, so with dropout on a stacked run equals a solo run in distribution, not bit for bit —
unless `exact_dropout` (`core.exact_dropout`): then each run draws its masks from its own random state, as alone.
Frozen modules are not stacked: the runs share them (they hold the same pretrained weights).
A run of fewer epochs than the group's longest ends after its last epoch (its rates are 0 from there), and
`narrowed` gives the runs that go on a smaller group of their own, so a run that ended costs no more steps.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.batches import length_grouped_batches
from core.captured import CapturedStep, LearningRates, bucket_for, buckets_for
from core.config import PER_RUN_FIELDS, RunConfig
from core.data import to_device
from core.device import RunScales, rate_multipliers
from core.exact_dropout import RunRandom, install as install_exact_dropout
from core.model import decays, find_backbone, frozen_modules, num_layers
from core.prefix_cache import layer_view
from core.stacked_modules import StackedEmbedding, stack_models


def group_key(config: RunConfig) -> tuple:
    """Equal for configs that can train as one stacked group: every field but the PER_RUN_FIELDS."""
    return tuple(sorted((k, str(v)) for k, v in config.to_dict().items() if k not in PER_RUN_FIELDS))


def learning_rate_table(configs: list[RunConfig], steps_per_epoch: int) -> np.ndarray:
    """[steps, runs]: the rate each run's own schedule (`core.device.make_schedule`, over its own epochs) sets
    before each step, for as many steps as the longest run takes; 0 after a shorter run's last step."""
    table = np.zeros((steps_per_epoch * max(c.epochs for c in configs), len(configs)))
    for run, config in enumerate(configs):
        total = steps_per_epoch * config.epochs
        multipliers = rate_multipliers(config.scheduler, config.warmup_ratio, total, config.learning_rate)
        table[:total, run] = [config.learning_rate * m for m in multipliers]  # LambdaLR's own product
    return table


def pad_and_stack(batches: list[dict], labels: list[torch.Tensor], pad_id: int, rows: int | None = None,
                  length: int | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Pad every run's batch to `rows` x `length` (default: the largest in the step) and stack them run-major.

    Returns (model inputs with N*rows rows, labels [N, rows], loss weights [N, rows]). A padding row attends to
    one token (an all-masked row would give NaN) and weighs 0 in its run's loss."""
    rows = rows or max(len(y) for y in labels)
    length = length or max(b["attention_mask"].shape[1] for b in batches)
    fill = {"input_ids": pad_id}
    inputs = {}
    for key in batches[0]:
        parts = []
        for batch in batches:
            value = batch[key]
            padded = value.new_full((rows, length, *value.shape[2:]), fill.get(key, 0))
            padded[:value.shape[0], :value.shape[1]] = value
            if key == "attention_mask":
                padded[value.shape[0]:, 0] = 1
            parts.append(padded)
        inputs[key] = torch.cat(parts)
    target = torch.zeros((len(labels), rows), dtype=torch.long, device=labels[0].device)
    weights = torch.zeros((len(labels), rows), device=labels[0].device)
    for run, y in enumerate(labels):
        target[run, :len(y)], weights[run, :len(y)] = y, 1.0
    return inputs, target, weights


@dataclass
class StackedRun:
    """One run of a group, as its prepare stage left it: config, model (own seed, frozen), training inputs."""
    config: RunConfig
    model: nn.Module
    batch: Callable[[np.ndarray], dict]   # training rows -> model inputs on the device (tokens or prefix states)
    lengths: np.ndarray                   # training-row lengths (batch order is drawn from them, as solo)
    labels: torch.Tensor                  # training labels, on the host
    random: torch.Tensor | None = None    # its dropout generator's state as alone (`core.exact_dropout`)


class StackedRuns:
    """The training steps of N runs of one work shape, as one stacked model (evaluation stays each run's own:
    `run_weights` hands a run's weights back to its solo model, `core.group`).

    `capture` (a `core.captured.CapturedStep` class, or None for plain eager steps) pads every step to a fixed
    shape (batch-size rows per run, the shortest of `buckets` that holds the step's longest row), reads the
    learning rates from a device table, and replays the step as one CUDA graph per bucket once captured."""

    def __init__(self, runs: list[StackedRun], steps_per_epoch: int, pad_id: int, device, autocast=None,
                 cached: bool = False, max_grad_norm: float = 1.0, capture: type[CapturedStep] | None = None,
                 buckets: tuple[int, ...] | None = None, loss_scaling: bool = False, exact_dropout: bool = False):
        shapes = {group_key(r.config) for r in runs}
        if len(shapes) != 1 or len({len(r.lengths) for r in runs}) != 1:
            raise ValueError("stacked runs must share their work shape (model, depth, batch, length, precision, "
                             f"training-set size); only {', '.join(PER_RUN_FIELDS)} may differ")
        self.runs, self.device, self.pad_id, self.max_grad_norm = runs, torch.device(device), pad_id, max_grad_norm
        self.autocast = autocast or contextlib.nullcontext
        self.settings = dict(autocast=autocast, cached=cached, max_grad_norm=max_grad_norm, capture=capture,
                             buckets=buckets, loss_scaling=loss_scaling, exact_dropout=exact_dropout)
        config = runs[0].config
        self.model, self.axis = stack_models([r.model for r in runs])
        self.random = None
        if exact_dropout:  # each run's masks from its own random state, as alone (no graph can set that state)
            if capture is not None or any(r.random is None for r in runs):
                raise ValueError("exact dropout needs every run's random state and the eager stacked step")
            self.random = RunRandom([r.random for r in runs], device)
            install_exact_dropout(self.model, self.random)
        self.model.to(self.device)
        backbone = find_backbone(self.model)
        self.frozen = [] if cached or config.frozen_dropout else frozen_modules(backbone, config.freeze_depth)
        self.view = (lambda: layer_view(backbone, config.freeze_depth, num_layers(self.model.config), True)) \
            if cached else contextlib.nullcontext
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        # Gradients live in fixed buffers, zeroed before each backward (which accumulates into them in place), so
        # every per-run slice the update reads is built once here, not N x parameters times a step.
        self.grads = [torch.zeros_like(p) for p in self.params]
        self._restore_gradients()
        self.moments = ([torch.zeros_like(p) for p in self.params], [torch.zeros_like(p) for p in self.params])
        solo = dict(runs[0].model.named_parameters())
        self.decayed = [decays(solo[n]) for n, _ in named]  # the solo run's AdamW groups (core.model.decay_groups)
        self.updates = self._updates(range(len(self.params)))
        self.reached: set[int] | None = None  # which parameters the loss reaches: known after the first backward
        self.step_count = torch.zeros(len(runs), device=self.device)  # AdamW's, per run: fp16 skips steps per run
        self.run_grads = [[g[run] for g in self.grads] for run in range(len(runs))]
        self.scales = RunScales(len(runs), self.device) if loss_scaling else None
        self.embeddings = [m for m in self.model.modules() if isinstance(m, StackedEmbedding)]
        self.rates = learning_rate_table([r.config for r in runs], steps_per_epoch)
        self.steps_per_epoch, self.global_step = steps_per_epoch, 0
        self.captured = None
        if capture is not None:
            self.buckets = buckets or buckets_for(config.max_length)
            self.device_rates = LearningRates(self.rates, self.device)
            self.captured = capture(self._static_step, self.device, enabled=True, reset=self._restore_gradients)

    def _static_step(self, static: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step as a captured graph runs it: fixed buffers in, rates from the device table, no host value."""
        inputs = {k: v for k, v in static.items() if k not in ("labels", "weights")}
        losses = self.step(inputs, static["labels"], static["weights"], self.device_rates.views)
        self.device_rates.advance()
        return losses

    def _updates(self, trained) -> list[tuple]:
        """(run, weight decay, its parameter / gradient / moment slices) per run and AdamW group, for the parameters
        `trained` (indices into `params`)."""
        updates = []
        for run, member in enumerate(self.runs):
            for decay in (True, False):
                pick = [i for i in trained if self.decayed[i] == decay]
                if pick:
                    updates.append((run, member.config.weight_decay if decay else 0.0,
                                    *([t.detach()[run] for t in (ts[i] for i in pick)]
                                      for ts in (self.params, self.grads, *self.moments))))
        return updates

    @contextlib.contextmanager
    def _noting_reached(self):
        """Around the first backward: which parameters the loss reaches. One it never reaches (BigBird's pooler,
        beside its classification head) has no gradient in a solo run, so AdamW skips it, weight decay included;
        here its gradient is a zero buffer, so it is left out of the updates from then on."""
        if self.reached is not None:
            yield
            return
        reached: set[int] = set()
        hooks = [p.register_post_accumulate_grad_hook(lambda _, i=i: reached.add(i)) for i, p in enumerate(self.params)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
        self.reached = reached
        if len(reached) < len(self.params):
            self.updates = self._updates(sorted(reached))

    def _restore_gradients(self) -> None:
        """Point every .grad at its fixed buffer (again, after a failed capture: the aborted recording may have
        left something else there)."""
        for p, grad in zip(self.params, self.grads):
            p.grad = grad

    def step(self, inputs: dict, labels: torch.Tensor, weights: torch.Tensor, rates) -> torch.Tensor:
        """One training step of every run (inputs from `pad_and_stack`); `rates[i]` is run i's learning rate
        (a float, or a 0-d device tensor when the step is captured). Returns the runs' losses [N]."""
        self.axis.rows = labels.shape[1]
        torch._foreach_zero_(self.grads)
        with self.autocast():
            logits = self.model(**inputs).logits
        # The loss in fp32 at least (bf16 logits under autocast), in fp64 where the model is (the exactness test).
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        losses = F.cross_entropy(logits, labels.reshape(-1), reduction="none").view_as(weights)
        losses = (losses * weights).sum(1) / weights.sum(1)
        scaled = losses if self.scales is None else losses * self.scales.scale
        with self._noting_reached():
            scaled.sum().backward()  # the runs share no weight, so each gets exactly its own gradient
        for embedding in self.embeddings:
            embedding.zero_padding_grad()
        if self.scales is not None:
            self.scales.unscale(self.run_grads)
        self._clip()
        self._update(rates)
        if self.scales is not None:
            self.scales.update()
        return losses.detach()

    def _clip(self) -> None:
        """Each run's gradient clipped to its own global norm, as `clip_grad_norm_` does for a solo run."""
        norms = torch.stack([g.grad.reshape(len(self.runs), -1).norm(dim=1) for g in self.params]).norm(dim=0)
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        if self.device.type == "cpu":  # reading the norms costs no sync here: rescale only runs above the limit
            for run in (norms > self.max_grad_norm).nonzero().flatten().tolist():
                torch._foreach_mul_([p.grad[run] for p in self.params], coef[run])
            return
        for p in self.params:
            p.grad.mul_(coef.view(-1, *[1] * (p.ndim - 1)))

    def _stack(self, batches: list[dict], targets: list[torch.Tensor], **shape) -> tuple[dict, torch.Tensor,
                                                                                       torch.Tensor]:
        """`pad_and_stack` of a step's batches (on the device) and labels (on the host, moved in one copy)."""
        inputs, labels, weights = pad_and_stack(batches, targets, self.pad_id, **shape)
        return inputs, to_device(labels, self.device), to_device(weights, self.device)

    @torch.no_grad()
    def _update(self, rates) -> None:
        """Each run's AdamW step on its own slices: torch's fused kernel, as a solo run's optimizer calls it."""
        self.step_count += 1
        for run, weight_decay, params, grads, exp_avg, exp_avg_sq in self.updates:
            found_inf = None if self.scales is None else self.scales.found_inf[run:run + 1]
            torch._fused_adamw_(params, grads, exp_avg, exp_avg_sq, [], [self.step_count[run]] * len(params),
                                lr=rates[run], beta1=0.9, beta2=0.999, weight_decay=weight_decay, eps=1e-8,
                                amsgrad=False, maximize=False, grad_scale=None, found_inf=found_inf)
        if self.scales is not None:  # a skipped step does not count (torch's fused AdamW under a GradScaler)
            self.step_count -= self.scales.found_inf

    def train_epoch(self, epoch: int, after_step: Callable[[], None] | None = None) -> np.ndarray:
        """One epoch of every run, each over its own length-grouped batches (seeded as a solo run seeds them).
        `after_step` runs between steps (a grid's timer pauses there while another process times alone)."""
        self.model.train()
        for module in self.frozen:
            module.eval()  # frozen layers compute what the prefix cache would: no dropout
        orders = [length_grouped_batches(r.lengths, r.config.batch_size, seed=r.config.seed * 1000 + epoch)
                  for r in self.runs]
        loss_sum = torch.zeros(len(self.runs), device=self.device)
        with self.view():
            for step in range(len(orders[0])):
                picks = [order[step] for order in orders]
                batches = [r.batch(i) for r, i in zip(self.runs, picks)]
                targets = [r.labels[i] for r, i in zip(self.runs, picks)]  # on the host: stacked there, then one
                # pinned, queued copy each (`to_device`); a plain copy per run waited for the GPU's queue N times
                if self.captured is None:
                    inputs, labels, weights = self._stack(batches, targets)
                    if self.random is not None:  # where each run's batch, as padded alone, lies in the step's
                        alone = [(len(t), b["attention_mask"].shape[1]) for b, t in zip(batches, targets)]
                        self.random.begin_step(labels.shape[1], inputs["attention_mask"].shape[1], alone)
                    loss_sum += self.step(inputs, labels, weights, self.rates[self.global_step].tolist())
                else:
                    bucket = bucket_for(max(b["attention_mask"].shape[1] for b in batches), self.buckets)
                    inputs, labels, weights = self._stack(batches, targets, rows=self.runs[0].config.batch_size,
                                                          length=bucket)
                    loss_sum += self.captured(bucket, {**inputs, "labels": labels, "weights": weights})
                self.global_step += 1
                if after_step is not None:
                    after_step()
        return (loss_sum / len(orders[0])).cpu().numpy()

    @torch.no_grad()
    def narrowed(self, keep: list[int]) -> StackedRuns:
        """The runs in slots `keep` as a smaller group that goes on where this one stands — their weights, AdamW moments
        and step counts, loss scales and places in their schedules — so that runs which ended (their last epoch, pruned,
        failed) stop costing steps. Called between epochs. This group's tensors are given back before the smaller one is
        built (what carries over waits on the host meanwhile), so the peak stays this group's; a captured step is
        captured again for the new shapes (its counts of replayed steps and capture seconds, and whether a capture
        failed, carry over)."""
        index = torch.tensor(keep, device=self.device)
        carried = [[t.index_select(0, index).cpu() for t in ts] for ts in (self.params, *self.moments)]
        step_count, global_step = self.step_count.index_select(0, index).cpu(), self.global_step
        scales = self.scales.state(index) if self.scales is not None else None
        carried_capture = {key: getattr(self.captured, key) for key in ("replayed", "fell_back", "capture_seconds")} \
            if self.captured is not None else {}
        steps_per_epoch, pad_id, device, settings = self.steps_per_epoch, self.pad_id, self.device, self.settings
        runs = [self.runs[i] for i in keep]
        if self.random is not None:  # each run's dropout state goes on from where it stands
            for i, run in zip(keep, runs):
                run.random = self.random.states[i]
        self.release()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        group = StackedRuns(runs, steps_per_epoch, pad_id, device, **settings)
        for mine, theirs in zip((group.params, *group.moments), carried):
            torch._foreach_copy_(mine, [t.to(device) for t in theirs])
        group.step_count.copy_(step_count)
        if scales is not None:
            group.scales.load(*scales)
        group.global_step = global_step
        if group.captured is not None:
            group.device_rates.start_at(global_step)
            vars(group.captured).update(carried_capture)  # what the group's runs went through so far counts for them
        return group

    def release(self) -> None:
        """Drop every reference to this group's model, state and graphs now (an empty shell is left). A captured step
        holds the group's own `_static_step`, so group and step are a reference cycle, which refcounting alone never
        frees: on a GPU their memory would stay taken until Python's cycle collector happened to run."""
        vars(self).clear()

    def run_weights(self, run: int) -> dict[str, torch.Tensor]:
        """Run `run`'s trainable weights under the solo model's parameter names."""
        return {name: p[run].detach().clone() for name, p in self.model.named_parameters() if p.requires_grad}

