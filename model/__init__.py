"""Bayesian active learning for semantic segmentation: the pure ML library (no Label Studio)."""

from .acquisition import acquire_pixels, names as acquisition_names, score, score_moments, select_pixels
from .augment import SparseAugment
from .checkpoint import load_checkpoint, save_checkpoint
from .contrastive import EmaTeacher, MemoryBank
from .data import CAMVID_CLASSES, CAMVID_VOID, IGNORE_INDEX, SegmentationFolder, load_image, load_label
from .mc_dropout import mc_moments, mc_moments_and_embeddings, mc_samples, predict_probabilities
from .moments import MCMoments, MomentAccumulator, moments_from_samples
from .network import BayesianSegmenter, ModelConfig, build_model
from .regions import RegionProjector, acquire_regions
from .training import TrainConfig, TrainResult, train

__all__ = [
    "BayesianSegmenter",
    "CAMVID_CLASSES",
    "CAMVID_VOID",
    "EmaTeacher",
    "IGNORE_INDEX",
    "MCMoments",
    "MemoryBank",
    "ModelConfig",
    "MomentAccumulator",
    "RegionProjector",
    "SegmentationFolder",
    "SparseAugment",
    "TrainConfig",
    "TrainResult",
    "acquire_pixels",
    "acquire_regions",
    "acquisition_names",
    "build_model",
    "load_checkpoint",
    "load_image",
    "load_label",
    "mc_moments",
    "mc_moments_and_embeddings",
    "mc_samples",
    "moments_from_samples",
    "predict_probabilities",
    "save_checkpoint",
    "score",
    "score_moments",
    "select_pixels",
    "train",
]
