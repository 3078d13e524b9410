"""What one simulated active-learning run is: its settings, the two profiles, and its identity.

A run is fully determined by a ``SimulationConfig``. Everything in it except the fields in
``RESUMABLE_FIELDS`` decides the results, so a saved run may only be continued by a command
with the same values (``differences``); ``cycles`` may grow (that is how a finished run is
extended), and the device, batch size of evaluation and progress display change nothing
the run records.

Profiles are named sets of defaults (``PROFILES``); a command-line flag overrides one value.

- ``quick``: CamVid downscaled 4x (120x90), 60 pool images (evenly spaced over train), the
  whole evaluation split, n = 5, 5 cycles, m = 8 MC samples, 120 training steps per cycle at
  learning rate 2e-3. About 2-3 minutes per acquisition on 2 CPU cores. The larger learning
  rate is for the short schedule: in a trial (30 val images), at the paper's 5e-4, 120 steps
  left even the supervised reference at mIoU 0.20 (0.32 at 2e-3), and 40 steps at 0.13.
- ``medium``: between the two, for comparing acquisitions and training choices where the
  supervised reference is not itself starved: CamVid downscaled 2x (240x180), 100 pool
  images, the whole evaluation split, n = 25, 4 cycles (100 labeled pixels per image at the
  end, 0.23% as in quick), m = 8, warm-started cycles of 100 steps at 2e-3; the supervised
  reference trains the same 400 steps in one go. 6-8 minutes per run on one CPU thread, 12-15
  with ``semi`` (two runs side by side on 2 cores; README, "Active-learning simulation").
- ``paper``: paper 000, section 4.2: 480x360, every image, m = 20, r = 0.2, n = 5,
  100 epochs per cycle (AdamW at 5e-4, poly decay), 10 cycles. Meant for a GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..acquisition import names as acquisition_names
from ..grid import GRIDS

MODES = ("pixel", "region")
SELECTIONS = ("rank", "umap-kmeans")  # region mode: top-R by summed score, or paper 004's clustering
# None: the selection's own (rank: paper 000's sparse CE; umap-kmeans: paper 004's contrastive training)
TRAININGS = ("ce", "contrastive")
HEAD_CELLS = ("labeled", "all")  # contrastive training: where the projection head runs
# tasks_per_cycle: which images (tasks) are labeled next. "value": the backend's task value
# (model.calibration.image_value, the acquisition's mean pixel uncertainty); "best-pixels": the
# median score of the image's 5 best pixels (the backend's value before 2026-12-07);
# "mean-entropy": the mean entropy of the MC mean, whatever the acquisition; "random".
TASK_ORDERS = ("value", "best-pixels", "mean-entropy", "random")
SUPERVISED = "supervised"  # the full-supervision reference: dense labels, one training, no acquisition
# Region mode ranks superpixels by a pixel score summed over each region (paper 004, eq. 6).
DEFAULT_ACQUISITION = {"pixel": "balent", "region": "entropy"}
# Not part of a run's identity: changing them never changes a recorded figure.
RESUMABLE_FIELDS = ("cycles", "device", "eval_batch_size")
# The supervised reference never queries and trains on dense labels: these settings cannot change it.
QUERY_FIELDS = (
    "mode", "pixels", "regions", "superpixels", "mc_samples", "selection", "semi", "training", "pixel_grid",
    "umap_epochs", "mc_precision", "tasks_per_cycle", "task_order",
)
# Settings of the supervised reference alone: they cannot change an active-learning run.
SUPERVISED_FIELDS = ("supervised_steps",)
# Fields added after runs were saved, with the value every older run had: a saved config
# without them compares as if it held these (an old run resumes without a spurious difference).
LEGACY_DEFAULTS = {
    "selection": "rank", "semi": False, "supervised_steps": None, "training": None, "pixel_grid": "image",
    "head_cells": "all",  # runs saved before 2026-12-03 trained the projection head on the whole map
    "umap_epochs": 0,
    "mc_precision": "fp32",
    "tasks_per_cycle": None, "task_order": "value",
}


@dataclass
class SimulationConfig:
    """Settings of one run (one acquisition, one mode, one seed)."""

    data: str  # CamVid-layout root: <data>/<split>/ images, <data>/<split>annot/ labels
    acquisition: str = "balent"  # a name in model.acquisition, or "supervised"
    mode: str = "pixel"  # "pixel": n pixels per image per cycle; "region": superpixels
    cycles: int = 5  # K: train / evaluate / acquire rounds; cycle 1 trains on the cold start
    pixels: int = 5  # n, pixel mode: labeled pixels per image, at the cold start and per cycle
    regions: int = 3  # region mode: superpixels per image, at the cold start and per cycle
    superpixels: int = 150  # region mode: SEEDS superpixels asked for per image (SEEDS rounds it)
    # region mode: "rank" (top R by summed score) or "umap-kmeans" (paper 004's Algorithm 1,
    # contrastive training included); the supervised reference ignores it
    selection: str = "rank"
    # "contrastive": paper 004's training (projection head, CE + InfoNCE against the memory bank,
    # the EMA teacher evaluated and querying) with any selection, so that a rank or random run
    # differs from umap-kmeans by the selection alone; None: the selection's own (see TRAININGS)
    training: str | None = None
    # pixel mode: where queries are scored, "image" (every pixel, on the interpolated moments)
    # or "decoder" (the decoder's nodes, each tied to its nearest image pixel; ``model.grid``)
    pixel_grid: str = "image"
    # paper 003's semi-supervised training (model.semi): pseudo labels from the EMA teacher on
    # the unlabeled pixels, with ClassMix; the student is evaluated and queries (see `serves_teacher`).
    # The supervised reference (dense labels) ignores it.
    semi: bool = False
    train_split: str = "train"
    eval_split: str = "val"
    scale: float = 0.25  # image downscale factor (1 = the files' resolution)
    train_images: int | None = 60  # pool size, evenly spaced over the split; None = all
    eval_images: int | None = None  # evaluation images, evenly spaced; None = all
    num_classes: int = 11
    void_index: int | None = 11  # the dataset's void label; ignored in training and evaluation
    mc_samples: int = 8  # m
    dropout: float = 0.2  # r
    arch: str = "deeplabv3plus"
    encoder: str = "tu-tf_efficientnet_lite0"
    encoder_weights: str | None = "packaged"
    steps: int | None = 120  # training steps per cycle; None: use epochs
    supervised_steps: int | None = None  # the supervised reference's one training; None: steps
    epochs: int = 100  # per cycle, when steps is None (paper 000, section 4.2)
    batch_size: int = 4
    lr: float = 2e-3  # the quick profile's; the paper profile uses 5e-4
    crop: tuple[int, int] | None = None  # training crop (H, W); None = the whole (scaled) image
    augment: bool = True
    warm_start: bool = False  # False: every cycle trains from the pretrained initialization
    # contrastive training: the projection head at the labeled pixels' decoder cells ("labeled",
    # TrainConfig.head_at_labeled_cells, the library's default) or on the whole map ("all")
    head_cells: str = "labeled"
    # umap-kmeans: the region projector's UMAP layout epochs; 0: UMAP's own default (200 above
    # 10000 bank vectors, 500 below)
    umap_epochs: int = 0
    # queries: the MC samples' masked product, "fp32" or "bf16" (model.mc_dropout.LogitChunk;
    # the backend's SEGAL_MC_PRECISION=auto on a CPU with native bf16)
    mc_precision: str = "fp32"
    # the product's loop: None labels every pool image each cycle (paper 000); K labels only K
    # images not labeled yet, the cold start K random ones, then the K first by `task_order`
    # (an annotator who works down Label Studio's task list); pixel mode, image grid
    tasks_per_cycle: int | None = None
    task_order: str = "value"  # TASK_ORDERS
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.crop is not None:
            self.crop = tuple(int(v) for v in self.crop)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        allowed = [*acquisition_names(), SUPERVISED]
        if self.acquisition not in allowed:
            raise ValueError(f"Unknown acquisition {self.acquisition!r}; choose one of {allowed}.")
        for name in ("cycles", "pixels", "regions", "superpixels", "mc_samples", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("train_images", "eval_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None for the whole split), got {value}.")
        if self.mc_precision not in ("fp32", "bf16"):
            raise ValueError(f"mc_precision must be fp32 or bf16, got {self.mc_precision!r}.")
        if self.umap_epochs < 0:
            raise ValueError(f"umap_epochs must be >= 0 (0: UMAP's default), got {self.umap_epochs}.")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (DeepLabV3+'s ASPP BatchNorm fails on a batch of one).")
        if self.supervised_steps is not None and self.supervised_steps < 1:
            raise ValueError(f"supervised_steps must be >= 1 (or None for steps), got {self.supervised_steps}.")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}.")
        if self.training is not None and self.training not in TRAININGS:
            raise ValueError(
                f"training must be one of {TRAININGS} (or None for the selection's own), got {self.training!r}."
            )
        if self.head_cells not in HEAD_CELLS:
            raise ValueError(f"head_cells must be one of {HEAD_CELLS}, got {self.head_cells!r}.")
        if self.pixel_grid not in GRIDS:
            raise ValueError(f"pixel_grid must be one of {GRIDS}, got {self.pixel_grid!r}.")
        if self.pixel_grid != "image" and self.mode != "pixel":
            raise ValueError("pixel_grid applies to pixel queries (--mode pixel); regions sum every pixel's score.")
        if self.tasks_per_cycle is not None:
            if self.tasks_per_cycle < 1:
                raise ValueError(f"tasks_per_cycle must be >= 1 (or None for every image), got {self.tasks_per_cycle}.")
            if self.mode != "pixel" or self.pixel_grid != "image":
                raise ValueError("tasks_per_cycle orders tasks by their pixel scores: use it with --mode pixel and "
                                 "--pixel-grid image.")  # fmt: skip
        if self.task_order not in TASK_ORDERS:
            raise ValueError(f"task_order must be one of {TASK_ORDERS}, got {self.task_order!r}.")
        if self.clustered and self.training == "ce":
            raise ValueError(
                "selection 'umap-kmeans' clusters the teacher's contrastive embeddings: it needs paper 004's "
                "training (leave --training unset, or pass --training contrastive)."
            )
        if self.clustered and self.mode != "region":
            raise ValueError(
                "selection 'umap-kmeans' clusters superpixels (paper 004): use it with mode 'region' "
                "(--mode region), or keep selection 'rank' in pixel mode."
            )
        if self.clustered and self.acquisition == "random":
            raise ValueError(
                "selection 'umap-kmeans' takes the region with the largest summed acquisition score in each "
                "cluster, and 'random' has no score: use another acquisition (entropy is paper 004's), or "
                "selection 'rank' for uniformly random regions."
            )

    @property
    def supervised(self) -> bool:
        return self.acquisition == SUPERVISED

    @property
    def clustered(self) -> bool:
        """Paper 004's Algorithm 1: contrastive training, EMA teacher, UMAP + KMeans region choice.

        False for the supervised reference, which never queries and keeps paper 000's training.
        """
        return self.selection == "umap-kmeans" and not self.supervised

    @property
    def contrastive(self) -> bool:
        """Paper 004's training: projection head, contrastive loss, memory bank, the EMA teacher
        served. umap-kmeans always; rank runs with ``training="contrastive"``; never supervised."""
        if self.supervised:
            return False
        return self.training == "contrastive" or (self.training is None and self.clustered)

    @property
    def semi_supervised(self) -> bool:
        """Whether the training uses paper 003's pseudo labels (never for the supervised reference)."""
        return self.semi and not self.supervised

    @property
    def teacher(self) -> bool:
        """Whether the run trains an EMA teacher (contrastive training, semi)."""
        return self.contrastive or self.semi_supervised

    @property
    def serves_teacher(self) -> bool:
        """Whether the teacher, not the student, is evaluated, queries and is saved: paper 004's
        Algorithm 1 (its contrastive training, with umap-kmeans or not). A semi run only takes its
        pseudo labels from the teacher. On the medium profile's 100-step cycles a teacher with
        alpha 0.99 trails its student badly (cycle 1, val mIoU 0.29 against 0.35 for the student,
        with and without semi), and serving it would compare the teacher's lag, not the pseudo
        labels, with the plain runs."""
        return self.contrastive

    @property
    def run_name(self) -> str:
        """Folder of this run inside the output directory: ``<mode>-<acquisition>-seed<k>``
        (``region-<acquisition>-umap-kmeans-seed<k>`` for the clustered selection,
        ``<mode>-<acquisition>-contrastive-seed<k>`` for a rank run trained paper 004's way,
        ``pixel-<acquisition>-decoder-seed<k>`` for queries scored on the decoder's grid; ``-semi``
        before ``-seed`` with semi-supervised training, ``-headall`` before it with the projection
        head trained on the whole map, ``-epochs<N>`` with N UMAP layout epochs, ``-mcbf16`` before
        ``-seed`` with the MC samples' product in bf16, ``-tasks<K>-<order>`` before it with K
        tasks per cycle)."""
        if self.supervised:
            return f"{SUPERVISED}-seed{self.seed}"
        head = "-headall" if self.contrastive and self.head_cells == "all" else ""
        semi = "-semi" if self.semi_supervised else ""
        before_seed = semi + ("-mcbf16" if self.mc_precision == "bf16" else "")
        if self.tasks_per_cycle is not None:
            before_seed += f"-tasks{self.tasks_per_cycle}-{self.task_order}"
        if self.clustered:
            epochs = f"-epochs{self.umap_epochs}" if self.umap_epochs else ""
            return f"{self.mode}-{self.acquisition}-{self.selection}{head}{epochs}{before_seed}-seed{self.seed}"
        training = "-contrastive" if self.contrastive else ""
        grid = "-decoder" if self.pixel_grid == "decoder" else ""
        return f"{self.mode}-{self.acquisition}{grid}{training}{head}{before_seed}-seed{self.seed}"

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["crop"] = list(self.crop) if self.crop is not None else None
        return values

    @classmethod
    def from_dict(cls, values: dict) -> SimulationConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def differences(saved: dict, current: SimulationConfig) -> list[str]:
    """``"name: saved -> current"`` for each setting that would change the recorded results."""
    saved = {**LEGACY_DEFAULTS, **saved}
    now = current.to_dict()
    ignored = set(RESUMABLE_FIELDS) | set(QUERY_FIELDS if current.supervised else SUPERVISED_FIELDS)
    if not current.contrastive:  # no projection head is trained
        ignored.add("head_cells")
    keys = sorted((set(saved) | set(now)) - ignored)
    return [f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in keys if saved.get(key) != now.get(key)]


