"""Where the text benchmark's rows come from: human-labelled text inside pinned Debian packages.

Each task names a package (name, version and the SHA-256 of its ``.deb``, so a rebuild reads the
same bytes), the files it reads inside it, a parser from those files to ``(text, raw label)`` rows
and the raw labels it keeps with the class name each one is prompted by. The parsers are small
pure functions of the files' bytes:

* :func:`wordnet_glosses`: a WordNet ``data.<pos>`` file's synset definitions, labelled by the
  lexicographer file the WordNet editors filed each synset in (its *supersense*: ``noun.animal``,
  ``verb.motion``, …); usage examples after the definition are dropped.
* :func:`fortune_quotes`: a ``fortune`` database's ``%``-separated quotations, labelled by the topic
  file they were filed in.
* :func:`foldoc_entries`: the Free On-line Dictionary of Computing (dictd format) entries, labelled by
  the editors' first subject tag (``<networking>``, ``<hardware>``, …); cross-reference braces and
  trailing dates are removed, only the entry's first paragraph is kept.
* :func:`emoji_names`: Unicode's ``emoji-test.txt``: the CLDR short name of every fully-qualified
  emoji without skin-tone modifiers, labelled by its Unicode group.

Packages are read with :func:`deb_files` (a ``.deb`` is an ``ar`` archive holding ``data.tar.*``),
obtained by :func:`fetch_deb` through ``apt-get download``: the build may use the registry, the
shipped benchmark never does.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import io
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mergelab.errors import InputError

__all__ = ["PACKAGES", "SOURCES", "DebPackage", "TaskSource", "deb_files", "emoji_names", "fetch_deb", "foldoc_entries",
           "fortune_quotes", "wordnet_glosses"]

Rows = list[tuple[str, str]]


#: The full texts of licences that must travel with a copy (package data of mergelab.textbench).
LICENCE_TEXTS = importlib.resources.files("mergelab.textbench") / "licences"


@dataclass(frozen=True)
class DebPackage:
    """A Debian package pinned by version and the SHA-256 of its ``.deb``; ``licence``: the licence of
    the text the tasks take from it, as its ``copyright`` file states it."""

    name: str
    version: str
    sha256: str
    licence: str
    notice: str
    licence_text: str | None = None  # a licence whose full text must travel with the copy: its file in ``licences/``

    @property
    def filename(self) -> str:
        """The file name ``apt-get download`` gives the package (an epoch's ``:`` as ``%3a``)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_all.deb"


@dataclass(frozen=True)
class TaskSource:
    """One task: the package files it reads, how they become ``(text, raw label)`` rows, and
    ``classes``: the raw labels it keeps, each with the class name its prompts use."""

    package: DebPackage
    files: tuple[str, ...]
    parse: Callable[[Mapping[str, bytes]], Rows]
    classes: Mapping[str, str]
    templates: tuple[str, ...]
    description: str


# Parsers ---------------------------------------------------------------------------------------------

#: WordNet's lexicographer files in the order of their numbers (``lexnames(5WN)``).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object noun.person "
    "noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition verb.consumption "
    "verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative "
    "verb.weather adj.ppl").split()


def wordnet_glosses(data: bytes) -> Rows:
    """``(definition, lexicographer file)`` of every synset line of a WordNet ``data.<pos>`` file
    (``wndb(5WN)``: the second field numbers the lexicographer file, the gloss follows ``" | "``)."""
    rows = []
    for line in data.decode("latin-1").splitlines():
        if line.startswith("  ") or " | " not in line:  # the licence header lines start with two spaces
            continue
        head, gloss = line.split(" | ", 1)
        definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
        rows.append((definition, LEXNAMES[int(head.split()[1])]))
    return rows


def fortune_quotes(data: bytes) -> list[str]:
    """The quotations of a ``fortune`` text database (``strfile(1)``: separated by lines holding ``%``)."""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    return [q.strip() for q in re.split(r"\n%\n", "\n" + text + "\n") if q.strip()]


