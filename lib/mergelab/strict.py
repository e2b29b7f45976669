"""What every spec section shares: frozen pydantic models that reject unknown fields, and names safe
to become parts of store paths."""

from __future__ import annotations

import re
from typing import Annotated

import pydantic
from pydantic import BaseModel, ConfigDict

__all__ = ["SAFE_NAME", "Float", "Int", "Strict", "safe_name"]

#: A spec integer: ``true`` / ``false`` and ``2.0`` are refused (pydantic's lax mode reads ``true`` as 1).
Int = Annotated[int, pydantic.Strict()]
#: A spec number: an int or a float, never ``true`` / ``false``.
Float = Annotated[float, pydantic.Strict()]


class Strict(BaseModel):
    """A frozen spec section; a field it does not declare is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: Names that become parts of store paths (study names, adaptive labels, task names): a letter or
#: digit, then letters, digits, ``_ . + -``; never ``..`` (nothing may point outside the store).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def safe_name(value: str, what: str) -> str:
    """``value`` when it is a :data:`SAFE_NAME`, else ValueError naming ``what`` and the rule."""
    if not SAFE_NAME.fullmatch(value or "") or ".." in value:
        raise ValueError(f"{what} {value!r} must start with a letter or digit and use only letters, digits and _ . + - "
                         "(it names files in the store)")
    return value
