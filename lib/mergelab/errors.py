"""The one exception type for bad user input.

Validation happens at the edges (checkpoint loading, study specs, the CLI); inner code trusts
its inputs. An :class:`InputError` message is a single line that names the problem and the fix;
the CLI prints it on stderr and exits with code 2.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input from a user: a path, a checkpoint, a config value or a flag.

    The message is flattened to one line so the CLI can print it as is.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
