"""Label Studio regions <-> masks: the pixel/percent convention, exact round trips on real CamVid
masks, polygon rasterization against analytic shapes, and annotations with bad regions mixed in."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from label_studio_sdk.converter.brush import decode_rle
from scipy import ndimage

from backend.convert import (
    KEYPOINT_WIDTH,
    annotation_to_labels,
    brush_mask,
    brush_region,
    keypoint_region,
    percent_to_pixel,
    pixel_to_percent,
    polygon_mask,
    polygon_region,
)
from model.data import IGNORE_INDEX

FRAMES = ("0001TP_006690.png", "0001TP_007530.png", "0016E5_06390.png")  # 007530 has 1-2 px wide poles
NAMES = {"from_name": "label", "to_name": "image"}


def _camvid_label(camvid_dir, name: str) -> np.ndarray:
    labels = cv2.imread(str(camvid_dir / "trainannot" / name), cv2.IMREAD_UNCHANGED)  # [360, 480] uint8
    assert labels is not None and labels.shape == (360, 480), name
    return labels


def _class_masks(camvid_dir):
    """(frame, class, [360, 480] bool) for every class present in FRAMES, void included."""
    for name in FRAMES:
        labels = _camvid_label(camvid_dir, name)
        for k in np.unique(labels):
            yield name, int(k), labels == k


def _largest_filled(mask: np.ndarray) -> np.ndarray:
    _, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return ndimage.binary_fill_holes(components == 1 + np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# --------------------------------------------------------------------------- points


def test_percent_pixel_round_trip_every_pixel_and_the_edges():
    width, height = 19, 21  # odd, not square (swapped x/y shows), and 100 * c / 19 * 19 / 100 < c for c = 5, 10
    for row in range(height):
        for col in range(width):
            x, y = pixel_to_percent(row, col, width, height)
            assert (x, y) == pytest.approx(((col + 0.5) * 100 / width, (row + 0.5) * 100 / height))
            assert percent_to_pixel(x, y, width, height) == (row, col)
    for col in range(width):  # a pixel's left edge belongs to it, despite float error in 100 * c / w
        assert percent_to_pixel(100 * col / width, 0.0, width, height) == (0, col)
        assert percent_to_pixel(100 * (col + 1) / width - 1e-6, 0.0, width, height) == (0, col)
    assert percent_to_pixel(0.0, 0.0, width, height) == (0, 0)
    assert percent_to_pixel(100.0, 100.0, width, height) == (height - 1, width - 1)
    assert percent_to_pixel(100.0, 0.0, width, height) == (0, width - 1)  # x is the column
    assert percent_to_pixel(0.0, 100.0, width, height) == (height - 1, 0)  # y is the row


@pytest.mark.parametrize("x, y", [(-0.01, 50), (100.01, 50), (50, -1), (50, 250), (math.nan, 5), (5, math.inf)])
def test_percent_to_pixel_rejects_points_off_the_image(x, y):
    with pytest.raises(ValueError, match=r"outside the image.*\[0, 100\]"):
        percent_to_pixel(x, y, 480, 360)


def test_pixel_to_percent_rejects_pixels_off_the_image():
    with pytest.raises(ValueError, match="outside a 480x360"):
        pixel_to_percent(360, 0, 480, 360)  # row 360 is one past the last
    with pytest.raises(ValueError, match="positive integers"):
        pixel_to_percent(0, 0, 0, 360)


def test_keypoint_region_is_a_label_studio_keypoint_at_the_pixel_center():
    region = keypoint_region(12, 345, label="Car", score=0.25, width=480, height=360, **NAMES)
    assert region["type"] == "keypointlabels" and region["readonly"] is False
    assert (region["original_width"], region["original_height"], region["image_rotation"]) == (480, 360, 0)
    assert (region["from_name"], region["to_name"], region["score"]) == ("label", "image", 0.25)
    value = region["value"]
    assert value["keypointlabels"] == ["Car"] and value["width"] == KEYPOINT_WIDTH
    assert (value["x"], value["y"]) == pytest.approx((345.5 / 480 * 100, 12.5 / 360 * 100))
    assert percent_to_pixel(value["x"], value["y"], 480, 360) == (12, 345)
    again = keypoint_region(12, 345, label="Car", score=0.9, width=480, height=360, **NAMES)
    other = keypoint_region(345, 12, label="Car", score=0.25, width=480, height=400, **NAMES)
    assert region["id"] == again["id"] != other["id"]  # stable, and tells pixels apart
    assert keypoint_region(0, 0, label="Car", score=1, width=4, height=4, region_id="abc", **NAMES)["id"] == "abc"
    with pytest.raises(ValueError, match="outside"):
        keypoint_region(360, 0, label="Car", score=1.0, width=480, height=360, **NAMES)


# --------------------------------------------------------------------------- brush


def test_brush_rle_round_trip_is_exact_on_real_camvid_masks(camvid_dir):
    count = 0
    for name, k, mask in _class_masks(camvid_dir):
        region = brush_region(mask, label=f"class{k}", score=0.5, **NAMES)
        assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
        assert region["value"]["brushlabels"] == [f"class{k}"]
        assert (region["original_width"], region["original_height"]) == (480, 360)
        assert np.array_equal(brush_mask(region["value"], 480, 360), mask), (name, k)
        count += 1
    assert count >= 25
    # Label Studio draws alpha: the SDK copies the value into all four channels, so it must be 255.
    rgba = decode_rle(region["value"]["rle"]).reshape(360, 480, 4)
    assert set(np.unique(rgba).tolist()) == {0, 255} and (rgba == rgba[..., :1]).all()


def test_brush_region_takes_torch_and_01_masks_but_not_class_maps(camvid_dir):
    labels = _camvid_label(camvid_dir, FRAMES[0])
    mask = labels == 3  # Road
    from_torch = brush_region(torch.from_numpy(mask.astype(np.int64)), label="Road", score=1.0, **NAMES)
    from_bool = brush_region(mask, label="Road", score=1.0, **NAMES)
    assert from_torch["value"]["rle"] == from_bool["value"]["rle"] and from_torch["id"] == from_bool["id"]
    assert len(from_bool["id"]) == 10
    with pytest.raises(ValueError, match="labels == class_id"):
        brush_region(labels, label="Road", score=1.0, **NAMES)
    with pytest.raises(ValueError, match="empty"):
        brush_region(np.zeros((4, 5), bool), label="Road", score=1.0, **NAMES)


def test_brush_mask_refuses_rle_of_another_size_and_corrupt_rle(camvid_dir):
    mask = _camvid_label(camvid_dir, FRAMES[0]) == 8  # Car
    value = brush_region(mask, label="Car", score=1.0, **NAMES)["value"]
    with pytest.raises(ValueError, match="another size.*original_width"):
        brush_mask(value, 240, 180)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        brush_mask({**value, "rle": value["rle"][: len(value["rle"]) // 2]}, 480, 360)
    with pytest.raises(ValueError, match="'rle'"):
        brush_mask({"format": "rle"}, 480, 360)
    with pytest.raises(ValueError, match="0-255"):
        brush_mask({"rle": [0, 10, 140, 0, 256]}, 480, 360)


# --------------------------------------------------------------------------- polygons


def test_rectangle_on_pixel_edges_rasterizes_to_exactly_its_pixels():
    width, height = 10, 8
    rectangle = [[10, 25], [50, 25], [50, 75], [10, 75]]  # columns 1-4 (x 1..5 px), rows 2-5 (y 2..6 px)
    expected = np.zeros((height, width), bool)
    expected[2:6, 1:5] = True
    assert np.array_equal(polygon_mask(rectangle, width, height), expected)
    assert np.array_equal(polygon_mask(rectangle[::-1], width, height), expected)  # orientation does not matter
    # Two rectangles sharing an edge split the pixels between them: none twice, none lost.
    left, right = [[0, 0], [35, 0], [35, 100], [0, 100]], [[35, 0], [100, 0], [100, 100], [35, 100]]
    split = polygon_mask(left, width, height).astype(int) + polygon_mask(right, width, height)
    assert (split == 1).all()
    assert polygon_mask(right, width, height)[:, 3].all()  # the shared edge x = 3.5 px runs through column 3's centers
    top, bottom = [[0, 0], [100, 0], [100, 43.75], [0, 43.75]], [[0, 43.75], [100, 43.75], [100, 100], [0, 100]]
    assert polygon_mask(bottom, width, height)[3].all() and not polygon_mask(top, width, height)[3].any()
    assert polygon_mask([[-50, -50], [150, -50], [150, 150], [-50, 150]], width, height).all()  # clipped


def test_triangle_is_the_pixels_whose_centers_are_inside():
    width, height = 401, 299
    triangle = np.array([[7.3, 91.1], [52.9, 4.2], [96.6, 70.7]])  # percent (x, y)
    mask = polygon_mask(triangle.tolist(), width, height)
    corners = triangle * [width / 100, height / 100]  # [3, 2] pixel (x, y)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # [H, W] pixel centers
    sides = [
        (b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0])
        for a, b in zip(corners, np.roll(corners, -1, axis=0))
    ]
    inside = ((sides[0] > 0) & (sides[1] > 0) & (sides[2] > 0)) | ((sides[0] < 0) & (sides[1] < 0) & (sides[2] < 0))
    assert np.array_equal(mask, inside)
    (x0, y0), (x1, y1), (x2, y2) = corners
    area = abs((x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)) / 2
    assert mask.sum() == pytest.approx(area, rel=2e-3)


def test_polygon_mask_rejects_too_few_or_non_finite_points():
    with pytest.raises(ValueError, match="at least 3 points"):
        polygon_mask([[0, 0], [50, 50]], 10, 10)
    with pytest.raises(ValueError, match="finite"):
        polygon_mask([[0, 0], [50, math.nan], [50, 0]], 10, 10)
    with pytest.raises(ValueError, match=r"\[x, y\] pairs"):
        polygon_mask([[0, 0, 1], [50, 50, 1], [50, 0, 1]], 10, 10)


def test_polygon_round_trip_on_real_camvid_masks(camvid_dir):
    """Exact without simplification; with the default only boundary pixels move, even on thin poles.

    A polygon shifted by half a pixel, by 1/6 pixel, or with x and y swapped fails both parts.
    """
    ious, counts = [], []
    for name, k, mask in _class_masks(camvid_dir):
        target = _largest_filled(mask)  # [360, 480] outer outline of the largest component
        exact = polygon_region(mask, label="c", score=1.0, epsilon=0.0, **NAMES)
        assert np.array_equal(polygon_mask(exact["value"]["points"], 480, 360), target), (name, k)
        region = polygon_region(mask, label="c", score=1.0, **NAMES)
        assert region["type"] == "polygonlabels" and region["value"]["closed"] is True
        points = np.array(region["value"]["points"])  # [N, 2] percent
        assert ((points >= 0) & (points <= 100)).all()
        ious.append(_iou(polygon_mask(points.tolist(), 480, 360), target))
        counts.append((len(points), len(exact["value"]["points"])))
    assert min(ious) > 0.95 and np.mean(ious) > 0.99, (min(ious), np.mean(ious))
    assert sum(simple for simple, _ in counts) < 0.7 * sum(full for _, full in counts)


def test_polygon_region_of_tiny_and_empty_masks():
    assert polygon_region(np.zeros((6, 9), bool), label="c", score=1.0, **NAMES) is None
    pixel = np.zeros((6, 9), bool)
    pixel[2, 3] = True
    square = np.array(polygon_region(pixel, label="c", score=1.0, **NAMES)["value"]["points"]) * [9 / 100, 6 / 100]
    assert square.mean(axis=0) == pytest.approx([3.5, 2.5])  # centered on the pixel, ...
    assert np.ptp(square, axis=0) == pytest.approx([2 / 3, 2 / 3])  # ... 1/6 pixel inside its edges
    for shape in ([(2, 3)], [(0, 0)], [(5, 8)], [(1, 2), (2, 3), (3, 4)], [(4, 1), (4, 2), (4, 3)]):
        mask = np.zeros((6, 9), bool)  # a single pixel, the corners, a diagonal, a row
        mask[tuple(np.array(shape).T)] = True
        region = polygon_region(mask, label="c", score=1.0, **NAMES)
        assert len(region["value"]["points"]) >= 3
        assert np.array_equal(polygon_mask(region["value"]["points"], 9, 6), mask), shape


# --------------------------------------------------------------------------- annotations


def _rle(mask: np.ndarray) -> list[int]:
    return brush_region(mask, label="x", score=1.0, **NAMES)["value"]["rle"]


def _result(kind: str, value: dict, label, width: int = 40, height: int = 30, **extra) -> dict:
    labels = label if isinstance(label, list) else [label]
    return {"id": f"r{len(value)}{label}", "type": kind, "value": {**value, kind: labels},
            "original_width": width, "original_height": height, "image_rotation": 0, **NAMES, **extra}


def test_annotation_mixes_kinds_in_paint_order_and_skips_bad_regions_with_reasons():
    width, height = 40, 30
    classes = {"Road": 0, "Car": 1, "Pole": 2}
    brush = np.zeros((height, width), bool)
    brush[10:20, 15:30] = True  # overlaps the polygon's right part
    good_rle = _rle(brush)
    results = [  # listed in the reverse of paint order: the order of the list must not matter
        _result("keypointlabels", {"x": 50.0, "y": 50.0, "width": 0.6}, "Pole"),  # pixel (15, 20), in the overlap
        _result("brushlabels", {"format": "rle", "rle": good_rle}, "Car"),
        _result("polygonlabels", {"points": [[0, 0], [50, 0], [50, 50], [0, 50]], "closed": True}, "Road"),
        _result("keypointlabels", {"x": 101.0, "y": 50.0, "width": 0.6}, "Pole"),  # off the image
        _result("keypointlabels", {"x": 10.0, "y": 10.0, "width": 0.6}, "Bus"),  # unknown label
        _result("brushlabels", {"format": "rle", "rle": good_rle[:-30]}, "Car"),  # broken RLE
        _result("polygonlabels", {"points": [[0, 0], [90, 90]], "closed": True}, "Road"),  # 2 points
        _result("polygonlabels", {"points": [[60, 60], [90, 60], [90, 90]]}, ["Road", "Car"]),  # 2 labels
        _result("keypointlabels", {"y": 3.0}, "Pole"),  # no x
        _result("rectanglelabels", {"x": 1, "y": 1, "width": 5, "height": 5}, "Car"),
        {"id": "c1", "type": "choices", "value": {"choices": ["sunny"]}, "from_name": "weather", "to_name": "image"},
    ]
    labels, skipped = annotation_to_labels(results, classes, width, height)
    assert labels.shape == (height, width) and labels.dtype == np.int64
    expected = np.full((height, width), IGNORE_INDEX)
    expected[:15, :20] = 0  # polygon 0-50 % = columns 0-19, rows 0-14
    expected[brush] = 1  # the brush paints over the polygon ...
    expected[15, 20] = 2  # ... and the click over the brush
    assert np.array_equal(labels, expected)
    assert len(skipped) == 7, skipped  # every bad region once; the choices result silently
    reasons = "\n".join(skipped)
    for index, words in [(3, "outside the image"), (4, "unknown label 'Bus'"), (5, "truncated or corrupt"),
                         (6, "at least 3 points"), (7, "2 labels"), (8, "lacks 'x'"), (9, "'rectanglelabels'")]:
        assert f"result {index} " in reasons and words in reasons, (index, words, skipped)


def test_annotation_rescales_to_the_given_image_size(camvid_dir):
    mask = _camvid_label(camvid_dir, FRAMES[1]) == 2  # thin poles: a misaligned resize would show
    results = [
        _result("brushlabels", {"format": "rle", "rle": _rle(mask)}, "Pole", 480, 360),
        _result("keypointlabels", {"x": 99.0, "y": 1.0, "width": 0.6}, "Sky", 480, 360),
    ]
    labels, skipped = annotation_to_labels(results, {"Sky": 0, "Pole": 2}, 240, 180)
    assert skipped == []
    expected = np.where(mask[1::2, 1::2], 2, IGNORE_INDEX)  # each 2x2 block's lower right pixel holds its center
    expected[1, 237] = 0  # percent does not depend on resolution: (1 %, 99 %) of 180 x 240
    assert np.array_equal(labels, expected)
    full, _ = annotation_to_labels(results, {"Sky": 0, "Pole": 2}, 480, 360)
    assert np.array_equal(full == 2, mask & ~((np.arange(360) == 3)[:, None] & (np.arange(480) == 475)))
    # An RLE whose recorded size is wrong is refused, not reshaped into garbage.
    wrong = [_result("brushlabels", {"format": "rle", "rle": _rle(mask)}, "Pole", 240, 180)]
    labels, skipped = annotation_to_labels(wrong, {"Pole": 2}, 480, 360)
    assert (labels == IGNORE_INDEX).all() and len(skipped) == 1 and "another size" in skipped[0]


def test_controls_restrict_which_results_count():
    point = _result("keypointlabels", {"x": 50.0, "y": 50.0, "width": 0.6}, "Car")
    other = {**point, "from_name": "other"}
    labels, skipped = annotation_to_labels([point, other], {"Car": 1}, 40, 30, controls={"label": "keypointlabels"})
    assert (labels == 1).sum() == 1 and skipped == []  # "other" is not ours: skipped silently
    labels, skipped = annotation_to_labels([point], {"Car": 1}, 40, 30, controls={"label": "brushlabels"})
    assert (labels == IGNORE_INDEX).all() and len(skipped) == 1 and "should give 'brushlabels'" in skipped[0]
    rotated = {**point, "image_rotation": 90}
    labels, skipped = annotation_to_labels([rotated], {"Car": 1}, 40, 30)
    assert (labels == IGNORE_INDEX).all() and "rotat" in skipped[0]
    with pytest.raises(ValueError, match="unlabeled"):
        annotation_to_labels([], {"Car": IGNORE_INDEX}, 40, 30)


def test_garbage_results_are_skipped_never_raised():
    garbage = [
        None,
        {"type": 5},
        {"type": "brushlabels", "value": {"brushlabels": ["Car"], "rle": "not a list"}},
        {"type": "brushlabels", "value": {"brushlabels": ["Car"], "format": "png", "rle": [1, 2]}},
        {"type": "brushlabels", "value": {"brushlabels": ["Car"], "rle": [0, 0, 0, 4]}, "original_width": "1"},
        {"type": "polygonlabels", "value": {"polygonlabels": [["Car"]], "points": [[1, 1], [2, 2], [3, 1]]}},
        {"type": "polygonlabels", "value": {"polygonlabels": ["Car"], "points": [{"x": 1}, {"x": 2}, {"x": 3}]}},
        {"type": "polygonlabels", "value": {"polygonlabels": ["Car"], "points": [[50, 50], [50.1, 50], [50, 50.1]]}},
        {"type": "keypointlabels", "value": {"keypointlabels": ["Car"], "x": "5", "y": 5}},
        {"type": "keypointlabels", "value": [1, 2]},
        {"type": "keypointlabels", "value": {"keypointlabels": []}},
    ]
    labels, skipped = annotation_to_labels(garbage, {"Car": 1}, 40, 30)
    assert (labels == IGNORE_INDEX).all()
    assert [reason.split(":")[0].split(" (")[0] for reason in skipped] == [f"result {i}" for i in range(len(garbage))]
    assert "covers no pixel" in skipped[7] and "0 labels" in skipped[10]
