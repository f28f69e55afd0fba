"""Metrics that judge explanations: faithfulness by perturbation, localisation against a ground-truth mask,
and the randomisation sanity check. Plain batched functions on tensors; results are tensors on the input's device.
"""

from .chefer import CHEFER_FRACTIONS, CheferCurve, chefer_perturbation
from .conservation import conservation_report
from .correlation import rankdata, spearman
from .deletion import DeletionInsertion, deletion_insertion
from .localization import pointing_game, relevance_mass_accuracy, relevance_rank_accuracy
from .perturbation import PerturbationCurves, perturbation_curves
from .randomization import RandomizationResult, model_randomization, parameterized_layers
from .runner import EvaluationResult, run_evaluation

__all__ = [
    "CHEFER_FRACTIONS",
    "CheferCurve",
    "DeletionInsertion",
    "EvaluationResult",
    "PerturbationCurves",
    "RandomizationResult",
    "chefer_perturbation",
    "conservation_report",
    "deletion_insertion",
    "model_randomization",
    "parameterized_layers",
    "perturbation_curves",
    "pointing_game",
    "rankdata",
    "run_evaluation",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "spearman",
]
