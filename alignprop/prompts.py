"""Prompt sets: built-in lists, files (.txt, .jsonl, .csv), validation, a seeded train/eval split, JSONL output.

    load_prompts("simple_animals")           -> list[str]   (a built-in set)
    load_prompts("prompts.txt", tokenizer)   -> list[str]   (validated: stripped, deduplicated, truncated)
    prepare(source, train_out, eval_out, eval_fraction=0.2, seed=0) -> PrepareReport
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from alignprop.errors import UserError

logger = logging.getLogger(__name__)

# DDPO (Black et al. 2023) and AlignProp train on the ImageNet animal classes; these are common animals, with a
# disjoint held-out set for evaluation.
SIMPLE_ANIMALS = ("cat dog horse cow pig sheep rabbit bird fish tiger lion monkey elephant bear zebra giraffe "
                  "fox wolf deer goat duck chicken owl frog").split()
EVAL_ANIMALS = "camel kangaroo penguin dolphin squirrel hedgehog koala panda otter flamingo".split()
COUNT_WORDS = ("one", "two", "three", "four", "five", "six")
COUNT_OBJECTS = ("apples", "oranges", "cups", "books", "chairs", "birds", "cats", "dogs")
GENERAL = (
    "a lighthouse on a cliff at sunset", "a bowl of fruit on a wooden table", "a city street in the rain at night",
    "a mountain lake with reflections", "a portrait of an old sailor", "a cozy reading room with a fireplace",
    "a field of sunflowers under a blue sky", "a red vintage car parked by the sea", "a snowy forest path",
    "a cup of coffee next to an open book", "a futuristic city skyline", "a sailboat on a calm ocean",
)


def _builtin(name: str) -> list[str] | None:
    if name == "simple_animals":
        return list(SIMPLE_ANIMALS)
    if name == "eval_animals":
        return list(EVAL_ANIMALS)
    if name == "object_count":
        return [f"{n} {obj}" for n in COUNT_WORDS[:4] for obj in COUNT_OBJECTS]
    if name == "general":
        return list(GENERAL)
    if name in ("world_counts", "world_heldout"):
        from alignprop.world import prompts as world_prompts

        return world_prompts.train_captions() if name == "world_counts" else world_prompts.heldout_captions()
    return None


BUILTIN_SETS = ("simple_animals", "eval_animals", "object_count", "general", "world_counts", "world_heldout")


class PromptError(UserError):
    """A prompt source is missing, unreadable or empty."""


@dataclass
class PrepareReport:
    read: int = 0  # lines/rows read
    empty: int = 0  # dropped: empty after stripping
    duplicates: int = 0  # dropped: seen before
    truncated: int = 0  # longer than the text encoder's limit: truncated (and warned)
    prompts: list[str] = field(default_factory=list)


def prompt_id(text: str) -> str:
    """A stable id: the first 12 hex digits of the text's sha256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _read_text(source: str) -> str:
    if source.startswith("s3://"):
        from alignprop import storage

        data = storage.read_bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise PromptError(f"prompt file {source} does not exist; pass a .txt/.jsonl/.csv file or one of the "
                              f"built-in sets: {', '.join(BUILTIN_SETS)}")
        data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PromptError(f"{source}: line {line} is not valid UTF-8 (byte {data[e.start]:#x} at offset {e.start}); "
                          "re-encode the file as UTF-8") from None


def _parse(source: str, text: str) -> list[str]:
    suffix = Path(source.split("?")[0]).suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                rows.append("")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{source}: line {number} is not JSON ({e.msg}); one object per line") from None
            if isinstance(row, str):
                rows.append(row)
            elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
                rows.append(row["prompt"])
            else:
                raise PromptError(f"{source}: line {number} has no string 'prompt' field")
        return rows
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise PromptError(f"{source}: a CSV prompt file needs a 'prompt' column; found {reader.fieldnames}")
        return [row["prompt"] or "" for row in reader]
    if suffix in (".txt", ""):
        return text.splitlines()
    raise PromptError(f"{source}: unsupported prompt file type {suffix!r}; use .txt, .jsonl or .csv")


def clean(raw: list[str], tokenizer=None, max_words: int = 60) -> PrepareReport:
    """Strip, drop empties and duplicates (first occurrence wins), truncate what the text encoder cannot read.

    With a tokenizer the limit is its `model_max_length` (77 for CLIP, start/end tokens included); without one,
    `max_words` words, a conservative stand-in for CLIP's 77 tokens.
    """
    report = PrepareReport(read=len(raw))
    seen = set()
    for text in raw:
        text = " ".join(text.split())
        if not text:
            report.empty += 1
            continue
        shortened = _truncate(text, tokenizer, max_words)
        if shortened != text:
            report.truncated += 1
            logger.warning("prompt longer than the text encoder's limit, truncated: %r -> %r", text[:60], shortened)
            text = shortened
        if text in seen:
            report.duplicates += 1
            continue
        seen.add(text)
        report.prompts.append(text)
    return report


def _truncate(text: str, tokenizer, max_words: int) -> str:
    if tokenizer is None:
        words = text.split()
        return " ".join(words[:max_words])
    ids = tokenizer(text, truncation=False).input_ids
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return text
    kept = tokenizer(text, truncation=True, max_length=limit).input_ids
    return tokenizer.decode(kept, skip_special_tokens=True).strip()


def read_prompts(spec: str, tokenizer=None) -> PrepareReport:
    builtin = _builtin(spec)
    raw = builtin if builtin is not None else _parse(spec, _read_text(spec))
    report = clean(raw, tokenizer)
    if not report.prompts:
        raise PromptError(f"no prompts in {spec!r} ({report.read} lines read, {report.empty} empty); "
                          "add at least one prompt")
    return report


def load_prompts(spec: str, tokenizer=None) -> list[str]:
    """Prompts from a built-in set name or a file (local or s3://), validated; a UserError if there are none."""
    return read_prompts(spec, tokenizer).prompts


def split(prompts: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded train/eval split that depends only on the prompt texts and the seed, not on their order."""
    if not 0 <= eval_fraction < 1:
        raise PromptError(f"eval_fraction={eval_fraction} must lie in [0, 1)")
    ordered = sorted(prompts, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n_eval = round(len(ordered) * eval_fraction)
    if eval_fraction > 0 and len(ordered) > 1:
        n_eval = min(max(n_eval, 1), len(ordered) - 1)
    eval_set = set(ordered[:n_eval])
    return [p for p in prompts if p not in eval_set], [p for p in prompts if p in eval_set]


def write_jsonl(prompts: list[str], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps({"id": prompt_id(p), "prompt": p}) + "\n" for p in prompts))
    tmp.replace(path)


def prepare(source: str, train_out: str | Path, eval_out: str | Path | None = None, eval_fraction: float = 0.0,
            seed: int = 0, tokenizer=None) -> PrepareReport:
    """`alignprop prompts prepare`: validate, split, write JSONL with stable ids; returns the counts."""
    report = read_prompts(source, tokenizer)
    train, evaluation = split(report.prompts, eval_fraction if eval_out else 0.0, seed)
    write_jsonl(train, train_out)
    if eval_out:
        write_jsonl(evaluation, eval_out)
    logger.info("prompts from %s: %d read, %d empty, %d duplicates, %d truncated -> %d train, %d eval",
                source, report.read, report.empty, report.duplicates, report.truncated, len(train), len(evaluation))
    return report
