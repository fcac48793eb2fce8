"""Data pipeline: sources, BPE tokenizer, resumable token shards, packing, the row stream, and packed-row isolation
in the model (no attention and no loss across piece boundaries). Small synthetic corpora, all on CPU, fast."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from helmlm.config import DataConfig
from helmlm.data import shards as shards_mod
from helmlm.data.packing import PackedRows, RowStream, best_fit_decreasing, split_documents
from helmlm.data.shards import TokenShards, prepare_data, read_manifest, verify_shards
from helmlm.data.sources import DataError, TextStats, local_documents, split_of
from helmlm.data.tokenizer import EOS_TOKEN, load_tokenizer, tokenizer_hash, tokenizer_size, train_bpe

# ------------------------------------------------------------------------------------------------------ helpers

BAD_BYTES = b"caf\xe9 ok \xff\xfe"          # 3 invalid UTF-8 bytes
BAD_TEXT = "caf\ufffd ok \ufffd\ufffd"
UNICODE_TEXT = "caf\u00e9 \u6f22\u5b57 \U0001f642 na\u00efve \u00fcber"  # é, 漢字, emoji: valid multi-byte UTF-8


def _binary(n: int = 5000, share: float = 0.18, seed: int = 0) -> tuple[bytes, int]:
    """PNG-like bytes (signature, then letters, spaces and about ``share`` high bytes) and the exact number of
    invalid UTF-8 bytes: every high byte is a lone continuation byte (0x80-0xBF) or 0xF8-0xFF, never valid."""
    rng = np.random.default_rng(seed)
    ascii_ = np.frombuffer(b"abcdefghij klmnop qrstuvwxyz ", dtype=np.uint8)
    high = np.concatenate([np.arange(0x80, 0xC0), np.arange(0xF8, 0x100)]).astype(np.uint8)
    body = np.where(rng.random(n) < share, rng.choice(high, n), rng.choice(ascii_, n)).astype(np.uint8)
    data = b"\x89PNG\r\n\x1a\n" + body.tobytes()  # the signature adds 1 invalid byte (0x89)
    return data, 1 + int((body >= 0x80).sum())


def _words(seed: int = 0, n: int = 150) -> list[str]:
    """Pseudo-words (ASCII plus a few non-ASCII ones) so that BPE has plenty of merges to learn."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(n)]
    return words + ["caf\u00e9", "\u6f22\u5b57", "\U0001f642", "na\u00efve", "--", "42,", "end.\n"]


def _texts(n: int, seed: int, max_words: int = 60, long_every: int = 0) -> list[str]:
    """``n`` random documents; every ``long_every``-th one is long (several hundred words)."""
    rng = np.random.default_rng(seed)
    words = _words()
    out = []
    for i in range(n):
        k = 300 if long_every and i % long_every == 0 else int(rng.integers(1, max_words))
        out.append(" ".join(rng.choice(words, k)))
    return out


def _write_jsonl(path: Path, texts: list[str], field: str = "text") -> None:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")


def _make_corpus(root: Path, n: int = 120, seed: int = 1) -> tuple[Path, list[str]]:
    """A corpus directory and its documents in reading order: a JSONL, a text file with 3 invalid UTF-8 bytes
    (under 1 % of its bytes, so accepted by default), a whitespace-only file (skipped), and a long text file."""
    root.mkdir(parents=True)
    docs = _texts(n, seed, long_every=15)
    _write_jsonl(root / "a.jsonl", docs)
    rest = " " + " ".join(_texts(30, seed + 2))
    assert 3 / (len(BAD_BYTES) + len(rest.encode())) < 0.01
    (root / "b_bad.txt").write_bytes(BAD_BYTES + rest.encode())
    (root / "c_blank.txt").write_text(" \n\t \n")
    long_doc = " ".join(_texts(40, seed + 1))
    (root / "d_long.txt").write_text(long_doc, encoding="utf-8")
    return root, docs + [BAD_TEXT + rest, long_doc]


def _config(paths, out: Path, **kw) -> DataConfig:
    kw = {"vocab_size": 400, "val_fraction": 0.2, "shard_tokens": 400, "batch_documents": 8, **kw}
    return DataConfig(source="local", paths=[str(p) for p in paths], dir=str(out), **kw)


def _encode_doc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


def _split_docs(ts: TokenShards) -> list[list[int]]:
    return [ts.tokens(int(s), int(a), int(n)).tolist() for s, a, n in zip(ts.doc_shard, ts.doc_start, ts.doc_length)]


def _file_state(d: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.rglob("*")) if p.is_file()}


