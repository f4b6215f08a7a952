"""The OpenAI-compatible HTTP server (`param2moe serve`)."""
