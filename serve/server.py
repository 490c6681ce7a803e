"""``twinfer serve``: build the engine, then run the app on uvicorn."""

from __future__ import annotations

import logging
import os

from twinfer.llm import LLM

log = logging.getLogger("twinfer.serve")


def usage_examples(host: str, port: int, model: str, api_key: str | None) -> str:
    """Ready-to-paste curl and openai-client snippets for this server."""
    auth = f' -H "Authorization: Bearer {api_key}"' if api_key else ""
    key = api_key or "none"
    return f"""twinfer is serving {model!r} on http://{host}:{port}/v1

  curl http://{host}:{port}/v1/chat/completions -H "Content-Type: application/json"{auth} \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}], "max_tokens": 32, "temperature": 0}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='http://{host}:{port}/v1', api_key='{key}'); print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hello!'}}], max_tokens=32).choices[0].message.content)"
"""


def run_server(model: str, host: str = "127.0.0.1", port: int = 8000,
               served_model_name: str | None = None, api_key: str | None = None,
               max_waiting: int = 1024, **llm_kwargs) -> None:
    """Load ``model`` (``llm_kwargs`` go to :class:`twinfer.llm.LLM`) and serve it until
    interrupted."""
    import uvicorn

    from serve.app import create_app

    api_key = api_key or os.environ.get("TWINFER_API_KEY") or None
    llm = LLM(model, **llm_kwargs)
    name = served_model_name or str(model)
    app = create_app(llm.engine, name, api_key=api_key, max_waiting=max_waiting)
    config = uvicorn.Config(app, host=host, port=port, log_level="info")
    server = uvicorn.Server(config)
    print(usage_examples(host, port, name, api_key), flush=True)
    server.run()
