"""Helpers shared by the subcommands."""

from __future__ import annotations


def torch_threads(n: int | None) -> None:
    """Set the number of torch CPU threads when ``n`` is given."""
    if n:
        import torch

        torch.set_num_threads(n)


def load_model(args, device, num_classes: int | None = None):
    """``(model on device, preprocessing)`` as the commands load ``--model`` / ``--weights``: under ``--seed`` (the
    random weights of a model given without ``--weights``), with a note on stderr when the weights are random."""
    import sys

    import torch

    from .. import zoo

    torch.manual_seed(args.seed)
    model, prep = zoo.load_model(args.model, args.weights, num_classes)
    if args.weights is None and args.model not in zoo.DEMO_MODELS:
        print(f"note: no --weights given: {args.model} has random weights (seed {args.seed}); nothing is "
              f"downloaded", file=sys.stderr)
    return model.to(device), prep
