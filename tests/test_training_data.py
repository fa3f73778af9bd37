"""Training rows from a user's files (CSV, JSONL, saved datasets, common column names) and from
the workspace's generated questions."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from tasks.retrieval.evaluation import MetricsError
from tasks.training.data import held_out_queries, load_pairs, pairs_from_questions


def question(text: str, chunk_id: str, split: str, kept: bool | None = True) -> dict:
    """A row of the questions dataset; `kept=None` leaves the column out."""
    row = {"question": text, "chunk_id": chunk_id, "split": split}
    return row if kept is None else row | {"kept": kept}


def test_csv_with_query_and_passage_columns_becomes_anchor_positive(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(
        'query,passage,source\n"What is NIST?","NIST is a US agency, in Maryland.",web\n'
        '"Who wrote it?","The staff of NIST wrote it.",web\n'
    )
    data = load_pairs(path)
    assert data.column_names == ["anchor", "positive"]
    assert data[0] == {"anchor": "What is NIST?", "positive": "NIST is a US agency, in Maryland."}
    assert len(data) == 2


def test_jsonl_triplets_with_question_pos_neg_keys(tmp_path):
    path = tmp_path / "triplets.jsonl"
    rows = [
        {"question": "q1", "pos": "right passage", "neg": "wrong passage"},
        {"question": "q2", "pos": "another passage", "neg": "a distractor"},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    data = load_pairs(path)
    assert data.column_names == ["anchor", "positive", "negative"]
    assert data[1] == {"anchor": "q2", "positive": "another passage", "negative": "a distractor"}


def test_saved_dataset_folder_and_its_train_split(tmp_path):
    rows = [{"anchor": "a", "positive": "b"}, {"anchor": "c", "positive": "d"}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "plain"))
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "splits"))
    assert load_pairs(tmp_path / "plain").to_list() == rows
    assert load_pairs(tmp_path / "splits").to_list() == rows


def test_a_file_missing_the_positive_column_names_the_column_and_the_file(tmp_path):
    path = tmp_path / "only_questions.csv"
    path.write_text("question,score\nWhat is NIST?,1\n")
    with pytest.raises(ValueError, match=r"only_questions\.csv is missing column 'positive'"):
        load_pairs(path)


def test_a_file_missing_the_anchor_column_names_it(tmp_path):
    path = tmp_path / "passages.jsonl"
    path.write_text(json.dumps({"passage": "text"}) + "\n")
    with pytest.raises(ValueError, match=r"passages\.jsonl is missing column 'anchor'"):
        load_pairs(path)


def test_bad_json_line_and_unknown_suffix_are_clear_errors(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"query": "q", "passage": "p"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_pairs(broken)
    other = tmp_path / "pairs.parquet"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match=r"unsupported training file type '\.parquet'"):
        load_pairs(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(tmp_path / "missing.csv")


def test_pairs_from_questions_keeps_only_kept_questions_of_the_split():
    chunks = {"c1": "Chunk one text.", "c2": "Chunk two text."}
    questions = [
        question("train q", "c1", "train"),
        question("rejected q", "c1", "train", kept=False),
        question("test q", "c2", "test"),
    ]
    train = pairs_from_questions(questions, chunks)
    assert train.to_list() == [{"anchor": "train q", "positive": "Chunk one text."}]
    test = pairs_from_questions(questions, chunks, split="test")
    assert test.to_list() == [{"anchor": "test q", "positive": "Chunk two text."}]


def test_a_question_about_an_unknown_chunk_is_an_error():
    questions = [question("q", "gone", "train")]
    with pytest.raises(ValueError, match=r"chunk 'gone'.*re-run ingest"):
        pairs_from_questions(questions, {"c1": "text"})


def test_no_kept_training_questions_is_an_error():
    questions = [question("q", "c1", "train", kept=False)]
    with pytest.raises(ValueError, match="no kept questions in the 'train' split"):
        pairs_from_questions(questions, {"c1": "text"})


def test_held_out_queries_are_kept_test_questions_relevant_to_their_own_chunk():
    chunks = {"c1": "one", "c2": "two"}
    questions = [
        question("train q", "c1", "train"),
        question("test q", "c2", "test"),
        question("rejected", "c2", "test", kept=False),
        question("unmarked", "c2", "test", kept=None),
    ]
    queries, relevant = held_out_queries(questions, chunks)
    assert queries == {"q1": "test q"}
    assert relevant == {"q1": {"c2"}}


def test_held_out_questions_about_chunks_that_are_gone_are_an_error():
    questions = [question("stale", "gone", "test")]
    with pytest.raises(MetricsError, match=r"1 test questions .* re-run the questions flow"):
        held_out_queries(questions, {"c1": "one"})
