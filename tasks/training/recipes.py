"""Training recipes: named presets, one per model card ragtune grew from, and one loss builder
for each loss they use.

A recipe holds the loss and its parameters, prompts, batch size, epochs and learning rate of
the card it reproduces (docs/recipes.md). This module imports sentence-transformers only inside
the loss builders, so the recipes' names and defaults are cheap to read (the command line's help
lists them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.models import load_model

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


#: Matryoshka sizes below the model's own width, as in seed 003 (768 -> 512, 256, 128, 64).
MATRYOSHKA_STEPS = (768, 512, 256, 128, 64)


BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "


@dataclass(frozen=True)
class Recipe:
    """A named training preset: loss, its parameters, prompts and default hyperparameters."""

    name: str
    loss: str
    batch_size: int
    epochs: int
    #: the seed model card the recipe reproduces, if any
    seed_card: str | None
    description: str = ""
    learning_rate: float = 5e-5
    query_prompt: str | None = None
    document_prompt: str | None = None
    matryoshka: bool = False
    needs_negatives: bool = False
    #: rows carry the teacher's scores in a `label` column (distillation)
    needs_labels: bool = False
    scale: float = 20.0
    margin: float = 5.0
    mini_batch_size: int = 32
    temperature: float = 0.01
    guide_model: str | None = None

    def prompts(self) -> dict[str, str]:
        """The prompt for each training column (queries are anchors; documents the rest)."""
        out = {}
        if self.query_prompt:
            out["anchor"] = self.query_prompt
        if self.document_prompt:
            out["positive"] = out["negative"] = self.document_prompt
        return out


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="matryoshka-mnrl",
            loss="MultipleNegativesRankingLoss",
            batch_size=20,
            epochs=5,
            matryoshka=True,
            seed_card="003",
            description="MatryoshkaLoss(MNRL) from the model width down to 64, equal weights.",
        ),
        Recipe(
            name="mnrl-prefixed",
            loss="MultipleNegativesRankingLoss",
            batch_size=16,
            epochs=1,
            query_prompt="query: ",
            document_prompt="passage: ",
            seed_card="001",
            description="MNRL with 'query: ' / 'passage: ' prefixes (E5 style).",
        ),
        Recipe(
            name="mnrl",
            loss="MultipleNegativesRankingLoss",
            batch_size=16,
            epochs=10,
            seed_card="002",
            description="Plain MNRL, scale 20, cosine similarity.",
        ),
        Recipe(
            name="mnrl-bge-instruction",
            loss="MultipleNegativesRankingLoss",
            batch_size=32,
            epochs=1,
            query_prompt=BGE_QUERY_INSTRUCTION,
            seed_card="004",
            description="MNRL with the BGE retrieval instruction on queries only.",
        ),
        Recipe(
            name="triplet",
            loss="TripletLoss",
            batch_size=64,
            epochs=5,
            needs_negatives=True,
            seed_card="000",
            description="TripletLoss, Euclidean distance, margin 5, with mined hard negatives.",
        ),
        Recipe(
            name="cached-mnrl",
            loss="CachedMultipleNegativesRankingLoss",
            batch_size=64,
            epochs=1,
            seed_card=None,
            description="MNRL with gradient caching: big batches in little memory (not faster).",
            mini_batch_size=16,
        ),
        Recipe(
            name="matryoshka-distill",
            loss="DistillKLDivLoss",
            batch_size=16,
            epochs=3,
            matryoshka=True,
            seed_card=None,
            description="MatryoshkaLoss(DistillKLDivLoss): learn a judge's scores over each "
            "query's candidates (rows with a label column, from `ragtune learn`).",
            learning_rate=2e-5,
            needs_labels=True,
        ),
        Recipe(
            name="matryoshka-margin-mse",
            loss="MarginMSELoss",
            batch_size=16,
            epochs=1,
            matryoshka=True,
            seed_card=None,
            description="MatryoshkaLoss(MarginMSELoss): learn the teacher's margin of each "
            "query's positive over its other candidates (GPL; rows from `label_form=margin`).",
            learning_rate=2e-5,
            needs_labels=True,
        ),
        Recipe(
            name="gist",
            loss="GISTEmbedLoss",
            batch_size=32,
            epochs=1,
            seed_card=None,
            description="GISTEmbed: a guide model (the base model) drops in-batch false negatives.",
        ),
    )
}


DEFAULT_RECIPE = "matryoshka-mnrl"


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}") from None


def matryoshka_dims(width: int) -> list[int]:
    """The model's own width, then every standard smaller size down to 64."""
    return [width, *(dim for dim in MATRYOSHKA_STEPS if dim < width)]


