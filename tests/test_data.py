"""Specifications of forge_ds.data: sources, split, tokenizer, prepared files, windows and the global batch order."""

import os
import tempfile

# Before datasets is imported: never touch the network, and keep the test's arrow caches out of the user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="forge_ds_test_hf_"))

import json
import math
import pickle
import random
import sys

import datasets
import numpy as np
import pytest
import tokenizers
import torch
from pydoc_data.topics import topics

from forge_ds import data, prepare, sources
from forge_ds.errors import ForgeError

VOCAB = 2048


@pytest.fixture(scope="module")
def pydoc_split():
    docs = prepare.load_documents("builtin:pydoc")
    return prepare.split_documents(docs, 0.1, 0)


@pytest.fixture(scope="module")
def tokenizer(pydoc_split):
    return prepare.train_tokenizer(pydoc_split[0], VOCAB)


@pytest.fixture(scope="module")
def tokenizer_file(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def prepared_pydoc(tokenizer_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    return prepare.prepare("builtin:pydoc", vocab_size=VOCAB, tokenizer_path=str(tokenizer_file), root=str(root),
                        show_progress=False)


def split_stream(bin_path):
    """Token stream → list of per-document id lists (without the <bos>/<eos> wrappers)."""
    ids = np.fromfile(bin_path, dtype=np.uint16).tolist()
    docs, cur = [], None
    for t in ids:
        if t == 2:
            assert cur is None, "nested <bos>"
            cur = []
        elif t == 3:
            docs.append(cur)
            cur = None
        else:
            cur.append(t)
    assert cur is None, "stream does not end with <eos>"
    return docs


# ------------------------------------------------------------------------------------------------ sources / split


def test_pydoc_documents_are_the_shipped_3_11_7_topics_in_sorted_key_order():
    docs = prepare.load_documents("builtin:pydoc")
    shipped = sources.pydoc_topics()
    assert len(docs) == 79 and docs == [shipped[k] for k in sorted(shipped)]
    assert docs[0].startswith("The \"assert\" statement")  # topic "assert", first in key order
    if sys.version_info[:3] == (3, 11, 7):  # the file is that interpreter's own pydoc_data, unchanged
        assert shipped == topics


def test_split_is_random_0_shuffle_with_floor_fraction_held_out(pydoc_split):
    train, val = pydoc_split
    shipped = sources.pydoc_topics()
    expected = [shipped[k] for k in sorted(shipped)]
    random.Random(0).shuffle(expected)
    n_val = max(1, math.floor(len(shipped) * 0.1))
    assert n_val == 7
    assert val == expected[:n_val] and train == expected[n_val:]


def test_split_needs_two_documents_and_holds_out_at_least_one():
    with pytest.raises(ForgeError, match="at least 2"):
        prepare.split_documents(["only"], 0.1, 0)
    train, val = prepare.split_documents(["a", "b", "c"], 0.01, 0)
    assert len(val) == 1 and len(train) == 2


def test_pydoc_identity_names_the_shipped_corpus_not_the_interpreter():
    ident = prepare.source_identity("builtin:pydoc", "text", 0, None, VOCAB, 0.1, 0, None)
    assert ident["corpus"] == "pydoc_topics-3.11.7.json.gz" and "python" not in ident


def test_txt_file_yields_one_document_per_paragraph(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first para\nline two\n\nsecond para\n\n\n   \n\nthird\n")
    docs = prepare.load_documents(str(path))
    assert [d.strip() for d in docs] == ["first para\nline two", "second para", "third"]


def test_txt_dir_yields_one_document_per_file_sorted_by_name(tmp_path):
    for name, text in [("b.txt", "bee\n\nstill bee"), ("a.txt", "ay"), ("c.md", "ignored")]:
        (tmp_path / name).write_text(text)
    assert prepare.load_documents(str(tmp_path)) == ["ay", "bee\n\nstill bee"]


def test_jsonl_reads_text_field_and_filters(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"body": "short"}, {"body": "a longer document"}, {"body": "another long one"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert prepare.load_documents(str(path), text_field="body") == [r["body"] for r in rows]
    assert prepare.load_documents(str(path), text_field="body", min_article_length=6) == [r["body"] for r in rows[1:]]
    assert prepare.load_documents(str(path), text_field="body", max_articles=2) == [r["body"] for r in rows[:2]]


def test_jsonl_missing_field_names_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"other": "c"}\n')
    with pytest.raises(ForgeError, match=r"line 4 .*'text'") as err:
        prepare.load_documents(str(path))
    assert "\n" not in str(err.value)


def test_save_to_disk_dir_and_datasetdict_use_train(tmp_path):
    datasets.Dataset.from_dict({"text": ["x one", "x two"]}).save_to_disk(str(tmp_path / "ds"))
    assert prepare.load_documents(str(tmp_path / "ds")) == ["x one", "x two"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
                          "test": datasets.Dataset.from_dict({"text": ["no"]})}).save_to_disk(str(tmp_path / "dd"))
    assert prepare.load_documents(str(tmp_path / "dd")) == ["t1", "t2"]


def test_user_mistakes_raise_one_line_forge_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "shorts.jsonl").write_text('{"text": "ab"}\n')
    cases = [
        (str(tmp_path / "missing.txt"), {}, "does not exist"),
        (str(tmp_path / "empty.txt"), {}, "no documents"),
        (str(tmp_path / "shorts.jsonl"), {"min_article_length": 10}, "no documents"),
        ("hf:surely-not-a-cached-dataset-xyz", {}, "could not load hf:surely-not-a-cached-dataset-xyz"),
        ("builtin:nope", {}, "builtin:pydoc"),
    ]
    for source, kwargs, needle in cases:
        with pytest.raises(ForgeError, match=needle) as err:
            prepare.load_documents(source, **kwargs)
        assert "\n" not in str(err.value), source


@pytest.mark.parametrize("kind", ["txt", "txt_dir", "jsonl"])
def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, kind):
    good, bad = "all fine here", b"caf\xe9 latin-1 bytes"
    if kind == "txt":
        source = tmp_path / "c.txt"
        source.write_bytes(good.encode() + b"\n\n" + bad + b"\n")
    elif kind == "txt_dir":
        source = tmp_path / "d"
        source.mkdir()
        (source / "1.txt").write_text(good)
        (source / "2.txt").write_bytes(bad)
    else:
        source = tmp_path / "c.jsonl"
        source.write_bytes(b'{"text": "' + good.encode() + b'"}\n{"text": "' + bad + b'"}\n')
    docs = prepare.load_documents(str(source))
    assert [d.strip() for d in docs] == [good, "caf\ufffd latin-1 bytes"]
    assert docs.non_utf8_documents == 1


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_specials_and_bos_eos_wrapping(tokenizer):
    assert [tokenizer.token_to_id(t) for t in data.SPECIAL_TOKENS] == [0, 1, 2, 3]
    ids = tokenizer.encode("hello world").ids
    assert ids[0] == 2 and ids[-1] == 3 and len(ids) > 2
    assert tokenizer.get_vocab_size() <= VOCAB


