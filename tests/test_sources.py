"""FilePromptSource: formats, template rendering, selection, caching and its error messages."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from espo_lightning.data.source import PromptSource
from espo_lightning.data.sources import FilePromptSource
from espo_lightning.rewards import math_accuracy


RECORDS = [
    {"question": "1+1?", "answer": "#### 2", "unit": "apples"},
    {"question": "2+2?", "answer": "#### 4", "unit": "pears"},
    {"question": "3+3?", "answer": "#### 6", "unit": "plums"},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", RECORDS)


def test_jsonl_rows_carry_prompt_and_every_column(jsonl):
    source = FilePromptSource(str(jsonl))
    assert isinstance(source, PromptSource)
    rows = source.rows()
    assert rows == [{**r, "prompt": r["question"]} for r in RECORDS]


def test_template_sees_prompt_and_other_columns(jsonl):
    source = FilePromptSource(str(jsonl), prompt_template="Q: {prompt}\nCount {unit}. Put it in \\boxed{{}}.")
    assert source.rows()[1]["prompt"] == "Q: 2+2?\nCount pears. Put it in \\boxed{}."


@pytest.mark.parametrize("kind", ["json_list", "json_lines", "parquet"])
def test_other_formats_read_the_same_rows(tmp_path, kind):
    if kind == "json_list":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(RECORDS, indent=2), encoding="utf-8")
    elif kind == "json_lines":
        path = write_jsonl(tmp_path / "data.json", RECORDS)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(RECORDS), path)
    assert FilePromptSource(str(path)).rows() == [{**r, "prompt": r["question"]} for r in RECORDS]


def test_limit_and_shuffle(tmp_path):
    records = [{"question": f"q{i}", "answer": str(i)} for i in range(50)]
    path = write_jsonl(tmp_path / "many.jsonl", records)
    assert [r["answer"] for r in FilePromptSource(str(path), limit=3).rows()] == ["0", "1", "2"]
    shuffled = [r["answer"] for r in FilePromptSource(str(path), shuffle_seed=0).rows()]
    assert sorted(shuffled, key=int) == [str(i) for i in range(50)] and shuffled != [str(i) for i in range(50)]
    assert [r["answer"] for r in FilePromptSource(str(path), shuffle_seed=0).rows()] == shuffled
    assert [r["answer"] for r in FilePromptSource(str(path), shuffle_seed=0, limit=5).rows()] == shuffled[:5]
    assert len(FilePromptSource(str(path), limit=500).rows()) == 50


def test_reads_lazily_and_caches(tmp_path, jsonl):
    missing = FilePromptSource(str(tmp_path / "later.jsonl"))  # constructing does not read
    source = FilePromptSource(str(jsonl))
    first = source.rows()
    first[0]["prompt"] = "mutated by a caller"
    jsonl.unlink()
    assert source.rows()[0]["prompt"] == "1+1?"  # served from the cache, unaffected by the caller
    with pytest.raises(FileNotFoundError):
        missing.rows()


def test_answer_column_is_also_passed_as_answer(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", [{"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$"}])
    row = FilePromptSource(str(path), prompt_column="problem", answer_column="solution").rows()[0]
    assert row["solution"] == row["answer"] == "so $\\boxed{\\frac{1}{2}}$"
    columns = {k: [v] for k, v in row.items() if k != "prompt"}
    assert math_accuracy(prompts=[row["prompt"]], completions=["\\boxed{0.5}"], **columns) == [1.0]


def test_answer_column_none_allows_rows_without_answers(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "hi"}])
    assert FilePromptSource(str(path), answer_column=None).rows() == [{"question": "hi", "prompt": "hi"}]


# ----------------------------------------------------------------------------------------- errors
def test_missing_file_names_path_and_formats(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*\.jsonl.*\.parquet"):
        FilePromptSource(str(path)).rows()


def test_unknown_extension_lists_allowed(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("question,answer\n1,2\n")
    with pytest.raises(ValueError, match=r"'\.csv'.*\.jsonl.*\.json.*\.parquet.*save_to_disk"):
        FilePromptSource(str(path)).rows()


@pytest.mark.parametrize(("record", "key"), [({"answer": "1", "q": "x"}, "question"), ({"question": "x"}, "answer"),
                                             ({"question": None, "answer": "1"}, "question")])
def test_row_without_required_column(tmp_path, record, key):
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], RECORDS[1], record])
    with pytest.raises(ValueError, match=rf"bad\.jsonl: row 3 .*'{key}'.*columns are \[") as err:
        FilePromptSource(str(path)).rows()
    for column in record:
        assert repr(column) in str(err.value)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + '{"question": "x", "answer": }\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 3 is not valid JSON"):
        FilePromptSource(str(path)).rows()
    listed = tmp_path / "broken.json"
    listed.write_text('[\n{"question": "x", "answer": "1"},\n{"question": }\n]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON at line 3"):
        FilePromptSource(str(listed)).rows()
    scalar = tmp_path / "scalars.jsonl"
    scalar.write_text("1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1 holds a JSON int"):
        FilePromptSource(str(scalar)).rows()


def test_undecodable_bytes_empty_files_and_empty_prompts_name_file_and_row(tmp_path):
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + '{"question": "caf\u00e9?", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl: line 2, column 18 is not UTF-8 \(byte 0xe9\)"):
        FilePromptSource(str(latin)).rows()
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=rf"{name}: the file holds no rows"):
            FilePromptSource(str(tmp_path / name)).rows()
    blank_prompt = write_jsonl(tmp_path / "blank_prompt.jsonl", [RECORDS[0], {"question": "  ", "answer": "1"}])
    with pytest.raises(ValueError, match=r"blank_prompt\.jsonl: row 2 has an empty prompt in column 'question'"):
        FilePromptSource(str(blank_prompt)).rows()


def test_template_with_unknown_field_names_template_and_columns(jsonl):
    with pytest.raises(ValueError, match=r"'\{prompt\} in \{color\}'.*\['color'\].*available: \['answer', 'prompt', "
                                         r"'question', 'unit'\]"):
        FilePromptSource(str(jsonl), prompt_template="{prompt} in {color}").rows()


@pytest.mark.parametrize("template", ["answer in \\boxed{}", "{0}", "{prompt", "}"])
def test_malformed_template_fails_at_construction(jsonl, template):
    with pytest.raises(ValueError, match=r"prompt_template .*'\{\{' and '\}\}'"):
        FilePromptSource(str(jsonl), prompt_template=template)


@pytest.mark.parametrize(("kwargs", "key"), [({"limit": 0}, "limit"), ({"limit": -2}, "limit"),
                                             ({"shuffle_seed": "x"}, "shuffle_seed"), ({"path": ""}, "path"),
                                             ({"prompt_column": ""}, "prompt_column")])
def test_invalid_arguments_name_the_key(jsonl, kwargs, key):
    with pytest.raises(ValueError, match=key):
        FilePromptSource(**{"path": str(jsonl), **kwargs})


def test_datasets_folder_needs_datasets_package(tmp_path, monkeypatch):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"pip install datasets"):
        FilePromptSource(str(folder)).rows()


def test_plain_folder_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="save_to_disk"):
        FilePromptSource(str(tmp_path)).rows()


def test_datasets_folder_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the datasets package is not installed")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    assert FilePromptSource(str(tmp_path / "ds")).rows() == [{**r, "prompt": r["question"]} for r in RECORDS]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "dd"))
    assert len(FilePromptSource(str(tmp_path / "dd")).rows()) == 3


def test_constructor_arguments_documented_for_cli_help():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(FilePromptSource, "source")
    help_text = " ".join(parser.format_help().split())
    for phrase in ["data file", "question or problem text", "gold answer", "``str.format`` template", "first ``limit``",
                   "shuffle the rows"]:
        assert phrase in help_text


# --------------------------------------------------------------------------------------- real data
def test_real_gsm8k_file_feeds_math_accuracy(gsm8k_path):
    source = FilePromptSource(str(gsm8k_path), prompt_template="{prompt}\nPut the final answer after ####.")
    rows = source.rows()
    assert len(rows) == 1319
    assert rows[0]["prompt"].startswith("Janet") and rows[0]["prompt"].endswith("after ####.")
    assert set(rows[0]) == {"question", "answer", "prompt"}
    subset = FilePromptSource(str(gsm8k_path), limit=64, shuffle_seed=1).rows()
    answers = [r["answer"] for r in subset]
    assert math_accuracy(prompts=[r["prompt"] for r in subset], completions=answers, answer=answers) == [1.0] * 64


# ------------------------------------------------------------------ conversational prompt rows
CHAT = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}], "solution": "2"},
        {"prompt": [{"role": "user", "content": "2+2?"}], "solution": "4"}]


def test_conversational_rows_keep_their_messages(tmp_path):
    rows = FilePromptSource(write_jsonl(tmp_path / "chat.jsonl", CHAT), prompt_column="prompt",
                            answer_column="solution").rows()
    assert rows[0]["prompt"] == CHAT[0]["prompt"] and rows[1]["prompt"] == CHAT[1]["prompt"]
    assert rows[0]["solution"] == "2" and rows[0]["answer"] == "2"


def test_a_template_rewrites_the_last_user_message_of_a_conversation(tmp_path):
    rows = FilePromptSource(write_jsonl(tmp_path / "chat.jsonl", CHAT), prompt_column="prompt",
                            answer_column="solution", prompt_template="{prompt} Put it in \\boxed{{}}.").rows()
    assert rows[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert rows[0]["prompt"][1] == {"role": "user", "content": "1+1? Put it in \\boxed{}."}
    assert CHAT[0]["prompt"][1]["content"] == "1+1?"  # the records themselves are untouched


@pytest.mark.parametrize("prompt, problem", [
    ([{"role": "user"}], "message 1 (user) has no text 'content'"),
    ([{"role": "robot", "content": "hi"}], "message 1 has role 'robot'"),
    ([{"role": "system", "content": "x"}], "the prompt has no user message with text"),
    (["just a string"], "message 1 of the prompt is not a {role, content} dict"),
    ([], "a conversational prompt must be a non-empty list"),
])
def test_bad_conversations_name_the_row(tmp_path, prompt, problem):
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT[1], {"prompt": prompt, "solution": "1"}])
    with pytest.raises(ValueError, match="chat.jsonl: row 2, column 'prompt' \\(prompt_column\\): " + re.escape(problem)):
        FilePromptSource(path, prompt_column="prompt", answer_column="solution").rows()


# ------------------------------------------------------------------------- datasets.load_dataset
@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: load_dataset must work from the local files alone. The libraries read these
    variables when imported, so their module-level copies are set too."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_hf_dataset_source_reads_local_json_and_parquet(tmp_path, offline):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from espo_lightning.data.hf_dataset import HFDatasetSource

    jsonl = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    parquet = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), parquet)
    rows = HFDatasetSource("json", data_files=str(jsonl), prompt_template="{prompt} ({unit})").rows()
    assert [r["prompt"] for r in rows] == ["1+1? (apples)", "2+2? (pears)", "3+3? (plums)"]
    assert rows[2]["answer"] == "#### 6"
    split = HFDatasetSource("parquet", data_files={"test": str(parquet)}, split="test[:2]").rows()
    assert [r["question"] for r in split] == ["1+1?", "2+2?"]
    chat = HFDatasetSource("json", data_files=str(write_jsonl(tmp_path / "chat.jsonl", CHAT)), prompt_column="prompt",
                           answer_column="solution").rows()
    assert chat[1]["prompt"] == [{"role": "user", "content": "2+2?"}]


def test_hf_dataset_source_errors_name_the_dataset_split_and_row(tmp_path, offline):
    pytest.importorskip("datasets")
    from espo_lightning.data.hf_dataset import HFDatasetSource

    jsonl = write_jsonl(tmp_path / "train.jsonl", RECORDS + [{"question": " ", "answer": "1"}])
    with pytest.raises(ValueError, match=r"json\[train\]: row 4 has an empty prompt"):
        HFDatasetSource("json", data_files=str(jsonl)).rows()
    with pytest.raises(ValueError, match=r"json\[test\]: datasets.load_dataset failed: Unknown split"):
        HFDatasetSource("json", data_files=str(jsonl), split="test").rows()
    with pytest.raises(ValueError, match=r"no-such-user/no-such-dataset\[train\]: datasets.load_dataset failed"):
        HFDatasetSource("no-such-user/no-such-dataset").rows()


def test_hf_dataset_source_bad_rows_fail_at_check_data_naming_the_row(tmp_path, offline):
    """Before any model loads: the config key, the dataset and split, the row."""
    from espo_lightning.rollout.datamodule import RolloutDataModule
    from espo_lightning.data.hf_dataset import HFDatasetSource

    jsonl = write_jsonl(tmp_path / "train.jsonl", [{"question": "1+1?", "answer": "2"}, {"question": "x"}])
    dm = RolloutDataModule(train_data=HFDatasetSource("json", data_files=str(jsonl)), reward_funcs=[math_accuracy])
    with pytest.raises(ValueError, match=r"data.train_data: json\[train\]: row 2 has an empty \(null\) value in column 'answer'"):
        dm.check_data()
