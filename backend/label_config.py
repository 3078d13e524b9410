"""What the backend reads from a project's labeling config (via label-studio-sdk).

The backend serves one Image object and the KeyPointLabels, BrushLabels and PolygonLabels
controls that point at it. Their label sets are merged, in order of first appearance in
the config, into the class list the model is trained on; a class index therefore stays
stable as long as the config's labels keep their order (new labels append).
"""

from __future__ import annotations

from dataclasses import dataclass

from label_studio_sdk.label_interface import LabelInterface

from model.data import IGNORE_INDEX

SUPPORTED_CONTROLS = {"KeyPointLabels": "keypoint", "BrushLabels": "brush", "PolygonLabels": "polygon"}
# label maps are uint8 with IGNORE_INDEX (255) for "unlabeled", so classes are 0..254
MAX_CLASSES = IGNORE_INDEX
MAX_CONFIG_CHARACTERS = 1_000_000


class LabelConfigError(ValueError):
    """The labeling config cannot be served; the message says what to change."""


@dataclass(frozen=True)
class Control:
    name: str  # from_name in results
    kind: str  # keypoint | brush | polygon
    labels: tuple[str, ...]


@dataclass(frozen=True)
class LabelSchema:
    image_name: str  # to_name in results
    image_key: str  # the task data field holding the image URL ("$image" -> "image")
    controls: tuple[Control, ...]
    classes: tuple[str, ...]

    def control(self, kind: str) -> Control | None:
        return next((c for c in self.controls if c.kind == kind), None)

    @property
    def class_index(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.classes)}

    @property
    def result_types(self) -> dict[str, str]:
        """from_name -> the result ``type`` that control produces ("keypointlabels", ...)."""
        return {c.name: f"{c.kind}labels" for c in self.controls}


def parse_label_config(config: str) -> LabelSchema:
    if not isinstance(config, str):
        raise LabelConfigError(f"The labeling config must be a string of XML, got {type(config).__name__}.")
    if not config.strip():
        raise LabelConfigError("The labeling config is empty.")
    if len(config) > MAX_CONFIG_CHARACTERS:
        raise LabelConfigError(f"The labeling config is longer than {MAX_CONFIG_CHARACTERS} characters.")
    try:
        interface = LabelInterface(config)
    except Exception as error:  # noqa: BLE001 - the sdk raises several kinds on bad XML
        raise LabelConfigError(f"The labeling config is not valid XML: {str(error)[:300]}") from error
    images = [obj for obj in interface.objects if obj.tag == "Image"]
    supported = [c for c in interface.controls if c.tag in SUPPORTED_CONTROLS]
    if not images or not supported:
        raise LabelConfigError(
            "This backend needs an <Image> with at least one of <KeyPointLabels>, <BrushLabels> or "
            "<PolygonLabels> pointing at it (toName); found "
            f"objects {[o.tag for o in interface.objects]} and controls {[c.tag for c in interface.controls]}."
        )
    image = next((img for img in images if any(img.name in c.to_name for c in supported)), None)
    if image is None:
        raise LabelConfigError("No KeyPointLabels / BrushLabels / PolygonLabels control has toName set to an Image.")
    controls = []
    classes: list[str] = []
    for control in supported:
        if image.name not in control.to_name:
            continue
        labels = tuple(str(label) for label in control.labels)
        if not labels:
            raise LabelConfigError(f"<{control.tag} name={control.name!r}> has no <Label> children.")
        controls.append(Control(control.name, SUPPORTED_CONTROLS[control.tag], labels))
        classes.extend(label for label in labels if label not in classes)
    if len(classes) < 2:
        raise LabelConfigError(f"Semantic segmentation needs at least 2 labels, the config has {classes}.")
    if len(classes) > MAX_CLASSES:
        raise LabelConfigError(
            f"The config has {len(classes)} distinct labels; this backend handles at most {MAX_CLASSES} "
            "(label maps are 8-bit, with 255 meaning unlabeled). Split the labels over projects."
        )
    value = image.value or ""
    key = value[1:] if value.startswith("$") else value
    if not key:
        raise LabelConfigError(f'<Image name="{image.name}"> needs value="$field" naming the task field with the URL.')
    return LabelSchema(image_name=image.name, image_key=key, controls=tuple(controls), classes=tuple(classes))
