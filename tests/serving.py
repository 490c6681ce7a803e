"""Run a real uvicorn server on 127.0.0.1 in a background thread, for tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from serve.app import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(engine, model_name: str, **app_kwargs):
    """Yield (base_url, app) while uvicorn serves ``engine`` on a free local port."""
    app = create_app(engine, model_name, **app_kwargs)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
