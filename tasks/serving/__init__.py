"""Serving the published collection to apps: the retriever they hold and the HTTP service."""
