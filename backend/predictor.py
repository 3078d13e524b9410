"""``predict(tasks)``: the points and regions the model wants labeled next, per task.

For each task: MC-dropout moments of the served model at a working resolution (longest
side <= SEGAL_MAX_SIDE), then
- the n most informative pixels by the configured acquisition, as KeyPointLabels results
  labeled with the predicted class (scored at every pixel, or on the decoder's nodes with
  SEGAL_POINT_GRID=decoder; ``model.grid``);
- SEEDS superpixels by paper 004's method once a trained model has a region projector:
  region features are the teacher's mean pixel embedding, mapped by the UMAP fitted on
  the memory bank, clustered by KMeans with k = SEGAL_REGIONS_PER_TASK, and the most
  informative region of each cluster (summed pixel entropy, eq. 6, or summed BalEnt with
  SEGAL_REGION_SCORE=balent) is proposed. Without a projector (no contrastive training,
  too few bank vectors) the top regions by the summed score are proposed instead.
  Regions are BrushLabels (exact RLE) or, without a BrushLabels control, PolygonLabels (the
  region's outline), labeled with the region's majority predicted class.
Pixels and regions that the task's annotations already label are never proposed.

Before the first training run (cold start, paper 000 Algorithm 1 step 3) the pixels and
regions are random and carry the control's first label: there is no prediction to show.

Scores follow Label Studio's active-learning convention: the **lowest** task score is the
task to label first (uncertainty sampling, "Order by: Prediction score" ascending).
- A task's raw value is the mean uncertainty of its unlabeled pixels (for BalEnt, BalEnt
  itself; ``model.calibration.image_value``); its ``score`` is 1 - G(value), G the version's
  ``ScoreScale`` (the CDF of that value over a sample of the project's pool, fitted after
  training), so scores lie in (0, 1), are comparable across the version's tasks, and another
  draw of the MC masks keeps the order. Before the first training the value is a random draw.
- A point's or region's ``score`` is the model's confidence in the label it proposes (MC
  mean probability; for a region its mean over the region's pixels), 1 / labels before
  training: what a person reads as "the model is 43% sure this is Road".
- Raw acquisition values stay in every result's ``acquisition`` field (function, the
  point's or region's value, the task's value) for analysis.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from model.acquisition import needs_mean_entropy, select_pixels
from model.calibration import squash
from model.data import IGNORE_INDEX
from model.grid import GridScores, grid_scores, upsampled_pixel_scores
from model.mc_dropout import mc_moments, mc_moments_and_embeddings
from model.moments import MCMoments, entropy
from model.precision import resolve_precision
from model.regions import RegionProjector, acquire_regions
from model.superpixels import (
    SuperpixelCache,
    majority_labels,
    region_sums,
    seeds_superpixels,
    to_uint8_rgb,
    top_regions,
)

from .config import Settings
from .convert import annotation_to_labels, brush_region, keypoint_region, polygon_region
from .gate import RequestGate
from .images import ImageFetcher, ImageFetchError, rgb_to_tensor
from .label_config import LabelSchema
from .store import ModelStore, ServedModel

log = logging.getLogger(__name__)

SUPERPIXEL_CACHE_IMAGES = 32
PREDICT_PREFETCH = 2  # /predict of several tasks: images fetched ahead of the model
PREDICT_PREFETCH_THREADS = 2
# what the network said about the last few /predict images (MC moments at the decoder's
# resolution, region embeddings): about 8 MB for a 480x360 image with regions
MODEL_OUTPUT_CACHE_BYTES = 128 * 2**20


class TaskError(ValueError):
    """One task cannot be predicted (no image field, unreadable image...)."""


@dataclass
class RegionEvidence:
    """What the model says about a task's image, for choosing regions (all None before training)."""

    probs: torch.Tensor | None = None  # [C, h, w] MC mean
    pixel_scores: torch.Tensor | None = None  # [h, w] entropy or BalEnt, summed per region
    embeddings: torch.Tensor | None = None  # [P, h/4, w/4] teacher embeddings, with a projector
    grid_size: tuple[int, int] | None = None  # the padded image grid the embeddings cover
    projector: RegionProjector | None = None  # UMAP on the memory bank


