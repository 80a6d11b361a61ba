"""The OpenAI-compatible server (lcx.serve) driven by the official `openai` client and
httpx over loopback: the same text as in-process greedy `generate`, streamed and not,
concurrency, cancellation on disconnect, prompt log-probabilities, and every refusal as
OpenAI's error JSON while the server keeps serving. Bounded: every request has a small
max_tokens and every client a timeout."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from lcx.data import ByteTokenizer
from lcx.data.tokenizer import prompt_ids
from lcx.generate import generate
from lcx.generate.scoring import PackedScorer
from lcx.serve import Service, make_app
from lcx.serve.server import BackgroundServer
from tests.conftest import ROOT, tiny_byte_model

KEY = "test-key"
CONTEXT = 96


def make_service(model, **kw):
    """The service the tests drive: a paged engine with the prefix cache, so every answer
    compared with in-process `generate` (one stretch per slot, no cache) checks those too."""
    settings = dict(
        model_name="tiny",
        max_context=CONTEXT,
        slots=4,
        token_budget=40,
        max_waiting=32,
        engine_options=dict(page_size=8, prefix_cache=True),
    )
    return Service(model, ByteTokenizer(), **{**settings, **kw})


@pytest.fixture(scope="module")
def model():
    return tiny_byte_model()


@pytest.fixture(scope="module")
def server(model):
    service = make_service(model)
    live = BackgroundServer(make_app(service, api_key=KEY))
    live.service = service
    yield live
    live.stop()
    service.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=60, max_retries=0)


def greedy_text(model, ids, n):
    """What in-process greedy `generate` writes after `ids` (stopping at EOS), as text."""
    (new,) = generate(model, [ids], max_new_tokens=n, stop_ids=(ByteTokenizer.eos_id,))
    return ByteTokenizer().decode(new).decode("utf-8", "replace"), new


def test_completions_streamed_or_not_equal_in_process_greedy_generate(model, client):
    prompt = "def parse(text):"
    want, new = greedy_text(model, prompt_ids(ByteTokenizer(), prompt), 12)
    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert done.choices[0].text == want
    assert done.choices[0].finish_reason == ("stop" if new[-1] == 257 else "length")
    assert done.usage.prompt_tokens == len(prompt) + 1 and done.usage.completion_tokens == len(new)
    stream = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(new)
    # The same prompt again: its 17 tokens' first 2 pages of 8 came from the prefix cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 16
    # Token ids in, several prompts, n choices: each choice is its prompt's greedy text.
    ids = prompt_ids(ByteTokenizer(), "class Stack:")
    many = client.completions.create(
        model="tiny", prompt=[ids, ids[:5]], max_tokens=6, temperature=0, n=2
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    texts = [c.text for c in many.choices]
    assert texts[0] == texts[1] == greedy_text(model, ids, 6)[0]
    assert texts[2] == texts[3] == greedy_text(model, ids[:5], 6)[0]
    streamed = client.completions.create(
        model="tiny", prompt=[ids, ids[:5]], max_tokens=6, temperature=0, n=2, stream=True
    )  # the four choices' chunks interleaved as they come
    joined = ["", "", "", ""]
    for chunk in streamed:
        joined[chunk.choices[0].index] += chunk.choices[0].text
    assert joined == texts


def test_chat_streamed_or_not_equals_greedy_generate_on_the_chat_template(model, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    ids = ByteTokenizer().apply_chat_template(messages, add_generation_prompt=True)
    want, new = greedy_text(model, ids, 10)
    done = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    assert done.choices[0].message.content == want and done.choices[0].message.role == "assistant"
    assert done.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == want


def test_stop_strings_cut_the_text_and_end_the_request(model, client, server):
    prompt = "def parse(text):"
    want, _ = greedy_text(model, prompt_ids(ByteTokenizer(), prompt), 40)
    stop = want[5:7]
    cut = want[: want.index(stop)]
    for stream in (False, True):
        out = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=40, temperature=0, stop=[stop], stream=stream
        )
        if stream:
            chunks = list(out)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0]
        else:
            text, reason = out.choices[0].text, out.choices[0]
        assert text == cut and reason.finish_reason == "stop"
    assert _wait_idle(server)


def test_echo_with_logprobs_and_no_new_tokens_scores_the_prompt(model, client):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs, max_tokens 0."""
    ids = prompt_ids(ByteTokenizer(), "x = [1, 2, 3]")
    out = client.completions.create(
        model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    lp = out.choices[0].logprobs
    assert out.choices[0].text == "x = [1, 2, 3]" and len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    (want,) = PackedScorer(model, CONTEXT, ByteTokenizer.pad_id).score([ids])
    np.testing.assert_allclose(lp.token_logprobs[1:], want.logprob, atol=1e-5)
    for i, top in enumerate(lp.top_logprobs[1:]):
        assert len(top) == 2
        np.testing.assert_allclose(max(top.values()), want.top_logprobs[i, 0], atol=1e-5)
    # Several prompts in one request are scored together, each as alone.
    other = prompt_ids(ByteTokenizer(), "def f(): pass")
    both = client.completions.create(
        model="tiny", prompt=[other, ids], max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    np.testing.assert_allclose(both.choices[1].logprobs.token_logprobs[1:], want.logprob, atol=1e-5)
    assert len(both.choices[0].logprobs.token_logprobs) == len(other)
    # With one new token as well (what local-completions sends): prompt + 1 logprobs.
    one = client.completions.create(
        model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    assert len(one.choices[0].logprobs.token_logprobs) == len(ids) + 1


def test_thirty_two_concurrent_streams_all_complete(model, server):
    prompts = [f"item {i}: " for i in range(32)]

    async def one(client, prompt):
        stream = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream])

    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=KEY, timeout=120, max_retries=0
        ) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    texts = asyncio.run(main())
    # Every stream is its prompt's greedy text, as in-process `generate` writes it.
    ids = [prompt_ids(ByteTokenizer(), p) for p in prompts]
    news = generate(model, ids, max_new_tokens=8, stop_ids=(ByteTokenizer.eos_id,))
    assert texts == [ByteTokenizer().decode(n).decode("utf-8", "replace") for n in news]
    assert _wait_idle(server)