def _row_pieces(batch: dict, b: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each piece of row ``b`` from its document ids and attention mask."""
    real = int(batch["attention_mask"][b].sum())
    docs = batch["document_ids"][b, :real].tolist()
    bounds = [0] + [i for i in range(1, real) if docs[i] != docs[i - 1]] + [real]
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One prepared corpus shared by the shard and packing tests: ``(data dir, documents in order, tokenizer)``."""
    root = tmp_path_factory.mktemp("data")
    corpus, docs = _make_corpus(root / "corpus")
    out = prepare_data(_config([corpus], root / "prep"), progress=False)
    return out, docs, load_tokenizer(out / "tokenizer")


# ------------------------------------------------------------------------------------------------------ sources


def test_local_documents_reads_every_format_in_sorted_order(tmp_path):
    """txt (one doc per file), .md, jsonl, jsonl.gz and parquet under a directory are read in sorted path order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee text\nsecond line")
    (tmp_path / "a.txt").write_text("aye")
    _write_jsonl(tmp_path / "c.jsonl", ["c1", "c2"])
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "d1"}) + "\n\n" + json.dumps({"text": "d2"}) + "\n")
    pq.write_table(pa.table({"text": ["e1", "e2", "e3"], "n": [1, 2, 3]}), tmp_path / "e.parquet")
    (tmp_path / "sub" / "f.md").write_text("# f")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")  # unknown types inside a directory are skipped
    expected = ["aye", "bee text\nsecond line", "c1", "c2", "d1", "d2", "e1", "e2", "e3", "# f"]
    stats = TextStats()
    assert list(local_documents([tmp_path], stats=stats)) == expected
    assert stats.documents == len(expected) and stats.empty == 0 and stats.replaced_bytes == 0
    assert list(local_documents([str(tmp_path)])) == expected  # deterministic


def test_local_documents_custom_field_globs_and_pattern_order(tmp_path):
    """A custom ``text_field``; globs (with ``**``) are sorted within a pattern, patterns keep their order."""
    (tmp_path / "x" / "y").mkdir(parents=True)
    _write_jsonl(tmp_path / "x" / "y" / "2.jsonl", ["two"], field="body")
    _write_jsonl(tmp_path / "x" / "1.jsonl", ["one"], field="body")
    _write_jsonl(tmp_path / "z.jsonl", ["zed"], field="body")
    (tmp_path / "x" / "note.txt").write_text("not matched by the glob")
    docs = list(local_documents([tmp_path / "z.jsonl", str(tmp_path / "x" / "**" / "*.jsonl")], text_field="body"))
    assert docs == ["zed", "one", "two"]
    with pytest.raises(DataError, match="'text'"):
        list(local_documents([tmp_path / "z.jsonl"]))  # default field absent


def test_local_documents_skips_and_counts_empty_documents(tmp_path):
    """Whitespace-only documents (txt, jsonl) are skipped and counted in ``TextStats.empty``."""
    (tmp_path / "a.txt").write_text("  \n\t")
    _write_jsonl(tmp_path / "b.jsonl", ["real", "", "   ", "also real"])
    stats = TextStats()
    assert list(local_documents([tmp_path], stats=stats)) == ["real", "also real"]
    assert (stats.documents, stats.empty) == (2, 3)


def test_jsonl_line_without_field_names_file_line_and_field(tmp_path):
    """A JSONL record lacking the text field is a DataError naming ``file:line`` and the field."""
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n" + json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError) as err:
        list(local_documents([path]))
    assert f"{path}:3" in str(err.value) and "'text'" in str(err.value) and "content" in str(err.value)
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid JSON"):
        list(local_documents([path]))


def test_missing_path_or_unknown_type_is_a_data_error(tmp_path):
    """A path or glob matching nothing, and an explicit file of unknown type, are DataErrors."""
    with pytest.raises(DataError, match="no files match"):
        list(local_documents([tmp_path / "nope.jsonl"]))
    with pytest.raises(DataError, match="no files match"):
        list(local_documents([str(tmp_path / "**" / "*.parquet")]))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unknown file type"):
        list(local_documents([tmp_path / "x.csv"]))


def test_invalid_utf8_bytes_are_each_replaced_and_counted(tmp_path):
    """Each invalid byte becomes one U+FFFD and is counted exactly; valid multi-byte UTF-8 is untouched (files far
    above the 1 % threshold, accepted with ``max_invalid_utf8=1``)."""
    (tmp_path / "a_bad.txt").write_bytes(BAD_BYTES)
    (tmp_path / "b_good.txt").write_text(UNICODE_TEXT, encoding="utf-8")
    # JSONL: a raw invalid byte inside the string, and a truncated 3-byte sequence (2 bytes of 漢) -> 2 replacements
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "x\x80y"}\n{"text": "z\xe6\xbc"}\n' +
                                       json.dumps({"text": UNICODE_TEXT}, ensure_ascii=False).encode() + b"\n")
    stats = TextStats()
    docs = list(local_documents([tmp_path], stats=stats, max_invalid_utf8=1.0))
    assert docs == [BAD_TEXT, UNICODE_TEXT, "x\ufffdy", "z\ufffd\ufffd", UNICODE_TEXT]
    assert stats.replaced_bytes == 3 + 1 + 2
    assert stats.documents_with_replacements == 3 and stats.documents == 5


def test_binary_file_named_txt_is_refused_naming_the_file_and_the_share(tmp_path):
    """A binary file named ``.txt`` (18 % of its bytes invalid UTF-8) is a DataError naming the file, the share,
    its size and the flag; with ``max_invalid_utf8=1`` it is read, each invalid byte replaced and counted."""
    data, invalid = _binary()
    share = invalid / len(data)
    assert 0.17 < share < 0.19
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (tmp_path / "image.txt").write_bytes(data)
    with pytest.raises(DataError) as err:
        list(local_documents([tmp_path]))
    message = str(err.value)
    assert str(tmp_path / "image.txt") in message
    assert f"{100 * share:.1f} % of its {len(data):,} bytes ({invalid:,}) are not valid UTF-8" in message
    assert "binary" in message and "data.max_invalid_utf8=1" in message
    stats = TextStats()
    docs = list(local_documents([tmp_path], stats=stats, max_invalid_utf8=1.0))
    assert len(docs) == 2 and docs[0] == "fine" and docs[1].count("\ufffd") == invalid
    assert stats.replaced_bytes == invalid and stats.documents_with_replacements == 1
    with pytest.raises(DataError, match="image.txt"):  # just above the share: refused; at it: accepted
        list(local_documents([tmp_path], max_invalid_utf8=share * 0.999))
    assert len(list(local_documents([tmp_path], max_invalid_utf8=share))) == 2


def test_small_share_of_invalid_utf8_is_accepted_by_default(tmp_path):
    """A text file with 0.5 % invalid bytes is read by default (replaced and counted); a threshold of 0 refuses it;
    a gzip-compressed file is judged on its decompressed bytes."""
    text = " ".join(_texts(20, 2)).encode()[:995]
    data = text[:300] + b"\xff\xfe\x80\xbf\xc0" + text[300:]  # 5 invalid bytes in 1,000
    (tmp_path / "a.txt").write_bytes(data)
    stats = TextStats()
    assert [d.count("\ufffd") for d in local_documents([tmp_path / "a.txt"], stats=stats)] == [5]
    assert stats.replaced_bytes == 5
    with pytest.raises(DataError, match=r"0\.50 % of its 1,000 bytes \(5\)"):
        list(local_documents([tmp_path / "a.txt"], max_invalid_utf8=0.0))
    binary, _ = _binary(seed=1)
    with gzip.open(tmp_path / "b.txt.gz", "wb") as f:
        f.write(binary)
    with pytest.raises(DataError, match=r"b\.txt\.gz: 1\d\.\d % of its"):
        list(local_documents([tmp_path / "b.txt.gz"]))


def test_jsonl_file_above_the_threshold_is_refused_before_any_of_its_documents(tmp_path):
    """A JSONL file whose invalid bytes are late in the file is refused before its first (valid) line is yielded:
    the share is over the whole file; the files before it are read normally."""
    _write_jsonl(tmp_path / "a.jsonl", ["first", "second"])
    binary, invalid = _binary(2000, seed=2)
    body, invalid = binary[8:], invalid - 1  # without the PNG signature (its newlines would cut the JSON line)
    lines = [json.dumps({"text": t}).encode() for t in _texts(5, 3)]
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(lines) + b'\n{"text": "' + body + b'"}\n')
    got = []
    with pytest.raises(DataError) as err:
        for doc in local_documents([tmp_path]):
            got.append(doc)
    assert got == ["first", "second"]
    assert str(tmp_path / "b.jsonl") in str(err.value) and "not valid UTF-8" in str(err.value)
    docs = list(local_documents([tmp_path], max_invalid_utf8=1.0))
    assert docs[:7] == ["first", "second", *_texts(5, 3)] and docs[7].count("\ufffd") == invalid


def test_max_invalid_utf8_is_validated_and_not_part_of_the_spec(tmp_path):
    """``data.max_invalid_utf8`` must be in [0, 1]; it does not change ``spec()``, so raising it reuses a prepared
    directory instead of calling it "prepared with other settings"."""
    base = _config([tmp_path], tmp_path / "p")
    for value in (0.0, 0.5, 1.0):
        relaxed = _config([tmp_path], tmp_path / "p", max_invalid_utf8=value)
        relaxed.validate()
        assert relaxed.spec() == base.spec() and "max_invalid_utf8" not in relaxed.spec()
    for value in (-0.01, 1.5, float("nan")):
        with pytest.raises(DataError, match="max_invalid_utf8"):
            _config([tmp_path], tmp_path / "p", max_invalid_utf8=value).validate()
    corpus, _ = _make_corpus(tmp_path / "corpus", n=40)
    out = prepare_data(_config([corpus], tmp_path / "prep"), progress=False)
    before = _file_state(out)
    assert prepare_data(_config([corpus], out, max_invalid_utf8=1.0), progress=False) == out
    assert _file_state(out) == before


def test_split_of_is_a_deterministic_function_of_text_with_the_requested_fraction():
    """``split_of`` depends only on the text, hits ~10% val on 5,000 random texts, and 0 means all train."""
    rng = np.random.default_rng(0)
    texts = ["".join(map(chr, rng.integers(32, 0x3000, rng.integers(1, 40)))) for _ in range(5000)]
    splits = [split_of(t, 0.1) for t in texts]
    assert set(splits) == {"train", "val"}
    assert abs(splits.count("val") / len(texts) - 0.1) <= 0.01
    assert [split_of(t, 0.1) for t in reversed(texts)] == splits[::-1]  # order-independent
    assert [split_of("".join(list(t)), 0.1) for t in texts] == splits  # equal text (new object) -> same split
    assert all(split_of(t, 0.0) == "train" for t in texts)
    # monotone in the fraction: a val document at 10% stays val at 50%
    assert all(split_of(t, 0.5) == "val" for t, s in zip(texts, splits) if s == "val")


# ------------------------------------------------------------------------------------------------------ tokenizer


def test_train_bpe_has_eos_and_round_trips_any_text():
    """``train_bpe`` gives a fast tokenizer whose EOS is ``<|endoftext|>``; decode(encode(x)) == x, also for text
    with characters never seen in training (byte-level: nothing is unknown)."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(_texts(200, 3), vocab_size=400)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == tok.convert_tokens_to_ids(EOS_TOKEN)
    assert 258 <= tokenizer_size(tok) <= 400
    samples = [UNICODE_TEXT, BAD_TEXT, "  leading and trailing  \n\n\tTabs\r\n",
               "\u0416\u0443\u043a \u05e9\u05dc\u05d5\u05dd \U0001f680\U0001f9ea \x00\x7f",
               "CAPS mixed 1234567890 !@#$%^&*()", "a", ""]
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.eos_token_id not in ids
        assert tok.decode(ids) == text
    assert len(tok.encode(_texts(1, 3)[0], add_special_tokens=False)) < len(_texts(1, 3)[0].encode())  # merges used


def test_tokenizer_hash_is_stable_across_save_and_load_and_differs_by_vocab(tmp_path):
    """The hash survives save_pretrained/load_tokenizer and changes with the vocabulary size."""
    texts = _texts(300, 4)
    tok = train_bpe(texts, vocab_size=400)
    assert tokenizer_hash(tok) == tokenizer_hash(train_bpe(texts, vocab_size=400))  # training is deterministic
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert tokenizer_hash(loaded) == tokenizer_hash(tok)
    assert loaded.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT) and loaded.eos_token_id == tok.eos_token_id
    small = train_bpe(texts, vocab_size=300)
    assert tokenizer_size(small) == 300 < tokenizer_size(tok)
    assert tokenizer_hash(small) != tokenizer_hash(tok)


