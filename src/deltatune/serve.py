"""`deltatune serve`: an OpenAI-style HTTP server for one base model with several adapters.

    GET  /health                 {"status": "ok"}
    GET  /v1/models              the base and every adapter, OpenAI's list format
    POST /v1/completions         prompt (a string or a list of strings) -> text_completion
    POST /v1/chat/completions    messages -> chat.completion, rendered with the adapter's chat template

A request names its adapter as `model` (the base's name: no adapter). Every adapter is loaded once,
under its name, into the one base; a request's rows run with their adapter through `adapter_names`
(dt.mixed_batch), so requests for different adapters that wait together share one `generate` call:
the engine's worker takes every waiting request whose decoding settings match, left-pads their prompts
into one batch and gives each row its own adapter. Requests arriving while a batch runs wait for the
next one (static batching, not continuous). `stream: true` sends server-sent events as the batch decodes.

Standard library only (http.server + json): no new dependency. The server binds 127.0.0.1 unless
told otherwise, and it has no authentication beyond an optional bearer key.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import queue
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from .config import DeltaError

BASE = "__base__"  # adapter_names' word for "no adapter"
MAX_BODY_BYTES = 1 << 20  # a prompt of a megabyte is already far past any context this serves
# Fields of OpenAI's requests that this server does not implement, with the values that mean "not used":
# a request that sets one otherwise is refused, never answered as if it had not asked.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
}


class RequestError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class Decoding:
    """How a batch decodes; only requests with equal settings share a batch."""

    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None  # sampling from a seed: a batch of its own, so the seed alone decides the samples
    only: str | None = None  # an adapter that changes the whole batch (prompt tuning, ...): batches of its rows only

    def kwargs(self) -> dict[str, Any]:
        if not self.sample:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        # top_k=0: no top-k cut, which OpenAI's API does not have (transformers samples from the top 50 otherwise)
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


@dataclass
class Row:
    ids: list[int]
    adapter: str  # an adapter's name, or BASE
    max_new: int


@dataclass
class Output:
    ids: list[int]  # the new tokens, up to and without the stop token
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens reached)
    generated: int  # tokens generated, the stop token included (what usage counts)


def generate_rows(model: Any, rows: list[Row], decoding: Decoding, pad_id: int, per_row: bool = True,
                  on_step: Callable[[list[int]], None] | None = None) -> list[Output]:
    """One `generate` call for rows that may each name another adapter: prompts left-padded, row i with its adapter.

    per_row=False (a prompt-tuning or selective adapter, which changes the whole batch): every row must name the
    same adapter, which is made the active one for the call. on_step gets each step's new token of every row."""
    from . import api
    from .surgery import get_state

    device = next(model.parameters()).device
    width = max(len(r.ids) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r.ids)) + r.ids for r in rows], device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], device=device)
    max_new = max(r.max_new for r in rows)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=pad_id,
                  eos_token_id=list(decoding.stop_ids) or None, streamer=_Steps(on_step) if on_step else None,
                  **decoding.kwargs())
    names = [r.adapter for r in rows]
    with torch.no_grad():
        if get_state(model) is None:  # a base served with no adapter at all
            assert set(names) == {BASE}, names
            out = model.generate(**kwargs)
        elif per_row:
            with api.mixed_batch(model, names):
                out = model.generate(**kwargs)
        else:
            assert len(set(names)) == 1, names
            api.set_active(model, [] if names[0] == BASE else [names[0]])
            try:
                out = model.generate(**kwargs)
            finally:
                api.set_active(model, [])
    new = out[:, width:].tolist()  # (B, new): rows that stopped early are padded after their stop token
    return [_cut(tokens[: row.max_new], decoding.stop_ids, row.max_new) for tokens, row in zip(new, rows)]


class _Steps:
    """A transformers streamer (put, end) that hands each decoding step's tokens, one per row, to a callback."""

    def __init__(self, on_step: Callable[[list[int]], None]) -> None:
        self.on_step, self.prompt_seen = on_step, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate puts the prompt first, (B, T)
            self.prompt_seen = True
            return
        self.on_step(value.reshape(-1).tolist())  # (B,)

    def end(self) -> None:
        pass


