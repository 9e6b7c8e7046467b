"""Serving: the in-process Device API, the HTTP agent (hublab, OpenAI and Ollama routes) and its request gate."""