@dataclass
class ModelOutputs:
    """One image's network outputs under one served model and one task's dropout masks."""

    coarse: MCMoments  # [C, h/4, w/4]
    embeddings: torch.Tensor | None  # [P, h/4, w/4], when regions are clustered
    generator_state: torch.Tensor  # the task's generator right after the masks were drawn

    @property
    def nbytes(self) -> int:
        tensors = [self.coarse.mean, self.coarse.second, self.coarse.mean_entropy, self.embeddings]
        return sum(t.element_size() * t.numel() for t in tensors if t is not None)


class ModelOutputCache:
    """A thread-safe LRU of ``ModelOutputs``, bounded in bytes, each tied to the model object
    that made it (held weakly: a retrained or reloaded model never reads its predecessor's).

    Label Studio asks ``/predict`` again for the task being labeled (interactive
    pre-annotations send the annotator's new regions as ``context``): the image and the
    served model are the same, only the labeled pixels differ, and those are applied after
    the network. So a re-request skips the encoder, the decoder, the MC samples and the
    projection head, and returns what a fresh computation would (same masks, same generator
    state afterwards)."""

    def __init__(self, max_bytes: int = MODEL_OUTPUT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple[weakref.ref, ModelOutputs]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple, model: torch.nn.Module) -> ModelOutputs | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item[0]() is not model:  # another model object under the same name (a reload)
                self._drop(key)
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: tuple, model: torch.nn.Module, outputs: ModelOutputs) -> None:
        size = outputs.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._drop(key)
            self._items[key] = (weakref.ref(model), outputs)
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def _drop(self, key: tuple) -> None:
        self._bytes -= self._items.pop(key)[1].nbytes

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class WorkingImage:
    image: torch.Tensor  # [3, h, w] at the working resolution
    original_size: tuple[int, int]  # (H, W) of the image Label Studio shows


def working_resolution(image: torch.Tensor, max_side: int) -> torch.Tensor:
    """Downscale ``[3, H, W]`` so that its longest side is at most `max_side` (area filter)."""
    height, width = image.shape[-2:]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(image.unsqueeze(0), size=size, mode="area").squeeze(0)


def existing_results(task: dict, context: dict | None) -> list[dict]:
    """Regions already given for a task: its non-cancelled annotations and interactive clicks."""
    results: list[dict] = []
    for annotation in task.get("annotations") or []:
        if isinstance(annotation, dict) and not annotation.get("was_cancelled"):
            results.extend(r for r in annotation.get("result") or [] if isinstance(r, dict))
    if isinstance(context, dict):
        results.extend(r for r in context.get("result") or [] if isinstance(r, dict))
    return results


def _resolve_setting(name: str, precision: str, device: torch.device) -> str:
    try:
        return resolve_precision(precision, device)
    except ValueError as error:
        raise ValueError(f"{name}={precision}: {error}") from None


