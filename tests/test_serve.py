"""`deltatune serve`: the OpenAI-style server, run in a thread on a free port against a tiny llama.

Two LoRA adapters with random (non-zero) B matrices, so each changes what the model writes: every answer
the server gives is checked against `model.generate` on a second copy of the model with that adapter alone."""

from __future__ import annotations

import http.client
import json
import threading

import pytest
import torch
import transformers as tf

import deltatune as dt
from deltatune import serve
from deltatune.cli import chat_renderer, main as cli
from deltatune.pipeline.chat_templates import template_source

from pipeline_models import save_tiny

BASE = "tiny-llama"
PROMPTS = ["the cat sat on", "one two three", "hello world, this is a longer prompt than the others"]


def _adapter(base, folder, seed: int, config=None):
    model = tf.AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    dt.attach(model, config or dt.LoraConfig(r=4, init="none"))  # init none: B random too, so the delta shows in the output
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_A" not in name:  # LoRA's B, the virtual tokens
                p.mul_(20.0)  # large enough that greedy tokens change
    dt.save(model, folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = save_tiny(root, "llama")
    a, b = _adapter(base, root / "a", 1), _adapter(base, root / "b", 2)
    (a / "chat_template.jinja").write_text(template_source("zephyr"))  # a trained with zephyr; the base: chatml
    # prompt tuning changes the whole batch (virtual tokens before every row): its requests run in batches of their own
    p = _adapter(base, root / "p", 3, dt.PromptTuningConfig(num_virtual_tokens=16, init="sample_vocab"))
    return {"base": base, "a": a, "b": b, "p": p}


@pytest.fixture(scope="module")
def tokenizer(files):
    return tf.AutoTokenizer.from_pretrained(files["base"])


@pytest.fixture(scope="module")
def server(files, tokenizer):
    model = tf.AutoModelForCausalLM.from_pretrained(files["base"])
    adapters = {"a": files["a"], "b": files["b"], "p": files["p"]}
    srv = serve.make_server(model, tokenizer, adapters, port=0, base_name=BASE, log=False)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def reference(files):
    """name -> a model with only that adapter (None: the base), for model.generate directly."""
    models = {}
    for name in (None, "a", "b", "p"):
        model = tf.AutoModelForCausalLM.from_pretrained(files["base"]).eval()
        if name is not None:
            dt.load(model, files[name])
        models[name] = model
    return models


def request(srv, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def direct(model, tokenizer, ids: list[int], max_new: int, stops: list[int]) -> tuple[str, int, str]:
    """model.generate alone: the text, the tokens generated (a stop token included) and the finish reason."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stops)
    new = out[0, len(ids):].tolist()
    reason = "stop" if new and new[-1] in stops else "length"
    return tokenizer.decode(new, skip_special_tokens=True), len(new), reason


def test_greedy_completions_equal_generate_with_that_adapter_and_differ_between_adapters(server, reference, tokenizer):
    texts = {}
    for name, model_name in ((None, BASE), ("a", "a"), ("b", "b"), ("p", "p")):
        status, body = request(server, "POST", "/v1/completions", {"model": model_name, "prompt": PROMPTS[0],
                                                                   "max_tokens": 8, "temperature": 0})
        assert status == 200, body
        ids = tokenizer(PROMPTS[0])["input_ids"]
        want, generated, reason = direct(reference[name], tokenizer, ids, 8, [tokenizer.eos_token_id])
        choice = body["choices"][0]
        assert body["object"] == "text_completion" and body["model"] == model_name
        assert choice["text"] == want
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": generated,
                                 "total_tokens": len(ids) + generated}
        assert choice["finish_reason"] == reason
        texts[model_name] = want
    assert len(set(texts.values())) == 4, texts  # each adapter, and the base, writes its own answer


@pytest.mark.parametrize("name", ["b", "p"])
def test_a_list_of_prompts_gets_one_choice_each_as_each_alone(server, reference, tokenizer, name):
    status, body = request(server, "POST", "/v1/completions", {"model": name, "prompt": PROMPTS, "max_tokens": 6,
                                                               "temperature": 0})
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS, body["choices"]):
        want, *_ = direct(reference[name], tokenizer, tokenizer(prompt)["input_ids"], 6, [tokenizer.eos_token_id])
        assert choice["text"] == want  # left-padded in one batch, the same tokens as alone


def test_concurrent_requests_for_different_adapters_share_one_batch_and_answer_as_alone(server, reference, tokenizer):
    jobs = [("a", PROMPTS[0]), ("b", PROMPTS[2]), ("p", PROMPTS[0]), (BASE, PROMPTS[1]), ("a", PROMPTS[1]),
            ("p", PROMPTS[2])]
    answers: dict[int, tuple[int, dict]] = {}
    engine = server.served.engine
    before = engine.calls
    with server.served.engine.lock:  # the worker waits, so all four requests queue up behind it
        threads = [threading.Thread(target=lambda i=i, m=m, p=p: answers.__setitem__(i, request(
            server, "POST", "/v1/completions", {"model": m, "prompt": p, "max_tokens": 7, "temperature": 0})))
            for i, (m, p) in enumerate(jobs)]
        for t in threads:
            t.start()
        for _ in range(600):
            if server.served.engine.waiting() == len(jobs):
                break
            threading.Event().wait(0.05)
        assert server.served.engine.waiting() == len(jobs)
    for t in threads:
        t.join(timeout=60)
    # one generate call for four rows with two adapters and the base, one for the prompt-tuning adapter's two
    assert engine.calls == before + 2 and list(engine.batches)[-2:] == [4, 2]
    for i, (model_name, prompt) in enumerate(jobs):
        status, body = answers[i]
        assert status == 200, body
        want, *_ = direct(reference[None if model_name == BASE else model_name], tokenizer,
                         tokenizer(prompt)["input_ids"], 7, [tokenizer.eos_token_id])
        assert body["choices"][0]["text"] == want and body["model"] == model_name


@pytest.mark.parametrize("name,template", [("a", "zephyr"), (BASE, None)])
def test_chat_renders_the_adapters_template_and_answers_as_generate(server, reference, tokenizer, name, template):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is one plus one"}]
    renderer = chat_renderer(tokenizer, template_source(template) if template else None)
    ids = renderer.prompt_ids(messages)
    status, body = request(server, "POST", "/v1/chat/completions",
                           {"model": name, "messages": messages, "max_tokens": 6, "temperature": 0})
    assert status == 200, body
    want, generated, reason = direct(reference[None if name == BASE else name], tokenizer, ids, 6, renderer.stop_ids())
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want.strip()}
    assert body["choices"][0]["finish_reason"] == reason
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == generated
    # the two templates differ, so the prompt really was rendered with this name's template
    other = chat_renderer(tokenizer, None if template else template_source("zephyr")).prompt_ids(messages)
    assert other != ids


def test_models_and_health(server):
    status, body = request(server, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [BASE, "a", "b", "p"]
    assert [m["parent"] for m in body["data"]] == [None, BASE, BASE, BASE]
    assert request(server, "GET", "/health") == (200, {"status": "ok"})


@pytest.mark.parametrize("path,body,status,param,words", [
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "available: tiny-llama, a, b, p"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "missing field 'model'"),
    ("/v1/completions", {"model": "a"}, 400, "prompt", "missing field 'prompt'"),
    ("/v1/completions", {"model": "a", "prompt": [1, 2]}, 400, "prompt", "list of strings"),
    ("/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens", "from 1 to 512"),
    ("/v1/completions", {"model": "a", "prompt": ["x"] * 17}, 400, "prompt", "at most 16 in one request"),
    ("/v1/completions", {"model": "a", "prompt": ""}, 400, "prompt", "empty after tokenisation"),
    ("/v1/completions", {"model": "a", "prompt": "x", "max_tokens": "8"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"model": "a", "prompt": "x", "n": 2}, 400, "n", "only n=1"),
    ("/v1/completions", {"model": "a", "prompt": "x", "temperature": -1}, 400, "temperature", "from 0 to 2"),
    ("/v1/completions", {"model": "a", "prompt": "x", "stream": "yes"}, 400, "stream", "true or false"),
    ("/v1/completions", {"model": "a", "prompt": "x", "logprobs": 3}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"model": "a", "prompt": "x", "stop": [1]}, 400, "stop", "list of up to 4"),
    ("/v1/chat/completions", {"model": "a"}, 400, "messages", "missing field 'messages'"),
    ("/v1/chat/completions", {"model": "a", "messages": [{"content": "hi"}]}, 400, "messages[0]", "'role'"),
    ("/v1/nothing", {"model": "a"}, 404, None, "no such endpoint"),
])
def test_bad_requests_are_refused_by_field_and_the_server_keeps_serving(server, path, body, status, param, words):
    got, answer = request(server, "POST", path, body)
    assert got == status, answer
    assert answer["error"]["param"] == param and words in answer["error"]["message"]
    assert "Traceback" not in answer["error"]["message"]
    ok, good = request(server, "POST", "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2})
    assert ok == 200 and good["choices"][0]["text"] is not None


def test_bad_json_and_over_long_bodies(server):
    status, body = request(server, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = request(server, "POST", "/v1/completions", raw=b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = request(server, "POST", "/v1/completions", raw=b" " * (serve.MAX_BODY_BYTES + 1))
    assert status == 413 and "at most" in body["error"]["message"]
    assert request(server, "GET", "/health")[0] == 200


def test_an_api_key_is_checked_as_a_bearer_token(files, tokenizer):
    model = tf.AutoModelForCausalLM.from_pretrained(files["base"])
    srv = serve.make_server(model, tokenizer, port=0, base_name=BASE, api_key="s3cret", log=False)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        status, body = request(srv, "GET", "/v1/models")
        assert status == 401 and "Authorization: Bearer" in body["error"]["message"]
        status, _ = request(srv, "POST", "/v1/completions", {"model": BASE, "prompt": "x"},
                            headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, body = request(srv, "POST", "/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 2},
                               headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
        assert request(srv, "GET", "/health")[0] == 200  # a probe needs no key
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_command_binds_localhost_by_default_and_warns_for_other_hosts(files, monkeypatch, capsys):
    bound = []

    def serve_forever(self, poll_interval=0.5):
        bound.append(self.server_address[0])
        names = [m for m in self.served.names()]
        bound.append(names)

    monkeypatch.setattr(serve.Server, "serve_forever", serve_forever)
    args = ["serve", "--model", str(files["base"]), "--adapter", f"a={files['a']}", "--port", "0"]
    assert cli(args) == 0
    assert bound == ["127.0.0.1", [str(files["base"]), "a"]]
    assert "reachable" not in capsys.readouterr().err
    assert cli([*args, "--host", "0.0.0.0"]) == 0
    assert bound[2] == "0.0.0.0" and "no authentication" in capsys.readouterr().err
    assert cli(["serve", "--model", str(files["base"]), "--adapter", "a"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err


def test_a_stop_string_cuts_the_text_before_it(server):
    body = {"model": "a", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
    full = request(server, "POST", "/v1/completions", body)[1]["choices"][0]["text"]
    stop = full[len(full) // 2:][:2]
    assert stop.strip(), full
    status, answer = request(server, "POST", "/v1/completions", {**body, "stop": ["never there", stop]})
    assert status == 200
    assert answer["choices"][0] == {"index": 0, "text": full[:full.index(stop)], "logprobs": None,
                                    "finish_reason": "stop"}


def test_sampling_with_a_seed_is_reproducible(server):
    body = {"model": "b", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 1.5, "top_p": 0.95, "seed": 7}
    first = request(server, "POST", "/v1/completions", body)
    assert first[0] == 200
    assert request(server, "POST", "/v1/completions", body)[1]["choices"] == first[1]["choices"]


def stream(srv, path: str, body: dict) -> list:
    """The server-sent events of a streamed answer, parsed; the last is the string [DONE]."""
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", path, body=json.dumps({**body, "stream": True}), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    raw = response.read().decode()
    conn.close()
    assert raw.endswith("\n\n")
    lines = [event.removeprefix("data: ") for event in raw.split("\n\n")[:-1]]
    return [json.loads(line) if line != "[DONE]" else line for line in lines]


@pytest.mark.parametrize("extra", [{}, {"stop": ["zz", "a"]}])
def test_streamed_completions_add_up_to_the_whole_answer(server, extra):
    body = {"model": "a", "prompt": PROMPTS, "max_tokens": 8, "temperature": 0, **extra}
    whole = request(server, "POST", "/v1/completions", body)[1]
    chunks = stream(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"] == whole["usage"]
    for i, choice in enumerate(whole["choices"]):
        mine = [c["choices"][0] for c in chunks[:-2] if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine][-1] == choice["finish_reason"]
        assert all(c["finish_reason"] is None for c in mine[:-1])
        assert len(mine) > 2 or extra  # it came in pieces
    if extra:  # the stop string cut two of the three answers
        assert [c["finish_reason"] for c in whole["choices"]] == ["stop", "length", "stop"]
    assert all(c["object"] == "text_completion" and c["model"] == "a" for c in chunks[:-1])


def test_a_streamed_chat_starts_with_the_role_and_adds_up_to_the_whole_answer(server):
    body = {"model": "b", "messages": [{"role": "user", "content": "say something"}], "max_tokens": 8,
            "temperature": 0}
    whole = request(server, "POST", "/v1/chat/completions", body)[1]["choices"][0]
    chunks = stream(server, "/v1/chat/completions", body)
    assert chunks[-1] == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == whole["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["finish_reason"]


def test_the_context_bounds_max_tokens(server, tokenizer):
    words = "the cat sat on the mat. "
    long = words * 80
    assert len(tokenizer(long)["input_ids"]) > 256
    status, body = request(server, "POST", "/v1/completions", {"model": "a", "prompt": long, "max_tokens": 4})
    assert status == 400 and "context of 256 tokens" in body["error"]["message"]
    assert body["error"]["param"] == "max_tokens"
    near = next(words * k for k in range(80, 0, -1) if len(tokenizer(words * k)["input_ids"]) <= 252)
    left = 256 - len(tokenizer(near)["input_ids"])
    status, body = request(server, "POST", "/v1/completions", {"model": "a", "prompt": near, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] <= left  # the default 16 cut to what is left


def test_one_connection_carries_requests_after_refused_ones(server):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    answers = []
    for path, body in [("/v1/nowhere", {"model": "a", "prompt": "x"}), ("/v1/completions", {"model": "zz"}),
                       ("/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2})]:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answers.append((response.status, json.loads(response.read())))
    conn.close()
    assert [status for status, _ in answers] == [404, 404, 200]
    assert answers[2][1]["object"] == "text_completion"


def test_a_port_in_use_or_out_of_range_is_one_clear_error(files, tokenizer):
    import socket

    from deltatune.config import DeltaError

    model = tf.AutoModelForCausalLM.from_pretrained(files["base"])
    with pytest.raises(DeltaError, match="not a port"):
        serve.make_server(model, tokenizer, port=70000, base_name=BASE, log=False)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(DeltaError, match="cannot listen on 127.0.0.1:.*choose another --port"):
            serve.make_server(model, tokenizer, port=taken.getsockname()[1], base_name=BASE, log=False)
    finally:
        taken.close()
