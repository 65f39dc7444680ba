"""Preprocessing sources: WebDataset tar shards, an Energon data set, Parquet files and a saved Hugging Face data
set, each built here from the same real PNG files and captions, give shards whose tokens equal those of the same
records given as JSONL; bad samples are named (tar and member, file and row), skipped up to --skip-bad and counted."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megannm.data.image_tokenizer import PatchVQ
from megannm.cli.data import preprocess as preprocess_main
from megannm.data.preprocess import preprocess
from megannm.data.shards import ShardDataset
from megannm.data.sources import SourceOptions
from megannm.data.text_tokenizer import train_text_tokenizer
from megannm.data.tokenize import RecordError, Tokenizers
from megannm.toy import world as toy

N = 10  # samples: two tar shards of five


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer bundle, N (caption, PNG file) pairs of the toy world, and the same pairs as JSONL."""
    root = tmp_path_factory.mktemp("sources")
    toy.write_toy_dataset(root / "raw", n_train=N, n_valid=1, seed=3)
    rng = np.random.default_rng(0)
    texts = [toy.caption(a, rng) for a in toy.sample_attrs(300, rng, "all")]
    text_dir = train_text_tokenizer(texts, root / "build" / "text", vocab_size=300)
    PatchVQ.train(toy.every_image()[1], codebook_size=512).save(root / "build" / "vq.npz")
    Tokenizers.build(text_dir, root / "build" / "vq.npz").save(root / "tok")
    pairs = []
    for line in (root / "raw" / "train.jsonl").read_text().splitlines():
        parts = json.loads(line)["parts"]
        text = next(p["text"] for p in parts if "text" in p)
        image = root / "raw" / next(p["image"] for p in parts if "image" in p)
        pairs.append((text, image))
    # the reference: every pair as text then image, image paths relative to the JSONL file
    ref = root / "ref.jsonl"
    ref.write_text("".join(json.dumps({"parts": [{"text": t}, {"image": str(p.relative_to(root))}]}) + "\n"
                           for t, p in pairs))
    preprocess([ref], root / "ref_shards", root / "tok", progress=False)
    return {"root": root, "tok": root / "tok", "pairs": pairs, "ref": root / "ref_shards"}


def tokens_of(folder: Path) -> list[list[int]]:
    ds = ShardDataset(folder)
    return [ds.get(i)[0].tolist() for i in range(len(ds))]


def write_tars(folder: Path, pairs, members=lambda k, text, png: {"png": png, "txt": text}, per_shard: int = 5):
    import webdataset as wds
    folder.mkdir(parents=True)
    for s in range(0, len(pairs), per_shard):
        with wds.TarWriter(str(folder / f"part-{s // per_shard:03d}.tar")) as w:
            for k, (text, path) in enumerate(pairs[s:s + per_shard], s):
                w.write({"__key__": f"sample{k:04d}", **members(k, text, path.read_bytes())})
    return folder


def test_webdataset_shards_give_the_jsonl_tokens(world, tmp_path):
    def members(k, text, png):  # one sample carries its record as .json (interleaved form) instead of .txt
        if k == 3:
            return {"png": png, "json": json.dumps({"parts": [{"text": text}, {"image": "png"}]})}
        return {"png": png, "txt": text}

    tars = write_tars(tmp_path / "wds", world["pairs"], members)
    m = preprocess([tars], tmp_path / "out", world["tok"], progress=False)
    assert tokens_of(tmp_path / "out") == tokens_of(world["ref"])
    assert m["source_kind"] == "webdataset" and m["bad_samples"]["skipped"] == 0
    assert m["sources"] == [{"file": "part-000.tar", "records": 5}, {"file": "part-001.tar", "records": 5}]


def test_energon_caption_and_interleaved_datasets_give_the_jsonl_tokens(world, tmp_path):
    from megatron.energon.tools.prepare import command as energon_prepare

    def prepare(folder: Path, *args: str) -> None:  # `energon prepare`, non-interactively
        energon_prepare.main([str(folder), "--non-interactive", "--split-parts", "train:.*", "--num-workers", "1",
                              "--no-progress", *args], standalone_mode=False)

    cap = write_tars(tmp_path / "captions", world["pairs"])
    prepare(cap, "--sample-type", "CaptioningSample", "--field-map", '{"image": "png", "caption": "txt"}')
    preprocess([cap], tmp_path / "out_cap", world["tok"], progress=False)
    assert tokens_of(tmp_path / "out_cap") == tokens_of(world["ref"])

    # interleaved: members 0.txt, 1.png per sample; the sample loader energon generates, filled in as its user would
    inter = write_tars(tmp_path / "interleaved", world["pairs"], lambda k, text, png: {"0.txt": text, "1.png": png})
    prepare(inter, "--sample-type", "InterleavedSample")
    (inter / ".nv-meta" / "sample_loader.py").write_text(
        "def sample_loader(raw: dict) -> dict:\n"
        "    keys = sorted((k for k in raw if not k.startswith('__')), key=lambda k: int(k.split('.')[0]))\n"
        "    return dict(__sources__=raw['__sources__'], sequence=[raw[k] for k in keys])\n\n"
        "def part_filter(part: str) -> bool:\n"
        "    return True\n")
    m = preprocess([inter], tmp_path / "out_inter", world["tok"], progress=False, workers=2, chunk_records=3)
    assert tokens_of(tmp_path / "out_inter") == tokens_of(world["ref"])
    assert m["source_kind"] == "energon" and m["sources"] == [{"file": "interleaved", "records": N}]


