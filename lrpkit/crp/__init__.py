"""Concept Relevance Propagation (Achtibat et al. 2023, "From attribution maps to human-understandable explanations
through Concept Relevance Propagation", Nature Machine Intelligence): which channels of a layer a decision used,
and where in the input each of them found its evidence.

``lrpkit.CRP(lrp, layer, concepts)`` (:class:`CRP`) with :class:`TopConcepts` or :class:`IndexedConcepts`; the
result is a :class:`ConceptExplanation`. See docs/crp.md.
"""

from .analyzer import CRP
from .concepts import Concepts, IndexedConcepts, TopConcepts
from .explanation import ConceptExplanation

__all__ = ["CRP", "Concepts", "TopConcepts", "IndexedConcepts", "ConceptExplanation"]
