"""The bundled Gemma read as a judge: the mean log-probability of a query given a passage.

A passage that makes the query likely is relevant to it (UPR, Sachan et al., 2022). Re-ranking
(`tasks.retrieval.rerank`) and the local judge of the learn stage (`tasks.learn.judges`) both
score through `QueryLikelihood`; many queries' pairs are judged in shared, length-sorted
batches, and a bounded cache of passage states serves candidates that recur.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from tasks.text import is_question

#: A passage's keys and values (layers x heads x tokens x width each) and the hidden state after
#: its last token, which predicts the question's first.
PassageState = tuple[Any, Any, Any]


#: The judge reads the passage and scores the question as its continuation.
JUDGE_PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"


#: Passages whose states a judge keeps when asked to (`cache_size`; about 9 MB each in float32
#: for Gemma 270M at 250 tokens: 18 layers x keys and values x 256 dims per token).
JUDGE_CACHE = 128


#: Characters of a passage the judge reads (about 250 tokens of English).
MAX_PASSAGE_CHARS = 1000


#: Tokens of a passage the judge reads: on SciFact dev (first 200 claims) 192 kept re-ranking's
#: NDCG@10 within 0.14 points of the uncut passages for 11% less time; 128 lost 0.92.
MAX_PASSAGE_TOKENS = 192


#: Padded tokens per forward pass when many queries' pairs are judged together: 2048 (about ten
#: pairs) judged 16 queries' NIST chunks 10-25% faster than 8192 in bfloat16 and in float32,
#: and SciFact's abstracts as fast (BENCHMARKS.md).
BATCH_TOKENS = 2048


#: Padded question tokens per forward pass over kept passage states. Only the questions'
#: tokens go through the model there, so batching by passage and question tokens together (as
#: `BATCH_TOKENS` does for fresh pairs) would run ten pairs of ~15 tokens a pass, too few to
#: keep the matrix units busy.
CACHED_QUESTION_TOKENS = 1024


#: Question tokens per vocabulary projection: 128 x 262k float32 logits are 134 MB.
HEAD_ROWS = 128


#: Distinct passages whose states one batch of cached scoring holds at once (~7 MB each in
#: float32 at 192 tokens), however many queries a caller hands over.
PASSAGES_AT_ONCE = 64


#: Queries whose candidates are judged together where a caller has many (evaluation, learn).
QUERY_GROUP = 16


#: For statement-style queries (claims, titles): the question would read as an odd continuation.
STATEMENT_PROMPT = "Passage: {passage}\nPlease write a claim based on this passage.\nClaim:"


class QueryLikelihood:
    """Scores (question, passage) by the causal LM's mean log-probability of the question's
    tokens after the passage: a passage that makes the question likely is relevant to it.

    With `cache_size` > 0 it keeps the key/value states of the last `cache_size` passages it
    read (a passage's prompt comes before the question, so its states do not depend on the
    question): where many queries share candidates (re-ranked evaluation, judging a query log)
    a recurring passage then costs its question's few tokens instead of its own hundreds.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        prompt: str = JUDGE_PROMPT,
        max_passage_chars: int = MAX_PASSAGE_CHARS,
        cache_size: int = 0,
        max_passage_tokens: int | None = MAX_PASSAGE_TOKENS,
    ) -> None:
        if "{passage}" not in prompt:
            raise ValueError(f"the judge prompt must contain '{{passage}}', got {prompt!r}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be 0 (no cache) or more, got {cache_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.prompt = prompt
        self.max_passage_chars = max_passage_chars
        self.max_passage_tokens = max_passage_tokens
        self.cache_size = cache_size
        #: cut passage -> its states, the most recently read last
        self.states: OrderedDict[str, PassageState] = OrderedDict()

    def score(self, question: str, passages: Sequence[str]) -> list[float]:
        """One score per passage: from cached passage states when the judge keeps them, else
        in padded batches."""
        return self.score_many([(question, passages)])[0]

    def score_many(
        self, items: Sequence[tuple[str, Sequence[str]]], batch_tokens: int = BATCH_TOKENS
    ) -> list[list[float]]:
        """Scores of several questions' passages at once. Every (question, passage) pair is
        sorted by length and packed into batches of about `batch_tokens` padded tokens, so
        passages of unequal length pad little: 11% faster than one query at a time on
        SciFact's abstracts, 0-15% on chunks of one length (BENCHMARKS.md). With the
        passage-state cache the new passages are read in such batches, then every pair's
        question in batches over its passage's states."""
        pairs = [
            (self.cut(passage), self._question_ids(question))
            for question, passages in items
            for passage in passages
        ]
        flat: list[float] = []
        if self.cache_size:
            window: list[tuple[str, list[int]]] = []
            for pair in pairs:
                if len({text for text, _ in window} | {pair[0]}) > PASSAGES_AT_ONCE:
                    flat += self._score_cached(window, batch_tokens)
                    window = []
                window.append(pair)
            flat += self._score_cached(window, batch_tokens)
        else:
            flat = self._score_fresh(
                [(self._context_of(text), ids) for text, ids in pairs], batch_tokens
            )
        scores = iter(flat)
        return [[next(scores) for _ in passages] for _, passages in items]

    def _score_fresh(
        self, pairs: Sequence[tuple[list[int], list[int]]], batch_tokens: int
    ) -> list[float]:
        flat: list[float] = [0.0] * len(pairs)
        for batch in _batches([sum(map(len, pair)) for pair in pairs], batch_tokens):
            for j, value in zip(batch, self._score_batch([pairs[j] for j in batch]), strict=True):
                flat[j] = value
        return flat

    def _score_cached(
        self, pairs: Sequence[tuple[str, list[int]]], batch_tokens: int
    ) -> list[float]:
        """Scores of (cut passage, question ids) pairs from the passages' states. A batch whose
        longest passage and longest question together reach the model's sliding window is read
        whole instead: the padding between a passage's states and its question would shift
        which tokens that window sees."""
        from tasks.llm.kvcache import fits

        states = self._passage_states([text for text, _ in pairs], batch_tokens)
        rows = [(states[text], ids) for text, ids in pairs]
        flat: list[float] = [0.0] * len(pairs)
        for batch in _batches([len(ids) for _, ids in rows], CACHED_QUESTION_TOKENS):
            passage = max(rows[i][0][0].shape[-2] for i in batch)
            question = max(len(rows[i][1]) for i in batch)
            if fits(self.model.config, passage + question):
                hidden = self._hidden_after([rows[i] for i in batch])
                scores = self._question_logprobs(
                    [(h, rows[i][1]) for h, i in zip(hidden, batch, strict=True)]
                )
            else:
                scores = self._score_batch(
                    [(self._context_of(pairs[i][0]), pairs[i][1]) for i in batch]
                )
            for i, value in zip(batch, scores, strict=True):
                flat[i] = value
        return flat

    def _question_ids(self, question: str) -> list[int]:
        return self.tokenizer(" " + question, add_special_tokens=False)["input_ids"]

    def context_ids(self, passage: str) -> list[int]:
        """The tokens the judge reads before the question: the prompt around the cut passage."""
        return self._context_of(self.cut(passage))

    def _context_of(self, text: str) -> list[int]:
        return self.tokenizer(self.prompt.format(passage=text))["input_ids"]

    def cut(self, passage: str) -> str:
        """The passage as the judge reads it: at most `max_passage_chars` characters, then at
        most `max_passage_tokens` tokens where set (a token budget is the same cost for every
        text, where characters per token vary by language and subject)."""
        text = passage[: self.max_passage_chars]
        if self.max_passage_tokens:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.max_passage_tokens:
                text = self.tokenizer.decode(ids[: self.max_passage_tokens])
        return text

    def _question_logprobs(self, rows: Sequence[tuple[Any, list[int]]]) -> list[float]:
        """Mean log-probability of each question's tokens, from the hidden states that predict
        them, for many (hidden states, question ids) at once. Logits only there: the whole
        vocabulary (262k for Gemma) at every position of every passage would take gigabytes.
        The projection reads all 671 MB of its float32 weights per call, so the rows of every
        question go through it together, HEAD_ROWS at a time (one call per question cost 40% of
        the judge's time on a 10 GB/s machine); on float32 weights an int8 copy of it ranks the
        vocabulary and only the shortlist is exact (`sampling.Head.logprobs`)."""
        import torch

        from tasks.llm.gemma import vocabulary_head

        head = vocabulary_head(self.model)
        hidden = torch.cat([states for states, _ in rows])
        targets = torch.tensor([token for _, ids in rows for token in ids])
        with torch.no_grad():
            flat = torch.cat(
                [
                    head.logprobs(
                        hidden[start : start + HEAD_ROWS], targets[start : start + HEAD_ROWS]
                    )
                    for start in range(0, len(hidden), HEAD_ROWS)
                ]
            )
        return [part.mean().item() for part in flat.split([len(ids) for _, ids in rows])]

    def _hidden_after(self, rows: Sequence[tuple[PassageState, list[int]]]) -> list[Any]:
        """For each (passage state, question ids), the hidden states that predict the question's
        tokens after the passage, all rows in one forward pass over the questions alone. Each
        row's passage states sit at the start of a shared cache, zero-padded to the longest;
        the mask hides the padding and the position ids continue each passage's own."""
        import torch
        from transformers import DynamicCache

        passage = max(keys.shape[-2] for (keys, _, _), _ in rows)
        layers, heads, _, width = rows[0][0][0].shape
        keys = rows[0][0][0].new_zeros(layers, len(rows), heads, passage, width)
        values = torch.zeros_like(keys)
        ids, question_mask = _right_padded([question_ids for _, question_ids in rows])
        question = ids.shape[1]
        mask = torch.cat([torch.zeros((len(rows), passage), dtype=torch.long), question_mask], 1)
        positions = torch.zeros_like(ids)
        for row, ((k, v, _), _) in enumerate(rows):
            n = k.shape[-2]
            keys[:, row, :, :n], values[:, row, :, :n] = k, v
            mask[row, :n] = 1
            positions[row] = torch.arange(n, n + question)
        cache = DynamicCache(config=self.model.config)
        for layer in range(layers):
            cache.update(keys[layer], values[layer], layer)
        with torch.no_grad():
            out = self.model.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache
            ).last_hidden_state
        return [
            torch.cat([last[None], out[row, : len(question_ids) - 1]])
            for row, ((_, _, last), question_ids) in enumerate(rows)
        ]

    def _passage_states(self, texts: Sequence[str], batch_tokens: int) -> dict[str, PassageState]:
        """The states of each cut passage in `texts`: kept ones as they are, the others read in
        padded batches. The last `cache_size` passages, in the order given, are kept after."""
        import torch

        distinct = list(dict.fromkeys(texts))
        missing = [text for text in distinct if text not in self.states]
        contexts = [self._context_of(text) for text in missing]
        found = {text: self.states[text] for text in distinct if text in self.states}
        for batch in _batches([len(ids) for ids in contexts], batch_tokens):
            ids, mask = _right_padded([contexts[i] for i in batch])
            with torch.no_grad():
                out = self.model.model(input_ids=ids, attention_mask=mask, use_cache=True)
            for row, i in enumerate(batch):
                n = len(contexts[i])
                found[missing[i]] = (
                    torch.stack([layer.keys[row, :, :n] for layer in out.cache.layers]),
                    torch.stack([layer.values[row, :, :n] for layer in out.cache.layers]),
                    out.last_hidden_state[row, n - 1].clone(),
                )
        for text in distinct:
            self.states[text] = found[text]
            self.states.move_to_end(text)
        while len(self.states) > self.cache_size:
            self.states.popitem(last=False)
        return found

    def _score_batch(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        """Scores of (context ids, question ids) pairs in one right-padded forward pass."""
        import torch

        ids, mask = _right_padded([context + question for context, question in pairs])
        with torch.no_grad():
            hidden = self.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            return self._question_logprobs(
                [
                    (hidden[row, len(context) - 1 : len(context) + len(question) - 1], question)
                    for row, (context, question) in enumerate(pairs)
                ]
            )


def local_judge_name(dtype: str = "auto") -> str:
    """The bundled judge's name, with the compute path it runs on this machine."""
    from tasks.llm.machine import resolve_dtype

    return f"gemma3-270m-{resolve_dtype(dtype)}"


def local_judge(
    statements: bool = False,
    dtype: str = "auto",
    cache_size: int = 0,
    max_passage_tokens: int | None = MAX_PASSAGE_TOKENS,
) -> QueryLikelihood:
    """The bundled Gemma 3 270M as the judge, offline; `cache_size` passages' states kept."""
    from tasks.llm.gemma import load_gemma
    from tasks.llm.machine import resolve_dtype

    dtype = resolve_dtype(dtype)
    model, tokenizer = load_gemma(dtype=dtype)
    return QueryLikelihood(
        model,
        tokenizer,
        name=local_judge_name(dtype),
        prompt=STATEMENT_PROMPT if statements else JUDGE_PROMPT,
        cache_size=cache_size,
        max_passage_tokens=max_passage_tokens,
    )


def style_judges(
    cache_size: int = 0, max_passage_tokens: int | None = MAX_PASSAGE_TOKENS
) -> Callable[[str], QueryLikelihood]:
    """A function giving each query the bundled judge in its style (claim or question), one
    judge per style for all the queries it is asked about, so its passage states are shared."""
    judges: dict[bool, QueryLikelihood] = {}

    def judge_for(query: str) -> QueryLikelihood:
        style = is_statement(query)
        if style not in judges:
            judges[style] = local_judge(
                statements=style, cache_size=cache_size, max_passage_tokens=max_passage_tokens
            )
        return judges[style]

    return judge_for


def score_grouped(
    judge_for: Callable[[str], QueryLikelihood], items: Sequence[tuple[str, Sequence[str]]]
) -> list[list[float]]:
    """Scores of several (query, passages) items, each query by the judge `judge_for` gives
    it, the items of one judge batched together (`QueryLikelihood.score_many`)."""
    groups: dict[int, list[int]] = {}
    judges: dict[int, QueryLikelihood] = {}
    for i, (query, _) in enumerate(items):
        judge = judge_for(query)
        judges[id(judge)] = judge
        groups.setdefault(id(judge), []).append(i)
    out: list[list[float]] = [[] for _ in items]
    for key, members in groups.items():
        scores = judges[key].score_many([items[i] for i in members])
        for i, values in zip(members, scores, strict=True):
            out[i] = values
    return out


def is_statement(query: str) -> bool:
    """Claims, titles and keywords do not end with a question mark; the judge is asked for
    that style, since it scores the query as the answer to its prompt."""
    return not is_question(query)


def _right_padded(rows: Sequence[list[int]]) -> tuple[Any, Any]:
    """Token ids and attention mask of `rows`, each padded on the right to the longest."""
    import torch

    ids = torch.zeros((len(rows), max(len(row) for row in rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Positions of `lengths`, shortest first, in batches of at most `batch_tokens` padded
    tokens (at least one each), so that rows of one batch pad little."""
    batches: list[list[int]] = [[]]
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Sorted by length, so the newest row is the batch's longest.
        if batches[-1] and (len(batches[-1]) + 1) * lengths[i] > batch_tokens:
            batches.append([])
        batches[-1].append(i)
    return [batch for batch in batches if batch]
