"""Backend settings, read from environment variables.

Label Studio's own names where they exist (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``,
``MODEL_DIR``, ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``, ``PORT``); ours start with
``SEGAL_``. ``Settings.from_env`` validates everything at start-up, so a typo fails once,
clearly, instead of on the first request.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from model import acquisition_names
from model.grid import GRIDS
from model.precision import PRECISIONS

from .launcher import check_command_template
from .urls import UnsafeURL, normalize_host, parse_target


class ConfigError(ValueError):
    """A setting has a value the backend cannot use; the message names the variable."""


SECRET_FIELDS = ("label_studio_api_key", "basic_auth_pass")  # never written into a file


@dataclass(frozen=True)
class Settings:
    label_studio_url: str = ""  # LABEL_STUDIO_URL, e.g. http://localhost:8080
    label_studio_api_key: str = ""  # LABEL_STUDIO_API_KEY (legacy token or personal access token)
    model_dir: Path = Path("models")  # MODEL_DIR: checkpoints under <MODEL_DIR>/<project>/
    cache_dir: Path | None = None  # SEGAL_CACHE_DIR: downloaded images; default <MODEL_DIR>/cache
    basic_auth_user: str = ""  # BASIC_AUTH_USER / BASIC_AUTH_PASS: both set -> auth required
    basic_auth_pass: str = ""
    host: str = "0.0.0.0"  # HOST
    port: int = 9090  # PORT
    threads: int = 8  # SEGAL_THREADS: request threads of the one worker process
    device: str = "auto"  # SEGAL_DEVICE: auto | cpu | cuda | cuda:N
    acquisition: str = "balent"  # SEGAL_ACQUISITION: one of model.acquisition.names()
    points_per_task: int = 5  # SEGAL_POINTS_PER_TASK
    regions_per_task: int = 3  # SEGAL_REGIONS_PER_TASK (with BrushLabels / PolygonLabels)
    mc_samples: int = 20  # SEGAL_MC_SAMPLES (m)
    superpixels: int = 300  # SEGAL_SUPERPIXELS: SEEDS superpixels asked for a 480x360 image
    region_score: str = "entropy"  # SEGAL_REGION_SCORE: entropy (paper 004, eq. 6) | balent, summed per region
    # SEGAL_REGION_PRECISION: auto (bf16 where native) | fp32 | bf16 | fp16 (CUDA): the projection head at inference
    region_precision: str = "auto"
    # SEGAL_MC_PRECISION: auto (bf16 where native) | fp32 | bf16 | fp16 (CUDA): the MC samples' masked product
    mc_precision: str = "auto"
    point_grid: str = "image"  # SEGAL_POINT_GRID: keypoints scored at every pixel (image) | the decoder's nodes
    max_side: int = 1024  # SEGAL_MAX_SIDE: images are downscaled to this longest side for the model
    train_every: int = 0  # SEGAL_TRAIN_EVERY: retrain every N new annotations (0: only on "Start training")
    score_pool: int | None = None  # SEGAL_SCORE_POOL: on (None: every task) | off (0) | N tasks per job
    # SEGAL_TRAIN_STEPS: auto (None: scaled to the labeled images, model.training.auto_steps) | N
    train_steps: int | None = None
    # SEGAL_TRAIN_PRECISION: auto (bf16 where native) | fp32 | bf16 | fp16 (CUDA)
    train_precision: str = "auto"
    train_channels_last: bool = True  # SEGAL_TRAIN_CHANNELS_LAST: on | off
    train_batch_size: int = 4  # SEGAL_TRAIN_BATCH_SIZE
    train_crop: int = 512  # SEGAL_TRAIN_CROP: square training crop side (smaller images are padded)
    train_procs: int | None = None  # SEGAL_TRAIN_PROCS: auto (None: one per visible GPU, 1 on CPU) | N processes
    train_command: str = ""  # SEGAL_TRAIN_COMMAND: launch runs with this ({manifest}, {procs}, {python}); "": local
    # SEGAL_JOB_NICE: the nice value added to the training and scoring processes this backend
    # starts (0-19): the server's requests take the cores first while a job runs
    job_nice: int = 19
    arch: str = "deeplabv3plus"  # SEGAL_ARCH: any segmentation-models-pytorch architecture
    encoder: str = "tu-tf_efficientnet_lite0"  # SEGAL_ENCODER
    encoder_weights: str | None = "packaged"  # SEGAL_ENCODER_WEIGHTS: packaged | imagenet | none
    dropout: float = 0.2  # SEGAL_DROPOUT (r)
    contrastive_weight: float = 0.1  # SEGAL_CONTRASTIVE_WEIGHT (lambda); 0: plain CE, regions by entropy rank
    # SEGAL_EMA_DECAY (alpha of the EMA teacher); 0: serve the student. 0.9 suits the short default
    # schedule (a 0.99 teacher of 100 steps lagged its student; README, "Training speed")
    ema_decay: float | None = 0.9
    # SEGAL_SEMI_SUPERVISED: on | off; paper 003's pseudo labels on the unlabeled pixels (README)
    semi_supervised: bool = False
    seed: int = 0  # SEGAL_SEED
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)  # SEGAL_ALLOWED_HOSTS, comma-separated
    # limits on untrusted input (README "Security")
    max_request_bytes: int = 64 * 2**20  # SEGAL_MAX_REQUEST_MB: request body
    max_json_depth: int = 64  # SEGAL_MAX_JSON_DEPTH: nesting of a request's JSON
    max_image_bytes: int = 64 * 2**20  # SEGAL_MAX_IMAGE_MB: one downloaded image
    max_image_pixels: int = 40_000_000  # SEGAL_MAX_IMAGE_MEGAPIXELS: width x height, read from the header
    download_timeout: float = 30.0  # SEGAL_DOWNLOAD_TIMEOUT: seconds for a whole download (and a free slot)
    max_downloads: int = 4  # SEGAL_MAX_DOWNLOADS: downloads at once, below SEGAL_THREADS

    @property
    def image_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.model_dir / "cache"

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        if self.basic_auth_user and self.basic_auth_pass:
            return self.basic_auth_user, self.basic_auth_pass
        return None

    def snapshot(self) -> dict:
        """The settings as JSON values, for a job's manifest: without the secrets (the API key
        travels in the job's environment, the basic-auth password not at all)."""
        values = dataclasses.asdict(self)
        for secret in SECRET_FIELDS:
            values.pop(secret)
        values["model_dir"] = str(self.model_dir)
        values["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        values["allowed_hosts"] = list(self.allowed_hosts)
        return values

    @classmethod
    def from_snapshot(cls, values: Mapping, api_key: str = "") -> Settings:
        """``snapshot()`` back, with `api_key`; fields this version does not know are refused."""
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"settings of another segal version (unknown fields {unknown[:5]}).")
        values = dict(values)
        values["model_dir"] = Path(values.get("model_dir") or "models")
        values["cache_dir"] = Path(values["cache_dir"]) if values.get("cache_dir") else None
        values["allowed_hosts"] = tuple(values.get("allowed_hosts") or ())
        return cls(**values, label_studio_api_key=api_key)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        reader = _Reader(env)
        settings = cls(
            label_studio_url=reader.url("LABEL_STUDIO_URL"),
            label_studio_api_key=env.get("LABEL_STUDIO_API_KEY", "").strip(),
            model_dir=Path(env.get("MODEL_DIR") or "models"),
            cache_dir=Path(env["SEGAL_CACHE_DIR"]) if env.get("SEGAL_CACHE_DIR") else None,
            basic_auth_user=env.get("BASIC_AUTH_USER", ""),
            basic_auth_pass=env.get("BASIC_AUTH_PASS", ""),
            host=env.get("HOST") or "0.0.0.0",
            port=reader.integer("PORT", 9090, 1, 65535),
            threads=reader.integer("SEGAL_THREADS", 8, 1, 256),
            device=reader.choice("SEGAL_DEVICE", "auto", ("auto", "cpu", "cuda"), prefix_ok=("cuda:",)),
            acquisition=reader.choice("SEGAL_ACQUISITION", "balent", tuple(acquisition_names())),
            points_per_task=reader.integer("SEGAL_POINTS_PER_TASK", 5, 0, 10_000),
            regions_per_task=reader.integer("SEGAL_REGIONS_PER_TASK", 3, 0, 1_000),
            mc_samples=reader.integer("SEGAL_MC_SAMPLES", 20, 1, 1_000),
            superpixels=reader.integer("SEGAL_SUPERPIXELS", 300, 4, 100_000),
            region_score=reader.choice("SEGAL_REGION_SCORE", "entropy", ("entropy", "balent")),
            region_precision=reader.choice("SEGAL_REGION_PRECISION", "auto", PRECISIONS),
            mc_precision=reader.choice("SEGAL_MC_PRECISION", "auto", PRECISIONS),
            point_grid=reader.choice("SEGAL_POINT_GRID", "image", GRIDS),
            max_side=reader.integer("SEGAL_MAX_SIDE", 1024, 32, 16_384),
            train_every=reader.integer("SEGAL_TRAIN_EVERY", 0, 0, 1_000_000),
            score_pool=reader.switch_or_count("SEGAL_SCORE_POOL"),
            train_steps=reader.auto_or_integer("SEGAL_TRAIN_STEPS", None, 1, 1_000_000),
            train_precision=reader.choice("SEGAL_TRAIN_PRECISION", "auto", PRECISIONS),
            train_channels_last=reader.on_off("SEGAL_TRAIN_CHANNELS_LAST", True),
            train_batch_size=reader.integer("SEGAL_TRAIN_BATCH_SIZE", 4, 2, 1_024),
            train_crop=reader.integer("SEGAL_TRAIN_CROP", 512, 32, 8_192),
            train_procs=reader.auto_or_integer("SEGAL_TRAIN_PROCS", None, 1, 1_024),
            train_command=reader.command("SEGAL_TRAIN_COMMAND"),
            job_nice=reader.integer("SEGAL_JOB_NICE", 19, 0, 19),
            arch=env.get("SEGAL_ARCH") or "deeplabv3plus",
            encoder=env.get("SEGAL_ENCODER") or "tu-tf_efficientnet_lite0",
            encoder_weights=reader.choice(
                "SEGAL_ENCODER_WEIGHTS", "packaged", ("packaged", "imagenet", "none")
            ),
            dropout=reader.number("SEGAL_DROPOUT", 0.2, 0.0, 0.99),
            contrastive_weight=reader.number("SEGAL_CONTRASTIVE_WEIGHT", 0.1, 0.0, 100.0),
            ema_decay=reader.number("SEGAL_EMA_DECAY", 0.9, 0.0, 0.9999) or None,
            semi_supervised=reader.on_off("SEGAL_SEMI_SUPERVISED", False),
            seed=reader.integer("SEGAL_SEED", 0, 0, 2**31 - 1),
            allowed_hosts=reader.hosts("SEGAL_ALLOWED_HOSTS"),
            max_request_bytes=reader.integer("SEGAL_MAX_REQUEST_MB", 64, 1, 4096) * 2**20,
            max_json_depth=reader.integer("SEGAL_MAX_JSON_DEPTH", 64, 8, 500),
            max_image_bytes=reader.integer("SEGAL_MAX_IMAGE_MB", 64, 1, 4096) * 2**20,
            max_image_pixels=round(reader.number("SEGAL_MAX_IMAGE_MEGAPIXELS", 40, 0.01, 1000) * 1e6),
            download_timeout=reader.number("SEGAL_DOWNLOAD_TIMEOUT", 30, 0.1, 3600),
            max_downloads=reader.max_downloads(),
        )
        if settings.encoder_weights == "none":
            settings = dataclasses.replace(settings, encoder_weights=None)
        if bool(settings.basic_auth_user) != bool(settings.basic_auth_pass):
            raise ConfigError("Set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither.")
        if settings.semi_supervised and settings.ema_decay is None:
            raise ConfigError(
                "SEGAL_SEMI_SUPERVISED=on takes its pseudo labels from the EMA teacher: leave SEGAL_EMA_DECAY "
                "at its default (0.99) or above 0, or turn SEGAL_SEMI_SUPERVISED off."
            )
        return settings


