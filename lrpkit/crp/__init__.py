"""Concept Relevance Propagation (Achtibat et al. 2023): reference samples of concepts."""

from .data import load_samples  # noqa: F401
from .reference import ReferenceSamples, reference_samples  # noqa: F401
