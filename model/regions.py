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
tens of seconds, and numba caches only part of it on disk. So the projector is fitted once
after each training round, with the compilation paid ahead by ``warm_up_umap`` (the server
runs it at start-up), and saved next to the model checkpoint as plain arrays (``save``, an
``.npz``: the fitted vectors and their coordinates). The server loads it without importing
UMAP, and a request's ``transform`` places region features by their nearest fitted vectors,
as UMAP's transform initializes them (``RegionProjector``).

Measured on the 2-core CPU development machine (torch 2.13, umap-learn 0.5.12, numba 0.68.1),
each in a fresh process:

- ``import umap``: 15-17 s with an empty numba cache, 2.5-9 s cached.
- ``RegionProjector.fit`` on 11 classes x 1000 = 11000 unit vectors of dim 128: 46-60 s as
  a process's first fit (nearly all compilation), 4-7 s once ``warm_up_umap`` ran (which costs
  45-50 s itself). The layout runs on one thread (a fixed ``random_state`` makes UMAP
  single-threaded; that is what makes it reproducible).
- ``transform`` of 300 region features against 11000 vectors: 5-50 ms (the upper end on a
  loaded machine); UMAP's own transform took 100-250 ms and compiled for 5 s per projector.
- Saved projector for 11000 vectors: 5.7 MB.
- ``region_embeddings`` on a 128 x 360 x 480 map with 300 SEEDS segments: 35-75 ms.
- ``select_diverse_regions`` over 300 regions, k = 10: 8 ms (35 ms the first call).
"""

from __future__ import annotations

import functools
import json
import math
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
from .network import bilinear_taps, grid_sample_coordinates
from .superpixels import labeled_fraction, region_sums

PROJECTOR_FORMAT = "segal-region-projector"
PROJECTOR_FORMAT_VERSION = 2  # 1: a pickled UMAP object
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
    cells = maps.shape[1] * maps.shape[2]
    if grid_size is not None and count * cells <= MAX_REGION_CELL_WEIGHTS:
        sums = _sums_through_cell_weights(maps, index, count, grid_size)
    elif grid_size is None:
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


# regions x decoder cells of the weight matrix below (float64): 8M = 64 MB; a 480x360 image
# with 300 regions needs 3.3M, larger images take the chunked upsampling instead
MAX_REGION_CELL_WEIGHTS = 8_000_000


def _sums_through_cell_weights(
    maps: torch.Tensor, index: torch.Tensor, count: int, grid_size: tuple[int, int]
) -> torch.Tensor:
    """Per-region sums ``[P, K]`` of the bilinearly upsampled `maps` ``[P, h, w]``, without
    upsampling them: each pixel's value is a weighted sum of 4 decoder cells, so a region's sum
    is (its pixels' cell weights, summed: ``[K, h * w]``) @ the map. The weights depend on the
    segments alone; 128 channels times every pixel (the chunked path) never exist."""
    dim, cells_h, cells_w = maps.shape
    height, width = index.shape
    rows0, rows1, row_frac = bilinear_taps(torch.arange(height, device=index.device), grid_size[0], cells_h)  # [H]
    cols0, cols1, col_frac = bilinear_taps(torch.arange(width, device=index.device), grid_size[1], cells_w)  # [W]
    region = index.reshape(-1) * (cells_h * cells_w)  # [H * W] offset of each pixel's region row
    keys, weights = [], []
    for rows, row_weight in ((rows0, 1.0 - row_frac), (rows1, row_frac)):
        for cols, col_weight in ((cols0, 1.0 - col_frac), (cols1, col_frac)):
            keys.append(region + (rows[:, None] * cells_w + cols[None, :]).reshape(-1))
            weights.append((row_weight[:, None] * col_weight[None, :]).reshape(-1).to(torch.float32))
    # float32 weights give float32 sums: the [K, h * w] matrix is never built in float64
    cell_weights = torch.bincount(torch.cat(keys), torch.cat(weights), minlength=count * cells_h * cells_w)
    cell_weights = cell_weights.view(count, cells_h * cells_w)  # [K, h * w] float32
    return maps.reshape(dim, -1) @ cell_weights.T  # [P, K]


class RegionProjector:
    """UMAP fitted on memory-bank vectors; places region features in its space.

    Build it with ``fit`` (after training) or ``load`` (in the server), never directly.

    ``fit`` runs UMAP (paper 004) and keeps what the placement needs: the fitted vectors
    ``[N, P]`` and their UMAP coordinates ``[N, d]``. ``transform`` places a new vector where
    UMAP's own ``transform`` starts it, at the mean of its ``n_neighbors`` nearest fitted
    vectors' coordinates weighted by UMAP's fuzzy memberships exp(-(d_j - rho) / sigma) (rho:
    the distance to the nearest, sigma: so the weights sum to log2(n_neighbors)), without
    UMAP's refinement epochs, which only fine-tune positions inside a neighbourhood that
    KMeans over a few clusters does not resolve. That makes a request's transform a matrix
    product and a top-k (about 5 ms for 300 regions against 11000 vectors, against
    100-250 ms through UMAP, whose search also compiled for 5 s per loaded projector), and
    the saved file plain arrays (``.npz``, no pickle) that the server loads without
    importing UMAP.
    """

    def __init__(self, reference: np.ndarray, coordinates: np.ndarray, metadata: dict[str, Any]):
        self.reference = np.ascontiguousarray(reference, dtype=np.float32)  # [N, P] unit vectors
        self.coordinates = np.ascontiguousarray(coordinates, dtype=np.float32)  # [N, d]
        self.metadata = dict(metadata)
        self.num_vectors: int = int(metadata["num_vectors"])
        self.dim: int = int(metadata["dim"])
        self.n_components: int = int(metadata["n_components"])
        self.n_neighbors: int = int(metadata["n_neighbors"])
        self.min_dist: float = float(metadata["min_dist"])
        self.seed: int = int(metadata["seed"])
        self.fit_seconds: float = float(metadata["fit_seconds"])
        if self.reference.shape != (self.num_vectors, self.dim) or self.coordinates.shape != (
            self.num_vectors, self.n_components
        ):
            raise ValueError(
                f"reference {self.reference.shape} and coordinates {self.coordinates.shape} do not match the "
                f"metadata ({self.num_vectors} vectors, dim {self.dim}, {self.n_components} components)."
            )

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
        layout_epochs: int | None = None,
    ) -> RegionProjector:
        """Fit UMAP on `vectors` ``[N, P]`` (memory-bank embeddings); reproducible for a given seed.

        `layout_epochs`: UMAP's ``n_epochs``, the optimisation of the layout, which is most of a
        fit (single-threaded: the seed fixes it); None: UMAP's own, 200 above 10000 vectors and
        500 below.

        `n_neighbors` is clamped to N - 1. The first fit in a process compiles numba code for
        tens of seconds (``warm_up_umap`` pays that ahead); call it after training, not while serving.
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
        if layout_epochs is not None and layout_epochs < 1:
            raise ValueError(f"layout_epochs must be >= 1 (or None for UMAP's default), got {layout_epochs}.")
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
            # the same nearest-neighbour code at every size (below 4096 vectors UMAP would switch
            # to exact distances), so the start-up warm-up on a few vectors compiles what a real fit runs
            force_approximation_algorithm=True,
            n_epochs=layout_epochs,
        )
        start = time.perf_counter()
        coordinates = model.fit_transform(vectors)  # [N, d]
        seconds = time.perf_counter() - start
        metadata = {
            "num_vectors": count,
            "dim": dim,
            "n_components": n_components,
            "n_neighbors": neighbors,
            "min_dist": float(min_dist),
            "seed": int(seed),
            "layout_epochs": layout_epochs,
            "fit_seconds": seconds,
            "umap_version": umap.__version__,
        }
        return cls(_unit_rows(vectors), coordinates, metadata)

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
        # numpy, not torch, for the small element-wise steps, where an OpenMP team's hand-offs on
        # a busy 2-core machine turned 2 ms into a second; torch for the top-k, a single large
        # step (2 ms for 300 regions against 7000 vectors, where numpy's argpartition took 7-20)
        similarity = _unit_rows(vectors) @ self.reference.T  # [K, N]
        k = self.n_neighbors
        nearest = torch.topk(torch.from_numpy(similarity), k, dim=1).indices.numpy()  # [K, k]
        nearest_similarity = np.take_along_axis(similarity, nearest, axis=1)
        # unit vectors: euclidean distance^2 = 2 - 2 cos
        distances = np.sqrt(np.clip(2.0 - 2.0 * nearest_similarity.astype(np.float64), 0.0, None))  # [K, k]
        weights = _fuzzy_memberships(distances)  # [K, k]
        placed = np.einsum("qk,qkd->qd", weights, self.coordinates[nearest].astype(np.float64))  # [K, d]
        return (placed / weights.sum(1, keepdims=True)).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        """Atomically write the projector to `path` (an ``.npz`` of arrays; parent folders are created)."""
        header = {"format": PROJECTOR_FORMAT, "version": PROJECTOR_FORMAT_VERSION, "metadata": self.metadata}

        def write(file) -> None:
            np.savez(file, header=np.array(json.dumps(header)), reference=self.reference, coordinates=self.coordinates)

        return atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: str | Path) -> RegionProjector:
        """Read a projector written by ``save`` (arrays only: no code runs while loading)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No region projector at {path}: fit one after training (RegionProjector.fit(...).save(path))."
            )
        with path.open("rb") as file:
            first_byte = file.read(1)
        if first_byte == b"\x80":  # a pickle: format 1, written before this one
            return cls._from_format_1(path)
        try:
            with np.load(path, allow_pickle=False) as arrays:
                header = json.loads(str(arrays["header"]))
                reference, coordinates = arrays["reference"], arrays["coordinates"]
        except Exception as error:  # a truncated or foreign file can raise almost anything
            raise ValueError(
                f"{path} is not a readable region projector ({type(error).__name__}: {error}); "
                "refit it with RegionProjector.fit and save it again."
            ) from error
        if not isinstance(header, dict) or header.get("format") != PROJECTOR_FORMAT:
            raise ValueError(f"{path} is not a region projector file (no '{PROJECTOR_FORMAT}' format tag).")
        if header.get("version") != PROJECTOR_FORMAT_VERSION:
            raise ValueError(
                f"{path} has region projector format version {header.get('version')!r}; this code reads "
                f"version {PROJECTOR_FORMAT_VERSION}: refit the projector."
            )
        try:
            projector = cls(reference, coordinates, header["metadata"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} has incomplete or inconsistent projector data ({error}): refit it.") from error
        if not (np.isfinite(projector.reference).all() and np.isfinite(projector.coordinates).all()):
            raise ValueError(f"{path} holds NaN or inf: refit the projector.")
        return projector

    @classmethod
    def _from_format_1(cls, path: Path) -> RegionProjector:
        """A format-1 file (a pickled UMAP object, written by this backend before format 2):
        its fitted vectors and coordinates. Unpickling runs code: MODEL_DIR's own files only."""
        umap = _import_umap()  # the pickle references umap and pynndescent classes
        try:
            with path.open("rb") as file:
                payload = pickle.load(file)  # noqa: S301 - our own file, see the docstring
            model, metadata = payload["umap"], payload["metadata"]
            if payload.get("format") != PROJECTOR_FORMAT or not isinstance(model, umap.UMAP):
                raise ValueError("no region projector inside")
            return cls(model._raw_data, model.embedding_, metadata)
        except Exception as error:  # a truncated or foreign pickle can raise almost anything
            raise ValueError(
                f"{path} is not a readable region projector ({type(error).__name__}: {error}); "
                "refit it with RegionProjector.fit and save it again."
            ) from error

    def warm_up(self) -> None:
        """One tiny transform, so a load fails here on a projector that cannot transform, not in a request."""
        self.transform(_random_unit_vectors(WARM_UP_VECTORS, self.dim))


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """``[N, P]`` rows scaled to unit length (an all-zero row stays zero)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _random_unit_vectors(count: int, dim: int) -> np.ndarray:
    """``[count, dim]`` float32 unit vectors, seeded: probes for warm-ups."""
    return _unit_rows(np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32))


def _fuzzy_memberships(distances: np.ndarray, iterations: int = 64) -> np.ndarray:
    """UMAP's smoothed k-NN weights ``[K, k]`` from distances ``[K, k]`` (float64):
    exp(-max(0, d - rho) / sigma), rho = the nearest distance, sigma found by bisection so each
    row sums to log2(k) (McInnes et al. 2018, section 3.1, local_connectivity = 1)."""
    target = math.log2(distances.shape[1])
    excess = distances - distances.min(axis=1, keepdims=True)  # [K, k] >= 0
    low = np.zeros((len(distances), 1))
    high = np.full((len(distances), 1), np.inf)
    sigma = np.ones((len(distances), 1))
    for _ in range(iterations):
        too_wide = np.exp(-excess / sigma).sum(axis=1, keepdims=True) > target  # shrink sigma
        high = np.where(too_wide, sigma, high)
        low = np.where(too_wide, low, sigma)
        sigma = np.where(np.isinf(high), sigma * 2.0, (low + high) / 2.0)
    return np.exp(-excess / np.maximum(sigma, 1e-12))


_UMAP_WARM_UP_LOCK = threading.Lock()
_umap_warm_up_seconds: float | None = None  # set once this process has compiled UMAP's numba code
UMAP_WARM_UP_VECTORS = 200


def warm_up_umap(dim: int = 128) -> float:
    """Compile UMAP's and pynndescent's numba code in this process: a fit and a transform on
    a few random unit vectors. Returns the seconds it took (0 once done; callers racing the
    first call wait for it).

    Numba caches only part of that code on disk, so every fresh process pays tens of seconds
    at its first fit whatever the cache holds (module docstring); a tiny fit compiles the same
    functions as a large one. The server calls this in the background at start-up, so the fit
    after a training run costs the fit itself: 11000 bank vectors in 4-7 s instead of 40-60 s.
    """
    global _umap_warm_up_seconds
    with _UMAP_WARM_UP_LOCK:
        if _umap_warm_up_seconds is not None:
            return 0.0
        start = time.perf_counter()
        RegionProjector.fit(_random_unit_vectors(UMAP_WARM_UP_VECTORS, dim)).warm_up()
        _umap_warm_up_seconds = time.perf_counter() - start
        return _umap_warm_up_seconds


def umap_is_warm() -> bool:
    return _umap_warm_up_seconds is not None


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


@functools.cache
def _threadpools() -> Any:
    """threadpoolctl's view of the loaded thread pools, taken once: building it walks every
    loaded library (5 ms, as much as the KMeans fit), and scikit-learn is imported by then."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _kmeans_labels(points: np.ndarray, weights: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """KMeans cluster ids ``[M]`` of distinct `points` ``[M, d]`` weighted by their multiplicity."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    kmeans = KMeans(n_clusters=clusters, n_init=KMEANS_N_INIT, random_state=seed)
    # One OpenMP thread: a few hundred points are far too few to share out, and with torch's
    # and scikit-learn's two libgomp copies (plus numba) loaded, the threads' hand-offs made one
    # call take 0.7 s instead of 8 ms on 2 cores. omp_set_num_threads acts on the calling
    # thread only, so other threads (torch inference) keep their setting.
    with _threadpools().limit(limits=1, user_api="openmp"), warnings.catch_warnings():
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
