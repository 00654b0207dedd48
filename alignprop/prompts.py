"""Prompt sets: built-in lists, files (.txt, .jsonl, .csv; local or s3://), validation, a seeded train/eval split.

    load_prompts("simple_animals")             -> list[str]   (a built-in set)
    load_prompts("prompts.txt", tokenizer)     -> list[str]   (validated: stripped, deduplicated, truncated)
    prepare("prompts.csv", "train.jsonl", "eval.jsonl", eval_fraction=0.2, seed=0) -> PrepareReport

Validation: whitespace is collapsed, empty lines are dropped, duplicates are dropped (first one kept), prompts
longer than the text encoder reads are truncated with a warning, and a file that is not UTF-8 is rejected with
the number of the offending line. `prepare` writes JSONL lines `{"id": ..., "prompt": ...}` whose id is a hash of
the text, so the same prompt has the same id in every file and run; load_prompts reads those files back.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from alignprop.errors import UserError

logger = logging.getLogger(__name__)

# DDPO (Black et al. 2023, arXiv 2305.13301) and AlignProp (arXiv 2310.03739) train on "simple animals" prompts
# (common animals, one per prompt) and evaluate on unseen ones; these two lists are disjoint.
SIMPLE_ANIMALS = ("cat dog horse cow pig sheep rabbit bird fish tiger lion monkey elephant bear zebra giraffe "
                  "fox wolf deer goat duck chicken owl frog").split()
EVAL_ANIMALS = "camel kangaroo penguin dolphin squirrel hedgehog koala panda otter flamingo".split()
COUNT_WORDS = ("one", "two", "three", "four")
COUNT_OBJECTS = (("apple", "apples"), ("orange", "oranges"), ("cup", "cups"), ("book", "books"),
                 ("chair", "chairs"), ("bird", "birds"), ("cat", "cats"), ("dog", "dogs"))
GENERAL = (
    "a lighthouse on a cliff at sunset", "a bowl of fruit on a wooden table", "a city street in the rain at night",
    "a mountain lake with reflections", "a portrait of an old sailor", "a cozy reading room with a fireplace",
    "a field of sunflowers under a blue sky", "a red vintage car parked by the sea", "a snowy forest path",
    "a cup of coffee next to an open book", "a futuristic city skyline", "a sailboat on a calm ocean",
)
BUILTIN_SETS = ("simple_animals", "eval_animals", "object_count", "general", "world_counts", "world_heldout")
PROMPT_FIELDS = ("prompt", "caption", "text")  # the column/key a CSV or JSONL file holds its prompts in
MAX_WORDS = 60  # without a tokenizer: CLIP reads 75 tokens (77 with start/end); ~1.3 tokens per English word
MAX_CHARS = 300  # and ~4 characters per token


class PromptError(UserError):
    """A prompt source is missing, unreadable, malformed or empty."""


@dataclass
class PrepareReport:
    read: int = 0  # lines/rows read
    empty: int = 0  # dropped: empty after stripping
    duplicates: int = 0  # dropped: seen before (after truncation)
    truncated: int = 0  # longer than the text encoder's limit: truncated, with a warning
    prompts: list[str] = field(default_factory=list)  # what is left, in input order
    train: int = 0  # prompts written to the train file (prepare only)
    eval: int = 0  # prompts written to the eval file (prepare only)

    def summary(self) -> str:
        return (f"{self.read} read, {self.empty} empty, {self.duplicates} duplicates, {self.truncated} truncated "
                f"-> {len(self.prompts)} prompts")


def builtin(name: str) -> list[str] | None:
    """A built-in prompt set by name, or None if there is no such set."""
    if name == "simple_animals":
        return list(SIMPLE_ANIMALS)
    if name == "eval_animals":
        return list(EVAL_ANIMALS)
    if name == "object_count":
        return [f"{n} {one if n == 'one' else many}" for n in COUNT_WORDS for one, many in COUNT_OBJECTS]
    if name == "general":
        return list(GENERAL)
    if name in ("world_counts", "world_heldout"):
        from alignprop.world import prompts as world_prompts  # the shapes world; imported only when asked for

        return world_prompts.train_captions() if name == "world_counts" else world_prompts.heldout_captions()
    return None


def prompt_id(text: str) -> str:
    """A stable id: the first 12 hex digits of the text's sha256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def _read_text(source: str) -> str:
    from alignprop import storage

    try:
        data = storage.read_bytes(source)
    except storage.NotFoundError:
        raise PromptError(f"prompt file {source} does not exist; pass a .txt/.jsonl/.csv file (local or s3://) "
                          f"or a built-in set: {', '.join(BUILTIN_SETS)}") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PromptError(f"{source}: line {line} is not valid UTF-8 (byte {data[e.start]:#04x}); "
                          "re-encode the file as UTF-8 (e.g. iconv -t UTF-8)") from None


def _parse(source: str, text: str) -> list[str]:
    suffix = Path(source).suffix.lower()
    if suffix == ".jsonl":
        return [_jsonl_prompt(source, number, line) for number, line in enumerate(text.splitlines(), 1)]
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        column = next((c for c in PROMPT_FIELDS if c in (reader.fieldnames or [])), None)
        if column is None:
            raise PromptError(f"{source}: a CSV prompt file needs a header with a 'prompt' column; found "
                              f"{reader.fieldnames}")
        return [row[column] or "" for row in reader]
    if suffix in (".txt", ""):
        return text.splitlines()
    raise PromptError(f"{source}: unsupported prompt file type {suffix!r}; use .txt (one prompt per line), "
                      ".jsonl ({\"prompt\": ...} per line) or .csv (a 'prompt' column)")