def test_train_bpe_rejects_too_small_vocab_or_corpus(tmp_path):
    """vocab_size < 258, or a corpus with no mergeable pair, is a DataError; a missing tokenizer dir too."""
    with pytest.raises(DataError, match="too small"):
        train_bpe(_texts(10, 0), vocab_size=257)
    with pytest.raises(DataError, match="too small"):
        train_bpe(["a", "b"], vocab_size=300)
    with pytest.raises(DataError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------------ shards


def test_prepare_data_manifest_and_token_content(prepared):
    """The manifest is complete and consistent; each split holds exactly encode(doc) + EOS for its documents, in
    source order (computed independently with the saved tokenizer), and the totals match."""
    out, docs, tok = prepared
    m = read_manifest(out)
    assert m["complete"] is True and m["format"] == shards_mod.FORMAT_VERSION
    assert m["tokenizer"]["sha256"] == tokenizer_hash(tok) and m["tokenizer"]["size"] == tokenizer_size(tok)
    assert m["tokenizer"]["eos_id"] == tok.eos_token_id and m["documents_read"] == len(docs)
    assert m["text"]["documents"] == len(docs) and m["text"]["empty"] == 1
    assert m["bytes_read"] == sum(len(d.encode()) for d in docs)
    expected = {s: [_encode_doc(tok, d) for d in docs if split_of(d, 0.2) == s] for s in ("train", "val")}
    assert expected["val"] and expected["train"]
    total = 0
    for split in ("train", "val"):
        ts = TokenShards(out, split)
        got = _split_docs(ts)
        assert got == expected[split]
        assert all(d[-1] == ts.eos_id for d in got)
        assert m["splits"][split]["tokens"] == ts.num_tokens == sum(map(len, expected[split]))
        assert m["splits"][split]["documents"] == ts.num_documents == len(expected[split])
        total += ts.num_tokens
    assert total == sum(len(tok.encode(d, add_special_tokens=False)) + 1 for d in docs)


def test_prepare_data_dtype_shards_and_replaced_bytes(prepared):
    """uint16 tokens (2 bytes each on disk), several shards for a small shard_tokens, and the invalid UTF-8 count
    of the source in ``manifest["text"]["replaced_bytes"]``."""
    out, _, _ = prepared
    m = read_manifest(out)
    ts = TokenShards(out, "train")
    assert m["dtype"] == "uint16" and ts.dtype == np.uint16 and all(s.dtype == np.uint16 for s in ts.shards)
    assert len(m["splits"]["train"]["shards"]) >= 3
    for split in ("train", "val"):
        for shard in m["splits"][split]["shards"]:
            assert (out / f"{shard['name']}.bin").stat().st_size == 2 * shard["tokens"]
            ends = np.load(out / f"{shard['name']}.idx.npy")
            assert ends.dtype == np.int64 and ends.size == shard["documents"] and ends[-1] == shard["tokens"]
    assert m["text"]["replaced_bytes"] == 3 and m["text"]["documents_with_replacements"] == 1
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def test_literal_eos_text_inside_a_document_is_not_a_document_end(tmp_path):
    """A document that contains the text "<|endoftext|>" keeps it as ordinary text: the EOS id appears once per
    document, at its end."""
    (tmp_path / "c").mkdir()
    texts = _texts(40, 5)
    texts[3] = f"before {EOS_TOKEN} after " + texts[3]
    _write_jsonl(tmp_path / "c" / "a.jsonl", texts)
    shards = TokenShards(prepare_data(_config([tmp_path / "c"], tmp_path / "p", val_fraction=0.0), progress=False))
    for doc in _split_docs(shards):
        assert doc.count(shards.eos_id) == 1 and doc[-1] == shards.eos_id


def test_prepare_data_rejects_an_empty_corpus(tmp_path):
    """A corpus of whitespace-only documents is a DataError saying "empty" with the number of empty documents, and
    leaves no data directory behind (BPE path, where it fails while training the tokenizer, and pretrained-tokenizer
    path, where it fails after the manifest was written); an empty directory given as data.dir stays, empty."""
    (tmp_path / "c").mkdir()
    for i in range(3):
        (tmp_path / "c" / f"{i}.txt").write_text(" \n\t ")
    with pytest.raises(DataError, match="empty") as err:
        prepare_data(_config([tmp_path / "c"], tmp_path / "p1"), progress=False)
    assert "3 empty ones skipped" in str(err.value)
    assert not (tmp_path / "p1").exists()
    train_bpe(_texts(50, 0), vocab_size=300).save_pretrained(tmp_path / "tok")
    with pytest.raises(DataError, match="empty") as err:
        prepare_data(_config([tmp_path / "c"], tmp_path / "p2" / "deeper", tokenizer=str(tmp_path / "tok")),
                     progress=False)
    assert "3 empty documents" in str(err.value)
    assert not (tmp_path / "p2").exists()  # the parent it made is gone too
    with pytest.raises(DataError):
        TokenShards(tmp_path / "p2" / "deeper")
    (tmp_path / "p3").mkdir()
    with pytest.raises(DataError, match="empty"):
        prepare_data(_config([tmp_path / "c"], tmp_path / "p3"), progress=False)
    assert (tmp_path / "p3").is_dir() and not list((tmp_path / "p3").iterdir())


def test_prepare_data_reuses_same_spec_and_refuses_other_spec(tmp_path):
    """Same spec: the directory is reused (nothing rewritten). Another spec: DataError naming the differing field,
    nothing overwritten. A non-empty directory without manifest: DataError."""
    corpus, _ = _make_corpus(tmp_path / "corpus", n=40)
    out = prepare_data(_config([corpus], tmp_path / "prep"), progress=False)
    before = _file_state(out)
    # shard size and batching are not part of the spec
    assert prepare_data(_config([corpus], out, shard_tokens=10**6, batch_documents=3), progress=False) == out
    assert _file_state(out) == before
    with pytest.raises(DataError, match="val_fraction: 0.2 there, 0.3 now"):
        prepare_data(_config([corpus], out, val_fraction=0.3), progress=False)
    with pytest.raises(DataError, match="vocab_size"):
        prepare_data(_config([corpus], out, vocab_size=300), progress=False)
    assert _file_state(out) == before
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a helmlm data directory"):
        prepare_data(_config([corpus], tmp_path / "foreign"), progress=False)
    assert [p.name for p in (tmp_path / "foreign").iterdir()] == ["notes.txt"]


def test_prepare_data_refuses_a_binary_file_and_leaves_no_directory(tmp_path):
    """A binary ``.txt`` in the corpus: ``prepare_data`` raises the DataError naming it and removes the directory
    (and the parent) it created, so that a retry with ``max_invalid_utf8=1`` starts clean and succeeds, with the
    replaced bytes counted in the manifest."""
    corpus, _ = _make_corpus(tmp_path / "corpus", n=60)
    data, invalid = _binary(seed=3)
    (corpus / "e_image.txt").write_bytes(data)
    out = tmp_path / "new" / "prep"
    with pytest.raises(DataError, match="e_image.txt: 1\\d\\.\\d % of its"):
        prepare_data(_config([corpus], out), progress=False)
    assert not (tmp_path / "new").exists()
    prepare_data(_config([corpus], out, max_invalid_utf8=1.0), progress=False)
    m = read_manifest(out)
    assert m["complete"] and m["text"]["replaced_bytes"] == 3 + invalid
    assert m["text"]["documents_with_replacements"] == 2


def test_data_error_while_resuming_keeps_the_directory(tmp_path, monkeypatch):
    """A directory with a manifest is never removed: an interrupted preparation (partial state kept), then a binary
    file added to the corpus (last in reading order): the resumed preparation raises the DataError when it reaches
    it, and nothing is removed."""
    corpus, _ = _make_corpus(tmp_path / "corpus", n=60)
    config = _config([corpus], tmp_path / "run", shard_tokens=300, batch_documents=4)
    real_encode = shards_mod._encode

    def interrupted(tokenizer, texts):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(shards_mod, "_encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(config, progress=False)
    monkeypatch.setattr(shards_mod, "_encode", real_encode)
    before = _file_state(tmp_path / "run")
    assert read_manifest(tmp_path / "run")["complete"] is False
    (corpus / "e_image.txt").write_bytes(_binary(seed=4)[0])
    with pytest.raises(DataError, match="e_image.txt"):
        prepare_data(config, progress=False)
    after = _file_state(tmp_path / "run")  # it got further (more shards) before reaching the bad file
    assert set(before) <= set(after) and all(after[k] == v for k, v in before.items() if k != "manifest.json")
    m = read_manifest(tmp_path / "run")
    assert m["complete"] is False and m["documents_read"] > 0


def test_empty_validation_split_warns_and_is_recorded(tmp_path, capsys):
    """``val_fraction > 0`` but no document falls in the validation split: preparation succeeds (a tiny corpus still
    trains) and prints a warning even with progress=False, recorded in ``manifest["warnings"]``; a corpus with
    validation documents, or ``val_fraction=0``, gets no such warning."""
    texts = [t for t in _texts(80, 8) if split_of(t, 0.01) == "train"]
    (tmp_path / "c").mkdir()
    _write_jsonl(tmp_path / "c" / "a.jsonl", texts)
    out = prepare_data(_config([tmp_path / "c"], tmp_path / "p", val_fraction=0.01), progress=False)
    expected = (f"the validation split is empty ({len(texts)} documents, data.val_fraction=0.01): validation loss "
                "will not be reported; raise data.val_fraction or add documents")
    assert f"warning: {expected}\n" in capsys.readouterr().err
    m = read_manifest(out)
    assert m["complete"] and expected in m["warnings"]
    assert TokenShards(out, "val").num_tokens == 0 and TokenShards(out, "train").num_documents == len(texts)
    out0 = prepare_data(_config([tmp_path / "c"], tmp_path / "p0", val_fraction=0.0), progress=False)
    assert "validation split" not in capsys.readouterr().err
    assert not any("validation split" in w for w in read_manifest(out0)["warnings"])
    corpus, _ = _make_corpus(tmp_path / "corpus", n=60)
    out2 = prepare_data(_config([corpus], tmp_path / "p2"), progress=False)
    assert read_manifest(out2)["splits"]["val"]["tokens"] > 0
    assert "validation split" not in capsys.readouterr().err
    assert not any("validation split" in w for w in read_manifest(out2)["warnings"])


def test_bpe_smaller_than_the_vocabulary_asked_warns_and_is_recorded(tmp_path, capsys):
    """A corpus too small for ``vocab_size`` merges: the warning names the size reached and the size asked (printed
    even with progress=False) and is recorded in the manifest; a BPE that reaches the size asked does not warn."""
    (tmp_path / "c").mkdir()
    _write_jsonl(tmp_path / "c" / "a.jsonl", _texts(40, 9))
    out = prepare_data(_config([tmp_path / "c"], tmp_path / "p", vocab_size=8192), progress=False)
    m = read_manifest(out)
    size = m["tokenizer"]["size"]
    assert 258 <= size < 8192 and size == tokenizer_size(load_tokenizer(out / "tokenizer"))
    err = capsys.readouterr().err
    assert f"warning: the byte-level BPE reached only {size:,} of the 8,192 tokens asked" in err
    assert "too small" in err and "model.vocab_size" in err
    assert [w for w in m["warnings"] if "byte-level BPE" in w] == [err.split("warning: ", 1)[1].split("\n")[0]]
    out2 = prepare_data(_config([tmp_path / "c"], tmp_path / "p2", vocab_size=300), progress=False)
    assert read_manifest(out2)["tokenizer"]["size"] == 300
    assert "byte-level BPE" not in capsys.readouterr().err
    assert not any("byte-level BPE" in w for w in read_manifest(out2)["warnings"])


def _interrupted_then_resumed(tmp_path, monkeypatch, calls: int):
    """Prepare ``tmp_path/corpus`` into ``run`` with ``_encode`` failing after ``calls`` calls, check it stopped
    after some flushed shards, then resume; also prepare uninterrupted into ``ref``. Returns both directories."""
    corpus, docs = _make_corpus(tmp_path / "corpus", n=100, seed=7)
    config = _config([corpus], tmp_path / "run", shard_tokens=300, batch_documents=4)
    real_encode, count = shards_mod._encode, {"n": 0}

    def failing_encode(tokenizer, texts):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt("simulated interruption")
        return real_encode(tokenizer, texts)

    monkeypatch.setattr(shards_mod, "_encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(config, progress=False)
    monkeypatch.setattr(shards_mod, "_encode", real_encode)
    partial = read_manifest(tmp_path / "run")
    assert partial["complete"] is False and 0 < partial["documents_read"] < len(docs)
    assert len(partial["splits"]["train"]["shards"]) >= 1
    with pytest.raises(DataError, match="did not finish"):
        TokenShards(tmp_path / "run")
    prepare_data(config, progress=False)
    prepare_data(_config([corpus], tmp_path / "ref", shard_tokens=300, batch_documents=4), progress=False)
    return tmp_path / "run", tmp_path / "ref", len(docs)


def test_prepare_data_resumes_to_byte_identical_shards(tmp_path, monkeypatch):
    """After an interruption with some shards flushed, a second ``prepare_data`` finishes, and every shard file
    is byte-identical to an uninterrupted preparation."""
    run, ref, n_docs = _interrupted_then_resumed(tmp_path, monkeypatch, calls=8)
    m_run, m_ref = read_manifest(run), read_manifest(ref)
    assert m_run["complete"] and m_run["splits"] == m_ref["splits"] and m_run["tokenizer"] == m_ref["tokenizer"]
    assert m_run["documents_read"] == m_ref["documents_read"] == n_docs
    assert m_run["bytes_read"] == m_ref["bytes_read"]
    names = sorted(p.name for p in ref.iterdir() if p.suffix in (".bin", ".npy"))
    assert len(names) >= 4 and names == sorted(p.name for p in run.iterdir() if p.suffix in (".bin", ".npy"))
    for name in names:
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name
    assert _split_docs(TokenShards(run, "val")) == _split_docs(TokenShards(ref, "val"))


def test_prepare_data_resume_keeps_text_statistics(tmp_path, monkeypatch):
    """The text statistics of a resumed preparation equal those of an uninterrupted one."""
    run, ref, _ = _interrupted_then_resumed(tmp_path, monkeypatch, calls=8)
    assert read_manifest(run)["text"] == read_manifest(ref)["text"]


# ------------------------------------------------------------------------------------------------- damaged shards


def _copy(prepared, tmp_path: Path) -> Path:
    """A private copy of the shared prepared directory, to damage."""
    return Path(shutil.copytree(prepared[0], tmp_path / "prep"))


def _damage_message(path: Path, what: str) -> str:
    """A regex for the DataError naming ``path`` and saying ``what``, then what to do."""
    return (re.escape(f"{path} is {what}") + r".*" + re.escape(f"delete {path.parent} and prepare it again") +
            r".*helmlm prepare")


def _truncate(path: Path, drop: int) -> tuple[int, int]:
    """Cut the last ``drop`` bytes of ``path``; return its sizes ``(after, before)``."""
    data = path.read_bytes()
    path.write_bytes(data[:-drop])
    return len(data) - drop, len(data)


def _without_files(d: Path) -> None:
    """Make ``d`` look prepared before shards recorded their ``files`` (sizes and hashes)."""
    m = read_manifest(d)
    for split in m["splits"].values():
        for shard in split["shards"]:
            del shard["files"]
    (d / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")


def test_manifest_records_size_and_sha256_of_every_shard_file_and_an_intact_directory_verifies(prepared):
    """Each shard of the manifest records the size and sha256 of its .bin and .idx.npy, equal to the files';
    verify_shards accepts the intact directory (each split and both)."""
    out = prepared[0]
    m = read_manifest(out)
    for split in ("train", "val"):
        for shard in m["splits"][split]["shards"]:
            assert set(shard["files"]) == {"bin", "idx"}
            for kind, suffix in (("bin", ".bin"), ("idx", ".idx.npy")):
                data = (out / f"{shard['name']}{suffix}").read_bytes()
                assert shard["files"][kind] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            assert shard["files"]["bin"]["bytes"] == 2 * shard["tokens"]
    assert verify_shards(out) is None
    verify_shards(out, ["val"])
    with pytest.raises(DataError, match="unknown split 'test'"):
        verify_shards(out, ["test"])


@pytest.mark.parametrize("drop", [1, 2])
def test_truncated_bin_is_named_by_verify_shards_and_by_token_shards(prepared, tmp_path, drop):
    """A .bin cut short (by an odd byte count: a raw numpy ValueError before; by a whole token: fewer tokens) is a
    DataError naming the file, its size and the manifest's, from verify_shards and from TokenShards; the other
    split still loads."""
    d = _copy(prepared, tmp_path)
    path = d / "train-00001.bin"
    after, before = _truncate(path, drop)
    _both_refuse(d, "train", _damage_message(path, f"truncated: {after:,} bytes, the manifest says {before:,}"))
    verify_shards(d, ["val"])
    assert TokenShards(d, "val").num_documents == read_manifest(d)["splits"]["val"]["documents"]


def test_bin_with_one_byte_flipped_is_named_by_verify_shards(prepared, tmp_path):
    """A .bin of the right size with one byte changed is named as altered (its sha256); so is a grown one."""
    d = _copy(prepared, tmp_path)
    path = d / "train-00000.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=_damage_message(path, "altered: its sha256 differs from the manifest's")):
        verify_shards(d)
    verify_shards(d, ["val"])
    path.write_bytes(bytes(data) + b"\0\0")
    with pytest.raises(DataError, match=_damage_message(path, f"altered: {len(data) + 2:,} bytes, the manifest says "
                                                              f"{len(data):,}")):
        TokenShards(d, "train")


def test_an_altered_or_missing_tokenizer_is_named_by_verify_shards(prepared, tmp_path):
    """The tokenizer beside the shards must be the one that made them: the manifest records its files' sizes and
    sha256s; one merge rule dropped from tokenizer.json (text would tokenize differently) is named, and so are a
    change of the same size and a deleted file. A manifest from before the files were recorded is not checked for them."""
    d = _copy(prepared, tmp_path)
    recorded = read_manifest(d)["tokenizer"]["files"]
    assert "tokenizer.json" in recorded and all(
        recorded[p.name] == {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in (d / "tokenizer").iterdir())
    path = d / "tokenizer" / "tokenizer.json"
    original = path.read_bytes()
    spec = json.loads(original)
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    path.write_text(json.dumps(spec))
    again = re.escape(f"; delete {d} and prepare it again")
    with pytest.raises(DataError, match=re.escape(f"{path} is truncated: ") + r".*" + again):
        verify_shards(d)
    path.write_bytes(original)  # restored: verifies again
    verify_shards(d)
    i = original.index(b"merges")
    path.write_bytes(original[:i] + b"Merges" + original[i + 6:])  # same size, other bytes
    with pytest.raises(DataError, match=re.escape(f"{path} is altered: its sha256 differs") + r".*" + again):
        verify_shards(d)
    path.unlink()
    with pytest.raises(DataError, match=re.escape(f"{path} is missing") + r".*" + again):
        verify_shards(d)
    m = read_manifest(d)
    del m["tokenizer"]["files"]
    (d / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
    verify_shards(d)


def _both_refuse(d, split: str, message: str) -> None:
    """verify_shards and TokenShards both name the damage."""
    with pytest.raises(DataError, match=message):
        verify_shards(d)
    with pytest.raises(DataError, match=message):
        TokenShards(d, split)


def test_truncated_or_missing_index_is_named(prepared, tmp_path):
    """A truncated .idx.npy is named by verify_shards and TokenShards (not a raw numpy error); so is a missing
    file."""
    d = _copy(prepared, tmp_path)
    path = d / "val-00000.idx.npy"
    after, before = _truncate(path, 8)
    _both_refuse(d, "val", _damage_message(path, f"truncated: {after:,} bytes, the manifest says {before:,}"))
    path.unlink()
    with pytest.raises(DataError, match=_damage_message(path, "missing")):
        TokenShards(d, "val")


def test_manifest_without_file_records_still_loads_and_verifies_by_size(prepared, tmp_path):
    """A directory prepared before the manifest recorded ``files`` loads the same documents and verifies; a
    truncated .bin is still named (its size follows from the token count), and a truncated .idx.npy is a DataError
    naming it, not a raw numpy error."""
    out, _, _ = prepared
    d = _copy(prepared, tmp_path)
    _without_files(d)
    assert all("files" not in s for sp in read_manifest(d)["splits"].values() for s in sp["shards"])
    verify_shards(d)
    assert _split_docs(TokenShards(d, "train")) == _split_docs(TokenShards(out, "train"))
    path = d / "train-00002.bin"
    after, before = _truncate(path, 2)
    _both_refuse(d, "train", _damage_message(path, f"truncated: {after:,} bytes, the manifest says {before:,}"))
    index = d / "val-00000.idx.npy"
    _truncate(index, 8)
    for check in (lambda: verify_shards(d, ["val"]), lambda: TokenShards(d, "val")):
        with pytest.raises(DataError, match=re.escape(str(index)) + ".*prepare it again"):
            check()


# ------------------------------------------------------------------------------------------------------ packing


def test_split_documents_cuts_full_pieces_plus_tail():
    """Documents longer than seq_len become seq_len-token pieces plus a tail; nothing is dropped."""
    lengths = np.array([5, 10, 23, 1, 30])
    doc, offset, length = split_documents(lengths, 10)
    assert doc.tolist() == [0, 1, 2, 2, 2, 3, 4, 4, 4]
    assert offset.tolist() == [0, 0, 0, 10, 20, 0, 0, 10, 20]
    assert length.tolist() == [5, 10, 10, 10, 3, 1, 10, 10, 10]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, 500)
    doc, offset, length = split_documents(lengths, 17)
    assert length.max() <= 17 and length.min() >= 1
    assert np.array_equal(np.bincount(doc, weights=length, minlength=lengths.size), lengths)
    for d in (0, 7, 123):  # pieces of a document are contiguous and in order
        assert np.array_equal(offset[doc == d], np.arange(0, lengths[d], 17))


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_property(seed):
    """On random lengths: every item is assigned, no bin overflows, bins are numbered 0..B-1 and all used, any two
    bins together exceed the capacity (else the later one's first item would have fit), so B <= 2*ceil(sum/cap)."""
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(8, 300))
    lengths = rng.integers(1, capacity + 1, int(rng.integers(1, 2000)))
    if seed == 0:
        lengths[:5] = capacity  # exactly full bins
    assignment = best_fit_decreasing(lengths, capacity)
    assert assignment.shape == lengths.shape and assignment.min() >= 0
    n_bins = int(assignment.max()) + 1
    loads = np.bincount(assignment, weights=lengths, minlength=n_bins)
    assert (loads > 0).all() and loads.max() <= capacity and loads.sum() == lengths.sum()
    if n_bins >= 2:
        assert np.sort(loads)[:2].sum() > capacity
    assert n_bins <= 2 * math.ceil(lengths.sum() / capacity)
    assert best_fit_decreasing(np.array([], dtype=np.int64), 10).size == 0


@pytest.mark.parametrize("reset", [False, True])
def test_packed_rows_use_every_token_once(prepared, reset):
    """The real tokens of all rows, cut at piece boundaries, are exactly the seq_len-pieces of every document (as a
    multiset); document_ids count pieces, positions restart per piece iff ``reset_positions``; padding is masked."""
    out, _, _ = prepared
    seq_len = 48
    packed = PackedRows(out, "train", seq_len, reset_positions=reset)
    ts = packed.shards
    batch = packed.batch(np.arange(packed.num_rows))
    assert all(v.shape == (packed.num_rows, seq_len) and v.dtype == torch.int64 for v in batch.values())
    expected = Counter()
    for doc in _split_docs(ts):
        expected.update(tuple(doc[i:i + seq_len]) for i in range(0, len(doc), seq_len))
    got, n_pieces = Counter(), 0
    for b in range(packed.num_rows):
        mask = batch["attention_mask"][b]
        real = int(mask.sum())
        assert mask[:real].eq(1).all() and mask[real:].eq(0).all() and real > 0
        pieces = _row_pieces(batch, b)
        assert pieces == [(int(a), int(a + n)) for a, n in zip(
            np.cumsum(np.concatenate([[0], packed.piece_length[packed.row_ptr[b]:packed.row_ptr[b + 1]]]))[:-1],
            packed.piece_length[packed.row_ptr[b]:packed.row_ptr[b + 1]])]
        for j, (a, e) in enumerate(pieces):
            got[tuple(batch["input_ids"][b, a:e].tolist())] += 1
            assert batch["document_ids"][b, a:e].eq(j).all()
            want = torch.arange(e - a) if reset else torch.arange(a, e)
            assert torch.equal(batch["position_ids"][b, a:e], want)
        n_pieces += len(pieces)
        assert torch.equal(batch["position_ids"][b, real:], torch.arange(real, seq_len))
    assert got == expected
    assert sum(map(len, got.elements())) == read_manifest(out)["splits"]["train"]["tokens"] == packed.stats.tokens
    assert n_pieces == packed.stats.pieces and packed.stats.documents == ts.num_documents
    assert packed.stats.padding == int((batch["attention_mask"] == 0).sum())
    assert any(len(d) > seq_len for d in _split_docs(ts))  # long documents were really split
    assert 0.9 < packed.stats.efficiency <= 1.0


def test_packed_rows_reject_tiny_seq_len(prepared):
    """seq_len < 2 is a DataError; an empty RowStream too."""
    with pytest.raises(DataError, match="seq_len"):
        PackedRows(prepared[0], "train", 1)
    with pytest.raises(DataError, match="no rows"):
        RowStream(0, seed=0)


@pytest.fixture(scope="module")
def packed_model(prepared):
    """A one-layer HELM-D in fp64 (eval) over the prepared tokenizer, and packed rows with reset positions."""
    from helmlm.models.config import load_config
    from helmlm.models.modeling import HELMForCausalLM

    torch.manual_seed(0)
    config = load_config("helm_d_tiny", vocab_size=tokenizer_size(prepared[2]), num_hidden_layers=1)
    model = HELMForCausalLM(config).double().eval()
    packed = PackedRows(prepared[0], "train", 48, reset_positions=True)
    counts = np.diff(packed.row_ptr)
    padding = 48 - np.add.reduceat(packed.piece_length, packed.row_ptr[:-1])
    rows = [int(np.argmax(counts)), int(np.argmax(padding + 1000 * (counts >= 2)))]  # most pieces; padded, >= 2
    batch = packed.batch(rows)
    assert len(_row_pieces(batch, 0)) >= 3 and int(batch["attention_mask"][1].sum()) < 48
    return model, batch


def _forward(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: batch[k] for k in ("input_ids", "document_ids", "position_ids", "attention_mask")}).logits


def test_packed_pieces_have_the_logits_of_standalone_runs(packed_model):
    """No attention across piece boundaries or into padding: each piece's logits in a packed (padded) row equal
    the logits of that piece run alone at positions 0..len-1 (fp64, atol 1e-6)."""
    model, batch = packed_model
    logits = _forward(model, batch)
    assert logits.dtype == torch.float64
    for b in range(2):
        for a, e in _row_pieces(batch, b):
            with torch.no_grad():
                alone = model(batch["input_ids"][b:b + 1, a:e]).logits[0]
            torch.testing.assert_close(logits[b, a:e], alone, atol=1e-6, rtol=0)


def test_lm_targets_mask_piece_ends_and_padding(packed_model):
    """``lm_targets`` with padded document ids is -100 exactly at the last token of each piece and on padding;
    the number of real targets is real tokens minus pieces."""
    from helmlm.models.modeling import lm_targets, padded_document_ids

    _, batch = packed_model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = lm_targets(ids, padded_document_ids(batch["document_ids"], mask))
    assert targets.shape == (2, 47)
    for b in range(2):
        real, pieces = int(mask[b].sum()), _row_pieces(batch, b)
        ignored = {e - 1 for _, e in pieces} | set(range(real, 48))
        for i in range(47):
            if i in ignored:
                assert targets[b, i] == -100, (b, i)
            else:
                assert targets[b, i] == ids[b, i + 1], (b, i)
        assert int((targets[b] != -100).sum()) == real - len(pieces)


def test_changing_one_piece_leaves_other_pieces_untouched(packed_model):
    """Replacing the tokens of one piece changes neither the logits nor the per-token losses of the others
    (while its own logits do change)."""
    from helmlm.models.modeling import causal_lm_loss, lm_targets, padded_document_ids

    model, batch = packed_model
    pieces = _row_pieces(batch, 0)
    a, e = pieces[1]
    changed = {k: v.clone() for k, v in batch.items()}
    vocab = model.config.vocab_size
    changed["input_ids"][0, a:e] = (changed["input_ids"][0, a:e] + 1 + torch.arange(e - a)) % vocab
    assert not torch.equal(changed["input_ids"], batch["input_ids"])

    def per_token_loss(inputs, logits):
        targets = lm_targets(inputs["input_ids"], padded_document_ids(inputs["document_ids"], inputs["attention_mask"]))
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")

    before, after = _forward(model, batch), _forward(model, changed)
    loss_before, loss_after = per_token_loss(batch, before), per_token_loss(changed, after)
    assert not torch.allclose(before[0, a:e], after[0, a:e])
    keep = torch.ones(48, dtype=torch.bool)
    keep[a:e] = False
    torch.testing.assert_close(before[0, keep], after[0, keep], atol=1e-9, rtol=0)
    torch.testing.assert_close(before[1], after[1], atol=1e-9, rtol=0)
    torch.testing.assert_close(loss_before[0, keep[:-1]], loss_after[0, keep[:-1]], atol=1e-9, rtol=0)
    # the summed loss is the sum of the per-token terms (causal_lm_loss uses the same targets)
    labels_docs = padded_document_ids(batch["document_ids"], batch["attention_mask"])
    total = causal_lm_loss(before, batch["input_ids"], labels_docs, reduction="sum")
    torch.testing.assert_close(total, loss_before.sum(), atol=1e-9, rtol=1e-12)  # fp64 model: fp64 loss


# ------------------------------------------------------------------------------------------------------ row stream


def test_row_stream_is_deterministic_and_each_epoch_is_a_permutation():
    """Same seed -> same stream; another seed -> another order; every epoch visits every row exactly once;
    ``shuffle=False`` is the identity order."""
    n = 37
    a, b, c = RowStream(n, seed=1), RowStream(n, seed=1), RowStream(n, seed=2)
    rows = a.rows(0, 4 * n)
    assert np.array_equal(rows, b.rows(0, 4 * n))
    assert not np.array_equal(rows[:n], c.rows(0, n))
    epochs = rows.reshape(4, n)
    for e in range(4):
        assert np.array_equal(np.sort(epochs[e]), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert np.array_equal(a.rows(n - 3, 6), rows[n - 3:n + 3])  # across an epoch boundary, any access order
    assert np.array_equal(RowStream(n, seed=1, shuffle=False).rows(0, 2 * n), np.tile(np.arange(n), 2))


def test_row_stream_position_round_trips():
    """A stream rebuilt with ``position=k`` continues exactly like the original from k; epoch = position / rows."""
    a = RowStream(23, seed=5)
    for _ in range(7):
        a.global_batch(micro_batch=3, accumulation=2, world_size=1, rank=0)
    assert a.position == 42 and a.epoch == pytest.approx(42 / 23)
    b = RowStream(23, seed=5, position=a.position)
    for _ in range(10):
        xa = a.global_batch(micro_batch=3, accumulation=2, world_size=1, rank=0)
        xb = b.global_batch(micro_batch=3, accumulation=2, world_size=1, rank=0)
        assert all(np.array_equal(p, q) for p, q in zip(xa, xb))
    assert a.position == b.position


@pytest.mark.parametrize("accumulation", [1, 2])
def test_row_stream_ranks_partition_the_global_batch(accumulation):
    """For world_size 2, the two ranks' micro-batches of each step together are (as a multiset) the single-rank
    micro-batch of twice the size; positions advance identically."""
    n = 29
    single = RowStream(n, seed=3)
    ranks = [RowStream(n, seed=3) for _ in range(2)]
    for _ in range(12):  # several epochs
        whole = single.global_batch(micro_batch=4, accumulation=accumulation, world_size=1, rank=0)
        parts = [s.global_batch(micro_batch=2, accumulation=accumulation, world_size=2, rank=r)
                 for r, s in enumerate(ranks)]
        assert len(whole) == accumulation and all(len(p) == accumulation for p in parts)
        for m in range(accumulation):
            r0, r1 = parts[0][m], parts[1][m]
            assert len(r0) == len(r1) == 2
            assert Counter(r0.tolist()) + Counter(r1.tolist()) == Counter(whole[m].tolist())
        assert single.position == ranks[0].position == ranks[1].position


def test_hf_documents_streams_a_local_dataset_directory(tmp_path):
    """The Hugging Face source (``datasets.load_dataset(..., streaming=True)``) on a local dataset directory: the
    same documents, in order, as the local JSONL reader; a missing field is a DataError naming it."""
    from helmlm.data.sources import hf_documents

    texts = _texts(30, 7)
    (tmp_path / "ds").mkdir()
    _write_jsonl(tmp_path / "ds" / "train.jsonl", texts)
    stats = TextStats()
    assert list(hf_documents(str(tmp_path / "ds"), split="train", stats=stats)) == texts
    assert stats.documents == len(texts)
    with pytest.raises(DataError, match="no string field 'body'"):
        list(hf_documents(str(tmp_path / "ds"), split="train", text_field="body"))