class _Reader:
    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        return self._bounded(name, default, low, high, int, "an integer")

    def number(self, name: str, default: float, low: float, high: float) -> float:
        return self._bounded(name, default, low, high, float, "a number")

    def _bounded(self, name, default, low, high, parse, kind):
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = parse(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not {kind} (default {default}).") from None
        if not low <= value <= high:
            raise ConfigError(f"{name}={value} is outside {low}..{high}.")
        return value

    def auto_or_integer(self, name: str, default: int | None, low: int, high: int) -> int | None:
        """auto: None; unset: `default`; else an integer in low..high."""
        raw = self.env.get(name, "").strip().lower()
        if raw == "auto":
            return None
        if not raw:
            return default
        return self.integer(name, 0, low, high)

    def on_off(self, name: str, default: bool) -> bool:
        raw = self.env.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in ("on", "true", "yes", "1"):
            return True
        if raw in ("off", "false", "no", "0"):
            return False
        raise ConfigError(f"{name}={raw!r} is not on or off.")

    def command(self, name: str) -> str:
        return check_command_template(name, self.env.get(name, ""), ConfigError)

    def switch_or_count(self, name: str) -> int | None:
        """on (the default): None, no cap; off: 0; a positive integer: that cap."""
        raw = self.env.get(name, "").strip().lower()
        if raw in ("", "on", "true", "yes", "all"):
            return None
        if raw in ("off", "false", "no", "0"):
            return 0
        if raw.isascii() and raw.isdigit() and len(raw) <= 9:
            return int(raw)
        raise ConfigError(f"{name}={raw!r} is not on, off or a number of tasks.")

    def choice(self, name: str, default: str, choices: tuple[str, ...], prefix_ok: tuple[str, ...] = ()) -> str:
        raw = self.env.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in choices or any(raw.startswith(prefix) for prefix in prefix_ok):
            return raw
        raise ConfigError(f"{name}={raw!r} is not one of {', '.join(choices)}.")

    def hosts(self, name: str) -> tuple[str, ...]:
        hosts = []
        for entry in self.env.get(name, "").split(","):
            if entry.strip() == "*":
                hosts.append("*")
            elif entry.strip():
                try:
                    hosts.append(normalize_host(entry))
                except UnsafeURL as error:
                    raise ConfigError(f"{name}: {error} List host names or IP addresses, without port or scheme.") from None
        return tuple(hosts)

    def max_downloads(self) -> int:
        threads = self.integer("SEGAL_THREADS", 8, 1, 256)
        # at least two request threads stay free of downloads, for /health and webhooks
        return self.integer("SEGAL_MAX_DOWNLOADS", min(4, max(1, threads - 2)), 1, max(1, threads - 2))

    def url(self, name: str) -> str:
        raw = self.env.get(name, "").strip().rstrip("/")
        if raw:
            try:
                parse_target(raw)
            except UnsafeURL as error:
                raise ConfigError(f"{name}={raw!r}: {error} Use http(s)://host[:port][/path].") from None
        return raw
