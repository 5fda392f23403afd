"""The caption job's stages, each a small spec plus a UDF that validates its input columns:
decode (CPU tasks: read, validate and preprocess each image, pick the prompt) -> generate (an autoscaling pool
of engine actors) -> the Parquet write. A bad row becomes an output row with `error` set; it never stops the job.

Why our own error rows rather than Ray Data's continue-on-error (`DataContext.max_errored_blocks`): that option
drops the whole failed block, so the good rows beside a bad one would be lost and the bad one would leave no
trace in the output. Errors are caught per row instead, and every input id gets exactly one output row.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dynllava.inputs import is_anyres, load_image, normalise_pixels, resize_image
from dynllava.row_errors import TRANSIENT, RowError
from pipelines.sources import InputSpec

log = logging.getLogger(__name__)
# Columns between decode and generate; the id column of the input also travels through unchanged.
DECODED_COLUMNS = ("id", "prompt", "pixels", "image_size", "error", "error_kind")
OUTPUT_COLUMNS = ("id", "caption", "error", "error_kind", "finish_reason", "n_image_kept", "n_text_admitted",
                  "kv_bytes_peak", "latency_s", "model", "sparsity", "n_image_tokens", "n_text_generated",
                  "kv_bytes_dense", "flops_dense", "flops_sparse", "generated_at")


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: a name, its UDF (a function for CPU tasks, a class for an actor pool), the
    columns it needs, and the keyword arguments it is built with."""

    name: str
    udf: Callable
    needs: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def require_columns(batch: dict[str, Any], needs: tuple[str, ...], stage: str) -> None:
    """A stage's input contract: a missing column is a bug upstream, reported with the stage's name."""
    missing = [c for c in needs if c not in batch]
    if missing:
        raise KeyError(f"stage {stage!r}: input batch lacks columns {missing}; it has {sorted(batch)}")


def is_null(value: Any) -> bool:
    """Missing in a Ray batch: None, or NaN where Arrow turned an all-null column into floats."""
    return value is None or (isinstance(value, (float, np.floating)) and np.isnan(value))


@lru_cache(maxsize=4)
def _processor(model: str):
    from dynllava.loading import load_processor

    return load_processor(model)


def _read_bytes(path: str, base_dir: str) -> bytes:
    import pyarrow.fs as pafs

    if "://" not in path and not Path(path).is_absolute():
        path = f"{base_dir.rstrip('/')}/{path}"
    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_input_file(inner) as f:
            return f.read()
    return Path(path).expanduser().read_bytes()


def _image_bytes(value: Any, from_path: bool, base_dir: str) -> bytes:
    if is_null(value):
        raise ValueError("no image (the image column is empty)")
    if from_path:
        return _read_bytes(str(value), base_dir)
    if isinstance(value, str):  # JSONL carries images as base64 text (a data URL prefix is allowed)
        try:
            return base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value, validate=True)
        except ValueError:
            raise ValueError("image is a string but not valid base64") from None
    return bytes(value)


def decode_batch(batch: dict[str, np.ndarray], *, spec: InputSpec, model: str, default_prompt: str,
                 max_pixels: int) -> dict[str, np.ndarray]:
    """CPU task: for each row, read and check its image, resize and crop (any-res: tile) it exactly as the
    model's processor does (uint8 pixels [3, H, W], any-res [n_tiles, 3, S, S]: a quarter of the float bytes to
    ship to the actor, which only normalises; `image_size` its original height and width), and pick its prompt
    (the row's, else the job's). Rows that fail get zero pixels, an `error` and its `error_kind`
    (dynllava.row_errors); the generate stage passes them through."""
    image_col = spec.image_column or spec.image_path_column
    require_columns(batch, (spec.id_column, image_col), "decode")
    processor = _processor(model)
    n = len(batch[spec.id_column])
    if is_anyres(processor):  # a different number of tiles per row: one array per row
        pixels = np.empty(n, dtype=object)
        pixels[:] = [np.zeros((1, 3, 1, 1), dtype=np.uint8)] * n
    else:
        crop = processor.image_processor.crop_size
        pixels = np.zeros((n, 3, crop["height"], crop["width"]), dtype=np.uint8)
    sizes = np.zeros((n, 2), dtype=np.int64)
    errors: list[RowError | None] = [None] * n
    prompts = []
    for i in range(n):
        prompt = batch[spec.prompt_column][i] if spec.prompt_column else None
        prompt = default_prompt if is_null(prompt) else prompt
        prompts.append(str(prompt))
        try:
            if not str(prompt).strip():
                raise ValueError("empty prompt")
            value = batch[spec.image_column][i] if spec.image_column else None
            if is_null(value) and spec.image_path_column:
                data = _image_bytes(batch[spec.image_path_column][i], True, spec.base_dir)
            else:
                data = _image_bytes(value, False, spec.base_dir)
            pixels[i], sizes[i] = resize_image(processor, load_image(data, "image", max_pixels))
        except (ValueError, OSError) as e:
            errors[i] = RowError.from_exception(e)
    out = {"id": batch[spec.id_column].astype(str) if spec.id_column != "id" else batch["id"],
           "prompt": np.array(prompts, dtype=object), "pixels": pixels, "image_size": sizes,
           "error": np.array([e and e.message for e in errors], dtype=object),
           "error_kind": np.array([e and e.kind for e in errors], dtype=object)}
    if spec.id_column != "id":
        out[spec.id_column] = batch[spec.id_column]  # the resume key must reach the writer unchanged
    return out