@pytest.mark.parametrize("text", ["def f(x):\n    return x  # ascii", "héllo wörld ✓ 日本語 🙂 \u0000"])
def test_tokenizer_round_trips_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_tokenizer_json_reloads_with_from_file(tokenizer, tokenizer_file):
    again = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    text = "The with statement"
    assert again.encode(text).ids == tokenizer.encode(text).ids
    assert prepare.load_tokenizer(str(tokenizer_file), VOCAB).get_vocab_size() == tokenizer.get_vocab_size()


def test_load_tokenizer_rejects_too_big_vocab_and_wrong_specials(tokenizer_file, tmp_path):
    with pytest.raises(ForgeError, match="tokenizer.json"):
        prepare.load_tokenizer(str(tokenizer_file), 300)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.add_special_tokens(["<unk>", "<pad>", "<bos>", "<eos>"])  # <pad> and <unk> swapped
    bad = tmp_path / "bad.json"
    tok.save(str(bad))
    with pytest.raises(ForgeError, match="bad.json"):
        prepare.load_tokenizer(str(bad), VOCAB)


def test_train_tokenizer_rejects_vocab_that_cannot_hold_the_byte_alphabet():
    with pytest.raises(ForgeError, match="vocab_size=100"):
        prepare.train_tokenizer(["abc abc"], 100)


# ------------------------------------------------------------------------------------------------ prepare


def test_prepared_bins_decode_back_to_the_split_documents(prepared_pydoc, pydoc_split, tokenizer):
    train, val = pydoc_split
    for name, docs in [("train.bin", train), ("val.bin", val)]:
        decoded = [tokenizer.decode(ids) for ids in split_stream(prepared_pydoc / name)]
        assert decoded == docs, name
    meta = data.read_meta(prepared_pydoc)
    assert meta["n_documents"] == {"train": len(train), "val": len(val)}
    assert meta["train_tokens"] == os.path.getsize(prepared_pydoc / "train.bin") // 2
    assert meta["non_utf8_documents"] == 0 and meta["vocab_learned"] == tokenizer.get_vocab_size()