def _cut(tokens: list[int], stops: tuple[int, ...], max_new: int) -> Output:
    for i, token in enumerate(tokens):
        if token in stops:
            return Output(tokens[:i], "stop", i + 1)
    return Output(tokens, "length" if len(tokens) >= max_new else "stop", len(tokens))


@dataclass
class Job:
    rows: list[Row]
    decoding: Decoding
    steps: queue.SimpleQueue | None = None  # streamed: (row, token) per step, then None when done
    done: threading.Event = field(default_factory=threading.Event)
    outputs: list[Output] | None = None
    error: BaseException | None = None

    def finish(self, outputs: list[Output] | None, error: BaseException | None = None) -> None:
        self.outputs, self.error = outputs, error
        self.done.set()
        if self.steps is not None:
            self.steps.put(None)


class Engine:
    """A worker thread that runs waiting jobs, grouping those with equal decoding settings into one batch.

    `lock` is held for each generate call (the model is one object; its active set and batch adapters are
    state); holding it from outside makes requests queue up, which is how the tests force a shared batch."""

    def __init__(self, model: Any, pad_id: int, per_row: Mapping[str, bool], max_batch_rows: int = 16,
                 context: int | None = None) -> None:
        self.model, self.pad_id, self.per_row = model, pad_id, dict(per_row)
        self.max_batch_rows, self.context = max_batch_rows, context
        self.lock = threading.Lock()
        self.batches: deque[int] = deque(maxlen=256)  # rows in the latest generate calls, newest last
        self.calls = 0  # generate calls so far
        self._waiting: list[Job] = []
        self._changed = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="deltatune-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, rows: list[Row], decoding: Decoding, stream: bool = False) -> Job:
        """Queue the rows; the job's `done` is set when its outputs are in (and `steps` gets its tokens as they come)."""
        job = Job(rows, decoding, queue.SimpleQueue() if stream else None)
        with self._changed:
            if self._stopped:
                raise RuntimeError("the server is shutting down")
            self._waiting.append(job)
            self._changed.notify()
        return job

    def run(self, rows: list[Row], decoding: Decoding) -> list[Output]:
        """Queue the rows and wait for their outputs (what a request's thread calls)."""
        job = self.submit(rows, decoding)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.outputs is not None
        return job.outputs

    def waiting(self) -> int:
        with self._changed:
            return len(self._waiting)

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not self._waiting and not self._stopped:
                    self._changed.wait()
                if self._stopped:
                    for job in self._waiting:
                        job.finish(None, RuntimeError("the server is shutting down"))
                    return
            with self.lock:
                with self._changed:
                    jobs, self._waiting = self._waiting, []
                try:
                    groups = self._groups(jobs)
                except BaseException as err:  # noqa: BLE001 - the worker must live on, or every request would hang
                    for job in jobs:
                        job.finish(None, err)
                    continue
                for group in groups:
                    self._run(group)

    def _groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Jobs in arrival order, put together while their settings match, the rows fit and the context holds."""
        groups: list[list[Job]] = []
        for job in jobs:
            for group in groups:
                rows = [r for j in group for r in j.rows] + job.rows
                longest = max(len(r.ids) for r in rows) + max(r.max_new for r in rows)
                if (group[0].decoding == job.decoding and job.decoding.seed is None and len(rows) <= self.max_batch_rows
                        and (self.context is None or longest <= self.context)):
                    group.append(job)
                    break
            else:
                groups.append([job])
        return groups

    def _run(self, group: list[Job]) -> None:
        rows = [r for job in group for r in job.rows]
        owners = [(job, i) for job in group for i in range(len(job.rows))]  # batch row -> (its job, the job's row)
        decoding = group[0].decoding

        def on_step(tokens: list[int]) -> None:
            for (job, i), token in zip(owners, tokens):
                if job.steps is not None:
                    job.steps.put((i, token))

        streamed = any(job.steps is not None for job in group)
        try:
            if decoding.seed is not None:
                torch.manual_seed(decoding.seed)
            self.batches.append(len(rows))
            self.calls += 1
            outputs = generate_rows(self.model, rows, decoding, self.pad_id, per_row=decoding.only is None,
                                    on_step=on_step if streamed else None)
        except BaseException as err:  # noqa: BLE001 - handed to the requests' threads, which answer 500
            for job in group:
                job.finish(None, err)
            return
        start = 0
        for job in group:
            job.finish(outputs[start:start + len(job.rows)])
            start += len(job.rows)


# ---------------------------------------------------------------- the served model


@dataclass
class Served:
    """What the handlers need: the model's names, its tokenizer, one chat renderer per name, the engine."""

    base_name: str
    tokenizer: Any
    engine: Engine
    adapters: list[str]
    renderers: dict[str, Any]  # BASE or an adapter's name -> the pipeline's Renderer, with its chat template
    max_new_tokens_limit: int
    completion_stops: tuple[int, ...]  # the tokenizer's eos and the model's generation config's, as generate stops
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def adapter_of(self, name: object) -> str:
        """The adapter a request's `model` names (BASE for the base model)."""
        if name is None:
            raise RequestError(400, "missing field 'model': name the base model or an adapter "
                               f"({', '.join(self.names())})", "model")
        if not isinstance(name, str):
            raise RequestError(400, f"field 'model' must be a string, got {type(name).__name__}", "model")
        if name == self.base_name:
            return BASE
        if name in self.adapters:
            return name
        raise RequestError(404, f"the model {name!r} does not exist here; available: {', '.join(self.names())}",
                           "model", code="model_not_found")

    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]


