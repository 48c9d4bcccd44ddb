"""The official ``openai`` client against a real server process on tiny GGUF models: what a
client does by default (list models, complete, chat, embed, stream) works, errors arrive as
the client's exception classes, a busy model blocks no other, and a client that leaves stops
its work.

Every test needs llama-cpp-python (skipped without it).
"""

from __future__ import annotations

import asyncio
import base64
import math
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.gguf_models import EMBEDDING_LENGTH, token_id, token_ids, write_tiny_model
from tests.helpers.origin import Origin
from tests.helpers.server import ServerProcess

openai = pytest.importorskip("openai")
pytest.importorskip("llama_cpp")

LONG_CONTEXT = 8192  # the "long" model: a generation of thousands of tokens, to disconnect from


class Served:
    def __init__(self, server: ServerProcess, files: dict[str, Path]) -> None:
        self.server = server
        self.files = files
        self.url = server.url

    def client(self, **kwargs: Any) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)

    def async_client(self, **kwargs: Any) -> Any:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs
        )

    def add(self, model_id: str, path: Path, **params: Any) -> dict[str, Any]:
        response = httpx.post(
            f"{self.url}/v1/models",
            json={"model_id": model_id, "model_path": str(path), "loading_parameters": params},
            timeout=60,
        )
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    def requests(self, model_id: str) -> dict[str, Any]:
        model = httpx.get(f"{self.url}/v1/models/{model_id}", timeout=10).json()
        return model["details"]["requests"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("openai")
    files = {
        "tiny": write_tiny_model(root / "tiny-llama.gguf"),
        "plain": write_tiny_model(root / "plain-llama.gguf", chat_template=None),
        "embed": write_tiny_model(root / "tiny-embed.gguf", embedding=True),
        "long": write_tiny_model(root / "long-llama.gguf", context_length=LONG_CONTEXT),
    }
    with ServerProcess(root / "server") as server:
        out = Served(server, files)
        out.add("tiny", files["tiny"])
        out.add("tiny-logits", files["tiny"], logits_all=True)
        out.add("plain", files["plain"])
        out.add("embed", files["embed"])
        out.add("long", files["long"], n_ctx=LONG_CONTEXT)
        yield out


# --- models ----------------------------------------------------------------------------------


def test_models_list_iterates_the_registered_models(served: Served) -> None:
    client = served.client()
    models = {m.id: m for m in client.models.list()}
    assert {"tiny", "tiny-logits", "plain", "embed", "long"} <= set(models)
    tiny = models["tiny"]
    assert tiny.object == "model"
    assert tiny.owned_by == "modelkernel"
    assert abs(tiny.created - time.time()) < 600
    one = client.models.retrieve("embed")
    assert one.id == "embed"
    assert one.object == "model"
    # Kolosal's shape is in the same body
    body = httpx.get(f"{served.url}/v1/models").json()
    assert body["object"] == "list"
    assert body["total_count"] == len(body["models"])
    assert {m["model_id"] for m in body["models"]} == {m["id"] for m in body["data"]}


def test_an_unknown_model_is_the_clients_not_found_error(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="nope", prompt="hello")
    assert "nope" in str(caught.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="hi")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_a_model_still_downloading_is_a_conflict_that_says_so(
    served: Served, origin: Origin
) -> None:
    data = served.files["tiny"].read_bytes()
    origin.faults.stall_after = len(data) // 2
    url = origin.add_file("stalled-llama.gguf", data)
    created = httpx.post(
        f"{served.url}/v1/models",
        json={"model_id": "arriving", "model_path": url, "model_type": "llm"},
    )
    assert created.status_code == 202, created.text
    try:
        assert origin.wait_stalled(30)
        client = served.client()
        with pytest.raises(openai.ConflictError) as caught:
            client.completions.create(model="arriving", prompt="hello")
        assert caught.value.status_code == 409
        assert "still downloading" in caught.value.message
        assert caught.value.body["code"] == "model_downloading"
        with pytest.raises(openai.ConflictError):
            client.chat.completions.create(
                model="arriving", messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        httpx.delete(f"{served.url}/v1/models/arriving")
        origin.release_stall()


# --- completions -----------------------------------------------------------------------------


def test_a_completion_answers_with_text_and_usage(served: Served) -> None:
    result = served.client().completions.create(model="tiny", prompt="hello world", max_tokens=8)
    assert result.object == "text_completion"
    assert result.model == "tiny"
    (choice,) = result.choices
    assert choice.text.strip()
    assert choice.index == 0
    assert choice.finish_reason == "length"
    assert result.usage.completion_tokens == 8
    assert result.usage.total_tokens == result.usage.prompt_tokens + 8


def test_greedy_and_seeded_completions_repeat_and_unseeded_ones_vary(served: Served) -> None:
    client = served.client()

    def text(**kwargs: Any) -> str:
        out = client.completions.create(model="tiny", prompt="the", max_tokens=12, **kwargs)
        return str(out.choices[0].text)

    assert text(temperature=0) == text(temperature=0)
    assert text(temperature=2, seed=42) == text(temperature=2, seed=42)
    fresh = {text(temperature=2) for _ in range(6)}
    assert len(fresh) > 1, "every request without a seed sampled the same text"


def test_a_stream_of_completion_chunks_adds_up_to_the_plain_answer(served: Served) -> None:
    client = served.client()
    plain = client.completions.create(model="tiny", prompt="hello", max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny", prompt="hello", max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert set(finishes[:-1]) == {None}
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_max_tokens_logit_bias_and_penalties_change_the_answer(served: Served) -> None:
    client = served.client()

    def complete(**kwargs: Any) -> Any:
        return client.completions.create(
            model="tiny", prompt="hello", temperature=0, **{"max_tokens": 16, **kwargs}
        ).choices[0]

    words = complete().text.split()
    assert len(words) >= 4
    stopped = complete(stop=[" " + words[3]])
    assert stopped.finish_reason == "stop"
    assert stopped.text.split() == words[:3]
    forced = complete(logit_bias={str(token_id("water")): 100}, max_tokens=5)
    assert forced.text.split() == ["water"] * 5
    # a bias that makes "water" win every time, until the penalties add up against it
    repeated = complete(logit_bias={str(token_id("water")): 50}, max_tokens=12)
    assert repeated.text.split() == ["water"] * 12
    penalised = complete(
        logit_bias={str(token_id("water")): 50}, max_tokens=12, frequency_penalty=2.0,
        presence_penalty=2.0,
    )  # fmt: skip
    assert penalised.text.split().count("water") < 12


def test_n_choices_and_prompt_lists_and_token_prompts(served: Served) -> None:
    client = served.client()
    result = client.completions.create(
        model="tiny", prompt=["hello", "world"], n=2, max_tokens=4, seed=1
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert all(c.text.strip() for c in result.choices)
    assert result.usage.completion_tokens == 16
    by_text = client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0)
    by_ids = client.completions.create(
        model="tiny", prompt=token_ids("hello"), max_tokens=6, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_logprobs_come_from_a_model_loaded_with_logits_all(served: Served) -> None:
    client = served.client()
    result = client.completions.create(
        model="tiny-logits", prompt="hello", max_tokens=5, logprobs=2, temperature=0
    )
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert "".join(logprobs.tokens) == result.choices[0].text
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="hello", logprobs=2)
    assert "logits_all" in caught.value.message


def test_fields_openai_defines_but_the_server_cannot_honour_are_bad_requests(
    served: Served,
) -> None:
    client = served.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="x", suffix="y")
    assert caught.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", extra_body={"frobnicate": 1})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", temperature=3)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="embed", prompt="x")
    assert caught.value.body["param"] == "model"


