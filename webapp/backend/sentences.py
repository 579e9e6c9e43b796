"""Split reply text into speakable sentences, incrementally, as an LLM streams it.

Each sentence becomes one clip, so the first one can be rendered and played while the LLM is still
writing the rest. Markdown that a TTS engine would read out (`**`, `#`, list bullets, links) is removed.
"""

from __future__ import annotations

import re

# Sentence-final punctuation (Latin and CJK), then closing quotes/brackets.
_TERMINALS = ".!?…。！？"
_CJK_TERMINALS = "。！？"
_CLOSERS = "\"'”’)]»」』"
# Words that end with a period without ending the sentence ("Dr. Smith", "e.g. this").
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "mt", "fig", "figs", "approx", "dept"}
    | {"inc", "ltd", "corp", "e.g", "i.e", "cf", "al"}
)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•+]|\d{1,3}[.)])\s+")
_MD_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_MD_NOISE = re.compile(r"[*_`#>~|]+")
_SPACES = re.compile(r"\s+")
_SOFT_BREAKS = ",;:—–"


def clean_for_speech(text: str) -> str:
    """Drop markdown a TTS engine would read aloud and collapse whitespace."""
    text = _LIST_MARKER.sub("", text)
    text = _MD_LINK.sub(r"\1", text)
    text = _MD_NOISE.sub("", text)
    return _SPACES.sub(" ", text).strip()


def _is_abbreviation(text: str, dot: int) -> bool:
    """True when the '.' at `dot` ends an abbreviation, an initial ("J.") or a leading list number ("1.")."""
    start = dot
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start:dot].lstrip("\"'(“‘[").lower()
    if not word:
        return False
    if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
        return True
    # "1. First point": a number alone at the start of a piece is a list marker, not a sentence.
    return word.isdigit() and not text[:start].strip()


def _wrap(sentence: str, max_chars: int) -> list[str]:
    """Split an over-long sentence at the last comma-like break (else space) before `max_chars`."""
    pieces = []
    while len(sentence) > max_chars:
        window = sentence[: max_chars + 1]
        cut = max(window.rfind(c) for c in _SOFT_BREAKS)
        if cut < max_chars // 3:
            cut = window.rfind(" ")
        if cut < max_chars // 3:
            cut = max_chars
        head, sentence = sentence[: cut + 1].strip(), sentence[cut + 1 :].strip()
        if head:
            pieces.append(head)
    if sentence:
        pieces.append(sentence)
    return pieces


class SentenceSplitter:
    """Feed text chunks as they stream in; get back the sentences that are complete so far."""

    def __init__(self, max_chars: int = 240) -> None:
        """`max_chars`: longer sentences are split at a comma or space so no clip gets too long."""
        if max_chars < 20:
            raise ValueError("max_chars must be at least 20")
        self.max_chars = max_chars
        self._buf = ""

    def feed(self, chunk: str) -> list[str]:
        """Add streamed text; return the sentences it completed (cleaned, non-empty)."""
        self._buf += chunk
        out: list[str] = []
        while True:
            cut = self._find_boundary(self._buf)
            if cut is None:
                break
            out.extend(self._emit(self._buf[:cut]))
            self._buf = self._buf[cut:]
        # A sentence with no end in sight: emit whole pieces now rather than wait for the end of the reply.
        if len(self._buf) > 2 * self.max_chars:
            pieces = _wrap(clean_for_speech(self._buf), self.max_chars)
            out.extend(pieces[:-1])
            self._buf = pieces[-1] if pieces else ""
        return out

    def flush(self) -> list[str]:
        """End of the stream: return whatever is left as the last sentence(s)."""
        rest, self._buf = self._buf, ""
        return self._emit(rest)

    def _emit(self, piece: str) -> list[str]:
        text = clean_for_speech(piece)
        # A piece of nothing but punctuation (a stray "..." or "-") is not worth a clip.
        if not any(ch.isalnum() for ch in text):
            return []
        return _wrap(text, self.max_chars)

    def _find_boundary(self, text: str) -> int | None:
        """Index just past the first complete sentence in `text` (None: no confirmed end yet)."""
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if ch == "\n":
                if text[:i].strip():
                    return i + 1
            elif ch in _TERMINALS:
                j = i
                while j < n and text[j] in _TERMINALS:
                    j += 1
                while j < n and text[j] in _CLOSERS:
                    j += 1
                if ch in _CJK_TERMINALS and j < n:
                    return j
                k = j
                while k < n and text[k] in " \t":
                    k += 1
                if k == n:
                    return None  # cannot tell yet: more text may follow (a decimal, an abbreviation's word)
                if k > j or text[k] == "\n":
                    nxt = text[k]
                    abbreviation = ch == "." and j == i + 1 and _is_abbreviation(text, i)
                    if not abbreviation and not nxt.islower():
                        return k
                i = j
                continue
            i += 1
        return None


def split_sentences(text: str, max_chars: int = 240) -> list[str]:
    """Split a whole text into speakable sentences (see SentenceSplitter)."""
    splitter = SentenceSplitter(max_chars)
    return [*splitter.feed(text), *splitter.flush()]
