"""CamVid-layout reading: real split, channel order, void mapping, and errors that say what is wrong."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from model.data import CAMVID_CLASSES, CAMVID_VOID, IGNORE_INDEX, SegmentationFolder, load_image, load_label


def test_camvid_splits_load_with_void_mapped_to_ignore(camvid_dir):
    train, val = SegmentationFolder(camvid_dir, "train"), SegmentationFolder(camvid_dir, "val")
    assert (len(train), len(val)) == (367, 101)
    image, labels = train[0]
    assert image.shape == (3, 360, 480) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert labels.shape == (360, 480) and labels.dtype == torch.int64
    values = set(labels.unique().tolist())
    assert values <= set(range(len(CAMVID_CLASSES))) | {IGNORE_INDEX}
    raw = SegmentationFolder(camvid_dir, "train", void_index=None)[0][1]
    assert CAMVID_VOID in raw.unique().tolist()  # this frame has void pixels ...
    assert torch.equal(labels == IGNORE_INDEX, raw == CAMVID_VOID)  # ... and exactly those became ignore


def test_scaled_loading_halves_both(camvid_dir):
    image, labels = SegmentationFolder(camvid_dir, "val", scale=0.5)[3]
    assert image.shape == (3, 180, 240) and labels.shape == (180, 240)


def test_load_image_is_rgb(tmp_path):
    bgr = np.zeros((4, 5, 3), dtype=np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    path = tmp_path / "red.png"
    cv2.imwrite(str(path), bgr)
    image = load_image(path)
    assert image.shape == (3, 4, 5)
    assert torch.equal(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_missing_corrupt_and_color_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such image file"):
        load_image(tmp_path / "missing.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ValueError, match="Could not decode"):
        load_image(corrupt)
    color = tmp_path / "color.png"
    channels = [np.zeros((3, 3), np.uint8), np.ones((3, 3), np.uint8), np.zeros((3, 3), np.uint8)]
    cv2.imwrite(str(color), np.dstack(channels))  # not gray: channels differ
    with pytest.raises(ValueError, match="single-channel"):
        load_label(color)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="Missing folder"):
        SegmentationFolder(tmp_path, "train")
    (tmp_path / "train").mkdir()
    (tmp_path / "trainannot").mkdir()
    with pytest.raises(ValueError, match="No images"):
        SegmentationFolder(tmp_path, "train")
    cv2.imwrite(str(tmp_path / "train" / "a.png"), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="no label file"):
        SegmentationFolder(tmp_path, "train")
    cv2.imwrite(str(tmp_path / "trainannot" / "a.png"), np.full((2, 2), 3, np.uint8))
    image, labels = SegmentationFolder(tmp_path, "train")[0]
    assert image.shape == (3, 2, 2) and labels.tolist() == [[3, 3], [3, 3]]
