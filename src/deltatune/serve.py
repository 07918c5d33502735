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
next one (static batching; no continuous batching, no streaming yet).

Standard library only (http.server + json): no new dependency. The server binds 127.0.0.1 unless
told otherwise, and it has no authentication beyond an optional bearer key.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping

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
    alone: object = None  # a seeded request, or an adapter that cannot act per row: a batch of its own

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


def generate_rows(model: Any, rows: list[Row], decoding: Decoding, pad_id: int, per_row: bool = True) -> list[Output]:
    """One `generate` call for rows that may each name another adapter: prompts left-padded, row i with its adapter.

    per_row=False (a prompt-tuning or selective adapter, which changes the whole batch): every row must name the
    same adapter, which is made the active one for the call."""
    from . import api
    from .surgery import get_state

    device = next(model.parameters()).device
    width = max(len(r.ids) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r.ids)) + r.ids for r in rows], device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], device=device)
    max_new = max(r.max_new for r in rows)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=pad_id,
                  eos_token_id=list(decoding.stop_ids) or None, **decoding.kwargs())
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


def _cut(tokens: list[int], stops: tuple[int, ...], max_new: int) -> Output:
    for i, token in enumerate(tokens):
        if token in stops:
            return Output(tokens[:i], "stop", i + 1)
    return Output(tokens, "length" if len(tokens) >= max_new else "stop", len(tokens))


@dataclass
class Job:
    rows: list[Row]
    decoding: Decoding
    done: threading.Event = field(default_factory=threading.Event)
    outputs: list[Output] | None = None
    error: BaseException | None = None


class Engine:
    """A worker thread that runs waiting jobs, grouping those with equal decoding settings into one batch.

    `lock` is held for each generate call (the model is one object; its active set and batch adapters are
    state); holding it from outside makes requests queue up, which is how the tests force a shared batch."""

    def __init__(self, model: Any, pad_id: int, per_row: Mapping[str, bool], max_batch_rows: int = 16,
                 context: int | None = None) -> None:
        self.model, self.pad_id, self.per_row = model, pad_id, dict(per_row)
        self.max_batch_rows, self.context = max_batch_rows, context
        self.lock = threading.Lock()
        self.batches: list[int] = []  # rows in each generate call, newest last (for tests and curiosity)
        self._waiting: list[Job] = []
        self._changed = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="deltatune-serve-engine", daemon=True)
        self._thread.start()

    def run(self, rows: list[Row], decoding: Decoding) -> list[Output]:
        """Queue the rows and wait for their outputs (what a request's thread calls)."""
        job = Job(rows, decoding)
        with self._changed:
            if self._stopped:
                raise RuntimeError("the server is shutting down")
            self._waiting.append(job)
            self._changed.notify()
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
                        job.error = RuntimeError("the server is shutting down")
                        job.done.set()
                    return
            with self.lock:
                with self._changed:
                    jobs, self._waiting = self._waiting, []
                for group in self._groups(jobs):
                    self._run(group)

    def _groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Jobs in arrival order, put together while their settings match, the rows fit and the context holds."""
        groups: list[list[Job]] = []
        for job in jobs:
            for group in groups:
                rows = [r for j in group for r in j.rows] + job.rows
                longest = max(len(r.ids) for r in rows) + max(r.max_new for r in rows)
                if (group[0].decoding == job.decoding and job.decoding.alone is None and len(rows) <= self.max_batch_rows
                        and (self.context is None or longest <= self.context)):
                    group.append(job)
                    break
            else:
                groups.append([job])
        return groups

    def _run(self, group: list[Job]) -> None:
        rows = [r for job in group for r in job.rows]
        decoding = group[0].decoding
        try:
            per_row = all(self.per_row.get(r.adapter, True) for r in rows)
            if isinstance(decoding.alone, int) and not isinstance(decoding.alone, bool):
                torch.manual_seed(decoding.alone)  # a seeded request runs alone, so its seed decides its samples
            self.batches.append(len(rows))
            outputs = generate_rows(self.model, rows, decoding, self.pad_id, per_row=per_row)
        except BaseException as err:  # noqa: BLE001 - handed to the requests' threads, which answer 500
            for job in group:
                job.error = err
                job.done.set()
            return
        start = 0
        for job in group:
            job.outputs = outputs[start:start + len(job.rows)]
            start += len(job.rows)
            job.done.set()


# ---------------------------------------------------------------- the served model


@dataclass
class Served:
    """What the handlers need: the model's names, its tokenizer, one chat renderer per name, the engine."""

    base_name: str
    tokenizer: Any
    engine: Engine
    adapters: list[str]
    templates: dict[str, str | None]  # name -> the chat template to render with (None: the tokenizer's own)
    max_new_tokens_limit: int
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    _renderers: dict[str, Any] = field(default_factory=dict)
    _render_lock: threading.Lock = field(default_factory=threading.Lock)

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

    def renderer(self, adapter: str) -> Any:
        from .pipeline.config import DataSection
        from .pipeline.render import Renderer

        with self._render_lock:  # built once per name, on first use (reading the end-of-turn text renders a probe)
            if adapter not in self._renderers:
                renderer = Renderer(self.tokenizer, DataSection(chat_template=self.templates.get(adapter)))
                renderer.stop_ids()
                self._renderers[adapter] = renderer
            return self._renderers[adapter]


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
    from .pipeline.render import saved_template

    if getattr(model.config, "is_encoder_decoder", False) or not callable(getattr(model, "generate", None)):
        raise DeltaError(f"serve runs causal language models; {type(model).__name__} is not one")
    if tokenizer is None:
        raise DeltaError("serve needs the model's tokenizer")
    if max_new_tokens_limit < 1:
        raise DeltaError(f"the max_tokens limit must be at least 1, got {max_new_tokens_limit}")
    adapters = dict(adapters or {})
    if base_name in adapters:
        raise DeltaError(f"an adapter is named {base_name!r}, the base model's name; requests could not tell them apart")
    per_row = load_adapters(model, adapters)
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DeltaError("the tokenizer has neither a pad nor an eos token to pad a batch with")
    templates: dict[str, str | None] = {BASE: template}
    for name, folder in adapters.items():
        templates[name] = saved_template(folder) or template  # the template the adapter was trained with
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    engine = Engine(model, pad_id, per_row, max_batch_rows=max_batch_rows, context=context)
    served = Served(base_name, tokenizer, engine, list(adapters), templates, max_new_tokens_limit, api_key)
    try:
        server = Server((host, port), Handler)
    except BaseException:
        engine.stop()
        raise
    server.served, server.context, server.log = served, context, log
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
    context: int | None
    log: bool

    def server_close(self) -> None:
        super().server_close()
        self.served.engine.stop()


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

    def _post(self) -> tuple[int, dict]:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/completions", "/v1/chat/completions"):
            raise RequestError(404, f"no such endpoint: POST {path}; try /v1/completions or /v1/chat/completions",
                               kind="not_found_error")
        self._check_key()
        body = self._body()
        if path == "/v1/completions":
            return 200, complete(self.server.served, body)
        return 200, chat(self.server.served, body)

    def _check_key(self) -> None:
        key = self.server.served.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                               kind="authentication_error", code="invalid_api_key")

    def _body(self) -> dict:
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
        raw = self.rfile.read(size)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(400, f"the body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def _answer(self, handle: Any) -> None:
        try:
            status, body = handle()
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

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if self.server.log:
            super().log_message(format, *args)


# ---------------------------------------------------------------- the two endpoints


def complete(served: Served, body: dict) -> dict:
    """POST /v1/completions: one choice per prompt."""
    adapter = served.adapter_of(body.get("model"))
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if prompt is None:
        raise RequestError(400, "missing field 'prompt': a string or a list of strings", "prompt")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, "field 'prompt' must be a string or a non-empty list of strings "
                           "(token-id prompts are not supported)", "prompt")
    tokenizer = served.tokenizer
    stops = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    max_new, decoding, stop_texts = _settings(body, served, stops, default_max=16, adapter=adapter)
    rows = [_row(served, list(tokenizer(p)["input_ids"]), adapter, max_new) for p in prompts]
    outputs = served.engine.run(rows, decoding)
    choices = []
    for i, out in enumerate(outputs):
        text, reason = _text(tokenizer, out, stop_texts)
        choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body["model"], "choices": choices, "usage": _usage(rows, outputs)}


