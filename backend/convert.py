"""Label Studio regions <-> pixel masks.

Label Studio stores every coordinate as a percent (0-100) of the image's width (x, the
column) and height (y, the row). Our masks are ``[H, W]`` arrays indexed ``[row, col]``.

One geometric convention runs through the whole module: percent space is continuous, and
pixel ``(row, col)`` is the unit square ``[col, col + 1) x [row, row + 1)`` after scaling
percent by ``width / 100`` and ``height / 100``; its center is ``(col + 0.5, row + 0.5)``.

- A point belongs to the pixel that contains it (x == 100 or y == 100, the far edge, to the
  last pixel); ``pixel_to_percent`` gives the pixel's center, so the two invert each other.
- A pixel belongs to a polygon when its *center* lies inside it (even-odd rule; a center
  exactly on an edge counts for the polygon to its right/below, so polygons that share an
  edge never both claim a pixel). ``polygon_mask`` implements that rule itself rather than
  with ``cv2.fillPoly``: fillPoly rounds vertices to the pixel grid and paints every pixel
  the outline touches, so a rectangle whose edges lie on pixel boundaries comes back one
  pixel wider and taller.
- ``polygon_region`` outlines the mask 1/6 pixel inside the pixels' outer edges, so the
  polygon Label Studio draws hugs the mask and rasterizing it gives the mask back exactly
  (before simplification).

Brush masks travel as Label Studio's RLE of a flat RGBA image (``label_studio_sdk``'s
``mask2rle`` / ``decode_rle``); see ``brush_region`` and ``brush_mask`` for its quirks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

import cv2
import numpy as np
import torch
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from model.data import IGNORE_INDEX

KEYPOINT_WIDTH = 0.6  # drawn point size, percent of image width: ~3 px at 480 px, visible without hiding neighbours
POLYGON_EPSILON = 0.5  # pixels: how far a simplified outline may stray from the traced one (cv2.approxPolyDP)
PAINT_ORDER = ("polygonlabels", "brushlabels", "keypointlabels")  # later kinds overwrite earlier ones
SUPPORTED_TYPES = frozenset(PAINT_ORDER)

_EDGE_SLACK = 1e-9  # pixels; absorbs float error in percents computed from pixel edges
_TRACE_SCALE = 3  # polygon_region traces the mask upsampled this much (see there)


# --------------------------------------------------------------------------- points


def _check_size(width: int, height: int) -> None:
    if int(width) != width or int(height) != height or width < 1 or height < 1:
        raise ValueError(f"Image size must be positive integers, got width={width}, height={height}.")


def percent_to_pixel(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """(row, col) of the pixel containing the point at (x, y) percent; x == 100 is the last column."""
    _check_size(width, height)
    for name, value in (("x", x), ("y", y)):
        if not math.isfinite(value) or not 0.0 <= value <= 100.0:
            raise ValueError(f"Point {name}={value} is outside the image: percent coordinates must lie in [0, 100].")
    col = min(math.floor(x * width / 100.0 + _EDGE_SLACK), width - 1)
    row = min(math.floor(y * height / 100.0 + _EDGE_SLACK), height - 1)
    return row, col


def pixel_to_percent(row: int, col: int, width: int, height: int) -> tuple[float, float]:
    """(x, y) percent of the center of pixel (row, col); ``percent_to_pixel`` maps it back."""
    _check_size(width, height)
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f"Pixel (row={row}, col={col}) is outside a {width}x{height} (width x height) image.")
    return (col + 0.5) * 100.0 / width, (row + 0.5) * 100.0 / height


# --------------------------------------------------------------------------- regions


def _stable_id(*parts: object) -> str:
    """10 hex characters (Label Studio's own ids are 10 characters) that depend only on `parts`."""
    return hashlib.blake2s(repr(parts).encode(), digest_size=5).hexdigest()


def _region(kind: str, value: dict, label: str, score: float, from_name: str, to_name: str, width: int, height: int,
            region_id: str) -> dict:
    return {
        "id": region_id,
        "from_name": from_name,
        "to_name": to_name,
        "type": kind,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {**value, kind: [label]},
        "score": float(score),
        "readonly": False,
    }


def _as_bool_mask(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """``[H, W]`` bool from a bool mask or a 0/1 (or 0/255) numeric one, numpy or torch."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"Expected a non-empty 2-D [H, W] mask, got shape {mask.shape}.")
    if mask.dtype == bool:
        return mask
    values = np.unique(mask)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        shown = values[:6].tolist()
        raise ValueError(
            f"Expected a boolean mask, got {mask.dtype} values {shown}{' ...' if len(values) > 6 else ''}; "
            "pass one class at a time, e.g. `labels == class_id`."
        )
    return mask != 0


def keypoint_region(
    row: int,
    col: int,
    *,
    label: str,
    score: float,
    from_name: str,
    to_name: str,
    width: int,
    height: int,
    region_id: str | None = None,
) -> dict:
    """A "keypointlabels" prediction at the center of pixel (row, col), drawn ``KEYPOINT_WIDTH`` wide."""
    x, y = pixel_to_percent(row, col, width, height)
    value = {"x": x, "y": y, "width": KEYPOINT_WIDTH}
    region_id = region_id if region_id is not None else f"kp_{row}_{col}"
    return _region("keypointlabels", value, label, score, from_name, to_name, width, height, region_id)


def brush_region(
    mask: np.ndarray | torch.Tensor,
    *,
    label: str,
    score: float,
    from_name: str,
    to_name: str,
    region_id: str | None = None,
) -> dict:
    """A "brushlabels" prediction painting `mask` (``[H, W]`` bool); the image size is the mask's.

    ``mask2rle`` copies each value into all four RGBA channels as is, so the mask is encoded as
    0/255: a 0/1 mask would come out with alpha 1/255, all but invisible in Label Studio.
    An empty mask raises: Label Studio would show an invisible region (skip the class instead).
    """
    mask = _as_bool_mask(mask)  # [H, W]
    if not mask.any():
        raise ValueError("The mask is empty: a brush region needs at least one pixel; skip this class.")
    height, width = mask.shape
    rle = mask2rle(mask.astype(np.uint8) * np.uint8(255))
    value = {"format": "rle", "rle": rle}
    region_id = region_id if region_id is not None else _stable_id("brush", label, rle)
    return _region("brushlabels", value, label, score, from_name, to_name, width, height, region_id)


def _outline(component: np.ndarray, epsilon: float) -> np.ndarray:
    """Outer outline ``[N, 2]`` of one 8-connected component, as continuous pixel (x, y).

    ``cv2.findContours`` returns the centers of the boundary pixels, half a pixel inside the
    mask's edge: rasterized with the center rule that polygon loses its right and bottom
    boundary pixels. Tracing the mask upsampled 3x instead puts the outline 1/6 pixel inside
    the edge: every center of the component is strictly inside it and every center outside
    the component (holes aside) strictly outside, so the round trip is exact.
    """
    rows, cols = np.nonzero(component)
    top, left = rows.min() - 1, cols.min() - 1  # one pixel of background around the crop
    crop = np.pad(component[top + 1 : rows.max() + 1, left + 1 : cols.max() + 1], 1)
    big = np.repeat(np.repeat(crop.astype(np.uint8), _TRACE_SCALE, axis=0), _TRACE_SCALE, axis=1)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=len)  # [N, 1, 2] sub-pixel (col, row); one contour for one component
    if epsilon > 0:
        simplified = cv2.approxPolyDP(contour, epsilon * _TRACE_SCALE, closed=True)
        if len(simplified) >= 3:  # a thin sliver can collapse to a segment; keep the full outline then
            contour = simplified
    points = contour.reshape(-1, 2).astype(np.float64)  # [N, 2]
    return (points + 0.5) / _TRACE_SCALE + np.array([left, top], dtype=np.float64)


def polygon_region(
    mask: np.ndarray | torch.Tensor,
    *,
    label: str,
    score: float,
    from_name: str,
    to_name: str,
    region_id: str | None = None,
    epsilon: float = POLYGON_EPSILON,
) -> dict | None:
    """A "polygonlabels" prediction outlining the largest 8-connected component of `mask`.

    Only the outer outline is kept (holes are filled; other components dropped): a polygon
    region has one ring. `epsilon` (pixels) simplifies the outline with ``cv2.approxPolyDP``.
    On CamVid classes the default 0.5 px keeps about half the corners of the exact outline
    (median 164 points, at most about 1200) and moves only boundary pixels (IoU >= 0.96 even
    for 1-2 px wide poles); 1 px drops whole columns of thin poles (IoU 0.68). Below 1/3 px
    the outline stays between the inside and outside pixel centers, so the round trip is
    exact, as with 0, which keeps every corner. None for an empty mask.
    """
    mask = _as_bool_mask(mask)  # [H, W]
    if not mask.any():
        return None
    height, width = mask.shape
    count, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))  # 0 is the background
    outline = _outline(components == largest, epsilon)  # [N, 2] pixel (x, y)
    points = (outline * (100.0 / np.array([width, height]))).tolist()  # [N, 2] percent
    value = {"points": points, "closed": True}
    region_id = region_id if region_id is not None else _stable_id("polygon", label, points)
    return _region("polygonlabels", value, label, score, from_name, to_name, width, height, region_id)


# --------------------------------------------------------------------------- masks


def brush_mask(value: Mapping, width: int, height: int) -> np.ndarray:
    """``[H, W]`` bool decoded from a brush region's `value` made at `width` x `height`.

    ``decode_rle`` returns the flat RGBA bytes ``[H * W * 4]`` whose length comes from the
    RLE's own header; a pixel is painted when its alpha is > 0 (Label Studio's editor writes
    the stroke into alpha; ``mask2rle`` writes the same value into all four channels).
    """
    _check_size(width, height)
    if not isinstance(value, Mapping) or "rle" not in value:
        raise ValueError("A brush value needs an 'rle' list of bytes (value = {'format': 'rle', 'rle': [...]}).")
    if value.get("format", "rle") != "rle":
        raise ValueError(f"Brush format {value.get('format')!r} is not supported; only 'rle' is.")
    rle = value["rle"]
    if not isinstance(rle, (list, tuple)) or not all(isinstance(b, int) and 0 <= b <= 255 for b in rle):
        raise ValueError("A brush 'rle' must be a list of integers 0-255.")
    expected = width * height * 4
    declared = int.from_bytes(bytes(rle[:4]), "big") if len(rle) >= 4 else None
    if declared != expected:  # checked before decoding: decode_rle allocates whatever the header says
        raise ValueError(
            f"Brush RLE holds {declared} values but a {width}x{height} RGBA image needs {expected}: "
            "the RLE belongs to an image of another size (check original_width/original_height)."
        )
    try:
        flat = decode_rle(list(rle))  # [H * W * 4] uint8
    except ValueError as error:  # the bit reader ran out of bits: int('', 2)
        raise ValueError(f"Brush RLE is truncated or corrupt ({error}).") from None
    if flat.shape != (expected,):
        raise ValueError(f"Brush RLE decoded to {flat.size} values, expected {expected} ({width}x{height} RGBA).")
    return flat.reshape(height, width, 4)[..., 3] > 0


def polygon_mask(points: Iterable[Iterable[float]], width: int, height: int) -> np.ndarray:
    """``[H, W]`` bool: the pixels whose centers lie inside the polygon (percent vertices).

    A scanline fill: every edge crossing a row's center line toggles "inside" from the first
    pixel whose center is at or right of the crossing. Rows and crossings are half-open, so a
    center on an edge belongs to the polygon to its right/below. Vertices outside [0, 100]
    are allowed; the polygon is clipped to the image.
    """
    _check_size(width, height)
    try:
        pts = np.asarray(points, dtype=np.float64)  # [N, 2] percent (x, y)
    except (TypeError, ValueError):
        raise ValueError("Polygon points must be a list of [x, y] percent pairs.") from None
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"Polygon points must be [x, y] pairs, got an array of shape {pts.shape}.")
    if len(pts) < 3:
        raise ValueError(f"A polygon needs at least 3 points, got {len(pts)}.")
    if not np.isfinite(pts).all():
        raise ValueError("Polygon points must be finite numbers.")
    x0, y0 = pts[:, 0] * (width / 100.0), pts[:, 1] * (height / 100.0)  # [N] pixel units
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)  # [N] each edge's other end
    # Rows whose center r + 0.5 lies in [min(y0, y1), max(y0, y1)); horizontal edges get none.
    first = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), 0, height).astype(np.int64)  # [N]
    stop = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), 0, height).astype(np.int64)  # [N]
    spans = stop - first  # [N]
    edge = np.repeat(np.arange(len(pts)), spans)  # [K] one entry per (edge, row) crossing
    rows = first[edge] + np.arange(len(edge)) - np.repeat(np.cumsum(spans) - spans, spans)  # [K]
    t = (rows + 0.5 - y0[edge]) / (y1[edge] - y0[edge])  # [K]
    crossing = x0[edge] + t * (x1[edge] - x0[edge])  # [K] pixel x where the edge meets the center line
    cols = np.clip(np.ceil(crossing - 0.5), 0, width).astype(np.int64)  # [K] first center at/after it
    toggles = np.zeros((height, width + 1), dtype=np.int64)  # column W collects crossings right of the image
    np.add.at(toggles, (rows, cols), 1)
    return np.cumsum(toggles[:, :width], axis=1) % 2 == 1


# --------------------------------------------------------------------------- annotations


class _Skip(Exception):
    """A result that paints nothing; an empty message skips it silently."""


def _describe(index: int, result: object) -> str:
    if not isinstance(result, Mapping):
        return f"result {index}"
    return f"result {index} ({result.get('type', '?')} {result.get('id', '?')!r})"


def _single_label(value: Mapping, kind: str, class_index: Mapping[str, int]) -> int:
    labels = value.get(kind)
    if not isinstance(labels, list) or len(labels) != 1:
        count = len(labels) if isinstance(labels, list) else 0
        raise _Skip(f"has {count} labels; a region must carry exactly one")
    label = labels[0]
    if not isinstance(label, str) or label not in class_index:
        raise _Skip(f"unknown label {label!r} (known: {', '.join(map(str, class_index))})")
    return class_index[label]


def _result_size(result: Mapping, width: int, height: int) -> tuple[int, int]:
    """The size a region was made at (only RLE depends on it); the given size when absent."""
    size = result.get("original_width", width), result.get("original_height", height)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise _Skip(f"malformed original_width/original_height {size}")
    return size


def _resize_nearest(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest neighbour under the module's convention: each new pixel center samples the old pixel under it."""
    old_height, old_width = mask.shape
    rows = np.minimum(((np.arange(height) + 0.5) * old_height / height).astype(np.int64), old_height - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * old_width / width).astype(np.int64), old_width - 1)
    return mask[rows[:, None], cols[None, :]]


