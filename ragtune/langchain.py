"""ragtune's retriever as a LangChain retriever (`pip install 'ragtune[langchain]'`).

    from ragtune.langchain import RagtuneRetriever

    retriever = RagtuneRetriever.open("docs", workspace="workspace", k=4)
    docs = retriever.invoke("What is confabulation?")   # list[Document], provenance in metadata

LangChain's own `Chroma` vector store would embed the query with whatever embedding function the
app passes, not the tuned model at the collection's dimension; this embeds it as the collection
was built, and logs it for `ragtune learn`.
"""

from __future__ import annotations

from typing import Any, Self

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from tasks.serving.retriever import Retriever, provenance


class RagtuneRetriever(BaseRetriever):
    """The top `k` chunks of a published collection as LangChain documents; with `rerank`, the
    judge reorders the top `rerank` first."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: Retriever
    k: int = 5
    rerank: int = 0

    @classmethod
    def open(cls, alias: str = "docs", *, k: int = 5, rerank: int = 0, **store: Any) -> Self:
        """On `alias`, with the store settings `Retriever.open` takes."""
        return cls(retriever=Retriever.open(alias, **store), k=k, rerank=rerank)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return [
            Document(id=hit.id, page_content=hit.text, metadata=provenance(hit))
            for hit in self.retriever.search(query, self.k, self.rerank)
        ]
