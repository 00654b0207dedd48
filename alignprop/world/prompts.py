"""The world's captions: "two red circles", "one blue square", ... and which combinations training never sees."""

from __future__ import annotations

import itertools

from alignprop.errors import UserError

COUNT_WORDS = ("one", "two", "three", "four")
COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
# (colour, shape) pairs never rendered for training: generalisation is measured on them.
HELDOUT_PAIRS = (("yellow", "triangle"), ("green", "square"), ("blue", "circle"))
VOCABULARY = ("a", "of", *COUNT_WORDS, *COLORS, *SHAPES, *(s + "s" for s in SHAPES))


class CaptionError(UserError):
    """A prompt is not a world caption."""


def caption(count: int, color: str, shape: str) -> str:
    return f"{COUNT_WORDS[count - 1]} {color} {shape}{'s' if count > 1 else ''}"


def parse_caption(text: str) -> tuple[int, str, str]:
    """"two red circles" -> (2, "red", "circle")."""
    words = text.lower().split()
    if len(words) != 3 or words[0] not in COUNT_WORDS or words[1] not in COLORS or words[2].rstrip("s") not in SHAPES:
        raise CaptionError(f"{text!r} is not a world caption; write '<count> <colour> <shape>', e.g. 'two red "
                           f"circles' (counts {'/'.join(COUNT_WORDS)}, colours {'/'.join(COLORS)}, shapes "
                           f"{'/'.join(SHAPES)})")
    return COUNT_WORDS.index(words[0]) + 1, words[1], words[2].rstrip("s")


def combinations(heldout: bool) -> list[tuple[int, str, str]]:
    return [(n, c, s) for n, c, s in itertools.product(range(1, 5), COLORS, SHAPES)
            if ((c, s) in HELDOUT_PAIRS) == heldout]


def train_captions() -> list[str]:
    return [caption(*combo) for combo in combinations(heldout=False)]


def heldout_captions() -> list[str]:
    return [caption(*combo) for combo in combinations(heldout=True)]