def test_literal_special_strings_in_text_are_not_document_boundaries(tmp_path, tokenizer_file, tokenizer):
    path = tmp_path / "c.txt"
    path.write_text("first doc mentions <eos> and <pad>\n\nsecond doc\n\nthird doc\n")
    out = prepare.prepare(str(path), vocab_size=VOCAB, tokenizer_path=str(tokenizer_file), val_fraction=0.3,
                       root=str(tmp_path / "p"), show_progress=False)
    docs = [tokenizer.decode(ids) for b in ("train.bin", "val.bin") for ids in split_stream(out / b)]
    assert sorted(d.strip() for d in docs) == ["first doc mentions <eos> and <pad>", "second doc", "third doc"]


def test_prepare_trains_on_train_docs_reuses_complete_dir_and_keys_on_settings(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(f"document number {i} says hello to the world {i % 7}" for i in range(40)))
    kw = dict(root=str(tmp_path / "p"), show_progress=False)
    first = prepare.prepare(str(path), vocab_size=300, **kw)
    assert first.parent == tmp_path / "p"
    assert first.name == prepare.prepared_key(prepare.source_identity(str(path), "text", 0, None, 300, 0.1, 0, None))
    assert np.fromfile(first / "train.bin", dtype=np.uint16).max() < 300
    stamps = {f: (first / f).stat().st_mtime_ns for f in ("train.bin", "val.bin", "tokenizer.json", "meta.json")}
    assert prepare.prepare(str(path), vocab_size=300, **kw) == first
    assert stamps == {f: (first / f).stat().st_mtime_ns for f in stamps}
    assert prepare.prepare(str(path), vocab_size=320, **kw) != first


def test_incomplete_dir_is_prepared_again(tmp_path, tokenizer_file):
    path = tmp_path / "c.txt"
    path.write_text("one doc\n\ntwo doc\n")
    out = tmp_path / "explicit"
    out.mkdir()
    (out / "train.bin").write_bytes(b"junk")  # a crash before meta.json
    prepare.prepare(str(path), vocab_size=VOCAB, tokenizer_path=str(tokenizer_file), prepared_dir=str(out),
                 show_progress=False)
    assert data.read_meta(out)["train_tokens"] * 2 == (out / "train.bin").stat().st_size


def test_explicit_prepared_dir_from_other_settings_is_refused(tmp_path, tokenizer_file):
    path = tmp_path / "c.txt"
    path.write_text("one doc\n\ntwo doc\n")
    kw = dict(tokenizer_path=str(tokenizer_file), prepared_dir=str(tmp_path / "x"), show_progress=False)
    prepare.prepare(str(path), vocab_size=VOCAB, **kw)
    with pytest.raises(ForgeError, match="different data or settings"):
        prepare.prepare(str(path), vocab_size=VOCAB, split_seed=1, **kw)


def test_read_meta_rejects_a_swapped_tokenizer(tmp_path, tokenizer_file):
    path = tmp_path / "c.txt"
    path.write_text("one doc\n\ntwo doc\n")
    out = prepare.prepare(str(path), vocab_size=VOCAB, tokenizer_path=str(tokenizer_file), root=str(tmp_path / "p"),
                       show_progress=False)
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text() + " ")
    with pytest.raises(ForgeError, match="tokenizer_sha256"):
        data.read_meta(out)
    with pytest.raises(ForgeError, match="no meta.json"):
        data.read_meta(tmp_path)


def test_check_fits_names_the_token_count(prepared_pydoc):
    data.check_fits(prepared_pydoc, 64)
    val_tokens = data.read_meta(prepared_pydoc)["val_tokens"]
    with pytest.raises(ForgeError, match=rf"has {val_tokens} tokens.*max_seq_len\+1={val_tokens + 1}"):
        data.check_fits(prepared_pydoc, val_tokens)


# ------------------------------------------------------------------------------------------------ windows


def test_token_windows_stride_shift_and_memmap(tmp_path):
    stream = np.arange(23, dtype=np.uint16)
    stream.tofile(tmp_path / "t.bin")
    ds = data.TokenWindows(tmp_path / "t.bin", 5)
    assert isinstance(ds.tokens, np.memmap)
    assert len(ds) == (23 - 1) // 5 == 4  # tokens 21, 22 form a partial window: dropped
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64
        assert x.tolist() == list(range(5 * i, 5 * i + 5))
        assert y.tolist() == list(range(5 * i + 1, 5 * i + 6))
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ForgeError, match="fewer than one window"):
        data.TokenWindows(tmp_path / "t.bin", 23)  # 23 tokens < 24