def load_adapters(model: Any, adapters: Mapping[str, str | Path]) -> dict[str, bool]:
    """dt.load every adapter folder under its name, leave none active, and say which can act per row."""
    from . import api, io
    from .surgery import check_batch_adapters, require_state

    for name, folder in adapters.items():
        if name == BASE:
            raise DeltaError(f"{BASE!r} means 'no adapter' in a batch; name the adapter at {folder} otherwise")
        io.load(model, folder, name=name)
    if adapters:
        api.set_active(model, [])  # every request names its own; none leaks into another's rows
    state = require_state(model) if adapters else None
    per_row: dict[str, bool] = {}
    for name in adapters:
        try:
            check_batch_adapters(state, [name])
            per_row[name] = True
        except DeltaError:  # a prompt or selective delta reaches every row: its requests run in batches of their own
            per_row[name] = False
    return per_row


def make_server(model: Any, tokenizer: Any, adapters: Mapping[str, str | Path] | None = None, host: str = "127.0.0.1",
                port: int = 8000, *, base_name: str = "base", template: str | None = None,
                max_new_tokens_limit: int = 512, api_key: str | None = None, max_batch_rows: int = 16,
                log: bool = True) -> "Server":
    """An HTTP server for `model` (a causal LM) and the adapters {name: folder}, loaded into it here.

    Not yet serving: call serve_forever() (in a thread for tests; port=0 takes a free port, see
    server.server_address), and server_close() to stop it and its engine. Chat requests render with the
    adapter's saved chat template, else `template`, else the tokenizer's own (else chatml)."""
    from .pipeline.config import DataSection
    from .pipeline.render import Renderer, saved_template

    if getattr(model.config, "is_encoder_decoder", False) or not callable(getattr(model, "generate", None)):
        raise DeltaError(f"serve runs causal language models; {type(model).__name__} is not one")
    if tokenizer is None:
        raise DeltaError("serve needs the model's tokenizer")
    if max_new_tokens_limit < 1 or max_batch_rows < 1:
        raise DeltaError(f"the max_tokens limit ({max_new_tokens_limit}) and the rows in a batch ({max_batch_rows}) "
                         "must be at least 1")
    adapters = dict(adapters or {})
    if base_name in adapters:
        raise DeltaError(f"an adapter is named {base_name!r}, the base model's name; requests could not tell them apart")
    per_row = load_adapters(model, adapters)
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DeltaError("the tokenizer has neither a pad nor an eos token to pad a batch with")
    templates = {BASE: template, **{name: saved_template(folder) or template for name, folder in adapters.items()}}
    renderers = {}
    for name, chosen in templates.items():  # built now, so a template that cannot render stops the start, not a chat
        renderers[name] = Renderer(tokenizer, DataSection(chat_template=chosen))
        renderers[name].stop_ids()  # reads the end-of-turn text once, from a probe conversation
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    engine = Engine(model, pad_id, per_row, max_batch_rows=max_batch_rows, context=context)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    stops = tuple(dict.fromkeys(t for t in [tokenizer.eos_token_id, *configured] if t is not None))
    served = Served(base_name, tokenizer, engine, list(adapters), renderers, max_new_tokens_limit, stops, api_key)
    if not 0 <= port <= 65535:
        engine.stop()
        raise DeltaError(f"--port {port} is not a port: use 1-65535 (0 picks a free one)")
    try:
        server = Server((host, port), Handler)
    except OSError as err:  # in use, not ours to take (below 1024), or a host this machine does not have
        engine.stop()
        raise DeltaError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port or --host") from None
    except BaseException:
        engine.stop()
        raise
    server.served, server.log = served, log
    return server


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a client that never finishes its request does not hold the process at exit
    served: Served
    log: bool

    def server_close(self) -> None:
        super().server_close()
        served = getattr(self, "served", None)  # None when binding failed inside the constructor
        if served is not None:
            served.engine.stop()


