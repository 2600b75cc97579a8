"""A T5-style Unigram tokenizer built without downloading anything.

Layout mirrors the real T5 sentencepiece vocab: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, the pieces, then the
sentinels with ``<extra_id_0>`` as the LAST id (T5 numbers them backwards from the end of the vocab).
Every printable ASCII character is a piece, so ASCII text never maps to ``<unk>``.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterable, Iterator

from transformers import PreTrainedTokenizerFast, T5TokenizerFast

SPIECE_UNDERLINE = "▁"
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")

# fmt: off
# Frequent English words: whole-word pieces keep real sentences short, like a trained vocab does.
_COMMON_WORDS = [
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not",
    "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were",
    "her", "she", "there", "one", "all", "we", "their", "been", "has", "more", "if", "will", "would", "who",
    "so", "no", "can", "said", "what", "when", "about", "up", "out", "them", "into", "only", "other", "its",
    "some", "time", "two", "then", "could", "these", "do", "may", "first", "new", "like", "than", "any",
    "over", "also", "after", "did", "many", "most", "such", "where", "through", "our", "way", "well",
    "before", "must", "even", "back", "years", "how", "just", "because", "good", "each", "those", "people",
    "make", "very", "between", "life", "both", "under", "last", "made", "while", "being", "another", "day",
    "same", "long", "world", "own", "still", "here", "three", "might", "see", "work", "down", "again",
    "never", "us", "system", "take", "ever", "much", "part", "government", "great", "found", "year", "old",
    "use", "know", "however", "during", "against", "place", "small", "without", "house", "high", "number",
    "since", "think", "end", "right", "large", "often", "water", "city", "name", "help", "come", "get",
    "give", "go", "every", "few", "things", "look", "want", "put", "find", "tell", "ask", "seem", "feel",
    "try", "leave", "call", "keep", "let", "begin", "show", "hear", "play", "run", "move", "live", "believe",
    "bring", "happen", "write", "sit", "stand", "lose", "pay", "meet", "include", "continue", "set", "learn",
    "change", "lead", "understand", "watch", "follow", "stop", "create", "speak", "read", "spend", "grow",
    "open", "walk", "win", "teach", "offer", "remember", "consider", "appear", "buy", "serve", "die", "send",
    "build", "stay", "fall", "cut", "reach", "kill", "raise", "pass", "sell", "decide", "return", "explain",
    "hope", "develop", "carry", "break", "receive", "agree", "support", "hit", "produce", "eat", "cover",
    "catch", "draw", "choose", "man", "woman", "child", "men", "women", "children", "family", "school",
    "state", "student", "group", "country", "problem", "hand", "eye", "point", "question", "fact", "home",
    "room", "area", "money", "story", "month", "lot", "book", "job", "word", "business", "issue", "side",
    "kind", "head", "night", "study", "game", "power", "thing", "company", "program", "case", "week",
    "member", "car", "law", "war", "history", "party", "result", "morning", "reason", "research", "girl",
    "guy", "moment", "air", "teacher", "force", "education", "food", "music", "river", "mountain", "weather",
    "energy", "computer", "model", "language", "translate", "english", "german", "french", "summary",
    "sentence", "text", "data", "question", "answer", "quick", "brown", "fox", "jumps", "lazy", "dog",
]

# Word endings without the word-start marker, so inflected forms split into stem + ending.
_SUFFIXES = [
    "s", "es", "ed", "ing", "er", "ers", "est", "ly", "tion", "tions", "sion", "ment", "ments", "ness",
    "able", "ible", "al", "ial", "ful", "less", "ous", "ive", "ity", "ize", "ise", "ant", "ent", "ance",
    "ence", "ist", "ism", "ship", "hood", "ward", "wise", "ary", "ory", "ic", "ical", "en", "an", "ian", "y",
    "ie", "re",
]
# fmt: on

_SENTINEL = "<extra_id_{}>"


def build_tokenizer(vocab_size: int, num_extra_ids: int) -> PreTrainedTokenizerFast:
    """A T5-style tokenizer of exactly ``vocab_size`` tokens (specials and sentinels included)."""
    num_pieces = vocab_size - len(SPECIAL_TOKENS) - num_extra_ids
    pieces = _pieces(num_pieces)
    vocab = [(token, 0.0) for token in SPECIAL_TOKENS]
    vocab += [(piece, _score(piece)) for piece in pieces]
    vocab += [(_SENTINEL.format(i), 0.0) for i in reversed(range(num_extra_ids))]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=num_extra_ids)
    if len(tokenizer) != vocab_size:
        raise AssertionError(f"built {len(tokenizer)} tokens, wanted {vocab_size}")
    return tokenizer


def _pieces(count: int) -> list[str]:
    """The first ``count`` distinct pieces, most useful first: small vocabs keep the characters and words."""
    chars = [c for c in string.printable if not c.isspace()]
    required = [SPIECE_UNDERLINE, *chars, *(SPIECE_UNDERLINE + c for c in chars)]
    if count < len(required):
        raise ValueError(f"need room for at least {len(required)} pieces to cover ASCII, got {count}")
    candidates = itertools.chain(
        required,
        (SPIECE_UNDERLINE + w for w in _COMMON_WORDS),
        _SUFFIXES,
        _ngrams(2),
        (SPIECE_UNDERLINE + w.capitalize() for w in _COMMON_WORDS),
        _ngrams(3),
        # Only mT5-size vocabs (~250k) reach this far; smaller vocabs are unchanged by it.
        _ngrams(4),
    )
    pieces = list(itertools.islice(_unique(candidates), count))
    if len(pieces) < count:
        raise ValueError(f"can build at most {len(pieces)} pieces, got {count}")
    return pieces


def _unique(items: Iterable[str]) -> Iterator[str]:
    """First occurrences in order, lazily: ids must not depend on anything but the candidate order."""
    seen: set[str] = set()
    for item in items:
        if item not in seen:
            seen.add(item)
            yield item


def _ngrams(n: int) -> Iterator[str]:
    """Lowercase letter n-grams, word-initial and word-internal: filler that still segments real words."""
    for gram in itertools.product(string.ascii_lowercase, repeat=n):
        yield SPIECE_UNDERLINE + "".join(gram)
        yield "".join(gram)


def _score(piece: str) -> float:
    """Log-prob-like score: the big per-piece cost makes Unigram pick the segmentation with fewest pieces."""
    return -10.0 + 0.5 * min(len(piece), 12)
