"""Concept Relevance Propagation (Achtibat et al. 2023, "From attribution maps to human-understandable explanations
through Concept Relevance Propagation", Nature Machine Intelligence): which channels of a layer a decision used,
and where in the input each of them found its evidence; and what each concept looks like (its reference samples).

``lrpkit.CRP(lrp, layer, concepts)`` (:class:`CRP`) with :class:`TopConcepts` or :class:`IndexedConcepts`; the
result is a :class:`ConceptExplanation`. :func:`reference_samples` scans a dataset for each concept's most relevant
(or most activating) samples. See docs/crp.md and docs/crp_reference.md.
"""

from .analyzer import CRP
from .concepts import Concepts, IndexedConcepts, TopConcepts
from .data import load_samples
from .explanation import ConceptExplanation
from .reference import ReferenceSamples, reference_samples

__all__ = ["CRP", "Concepts", "TopConcepts", "IndexedConcepts", "ConceptExplanation", "reference_samples",
           "ReferenceSamples", "load_samples"]
