"""What a RAG app imports: a retriever over the published collection, which embeds each query
with the model, prompt and dimension that collection was built with.

    from ragtune import Retriever

    retriever = Retriever.open("docs", workspace="workspace")
    hits = retriever.search("What is confabulation?", k=3)

Adapters for LangChain and LlamaIndex are `ragtune.langchain` and `ragtune.llamaindex`
(`pip install 'ragtune[langchain]'`, `'ragtune[llamaindex]'`).
"""

from tasks.serving.retriever import Hit, Retriever

__all__ = ["Hit", "Retriever"]
