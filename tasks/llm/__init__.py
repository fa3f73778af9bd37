"""The bundled LLM's runtime and the ways to reach any LLM: Gemma's weights, dtype and the
machine they run on, quantisation, key/value cache, sampling, query likelihood, and the one
OpenAI-compatible HTTP client."""
