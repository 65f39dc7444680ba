"""Image and text tokenizers: lossless round trips on the toy world, save/load, clear errors."""
import hashlib

import numpy as np
import pytest

from megannm.toy import world as toy
from megannm.data.image_tokenizer import ImageTokenizer, PatchVQ, load_image_tokenizer
from megannm.data.text_tokenizer import load_text_tokenizer, text_digest, train_text_tokenizer


def _accuracy(attrs, images) -> dict[str, float]:
    readings = [toy.check_image(img) for img in images]
    return {n: float(np.mean([r[n] == getattr(a, n) for a, r in zip(attrs, readings)])) for n in toy.ATTRIBUTES}


def _distinct_patches(images: np.ndarray) -> int:
    """Counted independently of PatchVQ: each 4x4 patch as a 48-byte string."""
    p = images.reshape(-1, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 48)
    return len({row.tobytes() for row in p})


@pytest.fixture(scope="module")
def train_images():
    """What the pipeline trains the tokenizer on: seen combinations only."""
    return np.stack([img for _, img, _ in toy.make_examples(3000, seed=0, split="seen")])


@pytest.fixture(scope="module")
def eval_sets():
    return {split: toy.make_examples(1000, seed=1, split=split) for split in ("seen", "heldout")}


@pytest.fixture(scope="module")
def vq(train_images):
    return PatchVQ.train(train_images, codebook_size=1024, seed=0)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    texts = [toy.caption(a, rng) for a in toy.sample_attrs(2000, rng, "seen")]
    return train_text_tokenizer(texts, tmp_path_factory.mktemp("text_tok"), vocab_size=512), texts


# --- image tokenizer -----------------------------------------------------------------------------------------------
def test_patch_vq_shapes_and_codebook(vq, train_images):
    assert isinstance(vq, ImageTokenizer)
    assert (vq.image_size, vq.grid, vq.num_tokens) == ((32, 32), (8, 8), 64)
    # The distinct patches fit in 1,024 codes, so the codebook is exactly them (871 for the whole world).
    assert vq.codebook_size == _distinct_patches(train_images) == 871
    codes = vq.encode(train_images[:10])
    assert codes.shape == (10, 64) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < vq.codebook_size
    assert vq.encode(train_images[:0]).shape == (0, 64)


def test_patch_vq_is_lossless_on_both_splits(vq, eval_sets):
    # Trained on seen combinations only, it still holds every patch of the held-out ones: a patch depends on
    # (kind, size, colour, alignment) and every such triple of values occurs among the seen combinations.
    for split, examples in eval_sets.items():
        images = np.stack([img for _, img, _ in examples])
        recon = vq.decode(vq.encode(images))
        assert recon.dtype == np.uint8 and recon.shape == images.shape
        assert np.array_equal(recon, images), split
        acc = _accuracy([a for a, _, _ in examples], recon)
        assert min(acc.values()) >= 0.98, (split, acc)


def test_patch_vq_lossy_codebook_keeps_the_checker(train_images, eval_sets):
    """Fewer codes than distinct patches: the frequent patches stay exact and k-means covers the rest."""
    tok = PatchVQ.train(train_images, codebook_size=512, seed=0, iters=5)
    assert tok.codebook_size == 512
    assert np.array_equal(tok.codebook, PatchVQ.train(train_images, codebook_size=512, seed=0, iters=5).codebook)
    for split, examples in eval_sets.items():
        images = np.stack([img for _, img, _ in examples[:500]])
        recon = tok.decode(tok.encode(images))
        assert not np.array_equal(recon, images)  # really lossy
        acc = _accuracy([a for a, _, _ in examples[:500]], recon)
        assert min(acc.values()) >= 0.98, (split, acc)


