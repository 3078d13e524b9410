"""The Label Studio API calls of the project loop, through label-studio-sdk.

- ``pool_pages``: the project's tasks without a submitted annotation, by ascending id, one
  page at a time. Paged by "id greater than the last one seen" rather than by page number,
  so tasks annotated while a job runs do not shift the pages under it, and never past the
  end (Label Studio logs a traceback for a page past the end).
- ``push_predictions``: many predictions in one request (``import_predictions``).
- ``delete_prediction``, ``set_model_version``: supersede old versions and make the Data
  Manager's "Prediction score" column use the new one (it averages only the predictions whose
  ``model_version`` equals the project's).
- ``authorize_webhooks``: Label Studio's webhook for a connected backend carries no basic-auth
  credentials; give it the backend's, as a header, so annotation events get through.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

PAGE_SIZE = 50  # tasks per listing request; with their predictions' results, a few MB at most
OWN_VERSION = re.compile(r"^segal-v\d+(-untrained)?$")  # this backend's predictions; others are never touched


@dataclass
class PoolTask:
    task: dict  # id, data: what Predictor needs
    own_predictions: list[tuple[int, str]]  # (prediction id, model_version) of this backend's predictions


@dataclass
class PoolPage:
    tasks: list[PoolTask]
    remaining: int  # tasks after the last id of the previous page, this page included


def _filters(after_id: int) -> str:
    items = [
        {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
        {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": after_id},
    ]
    return json.dumps({"filters": {"conjunction": "and", "items": items}, "ordering": ["tasks:id"]})


def sdk_client(url: str, api_key: str):
    """A label-studio-sdk client for `url` with `api_key`; an error that says the fix when the
    backend knows neither."""
    from label_studio_sdk import LabelStudio

    if not (url and api_key):
        raise RuntimeError(
            "Training pulls annotations from Label Studio: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY."
        )
    return LabelStudio(base_url=url, api_key=api_key)


class LabelStudioProject:
    """One project's side of the loop; `client_factory(project)` gives a label-studio-sdk client."""

    def __init__(self, client_factory: Callable[[str], object], project: str):
        self.client_factory = client_factory
        self.project = project
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = self.client_factory(self.project)
        return self._client

    def pool_pages(self, page_size: int = PAGE_SIZE) -> Iterator[PoolPage]:
        after = 0
        while True:
            pager = self.client.tasks.list(
                project=int(self.project), page=1, page_size=page_size, fields="all",
                include="id,data,predictions,total_annotations", query=_filters(after),
            )  # fmt: skip
            remaining = int(getattr(pager.response, "total", 0) or 0)
            items = [item.model_dump() if hasattr(item, "model_dump") else dict(item) for item in pager.items]
            if not items:
                return
            tasks = []
            for item in items:
                own = [
                    (int(p["id"]), str(p.get("model_version")))
                    for p in item.get("predictions") or []
                    if isinstance(p, dict) and p.get("id") is not None
                    and OWN_VERSION.match(str(p.get("model_version")))
                ]
                tasks.append(PoolTask({"id": item["id"], "data": item.get("data") or {}}, own))
            yield PoolPage(tasks, remaining)
            if len(items) >= remaining:
                return
            after = int(items[-1]["id"])

    def push_predictions(self, predictions: list[dict]) -> None:
        from label_studio_sdk import PredictionRequest

        request = [
            PredictionRequest(
                task=p["task"], result=p["result"], score=p["score"], model_version=p["model_version"]
            )
            for p in predictions
        ]
        self.client.projects.import_predictions(id=int(self.project), request=request)

    def delete_prediction(self, prediction_id: int) -> None:
        self.client.predictions.delete(id=prediction_id)

    def label_config(self) -> str:
        return self.client.projects.get(id=int(self.project)).label_config

    def model_version(self) -> str | None:
        return self.client.projects.get(id=int(self.project)).model_version

    def set_model_version(self, version: str) -> None:
        self.client.projects.update(id=int(self.project), model_version=version)

    def authorize_webhooks(self, user: str, password: str) -> tuple[int, int]:
        """Give the webhooks Label Studio made for this project's ML backends (``<backend
        url>/webhook``) a basic-auth header; returns (how many carry it now, how many changed)."""
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        header = f"Basic {token}"
        backend_hooks = {
            str(ml.url).rstrip("/") + "/webhook" for ml in self.client.ml.list(project=int(self.project)) if ml.url
        }
        authorized = changed = 0
        for hook in self.client.webhooks.list(project=str(self.project)):
            if hook.url not in backend_hooks:
                continue
            headers = dict(hook.headers) if isinstance(hook.headers, dict) else {}
            if headers.get("Authorization") != header:
                headers["Authorization"] = header
                self.client.webhooks.update(id=hook.id, headers=headers)
                changed += 1
            authorized += 1
        return authorized, changed
