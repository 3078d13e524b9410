"""Bayesian active learning for semantic segmentation: the pure ML library (no Label Studio)."""

from .acquisition import acquire_pixels, names as acquisition_names, score, score_moments, select_pixels
from .mc_dropout import mc_moments, mc_samples, predict_probabilities
from .moments import MCMoments, MomentAccumulator, moments_from_samples
from .network import BayesianSegmenter, ModelConfig, build_model

__all__ = [
    "BayesianSegmenter",
    "MCMoments",
    "ModelConfig",
    "MomentAccumulator",
    "acquire_pixels",
    "acquisition_names",
    "build_model",
    "mc_moments",
    "mc_samples",
    "moments_from_samples",
    "predict_probabilities",
    "score",
    "score_moments",
    "select_pixels",
]
