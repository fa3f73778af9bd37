"""Synthetic questions: writers (the bundled Gemma, an OpenAI-compatible API) behind one
protocol, their prompts and typed settings, few-shot examples, the answer cache and curation
(cleaning, de-duplication, the round-trip filter, the leakage-free split)."""