def _task_seed(seed: int, task: dict) -> int:
    digest = hashlib.sha256(f"{seed}:{task.get('id')}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Predictor:
    def __init__(self, settings: Settings, store: ModelStore, fetcher: ImageFetcher):
        self.settings = settings
        self.store = store
        self.fetcher = fetcher
        # the projection head's precision at inference (region features only), and the MC
        # samples' masked product's (``model.mc_dropout.LogitChunk``)
        self.embedding_precision = _resolve_setting("SEGAL_REGION_PRECISION", settings.region_precision, store.device)
        self.logit_precision = _resolve_setting("SEGAL_MC_PRECISION", settings.mc_precision, store.device)
        # E_s[H(p_s)] is a third of the MC moments' work and only BALD-type acquisitions read it
        self._needs_mean_entropy = needs_mean_entropy(settings.acquisition)
        # recent images only (an annotator's next click on the same task); a pool job passes
        # hundreds of images through, and 256 maps of a 1024 px image would be 750 MB
        self.superpixels = SuperpixelCache(capacity=SUPERPIXEL_CACHE_IMAGES)
        self.model_outputs = ModelOutputCache()
        # held by /predict (``predict``); the pool job and the score-scale fit wait on it
        self.gate = RequestGate()

    def predict(
        self, project: str, schema: LabelSchema, tasks: list[dict], context: dict | None = None
    ) -> tuple[list[dict], list[str]]:
        """One result per task, in order, and the reasons for tasks that got an empty one."""
        served = self.store.current(project)
        if served.model is not None and served.classes != schema.classes:
            log.warning(
                "project %s: the served model knows %s, the config now has %s; proposing as before training",
                project, served.classes, schema.classes,
            )
            served = ServedModel(None, served.version, served.classes, {})
        results, errors = [], []
        with self.gate.request():  # the background work in this process waits meanwhile
            for task, image in self._prefetched(schema, tasks):
                try:
                    work = self.working_image(image.result())
                    results.append(self.predict_task(served, schema, task, context, work=work, reuse_outputs=True))
                except (TaskError, ImageFetchError, ValueError) as error:
                    log.warning("task %s: no prediction: %s", task.get("id"), error)
                    errors.append(f"task {task.get('id')}: {error}")
                    # no score: Label Studio sorts tasks without one last, whatever the direction
                    results.append({"result": [], "score": None, "model_version": served.name})
        return results, errors

    def _prefetched(self, schema: LabelSchema, tasks: list[dict]) -> Iterator[tuple[dict, Future]]:
        """The tasks in order, each with its image (RGB uint8) on its way: with several tasks
        (Label Studio's "Retrieve predictions" sends the selection in one request, under its
        100 s timeout) the next images are downloaded and decoded in threads while the model
        works on this one, as the pool job does. No torch in those threads (see ``load_rgb``)."""
        if len(tasks) == 1:  # nothing to overlap with
            image: Future = Future()
            try:
                image.set_result(self.load_rgb(schema, tasks[0]))
            except Exception as error:  # noqa: BLE001 - raised where the caller reads it
                image.set_exception(error)
            yield tasks[0], image
            return
        with ThreadPoolExecutor(PREDICT_PREFETCH_THREADS, thread_name_prefix="predict-fetch") as pool:
            in_flight: deque[tuple[dict, Future]] = deque()
            try:
                for task in tasks:
                    in_flight.append((task, pool.submit(self.load_rgb, schema, task)))
                    if len(in_flight) > PREDICT_PREFETCH:
                        yield in_flight.popleft()
                while in_flight:
                    yield in_flight.popleft()
            finally:  # the caller stopped early (an unexpected error): drop what was not started
                for _, image in in_flight:
                    image.cancel()

    def load(self, schema: LabelSchema, task: dict) -> WorkingImage:
        return self.working_image(self.load_rgb(schema, task))

    def load_rgb(self, schema: LabelSchema, task: dict) -> np.ndarray:
        """The task's image as RGB uint8 ``[H, W, 3]``, as downloaded (no torch)."""
        data = task.get("data")
        if not isinstance(data, dict) or schema.image_key not in data:
            raise TaskError(f"task {task.get('id')} has no data.{schema.image_key} (the <Image> value field).")
        return self.fetcher.fetch_rgb(data[schema.image_key])

    def working_image(self, rgb: np.ndarray) -> WorkingImage:
        image = rgb_to_tensor(rgb)
        return WorkingImage(working_resolution(image, self.settings.max_side), tuple(image.shape[-2:]))

    def predict_task(
        self,
        served: ServedModel,
        schema: LabelSchema,
        task: dict,
        context: dict | None = None,
        work: WorkingImage | None = None,
        reuse_outputs: bool = False,
    ) -> dict:
        """The Label Studio prediction of one task; `work` is its image when already loaded
        (the pool job prefetches images), else it is fetched here. `reuse_outputs`: take the
        network's outputs from ``model_outputs`` when this model computed them for this task
        and image before, and keep them there (``/predict``; the pool job sees each task once)."""
        settings = self.settings
        work = work if work is not None else self.load(schema, task)
        height, width = work.image.shape[-2:]
        labels, skipped = annotation_to_labels(
            existing_results(task, context), schema.class_index, width, height, controls=schema.result_types
        )
        for reason in skipped:
            log.info("task %s: ignoring an existing region: %s", task.get("id"), reason)
        labeled = torch.from_numpy(labels != IGNORE_INDEX)  # [h, w]
        seed = _task_seed(settings.seed, task)
        generator = torch.Generator().manual_seed(seed)

        evidence = RegionEvidence()
        points: GridScores | None = None  # the keypoints' scores, on the decoder grid or every pixel
        if served.model is None:  # cold start: random pixels and regions, no prediction
            probs = None
            random_scores = torch.rand(height, width, generator=generator, dtype=torch.float64)
            function = "random (cold start)"
        else:
            model = served.model
            clusters = self._clusters_regions(served, schema)
            key = (served.name, self._image_key(schema, task, height, width), seed, clusters,
                   settings.mc_samples, self._needs_mean_entropy) if reuse_outputs else None  # fmt: skip
            outputs = self.model_outputs.get(key, model) if reuse_outputs else None
            if outputs is None:
                outputs = self._model_outputs(model, work.image, generator, clusters)
                if reuse_outputs:
                    self.model_outputs.put(key, model, outputs)
            else:
                generator.set_state(outputs.generator_state)
            coarse = outputs.coarse
            if clusters:
                evidence.embeddings = outputs.embeddings  # [P, h/4, w/4], decoder resolution
                evidence.grid_size = model.padded_size((height, width))
                evidence.projector = served.projector
            points = self._point_scores(model, coarse, labeled, generator)
            function = settings.acquisition
            probs = None
            if self._proposes_regions(schema):  # keypoints alone need no region evidence
                # the MC mean at the image resolution [C, h, w]: the regions' labels (and entropy),
                # in float32, which they need no more than, at half the upsampling's and entropy's cost
                probs = model.upsample(coarse.mean.float().unsqueeze(0), (height, width))[0].cpu()
                evidence.probs = probs
                same_scores = settings.acquisition == "balent" and settings.point_grid == "image"
                if settings.region_score == "balent" and same_scores:
                    evidence.pixel_scores = points.scores  # the keypoints' BalEnt at every pixel, already scored
                elif settings.region_score == "balent":
                    size = (height, width)
                    balent = upsampled_pixel_scores("balent", coarse, size, model.padded_size(size))
                    evidence.pixel_scores = balent.scores
                else:
                    evidence.pixel_scores = entropy(probs, dim=0)  # eq. 6 sums the pixel entropy

        if points is None:  # cold start: the task's rank is a uniform draw too
            task_value = float(torch.rand((), generator=generator, dtype=torch.float64))
        else:
            task_value = points.value()
        informativeness = self.informativeness(served, task_value)
        # NaN (every pixel labeled) is not JSON: None
        acquisition = {"function": function, "task_value": task_value if math.isfinite(task_value) else None}

        results: list[dict] = []
        keypoints = schema.control("keypoint")
        if keypoints is not None and settings.points_per_task > 0:
            if points is None:
                chosen = select_pixels(random_scores, settings.points_per_task, labeled)
                proposals = [(row, col, None, float(random_scores[row, col])) for row, col in chosen.tolist()]
            else:
                nodes, pixels = points.select(settings.points_per_task)
                proposals = [
                    (row, col, points.mean_at(node_row, node_col), float(points.scores[node_row, node_col]))
                    for (node_row, node_col), (row, col) in zip(nodes.tolist(), pixels.tolist())
                ]
            for row, col, mean, value in proposals:
                label, confidence = self._label_at(schema, keypoints.labels, mean)
                region = keypoint_region(
                    row, col, label=label, score=confidence, from_name=keypoints.name, to_name=schema.image_name,
                    width=width, height=height,
                )
                # percent coordinates are the same at any resolution; Label Studio wants the shown size
                region["original_height"], region["original_width"] = work.original_size
                region["acquisition"] = {**acquisition, "value": value}
                results.append(region)
        region_function = function if probs is None else f"summed {settings.region_score}"
        for region, value in self._regions(schema, task, work, labeled, evidence, generator):
            region["acquisition"] = {**acquisition, "function": region_function, "value": value}
            results.append(region)
        # Label Studio's convention: the lowest score is the task to label first
        return {"result": results, "score": 1.0 - informativeness, "model_version": served.name}

    def _model_outputs(
        self, model, image: torch.Tensor, generator: torch.Generator, with_embeddings: bool
    ) -> ModelOutputs:
        """One network pass over `image` ``[3, h, w]``: the MC moments at the decoder's resolution
        and, `with_embeddings`, the projection head's embeddings (both on the CPU)."""
        image = image.to(next(model.parameters()).device)
        options = {"mean_entropy": self._needs_mean_entropy, "image_resolution": False,
                   "logit_precision": self.logit_precision}  # fmt: skip
        embeddings = None
        if with_embeddings:
            coarse, embeddings = mc_moments_and_embeddings(
                model, image, self.settings.mc_samples, generator, **options,
                embedding_precision=self.embedding_precision,
            )  # fmt: skip
            embeddings = embeddings.cpu()
        else:
            coarse = mc_moments(model, image, self.settings.mc_samples, generator=generator, **options)[0]
        return ModelOutputs(coarse.map_spatial(lambda t: t.cpu()), embeddings, generator.get_state())

    @staticmethod
    def informativeness(served: ServedModel, task_value: float) -> float:
        """A task's raw value on the version's scale, in [0, 1]: 1 = label this task first."""
        if served.model is None:  # cold start: the value is a uniform draw already
            return float(np.clip(task_value, 0.0, 1.0)) if np.isfinite(task_value) else 0.0
        if served.score_scale is not None:
            return float(served.score_scale(task_value))
        return squash(task_value)  # a model saved before score scales existed

    def task_value(self, served: ServedModel, schema: LabelSchema, work: WorkingImage, task: dict) -> float:
        """Only the task's raw value (no proposals), as ``predict_task`` computes it: what a
        version's score scale is fitted on."""
        height, width = work.image.shape[-2:]
        labels, _ = annotation_to_labels(
            existing_results(task, None), schema.class_index, width, height, controls=schema.result_types
        )
        labeled = torch.from_numpy(labels != IGNORE_INDEX)
        return self.image_value(served.model, work.image, labeled, _task_seed(self.settings.seed, task))

    def image_value(self, model, image: torch.Tensor, labeled: torch.Tensor, seed: int) -> float:
        """``image_value`` of an image ``[3, h, w]`` under `model`, `labeled` ``[h, w]`` excluded."""
        generator = torch.Generator().manual_seed(seed)
        device = next(model.parameters()).device
        coarse = mc_moments(
            model,
            image.to(device),
            self.settings.mc_samples,
            generator=generator,
            mean_entropy=self._needs_mean_entropy,
            image_resolution=False,
            logit_precision=self.logit_precision,  # as the predictions': one scale for both
        )[0]
        return self._point_scores(model, coarse, labeled, generator).value()

    def _point_scores(self, model, coarse, labeled: torch.Tensor, generator: torch.Generator) -> GridScores:
        """The SEGAL_ACQUISITION scores that choose the keypoints and give the task's value (one
        definition for the proposals and for the values a score scale is fitted on), from the
        decoder-resolution moments `coarse` ``[C, h/4, w/4]``: on the decoder's grid, or at every
        pixel of their bilinear upsampling (SEGAL_POINT_GRID)."""
        settings = self.settings
        options = {"budget": settings.points_per_task, "generator": generator}
        size = tuple(labeled.shape)
        scorer = upsampled_pixel_scores if settings.point_grid == "image" else grid_scores
        return scorer(settings.acquisition, coarse, size, model.padded_size(size), labeled, **options)

    def superpixels_for(self, schema: LabelSchema, task: dict, work: WorkingImage) -> np.ndarray | None:
        """The image's SEEDS superpixels ``[h, w]`` (cached by URL and size), None without a region control."""
        if not self._proposes_regions(schema):
            return None
        height, width = work.image.shape[-2:]
        return self.superpixels.get(
            self._superpixel_key(schema, task, height, width),
            lambda: seeds_superpixels(to_uint8_rgb(work.image), self.settings.superpixels),
        )

    def prime_superpixels(self, schema: LabelSchema, task: dict, rgb: np.ndarray) -> None:
        """Compute (and cache) the superpixels from the downloaded ``[H, W, 3]`` uint8 image when
        it is already at the working resolution: what a prefetch thread can do ahead (SEEDS is
        OpenCV, no torch)."""
        height, width = rgb.shape[:2]
        if self._proposes_regions(schema) and max(height, width) <= self.settings.max_side:
            self.superpixels.get(
                self._superpixel_key(schema, task, height, width),
                lambda: seeds_superpixels(np.ascontiguousarray(rgb), self.settings.superpixels),
            )

    def _proposes_regions(self, schema: LabelSchema) -> bool:
        has_control = (schema.control("brush") or schema.control("polygon")) is not None
        return has_control and self.settings.regions_per_task > 0

    def _image_key(self, schema: LabelSchema, task: dict, height: int, width: int) -> str:
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        return f"{data.get(schema.image_key)}|{height}x{width}"

    def _superpixel_key(self, schema: LabelSchema, task: dict, height: int, width: int) -> str:
        return f"{self._image_key(schema, task, height, width)}|{self.settings.superpixels}"

    def _clusters_regions(self, served: ServedModel, schema: LabelSchema) -> bool:
        """Whether regions come from UMAP + KMeans (paper 004) rather than the plain ranking."""
        return (
            self._proposes_regions(schema)
            and served.projector is not None
            and served.model is not None
            and served.model.projection is not None
        )

    def _label_at(self, schema: LabelSchema, allowed: tuple[str, ...], mean: torch.Tensor | None) -> tuple[str, float]:
        """The most probable allowed label under the MC mean ``[C]`` at a point, and its
        probability (1 / labels before training, when there is no mean)."""
        if mean is None:
            return allowed[0], 1.0 / len(allowed)
        index = schema.class_index
        label = max(allowed, key=lambda name: float(mean[index[name]]))
        return label, float(mean[index[label]])

    def _regions(
        self,
        schema: LabelSchema,
        task: dict,
        work: WorkingImage,
        labeled: torch.Tensor,  # [h, w] bool
        evidence: RegionEvidence,
        generator: torch.Generator,
    ) -> list[tuple[dict, float]]:
        """The chosen superpixels as (Label Studio result, raw acquisition value), best first."""
        if not self._proposes_regions(schema):
            return []
        control = schema.control("brush") or schema.control("polygon")
        segments = self.superpixels_for(schema, task, work)
        k = self.settings.regions_per_task
        if evidence.pixel_scores is None:  # cold start: a random score per region
            sums = torch.rand(int(segments.max()) + 1, generator=generator, dtype=torch.float64).numpy()
            chosen = top_regions(sums, k, segments, labeled.numpy())
        elif evidence.projector is not None:  # paper 004: UMAP + KMeans, the most informative per cluster
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            chosen, sums = acquire_regions(
                evidence.projector, evidence.embeddings, evidence.pixel_scores, segments, k, labeled.numpy(),
                seed=seed, grid_size=evidence.grid_size,
            )
        else:
            sums = region_sums(evidence.pixel_scores, segments)
            chosen = top_regions(sums, k, segments, labeled.numpy())
        if not chosen:
            return []
        allowed = [schema.class_index[name] for name in control.labels]
        if evidence.probs is None:
            region_labels = {region: (control.labels[0], 1.0 / len(control.labels)) for region in chosen}
        else:
            allowed_probs = evidence.probs[allowed]  # [len(allowed), h, w]
            # max().indices, not argmax(): on a CPU torch's argmax over an outer axis is 6-10x
            # slower (41 ms here for a 480x360 map, numpy's 8 ms); both return the first maximum
            majority = majority_labels(allowed_probs.max(0).indices.numpy(), segments, len(allowed))
            allowed_probs = allowed_probs.numpy()
            region_labels = {}
            for region in chosen:
                label = int(majority[region])
                confidence = float(allowed_probs[label][segments == region].mean())
                region_labels[region] = (control.labels[label], confidence)
        # regions are drawn at the size Label Studio shows the image
        original_height, original_width = work.original_size
        full_segments = cv2.resize(segments, (original_width, original_height), interpolation=cv2.INTER_NEAREST)
        proposals = []
        for region in chosen:
            mask = full_segments == region
            if not mask.any():  # cannot happen when upscaling; guards odd aspect ratios
                continue
            label, confidence = region_labels[region]
            maker = brush_region if control.kind == "brush" else polygon_region
            result = maker(mask, label=label, score=confidence, from_name=control.name, to_name=schema.image_name)
            if result is not None:
                proposals.append((result, float(sums[region])))
        return proposals