def test_token_windows_pickle_reopens_the_memmap(tmp_path):
    np.arange(11, dtype=np.uint16).tofile(tmp_path / "t.bin")
    ds = pickle.loads(pickle.dumps(data.TokenWindows(tmp_path / "t.bin", 5)))
    assert isinstance(ds.tokens, np.memmap) and ds[1][1].tolist() == [6, 7, 8, 9, 10]


# ------------------------------------------------------------------------------------------------ batch order


def test_epoch_permutation_uses_each_sample_at_most_once():
    s = data.GlobalBatchSampler(103, micro_batch=2, grad_accum=3, world_size=2, seed=5)
    assert s.global_batch == 12 and s.steps_per_epoch == 8
    for epoch in range(2):
        used = [i for step in range(epoch * 8, epoch * 8 + 8) for i in s.step_indices(step)]
        assert len(used) == len(set(used)) == 96 and all(0 <= i < 103 for i in used)


def test_same_global_samples_per_step_across_world_sizes():
    two_ranks = data.GlobalBatchSampler(50, micro_batch=4, grad_accum=1, world_size=2, seed=1)
    one_rank = data.GlobalBatchSampler(50, micro_batch=4, grad_accum=2, world_size=1, seed=1)
    for step in range(13):  # crosses two epoch boundaries (6 steps per epoch)
        a = sorted(i for r in range(2) for i in two_ranks.micro_indices(step, r, 0))
        b = sorted(i for m in range(2) for i in one_rank.micro_indices(step, 0, m))
        assert a == b == sorted(two_ranks.step_indices(step))


def test_micro_indices_partition_the_step():
    s = data.GlobalBatchSampler(100, micro_batch=3, grad_accum=2, world_size=4, seed=0)
    parts = [s.micro_indices(7, r, m) for m in range(2) for r in range(4)]
    assert all(len(p) == 3 for p in parts)
    assert [i for p in parts for i in p] == s.step_indices(7)


def test_order_is_deterministic_by_seed_and_differs_between_epochs():
    make = lambda seed: data.GlobalBatchSampler(64, 4, 2, 2, seed)  # noqa: E731
    a, b = make(3), make(3)
    assert [a.step_indices(k) for k in range(8)] == [b.step_indices(k) for k in range(8)]
    assert a.step_indices(0) != make(4).step_indices(0)
    assert a.step_indices(0) != a.step_indices(a.steps_per_epoch)  # epoch 1 starts differently
    expected = torch.randperm(64, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1))[:16].tolist()
    assert a.step_indices(a.steps_per_epoch) == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_micro_batches_are_the_samplers_in_loop_order_from_any_step(tmp_path, workers):
    np.arange(5 * 40 + 1, dtype=np.uint16).tofile(tmp_path / "t.bin")
    windows = data.TokenWindows(tmp_path / "t.bin", 5)
    s = data.GlobalBatchSampler(len(windows), micro_batch=3, grad_accum=2, world_size=2, seed=7)
    first, end = 4, s.steps_per_epoch + 2  # a resumed run's range, across an epoch boundary
    got = list(data.micro_batches(windows, s, 1, first, end, num_workers=workers, pin_memory=False))
    assert len(got) == (end - first) * 2
    for k, (x, y) in enumerate(got):
        step, micro = divmod(first * 2 + k, 2)
        want = s.micro_indices(step, 1, micro)
        assert x[:, 0].tolist() == [5 * i for i in want] and torch.equal(y[:, :-1], x[:, 1:])


def test_too_few_samples_for_one_global_batch_is_a_forge_error():
    with pytest.raises(ForgeError, match="fewer than one global batch of 16"):
        data.GlobalBatchSampler(15, 4, 2, 2, 0)


# ------------------------------------------------------------------------------------------------ entropy


def test_unigram_entropy_matches_hand_computation(tmp_path):
    np.array([7, 7, 7, 7, 9, 9, 1, 1], dtype=np.uint16).tofile(tmp_path / "t.bin")  # p = 1/2, 1/4, 1/4
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # = 1.5 ln 2
    assert data.unigram_entropy(tmp_path / "t.bin") == pytest.approx(expected, rel=1e-12)
