"""ragtune's retriever as a LlamaIndex retriever (`pip install 'ragtune[llamaindex]'`).

    from ragtune.llamaindex import RagtuneRetriever

    retriever = RagtuneRetriever.open("docs", workspace="workspace", k=4)
    nodes = retriever.retrieve("What is confabulation?")   # list[NodeWithScore]

It plugs into a query engine (`RetrieverQueryEngine.from_args(retriever, llm=...)`) where
LlamaIndex's `ChromaVectorStore` would embed the query with the app's `embed_model`, not the
tuned model at the collection's dimension.
"""

from __future__ import annotations

from typing import Any, Self

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from tasks.serving.retriever import Retriever, provenance


class RagtuneRetriever(BaseRetriever):
    """The top `k` chunks of a published collection as LlamaIndex nodes with their cosine
    scores; with `rerank`, the judge reorders the top `rerank` first."""

    def __init__(self, retriever: Retriever, k: int = 5, rerank: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retriever = retriever
        self.k = k
        self.rerank = rerank

    @classmethod
    def open(cls, alias: str = "docs", *, k: int = 5, rerank: int = 0, **store: Any) -> Self:
        """On `alias`, with the store settings `Retriever.open` takes."""
        return cls(Retriever.open(alias, **store), k=k, rerank=rerank)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = self.retriever.search(query_bundle.query_str, self.k, self.rerank)
        return [
            NodeWithScore(
                node=TextNode(id_=hit.id, text=hit.text, metadata=provenance(hit)), score=hit.score
            )
            for hit in hits
        ]
