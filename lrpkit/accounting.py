"""The accounting: an observer of the reverse loop that says where the output relevance went.

Per layer it records what the layer absorbed, ``Σ R_out − Σ R_in`` per sample, split into the sinks the rule
reports itself (``record.absorbed``: bias, positional embedding, prefix tokens, ...) and a remainder (the rule's
``traits.remainder``, usually ``stabilizer``). It carries ``Σ R`` per sample from one layer to the next, so each
relevance is summed once. For a proportional split (``traits.split``) the loss is the stabiliser of the split:
``Σ R_out`` minus the totals of the shares handed to the branches (and to the identity of a skip connection).

The loop itself only sums (each relevance once, as it passes) and keeps what the rules report; the subtractions
that split each layer's loss, and the totals per sink, run when the :class:`~lrpkit.explanation.Accounting` is first
read (:meth:`~lrpkit.explanation.Accounting.deferred`), in the same order and with the same values: a caller who
never reads it pays for the sums only.
"""

from __future__ import annotations

import torch

from .explanation import Accounting
from .layers import SkipConnection
from .propagate import per_sample


class AccountingObserver:
    """Watches a :class:`~lrpkit.tape.Tape`'s reverse loops; :meth:`result` gives the :class:`Accounting`."""

    def __init__(self):
        self.absorbed: list[tuple[int, str, dict]] = []
        self._frames: list[dict] = []  # one per running loop: its carried total and its branches' totals

    def loop_started(self, R: torch.Tensor) -> None:
        nested = bool(self._frames)
        # a branch's loop starts from its share, whose total the split needs; the outermost loop sums lazily
        total = per_sample(R) if nested else None
        self._frames.append({"start": total, "total": total, "branches": []})

    def loop_ended(self, R: torch.Tensor) -> None:
        frame = self._frames.pop()
        if self._frames:  # a branch of the container being propagated one level up
            end = frame["total"] if frame["total"] is not None else per_sample(R)
            self._frames[-1]["branches"].append((frame["start"], end))

    def step_passed(self, step, plan, rec, R_out: torch.Tensor, R_in: torch.Tensor) -> None:
        frame = self._frames[-1]
        out_total = frame["total"] if frame["total"] is not None else per_sample(R_out)
        if step.children:
            frame["total"] = self._split(step, plan, rec, out_total, R_in, frame.pop("branches"))
            frame["branches"] = []
            return
        if plan.traits.moves_only:
            self.absorbed.append((step.index, step.name, {}))
            frame["total"] = out_total
            return
        in_total = per_sample(R_in)
        sinks = {k: v.detach() for k, v in rec.absorbed.items()}  # detached now: no graph kept alive until read
        self.absorbed.append((step.index, step.name, (out_total, in_total, sinks, plan.traits.remainder)))
        frame["total"] = in_total

    def _split(self, step, plan, rec, out_total, R_in, branches) -> torch.Tensor | None:
        """A container: the split's stabiliser, or what its rule reports; returns Σ R_in per sample if known."""
        if not plan.traits.split:
            self.absorbed.append((step.index, step.name, dict(rec.absorbed)))
            return None
        if isinstance(step.layer, SkipConnection):  # y = a + f(a): Σ R_in = Σ R_f + Σ a ⊙ s
            (t_f, t_branch), = branches
            in_total = per_sample(R_in)
            shared = t_f + in_total - t_branch  # Σ R_f + Σ a ⊙ s
        else:  # y = Σ_i f_i(a): Σ R_in = Σ_i Σ R_i
            in_total, shared = 0, 0
            for t_share, t_branch in branches:
                in_total, shared = in_total + t_branch, shared + t_share
        self.absorbed.append((step.index, step.name, {**rec.absorbed, "stabilizer": out_total - shared}))
        return in_total

    def result(self, R_out: torch.Tensor, R_in: torch.Tensor) -> Accounting:
        """The :class:`Accounting` of the loops watched, worked out when first read."""
        output, input = per_sample(R_out), per_sample(R_in)
        return Accounting.deferred(lambda: self._account(output, input))

    def _account(self, output: torch.Tensor, input: torch.Tensor) -> Accounting:
        acc = Accounting(output=output, input=input)
        for index, name, parts in sorted(self.absorbed, key=lambda item: item[0]):
            if isinstance(parts, tuple):  # a layer: its loss, less the sinks its rule reports, is the remainder
                parts = _split_loss(*parts)
            acc.layers.append((index, name, parts))
            for key, value in parts.items():
                acc.parts[key] = acc.parts.get(key, 0) + value
        return acc


def _split_loss(out_total: torch.Tensor, in_total: torch.Tensor, sinks: dict, remainder: str) -> dict:
    """``{sink: (B,)}`` of one layer: what its rule reports (``sinks``), and under ``remainder`` the rest of its
    loss ``Σ R_out − Σ R_in``."""
    parts = dict(sinks)
    rest = out_total - in_total
    for value in parts.values():
        rest = rest - value
    parts[remainder] = parts[remainder] + rest if remainder in parts else rest
    return parts


class LayerwiseObserver:
    """The relevance at the input of every top-level layer, in the order of the chain."""

    def __init__(self):
        self.relevances: list[torch.Tensor] = []
        self._depth = 0

    def loop_started(self, R) -> None:
        self._depth += 1

    def loop_ended(self, R) -> None:
        self._depth -= 1

    def step_passed(self, step, plan, rec, R_out, R_in) -> None:
        if self._depth == 1:
            self.relevances.append(R_in)

    def result(self, R_out: torch.Tensor) -> list[torch.Tensor]:
        return self.relevances[::-1] + [R_out]