def test_parquet_and_saved_hf_dataset_give_the_jsonl_tokens(world, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [t for t, _ in world["pairs"]]
    pngs = [p.read_bytes() for _, p in world["pairs"]]
    # two files, columns named by options; row groups of 3 so that reading streams several batches
    for k, (a, b) in enumerate(((0, 6), (6, N))):
        pq.write_table(pa.table({"caption": texts[a:b], "jpg": pngs[a:b]}), tmp_path / f"part-{k}.parquet",
                       row_group_size=3)
    opts = SourceOptions(image_column="jpg", text_column="caption")
    m = preprocess([tmp_path / "part-0.parquet", tmp_path / "part-1.parquet"], tmp_path / "out_pq", world["tok"],
                   progress=False, options=opts)
    assert tokens_of(tmp_path / "out_pq") == tokens_of(world["ref"])
    assert m["sources"] == [{"file": "part-0.parquet", "records": 6}, {"file": "part-1.parquet", "records": 4}]

    hf = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in pngs], "text": texts})
    datasets.DatasetDict({"train": hf.cast_column("image", datasets.Image())}).save_to_disk(str(tmp_path / "hf"))
    m = preprocess([tmp_path / "hf"], tmp_path / "out_hf", world["tok"], progress=False)
    assert m["source_kind"] == "hf" and tokens_of(tmp_path / "out_hf") == tokens_of(world["ref"])
    assert preprocess_main(["-i", str(tmp_path / "part-0.parquet"), "-o", str(tmp_path / "x"), "-t",
                            str(world["tok"]), "--text-column", "nope", "--workers", "1"]) == 2


def test_bad_samples_are_named_skipped_up_to_the_limit_and_counted(world, tmp_path, capsys):
    def members(k, text, png):
        if k == 2:
            return {"png": b"not a picture", "txt": text}  # the tokenizer cannot decode it
        if k == 7:
            return {"png": png}  # no caption
        return {"png": png, "txt": text}

    tars = write_tars(tmp_path / "wds", world["pairs"], members)
    with pytest.raises(RecordError, match=r"^part-000\.tar:sample0002\.png: image (file )?cannot be read"):
        preprocess([tars], tmp_path / "a", world["tok"], progress=False)
    with pytest.raises(RecordError, match=r"^part-001\.tar:sample0007\.png: sample has no caption.*"
                                          r"more than --skip-bad 1"):
        preprocess([tars], tmp_path / "a", world["tok"], progress=False, skip_bad=1)
    assert not (tmp_path / "a").exists()
    said = []
    m1 = preprocess([tars], tmp_path / "w1", world["tok"], progress=False, skip_bad=2, say=said.append)
    m2 = preprocess([tars], tmp_path / "w2", world["tok"], progress=False, skip_bad=2, workers=2, chunk_records=2,
                    say=lambda line: None)
    assert len(said) == 2 and said[0].startswith("part-000.tar:sample0002.png: ")
    assert m1["bad_samples"] == m2["bad_samples"] == {"skipped": 2, "limit": 2, "first": said}
    ref = tokens_of(world["ref"])
    assert tokens_of(tmp_path / "w1") == tokens_of(tmp_path / "w2") == [t for k, t in enumerate(ref) if k not in (2, 7)]
    # the command line: one line per skipped sample on stderr, exit 0
    capsys.readouterr()
    assert preprocess_main(["-i", str(tars), "-o", str(tmp_path / "cli"), "-t", str(world["tok"]), "--workers", "1",
                            "--skip-bad", "2"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert len(err) == 2 and "part-001.tar:sample0007.png" in err[1]
    # a truncated tar: named, and the shards before it still count
    broken = tmp_path / "broken"
    shutil.copytree(tars, broken)
    data = (broken / "part-001.tar").read_bytes()
    (broken / "part-001.tar").write_bytes(data[:len(data) // 3])
    with pytest.raises(RecordError, match=r"part-001\.tar"):
        preprocess([broken], tmp_path / "b", world["tok"], progress=False, skip_bad=1)