def fortune_topics(files: Mapping[str, bytes]) -> Rows:
    """``(quotation, topic)`` of every file, the topic being the file's name."""
    return [(q, Path(path).name) for path, data in files.items() for q in fortune_quotes(data)]


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(digits: str) -> int:
    """A dictd index offset or length (base 64, most significant digit first)."""
    value = 0
    for digit in digits:
        value = value * 64 + _B64.index(digit)
    return value


def foldoc_entries(dictionary: bytes, index: str) -> Rows:
    """``(first paragraph, first subject tag)`` of every tagged FOLDOC entry of a dictd database
    (``dictionary``: the uncompressed ``.dict``; ``index``: its ``.index``, ``headword TAB offset TAB
    length`` per line)."""
    rows, seen = [], set()
    for line in index.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith("00-database"):
            continue
        offset, length = _dictd_number(fields[1]), _dictd_number(fields[2])
        if offset in seen:  # several headwords share one entry
            continue
        seen.add(offset)
        entry = re.search(r"<([a-z ,/-]+)>\s+(.*)", dictionary[offset:offset + length].decode("utf-8", "replace"), re.S)
        if entry is None:
            continue
        paragraph = re.split(r"\n\s*\n", entry.group(2))[0]
        paragraph = re.sub(r"\{([^}]*)\}", lambda m: m.group(1).split(" (")[0], paragraph)  # {link (url)} -> link
        paragraph = re.sub(r"\(\d{4}-\d\d-\d\d\)\s*$", "", re.sub(r"\s+", " ", paragraph)).strip()
        rows.append((paragraph, entry.group(1).split(",")[0].strip()))
    return rows


def foldoc_files(files: Mapping[str, bytes]) -> Rows:
    """:func:`foldoc_entries` of a package's ``foldoc.dict.dz`` and ``foldoc.index``."""
    dictionary = next(data for path, data in files.items() if path.endswith(".dict.dz"))
    index = next(data for path, data in files.items() if path.endswith(".index"))
    return foldoc_entries(gzip.decompress(dictionary), index.decode("utf-8", "replace"))