def _paint_target(result: Mapping, kind: str, width: int, height: int) -> np.ndarray | tuple[int, int]:
    """What one region paints: a ``[H, W]`` bool mask, or (row, col) for a keypoint."""
    value = result["value"]
    try:
        if kind == "keypointlabels":
            x, y = value["x"], value["y"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y)):
                raise _Skip(f"malformed point x={x!r}, y={y!r}")
            return percent_to_pixel(x, y, width, height)
        if kind == "brushlabels":
            made_width, made_height = _result_size(result, width, height)
            mask = brush_mask(value, made_width, made_height)
            if (made_width, made_height) != (width, height):
                mask = _resize_nearest(mask, width, height)
        else:
            if "points" not in value:
                raise _Skip("has no 'points'")
            mask = polygon_mask(value["points"], width, height)
    except KeyError as key:
        raise _Skip(f"value lacks {key}") from None
    except ValueError as error:
        raise _Skip(str(error)) from None
    if not mask.any():
        raise _Skip("covers no pixel")
    return mask


def annotation_to_labels(
    results: list[dict],
    class_index: dict[str, int],
    width: int,
    height: int,
    *,
    controls: dict[str, str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Sparse labels ``[H, W]`` int64 from one annotation's `result` list, and why regions were skipped.

    Pixels no region covers are ``IGNORE_INDEX``. `width` x `height` is the image as we load it;
    percent coordinates do not depend on resolution, and an RLE made at another size
    (``original_width``/``original_height``) is resized with nearest neighbour.

    Paint order: polygons, then brushes, then keypoints (a click is the most precise statement
    and wins where regions overlap); within a kind, later results overwrite earlier ones.

    `controls` maps a control's ``from_name`` to the result type it should produce; results
    of other controls are ignored silently. None accepts every supported ``type``.

    Nothing here raises on bad regions. Each skipped region gets one reason: unknown label, zero
    or several labels, a point outside the image, a malformed value (missing keys, an RLE of
    the wrong size, a polygon of fewer than 3 points), a rotated image, a region that covers no
    pixel, a labeled type we cannot paint (``rectanglelabels``, ``ellipselabels``, ...), or a
    result whose type does not match its control in `controls`. Results that carry no class
    label at all (``choices``, ``textarea``, ``rating``, relations, unlabeled shapes) are
    skipped silently: they say nothing about pixel classes.
    """
    _check_size(width, height)
    bad = {name: index for name, index in class_index.items() if not 0 <= index < IGNORE_INDEX}
    if bad:
        raise ValueError(f"Class indices must lie in [0, {IGNORE_INDEX}) ({IGNORE_INDEX} means unlabeled), got {bad}.")
    painted: dict[str, list[tuple[np.ndarray | tuple[int, int], int]]] = {kind: [] for kind in PAINT_ORDER}
    skipped: list[str] = []
    for index, result in enumerate(results):
        try:
            if not isinstance(result, Mapping):
                raise _Skip(f"is a {type(result).__name__}, not a region object")
            kind = result.get("type")
            if not isinstance(kind, str):
                raise _Skip("has no 'type'")
            if kind not in SUPPORTED_TYPES:
                labeled = kind.endswith("labels")  # a labeled shape we cannot paint deserves a reason
                raise _Skip(f"type {kind!r} is not supported (only {', '.join(PAINT_ORDER)})" if labeled else "")
            if controls is not None:
                from_name = result.get("from_name")
                control = controls.get(from_name) if isinstance(from_name, str) else None
                if control is None:
                    raise _Skip("")
                if control != kind:
                    raise _Skip(f"control {from_name!r} should give {control!r} results")
            if result.get("image_rotation") not in (None, 0):
                raise _Skip(f"image rotated by {result.get('image_rotation')} degrees; rotation is not supported")
            if not isinstance(result.get("value"), Mapping):
                raise _Skip("has no 'value' object")
            class_id = _single_label(result["value"], kind, class_index)
            painted[kind].append((_paint_target(result, kind, width, height), class_id))
        except _Skip as skip:
            if str(skip):
                skipped.append(f"{_describe(index, result)}: {skip}")
    labels = np.full((height, width), IGNORE_INDEX, dtype=np.int64)  # [H, W]
    for kind in PAINT_ORDER:
        for target, class_id in painted[kind]:
            labels[target] = class_id  # a (row, col) tuple indexes one pixel, a bool mask many
    return labels, skipped
