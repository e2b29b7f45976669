"""Reading a study file: its YAML, its relative paths, where it is found and what its errors say.

A study file is a page of YAML with no repeated key; relative paths in it are relative to its folder.
:func:`validation_message` turns a validation error of the spec (:func:`mergelab.config.load_study`) into
one line naming the field and the allowed values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel

from mergelab.bench import BENCHES
from mergelab.bench.kinds import DEFAULT_KIND
from mergelab.errors import InputError, read_text

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = ["DEFAULT_STUDY", "MAX_STUDY_BYTES", "find_study", "read_study_file", "validation_message"]

#: A study file is a page of YAML; anything larger is not one (and would take minutes to parse).
MAX_STUDY_BYTES = 1 << 20


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping that repeats a key."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a repeated key (the last would silently win).
    Keys a merge key (``<<: *anchor``) brings in may be overridden, as YAML defines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_study_file(path: Path) -> dict:
    """The mapping a study YAML file holds, its relative paths made relative to its folder; InputError
    when it is no file, too large, not YAML, repeats a key or holds no mapping."""
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise InputError(f"study file {path} {what}; pass a YAML file such as studies/micro.yaml")
    if path.stat().st_size > MAX_STUDY_BYTES:
        raise InputError(f"study file {path} has {path.stat().st_size} bytes, more than a study's {MAX_STUDY_BYTES}; "
                         "pass the study's YAML file")
    text = read_text(path, "study file")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except RecursionError:
        raise InputError(f"{path} nests deeper than Python can read; a study is a few levels of mappings and lists") from None
    except _DuplicateKey as err:
        raise InputError(f"{path}: {err.problem}; keep one of them") from None
    except yaml.constructor.ConstructorError as err:
        raise InputError(f"{path}: {err.problem}; a study holds plain mappings, lists and scalars") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping with at least 'name' and 'methods'")
    return _relative_to(data, path.parent)


def _relative_to(data: dict, folder: Path) -> dict:
    """Relative file paths in a study file (bench root and weights, task sources and their
    ``classnames`` / ``templates`` files, a local ``store:``) are relative to the file's folder, so a
    study runs from any working directory."""

    def fix(section: Any, keys: tuple[str, ...]) -> Any:
        if not isinstance(section, dict):
            return section
        return {k: str(folder / v) if k in keys and isinstance(v, str) and not Path(v).is_absolute() else v
                for k, v in section.items()}

    data = dict(data)
    bench = data.get("bench", {})
    kind = BENCHES.get(bench.get("kind", DEFAULT_KIND)) if isinstance(bench, dict) else None
    data["bench"] = fix(bench, kind.spec.path_fields() if kind is not None else ())  # an unknown kind: validation names it
    store = data.get("store")
    if isinstance(store, str) and "://" not in store and not Path(store).is_absolute():
        data["store"] = str(folder / store)
    for section in ("tasks", "unseen"):
        if isinstance(data.get(section), list):
            data[section] = [fix(t, ("adapter", "checkpoint", "data", "classnames", "templates")) for t in data[section]]
    return data


def validation_message(err: ValidationError, data: Any, model: type[BaseModel]) -> str:
    """``location: message`` of the first error of ``err`` (``model`` validating ``data``): the branch the
    input took, ``Value error, `` left out, an unknown field with the fields allowed there."""
    first = _taken_branch(err.errors(), data)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(_fields_at(first["loc"][:-1], data, model))
        message = f"unknown field; allowed: {allowed}"
    location = _location(first["loc"])
    return f"{location}: {message}" if location else message


def _location(loc: tuple) -> str:
    """``tasks[0].classnames``: a union's branch labels (``list[str]``) left out."""
    parts = [p for p in loc if isinstance(p, int) or "[" not in str(p)]
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in parts).replace(".[", "[")


def _taken_branch(errors: list[dict], data: Any) -> dict:
    """The first error of the branch the input took where ``tasks`` / ``unseen`` (names or sources)
    failed both: mappings are sources, so an error in a source is not reported as 'not a string'."""
    for error in errors:
        loc = error["loc"]
        if len(loc) > 2 and loc[0] in ("tasks", "unseen") and isinstance(data, dict) and isinstance(data.get(loc[0]), list):
            sources = any(isinstance(item, dict) for item in data[loc[0]])
            if (loc[1] == "list[str]") == sources:
                continue
        return error
    return errors[0]


def _fields_at(loc: tuple, data: dict, model: type[BaseModel]) -> list[str]:
    """The field names allowed at a location of the spec ``model`` (for 'unknown field' errors); the ``bench:``
    section's are its kind's."""
    if loc[:1] == ("bench",):
        return list(BENCHES[data["bench"].get("kind", DEFAULT_KIND)].spec.model_fields)
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        nested = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        nested += [a for arg in getattr(annotation, "__args__", ()) for a in getattr(arg, "__args__", ())
                   if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return list(model.model_fields)


#: The embedded default study, found from the working directory or the source checkout.
DEFAULT_STUDY = Path("studies/micro.yaml")


def find_study(study: str | os.PathLike[str]) -> Path | None:
    """``study`` itself if it is a file, else ``studies/<study>.yaml`` in the working directory or the
    source checkout (an editable install); None when neither exists."""
    named = Path(study) if Path(study).is_file() else DEFAULT_STUDY.with_name(f"{Path(study).name.removesuffix('.yaml')}.yaml")
    for candidate in (named, Path(__file__).resolve().parents[2] / named):
        if candidate.is_file():
            return candidate
    return None
