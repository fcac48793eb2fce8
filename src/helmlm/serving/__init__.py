"""Serving a model: the decoding engine (:mod:`helmlm.serving.engine`), the OpenAI-compatible API
(:mod:`helmlm.serving.api`) and :func:`serve`, what ``helmlm serve`` runs. Needs the ``serve`` extra (FastAPI,
uvicorn, sse-starlette)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


def check_address(host: str, port: int) -> None:
    """Refuse an address the server could not listen on (a port in use, a host this machine does not have) before
    the model is loaded, which can take a while, rather than after."""
    import socket

    from helmlm.errors import InputError

    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise InputError(f"cannot serve on host {host!r}: {err.strerror}; give an address of this machine with "
                         "--host (default 127.0.0.1)") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            raise InputError(f"cannot listen on {host}:{port}: {err.strerror}; choose another --port, or stop what "
                             "is using it") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of ``host`` that nothing listens on now (the system picks it)."""
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve_process(model_dir: str | Path, *args: str, timeout: float = 300.0, **popen) -> Iterator[tuple]:
    """``helmlm serve MODEL_DIR ARGS`` as a process of its own on a free port of 127.0.0.1, for scripts and tests
    that need a real server: yields ``(process, base URL)`` once it answers ``/health``, and stops it (SIGTERM,
    then a wait) on leaving. ``popen`` goes to :class:`subprocess.Popen` (``env``, ``stdout``, ``stderr``...). A
    process that exits before answering is a ``RuntimeError`` with its exit code and, when piped, its stderr."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "helmlm", "serve", str(model_dir), "--port", str(port), *args],
                            **popen)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + timeout
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None:
                    said = proc.stderr.read() if proc.stderr else ""
                    raise RuntimeError(f"helmlm serve exited with {proc.returncode} before serving: {said}") from None
                if time.time() > deadline:
                    raise RuntimeError(f"helmlm serve did not answer within {timeout:.0f} s") from None
                time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(60)


def load_model(model_dir: str | Path, adapter: str | Path | None = None):
    """``(model, tokenizer)`` of a model directory, with a LoRA / HypLoRA adapter on top when ``adapter`` is given
    (what ``helmlm chat`` and ``helmlm serve`` run)."""
    from helmlm.generation import load_model_dir

    model, tokenizer = load_model_dir(model_dir)
    if adapter is not None:
        from helmlm.peft.adapters import load_adapter

        model = load_adapter(model, adapter)
    return model, tokenizer


def load_engine(model_dir: str | Path, adapter: str | Path | None = None, name: str | None = None,
                max_queue: int = 16):
    """An :class:`~helmlm.serving.engine.Engine` over a model directory, with a LoRA / HypLoRA adapter on top when
    ``adapter`` is given; it is served as ``name`` (default: the directory's name, or the adapter's)."""
    from helmlm.serving.engine import Engine

    model, tokenizer = load_model(model_dir, adapter)
    default = Path(adapter if adapter is not None else model_dir).resolve().name
    return Engine(model, tokenizer, name or default, max_queue=max_queue)


def serve(engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          graceful_seconds: float = 30.0) -> None:
    """Serve ``engine`` until SIGINT or SIGTERM; then stop accepting connections and give the requests in flight up
    to ``graceful_seconds`` to finish (uvicorn's graceful shutdown)."""
    import signal

    import uvicorn

    from helmlm.serving.api import create_app

    # uvicorn hands a signal it caught back to the handler it found once it has shut down; with this one there, a
    # graceful stop is the normal end of the command (exit 0), not a death by signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level="warning",
                    timeout_graceful_shutdown=graceful_seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    engine.close()