# ---------------------------------------------------------------- requests


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive, as OpenAI's clients expect; every answer says its length

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def _get(self) -> tuple[int, dict]:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            return 200, {"status": "ok"}
        self._check_key()
        if path == "/v1/models":
            served = self.server.served
            data = [{"id": name, "object": "model", "created": served.created, "owned_by": "deltatune",
                     "root": served.base_name, "parent": None if name == served.base_name else served.base_name}
                    for name in served.names()]
            return 200, {"object": "list", "data": data}
        raise RequestError(404, f"no such endpoint: GET {path}; try /v1/models or /health", kind="not_found_error")

    def _post(self) -> tuple[int, dict | Iterator[dict]]:
        raw = self._read()  # first, whatever the answer: a body left unread would be read as the next request
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/completions", "/v1/chat/completions"):
            raise RequestError(404, f"no such endpoint: POST {path}; try /v1/completions or /v1/chat/completions",
                               kind="not_found_error")
        self._check_key()
        served = self.server.served
        request = prepare(served, _json_object(raw), chat=path == "/v1/chat/completions")
        return 200, (events(served, request) if request.stream else answer(served, request))

    def _check_key(self) -> None:
        key = self.server.served.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                               kind="authentication_error", code="invalid_api_key")

    def _read(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True  # where a body would end is unknown: the connection cannot carry another
            raise RequestError(411 if length is None else 400, "send the JSON body with a Content-Length header")
        size = int(length)
        if size > MAX_BODY_BYTES:
            self.close_connection = True
            if size <= 16 * MAX_BODY_BYTES:  # read and dropped, so the client is not reset before it reads the 413
                for start in range(0, size, 1 << 16):
                    self.rfile.read(min(1 << 16, size - start))
            raise RequestError(413, f"the request body is {size} bytes; at most {MAX_BODY_BYTES} are accepted")
        return self.rfile.read(size)

    def _answer(self, handle: Any) -> None:
        try:
            status, body = handle()
            if not isinstance(body, dict):
                self._stream(body)
                return
        except RequestError as err:
            status, body = err.status, err.body()
        except Exception:  # noqa: BLE001 - never a traceback to the client; the server's log has it
            traceback.print_exc(file=sys.stderr)
            status, body = 500, RequestError(500, "the server failed on this request; its log has the details",
                                             kind="server_error").body()
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, chunks: Iterator[dict]) -> None:
        """Server-sent events: one `data: {json}` per chunk, then `data: [DONE]`; the connection closes after."""
        self.close_connection = True  # no length to announce: the end of the stream is the end of the connection
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for chunk in chunks:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode("utf-8"))
        except (BrokenPipeError, ConnectionResetError):  # the client left; its rows finish in their batch unseen
            return
        except Exception:  # noqa: BLE001 - the status is sent already: the error goes as the stream's last event
            traceback.print_exc(file=sys.stderr)
            error = RequestError(500, "the server failed on this request; its log has the details", kind="server_error")
            self.wfile.write(f"data: {json.dumps(error.body())}\n\n".encode("utf-8"))
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if self.server.log:
            super().log_message(format, *args)


# ---------------------------------------------------------------- the two endpoints


@dataclass
class Prepared:
    """A checked request: its rows for the engine and how to answer."""

    chat: bool
    model: str  # as the request named it
    rows: list[Row]
    decoding: Decoding
    stop_texts: list[str]
    stream: bool
    include_usage: bool


