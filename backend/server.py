"""``segal-backend``: serve the app with gunicorn, one worker process and threads.

One process because the models live in its memory (a second worker would hold a second
copy and miss the first one's new versions); threads so /health and /webhook answer while
a prediction or a training job runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from gunicorn.app.base import BaseApplication
from gunicorn.errors import AppImportError

from .config import ConfigError, Settings
from .store import ModelDirError, prepare_model_dir


class _Gunicorn(BaseApplication):
    def __init__(self, options: dict):
        self.options = options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        from model.process import prepare_process

        from .app import create_app

        prepare_process()  # in the worker, before the models allocate anything
        _warm_up()
        try:
            return create_app(Settings.from_env())
        except ValueError as error:  # a setting this machine cannot honour (SEGAL_DEVICE, SEGAL_*_PRECISION)
            # gunicorn prints an AppImportError as one line and stops, instead of a worker traceback
            raise AppImportError(f"segal-backend: {error}") from None


def _warm_up() -> None:
    """Compile the numba kernels now, not in the first /predict (a few seconds)."""
    import torch

    from model.acquisition import score

    score("balent", torch.full((2, 2, 2, 2), 0.5))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Label Studio ML backend: Bayesian active learning for segmentation.")
    parser.add_argument("--host", help="bind address (default: $HOST or 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (default: $PORT or 9090)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
        prepare_model_dir(settings.model_dir)  # a clear message now, not a worker that fails to boot
    except (ConfigError, ModelDirError) as error:
        sys.exit(f"segal-backend: {error}")
    if settings.label_studio_api_key and not settings.label_studio_url:
        logging.getLogger(__name__).warning(
            "LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not: the key is never sent anywhere "
            "(a URL learned from /setup is used only with the token that comes with it); set LABEL_STUDIO_URL."
        )
    host = args.host or settings.host
    port = args.port or settings.port
    _Gunicorn(
        {
            "bind": f"{host}:{port}",
            "workers": 1,
            "worker_class": "gthread",
            "threads": settings.threads,
            "timeout": 600,  # a long /predict batch must not get the worker killed
            "graceful_timeout": 30,
            "accesslog": "-",
            "loglevel": "info",
        }
    ).run()


if __name__ == "__main__":
    main()