# --- chat ------------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello"},
]


def test_a_chat_completion_answers_through_the_models_template(served: Served) -> None:
    result = served.client().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, user="u-1"
    )
    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-")
    (choice,) = result.choices
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason == "length"
    # "<s>system: be brief\nuser: hello\nassistant:" is far more than two tokens
    assert result.usage.prompt_tokens > 10
    assert result.usage.completion_tokens == 8


def test_a_chat_stream_adds_up_to_the_plain_answer(served: Served) -> None:
    client = served.client()
    plain = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_completion_tokens=10, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_completion_tokens=10, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_chat_logprobs_and_n(served: Served) -> None:
    client = served.client()
    result = client.chat.completions.create(
        model="tiny-logits", messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=2, n=2
    )
    assert [c.index for c in result.choices] == [0, 1]
    content = result.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == result.choices[0].message.content


def test_chat_without_a_template_is_a_bad_request_naming_the_fix(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="plain", messages=MESSAGES)
    assert "chat template" in caught.value.message
    assert "loading_parameters.chat_template" in caught.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="plain", messages=MESSAGES, stream=True)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny", messages=MESSAGES,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )  # fmt: skip
    assert caught.value.body["param"] == "tools"


def test_llm_features_tell_whether_chat_works(served: Served, origin: Origin) -> None:
    for model_id, name in (("dl-chat", "tiny"), ("dl-plain", "plain")):
        url = origin.add_file(f"{model_id}.gguf", served.files[name].read_bytes())
        created = httpx.post(
            f"{served.url}/v1/models",
            json={"model_id": model_id, "model_path": url, "model_type": "llm"},
        )
        assert created.status_code == 202, created.text
    try:
        features = {}
        for model_id in ("dl-chat", "dl-plain"):
            deadline = time.monotonic() + 60
            while True:
                detail = httpx.get(f"{served.url}/v1/downloads/{model_id}").json()
                if detail["status"] in ("completed", "failed", "cancelled"):
                    break
                assert time.monotonic() < deadline, detail
                time.sleep(0.05)
            assert detail["status"] == "completed", detail
            features[model_id] = detail["engine_creation"]["llm_features"]["chat_completion"]
        assert features == {"dl-chat": True, "dl-plain": False}
    finally:
        for model_id in ("dl-chat", "dl-plain"):
            httpx.delete(f"{served.url}/v1/models/{model_id}")