def _metric(server, name) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


def _wait_idle(server, seconds=10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _metric(server, "lcx_requests_running") == 0 == _metric(server, "lcx_requests_waiting"):
            return True
        time.sleep(0.02)
    return False


def test_a_client_that_disconnects_frees_its_slot(server):
    body = {
        "model": "tiny",
        "prompt": "while True:",
        "max_tokens": 80,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert _metric(server, "lcx_requests_running") == 1
    before = _metric(server, "lcx_generated_tokens_total")
    assert _wait_idle(server, seconds=5)
    assert _metric(server, "lcx_generated_tokens_total") - before < 70  # not run to the end


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(model, server, client):
    url, headers = server.url, {"Authorization": f"Bearer {KEY}"}
    post = lambda path, **kw: httpx.post(url + path, headers=headers, timeout=30, **kw)  # noqa: E731
    ok = {"model": "tiny", "prompt": "a", "max_tokens": 2}
    error = _error(post("/v1/completions", json={**ok, "prompt": "x" * 90, "max_tokens": 10}), 400)
    assert "96" in error["message"] and "91" in error["message"] and "10" in error["message"]
    assert error["code"] == "context_length_exceeded"
    _error(post("/v1/completions", content=b"{not json"), 400)
    error = _error(post("/v1/completions", json={**ok, "max_tokens": "many"}), 400)
    assert error["param"] == "max_tokens"
    _error(post("/v1/completions", json={**ok, "temperature": -1}), 400)
    _error(post("/v1/completions", json={**ok, "frequency_penalty": 0.5}), 400)
    _error(post("/v1/chat/completions", json={"model": "tiny", "messages": []}), 400)
    long_chat = {"model": "tiny", "messages": [{"role": "user", "content": "y" * 100}]}
    assert _error(post("/v1/chat/completions", json=long_chat), 400)["code"] == (
        "context_length_exceeded"
    )
    assert _error(post("/v1/completions", json={**ok, "model": "gpt-9"}), 404)["code"] == (
        "model_not_found"
    )
    wrong = httpx.post(url + "/v1/completions", json=ok, headers={"Authorization": "Bearer no"})
    assert _error(wrong, 401)["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="no", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    # ... and it still answers.
    assert (
        client.completions.create(**ok, temperature=0).choices[0].text
        == greedy_text(model, prompt_ids(ByteTokenizer(), "a"), 2)[0]
    )


def test_a_failure_inside_one_request_is_a_500_with_its_id_and_the_others_complete(
    model, server, client, monkeypatch
):
    real = server.service.chat_tokens

    def flaky(messages):
        if messages[-1]["content"] == "boom":
            raise RuntimeError("template exploded")
        return real(messages)

    monkeypatch.setattr(server.service, "chat_tokens", flaky)

    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=KEY, timeout=60, max_retries=0
        ) as c:
            calls = [
                c.chat.completions.create(
                    model="tiny",
                    max_tokens=6,
                    temperature=0,
                    messages=[{"role": "user", "content": text}],
                )
                for text in ("one", "boom", "two")
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    one, boom, two = asyncio.run(main())
    assert isinstance(boom, openai.InternalServerError)
    assert "chatcmpl-" in boom.message and "template exploded" in boom.message
    assert one.choices[0].finish_reason in ("stop", "length") and two.choices[0].message.content


def test_a_full_queue_answers_429_with_retry_after(model):
    service = make_service(model, max_waiting=0)  # the fixture's engine shapes: no new compile
    live = BackgroundServer(make_app(service))
    try:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 90, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as http:
            streams = [
                http.stream("POST", live.url + "/v1/completions", json=body) for _ in range(4)
            ]
            responses = [s.__enter__() for s in streams]
            assert all(r.status_code == 200 for r in responses)
            full = http.post(live.url + "/v1/completions", json={**body, "stream": False})
            assert _error(full, 429)["type"] == "rate_limit_error"
            assert full.headers["retry-after"] == "1"
            for s in streams:
                s.__exit__(None, None, None)
        deadline = time.monotonic() + 10
        while service.engine_thread.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        ok = httpx.post(
            live.url + "/v1/completions",
            json={**body, "stream": False, "max_tokens": 2},
            timeout=30,
        )
        assert ok.status_code == 200 and json.loads(ok.text)["usage"]["completion_tokens"] >= 1
    finally:
        live.stop()
        service.close()


# ---- mode=serve as a user runs it -------------------------------------------------------


def _same_accuracy_through_local_completions_and_the_harness(url, name, workdir):
    """tests/data/harness's tasks through lm-eval's own OpenAI client (`local-completions`,
    the server's tokenizer through /tokenize) and through `python -m lcx.evals.harness`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lcx.evals import harness

    tasks, include = ["lcx_pick", "lcx_complete"], f"{ROOT}/tests/data/harness"
    cwd = os.getcwd()
    os.chdir(ROOT)  # the task YAMLs name their files from the repository root
    try:
        args = dict(
            model=name,
            base_url=url + "/v1/completions",
            tokenizer_backend="remote",
            tokenized_requests=True,
            num_concurrent=1,
            max_retries=1,
        )
        client = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=args,
            tasks=tasks,
            task_manager=TaskManager(include_path=include, include_defaults=False),
        )
        lcx = harness.main(
            ["--workdir", str(workdir), "--tasks", ",".join(tasks), "--include_path", include]
        )
    finally:
        os.chdir(cwd)
    for task, metric in (("lcx_pick", "acc,none"), ("lcx_complete", "exact_match,none")):
        assert client["results"][task][metric] == lcx["results"][task][metric], task
    # Not only the scores: the same generations, and the same choice log-likelihoods.
    for task in tasks:
        ours, theirs = (
            sorted(r["samples"][task], key=lambda s: s["doc_id"]) for r in (lcx, client)
        )
        for a, b in zip(ours, theirs, strict=True):
            if task == "lcx_complete":
                assert a["filtered_resps"] == b["filtered_resps"]
            else:
                np.testing.assert_allclose(
                    [r[0] for r in a["filtered_resps"]],
                    [r[0] for r in b["filtered_resps"]],
                    atol=1e-4,
                )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_stream(url, body, out: list):
    """Every SSE data line of one streamed completion, into `out`."""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        out.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))


@pytest.mark.integration
def test_mode_serve_answers_the_openai_client_and_drains_on_sigterm(tmp_path, smoke_config):
    from lcx.modes import run

    run(smoke_config, str(tmp_path))  # a trained workdir (4 steps)
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "lcx.main",
        "--config",
        f"{ROOT}/configs/lm_tiny.py:smoke",
        "--workdir",
        str(tmp_path),
        "--config.mode=serve",
        f"--config.serve.port={port}",
        "--config.serve.max_context=2048",
        "--config.serve.drain_seconds=0.5",
    ]
    server = subprocess.Popen(
        command,
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "mode=serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        name = os.path.basename(str(tmp_path))
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
        stream = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, stream=True
        )
        assert [c.choices[0].finish_reason for c in stream][-1] in ("stop", "length")
        _same_accuracy_through_local_completions_and_the_harness(url, name, tmp_path)
        # SIGTERM with two streams in flight: the short one finishes within the drain,
        # the long one is ended with a clean last chunk; the process exits 0. (A drain of
        # 3 s let the long one's 2,000 tokens finish on JAX 0.12; they took 1.2 s in the
        # engine alone there. The short one's last ~55 take some 50 ms.)
        short, long = [], []
        body = {"model": name, "prompt": "def ", "temperature": 0, "stream": True}
        readers = [
            threading.Thread(target=_read_stream, args=(url, {**body, "max_tokens": n}, out))
            for n, out in ((60, short), (2000, long))
        ]
        for reader in readers:
            reader.start()
        while len(short) < 2 or len(long) < 2:
            time.sleep(0.01)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)  # no longer accepting
        for reader in readers:
            reader.join(30)
        assert server.wait(30) == 0
        for lines, reason in ((short, "length"), (long, "abort")):
            assert lines[-1] == "[DONE]"
            assert json.loads(lines[-2])["choices"][0]["finish_reason"] == reason
        out = server.stdout.read()
        assert "2 requests in flight at shutdown, 1 aborted" in out, out
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