def _jsonl_prompt(source: str, number: int, line: str) -> str:
    if not line.strip():
        return ""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptError(f"{source}: line {number} is not JSON ({e.msg}); write one object per line") from None
    if isinstance(row, str):
        return row
    value = next((row[k] for k in PROMPT_FIELDS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
    if value is None:
        raise PromptError(f"{source}: line {number} has no string 'prompt' field")
    return value


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def clean(raw: list[str], tokenizer=None) -> PrepareReport:
    """Collapse whitespace, drop empties, truncate what the text encoder cannot read, drop duplicates.

    With a tokenizer the limit is its `model_max_length` tokens, start/end tokens included (77 for CLIP);
    without one it is MAX_WORDS words and MAX_CHARS characters. Truncation keeps whole words where it can.
    """
    report = PrepareReport(read=len(raw))
    seen = set()
    for text in raw:
        text = " ".join(text.split())
        if not text:
            report.empty += 1
            continue
        shortened = truncate(text, tokenizer)
        if shortened != text:
            report.truncated += 1
            logger.warning("prompt longer than the text encoder reads, truncated: %r... -> %r", text[:40], shortened)
            text = shortened
        if text in seen:
            report.duplicates += 1
            continue
        seen.add(text)
        report.prompts.append(text)
    return report


def truncate(text: str, tokenizer=None) -> str:
    """The longest prefix of whole words the text encoder reads in full."""
    words = text.split()
    if tokenizer is None:
        kept = words[:MAX_WORDS]
        while len(kept) > 1 and len(" ".join(kept)) > MAX_CHARS:
            kept.pop()
        return " ".join(kept)[:MAX_CHARS]
    limit = tokenizer.model_max_length

    def fits(n: int) -> bool:
        return len(tokenizer(" ".join(words[:n]), truncation=False).input_ids) <= limit

    if fits(len(words)):
        return text
    lo, hi = 0, len(words)  # fits(lo) holds, fits(hi) does not: binary search for the longest fitting prefix
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    if lo > 0:
        return " ".join(words[:lo])
    ids = tokenizer(text, truncation=True, max_length=limit).input_ids  # one word longer than the limit
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def read_prompts(spec: str, tokenizer=None) -> PrepareReport:
    """Read and validate a built-in set or a file; a PromptError if no prompt is left."""
    raw = builtin(spec)
    if raw is None:
        raw = _parse(spec, _read_text(spec))
    report = clean(raw, tokenizer)
    if not report.prompts:
        raise PromptError(f"no prompts in {spec!r} ({report.read} lines read, {report.empty} empty); "
                          "add at least one non-empty prompt")
    return report


def load_prompts(spec: str, tokenizer=None) -> list[str]:
    """Prompts from a built-in set name or a file (.txt/.jsonl/.csv, local or s3://), validated."""
    return read_prompts(spec, tokenizer).prompts


# ---------------------------------------------------------------------------------------------
# Split and output
# ---------------------------------------------------------------------------------------------
def split(prompts: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded train/eval split that depends only on the prompt texts and the seed (not their order, not the
    process): prompts are ranked by sha256(seed, text) and the first round(n * eval_fraction) go to eval.
    Both sides keep the input order; with eval_fraction > 0 and two or more prompts, neither side is empty."""
    if not 0 <= eval_fraction < 1:
        raise PromptError(f"eval_fraction={eval_fraction} must lie in [0, 1)")
    ranked = sorted(prompts, key=lambda p: hashlib.sha256(f"{seed}\n{p}".encode()).hexdigest())
    n_eval = round(len(ranked) * eval_fraction)
    if eval_fraction > 0 and len(ranked) > 1:
        n_eval = min(max(n_eval, 1), len(ranked) - 1)
    held_out = set(ranked[:n_eval])
    return [p for p in prompts if p not in held_out], [p for p in prompts if p in held_out]


def to_jsonl(prompts: list[str]) -> bytes:
    return "".join(json.dumps({"id": prompt_id(p), "prompt": p}, ensure_ascii=False) + "\n"
                   for p in prompts).encode("utf-8")


def prepare(source: str, train_out: str | Path, eval_out: str | Path | None = None, eval_fraction: float = 0.0,
            seed: int = 0, tokenizer=None) -> PrepareReport:
    """`alignprop prompts prepare`: validate, split, write JSONL (local or s3://) with stable ids."""
    from alignprop import storage

    if eval_out is None and eval_fraction > 0:
        raise PromptError(f"eval_fraction={eval_fraction} needs an eval output file; pass --eval-out")
    report = read_prompts(source, tokenizer)
    train, held_out = split(report.prompts, eval_fraction, seed)
    storage.write_bytes(train_out, to_jsonl(train))
    if eval_out is not None:
        storage.write_bytes(eval_out, to_jsonl(held_out))
    report.train, report.eval = len(train), len(held_out)
    logger.info("prompts from %s: %s; %d train, %d eval", source, report.summary(), report.train, report.eval)
    return report
