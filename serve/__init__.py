"""OpenAI-compatible HTTP server: ``twinfer serve MODEL`` (FastAPI on uvicorn).

``serve.app.create_app(engine, model_name)`` builds the app around an LLMEngine;
``serve.server.run_server`` is what the CLI calls.
"""
