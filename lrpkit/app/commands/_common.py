"""Helpers shared by the subcommands."""

from __future__ import annotations


def torch_threads(n: int | None) -> None:
    """Set the number of torch CPU threads when ``n`` is given."""
    if n:
        import torch

        torch.set_num_threads(n)
