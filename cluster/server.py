"""The Ray Serve deployment: an OpenAI-compatible chat-completions endpoint over the continuous-batching engine.

A replica runs `dynllava.batching.ContinuousEngine` in its own process (dynllava.engine_process: the model's
weights live there, and its loop never waits for this process's GIL), or with `engine_process: false` on a
thread of the replica. Each HTTP request is validated and preprocessed (images decoded, prompt tokenized) on
a worker thread, submitted to the engine, and answered from the engine's stream events, bridged into the
replica's event loop. A client that disconnects cancels its request, which frees its batch slot and K/V at the
next step.

With `batching: static`, requests are grouped by `@serve.batch` and each group runs to completion before the
next starts (the classic baseline, same engine code otherwise).
"""

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from cluster import openai_protocol as proto
from cluster.chat_inputs import to_prompt
from cluster.controller_client import ControllerClient, Orders, ray_reporter
from cluster.event_bridge import EventBridge
from cluster.openai_protocol import ApiError
from cluster.request_limits import check_request
from cluster.serve_config import ServeConfig
from cluster.serve_handle import DEPLOYMENT_NAME
from cluster.serve_metrics import ServerMetrics
from dynllava.batching import QUEUE_TIMEOUT, ContinuousEngine, EngineRequest, QueueFull, StreamEvent
from dynllava.config import SparsityConfig
from dynllava.engine import GenerationOutput, TokenLogprob
from dynllava.engine_process import EngineProcess, EngineSpec
from dynllava.inputs import normalise_pixels
from dynllava.model import DynamicLlava
from dynllava.row_errors import INPUT, TRANSIENT, RowError
from dynllava.streaming import TextStream
from dynllava.telemetry import TelemetrySnapshot, resident_bytes