def prepare(served: Served, body: dict, chat: bool) -> Prepared:
    """Check a /v1/completions (one row per prompt) or /v1/chat/completions body (the messages rendered as
    `deltatune generate --chat` renders them); a RequestError names the field at fault."""
    adapter = served.adapter_of(body.get("model"))
    tokenizer = served.tokenizer
    if chat:
        messages = _messages(body.get("messages"))
        renderer = served.renderers[adapter]
        try:
            prompt_ids = [renderer.prompt_ids(messages)]
        except DeltaError as err:  # the template refuses the conversation (roles out of order, ...)
            raise RequestError(400, str(err), "messages") from None
        stops = tuple(renderer.stop_ids())
    else:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if prompt is None:
            raise RequestError(400, "missing field 'prompt': a string or a list of strings", "prompt")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "field 'prompt' must be a string or a non-empty list of strings "
                               "(token-id prompts are not supported)", "prompt")
        if len(prompts) > served.engine.max_batch_rows:
            raise RequestError(400, f"field 'prompt' holds {len(prompts)} prompts; this server takes at most "
                               f"{served.engine.max_batch_rows} in one request (serve --max-batch)", "prompt")
        prompt_ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
        stops = served.completion_stops
    # OpenAI's default max_tokens: 16 for a completion, up to the context for a chat (here: the server's limit)
    max_new, decoding, stop_texts = _settings(body, served, stops, default_max=None if chat else 16, adapter=adapter)
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise RequestError(400, f"field 'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and options.get("include_usage") in (None, True, False)):
        raise RequestError(400, "field 'stream_options' must be an object like {\"include_usage\": true}",
                           "stream_options")
    asked = body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None
    rows = [_row(served, ids, adapter, max_new, asked) for ids in prompt_ids]
    return Prepared(chat, body["model"], rows, decoding, stop_texts, bool(stream),
                    bool(options and options.get("include_usage")))


def answer(served: Served, request: Prepared) -> dict:
    """The whole answer, once generation is done: text_completion or chat.completion, with usage."""
    outputs = served.engine.run(request.rows, request.decoding)
    choices = []
    for i, out in enumerate(outputs):
        text, reason = _text(served.tokenizer, out, request.stop_texts)
        if request.chat:  # stripped, as `deltatune generate --chat` prints it
            choices.append({"index": i, "message": {"role": "assistant", "content": text.strip()}, "logprobs": None,
                            "finish_reason": reason})
        else:
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
    kind, prefix = ("chat.completion", "chatcmpl") if request.chat else ("text_completion", "cmpl")
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": request.model, "choices": choices, "usage": _usage(request.rows, outputs)}


def events(served: Served, request: Prepared) -> Iterator[dict]:
    """The answer as chunks while the batch decodes (`stream: true`); their texts add up to answer()'s."""
    job = served.engine.submit(request.rows, request.decoding, stream=True)
    assert job.steps is not None
    kind, prefix = ("chat.completion.chunk", "chatcmpl") if request.chat else ("text_completion", "cmpl")
    head = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": request.model}

    def chunk(i: int, text: str | None, reason: str | None) -> dict:
        if request.chat:
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
            return {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        return {**head, "choices": [{"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}]}

    texts = [_Incremental(served.tokenizer, row, request.decoding.stop_ids, request.stop_texts, strip=request.chat)
             for row in request.rows]
    if request.chat:
        yield chunk(0, None, None)
    while (step := job.steps.get()) is not None:
        i, token = step
        text = texts[i]
        if text.reason is not None:
            continue  # the row has ended; the batch decodes on for others
        piece = text.add(token)
        if piece:
            yield chunk(i, piece, None)
        if text.reason is not None:
            yield chunk(i, "", text.reason)
    if job.error is not None:
        raise job.error
    assert job.outputs is not None
    for i, (text, out) in enumerate(zip(texts, job.outputs)):
        if text.reason is None:  # not seen to end (no step came): close it with the full answer's ending
            piece = text.flush(final=True)
            if piece:
                yield chunk(i, piece, None)
            yield chunk(i, "", out.finish_reason)
    if request.include_usage:
        yield {**head, "choices": [], "usage": _usage(request.rows, job.outputs)}


class _Incremental:
    """One row's text as its tokens arrive: what can be sent now, holding back what a stop string, an unfinished
    UTF-8 character or (chat) trailing white space may still change."""

    def __init__(self, tokenizer: Any, row: Row, stop_ids: tuple[int, ...], stop_texts: list[str], strip: bool) -> None:
        self.tokenizer, self.row, self.stop_ids, self.stop_texts, self.strip = tokenizer, row, stop_ids, stop_texts, strip
        self.tokens: list[int] = []
        self.sent = 0  # characters of the text sent so far
        self.reason: str | None = None  # set when the row has ended

    def add(self, token: int) -> str:
        if token in self.stop_ids:
            self.reason = "stop"
            return self.flush(final=True)
        self.tokens.append(token)
        if len(self.tokens) >= self.row.max_new:
            self.reason = "length"
            return self.flush(final=True)
        return self.flush(final=False)

    def flush(self, final: bool) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.strip:
            text = text.lstrip()
        cuts = [text.index(s) for s in self.stop_texts if s in text]
        if cuts:
            self.reason, end = "stop", min(cuts)
        elif final:
            end = len(text.rstrip()) if self.strip else len(text)
        else:
            hold = max((len(s) for s in self.stop_texts), default=1) - 1  # a stop string may be starting
            end = min(len(text) - hold, len(text.rstrip("\ufffd")), len(text.rstrip()) if self.strip else len(text))
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _messages(messages: object) -> list[dict[str, str]]:
    if messages is None:
        raise RequestError(400, "missing field 'messages': a list of {\"role\": ..., \"content\": ...}", "messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "field 'messages' must be a non-empty list of {\"role\": ..., \"content\": ...}",
                           "messages")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(400, f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: the text ones, joined
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}]")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string", f"messages[{i}]")
        plain.append({"role": m["role"], "content": content})
    return plain


def _settings(body: dict, served: Served, stop_ids: tuple[int, ...], default_max: int | None,
              adapter: str) -> tuple[int, Decoding, list[str]]:
    """The checked decoding fields: max_tokens, the Decoding a batch shares, and the stop strings."""
    for name, unused in UNSUPPORTED.items():
        if name in body and body[name] not in unused:
            raise RequestError(400, f"field {name!r} is not supported by this server; leave it out", name)
    if body.get("n") not in (None, 1):
        raise RequestError(400, "field 'n': only n=1 is supported (send a list of prompts for several completions)",
                           "n")
    limit = served.max_new_tokens_limit
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = body.get(key)
    if max_new is None:
        max_new = default_max if default_max is not None else limit
        max_new = min(max_new, limit)
    elif not _is_int(max_new) or not 1 <= max_new <= limit:
        raise RequestError(400, f"field {key!r} must be an integer from 1 to {limit} (this server's limit), "
                           f"got {max_new!r}", key)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError(400, "field 'top_p' must be above 0", "top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(400, f"field 'seed' must be an integer, got {seed!r}", "seed")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, "field 'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    sample = temperature > 0
    only = None if served.engine.per_row.get(adapter, True) else adapter
    decoding = Decoding(sample, temperature if sample else 1.0, top_p if sample else 1.0, stop_ids,
                        seed if sample else None, only)
    return max_new, decoding, stops


def _row(served: Served, ids: list[int], adapter: str, max_new: int, asked: bool) -> Row:
    if not ids:
        raise RequestError(400, "the prompt is empty after tokenisation; send some text", "prompt")
    context = served.engine.context
    if context is not None and not asked and len(ids) < context:
        max_new = min(max_new, context - len(ids))  # the default fills what the context leaves, no more
    if context is not None and len(ids) + max_new > context:
        raise RequestError(400, f"the prompt is {len(ids)} tokens and max_tokens {max_new}: more than the model's "
                           f"context of {context} tokens; shorten the prompt or lower max_tokens", "max_tokens")
    return Row(ids, adapter, max_new)


def _text(tokenizer: Any, out: Output, stop_texts: list[str]) -> tuple[str, str]:
    text = tokenizer.decode(out.ids, skip_special_tokens=True)
    cuts = [text.index(s) for s in stop_texts if s in text]
    if cuts:  # a stop string: the text before it, and the reason is "stop" whatever ended generation
        return text[: min(cuts)], "stop"
    return text, out.finish_reason


def _usage(rows: list[Row], outputs: list[Output]) -> dict[str, int]:
    prompt = sum(len(r.ids) for r in rows)
    completion = sum(o.generated for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(400, f"field {name!r} must be a number from {low:g} to {high:g}, got {value!r}", name)
    return float(value)
