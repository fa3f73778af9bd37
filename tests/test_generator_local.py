"""The `local` generator: the bundled Gemma 3 270M on real chunks of the NIST AI 600-1 PDF.

One generator and one generation run are shared by the whole module: the first load of the model
dequantises the GGUF (about a minute) and caches it; every later load takes seconds.
"""

from __future__ import annotations

import re

import pytest
from pypdf import PdfReader

from tasks.questions.local import LocalGenerator
from tasks.questions.prompts import DEFAULT_FEW_SHOT
from tasks.questions.writers import make_generator
from tests.conftest import NIST_PDF

QUESTION_START = re.compile(
    r"^(what|which|who|whom|whose|when|where|why|how|is|are|was|were|do|does|did|can|could|"
    r"should|would|will|has|have|may|in what|to what)\b",
    re.I,
)


def nist_chunks(first_page: int, count: int, size: int = 600) -> list[str]:
    """Chunks made by packing the PDF's lines up to `size` characters (no ingest module needed)."""
    reader = PdfReader(NIST_PDF)
    chunks: list[str] = []
    current = ""
    for page in reader.pages[first_page:]:
        for line in page.extract_text().splitlines():
            line = line.strip()
            if len(line) < 3:
                continue  # page numbers
            current = f"{current} {line}".strip()
            if len(current) >= size:
                chunks.append(current)
                current = ""
                if len(chunks) == count:
                    return chunks
    return chunks


@pytest.fixture(scope="module")
def chunks() -> list[str]:
    return nist_chunks(first_page=6, count=3)


@pytest.fixture(scope="module")
def generator() -> LocalGenerator:
    """float32, the path whose samples do not depend on what shares a batch (in bfloat16 the
    padding of a batch moves logits by a rounding error: see tasks/questions/local.py)."""
    return make_generator("local", n=2, dtype="float32", show_progress=False)


@pytest.fixture(scope="module")
def generated(generator, chunks):
    calls: list[tuple[int, int]] = []
    results = generator.generate([*chunks, "  "], progress=lambda d, t: calls.append((d, t)))
    return results, calls


def test_questions_are_question_shaped_and_about_the_passage(generated, chunks):
    results, _ = generated
    questions = [q for r in results[: len(chunks)] for q in r.questions]
    for result in results[: len(chunks)]:
        assert result.error is None
        assert len(result.questions) == 2
        assert result.prompt_tokens > 100 and 2 <= result.completion_tokens <= 2 * 40
    for question, chunk in zip(questions, [c for c in chunks for _ in range(2)], strict=True):
        assert question.endswith("?"), question
        assert "\n" not in question and not question.startswith(("Question", "1."))
        assert question.lower().rstrip("?") not in chunk.lower(), "a copy of the passage"
    assert not set(questions) & {q for _, q in DEFAULT_FEW_SHOT}, "an example copied"
    assert sum(bool(QUESTION_START.match(q)) for q in questions) >= len(questions) * 0.6
    assert len(set(questions)) >= len(questions) - 1, "sampled questions should differ"


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_the_other_compute_paths_ask_questions_about_the_passage_too(chunks, dtype):
    """Their samples differ from float32's (and between CPUs), so only their shape is checked."""
    [result] = make_generator("local", n=2, dtype=dtype, show_progress=False).generate(chunks[:1])
    assert result.error is None and 1 <= len(result.questions) <= 2
    assert result.prompt_tokens > 100 and result.completion_tokens >= 2
    for question in result.questions:
        assert "\n" not in question and question.lower() not in chunks[0].lower()


def test_an_empty_passage_fails_alone_and_progress_reaches_the_end(generated, chunks):
    results, calls = generated
    assert results[-1].questions == [] and results[-1].error == "empty passage"
    assert calls[-1] == (len(chunks) + 1, len(chunks) + 1)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_same_seed_same_questions_whatever_the_batch(generated, chunks):
    """Each sequence samples from its own generator seeded by the passage, so a passage's
    questions do not depend on what else shares its batch."""
    results, _ = generated
    again = make_generator("local", n=2, batch_size=2, dtype="float32", show_progress=False)
    [second] = again.generate([chunks[1]])
    assert second.questions == results[1].questions


def test_n_questions_share_one_prefill_without_changing_the_samples(generated, chunks):
    """With n=2 the prompt is prefilled once and its cache copied; sample 0 is seeded like the
    only sample of n=1, so it must come out the same as when the prompt is prefilled alone."""
    results, _ = generated
    single = make_generator("local", n=1, dtype="float32", show_progress=False)
    single = single.generate(chunks[:2])
    assert [r.questions for r in single] == [r.questions[:1] for r in results[:2]]
    assert [r.prompt_tokens for r in single] == [r.prompt_tokens for r in results[:2]]


def test_fingerprint_changes_with_what_changes_the_output():
    base = LocalGenerator()
    assert base.fingerprint() == LocalGenerator(batch_size=2, threads=1).fingerprint()
    assert (
        LocalGenerator(dtype="float32").fingerprint()
        != LocalGenerator(dtype="bfloat16").fingerprint()
    )
    # Logs and reports name the generator: the compute path that ran is part of its name.
    assert LocalGenerator(dtype="bfloat16").name == "local (gemma-3-270m-q4_k_m, bfloat16)"
    # On float32 weights an int8 copy of the vocabulary projection shortlists the next token
    # (FBGEMM serves every x86-64 CPU with AVX2, which this project's machines all have).
    assert LocalGenerator(dtype="float32").name == "local (gemma-3-270m-q4_k_m, float32, int8 head)"
    for change in (
        {"n": 2},
        {"seed": 1},
        {"temperature": 0.9},
        {"template": "{examples}Text: {passage}\nQuestion:"},
        {"few_shot": [("A passage.", "A question?")]},
        {"example_queries": ["reset password"]},
    ):
        assert LocalGenerator(**change).fingerprint() != base.fingerprint(), change


