"""dsserve.server: the OpenAI-compatible HTTP server."""
