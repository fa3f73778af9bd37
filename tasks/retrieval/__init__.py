"""Measuring retrieval: IR metrics at every Matryoshka dimension, bootstrap intervals and the
gate, the report, labelled sets in BEIR layout, and re-ranking by the LLM judge."""
