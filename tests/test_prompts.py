"""alignprop.prompts: built-in sets, file formats, validation, the seeded split, JSONL output, the CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

import helpers
from alignprop import prompts
from alignprop.errors import UserError


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_builtin_sets():
    train, held_out = prompts.load_prompts("simple_animals"), prompts.load_prompts("eval_animals")
    assert len(train) >= 20 and len(held_out) >= 5 and not set(train) & set(held_out)
    assert "three apples" in prompts.load_prompts("object_count")
    assert len(prompts.load_prompts("general")) >= 10
    for name in prompts.BUILTIN_SETS:
        loaded = prompts.load_prompts(name)
        assert loaded and len(set(loaded)) == len(loaded), name


def test_world_sets_come_from_the_world_module():
    from alignprop.world import prompts as world_prompts

    assert prompts.load_prompts("world_counts") == world_prompts.train_captions()
    assert prompts.load_prompts("world_heldout") == world_prompts.heldout_captions()
    assert not set(prompts.load_prompts("world_counts")) & set(prompts.load_prompts("world_heldout"))


@pytest.mark.parametrize("name, content", [
    ("p.txt", "a cat\n\n  a   dog  \na cat\n\t\nred fox\n"),
    ("p.jsonl", '{"prompt": "a cat"}\n\n{"prompt": " a   dog"}\n"a cat"\n{"prompt": ""}\n{"prompt": "red fox"}\n'),
    ("p.csv", 'prompt,weight\na cat,1\n,2\n"  a   dog",3\na cat,4\n  ,5\nred fox,6\n'),
])
def test_files_are_cleaned_and_counted(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    report = prompts.read_prompts(str(path))
    assert report.prompts == ["a cat", "a dog", "red fox"]
    assert (report.read, report.empty, report.duplicates, report.truncated) == (6, 2, 1, 0)


def test_invalid_utf8_is_rejected_naming_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("a cat\nun café\n".encode("utf-8") + b"caf\xe9 latin-1\nlast\n")
    with pytest.raises(prompts.PromptError, match=r"bad.txt: line 3 is not valid UTF-8"):
        prompts.load_prompts(str(path))


def test_zero_prompts_and_bad_inputs_are_user_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n   \n\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": 3}\n')
    (tmp_path / "nocol.csv").write_text("caption_id,url\n1,x\n")
    with pytest.raises(UserError, match=r"no prompts in .*empty.txt.*3 lines read, 3 empty"):
        prompts.load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="line 2 has no string 'prompt' field"):
        prompts.load_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="'prompt' column"):
        prompts.load_prompts(str(tmp_path / "nocol.csv"))
    with pytest.raises(UserError, match="does not exist.*simple_animals"):
        prompts.load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="unsupported prompt file type '.parquet'"):
        (tmp_path / "p.parquet").write_text("x")
        prompts.load_prompts(str(tmp_path / "p.parquet"))


def test_long_prompts_are_truncated_with_a_warning(caplog):
    from alignprop.models import build_word_tokenizer

    long_words = " ".join(["cat"] * 100)  # 100 words, 399 characters
    long_chars = " ".join(["abcdefghij"] * 40)  # 40 words, 439 characters
    with caplog.at_level(logging.WARNING, logger="alignprop.prompts"):
        report = prompts.clean([long_words, long_chars, "a cat"])
    assert report.truncated == 2 and "truncated" in caplog.text
    assert report.prompts[0] == " ".join(long_words.split()[: prompts.MAX_WORDS])
    assert len(report.prompts[1]) <= prompts.MAX_CHARS and long_chars.startswith(report.prompts[1])
    assert report.prompts[2] == "a cat"

    tokenizer = build_word_tokenizer(["red", "circle", "a", "cat"])  # one token per word, 77 with start/end
    long_words = " ".join(["red circle"] * 50)
    cut = prompts.clean([long_words], tokenizer).prompts[0]
    assert len(tokenizer(cut).input_ids) <= tokenizer.model_max_length < len(tokenizer(long_words).input_ids)
    assert len(cut.split()) == tokenizer.model_max_length - 2 and long_words.startswith(cut)
    assert prompts.clean(["a cat"], tokenizer).truncated == 0


def test_truncation_can_create_duplicates_which_are_dropped():
    base = " ".join(["word"] * prompts.MAX_WORDS)
    report = prompts.clean([base + " tail one", base + " tail two"])
    assert report.prompts == [base] and report.truncated == 2 and report.duplicates == 1


def test_split_is_seeded_disjoint_and_independent_of_order():
    items = prompts.load_prompts("simple_animals")
    train, held_out = prompts.split(items, 0.25, seed=0)
    assert len(held_out) == round(len(items) * 0.25) and sorted(train + held_out) == sorted(items)
    assert not set(train) & set(held_out)
    assert prompts.split(list(reversed(items)), 0.25, seed=0)[1] == list(reversed(held_out))
    assert set(prompts.split(items, 0.25, seed=1)[1]) != set(held_out)
    assert prompts.split(["only"], 0.5, seed=0) == (["only"], [])
    assert len(prompts.split(["a", "b"], 0.01, seed=0)[1]) == 1  # a positive fraction holds out at least one
    with pytest.raises(UserError, match="eval_fraction"):
        prompts.split(items, 1.0, seed=0)


def test_prepare_writes_jsonl_with_stable_ids_that_load_back(tmp_path):
    source = tmp_path / "p.txt"
    source.write_text("\n".join(f"prompt number {i}" for i in range(20)) + "\nprompt number 3\n")
    report = prompts.prepare(str(source), tmp_path / "train.jsonl", tmp_path / "eval.jsonl", 0.2, seed=0)
    train, held_out = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "eval.jsonl")

    assert (report.train, report.eval, report.duplicates) == (16, 4, 1)
    assert all(row["id"] == prompts.prompt_id(row["prompt"]) and len(row["id"]) == 12 for row in train + held_out)
    assert prompts.load_prompts(str(tmp_path / "train.jsonl")) == [row["prompt"] for row in train]
    with pytest.raises(UserError, match="--eval-out"):
        prompts.prepare(str(source), tmp_path / "t.jsonl", None, 0.2, seed=0)


def test_split_is_stable_across_processes(tmp_path):
    """Two runs in fresh interpreters with different hash seeds write byte-identical files."""
    outputs = []
    for run, hash_seed in enumerate(("1", "2")):
        out = tmp_path / f"run{run}"
        command = [sys.executable, "-m", "alignprop.cli", "prompts", "prepare", "--source", "simple_animals",
                   "--train-out", str(out / "train.jsonl"), "--eval-out", str(out / "eval.jsonl"),
                   "--eval-fraction", "0.2", "--seed", "0"]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert done.returncode == 0, done.stderr
        assert "24 read, 0 empty, 0 duplicates, 0 truncated" in done.stdout and "eval: 5 prompts" in done.stdout
        outputs.append(((out / "train.jsonl").read_bytes(), (out / "eval.jsonl").read_bytes()))
    assert outputs[0] == outputs[1]


def test_cli_rejects_invalid_utf8_with_exit_2(tmp_path):
    (tmp_path / "bad.csv").write_bytes(b"prompt\nok\n\xff\xfe broken\n")
    done = helpers.run_cli("prompts", "prepare", "--source", str(tmp_path / "bad.csv"),
                           "--train-out", str(tmp_path / "t.jsonl"))
    assert done.returncode == 2 and "line 3 is not valid UTF-8" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "t.jsonl").exists()


def test_cli_uses_the_model_tokenizer(tmp_path_factory, tmp_path):
    model = helpers.tiny_model_dir(tmp_path_factory)
    (tmp_path / "long.txt").write_text(" ".join(["red circle"] * 60) + "\na cat\n")
    done = helpers.run_cli("prompts", "prepare", "--source", str(tmp_path / "long.txt"), "--train-out",
                           str(tmp_path / "t.jsonl"), "--model", str(model))
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(tmp_path / "t.jsonl")
    assert "1 truncated" in done.stdout and len(rows[0]["prompt"].split()) == 75  # 77 tokens with start/end


def test_s3_prompt_files(s3_prefix):
    from alignprop import storage

    storage.write_bytes(f"{s3_prefix}/prompts.csv", "prompt\nun café\na cat\na cat\n".encode("utf-8"))
    report = prompts.prepare(f"{s3_prefix}/prompts.csv", f"{s3_prefix}/train.jsonl", f"{s3_prefix}/eval.jsonl",
                             0.5, seed=0)
    assert report.prompts == ["un café", "a cat"] and report.duplicates == 1
    both = prompts.load_prompts(f"{s3_prefix}/train.jsonl") + prompts.load_prompts(f"{s3_prefix}/eval.jsonl")
    assert sorted(both) == ["a cat", "un café"]
    storage.write_bytes(f"{s3_prefix}/bad.txt", b"ok\n\xc3\x28\n")
    with pytest.raises(prompts.PromptError, match="line 2 is not valid UTF-8"):
        prompts.load_prompts(f"{s3_prefix}/bad.txt")