def test_prompt_rotates_examples_between_passages(chunks):
    gen = LocalGenerator()
    prompts = [gen.prompt(c) for c in chunks]
    examples = [p.split(f"Passage: {c[:40]}")[0] for p, c in zip(prompts, chunks, strict=True)]
    assert len(set(examples)) > 1
    assert all(p.endswith("\nQuestion:") and p.count("Passage:") == 3 for p in prompts)


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="template must contain the placeholder"):
        LocalGenerator(template="{passage} only")
    at_least_one = r"batch_size\n  Input should be greater than or equal to 1"
    with pytest.raises(ValueError, match=at_least_one):
        make_generator("local", batch_size=0)
    with pytest.raises(ValueError, match=r"temperature\n  Input should be greater than 0"):
        LocalGenerator(temperature=0)


def test_the_environment_can_force_the_dtype_auto_picks(monkeypatch):
    from tasks.llm.machine import DTYPE_ENV, resolve_dtype

    monkeypatch.setenv(DTYPE_ENV, "float32")
    assert resolve_dtype("auto") == "float32"
    assert resolve_dtype("bfloat16") == "bfloat16"  # an explicit setting still wins
    monkeypatch.setenv(DTYPE_ENV, "fp8")
    with pytest.raises(ValueError, match="RAGTUNE_DTYPE='fp8'"):
        resolve_dtype("auto")


@pytest.fixture(scope="module")
def last_hidden(generator, chunks):
    """Gemma's final hidden states after real few-shot prompts: what the head sees at step 0."""
    import torch

    from tasks.llm.gemma import load_gemma

    model, tokenizer = load_gemma(dtype="float32")
    enc = tokenizer([generator.prompt(c) for c in chunks], return_tensors="pt", padding=True)
    positions = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model.model(**enc, position_ids=positions)
    return model.get_output_embeddings().weight, out.last_hidden_state[:, -1]


def test_the_int8_shortlist_keeps_the_exact_heads_candidates_and_logits(last_hidden):
    """On float32 weights the int8 copy only ranks the vocabulary: the tokens sampling may pick
    and their logits must be the exact projection's (within float32 summation error)."""
    import torch

    from tasks.llm.sampling import Head, shares

    weight, hidden = last_hidden
    exact, shortlist = Head(weight, int8=False), Head(weight, int8=True)
    assert shortlist.path == "int8 shortlist" and exact.path == "exact"
    with torch.inference_mode():
        reference = torch.softmax(hidden @ weight.T / 0.7, dim=-1)  # the whole vocabulary
        ids, logits, rest = exact.candidates(hidden, None, 0.7)
        short_ids, short_logits, short_rest = shortlist.candidates(hidden, None, 0.7)
        alone = shortlist.candidates(hidden[:1], None, 0.7)

    top, order = reference.topk(32, dim=-1)
    for row in range(len(hidden)):
        nucleus = order[row][: int((top[row].cumsum(0) < 0.9).sum()) + 1]
        assert set(nucleus.tolist()) <= set(short_ids[row].tolist())
    torch.testing.assert_close(shares(logits, rest), reference.gather(1, ids))
    torch.testing.assert_close(short_logits[:, :32], logits[:, :32], atol=1e-3, rtol=1e-4)
    # The rest of the vocabulary enters top-p only through its total mass, from int8 logits:
    # the candidates' probabilities stay within a percentage point of the exact ones.
    torch.testing.assert_close(
        shares(short_logits, short_rest), reference.gather(1, short_ids), atol=0.01, rtol=0
    )
    # A row's candidates do not depend on the rows beside it (beyond float32 rounding, which may
    # swap near-ties among the unlikely ones).
    assert alone[0][0, :32].tolist() == short_ids[0, :32].tolist()
    torch.testing.assert_close(alone[1][0], short_logits[0], atol=1e-4, rtol=1e-5)


def test_the_judges_log_probabilities_from_the_int8_shortlist_match_the_exact_projection(
    last_hidden,
):
    """The judge reads log P(token) for tokens the model may find unlikely: the target's logit
    is exact whether or not the int8 ranking shortlisted it, and only the rest of the
    vocabulary's mass comes from int8 logits (0.002 nats off at most here, where the judge's
    scores for a question's passages lie tenths of a nat apart)."""
    import torch

    from tasks.llm.sampling import Head

    weight, hidden = last_hidden
    with torch.inference_mode():
        reference = torch.log_softmax(hidden @ weight.T, dim=-1)
        likely = reference.argmax(dim=-1)
        unlikely = reference.argmin(dim=-1)
        for targets in (likely, unlikely):
            expected = reference.gather(1, targets[:, None]).squeeze(1)
            torch.testing.assert_close(
                Head(weight, int8=True).logprobs(hidden, targets), expected, atol=5e-3, rtol=0
            )
            torch.testing.assert_close(
                Head(weight, int8=False).logprobs(hidden, targets), expected, atol=1e-4, rtol=0
            )


def test_unloading_gemma_also_frees_its_vocabulary_head(last_hidden):
    """The int8 copy and the float32 projection it points at are ~840 MB: unloading the model
    before training must drop them too (this module's last test: it unloads the shared model)."""
    from tasks.llm import gemma

    model, _ = gemma.load_gemma(dtype="float32")
    head = gemma.vocabulary_head(model)
    assert gemma.vocabulary_head(model) is head and head.path == "int8 shortlist"
    gemma.unload_gemma()
    assert not gemma._HEADS and not gemma._LOADED