PROFILES: dict[str, dict] = {
    "quick": {
        "scale": 0.25,
        "train_images": 60,
        "eval_images": None,
        "cycles": 5,
        "pixels": 5,
        "regions": 3,
        "superpixels": 150,
        "mc_samples": 8,
        "dropout": 0.2,
        "steps": 120,
        "batch_size": 4,
        "lr": 2e-3,
        "crop": None,
    },
    "medium": {
        "scale": 0.5,
        "train_images": 100,
        "eval_images": None,
        "cycles": 4,
        "pixels": 25,
        "regions": 3,
        "superpixels": 150,
        "mc_samples": 8,
        "dropout": 0.2,
        "steps": 100,
        "supervised_steps": 400,
        "batch_size": 4,
        "lr": 2e-3,
        "crop": None,
        "warm_start": True,
    },
    "paper": {
        "scale": 1.0,
        "train_images": None,
        "eval_images": None,
        "cycles": 10,
        "pixels": 5,
        "regions": 3,
        "superpixels": 300,
        "mc_samples": 20,
        "dropout": 0.2,
        "steps": None,
        "epochs": 100,
        "batch_size": 4,
        "lr": 5e-4,
        "crop": None,
    },
}


def profile_config(profile: str, data: str | Path, **overrides) -> SimulationConfig:
    """The profile's values, then the overrides (applied as given: None means None)."""
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}; choose one of {sorted(PROFILES)}.")
    values = dict(PROFILES[profile])
    values.update(overrides)
    mode = values.get("mode", "pixel")
    values.setdefault("acquisition", DEFAULT_ACQUISITION.get(mode, "balent"))
    return SimulationConfig(data=str(Path(data).resolve()), **values)