def test_patch_vq_save_load_identical(vq, eval_sets, tmp_path):
    path = vq.save(tmp_path / "vq.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["vq.npz"]  # one file, no temporary left behind
    loaded = load_image_tokenizer(path)
    assert type(loaded) is PatchVQ and loaded.codebook_size == vq.codebook_size
    images = np.stack([img for _, img, _ in eval_sets["heldout"][:200]])
    codes = vq.encode(images)
    assert np.array_equal(loaded.encode(images), codes)
    assert np.array_equal(loaded.decode(codes), vq.decode(codes))


def test_image_tokenizer_errors(vq, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.npz: image tokenizer file not found"):
        load_image_tokenizer(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=r"junk\.npz: not a readable image tokenizer file"):
        load_image_tokenizer(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", kind=np.array("vqgan_v9"), format_version=np.array(1))
    with pytest.raises(ValueError, match=r"unknown image tokenizer kind 'vqgan_v9' \(known: patch_vq, pixels\)"):
        load_image_tokenizer(tmp_path / "other.npz")

    codes = np.zeros((2, 64), np.int64)
    codes[1, 5] = vq.codebook_size + 7
    with pytest.raises(ValueError, match=rf"code {vq.codebook_size + 7} at image 1, token 5 is outside"):
        vq.decode(codes)
    codes[1, 5] = -1
    with pytest.raises(ValueError, match="code -1 at image 1, token 5"):
        vq.decode(codes)
    with pytest.raises(ValueError, match=r"expected integer codes \[N, 64\]"):
        vq.decode(np.zeros((2, 63), np.int64))
    with pytest.raises(ValueError, match=r"expected uint8 images \[N, 32, 32, 3\]"):
        vq.encode(np.zeros((2, 32, 32, 3), np.float32))


# --- text tokenizer ------------------------------------------------------------------------------------------------
def test_text_tokenizer_round_trips_captions_without_specials(text_dir):
    folder, texts = text_dir
    tok = load_text_tokenizer(folder)
    assert 256 < len(tok) <= 512  # byte alphabet + merges; far below the ceiling on a few words
    rng = np.random.default_rng(3)
    captions = [toy.caption(a) for a in toy.ALL_COMBOS] + [toy.caption(a, rng) for a in toy.ALL_COMBOS]
    captions += ["Héllo  wörld\t🙂 ", " leading and trailing spaces  "]  # unseen bytes still round-trip
    exact = 0
    for text in captions:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.encode(text) == ids  # no bos/eos of its own, ever
        exact += tok.decode(ids) == text
    assert exact == len(captions)
    assert max(len(tok.encode(t)) for t in texts) <= 12  # whole words are single tokens
    assert tok.all_special_tokens == []


def test_text_tokenizer_loads_with_auto_tokenizer_offline(text_dir, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, texts = text_dir
    auto = AutoTokenizer.from_pretrained(str(folder))
    ours = load_text_tokenizer(folder)
    assert [auto.encode(t) for t in texts[:50]] == [ours.encode(t) for t in texts[:50]]
    assert len(auto) == len(ours)


def test_text_tokenizer_is_deterministic_and_digest_is_the_file_hash(text_dir, tmp_path):
    folder, texts = text_dir
    again = train_text_tokenizer(texts, tmp_path / "again")
    assert sorted(p.name for p in again.iterdir()) == ["megannm_characters.json", "tokenizer.json",
                                                       "tokenizer_config.json"]
    assert (again / "megannm_characters.json").read_bytes() == (folder / "megannm_characters.json").read_bytes()
    assert text_digest(again) == text_digest(folder)
    assert text_digest(folder) == hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    assert len(text_digest(folder)) == 64
    a, b = load_text_tokenizer(folder), load_text_tokenizer(again)
    assert [a.encode(t) for t in texts[:100]] == [b.encode(t) for t in texts[:100]]


def test_text_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"empty: not a text tokenizer folder \(no tokenizer.json\)"):
        load_text_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        text_digest(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="tokenizer.json: cannot load text tokenizer"):
        load_text_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        train_text_tokenizer(["a b"], tmp_path / "x", vocab_size=100)
