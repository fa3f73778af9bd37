"""Loading a labelled retrieval set in BEIR layout."""

from __future__ import annotations

import shutil

import pytest

from tasks.retrieval.beir import BeirFormatError, load_beir
from tests.conftest import FIXTURES

BEIR_TINY = FIXTURES / "beir-tiny"


def test_loads_corpus_queries_and_positive_judgements():
    corpus, queries, qrels = load_beir(BEIR_TINY)

    assert len(corpus) == 30
    # Title and text are joined, as BEIR evaluates them.
    assert corpus["d02"].startswith("Mitochondria The mitochondrion produces")
    # Only queries judged in the test split, with a score above zero, are returned.
    assert set(queries) == set(qrels) == {f"q{n:02d}" for n in range(1, 21)}
    assert "q21" not in queries  # judged with score 0 only
    assert qrels["q05"] == {"d05", "d06"}
    assert queries["q20"] == "How many strings does a violin have?"


def test_dev_split_reads_its_own_qrels_file():
    _, queries, qrels = load_beir(BEIR_TINY, split="dev")

    assert set(queries) == {"q22", "q23"}
    assert qrels == {"q22": {"d29"}, "q23": {"d30"}}


def test_missing_corpus_file_names_the_file(tmp_path):
    folder = tmp_path / "beir"
    shutil.copytree(BEIR_TINY, folder)
    (folder / "corpus.jsonl").unlink()

    with pytest.raises(BeirFormatError, match=r"corpus\.jsonl is missing"):
        load_beir(folder)


def test_missing_split_lists_the_splits_that_exist():
    with pytest.raises(BeirFormatError, match=r"qrels/train\.tsv is missing.*dev, test"):
        load_beir(BEIR_TINY, split="train")


def test_malformed_line_names_file_and_line(tmp_path):
    folder = tmp_path / "beir"
    shutil.copytree(BEIR_TINY, folder)
    with (folder / "queries.jsonl").open("a", encoding="utf-8") as handle:
        handle.write("{not json\n")

    with pytest.raises(BeirFormatError, match=r"queries\.jsonl, line 24: not valid JSON"):
        load_beir(folder)


def test_judgement_of_an_unknown_document_is_an_error(tmp_path):
    folder = tmp_path / "beir"
    shutil.copytree(BEIR_TINY, folder)
    with (folder / "qrels" / "test.tsv").open("a", encoding="utf-8") as handle:
        handle.write("q01\td99\t1\n")

    with pytest.raises(BeirFormatError, match=r"1 documents .* \(first: 'd99'\)"):
        load_beir(folder)