def mnrl_loss(model: SentenceTransformer, spec: Recipe, base_model: str) -> Any:
    """In-batch negatives: every other positive of the batch is a negative for each anchor."""
    from sentence_transformers.sentence_transformer import losses

    return losses.MultipleNegativesRankingLoss(model, scale=spec.scale)


def cached_mnrl_loss(model: SentenceTransformer, spec: Recipe, base_model: str) -> Any:
    """MNRL with gradient caching: a large batch's negatives in a small batch's memory."""
    from sentence_transformers.sentence_transformer import losses

    return losses.CachedMultipleNegativesRankingLoss(
        model, scale=spec.scale, mini_batch_size=spec.mini_batch_size
    )


def triplet_loss(model: SentenceTransformer, spec: Recipe, base_model: str) -> Any:
    """Anchor closer to its positive than to its negative by a Euclidean margin."""
    from sentence_transformers.sentence_transformer import losses

    return losses.TripletLoss(
        model, distance_metric=losses.TripletDistanceMetric.EUCLIDEAN, triplet_margin=spec.margin
    )


def gist_loss(model: SentenceTransformer, spec: Recipe, base_model: str) -> Any:
    """MNRL where a guide model (by default the untuned base) drops in-batch negatives it
    judges more similar than the positive: likely false negatives."""
    from sentence_transformers.sentence_transformer import losses

    guide = load_model(spec.guide_model or base_model, device=str(model.device))
    return losses.GISTEmbedLoss(model, guide, temperature=spec.temperature)


def scaled_cosine(a: Any, b: Any, scale: float) -> Any:
    """Pairwise cosine similarity times `scale`, as MNRL scales its logits."""
    from sentence_transformers.util import pairwise_cos_sim

    return scale * pairwise_cos_sim(a, b)


def distill_loss(model: SentenceTransformer, spec: Recipe, base_model: str) -> Any:
    """KL divergence between the teacher's softmax over a query's candidates and the
    student's. The teacher's scores are z-scores (spread about 1, temperature 1); the student's
    are cosines, which span a tenth of that, so they are scaled by the recipe's `scale` as MNRL
    scales them. Scaling the similarity, not lowering the student temperature, keeps the
    gradient whole: the loss multiplies itself by the student temperature squared."""
    import functools

    from sentence_transformers.sentence_transformer import losses

    return losses.DistillKLDivLoss(
        model, similarity_fct=functools.partial(scaled_cosine, scale=spec.scale), temperature=1.0
    )


def margin_mse_loss(model: SentenceTransformer, spec: Recipe, base_model: str) -> Any:
    """Squared error between the student's margin of the positive over each negative and the
    teacher's. MatryoshkaLoss hands the loss unit vectors at every width, so the student's
    similarity is a cosine, scaled by the recipe's `scale` to the teacher's z-score units."""
    import functools

    from sentence_transformers.sentence_transformer import losses

    return losses.MarginMSELoss(
        model, similarity_fct=functools.partial(scaled_cosine, scale=spec.scale)
    )


#: Each recipe's `loss` names the function that builds it with the recipe's parameters.
LOSSES: dict[str, Callable[[SentenceTransformer, Recipe, str], Any]] = {
    "MultipleNegativesRankingLoss": mnrl_loss,
    "CachedMultipleNegativesRankingLoss": cached_mnrl_loss,
    "TripletLoss": triplet_loss,
    "GISTEmbedLoss": gist_loss,
    "DistillKLDivLoss": distill_loss,
    "MarginMSELoss": margin_mse_loss,
}


def build_loss(model: SentenceTransformer, spec: Recipe, dims: list[int], base_model: str) -> Any:
    """The recipe's loss, with the parameters its seed card lists, inside MatryoshkaLoss when
    the recipe trains every dimension."""
    from sentence_transformers.sentence_transformer import losses

    if spec.loss not in LOSSES:
        raise ValueError(f"recipe {spec.name!r} names an unknown loss {spec.loss!r}")
    loss = LOSSES[spec.loss](model, spec, base_model)
    if spec.matryoshka:
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=dims)
    return loss
