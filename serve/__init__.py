"""OpenAI-compatible HTTP server (arrives with the serve issue)."""
