"""Words for counts, so every message agrees in number: "1 batch", "2 batches"."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and ``word`` in the number ``n`` asks for: ``plural(1, "batch")`` is "1 batch",
    ``plural(2, "batch")`` "2 batches". ``many`` overrides the plural form; otherwise the last
    word of ``word`` changes ("BN layer" → "BN layers"): "-es" after s, x, ch or sh, else "-s"."""
    if n == 1:
        return f"{n} {word}"
    if many is None:
        many = word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")
    return f"{n} {many}"
