"""Diverse region acquisition: UMAP on the memory bank, KMeans over region features (paper 004, sec. 3.3).

Paper 004 (Algorithm 1, steps 2-5 and 15) picks superpixels in two stages, so that the
labeling budget is spread over the feature space instead of piling up on one confusing
class:

1. A region's feature is the mean (teacher) pixel embedding over the superpixel, L2-normalized
   so it lies on the same unit sphere as the memory-bank vectors (``region_embeddings``).
2. A UMAP fitted on the memory-bank vectors (embeddings of correctly predicted pixels, per
   class) maps region features to a low-dimensional space that follows the classes
   (``RegionProjector``).
3. KMeans with k = the region budget clusters the candidate regions' coordinates; from each
   cluster the region with the largest summed pixel entropy (eq. 6,
   ``model.superpixels.region_sums``) is chosen (``select_diverse_regions``). Regions already
   (mostly) labeled are never candidates.

``acquire_regions`` runs the whole per-image pipeline. Everything is seeded: the same inputs
and seed give the same regions.

Keeping UMAP out of the request path. UMAP's first fit in a process compiles numba code for
tens of seconds, and its first ``transform`` compiles the nearest-neighbor search again. So
the projector is fitted once after each training round, saved next to the model checkpoint
(``save``), loaded by the server (``load``) and warmed up (``warm_up``) before the first
request; a request only calls ``transform``. Numba keeps some compiled functions in an
on-disk cache (``__pycache__`` of umap/pynndescent, or ``$NUMBA_CACHE_DIR``), so a later
process pays less than the first ever. The persisted file is a pickle (a UMAP object cannot
be stored any other way): like any pickle, load only files this code wrote, never uploads.

Measured on the 2-core CPU development machine (torch 2.13, umap-learn 0.5.12, numba 0.68.1),
each in a fresh process; "cold" = empty numba cache (a new ``NUMBA_CACHE_DIR``), "cached" =
the cache filled by an earlier process:

- ``import umap``: 15-17 s cold, 2.5 s cached.
- ``RegionProjector.fit`` on 11 classes x 1000 = 11000 unit vectors of dim 128 (clustered
  around 11 centers), 2 components: 46-49 s cold, 36-38 s cached, 4.7 s for a second fit in
  the same process: nearly all of it is compilation, not all of which numba can cache. The
  layout runs on one thread (a fixed ``random_state`` makes UMAP single-threaded; that is
  what makes it reproducible: the same seed gave bit-identical projections in two processes).
- Saved projector for those 11000 vectors: 18 MB (the vectors, the neighbor graph and the
  nearest-neighbor index). In the server: ``load`` 21-24 s cold / 2-4 s cached (mostly
  ``import umap``), then ``warm_up`` 4.5-6.6 s cached or not (the search function is built
  per index, so numba cannot cache it).
- ``transform`` of 300 region features: 0.1-0.2 s once warm. The first call pays the
  compilation above (in the process that just fitted, cold: 55-66 s; cached: 1.2 s).
- ``region_embeddings`` on a 128 x 360 x 480 map with 300 SEEDS segments: 35-75 ms.
- ``select_diverse_regions`` over 300 regions, k = 10: 8 ms (35 ms the first call).
"""

from __future__ import annotations

import pickle
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .files import atomic_write
from .network import grid_sample_coordinates
from .superpixels import labeled_fraction, region_sums

PROJECTOR_FORMAT = "segal-region-projector"
PROJECTOR_FORMAT_VERSION = 1
MIN_FIT_VECTORS = 10  # UMAP needs a neighborhood graph; fewer vectors than this give no useful map
KMEANS_N_INIT = 4
WARM_UP_VECTORS = 8


ROWS_PER_CHUNK = 64  # image rows upsampled at a time: 128 x 64 x 1024 floats = 32 MiB at most


