"""The Serve app's contract for in-cluster callers (offline jobs sending rows through `dynllava serve`'s
replicas): the deployment's name and the handle methods, defined once."""

from __future__ import annotations

from typing import Any

import numpy as np

from dynllava.config import SparsityConfig

DEPLOYMENT_NAME = "LlavaServer"  # the one deployment of a `dynllava serve` app


def serves_dynllava(app_name: str) -> bool:
    """Whether a running Serve app of this name is a `dynllava serve` app."""
    from ray import serve

    apps = serve.status().applications
    return app_name in apps and DEPLOYMENT_NAME in apps[app_name].deployments


class ServeEngines:
    """A running `dynllava serve` app's replicas, as an offline job calls them (blocking calls)."""

    def __init__(self, app_name: str):
        from ray import serve

        self.handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name)

    def model_name(self) -> str:
        """The served model's name (what output rows record)."""
        return self.handle.model_name.remote().result()

    def generate_rows(self, pixels: np.ndarray, prompts: list[str], max_new_tokens: int,
                      sparsity: SparsityConfig, image_sizes: np.ndarray | None = None) -> list[Any]:
        """Rows of resized uint8 pixels (dynllava.inputs.resize_image's), raw prompts and the images' original
        sizes [N, 2] (needed by any-resolution models), through the replicas' running batches. Returns a
        GenerationOutput or RowError per row."""
        return self.handle.generate_rows.remote(pixels, prompts, max_new_tokens, sparsity.to_dict(),
                                                image_sizes).result()
