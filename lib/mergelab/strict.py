"""What every spec section shares: frozen pydantic models that reject unknown fields, and names safe
to become parts of store paths."""

from __future__ import annotations

import re
from typing import Annotated

import pydantic
from pydantic import BaseModel, ConfigDict

__all__ = ["MAX_NAME", "MAX_SEED", "SAFE_NAME", "Float", "Int", "Seed", "Strict", "safe_name"]

#: A spec integer: ``true`` / ``false`` and ``2.0`` are refused (pydantic's lax mode reads ``true`` as 1).
Int = Annotated[int, pydantic.Strict()]
#: A spec number: an int or a float, never ``true`` / ``false``.
Float = Annotated[float, pydantic.Strict()]
#: The largest seed: seeds go to torch and numpy generators as 64-bit integers.
MAX_SEED = 2**63 - 1
#: A random seed: an integer in ``[0, MAX_SEED]``.
Seed = Annotated[int, pydantic.Strict(), pydantic.Field(ge=0, le=MAX_SEED)]


class Strict(BaseModel):
    """A frozen spec section; a field it does not declare is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: Names that become parts of store paths (study names, adaptive labels, task names): a letter or
#: digit, then letters, digits, ``_ . + -``; never ``..`` (nothing may point outside the store).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


#: The longest name (:data:`SAFE_NAME`): names become file and folder names, with prefixes and
#: suffixes, under a filesystem's 255-byte limit on one name.
MAX_NAME = 100


def safe_name(value: str, what: str, why: str = "it names files in the store") -> str:
    """``value`` when it is a :data:`SAFE_NAME` of at most :data:`MAX_NAME` characters, else ValueError
    naming ``what``, the rule and ``why`` it holds."""
    if not SAFE_NAME.fullmatch(value or "") or ".." in value:
        raise ValueError(f"{what} {value!r} must start with a letter or digit and use only letters, digits and _ . + - ({why})")
    if len(value) > MAX_NAME:
        raise ValueError(f"{what} {value[:20]!r}… has {len(value)} characters; use at most {MAX_NAME} ({why})")
    return value
