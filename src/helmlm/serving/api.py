"""An OpenAI-compatible HTTP API over an :class:`~helmlm.serving.engine.Engine` (FastAPI, server-sent events).

Endpoints: ``GET /`` (a chat page, :data:`STATIC`), ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``. Request fields: ``model``, ``prompt`` / ``messages`` (text or text parts), ``max_tokens``
(or ``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``, ``seed``, ``stream``, and ``helmlm generate``'s
``top_k`` and ``repetition_penalty`` as extra fields. Fields that cannot be honoured (penalties other than 0,
``logprobs``, ``tools``) are refused, not ignored. Responses carry ``usage``; ``stream: true`` sends
OpenAI's chunk objects as ``data:`` events and ends with ``data: [DONE]``. Every error is a 4xx (or 5xx) with
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. With an API key, every ``/v1`` route wants
``Authorization: Bearer KEY``; the page, its assets and ``/health`` stay open (the page asks for the key and sends
it).

Sampling matches ``helmlm generate``: temperature 0 is greedy, and a request with a ``seed`` repeats exactly. A
request with neither draws a fresh seed. ``stop`` strings end the text before them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse

from helmlm.errors import APIError, ContextLengthError, GenerationError, ServerBusy
from helmlm.generation import SamplingSettings, fresh_seed
from helmlm.serving.chat import chat_prompt
from helmlm.serving.engine import Engine, Job

STATIC = Path(__file__).parent / "static"  # the page: plain HTML, CSS and JavaScript, shipped in the package


class Sampling(BaseModel):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer name of max_tokens in OpenAI's chat API
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = 1
    # helmlm generate's other settings, as extra fields (the openai client sends them with extra_body=...)
    top_k: int = 0
    repetition_penalty: float = 1.0
    # OpenAI fields that this server cannot honour: refused unless neutral, rather than silently ignored
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]

    def turn(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[dict] | None = None


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title=f"helmlm serve: {engine.name}")

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid JSON")
        return JSONResponse(APIError(400, message, param=where or None).body, status_code=400)

    def authorised(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                           type="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name, "context": engine.context, "auth": api_key is not None,
                "queued": engine.jobs.qsize()}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "helmlm"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorised)])
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "give one prompt per request", param="prompt")
        ids = engine.tokenizer(prompts[0], add_special_tokens=False).input_ids
        return await _respond(engine, body, ids, [], "text_completion")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    async def chat(body: ChatRequest):
        ids, stop = chat_prompt(engine.tokenizer, [m.turn() for m in body.messages])
        return await _respond(engine, body, ids, stop, "chat.completion")

    return app


def _settings(engine: Engine, body: Sampling, ids: list[int]) -> tuple[SamplingSettings, list[str]]:
    if body.model != engine.name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server has {engine.name!r}", param="model",
                       code="model_not_found")
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    for field in ("presence_penalty", "frequency_penalty"):
        if getattr(body, field):
            raise APIError(400, f"{field} is not supported; repetition_penalty (an extra field) is", param=field)
    if body.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if getattr(body, "tools", None):
        raise APIError(400, "tools (function calling) are not supported", param="tools")
    room = (engine.context or 0) - len(ids)
    asked, param = ((body.max_tokens, "max_tokens") if body.max_tokens is not None
                    else (body.max_completion_tokens, "max_completion_tokens"))
    max_tokens = asked if asked is not None else max(1, min(256, room))
    if max_tokens < 1:
        raise APIError(400, f"{param} must be >= 1, got {max_tokens}", param=param)
    seed = body.seed if body.seed is not None else (0 if body.temperature == 0 else fresh_seed())
    settings = SamplingSettings(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k, repetition_penalty=body.repetition_penalty, seed=seed)
    try:
        engine.check(ids, settings)
    except GenerationError as err:
        code = "context_length_exceeded" if isinstance(err, ContextLengthError) else None
        raise APIError(400, str(err), code=code) from None
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return settings, stop


async def _respond(engine: Engine, body: Sampling, ids: list[int], stop: list[str], kind: str):
    settings, more_stop = _settings(engine, body, ids)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    job = Job(ids, settings, stop + more_stop,
              on_text=lambda piece: loop.call_soon_threadsafe(events.put_nowait, ("text", piece)),
              on_done=lambda text, err: loop.call_soon_threadsafe(events.put_nowait, ("done", text, err)))
    try:
        engine.submit(job)
    except ServerBusy as err:
        raise APIError(429, str(err), type="server_busy", code="queue_full") from None
    meta = {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()), "model": engine.name}
    if body.stream:
        return EventSourceResponse(_stream(job, events, meta, kind), ping=15)
    try:
        while (event := await events.get())[0] != "done":
            pass
    except asyncio.CancelledError:
        job.cancelled.set()
        raise
    _, text, err = event
    if err is not None:
        raise APIError(500, f"generation failed: {err}", type="server_error")
    usage, finish = _usage(job), job.stats["finish"]
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
              if kind.startswith("chat") else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
    return {**meta, "object": kind, "choices": [choice], "usage": usage}


def _usage(job: Job) -> dict[str, int]:
    prompt, completion = len(job.prompt_ids), job.stats["tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream(job: Job, events: asyncio.Queue, meta: dict, kind: str):
    """Server-sent events in OpenAI's chunk format; the client going away cancels the job."""
    chat = kind.startswith("chat")
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, finish: str | None, first: bool = False) -> dict:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": piece} if piece else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
        return {**meta, "object": obj, "choices": [choice]}

    try:
        if chat:
            yield {"data": json.dumps(chunk(None, None, first=True))}
        while (event := await events.get())[0] == "text":
            yield {"data": json.dumps(chunk(event[1], None))}
        _, text, err = event
        if err is not None:
            yield {"data": json.dumps(APIError(500, f"generation failed: {err}", type="server_error").body)}
            return
        yield {"data": json.dumps({**chunk(None, job.stats["finish"]), "usage": _usage(job)})}
        yield {"data": "[DONE]"}
    except asyncio.CancelledError:
        job.cancelled.set()
        raise