# --- embeddings ------------------------------------------------------------------------------


def test_embeddings_as_floats_base64_and_from_token_ids(served: Served) -> None:
    client = served.client()
    as_float = client.embeddings.create(
        model="embed", input=["hello world", "water"], encoding_format="float"
    )
    assert [d.index for d in as_float.data] == [0, 1]
    vector = as_float.data[0].embedding
    assert len(vector) == EMBEDDING_LENGTH
    assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-4)
    assert as_float.usage.prompt_tokens > 0
    # the client's default asks for base64 and decodes it itself
    default = client.embeddings.create(model="embed", input="hello world")
    assert default.data[0].embedding == pytest.approx(vector, abs=1e-6)
    raw = httpx.post(
        f"{served.url}/v1/embeddings",
        json={"model": "embed", "input": "hello world", "encoding_format": "base64"},
    ).json()["data"][0]["embedding"]
    decoded = struct.unpack(f"<{EMBEDDING_LENGTH}f", base64.b64decode(raw))
    assert list(decoded) == pytest.approx(vector, abs=1e-6)
    ids = token_ids("hello world")
    by_ids = client.embeddings.create(model="embed", input=[ids], encoding_format="float")
    assert by_ids.data[0].embedding == pytest.approx(vector, abs=1e-5)
    assert by_ids.usage.prompt_tokens == len(ids)
    other = client.embeddings.create(model="embed", input=ids[:4], encoding_format="float")
    assert other.data[0].embedding != pytest.approx(vector, abs=1e-3)


def test_embedding_dimensions_truncate_and_renormalise(served: Served) -> None:
    client = served.client()
    full = client.embeddings.create(model="embed", input="water", encoding_format="float")
    short = client.embeddings.create(
        model="embed", input="water", dimensions=16, encoding_format="float"
    )
    vector = short.data[0].embedding
    assert len(vector) == 16
    assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-4)
    head = full.data[0].embedding[:16]
    norm = math.sqrt(math.fsum(x * x for x in head))
    assert vector == pytest.approx([x / norm for x in head], abs=1e-5)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="embed", input="water", dimensions=EMBEDDING_LENGTH + 1)
    assert caught.value.body["param"] == "dimensions"


