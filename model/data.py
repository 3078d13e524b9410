"""Reading segmentation data laid out like CamVid (SegNet tutorial layout).

A split ``<root>/<split>/`` of RGB PNGs has its labels in ``<root>/<split>annot/`` under the
same file names: single-channel PNGs of class indices. CamVid's labels are 0-10 for the
classes in ``CAMVID_CLASSES`` and 11 for void.

Training and evaluation use one ignore index, ``IGNORE_INDEX``, for every pixel that must not
count: void pixels, padding, and (for sparse annotation) every pixel nobody labeled.
``SegmentationFolder`` maps the dataset's void index to it on load, so nothing downstream
needs to know a dataset's void convention.

Files are decoded from bytes (``np.fromfile`` + ``cv2.imdecode``) rather than with
``cv2.imread``, which returns ``None`` for both a missing and a corrupt file and cannot open
non-ASCII paths on Windows; here the two failures get different, explicit errors.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

CAMVID_CLASSES: tuple[str, ...] = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
CAMVID_VOID = 11
IGNORE_INDEX = 255  # label of pixels that carry no supervision (void, padding, unlabeled)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _decode(path: str | Path, flags: int) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such image file: {path}.")
    data = np.fromfile(str(path), dtype=np.uint8)
    array = cv2.imdecode(data, flags) if data.size else None
    if array is None:
        raise ValueError(f"Could not decode {path}: the file is empty, truncated or not an image.")
    return array


def _scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}.")
    return max(1, round(height * scale)), max(1, round(width * scale))


def load_image(path: str | Path, scale: float = 1.0) -> torch.Tensor:
    """RGB image ``[3, H, W]`` float32 in [0, 1], optionally resized by `scale`.

    Downscaling averages (area), upscaling interpolates bilinearly. 16-bit images are
    divided by 65535, grayscale is repeated to three channels and alpha is dropped.
    """
    array = _decode(path, cv2.IMREAD_UNCHANGED)  # [H, W] or [H, W, 3|4], BGR(A)
    peak = float(np.iinfo(array.dtype).max) if np.issubdtype(array.dtype, np.integer) else 1.0
    if array.ndim == 2:
        array = cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    elif array.shape[2] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
    else:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    if scale != 1.0:
        height, width = _scaled_size(*array.shape[:2], scale)
        interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        array = cv2.resize(array, (width, height), interpolation=interpolation)
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)  # [3, H, W]
    return (image.to(torch.float32) / peak).clamp_(0.0, 1.0)


def load_label(path: str | Path, scale: float = 1.0) -> torch.Tensor:
    """Class-index map ``[H, W]`` int64 from a single-channel PNG, values as stored.

    `scale` resizes with nearest neighbour, which is right for *dense* ground truth only;
    to rescale sparse labels use ``model.augment`` (nearest resizing drops isolated pixels).
    """
    array = _decode(path, cv2.IMREAD_UNCHANGED)
    if array.ndim == 3:
        if array.shape[2] >= 3 and np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(
            array[..., 0], array[..., 2]
        ):
            array = array[..., 0]  # gray stored as RGB: the index is in every channel
        else:
            raise ValueError(
                f"{path} has {array.shape[2]} channels; a label image must be single-channel class "
                "indices (a color-coded mask has to be converted to indices first)."
            )
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path} holds {array.dtype} values; a label image must hold integer class indices.")
    if scale != 1.0:
        height, width = _scaled_size(*array.shape, scale)
        array = cv2.resize(array, (width, height), interpolation=cv2.INTER_NEAREST)
    return torch.from_numpy(array.astype(np.int64))


class SegmentationFolder:
    """(image, label) pairs of one split: ``<root>/<split>/`` and ``<root>/<split>annot/``.

    Items are ``(image [3, H, W] float32, labels [H, W] int64)`` with `void_index` (CamVid's
    11 by default) replaced by ``IGNORE_INDEX``; ``void_index=None`` keeps labels as stored.
    Files load on access; nothing is cached.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        scale: float = 1.0,
        void_index: int | None = CAMVID_VOID,
    ):
        self.root = Path(root)
        self.split = split
        self.scale = scale
        self.void_index = void_index
        _scaled_size(1, 1, scale)  # validates scale
        image_dir = self.root / split
        label_dir = self.root / f"{split}annot"
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"Missing folder {folder}: a split needs {image_dir.name}/ (images) and "
                    f"{label_dir.name}/ (labels, same file names) under {self.root}."
                )
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}.")
        missing = [p.name for p in images if not (label_dir / p.name).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{len(missing)} of {len(images)} images in {image_dir} have no label file of the "
                f"same name in {label_dir}: {shown}."
            )
        self.pairs: list[tuple[Path, Path]] = [(p, label_dir / p.name) for p in images]

    @property
    def names(self) -> list[str]:
        return [image.name for image, _ in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.pairs[index]
        image = load_image(image_path, self.scale)  # [3, H, W]
        labels = load_label(label_path, self.scale)  # [H, W]
        if image.shape[-2:] != labels.shape:
            raise ValueError(
                f"{image_path.name}: image is {tuple(image.shape[-2:])} but its label is {tuple(labels.shape)}."
            )
        if self.void_index is not None:
            labels[labels == self.void_index] = IGNORE_INDEX
        return image, labels


def random_sparse_labels(dense: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Keep `count` uniformly random labeled pixels of a dense label map ``[H, W]``, IGNORE_INDEX
    elsewhere: clicks by a simulated annotator, for tests, benchmarks and demos."""
    labeled = torch.nonzero(dense.reshape(-1) != IGNORE_INDEX).squeeze(1)
    keep = labeled[torch.randperm(labeled.numel(), generator=generator)[:count]]
    sparse = torch.full_like(dense, IGNORE_INDEX)
    sparse.view(-1)[keep] = dense.reshape(-1)[keep]
    return sparse
