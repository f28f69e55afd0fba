"""Conservation report: how much of the output relevance reached the input, and where the rest went."""

from __future__ import annotations

import torch

from ..explanation import Explanation


def conservation_report(explanation: Explanation) -> dict[str, torch.Tensor]:
    """Per-sample relevance bookkeeping of an LRP explanation (each value a (B,) tensor).

        output     Σ R at the output
        input      Σ R at the input
        <sink>     relevance absorbed on the way: bias, stabilizer, class_token, distillation_token,
                   register_tokens, positional_embedding, attention (see :class:`lrpkit.Accounting`)
        ratio      input / output (1 for a rule set that conserves, Bach et al. 2015)
        residual   output − input − Σ sinks (0 up to float rounding: the books close)

    It is a report, not a pass/fail: rules such as LRP-ε or AttnLRP's softmax do not conserve by design, and the
    sinks say by how much and where. Raises ``ValueError`` for an explanation without accounting (non-LRP
    methods).
    """
    acc = getattr(explanation, "accounting", None)
    if acc is None:
        raise ValueError(f"conservation_report needs an LRP explanation with an accounting; "
                         f"{explanation.method} explanations have none")
    report = {"output": acc.output, "input": acc.input, **acc.parts}
    report["ratio"] = acc.input / torch.where(acc.output == 0, torch.ones_like(acc.output), acc.output)
    report["residual"] = acc.output - acc.total()
    return report
