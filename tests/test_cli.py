"""The `ragtune` command and the parameter models behind it, as a user meets them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.cli import build_params, main, parse_settings
from flows.params import PipelineParams, QuestionParams, RefreshParams, SearchParams
from tasks.models import MINILM
from tasks.store import chroma
from tests.conftest import nist_rows


def test_a_misspelt_setting_from_python_names_the_key_and_the_closest_valid_one():
    with pytest.raises(ValidationError, match=r"'epochz' \(did you mean 'epochs'\?\)"):
        PipelineParams(finetune={"epochz": 5})
    with pytest.raises(ValidationError, match=r"'sourcez' \(did you mean 'sources'\?\)"):
        PipelineParams(sourcez=["docs/"])
    # Refresh takes only what refresh uses: a training section is not one of them.
    with pytest.raises(ValidationError, match=r"unknown setting 'finetune'.*RefreshParams"):
        RefreshParams(finetune={"epochs": 3})


def test_a_misspelt_setting_on_the_command_line_fails_before_anything_runs(capsys):
    assert main(["run", "--set", "finetune.epochz=5"]) == 2
    err = capsys.readouterr().err
    assert "finetune: Value error, unknown setting 'epochz' (did you mean 'epochs'?)" in err
    assert main(["finetune", "--set", "epochz=5"]) == 2
    assert "'epochz' (did you mean 'epochs'?) for FinetuneParams" in capsys.readouterr().err


def test_dotted_keys_reach_a_section_and_the_profile_fills_the_rest():
    assert parse_settings(["finetune.epochs=3", "finetune.recipe=mnrl", "seed=7"]) == {
        "finetune": {"epochs": 3, "recipe": "mnrl"},
        "seed": 7,
    }

    params = build_params(PipelineParams, {"sources": ("a/", "b/")}, ("finetune.epochs=3",))
    resolved = params.resolved()

    assert resolved.sources == ["a/", "b/"]
    assert resolved.finetune.epochs == 3  # what the user set wins over the demo profile's 3...
    assert resolved.finetune.batch_size == 32  # ...and the profile fills what they did not set
    assert resolved.questions.generator.backend == "local" and resolved.base_model == MINILM
    assert resolved.finetune_params().epochs == 3
    production = build_params(PipelineParams, {"profile": "production"}, ()).resolved()
    assert production.finetune.epochs == 5 and production.questions.generator.backend == "api"


def test_a_backend_is_chosen_by_name_and_its_own_fields_are_checked_before_anything_runs(
    capsys,
):
    params = build_params(
        QuestionParams,
        {"generator": "api"},
        ("generator.model=llama3.1", "generator.base_url=http://127.0.0.1:11434/v1"),
    )
    assert params.generator.backend == "api" and params.generator.model == "llama3.1"
    assert params.generator.concurrency == 4  # the backend's own default
    nested = build_params(PipelineParams, {}, ("questions.generator.backend=api",))
    assert nested.resolved().questions.generator.backend == "api"
    # A writer given without its backend is the profile's: production asks an API.
    production = build_params(
        PipelineParams, {"profile": "production"}, ("questions.generator.model=gpt-4o-mini",)
    )
    assert production.questions.generator.backend == "api"
    assert build_params(QuestionParams, {}, ("generator.batch_size=4",)).generator.backend == (
        "local"
    )

    assert main(["questions", "--generator", "api", "--set", "generator.concurency=2"]) == 2
    assert "'concurency' (did you mean 'concurrency'?)" in capsys.readouterr().err
    assert main(["learn", "--set", "judge.backend=oracle"]) == 2
    assert "'oracle'" in capsys.readouterr().err


def test_help_lists_every_backends_fields(capsys):
    assert main(["questions", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "generator.backend=local" in shown and "generator.backend=api" in shown
    assert "generator.dtype:" in shown and "generator.base_url:" in shown
    assert main(["run", "--help"]) == 0
    shown = capsys.readouterr().out
    assert (
        "questions.generator.backend=api" in shown and "learn.judge.backend=cross-encoder" in shown
    )


def test_help_and_version_import_no_heavy_library():
    """`--help` must answer at once: it reads the parameter models, never Prefect, torch,
    transformers or Chroma (each costs seconds to import on a slow CPU)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from flows.cli import main\n"
        "for argv in (['--help'], ['run', '--help'], ['questions', '--help'], ['--version']):\n"
        "    assert main(argv) == 0, argv\n"
        "heavy = {'prefect', 'torch', 'transformers', 'chromadb', 'sentence_transformers'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert "ragtune, version" in out
    assert out.strip().splitlines()[-1] == "[]"


def test_search_help_shows_the_dashboard_forms_descriptions(capsys):
    assert main(["search", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    for name in ("k", "rerank", "alias", "chroma_host"):
        assert " ".join(SearchParams.model_fields[name].description.split()) in shown


def test_run_help_lists_every_sections_fields(capsys):
    assert main(["run", "--help"]) == 0
    shown = capsys.readouterr().out
    for section in ("ingest", "questions", "finetune", "evaluate", "publish"):
        assert f"{section}.*" in shown
    assert "finetune.epochs:" in shown and "questions.test_size:" in shown


def test_rollback_prune_and_unlock_work_on_a_real_store(tmp_path, minilm, capsys):
    workspace = tmp_path / "ws"
    client = chroma.connect(workspace / "chroma")
    first = chroma.publish(client, nist_rows(range(5, 6), "a"), minilm, MINILM, 384)
    second = chroma.publish(client, nist_rows(range(6, 7), "b"), minilm, MINILM, 384)
    assert second.previous == first.collection

    assert main(["rollback", "--workspace", str(workspace)]) == 0
    assert capsys.readouterr().out.strip() == f"docs -> {first.collection}"
    assert main(["prune", "--workspace", str(workspace)]) == 0
    assert "removed 0 unaliased version(s)" in capsys.readouterr().out
    assert main(["unlock", "--workspace", str(workspace)]) == 0
    assert "no lease to clear" in capsys.readouterr().out
    assert chroma.resolve_alias(client, "docs").name == first.collection


def test_a_form_that_sends_every_field_still_gets_the_profiles_values():
    """The dashboard submits each field it shows, blanks included: blank is the profile's."""
    from_form = PipelineParams(**PipelineParams(profile="production").model_dump(mode="json"))
    resolved = from_form.resolved()
    assert resolved.questions.generator.backend == "api" and resolved.finetune.epochs == 5
    assert resolved.base_model == "BAAI/bge-base-en-v1.5"


def test_a_stage_command_runs_its_flow_with_the_options_given(prefect_api, tmp_path, capsys):
    import json

    from tasks.workspace import Workspace, load_rows
    from tests.conftest import FIXTURES

    workspace = tmp_path / "ws"
    paper = FIXTURES / "RAGAS_2309.15217.pdf"
    argv = ["ingest", str(paper), "--workspace", str(workspace), "--max-tokens", "64"]

    assert main([*argv, "--set", "overlap=8"]) == 0

    out = capsys.readouterr().out
    result = json.loads(out[out.rfind("\n{\n") + 1 :])  # the result, printed last
    rows = load_rows(Workspace.at(workspace).chunks_dir)
    assert result["chunks"] == len(rows) > 0
    assert max(r["n_tokens"] for r in rows) <= 64
    assert {r["source"] for r in rows} == {"RAGAS_2309.15217.pdf"}