def region_embeddings(
    embeddings: torch.Tensor, segments: np.ndarray, grid_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Mean embedding per superpixel, L2-normalized: ``[P, h, w]`` and segments ``[H, W]`` -> ``[K, P]`` float32.

    `segments` holds ids 0..K-1 (``model.superpixels.seeds_superpixels``). The embedding map
    may be at a lower resolution (the decoder's): it then covers the image grid `grid_size`
    ``(H', W') >= (H, W)`` (the image padded to the network's stride,
    ``BayesianSegmenter.padded_size``), and is bilinearly upsampled exactly as
    ``BayesianSegmenter.upsample`` does, a chunk of image rows at a time, so the full-size
    ``[P, H, W]`` map (400 MB for a 1024x768 image) never exists. Without `grid_size` the map
    must have the segments' size.

    The sums are ``index_add_`` on the embeddings' device. A region without pixels
    (impossible with compact SEEDS ids) gets a zero row. The mean is normalized because the
    memory-bank vectors the projector was fitted on are unit vectors, and a mean of unit
    vectors is shorter than one.
    """
    if embeddings.ndim != 3:
        raise ValueError(f"Expected an embedding map [P, h, w], got shape {tuple(embeddings.shape)}.")
    segments = np.asarray(segments)
    if segments.ndim != 2:
        raise ValueError(f"Expected segments [H, W], got shape {segments.shape}.")
    if grid_size is None:
        if segments.shape != tuple(embeddings.shape[1:]):
            raise ValueError(
                f"Embedding map {tuple(embeddings.shape)} and segments {segments.shape} differ in size: pass "
                "grid_size, the (H, W) image grid the map covers, or compute superpixels at the map's resolution."
            )
    elif grid_size[0] < segments.shape[0] or grid_size[1] < segments.shape[1]:
        raise ValueError(f"grid_size {tuple(grid_size)} is smaller than the segments {segments.shape}.")
    if not np.issubdtype(segments.dtype, np.integer):
        raise ValueError(f"Segments must hold integer region ids, got dtype {segments.dtype}.")
    if segments.size == 0:
        return np.zeros((0, embeddings.shape[0]), dtype=np.float32)
    if segments.min() < 0:
        raise ValueError("Segments must hold region ids >= 0 (as seeds_superpixels returns).")
    dim, count = embeddings.shape[0], int(segments.max()) + 1
    device = embeddings.device
    maps = embeddings.detach().to(torch.float32)
    index = torch.from_numpy(segments.astype(np.int64, copy=False)).to(device)  # [H, W]
    sums = torch.zeros(dim, count, dtype=torch.float32, device=device)  # [P, K]
    height, width = segments.shape
    if grid_size is None:
        sums.index_add_(1, index.reshape(-1), maps.reshape(dim, -1))
    else:
        grid_h, grid_w = grid_size
        xs = grid_sample_coordinates(torch.arange(width, device=device, dtype=torch.float32), grid_w)  # [W]
        for top in range(0, height, ROWS_PER_CHUNK):
            rows = torch.arange(top, min(top + ROWS_PER_CHUNK, height), device=device, dtype=torch.float32)
            ys = grid_sample_coordinates(rows, grid_h)  # [r]
            grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)  # [r, W, 2] (x, y)
            block = F.grid_sample(
                maps[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False
            )  # [1, P, r, W]
            sums.index_add_(1, index[top : top + len(rows)].reshape(-1), block[0].reshape(dim, -1))
    sizes = torch.bincount(index.reshape(-1), minlength=count).clamp_(min=1).to(torch.float32)  # [K]
    means = (sums / sizes).T  # [K, P]
    return F.normalize(means, dim=1).cpu().numpy().astype(np.float32, copy=False)


class RegionProjector:
    """UMAP fitted on memory-bank vectors; maps region features into its space.

    Build it with ``fit`` (after training) or ``load`` (in the server), never directly.
    ``transform`` is serialized by a lock: the UMAP nearest-neighbor index initializes its
    search structures lazily on the first query, which is not safe to race.
    """

    def __init__(self, umap_model: Any, metadata: dict[str, Any]):
        self._umap = umap_model
        self.metadata = dict(metadata)
        self.num_vectors: int = int(metadata["num_vectors"])
        self.dim: int = int(metadata["dim"])
        self.n_components: int = int(metadata["n_components"])
        self.n_neighbors: int = int(metadata["n_neighbors"])
        self.min_dist: float = float(metadata["min_dist"])
        self.seed: int = int(metadata["seed"])
        self.fit_seconds: float = float(metadata["fit_seconds"])
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"RegionProjector(num_vectors={self.num_vectors}, dim={self.dim}, n_components={self.n_components}, "
            f"n_neighbors={self.n_neighbors}, seed={self.seed}, fit_seconds={self.fit_seconds:.1f})"
        )

    @classmethod
    def fit(
        cls,
        vectors: np.ndarray,
        *,
        n_components: int = 2,
        n_neighbors: int = 15,
        min_dist: float = 0.1,
        seed: int = 0,
    ) -> RegionProjector:
        """Fit UMAP on `vectors` ``[N, P]`` (memory-bank embeddings); reproducible for a given seed.

        `n_neighbors` is clamped to N - 1. Slow (see the module docstring): call it after
        training, not while serving.
        """
        vectors = _as_matrix(vectors, "vectors")
        count, dim = vectors.shape
        if count < MIN_FIT_VECTORS:
            raise ValueError(
                f"Fitting the region projector needs at least {MIN_FIT_VECTORS} vectors, got {count}: "
                "fill the memory bank (train longer or on more labeled pixels) before fitting."
            )
        if n_components < 1 or n_components >= count:
            raise ValueError(f"n_components must be in 1..{count - 1} for {count} vectors, got {n_components}.")
        if n_neighbors < 2:
            raise ValueError(f"n_neighbors must be >= 2, got {n_neighbors}.")
        neighbors = min(int(n_neighbors), count - 1)
        umap = _import_umap()

        # n_jobs=1 explicitly: a random_state forces one thread anyway, and UMAP warns when it
        # overrides any other n_jobs.
        model = umap.UMAP(
            n_components=n_components,
            n_neighbors=neighbors,
            min_dist=min_dist,
            random_state=seed,
            n_jobs=1,
            # the nearest-neighbor index even for small banks: below 4096 vectors UMAP would
            # otherwise transform by brute-force distances through a Python-level metric call
            # per pair (1.3 s for 300 regions against 4000 vectors, against 0.1-0.2 s)
            force_approximation_algorithm=True,
        )
        start = time.perf_counter()
        model.fit(vectors)
        seconds = time.perf_counter() - start
        metadata = {
            "num_vectors": count,
            "dim": dim,
            "n_components": n_components,
            "n_neighbors": neighbors,
            "min_dist": float(min_dist),
            "seed": int(seed),
            "fit_seconds": seconds,
            "umap_version": umap.__version__,
        }
        return cls(model, metadata)

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Region features ``[K, P]`` -> coordinates ``[K, n_components]`` float32 (deterministic)."""
        vectors = _as_matrix(vectors, "vectors")
        if vectors.shape[1] != self.dim:
            raise ValueError(
                f"The projector was fitted on {self.dim}-dimensional vectors, got {vectors.shape[1]}: use the "
                "embeddings of the model the projector was fitted with, or refit the projector."
            )
        if len(vectors) == 0:
            return np.zeros((0, self.n_components), dtype=np.float32)
        with self._lock:
            coordinates = self._umap.transform(vectors)
        return np.asarray(coordinates, dtype=np.float32)

    def save(self, path: str | Path) -> Path:
        """Atomically write the projector to `path` (parent folders are created)."""
        payload = {
            "format": PROJECTOR_FORMAT,
            "version": PROJECTOR_FORMAT_VERSION,
            "metadata": self.metadata,
            "umap": self._umap,
        }
        return atomic_write(Path(path), lambda file: pickle.dump(payload, file, protocol=pickle.HIGHEST_PROTOCOL))

    @classmethod
    def load(cls, path: str | Path) -> RegionProjector:
        """Read a projector written by ``save``. Trusted files only: this unpickles."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No region projector at {path}: fit one after training (RegionProjector.fit(...).save(path))."
            )
        umap = _import_umap()  # the pickle references umap and pynndescent classes

        try:
            with path.open("rb") as file:
                payload = pickle.load(file)
        except Exception as error:  # a truncated or foreign pickle can raise almost anything
            raise ValueError(
                f"{path} is not a readable region projector ({type(error).__name__}: {error}); "
                "refit it with RegionProjector.fit and save it again."
            ) from error
        if not isinstance(payload, dict) or payload.get("format") != PROJECTOR_FORMAT:
            raise ValueError(f"{path} is not a region projector file (no '{PROJECTOR_FORMAT}' format tag).")
        if payload.get("version") != PROJECTOR_FORMAT_VERSION:
            raise ValueError(
                f"{path} has region projector format version {payload.get('version')!r}; this code reads "
                f"version {PROJECTOR_FORMAT_VERSION}: refit the projector."
            )
        model, metadata = payload.get("umap"), payload.get("metadata")
        if not isinstance(model, umap.UMAP) or not isinstance(metadata, dict):
            # a bad file, not a bad argument: ValueError like every other unreadable-file case
            raise ValueError(f"{path} is a damaged region projector file (no UMAP model or metadata).")  # noqa: TRY004
        try:
            return cls(model, metadata)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} has incomplete projector metadata ({error}): refit it.") from error

    def warm_up(self) -> None:
        """One tiny transform, so numba compiles before the first real request.

        After ``load`` the first ``transform`` costs 4.5-6.6 s on 2 cores (the per-index search
        function cannot be cached); later ones about 0.1-0.2 s per 300 regions. Call it where
        the server loads the projector, not in a request.
        """
        rng = np.random.default_rng(0)
        sample = rng.standard_normal((WARM_UP_VECTORS, self.dim)).astype(np.float32)
        sample /= np.linalg.norm(sample, axis=1, keepdims=True)
        self.transform(sample)


def select_diverse_regions(
    coordinates: np.ndarray,
    informativeness: np.ndarray,
    k: int,
    candidates: np.ndarray | None = None,
    seed: int = 0,
) -> list[int]:
    """One region per KMeans cluster of the candidates' coordinates, the most informative of each; best first.

    `coordinates` ``[K, d]`` (projector output), `informativeness` ``[K]`` (e.g. summed
    entropy; NaN counts as least informative), `candidates` ``[K]`` bool (False = excluded,
    e.g. already labeled). KMeans uses min(k, #candidates) clusters, ``n_init`` =
    ``KMEANS_N_INIT`` and ``random_state=seed``.

    Candidates at identical coordinates are clustered once (weighted by their count), so
    KMeans never sees fewer distinct points than clusters. When there are fewer distinct
    points than k, or a cluster comes out empty, the remaining slots go to the most
    informative candidates not chosen yet: the result always holds min(k, #candidates)
    regions, never an excluded one.
    """
    coordinates = np.asarray(coordinates, dtype=np.float64)
    if coordinates.ndim == 1:
        coordinates = coordinates[:, None]
    if coordinates.ndim != 2:
        raise ValueError(f"Expected coordinates [K, d], got shape {coordinates.shape}.")
    count = len(coordinates)
    scores = np.asarray(informativeness, dtype=np.float64).reshape(-1)
    if scores.shape != (count,):
        raise ValueError(f"Got {scores.size} informativeness values for {count} regions.")
    scores = np.where(np.isnan(scores), -np.inf, scores)
    mask = np.ones(count, dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool).reshape(-1)
    if mask.shape != (count,):
        raise ValueError(f"Got {mask.size} candidate flags for {count} regions.")
    pool = np.flatnonzero(mask)  # candidate region ids, ascending
    if k <= 0 or len(pool) == 0:
        return []
    # best first; ties by region id (stable sort over ascending ids)
    ranked = pool[np.argsort(-scores[pool], kind="stable")]
    if len(pool) <= k:
        return ranked.tolist()
    points = coordinates[pool]
    if not np.isfinite(points).all():
        raise ValueError("Region coordinates contain NaN or inf: check the embeddings and the projector.")
    distinct, inverse, multiplicity = np.unique(points, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    clusters = min(k, len(distinct))
    if clusters == len(distinct):
        labels = inverse  # every distinct point is its own cluster
    elif clusters == 1:
        labels = np.zeros(len(pool), dtype=np.int64)
    else:
        labels = _kmeans_labels(distinct, multiplicity, clusters, seed)[inverse]
    chosen: list[int] = []
    for cluster in range(clusters):
        members = pool[labels == cluster]
        if len(members):
            chosen.append(int(members[np.argmax(scores[members])]))  # first (lowest id) on ties
    if len(chosen) < k:
        taken = set(chosen)
        chosen += [int(region) for region in ranked if int(region) not in taken][: k - len(chosen)]
    chosen.sort(key=lambda region: (-scores[region], region))
    return chosen


def _kmeans_labels(points: np.ndarray, weights: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """KMeans cluster ids ``[M]`` of distinct `points` ``[M, d]`` weighted by their multiplicity."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    kmeans = KMeans(n_clusters=clusters, n_init=KMEANS_N_INIT, random_state=seed)
    # One OpenMP thread: a few hundred points are far too few to share out, and with torch's
    # and scikit-learn's two libgomp copies (plus numba) loaded, the threads' hand-offs made one
    # call take 0.7 s instead of 8 ms on 2 cores. omp_set_num_threads acts on the calling
    # thread only, so other threads (torch inference) keep their setting.
    with threadpool_limits(limits=1, user_api="openmp"), warnings.catch_warnings():
        # points are distinct, but nearly coincident ones can still leave a cluster empty;
        # select_diverse_regions fills such a slot itself
        warnings.simplefilter("ignore", ConvergenceWarning)
        return kmeans.fit_predict(points, sample_weight=weights.astype(np.float64))


def acquire_regions(
    projector: RegionProjector,
    embeddings: torch.Tensor,
    pixel_scores: torch.Tensor | np.ndarray,
    segments: np.ndarray,
    k: int,
    labeled: np.ndarray | None = None,
    max_labeled_fraction: float = 0.5,
    seed: int = 0,
    grid_size: tuple[int, int] | None = None,
) -> tuple[list[int], np.ndarray]:
    """Paper 004's region choice for one image: (region ids best first, informativeness ``[K]`` of all regions).

    `embeddings` ``[P, H, W]`` (teacher pixel embeddings; or ``[P, h, w]`` at the decoder's
    resolution covering the image grid `grid_size`, see ``region_embeddings``),
    `pixel_scores` ``[H, W]`` (entropy
    or BalEnt), `segments` ``[H, W]`` ids 0..K-1, `labeled` ``[H, W]`` bool. A region more than
    `max_labeled_fraction` labeled is excluded (the rule of ``model.superpixels.top_regions``).
    Only candidate regions are projected, and only when there are more of them than k.
    """
    segments = np.asarray(segments)
    informativeness = region_sums(pixel_scores, segments)  # [K] eq. 6
    count = len(informativeness)
    if labeled is None:
        candidates = np.ones(count, dtype=bool)
    else:
        labeled = np.asarray(labeled, dtype=bool)
        if labeled.shape != segments.shape:
            raise ValueError(f"Labeled mask {labeled.shape} and segments {segments.shape} differ in shape.")
        candidates = labeled_fraction(segments, labeled) <= max_labeled_fraction
    pool = np.flatnonzero(candidates)
    coordinates = np.zeros((count, projector.n_components), dtype=np.float32)  # [K, d]
    if len(pool) > k > 0:  # otherwise every candidate (or none) is taken: no clustering needed
        features = region_embeddings(embeddings, segments, grid_size)  # [K, P]
        if len(features) != count:
            raise ValueError(f"Got {len(features)} region features for {count} regions.")  # cannot happen; guard
        coordinates[pool] = projector.transform(features[pool])
    return select_diverse_regions(coordinates, informativeness, k, candidates, seed), informativeness


def _import_umap() -> Any:
    """``import umap``, lazily: it takes seconds (numba), and only fitting and loading need it.

    Without TensorFlow umap warns that ParametricUMAP is unavailable (an ImportWarning, hidden
    by default but shown under ``-W default``); this module never uses ParametricUMAP.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Tensorflow not installed", category=ImportWarning)
        import umap
    return umap


def _as_matrix(vectors: np.ndarray, name: str) -> np.ndarray:
    """``[N, P]`` finite float32, or a ValueError saying what is wrong."""
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().cpu().numpy()
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"Expected {name} as a matrix [N, P], got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or inf: check the embeddings (a diverged model gives NaN).")
    return array
