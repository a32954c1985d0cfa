"""A deterministic generator of varied English-like text, for preparation benchmarks and memory tests.

Repeated text makes BPE training unrealistically fast (few distinct words), so every paragraph is drawn afresh:
words from a Zipf-distributed lexicon of 200k invented words (syllable strings), sentences of varied length with
capitals, commas, numbers and end marks, paragraphs of 1-12 sentences separated by a blank line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w", "z",
           "br", "ch", "cl", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "sl", "sp", "st", "str", "th", "tr"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oo", "ou", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rs", "st", "ck", "x"]


def lexicon(rng: np.random.Generator, size: int = 200_000) -> np.ndarray:
    syllables = np.array([o + n + c for o in _ONSETS for n in _NUCLEI for c in _CODAS])
    counts = rng.choice([1, 2, 3, 4], size=size, p=[0.35, 0.4, 0.18, 0.07])
    picks = rng.integers(0, len(syllables), size=(size, 4))
    return np.array(["".join(syllables[picks[i, :counts[i]]]) for i in range(size)])


def paragraphs(seed: int = 0, batch_words: int = 1 << 20):
    """An endless, deterministic stream of paragraphs."""
    rng = np.random.default_rng(seed)
    words = lexicon(rng)
    ranks = np.arange(1, len(words) + 1)
    cdf = np.cumsum(1.0 / ranks ** 1.07)
    cdf /= cdf[-1]
    while True:
        draw = words[np.searchsorted(cdf, rng.random(batch_words))].tolist()
        numbers = rng.integers(0, 100_000, size=batch_words // 40).tolist()
        sentence_lengths = rng.integers(4, 30, size=batch_words // 4).tolist()
        sentences_per_paragraph = rng.integers(1, 13, size=batch_words // 40).tolist()
        marks = rng.choice([". ", ". ", ". ", "? ", "! ", "; "], size=batch_words // 4).tolist()
        w = s = p = 0
        sentences = []
        while w + 40 < len(draw):
            n = sentence_lengths[s]
            chunk = draw[w:w + n]
            chunk[0] = chunk[0].capitalize()
            if n > 8:
                chunk[n // 2] += ","
                chunk[n // 3] = str(numbers[s % len(numbers)])
            sentences.append(" ".join(chunk) + marks[s])
            w, s = w + n, s + 1
            if len(sentences) == sentences_per_paragraph[p % len(sentences_per_paragraph)]:
                yield "".join(sentences).rstrip()
                sentences, p = [], p + 1


def write_corpus(path: Path, nbytes: int, seed: int = 0) -> int:
    """Write about `nbytes` of paragraphs (one document each, blank-line separated) to a .txt; returns bytes."""
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for paragraph in paragraphs(seed):
            if written >= nbytes:
                break
            f.write(paragraph + "\n\n")
            written += len(paragraph) + 2
    return written
