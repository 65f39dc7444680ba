"""Records -> documents -> shards: layouts, chat loss masks, determinism, atomic writes, and every error message."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from megannm.toy import world as toy
from megannm.data.image_tokenizer import PatchVQ
from megannm.cli.data import preprocess as preprocess_main
from megannm.data.preprocess import preprocess
from megannm.data.shards import ShardDataset, ShardError, ShardWriter, caption_length, write_dataset
from megannm.data.text_tokenizer import train_text_tokenizer
from megannm.data.tokenize import RecordError, Tokenizers, decode_tokens, encode_record
from megannm.vocab import Vocab, VocabMismatchError


# ---------------------------------------------------------------------------------------------------------------------
# fixtures: a real tokenizer bundle over a small toy world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    toy.write_toy_dataset(root / "raw", n_train=48, n_valid=4, seed=0)
    rng = np.random.default_rng(0)
    texts = [toy.caption(a, rng) for a in toy.sample_attrs(400, rng, "all")]
    text_dir = train_text_tokenizer(texts, root / "build" / "text", vocab_size=300)
    _, images = toy.every_image()
    PatchVQ.train(images, codebook_size=1024).save(root / "build" / "vq.npz")
    Tokenizers.build(text_dir, root / "build" / "vq.npz").save(root / "tok")
    return {"root": root, "raw": root / "raw", "tok_dir": root / "tok", "tok": Tokenizers.load(root / "tok")}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _png(path: Path, img: np.ndarray) -> str:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path.name


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def small_vocab():
    return Vocab(text_size=100, image_codes=50)


# ---------------------------------------------------------------------------------------------------------------------
# tokenize: layouts


def test_interleaved_layout_and_decode(world):
    tok, raw = world["tok"], world["raw"]
    v = tok.vocab
    rec = _records(raw / "train.jsonl")[0]
    text = next(p["text"] for p in rec["parts"] if "text" in p)
    img_path = next(p["image"] for p in rec["parts"] if "image" in p)
    from PIL import Image
    img = np.asarray(Image.open(raw / img_path).convert("RGB"))
    ids, mask = encode_record(rec, tok, raw, "train.jsonl:1")
    assert mask is None  # pretraining: every token trained
    text_ids = tok.text.encode(text, add_special_tokens=False)
    image_ids = v.image_ids(tok.image.encode(img[None])[0]).tolist()
    body = {"text": text_ids, "image": [v.boi_id, *image_ids, v.eoi_id]}
    expected = [v.bos_id] + [t for p in rec["parts"] for t in body["text" if "text" in p else "image"]] + [v.eos_id]
    assert ids.tolist() == expected
    assert len(image_ids) == v.image_grid == 64
    parts = decode_tokens(ids, tok)
    kinds = ["text" if "text" in p else "image" for p in rec["parts"]]
    assert [("text" if "text" in p else "image") for p in parts] == kinds
    assert next(p["text"] for p in parts if "text" in p) == text
    assert np.array_equal(next(p["image"] for p in parts if "image" in p), img)  # PatchVQ is lossless on toy


def test_decode_marks_incomplete_images_and_roles(world):
    tok = world["tok"]
    v = tok.vocab
    ids = [v.bos_id, v.special("<|user|>"), *tok.text.encode("hi", add_special_tokens=False), v.special("<|end|>"),
           v.boi_id, *v.image_ids(np.arange(5)).tolist()]
    parts = decode_tokens(ids, tok)
    assert parts[0] == {"special": "<|user|>"} and parts[1] == {"text": "hi"} and parts[2] == {"special": "<|end|>"}
    assert parts[3]["image"] is None and parts[3]["codes"].tolist() == [0, 1, 2, 3, 4]


def test_chat_loss_mask_on_hand_written_conversation(world, tmp_path):
    tok = world["tok"]
    v = tok.vocab
    _, img, _ = toy.make_examples(1, seed=3)[0]
    name = _png(tmp_path / "pic.png", img)
    rec = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": [{"type": "text", "text": "and now draw it"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "here:"}, {"type": "image", "image": name}]},
    ]}
    ids, mask = encode_record(rec, tok, tmp_path, "chat.jsonl:1")
    T = lambda s: tok.text.encode(s, add_special_tokens=False)  # noqa: E731
    codes = v.image_ids(tok.image.encode(img[None])[0]).tolist()
    image = [v.boi_id, *codes, v.eoi_id]
    sp = v.special
    # (tokens, trained) by hand: only assistant content and the assistant's <|end|> are trained
    layout = [([v.bos_id], 0),
              ([sp("<|system|>")], 0), (T("be brief"), 0), ([sp("<|end|>")], 0),
              ([sp("<|user|>")], 0), (image, 0), (T("what is it?"), 0), ([sp("<|end|>")], 0),
              ([sp("<|assistant|>")], 0), (T("a red circle"), 1), ([sp("<|end|>")], 1),
              ([sp("<|user|>")], 0), (T("and now draw it"), 0), ([sp("<|end|>")], 0),
              ([sp("<|assistant|>")], 0), (T("here:"), 1), (image, 1), ([sp("<|end|>")], 1),
              ([v.eos_id], 0)]
    assert ids.tolist() == [t for toks, _ in layout for t in toks]
    assert mask.dtype == np.uint8 and mask.tolist() == [m for toks, m in layout for _ in toks]
    assert mask.sum() == len(T("a red circle")) + len(T("here:")) + len(image) + 2


@pytest.mark.parametrize("record, message", [
    ({"parts": [{"text": "a cat"}, {"image": "missing.png"}]}, "image file not found"),
    ({"parts": [{"image": "ok.png"}]}, "record has no text"),
    ({"parts": [{"text": ""}]}, "record has no text"),
    ({"parts": [{"text": "x"}, {"video": "a.mp4"}]}, "unknown part type"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}]},
     "empty assistant turn"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "unknown part type 'audio'"),
    ({"text": "hello"}, "neither 'parts' nor 'messages'"),
])
def test_record_errors_are_one_line_naming_file_and_line(world, tmp_path, record, message):
    _png(tmp_path / "ok.png", toy.make_examples(1, seed=0)[0][1])
    with pytest.raises(RecordError) as e:
        encode_record(record, world["tok"], tmp_path, "train.jsonl:17")
    text = str(e.value)
    assert text.startswith("train.jsonl:17: ") and message in text and "\n" not in text


def test_tokenizers_bundle_mismatch_names_the_file(world, tmp_path):
    bundle = tmp_path / "tok"
    shutil.copytree(world["tok_dir"], bundle)
    assert Tokenizers.load(bundle).vocab.fingerprint == world["tok"].vocab.fingerprint
    # any change to the text tokenizer's bytes changes its digest, hence the fingerprint it should have
    tj = bundle / "text" / "tokenizer.json"
    tj.write_text(tj.read_text() + "\n")
    with pytest.raises(VocabMismatchError, match=r"tok/vocab\.json: fingerprint \w+ does not match"):
        Tokenizers.load(bundle)


# ---------------------------------------------------------------------------------------------------------------------
# preprocess


def test_preprocess_round_trip_and_manifest(world, tmp_path):
    tok, raw = world["tok"], world["raw"]
    m = preprocess([raw / "train.jsonl"], tmp_path / "sh", world["tok_dir"], workers=1, progress=False)
    ds = ShardDataset(tmp_path / "sh", tok.vocab)
    recs = _records(raw / "train.jsonl")
    assert len(ds) == m["num_docs"] == len(recs) == 48
    for i, r in enumerate(recs):
        ids, _ = encode_record(r, tok, raw, f"train.jsonl:{i + 1}")
        got, mask = ds.get(i)
        assert mask is None and np.array_equal(got, ids)
    assert m["num_tokens"] == int(ds.doc_lengths.sum())
    assert m["vocab_fingerprint"] == tok.vocab.fingerprint
    assert Vocab.load(tmp_path / "sh" / "vocab.json").fingerprint == tok.vocab.fingerprint
    assert m["sources"] == [{"file": "train.jsonl", "records": 48}]
    assert ds.verify(deep=True)["docs"] == 48


def test_preprocess_same_bytes_whatever_the_workers(world, tmp_path):
    args = ([world["raw"] / "train.jsonl", world["raw"] / "valid_seen.jsonl"], world["tok_dir"])
    preprocess(args[0], tmp_path / "w1", args[1], workers=1, progress=False, chunk_records=5)
    preprocess(args[0], tmp_path / "w2", args[1], workers=2, progress=False, chunk_records=5)
    preprocess(args[0], tmp_path / "w1b", args[1], workers=1, progress=False, chunk_records=5, docs_per_shard=1000)
    d1 = _digest(tmp_path / "w1")
    assert d1 == _digest(tmp_path / "w2") == _digest(tmp_path / "w1b")
    assert len(ShardDataset(tmp_path / "w1")) == 52


def test_preprocess_error_aborts_and_leaves_nothing(world, tmp_path):
    lines = (world["raw"] / "train.jsonl").read_text().splitlines()[:6]
    bad = json.loads(lines[4])
    bad["parts"] = [p for p in bad["parts"] if "image" in p]  # line 5: an image without any text
    lines[4] = json.dumps(bad)
    src = world["raw"] / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(RecordError, match=r"^bad\.jsonl:5: record has no text"):
        preprocess([src], out, world["tok_dir"], workers=2, progress=False, chunk_records=2)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial or temporary folder either
    src.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(RecordError, match=r"^bad\.jsonl:2: not valid JSON"):
        preprocess([src], out, world["tok_dir"], workers=1, progress=False)
    assert not out.exists()


def test_preprocess_cli(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        preprocess_main(["--help"])
    assert e.value.code == 0 and "--tokenizers" in capsys.readouterr().out
    argv = ["--input", str(world["raw"] / "valid_seen.jsonl"), "--tokenizers", str(world["tok_dir"]), "--workers", "1"]
    assert preprocess_main(argv + ["--output", str(tmp_path / "ok")]) == 0
    assert "4 documents" in capsys.readouterr().out
    assert preprocess_main(argv + ["--output", str(tmp_path / "ok")]) == 2  # exists: refused, not overwritten
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err
    bad = ["--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "x"), "--tokenizers",
           str(world["tok_dir"])]
    assert preprocess_main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.jsonl: input file not found" in err


# ---------------------------------------------------------------------------------------------------------------------
# shards: format, masks, determinism, atomicity


def _docs(vocab: Vocab, n: int, seed: int = 0, max_len: int = 300):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        body = rng.integers(0, vocab.text_size, size=int(rng.integers(1, max_len)))
        out.append(np.concatenate([[vocab.bos_id], body, [vocab.eos_id]]))
    return out


def test_shards_round_trip_many_frames_and_shards_with_masks(small_vocab, tmp_path):
    v = small_vocab
    docs = _docs(v, 300)
    docs.append(np.concatenate([[v.bos_id], np.arange(5000) % v.text_size, [v.eos_id]]))  # bigger than a frame
    rng = np.random.default_rng(1)
    masks = [rng.integers(0, 2, len(d)).astype(np.uint8) if i % 3 == 0 else None for i, d in enumerate(docs)]
    m = write_dataset(tmp_path / "ds", list(zip(docs, masks)), v, docs_per_shard=70, frame_bytes=2048)
    assert len(m["shards"]) == 5 and sum(s["frames"] for s in m["shards"]) > 20
    assert m["num_masked_docs"] == sum(x is not None for x in masks)
    ds = ShardDataset(tmp_path / "ds", v)
    assert len(ds) == len(docs) and ds.doc_lengths.tolist() == [len(d) for d in docs]
    for i in np.random.default_rng(2).permutation(len(docs)):  # random access across frames and shards
        t, mk = ds.get(int(i))
        assert t.dtype == np.uint16 and np.array_equal(t, docs[i])
        assert (mk is None) == (masks[i] is None)
        if mk is not None:
            assert np.array_equal(mk, masks[i])
    with pytest.raises(IndexError):
        ds.get(len(docs))


def test_caption_lengths_are_stored(small_vocab, tmp_path):
    v = small_vocab
    img = [v.boi_id, *v.image_ids(np.arange(4)).tolist(), v.eoi_id]
    docs = [[v.bos_id, 5, 6, 7, *img, v.eos_id],  # caption of 3 before the image
            [v.bos_id, *img, 5, 6, v.eos_id],  # image first: nothing to drop
            [v.bos_id, v.special("<|user|>"), 5, *img, v.eos_id],  # a special before the image: not a caption
            [v.bos_id, 5, 6, v.eos_id]]  # no image
    write_dataset(tmp_path / "ds", [np.array(d) for d in docs], v)
    assert ShardDataset(tmp_path / "ds").caption_lengths.tolist() == [3, 0, 0, 0]
    assert [caption_length(np.array(d), v) for d in docs] == [3, 0, 0, 0]


def test_same_documents_same_bytes(small_vocab, tmp_path):
    docs = _docs(small_vocab, 200)
    write_dataset(tmp_path / "a", docs, small_vocab, frame_bytes=4096)
    write_dataset(tmp_path / "b", docs, small_vocab, frame_bytes=4096)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_writer_is_atomic_and_never_overwrites(small_vocab, tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, small_vocab) as w:
            w.add(_docs(small_vocab, 1)[0])
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin
    write_dataset(out, _docs(small_vocab, 3), small_vocab)
    with pytest.raises(FileExistsError, match="already exists"):
        ShardWriter(out, small_vocab)
    write_dataset(out, _docs(small_vocab, 5), small_vocab, overwrite=True)
    assert len(ShardDataset(out)) == 5 and [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_writer_rejects_ids_outside_the_vocabulary(small_vocab, tmp_path):
    with pytest.raises(ValueError, match=r"^rec\.jsonl:3: token id 9999 outside the vocabulary"):
        with ShardWriter(tmp_path / "ds", small_vocab) as w:
            w.add([1, 2, 3], where="rec.jsonl:2")
            w.add([1, 9999, 3], where="rec.jsonl:3")
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------------------------------------------------------------
# shards: damage is detected and named


@pytest.fixture
def written(small_vocab, tmp_path):
    docs = _docs(small_vocab, 400)
    write_dataset(tmp_path / "ds", docs, small_vocab, frame_bytes=4096)
    return tmp_path / "ds", docs


def test_vocabulary_mismatch_names_both_files(written, tmp_path):
    folder, _ = written
    other = Vocab(text_size=101, image_codes=50)
    other.save(tmp_path / "other_vocab.json")
    with pytest.raises(VocabMismatchError) as e:
        ShardDataset(folder, tmp_path / "other_vocab.json")
    msg = str(e.value)
    assert "other_vocab.json" in msg and "ds/manifest.json" in msg and "\n" not in msg
    with pytest.raises(VocabMismatchError, match="vocabulary mismatch"):
        ShardDataset(folder, other)
    # the vocab.json beside the shards must agree with the manifest too
    other.save(folder / "vocab.json")
    with pytest.raises(VocabMismatchError, match=r"ds/vocab\.json.*ds/manifest\.json|ds/manifest\.json.*vocab\.json"):
        ShardDataset(folder)


def test_truncated_shard_names_shard_and_document(written):
    folder, docs = written
    shard = folder / "shard-00000.zst"
    size = shard.stat().st_size
    ds = ShardDataset(folder)  # opened while intact ...
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    ds._cache.clear()
    with pytest.raises(ShardError, match=r"shard-00000\.zst: document 399: truncated shard"):
        ds.get(399)  # ... then truncated under it: never a short read
    with pytest.raises(ShardError, match=r"shard-00000\.zst: truncated .*document \d+ onwards cannot be read"):
        ShardDataset(folder)


def test_flipped_byte_is_detected(written):
    folder, docs = written
    ds = ShardDataset(folder)
    shard = folder / "shard-00000.zst"
    frames = ds._frames
    k = len(frames) // 2
    at = int(frames[k]["offset"]) + int(frames[k]["csize"]) // 2
    data = bytearray(shard.read_bytes())
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))
    victim = int(frames[k]["first_doc"])
    ds = ShardDataset(folder)  # same size: opens, and documents in other frames still read correctly
    assert np.array_equal(ds.get(0)[0], docs[0])
    with pytest.raises(ShardError, match=rf"shard-00000\.zst: document {victim}: corrupt shard \(crc32"):
        ds.get(victim)
    with pytest.raises(ShardError, match=r"shard-00000\.zst: sha256 mismatch"):
        ds.verify()


def test_corrupt_index_or_manifest_is_refused(written):
    folder, _ = written
    idx = folder / "shard-00000.idx"
    data = bytearray(idx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    idx.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-00000\.idx: index checksum mismatch"):
        ShardDataset(folder)
    os.remove(folder / "manifest.json")
    with pytest.raises(ShardError, match="no manifest.json"):
        ShardDataset(folder)
