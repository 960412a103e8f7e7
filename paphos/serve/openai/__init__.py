"""OpenAI-compatible API: protocol models, endpoint handlers and their shared serving helpers."""