def chat(served: Served, body: dict) -> dict:
    """POST /v1/chat/completions: the messages rendered as `deltatune generate --chat` renders them."""
    adapter = served.adapter_of(body.get("model"))
    messages = _messages(body.get("messages"))
    renderer = served.renderer(adapter)
    try:
        ids = renderer.prompt_ids(messages)
    except DeltaError as err:  # the template refuses the conversation (roles out of order, ...)
        raise RequestError(400, str(err), "messages") from None
    max_new, decoding, stop_texts = _settings(body, served, tuple(renderer.stop_ids()), default_max=None,
                                              adapter=adapter)
    rows = [_row(served, ids, adapter, max_new)]
    outputs = served.engine.run(rows, decoding)
    text, reason = _text(served.tokenizer, outputs[0], stop_texts)
    choice = {"index": 0, "message": {"role": "assistant", "content": text.strip()}, "logprobs": None,
              "finish_reason": reason}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "choices": [choice], "usage": _usage(rows, outputs)}


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
    if body.get("stream") not in (None, False):
        raise RequestError(400, "field 'stream': streaming is not supported yet; send stream: false", "stream")
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
    alone: object = None
    if sample and seed is not None:
        alone = seed  # the seed reproduces the answer only if the batch holds this request alone
    elif not served.engine.per_row.get(adapter, True):
        alone = object()  # an adapter that changes the whole batch: a batch of its own (compared by identity)
    decoding = Decoding(sample, temperature if sample else 1.0, top_p if sample else 1.0, stop_ids, alone)
    return max_new, decoding, stops


def _row(served: Served, ids: list[int], adapter: str, max_new: int) -> Row:
    if not ids:
        raise RequestError(400, "the prompt is empty after tokenisation; send some text", "prompt")
    context = served.engine.context
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
