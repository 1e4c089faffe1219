"""The data module: readers for each format, packing, calibration sampling, clear errors."""

import gzip
import json

import pytest

from minitron.data import DataError, calibration_batch, iter_texts, pack, packed_sequences, read_records, tokenize_stream

from conftest import shared_data


def _write(path, rows):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def test_formats_and_split_selection(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    _write(d / "c_train.jsonl.gz", [{"text": "alpha beta"}, {"text": "gamma"}])
    _write(d / "c_validation.jsonl", [{"text": "delta"}])
    (tmp_path / "t.txt").write_text("one doc\n\nsecond doc\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "x.parquet")
    assert list(iter_texts(d)) == ["alpha beta", "gamma"]
    assert list(iter_texts(d, "validation")) == ["delta"]
    assert list(iter_texts(tmp_path / "t.txt")) == ["one doc", "second doc\n"]
    assert list(iter_texts(tmp_path / "x.parquet")) == ["p1", "p2"]


def test_malformed_row_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        list(iter_texts(f))
    f.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: row has no string field 'text'"):
        list(iter_texts(f))
    with pytest.raises(DataError, match="not found"):
        list(read_records(tmp_path / "missing.jsonl"))


def test_pack_has_document_boundaries(tiny_tokenizer, tmp_path):
    f = tmp_path / "c.jsonl"
    _write(f, [{"text": "The color of Mirel is red."}] * 20)
    stream = tokenize_stream(iter_texts(f), tiny_tokenizer)
    assert stream[0] == tiny_tokenizer.bos_token_id
    assert (stream == tiny_tokenizer.eos_token_id).sum() == 20
    rows = packed_sequences(f, tiny_tokenizer, 16)
    assert rows.shape[1] == 16 and rows.numel() <= stream.numel()
    with pytest.raises(DataError, match="not enough"):
        pack(stream[:5], 16)


def test_calibration_is_reproducible(tiny_tokenizer, tmp_path):
    f = tmp_path / "c.jsonl"
    _write(f, [{"text": f"Quen has {i} foxes and lives in Oslo."} for i in range(50)])
    a = calibration_batch(f, tiny_tokenizer, 6, 12, seed=1)
    b = calibration_batch(f, tiny_tokenizer, 6, 12, seed=1)
    c = calibration_batch(f, tiny_tokenizer, 6, 12, seed=2)
    assert a.shape == (6, 12) and (a == b).all() and not (a == c).all()


def test_gutenberg_calibration(tiny_tokenizer):
    src = shared_data("lm", "gutenberg")
    batch = calibration_batch(src, tiny_tokenizer, 4, 64, seed=0)
    assert batch.shape == (4, 64)
