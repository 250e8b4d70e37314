"""A clean/corrupted pair prepared for edge-level work: the graph, what every sender writes in both runs,
and exact evaluation of any set of kept edges.

Exact verification follows Hanna et al.'s circuit evaluation (as in MIB): the clean input runs with
every edge outside the circuit patched from the corrupted run (``ablation="patch"``) or from the mean
over the corrupted batch (``ablation="mean"``, per position); the circuit's edges keep the clean run's
values. Both runs carry their image: corruptions are :mod:`mm_lens.analysis.corruptions` inputs, or
hooks at ``hook_embed`` (``clean_hooks``/``corrupted_hooks``). On DeepStack models (Qwen3-VL) each run's
``blocks.{l}.hook_visual_in`` is a sender of its own (``visual_in{l}``, :mod:`mm_lens.circuits.graph`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import torch
from torch import Tensor

from mm_lens.circuits.forward import EdgeRun, SenderOutputs, metric_value, sender_outputs
from mm_lens.circuits.graph import Graph
from mm_lens.circuits.groups import PositionsSpec, position_groups
from mm_lens.inputs import MultimodalInput

ABLATIONS = ("patch", "mean")


@dataclass
class Runs:
    """The clean run, the corrupted (or mean) sender outputs and the graph; ``metric(logits [batch, 1, vocab])``."""

    model: object
    graph: Graph
    clean: MultimodalInput
    metric: Callable
    clean_acts: SenderOutputs
    corrupted_acts: SenderOutputs
    clean_metric: Tensor  # [batch]
    corrupted_metric: Tensor  # [batch]: the corrupted run's own metric (ablation="patch")
    ablation: str = "patch"
    corrupted_input: Optional[MultimodalInput] = None

    @torch.no_grad()
    def evaluate(self, keep: Tensor) -> Tensor:
        """The metric per example when only the edges ``keep`` (bool over :attr:`Graph.edges`) keep their
        clean values and every other edge is patched."""
        keep = torch.as_tensor(keep, dtype=torch.bool)
        if keep.shape != (self.graph.n_edges,):
            raise ValueError(f"keep must be a bool vector over the graph's {self.graph.n_edges} edges, "
                             f"got shape {tuple(keep.shape)}")
        patch = self.graph.unflatten((~keep).to(self.model.cfg.dtype))
        patch = [p.to(self.model.cfg.device) for p in patch]
        run = EdgeRun(self.model, self.graph, self.clean, self.corrupted_acts, patch)
        return metric_value(self.metric, run.run(self.clean_acts.embed, self.clean_acts.visual)).detach().float()

    @cached_property
    def empty_metric(self) -> Tensor:
        """The metric with every edge patched (``m(empty circuit)``; the corrupted run's metric with
        ``ablation="patch"``)."""
        return self.evaluate(torch.zeros(self.graph.n_edges, dtype=torch.bool))

    def faithfulness(self, keep: Tensor, value: Optional[Tensor] = None) -> float:
        """MIB's faithfulness ``(m(C) - m(empty)) / (m(full) - m(empty))`` on the batch means."""
        value = self.evaluate(keep) if value is None else value
        full, empty = float(self.clean_metric.mean()), float(self.empty_metric.mean())
        if full == empty:
            raise ValueError(f"the full model and the empty circuit give the same metric ({full:.4g}): the "
                             "corruption does not change the metric, so faithfulness is undefined")
        return (float(value.mean()) - empty) / (full - empty)


def _check_hooks(hooks, which: str) -> list:
    hooks = [] if hooks is None else ([hooks] if isinstance(hooks, tuple) and isinstance(hooks[0], str) else list(hooks))
    late = [n for n, _ in hooks if not (n == "hook_embed" or n.startswith("vision_"))]
    if late:
        raise ValueError(f"{which} act at {late}: circuit discovery starts at hook_embed, so a run's own hooks must act "
                         "at hook_embed or in the vision tower (e.g. corruptions.embedding_noise_hook)")
    return hooks


@torch.no_grad()
def prepare(model, clean: MultimodalInput, corrupted: MultimodalInput, metric: Callable,
            positions: PositionsSpec = None, patches: bool = False, ablation: str = "patch",
            clean_hooks=None, corrupted_hooks=None) -> Runs:
    """The runs of a clean/corrupted pair (see the module docstring); ``positions``/``patches`` as
    :func:`~mm_lens.circuits.groups.position_groups`."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    if ablation == "patch" and clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} must have the same shape "
                         "(positions must line up)")
    if ablation == "mean" and clean.shape[1] != corrupted.shape[1]:
        raise ValueError(f"mean ablation averages the corrupted batch per position: it needs {clean.shape[1]} "
                         f"positions, got {corrupted.shape[1]}")
    clean_hooks, corrupted_hooks = _check_hooks(clean_hooks, "clean_hooks"), _check_hooks(corrupted_hooks,
                                                                                         "corrupted_hooks")
    graph = Graph(model.cfg, position_groups(model, clean, positions, patches), getattr(model, "n_deepstack", 0))
    clean_logits, clean_acts = sender_outputs(model, clean, clean_hooks)
    corrupted_logits, corrupted_acts = sender_outputs(model, corrupted, corrupted_hooks)
    if ablation == "mean":
        corrupted_acts = corrupted_acts.mean()
    return Runs(model, graph, clean, metric, clean_acts, corrupted_acts,
                metric_value(metric, clean_logits).float(), metric_value(metric, corrupted_logits).float(), ablation,
                corrupted)
