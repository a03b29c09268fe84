import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt.data.corpus import train_val_split


@given(st.text())
def test_byte_tokenizer_is_lossless_for_any_text(text):
    ids = fm.encode(text)
    assert ids.dtype == torch.int64 and (ids.numel() == 0 or int(ids.max()) < 256)
    assert fm.decode(ids) == text


def test_builtin_corpus_is_pythons_reference_docs():
    data = fm.load_corpus()
    assert 400_000 < len(data) < 2_000_000
    assert "The Python" in fm.decode(data[:200_000]) or "lambda" in fm.decode(data)


def test_corpus_from_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello ")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.txt").write_text("world")
    assert fm.decode(fm.load_corpus(tmp_path / "a.txt")) == "hello "
    assert fm.decode(fm.load_corpus(tmp_path)) == "hello \nworld"


def test_missing_or_empty_corpus_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="nope.txt"):
        fm.load_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt.* is empty"):
        fm.load_corpus(tmp_path / "empty.txt")


def test_split_is_deterministic_and_disjoint():
    data = torch.arange(1000)
    train, val = train_val_split(data, 0.1)
    assert len(train) == 900 and torch.equal(torch.cat([train, val]), data)


def test_sample_batch_is_a_pure_function_of_seed_and_index():
    data = fm.load_corpus()
    a = fm.sample_batch(data, 4, 32, seed=1, index=7)
    b = fm.sample_batch(data, 4, 32, seed=1, index=7)
    c = fm.sample_batch(data, 4, 32, seed=1, index=8)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert torch.equal(a.tokens[:, 1:], a.targets[:, :-1])


@given(st.integers(1, 9), st.integers(1, 9))
def test_microbatches_partition_the_rows_even_when_k_does_not_divide(B, k):
    batch = fm.pad_sequences([[i, i + 1, i + 2][: 2 + i % 2] for i in range(B)])
    if k > B:
        with pytest.raises(ValueError, match="between 1 and the batch size"):
            fm.split_microbatches(batch, k)
        return
    parts = fm.split_microbatches(batch, k)
    assert len(parts) == k and max(p.size for p in parts) - min(p.size for p in parts) <= 1
    assert torch.equal(torch.cat([p.tokens for p in parts]), batch.tokens)
    assert torch.equal(torch.cat([p.mask for p in parts]), batch.mask)


def test_pad_and_pack_mask_what_is_not_real():
    b = fm.pad_sequences([[1, 2, 3, 4], [5, 6]])
    assert b.targets.tolist() == [[2, 3, 4], [6, -100, -100]]
    assert b.attention_mask.tolist() == [[True, True, True], [True, False, False]]
    p = fm.pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4)
    assert p.segment_ids.tolist() == [[0, 0, 1, -1], [2, 2, 2, -1]]
    assert p.targets.tolist() == [[2, 3, 5, -100], [7, 8, 9, -100]]