# --- engines are independent; a client that leaves stops its work ------------------------


def _wait_for(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


async def test_a_busy_model_does_not_hold_up_another_model_or_adding_one(
    served: Served, tmp_path: Path
) -> None:
    client = served.async_client(timeout=300)
    finished: list[str] = []

    async def long(i: int) -> None:
        await client.completions.create(model="long", prompt="the", max_tokens=300)
        finished.append(f"long-{i}")

    busy = [asyncio.ensure_future(long(i)) for i in range(16)]
    try:
        await asyncio.to_thread(_wait_for, lambda: served.requests("long")["queued"] >= 8,
                                "requests queued on the long model")  # fmt: skip
        await client.embeddings.create(model="embed", input="hello")
        finished.append("embed")
        await client.completions.create(model="tiny", prompt="hello", max_tokens=4)
        finished.append("tiny")
        extra = write_tiny_model(tmp_path / "extra.gguf")
        await asyncio.to_thread(served.add, "extra", extra)
        finished.append("added")
        assert served.requests("long")["queued"] > 0, "the long model ran out of work first"
    finally:
        await asyncio.gather(*busy)
        await asyncio.to_thread(httpx.delete, f"{served.url}/v1/models/extra")
        await client.close()
    assert len(finished) == 19
    assert finished[-1].startswith("long-")


def _open_stream(url: str, body: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_a_client_that_disconnects_stops_its_generation_at_the_next_token(
    served: Served,
) -> None:
    before = served.requests("long")
    body = b'{"model": "long", "prompt": "the", "max_tokens": 8000, "stream": true}'
    sock = _open_stream(served.url, body)
    received = b""
    while received.count(b"data: ") < 3:  # the generation is running
        chunk = sock.recv(65536)
        assert chunk, "the server closed the stream"
        received += chunk
    sock.close()
    _wait_for(lambda: served.requests("long")["stopped"] == before["stopped"] + 1, "the stop")
    _wait_for(lambda: not served.requests("long")["running"], "the worker to go idle")
    # the worker is free: the next request runs at once and completes
    result = served.client().completions.create(model="long", prompt="the", max_tokens=2)
    assert result.usage.completion_tokens == 2


def test_a_queued_request_whose_client_left_is_dropped_unrun(served: Served) -> None:
    before = served.requests("long")
    holder = _open_stream(
        served.url, b'{"model": "long", "prompt": "the", "max_tokens": 8000, "stream": true}'
    )
    try:
        _wait_for(lambda: served.requests("long")["running"], "the long request to run")
        queued = _open_stream(served.url, b'{"model": "long", "prompt": "x", "max_tokens": 5}')
        _wait_for(lambda: served.requests("long")["queued"] == 1, "the second to queue")
        queued.close()
        _wait_for(lambda: served.requests("long")["dropped"] == before["dropped"] + 1, "a drop")
    finally:
        holder.close()
    _wait_for(lambda: served.requests("long")["stopped"] == before["stopped"] + 1, "the stop")
    assert served.requests("long")["completed"] == before["completed"]  # neither ran to the end


def test_removing_a_model_stops_its_running_generation_with_an_error_event(
    served: Served,
) -> None:
    served.add("doomed", served.files["long"], n_ctx=LONG_CONTEXT)
    sock = _open_stream(
        served.url, b'{"model": "doomed", "prompt": "the", "max_tokens": 8000, "stream": true}'
    )
    received = b""
    while received.count(b"data: ") < 3:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the stream"
        received += chunk
    removed = httpx.delete(f"{served.url}/v1/models/doomed", timeout=60)
    assert removed.status_code == 200, removed.text
    while not received.endswith(b"0\r\n\r\n"):  # the chunked body's end
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    sock.close()
    assert b'"error"' in received
    assert b"unloaded" in received
    assert b"data: [DONE]" not in received