log = logging.getLogger(__name__)
app = FastAPI(title="dynllava", docs_url=None, redoc_url=None)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class GenerationFailed(RuntimeError):
    """The engine failed a request (its message is the engine's; `code` is StreamEvent.code)."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def _internal(e: BaseException) -> ApiError:
    """Anything unexpected: a 500 in OpenAI's shape (the details go to the log, not to the client)."""
    if isinstance(e, GenerationFailed) and e.code == QUEUE_TIMEOUT:
        return ApiError(503, f"server overloaded: {e}", code=QUEUE_TIMEOUT, retry_after_s=1)
    if isinstance(e, GenerationFailed):
        return ApiError(500, f"generation failed: {e}")
    return ApiError(500, f"internal error ({type(e).__name__}); the server log has the details")


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown routes and methods answer in OpenAI's error shape, as every other error does."""
    message = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    return _error_response(ApiError(exc.status_code, str(message)))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(ApiError(400, f"invalid request: {exc.errors()[:1]}"))


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(app)
class LlavaServer:
    """One replica: the model, its engine and the HTTP routes."""

    def __init__(self, config: dict[str, Any]):
        self.config = ServeConfig.from_dict(config)
        cfg = self.config
        static = cfg.batching == "static"
        engine_args = dict(max_batch=cfg.max_batch, max_prefill_batch=cfg.max_batch if static else cfg.max_prefill_batch,
                           max_prefill_tokens=None if static else cfg.max_prefill_tokens,
                           kv_budget_bytes=cfg.kv_budget_bytes, max_waiting=cfg.max_waiting,
                           join_running=not static, telemetry_window_s=cfg.telemetry_window_s)
        if cfg.engine_process:  # the weights live in the engine's process; here only the tokenizer and shapes
            torch.set_num_threads(1)
            self.model = DynamicLlava.from_pretrained(cfg.model, device="meta", dtype=cfg.dtype)
            self.model.check_scorers(cfg.sparsity)
            self.engine = EngineProcess(EngineSpec(cfg.model, cfg.device, cfg.dtype, cfg.threads, engine_args))
        else:
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            self.model = DynamicLlava.from_pretrained(cfg.model, device=cfg.device, dtype=cfg.dtype)
            self.model.check_scorers(cfg.sparsity)
            self.engine = ContinuousEngine(self.model, **engine_args)
            self.engine.start()
        self.served_name = cfg.served_model_name or self.model.name
        self.default_sparsity = cfg.sparsity
        # image decoding and tokenizing: off the event loop, at most prepare_threads requests at once
        self._prepare_pool = ThreadPoolExecutor(cfg.limits.prepare_threads, thread_name_prefix="dynllava-prepare")
        if static:
            self._static_submit.set_max_batch_size(cfg.max_batch)
            self._static_submit.set_batch_wait_timeout_s(cfg.batch_wait_s)
        self.metrics = ServerMetrics(self.served_name)
        self._stop_sampling = self.metrics.start_sampling(self.engine.counters)
        self.api_key = cfg.api_key
        self.replica_id = self._replica_id()
        self._in_batcher: set[int] = set()  # id() of requests @serve.batch holds (static batching): they wait too
        self.desired_replicas = 0  # what the controller last asked for (read by record_autoscaling_stats)
        self._bridge: EventBridge | None = None  # made on the first request, in the replica's event loop
        self.controller = None
        if cfg.controller:
            self.controller = ControllerClient(self.telemetry_snapshot, self._apply_orders, ray_reporter(),
                                               cfg.report_period_s).start()
        log.info("serving %s (%s batching, default sparsity %s)", self.served_name, cfg.batching, cfg.sparsity)

    def check_health(self) -> None:
        """Ray Serve's replica health check: a replica whose engine stopped (or whose engine process died) is
        replaced."""
        if not self.engine.alive:
            raise RuntimeError(f"the engine is not running ({getattr(self.engine, 'exit_reason', None)})")

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health(self) -> Response:
        c = self.engine.counters
        body = {"status": "ok" if self.engine.alive else "engine stopped", "model": self.served_name,
                "running": c.running, "waiting": c.waiting + len(self._in_batcher), "finished": c.finished,
                "cancelled": c.cancelled, "failed": c.failed, "timed_out": c.timed_out, "preempted": c.preempted,
                "kv_bytes_in_use": c.kv_bytes_in_use, "kv_bytes_allocated": c.kv_bytes_allocated,
                "kv_blocks_free": c.kv_blocks_free, "replica": self.replica_id,
                "resident_bytes": resident_bytes()}
        return JSONResponse(body, status_code=200 if self.engine.alive else 503)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as e:
            return _error_response(e)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> Response:
        try:
            self._authorize(request)
            if model_id != self.served_name:
                raise ApiError(404, f"model {model_id!r} is not served here (this server has {self.served_name!r})",
                               param="model", code="model_not_found")
        except ApiError as e:
            return _error_response(e)
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.served_name, "object": "model", "created": 0, "owned_by": "dynllava"}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        arrived = time.perf_counter()
        try:
            self._authorize(request)
            if not self.engine.alive:
                raise ApiError(503, "the engine is not running", retry_after_s=5)
            body = await self._read_body(request)
            chat = proto.parse_request(body)
            if chat.model not in (None, "", self.served_name):
                raise ApiError(404, f"model {chat.model!r} is not served here (this server has "
                                    f"{self.served_name!r})", param="model", code="model_not_found")
            engine_request = await self._prepare(self._engine_request, chat)
            engine_request.arrived_at = arrived  # TTFT counts validation and image decoding too
            if self.config.max_queue_wait_s is not None:
                engine_request.admit_by = arrived + self.config.max_queue_wait_s
            events = self._listen(engine_request, stream=bool(chat.stream))
            ticket = await self._submit(engine_request)
            # a stream's 200 waits for its first tokens, so a request shed from the queue or failed in its
            # prefill gets its own status (503, 500) rather than an error inside a 200 stream
            first = await self._first_event(ticket, events) if chat.stream else None
        except GenerationFailed as e:
            return self._failed(e)
        except ApiError as e:
            self.metrics.outcome("busy" if e.status in (429, 503) else "rejected")
            return _error_response(e)
        except Exception as e:  # MemoryError, a bug: this request fails, in OpenAI's shape, counted
            log.exception("request failed before reaching the engine")
            self.metrics.outcome("error")
            return _error_response(_internal(e))
        prompt_tokens = engine_request.prepared.lengths[0]
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            text = TextStream(self.model.processor.tokenizer, engine_request.stop)
            return StreamingResponse(self._stream(ticket, events, text, prompt_tokens, include_usage,
                                                  chat.logprobs, first),
                                     media_type="text/event-stream")
        return await self._complete(ticket, events, prompt_tokens)

    # ------------------------------------------------------------------ control plane
    @staticmethod
    def _replica_id() -> str:
        try:
            return f"serve:{serve.get_replica_context().replica_id.unique_id}"
        except Exception:  # outside a replica (direct construction in tests)
            return f"serve:{id(object())}"

    def telemetry_snapshot(self) -> TelemetrySnapshot:
        snapshot = self.engine.snapshot(self.replica_id, "serve", self.default_sparsity)
        held = len(self._in_batcher)
        return dataclasses.replace(snapshot, queue_depth=snapshot.queue_depth + held) if held else snapshot

    def telemetry(self) -> dict[str, Any]:
        """This replica's TelemetrySnapshot as a dict (deployment-handle method)."""
        return self.telemetry_snapshot().to_dict()

    def _apply_orders(self, orders: Orders) -> None:
        """The controller's reply: follow its keep setting (queued requests too), remember its replica count."""
        changed = orders.applied_to(self.default_sparsity)
        if changed is not None:
            self.default_sparsity = changed
            self.engine.set_keep(changed.vision_keep, changed.text_keep)
            log.info("controller: sparsity -> %s", changed)
        self.desired_replicas = orders.replicas

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics for cluster.autoscaling.controller_policy."""
        return {"desired_replicas": float(self.desired_replicas)}

    # ------------------------------------------------------------------ in-cluster calls (offline jobs)
    def model_name(self) -> str:
        """The served model's name (deployment-handle method)."""
        return self.served_name

    async def generate_rows(self, pixels, prompts: list[str], max_new_tokens: int,
                            sparsity: dict[str, Any], image_sizes=None) -> list[Any]:
        """Deployment-handle method for `dynllava caption --serve-app`: rows of resized uint8 pixels
        (dynllava.inputs.resize_image's), raw prompts and the images' original sizes [N, 2] (any-res models)
        join the continuous batch beside online requests. Returns a
        GenerationOutput or RowError per row. A full queue makes these rows wait, never fail."""
        try:
            applied = self._allowed(SparsityConfig.from_dict(sparsity))
        except ValueError as e:
            return [RowError(f"sparsity: {e}", INPUT)] * len(prompts)
        images = await self._prepare(normalise_pixels, self.model.processor, pixels, image_sizes)
        return list(await asyncio.gather(*(self._offline_row(image, prompt, max_new_tokens, applied)
                                           for image, prompt in zip(images, prompts))))

    async def _prepare(self, fn: Callable, *args) -> Any:
        """fn(*args) on the prepare pool (image decoding, tokenizing), awaited."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, fn, *args)

    def _listen(self, request: EngineRequest, stream: bool) -> "asyncio.Queue[StreamEvent]":
        """The request's engine events, moved from the engine thread into this event loop's queue (through the
        replica's one EventBridge). stream=False: only the final event comes."""
        if self._bridge is None:
            self._bridge = EventBridge(asyncio.get_running_loop())
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        request.stream = stream
        request.on_event = functools.partial(self._bridge.post, events)
        return events

    async def _first_event(self, ticket: int, events: "asyncio.Queue[StreamEvent]") -> StreamEvent:
        """A request's first engine event; GenerationFailed if it is an error. A client that goes away meanwhile
        cancels the request."""
        try:
            event = await events.get()
        except BaseException:
            self.engine.cancel(ticket)
            self.metrics.outcome("cancelled")
            raise
        if event.error is not None:
            raise GenerationFailed(event.error, event.code)
        return event

    async def _follow(self, ticket: int, events: "asyncio.Queue[StreamEvent]", text: TextStream | None = None,
                      first: StreamEvent | None = None) -> AsyncIterator[tuple[str, list] | GenerationOutput]:
        """The one consumer of a request's engine events. Streaming (`text` given): yields (text delta, the new
        tokens' TokenLogprobs if asked for), at most one per stream_interval_s after the first (events that
        arrive meanwhile are coalesced, so a fast engine does not send one HTTP chunk per token through the
        proxy). Then yields the GenerationOutput. `first`: an event already taken from `events`.
        Raises GenerationFailed on the engine's error. If the consumer stops first (the client went away),
        the request is cancelled and its slot freed."""
        done, last_sent = False, -float("inf")
        try:
            while not done:
                batch, first = [first if first is not None else await events.get()], None
                if text is not None and not batch[0].final:
                    wait = self.config.stream_interval_s - (time.perf_counter() - last_sent)
                    if wait > 0:
                        await asyncio.sleep(wait)
                    while not events.empty() and not batch[-1].final:
                        batch.append(events.get_nowait())
                final = batch[-1] if batch[-1].final else None
                done = final is not None
                if final is not None and final.error is not None:
                    raise GenerationFailed(final.error, final.code)
                if text is not None:
                    delta = text.push([t for e in batch for t in e.token_ids])
                    delta += text.finish(final.output.text) if final is not None else ""
                    logprobs = [lp for e in batch for lp in e.logprobs]
                    if delta or logprobs:
                        last_sent = time.perf_counter()
                        yield delta, logprobs
                if final is not None:
                    self.metrics.finished(final.output.stats)
                    yield final.output
        finally:
            if not done:
                self.engine.cancel(ticket)

    async def _offline_row(self, image, prompt: str, max_new_tokens: int, sparsity: SparsityConfig) -> Any:
        try:
            prepared = await self._prepare(self.model.prepare, [image], [self.model.format_prompt(prompt)],
                                           max_new_tokens)
        except ValueError as e:
            return RowError.from_exception(e)
        request = EngineRequest(prepared, sparsity, max_new_tokens)
        events = self._listen(request, stream=False)
        while True:
            try:
                result = (await self._engine_submit([request]))[0]
            except ApiError as e:
                return RowError(e.message, TRANSIENT)
            if not isinstance(result, QueueFull):
                break
            await asyncio.sleep(0.05)  # back-pressure: offline rows wait for room
        if isinstance(result, Exception):
            return RowError.from_exception(result)
        try:
            async with contextlib.aclosing(self._follow(result, events)) as outputs:
                return [item async for item in outputs][-1]
        except GenerationFailed as e:
            return RowError(str(e), TRANSIENT)

    # ------------------------------------------------------------------ request handling
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is over the {limit}-byte limit")
        body = await request.body()
        if len(body) > limit:
            raise ApiError(413, f"request body of {len(body)} bytes is over the {limit}-byte limit")
        return body

    def _allowed(self, sparsity: SparsityConfig) -> SparsityConfig:
        """`sparsity` if the operator's bounds allow it and the model can run it, else ValueError."""
        self.config.sparsity_bounds.check(sparsity)
        self.model.check_scorers(sparsity)
        return sparsity

    def _sparsity(self, chat: proto.ChatCompletionRequest) -> tuple[SparsityConfig, bool]:
        """The request's sparsity, and whether it follows the replica's keep setting (it chose no keep ratio,
        so the controller's later orders apply to it while it waits)."""
        base = self.default_sparsity
        if chat.dynllava is None:
            return base, True
        asked = chat.dynllava.sparsity_fields()
        try:
            sparsity = self._allowed(base.replace(**asked))
        except ValueError as e:
            raise ApiError(400, str(e) if str(e).startswith("dynllava.") else f"dynllava: {e}",
                           param="dynllava") from None
        return sparsity, "vision_keep" not in asked and "text_keep" not in asked

    def _engine_request(self, chat: proto.ChatCompletionRequest) -> EngineRequest:
        """Validate limits, decode images and tokenize (on a worker thread)."""
        limits = self.config.limits
        max_tokens, rules = check_request(chat, limits, self.model.config.text_config.vocab_size)
        sparsity, follows = self._sparsity(chat)
        prompt, images = to_prompt(self.model.processor, chat.messages, limits, self.config.allow_remote_images)
        try:
            prepared = self.model.prepare([images], [prompt], max_tokens)
        except ValueError as e:
            raise ApiError(400, str(e).replace("prompts[0]: ", "messages: ").replace("images[0]", "image"),
                           param="messages") from None
        return EngineRequest(prepared, sparsity, max_tokens, temperature=chat.temperature, top_p=chat.top_p,
                             seed=chat.seed, stop=proto.stop_list(chat), follows_engine=follows,
                             ignore_eos=chat.ignore_eos or bool(chat.dynllava and chat.dynllava.ignore_eos),
                             rules=rules, logprobs=(chat.top_logprobs or 0) if chat.logprobs else None)

    async def _submit(self, engine_request: EngineRequest) -> int:
        if self.config.batching == "static":
            self._in_batcher.add(id(engine_request))
            try:
                result = await self._static_submit(engine_request)
            finally:
                self._in_batcher.discard(id(engine_request))
        else:
            result = (await self._engine_submit([engine_request]))[0]
        if self.controller is not None and self.engine.has_work():
            self.controller.nudge()  # it waits behind other work: let the controller see that now
        if isinstance(result, ApiError):
            raise result
        if isinstance(result, QueueFull):
            raise ApiError(429, f"server busy: {result}", code="queue_full", retry_after_s=1)
        if isinstance(result, Exception):
            raise ApiError(400, str(result))
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _static_submit(self, requests: list[EngineRequest]) -> list[int | Exception]:
        """Static batching: the requests @serve.batch grouped reach the engine together and run as one batch."""
        self._in_batcher.difference_update(id(r) for r in requests)
        try:
            return await self._engine_submit(requests)
        except ApiError as e:
            return [e] * len(requests)

    async def _engine_submit(self, requests: list[EngineRequest]) -> list[int | Exception]:
        """Queue requests in the engine: a ticket, or the ValueError / QueueFull that refused it, per request. An
        engine process answers without blocking this event loop; one that is gone is a 503."""
        try:
            return await asyncio.wrap_future(self.engine.submit_future(requests))
        except RuntimeError as e:
            if self.engine.alive:
                raise
            raise ApiError(503, f"the engine is not running: {e}", retry_after_s=5) from None

    def _extension(self, output) -> dict:
        return {"applied": output.sparsity.to_dict(), "stats": output.stats.to_dict()}

    async def _complete(self, ticket: int, events: asyncio.Queue, prompt_tokens: int) -> Response:
        finished = False
        try:
            async with contextlib.aclosing(self._follow(ticket, events)) as outputs:
                out = [item async for item in outputs][-1]
            finished = True
        except Exception as e:
            finished = True
            if not isinstance(e, GenerationFailed):
                log.exception("request %d failed", ticket)
            return self._failed(e)
        finally:
            if not finished:  # the client went away (Serve cancelled this coroutine)
                self.metrics.outcome("cancelled")
        self.metrics.outcome("ok")
        return JSONResponse(proto.completion_body(
            proto.completion_id(), self.served_name, out.text, out.finish_reason,
            proto.usage(prompt_tokens, out.stats.n_text_generated), self._extension(out),
            self._logprobs(out.logprobs) if out.logprobs is not None else None))

    def _failed(self, e: BaseException) -> JSONResponse:
        """A request the engine failed (or shed: 503, counted busy) answered in OpenAI's shape."""
        error = _internal(e)
        self.metrics.outcome("busy" if error.status == 503 else "error")
        return _error_response(error)

    def _logprobs(self, entries: list[TokenLogprob]) -> dict:
        """OpenAI's logprobs body for engine TokenLogprobs (each token id as its text)."""
        decode = self.model.processor.tokenizer.decode
        return proto.logprobs_body([(decode([e.token_id]), e.logprob, [(decode([t]), lp) for t, lp in e.top])
                                    for e in entries])

    async def _stream(self, ticket: int, events: asyncio.Queue, text: TextStream, prompt_tokens: int,
                      include_usage: bool, logprobs: bool = False, first: StreamEvent | None = None
                      ) -> AsyncIterator[str]:
        cid, name, finished = proto.completion_id(), self.served_name, False
        try:
            yield _sse(proto.chunk_body(cid, name, {"role": "assistant", "content": ""}, include_usage=include_usage))
            async with contextlib.aclosing(self._follow(ticket, events, text, first)) as items:
                async for item in items:
                    if isinstance(item, tuple):
                        delta, entries = item
                        yield _sse(proto.chunk_body(cid, name, {"content": delta}, include_usage=include_usage,
                                                    logprobs=self._logprobs(entries) if logprobs else None))
                        continue
                    finished = True
                    self.metrics.outcome("ok")
                    yield _sse(proto.chunk_body(cid, name, {}, item.finish_reason, extension=self._extension(item),
                                                include_usage=include_usage))
                    if include_usage:
                        yield _sse(proto.chunk_body(cid, name, {}, usage_=proto.usage(
                            prompt_tokens, item.stats.n_text_generated), no_choices=True))
        except Exception as e:
            finished = True
            if not isinstance(e, GenerationFailed):
                log.exception("stream of request %d failed", ticket)
            self.metrics.outcome("error")  # after its first tokens (a shed request never gets here)
            yield _sse(_internal(e).body())
        finally:
            if not finished:  # disconnected mid-stream
                self.metrics.outcome("cancelled")
        yield _sse("[DONE]")

    def __del__(self) -> None:
        if hasattr(self, "engine"):
            self._stop_sampling.set()
            if self.controller is not None:
                self.controller.stop()
            self.engine.stop()
        if hasattr(self, "_prepare_pool"):
            self._prepare_pool.shutdown(wait=False, cancel_futures=True)
