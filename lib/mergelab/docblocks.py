"""Generated blocks of the project's Markdown files: a pair of marker lines between which a tool writes
what it measured, so that the text around them stays hand-written and the numbers are never typed.

:data:`REGIME_BLOCK` holds a study's claims table (``benchmarks/regime.py --readme``): docs/demo.md for the
demo, data/text/README.md for the text study. The registry tables of docs/methods.md have their own
blocks (:mod:`mergelab.catalog`).
"""

from __future__ import annotations

from mergelab.errors import InputError

__all__ = ["REGIME_BLOCK", "replace_block"]

#: The first and last line of the block ``benchmarks/regime.py --readme`` rewrites.
REGIME_BLOCK = ("<!-- regime:begin (benchmarks/regime.py --readme writes this block) -->", "<!-- regime:end -->")


def replace_block(text: str, block: tuple[str, str], body: str) -> str:
    """``text`` with what lies between ``block``'s two marker lines replaced by ``body``."""
    begin, end = block
    if begin not in text or end not in text.split(begin, 1)[1]:
        raise InputError(f"no {begin!r} … {end!r} block; add both markers where the table belongs")
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1]