class GenerateStage:
    """An engine actor: loads the model once and runs the engine's loop on its own thread; each Ray Data batch
    submits its rows and waits for them. With several batches in flight per actor (`batches_in_flight`), rows
    join the running batch as others finish instead of waiting for a batch's longest row. Rows that already
    carry an error pass through; a row the engine rejects (e.g. prompt longer than the context) or that fails
    (a prefill out of memory even alone) gets its own error without failing the others.
    `loader(model, device=, dtype=)` builds the model (injected by tests); `engine` holds ContinuousEngine's
    scheduling knobs (max_batch, max_prefill_batch, max_prefill_tokens, refill_at); `threads`: torch CPU threads."""

    def __init__(self, model: str, sparsity: dict, max_new_tokens: int, device: str | None = None,
                 dtype: str | None = None, loader: Callable | None = None, extra_columns: tuple[str, ...] = (),
                 controller: bool = False, reporter: Callable[[dict], dict] | None = None,
                 engine: dict | None = None, threads: int | None = None):
        import torch

        from dynllava.batching import ContinuousEngine
        from dynllava.model import DynamicLlava

        if threads:
            torch.set_num_threads(threads)

        self.model = (loader or DynamicLlava.from_pretrained)(model, device=device, dtype=dtype)
        self.set_sparsity(sparsity)
        self.max_new_tokens = max_new_tokens
        self.extra_columns = extra_columns
        self.model_name = self.model.name
        self.actor_id = f"data:{uuid.uuid4().hex[:12]}"
        # the queue only ever holds the rows of the batches in flight (Ray Data bounds those)
        self.engine = ContinuousEngine(self.model, max_waiting=1 << 20, **(engine or {}))
        self.engine.start()
        self.controller = None
        if controller or reporter is not None:  # reporter(snapshot dict) -> reply: injected by tests
            from cluster.controller_client import ControllerClient, ray_reporter

            self.controller = ControllerClient(
                lambda: self.engine.snapshot(self.actor_id, "data", self.sparsity), self._apply_orders,
                reporter or ray_reporter()).start()

    def set_sparsity(self, sparsity: dict) -> None:
        """The setting for rows submitted from now on (a SparsityConfig as a dict)."""
        from dynllava.config import SparsityConfig

        self.sparsity = SparsityConfig.from_dict(sparsity)
        self.sparsity_json = json.dumps(self.sparsity.to_dict(), sort_keys=True)

    def _apply_orders(self, orders) -> None:
        """Apply the controller's keep setting to new and queued rows."""
        changed = orders.applied_to(self.sparsity)
        if changed is not None:
            self.set_sparsity(changed.to_dict())
            self.engine.set_keep(changed.vision_keep, changed.text_keep)
            log.info("controller: sparsity -> %s", changed)

    def generate_rows(self, pixels: np.ndarray, prompts: list[str], image_sizes: np.ndarray) -> list[Any]:
        """Rows' uint8 pixels (decode_batch's), raw prompts and original image sizes [N, 2] -> GenerationOutput or
        RowError per row."""
        images = normalise_pixels(self.model.processor, pixels, image_sizes)
        return self._generate(images, [self.model.format_prompt(p) for p in prompts])

    def _generate(self, images: list, prompts: list[str]) -> list[Any]:
        """Submit each row to the engine and wait for all of them. Returns GenerationOutput or RowError per row
        (the engine's own failures are transient; what its checks refuse is the row's)."""
        import threading

        from dynllava.batching import EngineRequest

        results: list[Any] = [None] * len(prompts)
        pending: dict[int, int] = {}  # request index -> row
        requests = []
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            try:
                prepared = self.model.prepare([image], [prompt], self.max_new_tokens)
            except ValueError as e:
                results[i] = RowError.from_exception(e)
                continue
            pending[len(requests)] = i
            requests.append(EngineRequest(prepared, self.sparsity, self.max_new_tokens, stream=False,
                                          follows_engine=True))
        lock, done = threading.Lock(), threading.Event()
        left = [len(requests)]

        def finished(row: int) -> Callable:
            def on_event(event) -> None:
                with lock:
                    results[row] = event.output if event.output is not None else RowError(event.error, TRANSIENT)
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
            return on_event

        for index, request in enumerate(requests):
            request.on_event = finished(pending[index])
        refused = 0
        for index, ticket in enumerate(self.engine.submit_many(requests)):
            if isinstance(ticket, Exception):
                results[pending[index]] = RowError.from_exception(ticket)
                refused += 1
        with lock:
            left[0] -= refused
            if left[0] == 0:
                done.set()
        while not done.wait(timeout=5.0):
            if not self.engine.alive:
                raise RuntimeError("the engine's loop stopped; this actor is broken")
        return results

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        require_columns(batch, DECODED_COLUMNS + self.extra_columns, "generate")
        n = len(batch["id"])
        ok = [i for i in range(n) if is_null(batch["error"][i])]
        results: dict[int, Any] = {}
        if ok:
            results = dict(zip(ok, self.generate_rows(batch["pixels"][ok], [str(batch["prompt"][i]) for i in ok],
                                                      batch["image_size"][ok])))
        generated_at = time.time()
        if self.controller is not None:  # besides the periodic reports: the batch's rows count at once
            self.controller.report_once()
        out: dict[str, list] = {c: [] for c in OUTPUT_COLUMNS}
        for i in range(n):
            res = results[i] if i in results else RowError(batch["error"][i], batch["error_kind"][i])
            good = not isinstance(res, RowError)
            s = res.stats if good else None
            out["id"].append(batch["id"][i])
            out["caption"].append(res.text.strip() if good else None)
            out["error"].append(None if good else res.message)
            out["error_kind"].append(None if good else res.kind)
            out["finish_reason"].append(res.finish_reason if good else None)
            out["n_image_kept"].append(s.n_image_kept if good else 0)
            out["n_text_admitted"].append(s.n_text_admitted if good else 0)
            out["kv_bytes_peak"].append(s.kv_bytes_peak if good else 0)
            out["latency_s"].append(s.ttft_s + s.decode_s if good else 0.0)  # submission to the row's last token
            out["model"].append(self.model_name)
            out["sparsity"].append(json.dumps(res.sparsity.to_dict(), sort_keys=True) if good else self.sparsity_json)
            out["n_image_tokens"].append(s.n_image_tokens if good else 0)
            out["n_text_generated"].append(s.n_text_generated if good else 0)
            out["kv_bytes_dense"].append(s.kv_bytes_dense_equivalent if good else 0)
            out["flops_dense"].append(s.flops_dense if good else 0.0)
            out["flops_sparse"].append(s.flops_sparse if good else 0.0)
            out["generated_at"].append(generated_at)
        text = ("id", "caption", "error", "error_kind", "finish_reason", "model", "sparsity")
        columns = {c: np.array(v, dtype=object if c in text else None) for c, v in out.items()}
        for c in self.extra_columns:
            columns[c] = batch[c]
        return columns


class ServeGenerateStage(GenerateStage):
    """The generate stage sent through a running Serve app's replicas (`dynllava caption --serve-app NAME`):
    rows join the replicas' continuous batches beside online traffic, so both share one pool of engines. The
    actors of this stage only wait on the handle; they hold no model."""

    def __init__(self, app_name: str, sparsity: dict, max_new_tokens: int, extra_columns: tuple[str, ...] = ()):
        from cluster.serve_handle import ServeEngines

        self.engines = ServeEngines(app_name)
        self.set_sparsity(sparsity)
        self.max_new_tokens = max_new_tokens
        self.extra_columns = extra_columns
        self.model_name = self.engines.model_name()
        self.controller = None  # the replicas report for themselves

    def generate_rows(self, pixels: np.ndarray, prompts: list[str], image_sizes: np.ndarray) -> list[Any]:
        return self.engines.generate_rows(pixels, prompts, self.max_new_tokens, self.sparsity, image_sizes)