def emoji_names(data: bytes) -> Rows:
    """``(CLDR short name, group)`` of every fully-qualified emoji of ``emoji-test.txt`` without a
    skin-tone modifier (``# group:`` lines open a group; a row ends ``# <emoji> E<version> <name>``)."""
    rows, group = [], ""
    for line in data.decode("utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and "skin tone" not in line:
            rows.append((line.split("#", 1)[1].split(None, 2)[2], group))
    return rows


def _one(parse: Callable[[bytes], Rows]) -> Callable[[Mapping[str, bytes]], Rows]:
    return lambda files: [row for data in files.values() for row in parse(data)]


# Packages -------------------------------------------------------------------------------------------

#: The WordNet 3.0 licence, which must appear on all copies of the database (and so of rows taken from it).
WORDNET_NOTICE = "\n\n".join((
    'This software and database is being provided to you, the LICENSEE, by Princeton University under the following license.  By obtaining, using and/or copying this software and database, you agree that you have read, understood, and will comply with these terms and conditions.:',
    'Permission to use, copy, modify and distribute this software and database and its documentation for any purpose and without fee or royalty is hereby granted, provided that you agree to comply with the following copyright notice and statements, including the disclaimer, and that the same appear on ALL copies of the software, database and documentation, including modifications that you make for internal use or for distribution.',
    'WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.',
    'THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED.  BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT- ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS.',
    'The name of Princeton University or Princeton may not be used in advertising or publicity pertaining to distribution of the software and/or database.  Title to copyright in this software, database and any associated documentation shall at all times remain with Princeton University and LICENSEE agrees to preserve same.',
))

PACKAGES = {p.name: p for p in (
    DebPackage("wordnet-base", "1:3.0-37", "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
               "WordNet 3.0 licence (permissive, BSD-like)", WORDNET_NOTICE),
    DebPackage("fortunes", "1:1.99.1-7.3", "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
               "BSD-3-Clause (fortune-mod, Copyright (c) 1991 The Regents of the University of California)",
               "The fortune databases of fortune-mod (Ken Arnold; Amy A. Lewis; the Debian maintainers), distributed under "
               "the BSD licence of the University of California."),
    DebPackage("dict-foldoc", "20230119-1", "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3",
               "GFDL-1.1-or-later (no invariant sections)",
               "The Free On-line Dictionary of Computing, http://foldoc.org/, Editor Denis Howe. Copyright 1993 by Denis "
               "Howe. Permission is granted to copy, distribute and/or modify this document under the terms of the GNU Free "
               "Documentation License, Version 1.1 or any later version; with no Invariant Sections, Front- or Back-Cover Texts. "
               "This copy is distributed under version 1.3, as that permission allows; the licence's full text is GFDL-1.3.txt.",
               licence_text="GFDL-1.3.txt"),
    DebPackage("unicode-data", "15.0.0-1", "5efef23bbb1c6a133ecbdd63a2cfa07159ccacf5466a49e2426101c5ecd691fc",
               "Unicode License v3 (permissive)",
               "Copyright © 1991-2022 Unicode, Inc. Distributed under the Terms of Use in https://www.unicode.org/copyright.html "
               "(the Unicode License: permission to use, copy, modify and distribute with the copyright and permission notice)."),
)}

_WORDNET = "usr/share/wordnet/data."
_FORTUNES = "usr/share/games/fortunes/"

#: The tasks, in the benchmark's order.
SOURCES: dict[str, TaskSource] = {
    "wordnet_things": TaskSource(
        PACKAGES["wordnet-base"], (_WORDNET + "noun",), _one(wordnet_glosses),
        {"noun.animal": "an animal", "noun.plant": "a plant", "noun.food": "a food", "noun.body": "a part of the body",
         "noun.artifact": "a man-made object", "noun.person": "a person", "noun.location": "a place", "noun.substance": "a substance"},
        ("a definition of {}.", "the meaning of a word for {}."),
        "WordNet 3.0 definitions of concrete nouns, labelled by the lexicographer file (supersense) of their synset"),
    "wordnet_abstractions": TaskSource(
        PACKAGES["wordnet-base"], (_WORDNET + "noun",), _one(wordnet_glosses),
        {"noun.feeling": "a feeling", "noun.time": "a time period", "noun.communication": "communication",
         "noun.quantity": "a quantity or unit", "noun.cognition": "a thought or idea", "noun.act": "an action",
         "noun.attribute": "a quality or property", "noun.state": "a state or condition", "noun.event": "an event",
         "noun.possession": "money or property"},
        ("a definition of {}.", "the meaning of a word for {}."),
        "WordNet 3.0 definitions of abstract nouns, labelled by the lexicographer file (supersense) of their synset"),
    "wordnet_verbs": TaskSource(
        PACKAGES["wordnet-base"], (_WORDNET + "verb",), _one(wordnet_glosses),
        {"verb.change": "changing something", "verb.contact": "touching or hitting", "verb.communication": "speaking or communicating",
         "verb.motion": "moving", "verb.social": "social interaction", "verb.possession": "owning or giving",
         "verb.stative": "being or existing", "verb.cognition": "thinking", "verb.creation": "making or creating",
         "verb.body": "the body", "verb.perception": "seeing, hearing or sensing", "verb.competition": "fighting or competing",
         "verb.emotion": "feeling emotions", "verb.consumption": "eating or drinking", "verb.weather": "the weather"},
        ("a verb meaning {}.", "to do with {}."),
        "WordNet 3.0 verb definitions, labelled by the lexicographer file (supersense) of their synset"),
    "fortune_topics": TaskSource(
        PACKAGES["fortunes"],
        tuple(_FORTUNES + t for t in ("art", "computers", "education", "food", "law", "love", "medicine", "politics",
                                       "science", "sports", "work", "drugs", "kids", "startrek", "linux")),
        fortune_topics,
        {"art": "art", "computers": "computers", "education": "education", "food": "food", "law": "law", "love": "love",
         "medicine": "medicine", "politics": "politics", "science": "science", "sports": "sports", "work": "work",
         "drugs": "drugs", "kids": "children", "startrek": "star trek", "linux": "linux"},
        ("a quotation about {}.", "a joke about {}."),
        "fortune(6) quotations, labelled by the topic file they are filed in"),
    "foldoc_subjects": TaskSource(
        PACKAGES["dict-foldoc"], ("usr/share/dictd/foldoc.dict.dz", "usr/share/dictd/foldoc.index"), foldoc_files,
        {"language": "a programming language", "networking": "networking", "operating system": "an operating system",
         "hardware": "computer hardware", "company": "a company", "mathematics": "mathematics", "storage": "data storage",
         "database": "databases", "graphics": "computer graphics", "security": "computer security", "person": "a person",
         "web": "the world wide web", "games": "games", "processor": "a processor"},
        ("a computing dictionary entry about {}.", "{}"),
        "FOLDOC entries (first paragraph), labelled by their first subject tag"),
    "emoji_groups": TaskSource(
        PACKAGES["unicode-data"], ("usr/share/unicode/emoji/emoji-test.txt",), _one(emoji_names),
        {"Smileys & Emotion": "smileys and emotions", "People & Body": "people and body parts", "Animals & Nature": "animals and nature",
         "Food & Drink": "food and drink", "Travel & Places": "travel and places", "Activities": "activities and sports",
         "Objects": "objects", "Symbols": "symbols and signs"},
        ("an emoji of {}.", "{}"),
        "Unicode 15.0 emoji short names (CLDR), labelled by their Unicode emoji group"),
}


# Reading packages -------------------------------------------------------------------------------------


def _ar_members(data: bytes) -> dict[str, bytes]:
    """The members of an ``ar`` archive (a ``.deb``): 8-byte magic, then 60-byte headers (name, …, size)."""
    if not data.startswith(b"!<arch>\n"):
        raise InputError("not a Debian package (no ar magic); download it again")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        members[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def deb_files(deb: Path, paths: tuple[str, ...]) -> dict[str, bytes]:
    """``{path: bytes}`` of the files ``paths`` inside a ``.deb``'s ``data.tar.{xz,gz}``."""
    members = _ar_members(deb.read_bytes())
    data = next((v for k, v in members.items() if k in ("data.tar.xz", "data.tar.gz")), None)
    if data is None:
        raise InputError(f"{deb}: no data.tar.xz or data.tar.gz member ({sorted(members)})")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix("./")
            if name in paths and member.isfile():
                out[name] = tar.extractfile(member).read()
    missing = sorted(set(paths) - set(out))
    if missing:
        raise InputError(f"{deb} has no {missing}; the package's layout changed, pin the version the catalogue names")
    return out


def fetch_deb(package: DebPackage, cache: Path) -> Path:
    """The package's ``.deb`` in ``cache`` (``apt-get download`` when absent), checked against its SHA-256."""
    path = cache / package.filename
    if not path.is_file():
        if shutil.which("apt-get") is None:
            raise InputError(f"{path} is missing and there is no apt-get to download it; put {package.filename} there "
                             f"(apt-get download {package.name}={package.version} on a Debian machine)")
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["apt-get", "download", f"{package.name}={package.version}"], cwd=cache, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            raise InputError(f"apt-get download {package.name}={package.version} failed: {done.stderr.strip()[-300:]}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != package.sha256:
        raise InputError(f"{path} has SHA-256 {digest[:12]}…, the catalogue pins {package.sha256[:12]}…; delete it and download again")
    return path
