"""The key/value cache that grows in place computes what transformers' DynamicCache computes,
through prefill, n samples sharing a prompt, and rows leaving the batch."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from tasks.llm.gemma import load_gemma
from tasks.llm.kvcache import buffer_cache, fits

PROMPTS = [
    "Passage: Lima is the capital city of Peru.\nQuestion:",
    "Passage: Photosynthesis turns light, water and carbon dioxide into sugar in leaves.\n"
    "Question:",
]


def decode(model, enc, cache, steps: int = 8) -> list[torch.Tensor]:
    """Final hidden states of each step: prefill, 2 samples per prompt, one row leaving."""
    mask = enc.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        model.model(**enc, position_ids=positions, cache=cache, use_cache=True)
        cache.batch_repeat_interleave(2)
        mask = mask.repeat_interleave(2, 0)
        position = positions[:, -1:].repeat_interleave(2, 0) + 1
        tokens = torch.tensor([[1000], [2000], [3000], [4000]])
        states = []
        for step in range(steps):
            if step == 3:
                going = torch.tensor([0, 2, 3])
                cache.batch_select_indices(going)
                mask, position, tokens = mask[going], position[going], tokens[going]
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            out = model.model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=position,
                cache=cache,
                use_cache=True,
            )
            states.append(out.last_hidden_state[:, -1])
            position, tokens = position + 1, tokens + 7
    return states


def test_the_buffer_cache_gives_the_dynamic_caches_hidden_states():
    model, tokenizer = load_gemma(dtype="float32")
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    capacity = enc.input_ids.shape[1] + 8

    expected = decode(model, enc, DynamicCache(config=model.config))
    cache = buffer_cache(model.config, capacity)
    got = decode(model, enc, cache)

    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")
    assert cache.get_seq_length() == capacity
    with pytest.raises(ValueError, match=f"holds {capacity - 1} positions, {capacity} were"):
        decode(model, enc, buffer_cache(model.config, capacity - 1))


def test_only_sequences_shorter_than_the_sliding_window_fit():
    model, _ = load_gemma(dtype="float32")
    window = model.config.sliding_window
    assert fits(model.config, window - 1) and not fits(model.config, window)
