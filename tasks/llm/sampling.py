"""Choosing Gemma's next token: the vocabulary projection and seeded top-p sampling.

Decoding a batch of 15 rows on float32 weights spends most of each step in the projection onto
Gemma's 262,144-token vocabulary: it reads 671 MB of weights per step (126 ms here, against
~50 ms for all 18 transformer blocks). Sampling only ever needs the few hundred most likely
tokens, so on float32 weights an int8 copy of the projection ranks the whole vocabulary
(FBGEMM, ~15 ms) and float32 re-scores the best `SHORTLIST` of them exactly; the rest of the
vocabulary enters only through its total probability, which top-p needs. The exact re-scoring is
what keeps a passage's samples independent of its batch mates: an int8 logit moves a whole
quantisation step when the hidden state moves by a rounding error, a float32 one does not.
"""

from __future__ import annotations

from typing import Any

#: Tokens top-p may choose from: the nucleus at top_p 0.9 lives well inside them, and sorting
#: the whole vocabulary every step costs more than the decoding step itself.
CANDIDATES = 256
#: Tokens the int8 ranking hands to float32 re-scoring: twice the candidates, so that the int8
#: ranking's errors (a few tokens near rank 256 swap places) never reach the candidates.
SHORTLIST = 2 * CANDIDATES
#: Rows per int8 product: FBGEMM's time grows faster than the rows beyond ~16 here.
_ROWS = 16

_NEWLINE_MASKS: dict[int, Any] = {}


class Head:
    """Candidate tokens and their logits for a batch of final hidden states.

    `int8` ranks the vocabulary with an int8 copy of the projection and re-scores a shortlist in
    the weights' own dtype; without it (bfloat16 weights, which are fast to read, or a CPU that
    FBGEMM does not serve) every logit is computed exactly.
    """

    def __init__(self, weight: Any, int8: bool):
        from tasks.llm import quantisation

        self.weight = weight
        self.packed = None
        self.path = "exact"
        if int8 and quantisation.available():
            self.packed = quantisation.pack(weight)
            self.path = "int8 shortlist"

    def candidates(
        self, hidden: Any, banned: Any | None, temperature: float = 1.0
    ) -> tuple[Any, Any, Any]:
        """(token ids, their logits / temperature, log of the rest's summed exp of the same),
        each row on its own. `banned` tokens (a mask over the vocabulary) get no probability.
        """
        if self.packed is None:
            logits = self._exact(hidden) / temperature
            if banned is not None:
                logits[:, banned] = float("-inf")
            top, ids = logits.topk(CANDIDATES, dim=-1)
            return ids, top, _rest_logsumexp(logits, ids)
        approx, ids, exact = self._shortlist(hidden, banned, temperature)
        top, order = (exact / temperature).topk(CANDIDATES, dim=-1)
        ids = ids.gather(1, order)
        return ids, top, _rest_logsumexp(approx, ids)

    def logprobs(self, hidden: Any, targets: Any) -> Any:
        """log P(target) per row of final hidden states, over the whole vocabulary. On the int8
        path the target's logit and the shortlist's are exact and only the rest of the
        vocabulary's mass is int8's: the shortlist holds nearly all of it, so the log-probability
        moves by a few thousandths of a nat (0.002 measured), where the exact projection costs
        several times more (it reads 671 MB of float32 weights per call)."""
        import torch

        if self.packed is None:
            logits = self._exact(hidden)
            return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(dim=-1)
        approx, ids, exact = self._shortlist(hidden, None, 1.0)
        target = (self.weight[targets] * hidden.float()).sum(dim=-1)
        return target - torch.logaddexp(exact.logsumexp(dim=-1), _rest_logsumexp(approx, ids))

    def _exact(self, hidden: Any) -> Any:
        return (hidden.to(self.weight.dtype) @ self.weight.T).float()

    def _shortlist(
        self, hidden: Any, banned: Any | None, temperature: float
    ) -> tuple[Any, Any, Any]:
        """(int8 logits / temperature over the whole vocabulary, the SHORTLIST best ids by them,
        those ids' exact logits, not divided)."""
        import torch

        from tasks.llm import quantisation

        hidden = hidden.float()
        approx = torch.cat(
            [quantisation.product(part, self.packed) for part in hidden.split(_ROWS)]
        )
        approx /= temperature
        if banned is not None:
            approx[:, banned] = float("-inf")
        ids = approx.topk(SHORTLIST, dim=-1).indices
        exact = torch.bmm(self.weight[ids], hidden.unsqueeze(-1)).squeeze(-1)
        return approx, ids, exact


def shares(logits: Any, rest: Any) -> Any:
    """Each candidate's probability over the whole vocabulary, from its logit and the log of the
    rest's summed exp-logits."""
    import torch

    total = torch.logaddexp(logits.logsumexp(dim=-1), rest)
    return (logits - total.unsqueeze(-1)).exp()


def _rest_logsumexp(logits: Any, ids: Any) -> Any:
    """log of the summed exp-logits of every token but `ids`, per row."""
    return logits.scatter(1, ids, float("-inf")).logsumexp(dim=-1)


class Sampler:
    """Temperature + top-p sampling with one `torch.Generator` per row.

    Sampling a batch from one random stream would make a passage's sample depend on its batch
    mates; here each row draws from its own generator, seeded by its passage. A token that starts
    a new line ends the question (it stands for the end of the sequence); the first token may not
    end it, or a sample would be an empty question.
    """

    def __init__(self, temperature: float, top_p: float, ends: Any, eos: int):
        self.temperature = temperature
        self.top_p = top_p
        #: tokens that end a question, as a mask over the vocabulary
        self.ends = ends
        self.eos = eos

    @classmethod
    def for_tokenizer(
        cls, tokenizer: Any, vocab_size: int, temperature: float, top_p: float
    ) -> Sampler:
        import torch

        newline = _NEWLINE_MASKS.get(id(tokenizer))
        if newline is None:
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            newline = torch.tensor(
                [p is not None and ("\n" in p or p == "<0x0A>") for p in pieces], dtype=torch.bool
            )
            _NEWLINE_MASKS[id(tokenizer)] = newline
        ends = torch.zeros(vocab_size, dtype=torch.bool)
        size = min(vocab_size, len(newline))
        ends[:size] = newline[:size]
        stops = [*stop_ids(tokenizer), tokenizer.pad_token_id]
        ends[[t for t in stops if t is not None and t < vocab_size]] = True
        return cls(temperature, top_p, ends, tokenizer.eos_token_id)

    def next_tokens(self, hidden: Any, head: Head, generators: list[Any], first: bool) -> Any:
        """One token per row of final hidden states; `eos` where the question ends."""
        import torch

        # The temperature scales the logits before the rest's log-sum-exp, which it does not
        # commute with.
        ids, logits, rest = head.candidates(hidden, self.ends if first else None, self.temperature)
        probs = shares(logits, rest)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = probs.cumsum(dim=-1) - probs >= self.top_p
        probs = probs.masked_fill(drop, 0.0)
        chosen = torch.empty(len(generators), dtype=torch.long)
        for row, gen in enumerate(generators):
            chosen[row] = ids[row, torch.multinomial(probs[row], 1, generator=gen)]
        return torch.where(self.ends[chosen], torch.full_like(chosen, self.eos), chosen)


def stop_ids(tokenizer: Any) -> list[int]:
    """The tokens that end a sequence: end-of-sequence and, where it exists, end-of-turn."""
    ids = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(ids)
