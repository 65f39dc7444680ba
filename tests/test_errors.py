"""docs/errors.md, row by row: every bad input and fault in its table gives its exit code and one line naming the
culprit (the file, key, shard, document, rank or parameter).

``CASES`` holds one function per row id of the table: it makes the bad input in a temporary folder, runs the command
in this process (``megannm.cli.main``) or the library function the command calls, and returns (exit code, the line,
the strings the line must contain). A test checks that the table and ``CASES`` list the same ids. Rows that train
share one tiny trained run and never build more than a few steps. At the end: property-based tests of the shard
reader (corruption and truncation never give wrong tokens silently) and of the recipe loader (random YAML never
gives a traceback).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from megannm.cli import USER_ERRORS, main

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
CASES: dict = {}


def row(rid: str, code: int):
    def register(f):
        CASES[rid] = (f, code)
        return f
    return register


class Bench:
    """A row's workspace: a temporary folder, the toy data, a tiny recipe, a trained run to damage copies of."""

    def __init__(self, tmp: Path, toy: dict, trained):
        self.tmp, self.toy, self._trained = tmp, toy, trained
        self.shards = toy["shards"]

    def recipe(self, name: str = "r", **sections) -> Path:
        lines = {"name": name, "seed": "3",
                 "model": "{hidden_size: 32, num_layers: 2, num_heads: 4, ffn_hidden_size: 64, max_seq_len: 96}",
                 "parallel": "{zero_stage: 1}",
                 "data": f"{{train: [{{path: {self.shards / 'train'}}}], seq_len: 80, micro_batch_size: 2, "
                         f"global_batch_size: 4}}",
                 "optimizer": "{lr: 0.003, min_lr: 0.0003}", "schedule": "{train_steps: 4, warmup_steps: 1}",
                 "checkpoint": "{save_interval: 2, keep_last: 3}",
                 "logging": f"{{dir: {self.tmp / 'run'}, interval: 1, progress_bar: false, tensorboard: false}}"}
        lines.update(sections)
        path = self.tmp / f"{name}.yaml"
        path.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
        return path

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        return path

    def cli(self, *argv) -> tuple[int, str]:
        """(exit code, the one line printed as a megannm error or note) of ``megannm ARGV`` in this process."""
        err, out = io.StringIO(), io.StringIO()
        with redirect_stderr(err), redirect_stdout(out):
            code = main([str(a) for a in argv])
        lines = [x for x in err.getvalue().splitlines() if x.startswith("megannm")]
        assert len(lines) <= 1, lines  # one line, never several
        return code, lines[0] if lines else out.getvalue().strip()

    def call(self, f, *args, **kwargs) -> tuple[int, str]:
        """A library function the commands call: the exit code its exception gives (as cli.main maps it), its line."""
        try:
            f(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the mapping below is cli.main's
            code = getattr(e, "exit_code", 2 if isinstance(e, USER_ERRORS) else None)
            assert isinstance(code, int), f"{type(e).__name__} is no one-line error: {e}"
            return code, str(e)
        return 0, ""

    def trained(self) -> tuple[Path, Path]:
        """A copy of a finished 4-step run (checkpoints at steps 2 and 4): (its recipe, its checkpoint dir)."""
        shutil.copytree(self._trained / "run", self.tmp / "run")
        return self.recipe(), self.tmp / "run" / "checkpoints"

    def copy_shards(self, name: str = "train") -> Path:
        dst = self.tmp / "data" / name
        shutil.copytree(self.shards / name, dst)
        return dst


def flip(path: Path, at: float = 0.5) -> Path:
    b = bytearray(path.read_bytes())
    b[int(len(b) * at)] ^= 0xFF
    path.write_bytes(bytes(b))
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])
    return path


@pytest.fixture(scope="module")
def trained_run(toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    os.environ["MEGANNM_QUIET"] = "1"
    assert Bench(root, toy_data, None).cli("train", Bench(root, toy_data, None).recipe())[0] == 0
    return root


@pytest.fixture
def bench(tmp_path, toy_data, trained_run, monkeypatch):
    monkeypatch.setenv("MEGANNM_QUIET", "1")
    return Bench(tmp_path, toy_data, trained_run)


# ---------------------------------------------------------------------------------------------------------------------
# recipe (megannm check / train: before any process group starts)


@row("recipe-not-found", 2)
def _(b):
    return (*b.cli("check", b.tmp / "nope.yaml"), ["nope.yaml", "recipe file not found"])


@row("recipe-bad-yaml", 2)
def _(b):
    return (*b.cli("check", b.write("r.yaml", "model: {hidden_size: 32\nseed: 1\n")), ["r.yaml", "not valid YAML"])


@row("recipe-not-a-mapping", 2)
def _(b):
    return (*b.cli("check", b.write("r.yaml", "- a\n- b\n")), ["r.yaml", "(top): a recipe is a mapping"])


@row("recipe-unknown-key", 2)
def _(b):
    return (*b.cli("check", b.write("r.yaml", "model: {hiden_size: 32}\n")),
            ["r.yaml", "model.hiden_size", "unknown key", "hidden_size"])


@row("recipe-wrong-type", 2)
def _(b):
    return (*b.cli("check", b.write("r.yaml", "model: {num_layers: two}\n")), ["r.yaml", "model.num_layers", "two"])


@row("recipe-out-of-range", 2)
def _(b):
    return (*b.cli("check", b.write("r.yaml", "optimizer: {lr: -1}\n")), ["r.yaml", "optimizer.lr", "-1"])


@row("recipe-base-missing", 2)
def _(b):
    return (*b.cli("check", b.write("child.yaml", "base: parent.yaml\n")), ["child.yaml", "base", "parent.yaml"])


@row("recipe-base-not-a-path", 2)
def _(b):
    return (*b.cli("check", b.write("child.yaml", "base: 5\n")), ["child.yaml", "base", "5"])


@row("recipe-infinite-value", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "optimizer.lr=.inf"), ["r.yaml", "optimizer.lr", "inf"])


@row("recipe-base-cycle", 2)
def _(b):
    b.write("a.yaml", "base: b.yaml\n")
    return (*b.cli("check", b.write("b.yaml", "base: a.yaml\n")), ["b.yaml", "base: inheritance cycle", "a.yaml"])


@row("override-without-equals", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "model.hidden_size"), ["command line", "model.hidden_size", "key.path=value"])


@row("override-into-a-scalar", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "seed.x=1"), ["r.yaml", "seed.x", "seed is not a mapping"])


@row("heads-do-not-divide-hidden", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "model.num_heads=5"), ["r.yaml", "model.num_heads", "hidden_size=32"])


@row("heads-do-not-divide-tp", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "parallel.tensor_parallel=3", "model.num_heads=4", "model.hidden_size=48",
                   "--world-size", "3"), ["r.yaml", "model.num_heads", "tensor_parallel=3"])


@row("layers-do-not-divide-pp", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "model.num_layers=3", "parallel.pipeline_parallel=2", "parallel.zero_stage=0"),
            ["r.yaml", "model.num_layers", "pipeline_parallel=2"])


@row("zero2-with-pipeline", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "parallel.zero_stage=2", "parallel.pipeline_parallel=2"),
            ["r.yaml", "parallel.zero_stage", "pipeline_parallel=2"])


@row("world-size-differs", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "parallel.world_size=4", "--world-size", "2"),
            ["r.yaml", "parallel.world_size", "expected 4"])


@row("world-size-not-tp-x-pp-x-dp", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "parallel.tensor_parallel=2", "--world-size", "3"),
            ["r.yaml", "parallel.world_size", "tensor_parallel=2"])


@row("global-batch-not-divisible", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "data.global_batch_size=6", "data.micro_batch_size=4"),
            ["r.yaml", "data.global_batch_size", "micro_batch_size"])


@row("fewer-micro-batches-than-stages", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "parallel.pipeline_parallel=2", "parallel.zero_stage=0",
                   "data.global_batch_size=2", "--world-size", "2"),
            ["r.yaml", "data.global_batch_size", "pipeline_parallel=2"])


@row("seq-len-above-max", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "data.seq_len=200"), ["r.yaml", "data.seq_len", "max_seq_len=96"])


@row("min-lr-above-lr", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "optimizer.min_lr=1"), ["r.yaml", "optimizer.min_lr"])


@row("warmup-longer-than-run", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "schedule.warmup_steps=100"), ["r.yaml", "schedule.warmup_steps"])


@row("phase-unknown", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "phase.kind=ppo"), ["r.yaml", "phase.kind", "ppo"])


@row("phase-option-unknown", 2)
def _(b):
    return (*b.cli("check", b.recipe(phase="{kind: dpo, options: {pairs: x, betta: 1}}")),
            ["r.yaml", "phase.options.betta", "beta"])


@row("phase-without-pipeline-loss", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "phase.kind=sft", "parallel.pipeline_parallel=2", "parallel.zero_stage=0"),
            ["r.yaml", "parallel.pipeline_parallel", "sft"])


@row("guard-spike-factor-at-most-1", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "guard.spike_factor=0.5"), ["r.yaml", "guard.spike_factor", "0.5"])


@row("data-verify-unknown", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "data.verify=sometimes"), ["r.yaml", "data.verify", "sometimes"])


@row("slurm-time-unquoted", 2)
def _(b):
    return (*b.cli("check", b.recipe(slurm="{time: 12:00:00}")), ["r.yaml", "slurm.time", "quoted"])


@row("loss-weight-unknown-modality", 2)
def _(b):
    return (*b.cli("check", b.recipe(), "model.loss_weights={audio: 1}"), ["r.yaml", "model.loss_weights", "audio"])


@row("recipe-without-data", 2)
def _(b):
    return (*b.cli("train", b.write("empty.yaml", "")), ["empty.yaml", "data.train", "data.vocab"])


@row("check-overrides-after-world-size", 2)
def _(b):  # overrides after --world-size count, as train takes them anywhere
    return (*b.cli("check", b.recipe(), "--world-size", "2", "model.num_heads=5"),
            ["r.yaml", "model.num_heads", "num_heads=5"])


# plan (megannm estimate, alias plan)


def usage_error(b, *argv) -> tuple[int, str]:
    """(exit code, argparse's error line) of a command line refused by its parser (argparse prints its usage first)."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own exit
            code = e.code
    lines = [x for x in err.getvalue().splitlines() if x.startswith("megannm")]
    assert len(lines) == 1, err.getvalue()
    return code, lines[0]


@row("plan-world-size-zero", 2)
def _(b):
    return (*usage_error(b, "plan", b.recipe(), "--world-size", "0"), ["--world-size", "at least 1", "got 0"])


@row("plan-mfu-out-of-range", 2)
def _(b):
    return (*usage_error(b, "estimate", b.recipe(), "--world-size", "8", "--mfu", "40"), ["--mfu", "(0, 1]", "40"])


@row("plan-world-does-not-hold-the-layout", 2)
def _(b):
    return (*b.cli("estimate", b.recipe(), "parallel.tensor_parallel=2", "--world-size", "3"),
            ["r.yaml", "parallel.world_size", "tensor_parallel=2"])


# ---------------------------------------------------------------------------------------------------------------------
# data (megannm train refuses it before building the model; megannm preprocess)


def no_run_folder(b, result):
    assert not (b.tmp / "run").exists(), "a refused run left its run folder"
    return result


@row("data-path-missing", 2)
def _(b):
    return no_run_folder(b, (*b.cli("train", b.recipe(), f"data.train=[{{path: {b.tmp / 'nope'}}}]"),
                             ["r.yaml", "data.train[0].path", "nope", "no such data set folder"]))


@row("data-not-a-data-set", 2)
def _(b):
    (b.tmp / "plain").mkdir()
    return no_run_folder(b, (*b.cli("train", b.recipe(), f"data.train=[{{path: {b.tmp / 'plain'}}}]"),
                             ["r.yaml", "data.train[0].path", "plain", "no manifest.json"]))


@row("data-manifest-not-json", 2)
def _(b):
    d = b.copy_shards()
    (d / "manifest.json").write_text("{oops")
    return (*b.cli("train", b.recipe(), f"data.valid=[{{path: {d}}}]"),
            ["data.valid[0].path", "manifest.json", "not valid JSON"])


@row("data-set-empty", 2)
def _(b):
    from megannm.data.shards import write_dataset
    from megannm.vocab import Vocab
    empty = b.tmp / "empty"
    write_dataset(empty, [], Vocab.load(b.shards / "train" / "vocab.json"))
    return no_run_folder(b, (*b.cli("train", b.recipe(), f"data.valid=[{{path: {empty}}}]"),
                             ["r.yaml", "data.valid[0].path", "empty", "no documents"]))


def other_vocab(b) -> Path:
    from megannm.vocab import Vocab
    v = Vocab.load(b.shards / "train" / "vocab.json")
    path = b.tmp / "other" / "vocab.json"
    path.parent.mkdir()
    Vocab(text_size=v.text_size + 1, image_codes=v.image_codes, image_grid=v.image_grid).save(path)
    return path


@row("data-vocab-mismatch", 2)
def _(b):
    vocab = other_vocab(b)
    return (*b.cli("train", b.recipe(), f"data.vocab={vocab}"),
            ["r.yaml", "data.train[0].path", f"data.vocab {vocab}", "fingerprint"])


@row("data-sets-of-two-vocabularies", 2)
def _(b):
    from megannm.data.shards import write_dataset
    from megannm.vocab import Vocab
    other = b.tmp / "other_set"
    write_dataset(other, [np.arange(5)], Vocab.load(other_vocab(b)))
    return (*b.cli("train", b.recipe(), f"data.valid=[{{path: {other}}}]"),
            ["data.valid[0].path", "other_set", "data.train[0].path", "vocab.json"])


@row("data-vocab-missing", 2)
def _(b):
    return (*b.cli("train", b.recipe(), f"data.vocab={b.tmp / 'nope.json'}"),
            ["r.yaml", "data.vocab", "nope.json", "not found"])


@row("data-vocab-not-json", 2)
def _(b):
    return (*b.cli("train", b.recipe(), f"data.vocab={b.write('vocab.json', 'garbage')}"),
            ["r.yaml", "data.vocab", "vocab.json", "not valid JSON"])


@row("seq-len-shorter-than-an-image", 2)
def _(b):
    return no_run_folder(b, (*b.cli("train", b.recipe(), "data.seq_len=40"),
                             ["r.yaml", "data.train[0].path", "manifest.json", "an image takes 66 tokens",
                              "data.seq_len >= 65"]))


@row("shard-flipped-byte", 2)
def _(b):
    d = b.copy_shards()
    flip(d / "shard-00000.zst")
    return no_run_folder(b, (*b.cli("train", b.recipe(), f"data.train=[{{path: {d}}}]"),
                             ["r.yaml", "data.train[0].path", "shard-00000.zst", "document 0", "crc32"]))


@row("shard-truncated", 2)
def _(b):
    d = b.copy_shards()
    truncate(d / "shard-00000.zst", 0.6)
    return (*b.cli("train", b.recipe(), f"data.train=[{{path: {d}}}]"),
            ["data.train[0].path", "shard-00000.zst", "truncated", "document"])


@row("shard-missing", 2)
def _(b):
    d = b.copy_shards()
    (d / "shard-00000.zst").unlink()
    return (*b.cli("train", b.recipe(), f"data.train=[{{path: {d}}}]", "data.verify=index"),
            ["data.train[0].path", "shard-00000.zst", "missing"])


@row("shard-index-corrupt", 2)
def _(b):
    d = b.copy_shards()
    flip(d / "shard-00000.idx")
    return (*b.cli("train", b.recipe(), f"data.train=[{{path: {d}}}]", "data.verify=index"),
            ["data.train[0].path", "shard-00000.idx", "checksum mismatch"])


@row("shard-corrupt-found-when-read", 2)
def _(b):
    d = b.copy_shards()
    flip(d / "shard-00000.zst")
    return (*b.cli("train", b.recipe(), f"data.train=[{{path: {d}}}]", "data.verify=none"),
            ["shard-00000.zst", "document", "crc32 mismatch"])


def preprocess(b, *records: str, **kw):
    inp = b.write("in.jsonl", "".join(r + "\n" for r in records))
    shutil.copytree(b.toy["raw"] / "images", b.tmp / "images", dirs_exist_ok=True)
    args = ["preprocess", "-i", inp, "-o", kw.get("out", b.tmp / "out"), "-t", kw.get("tok", b.toy["tokenizers"]),
            "--workers", "1", "--no-progress"]
    return b.cli(*args)


GOOD = '{"parts": [{"image": "images/000000.png"}, {"text": "a small green cross"}]}'


@row("record-not-json", 2)
def _(b):
    return (*preprocess(b, GOOD, '{"parts": [{"text": "a"}] "x": 1}'), ["in.jsonl:2", "not valid JSON", "column 27"])


@row("record-without-parts", 2)
def _(b):
    return (*preprocess(b, '{"text": "a caption"}'), ["in.jsonl:1", "neither 'parts' nor 'messages'"])


@row("record-unknown-part", 2)
def _(b):
    return (*preprocess(b, '{"parts": [{"audio": "a.wav"}, {"text": "x"}]}'), ["in.jsonl:1", "parts[0]", "audio"])


@row("record-image-missing", 2)
def _(b):
    return (*preprocess(b, '{"parts": [{"image": "images/nope.png"}, {"text": "x"}]}'),
            ["in.jsonl:1", "image file not found", "nope.png"])


@row("record-image-unreadable", 2)
def _(b):
    b.write("images/broken.png", b"not a png")
    return (*preprocess(b, '{"parts": [{"image": "images/broken.png"}, {"text": "x"}]}'),
            ["in.jsonl:1", "broken.png"])


@row("preprocess-output-exists", 2)
def _(b):
    (b.tmp / "out").mkdir()
    return (*preprocess(b, GOOD), ["out", "already exists", "--overwrite"])


@row("preprocess-not-a-tokenizers-folder", 2)
def _(b):
    (b.tmp / "tok").mkdir()
    return (*preprocess(b, GOOD, tok=b.tmp / "tok"), ["tok", "not a tokenizers folder", "vocab.json"])


@row("preprocess-input-missing", 2)
def _(b):
    return (*b.cli("preprocess", "-i", b.tmp / "nope.jsonl", "-o", b.tmp / "out", "-t", b.toy["tokenizers"],
                   "--workers", "1", "--no-progress"), ["nope.jsonl", "not found"])


@row("preprocess-no-records", 2)
def _(b):
    return (*preprocess(b, ""), ["in.jsonl", "no records"])


def _mount_tmpfs(where: Path, size: str) -> bool:
    import subprocess
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@row("preprocess-disk-full", 1)
def _(b):
    import subprocess
    disk = b.tmp / "disk"
    if not _mount_tmpfs(disk, "8k"):  # two pages: the shards of 400 pictures do not fit
        pytest.skip("needs root and mount for a real full disk")
    try:
        shutil.copytree(b.toy["raw"] / "images", b.tmp / "images")
        shutil.copy(b.toy["raw"] / "train.jsonl", b.tmp / "in.jsonl")
        result = b.cli("preprocess", "-i", b.tmp / "in.jsonl", "-o", disk / "out", "-t", b.toy["tokenizers"],
                       "--workers", "1", "--no-progress")
        assert not list(disk.iterdir()), "a failed preprocess left files behind"
        return (*result, [f"{disk / 'out'}: cannot write the data set", "No space left on device", "free there",
                          "nothing was written"])
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@row("tokenizers-downsample-zero", 2)
def _(b):
    return (*usage_error(b, "tokenizers", "build", "-i", b.tmp / "in.jsonl", "-o", b.tmp / "tok", "--image-kind",
                         "learned", "--downsample", "0"), ["--downsample", "power of two", "got 0"])


# chat records (messages; SFT)


@row("chat-whitespace-assistant-turn", 2)
def _(b):
    return (*preprocess(b, '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}'),
            ["in.jsonl:1", "messages[1]", "empty assistant turn", "only whitespace"])


@row("chat-unknown-role", 2)
def _(b):
    return (*preprocess(b, '{"messages": [{"role": "bot", "content": "hi"}]}'),
            ["in.jsonl:1", "messages[0]", "unknown role 'bot'", "assistant"])


@row("chat-messages-not-a-list", 2)
def _(b):
    return (*preprocess(b, '{"messages": "hi"}'), ["in.jsonl:1", "'messages' must be a non-empty list"])


@row("chat-unknown-content-part", 2)
def _(b):
    return (*preprocess(b, '{"messages": [{"role": "user", "content": [{"type": "audio"}]}]}'),
            ["in.jsonl:1", "messages[0].content[0]", "unknown part type 'audio'"])


# other sources (WebDataset, Energon, Parquet, Hugging Face data sets)


@row("source-folder-of-no-known-kind", 2)
def _(b):
    (b.tmp / "mixed").mkdir()
    b.write("mixed/notes.txt", "x")
    return (*b.cli("preprocess", "-i", b.tmp / "mixed", "-o", b.tmp / "out", "-t", b.toy["tokenizers"],
                   "--workers", "1", "--no-progress"), ["mixed", ".tar", ".parquet", "Energon", "dataset_info.json"])


@row("source-unknown-file-type", 2)
def _(b):
    return (*b.cli("preprocess", "-i", b.write("in.csv", "a,b\n"), "-o", b.tmp / "out", "-t", b.toy["tokenizers"],
                   "--workers", "1", "--no-progress"), ["in.csv", "unknown input type", "--source"])


@row("source-inputs-of-several-kinds", 2)
def _(b):
    return (*b.cli("preprocess", "-i", b.write("a.jsonl", GOOD + "\n"), b.write("b.tar", b""), "-o", b.tmp / "out",
                   "-t", b.toy["tokenizers"], "--workers", "1", "--no-progress"),
            ["several kinds", "jsonl", "webdataset"])


@row("energon-not-a-data-set", 2)
def _(b):
    (b.tmp / "shards" / ".nv-meta").mkdir(parents=True)
    return (*b.cli("preprocess", "-i", b.tmp / "shards", "--source", "energon", "-o", b.tmp / "out", "-t",
                   b.toy["tokenizers"], "--workers", "1", "--no-progress"),
            ["shards", "not an Energon data set", ".nv-meta/dataset.yaml", "energon prepare"])


@row("parquet-column-missing", 2)
def _(b):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"caption": ["a red circle"]}), b.tmp / "part.parquet")
    return (*b.cli("preprocess", "-i", b.tmp / "part.parquet", "-o", b.tmp / "out", "-t", b.toy["tokenizers"],
                   "--workers", "1", "--no-progress"), ["part.parquet", "text", "--text-column"])


# tokenizers (megannm tokenizers build / train-image / info)


@row("tokenizers-unknown-subcommand", 2)
def _(b):
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["tokenizers", "bild"])
    return code, err.getvalue().strip().splitlines()[-1], ["tokenizers", "unknown subcommand 'bild'", "build"]


@row("tokenizers-output-exists", 2)
def _(b):
    (b.tmp / "tok").mkdir()
    return (*b.cli("tokenizers", "build", "-i", b.write("in.jsonl", GOOD + "\n"), "-o", b.tmp / "tok"),
            ["tok", "already exists", "--overwrite"])


@row("tokenizers-records-without-text", 2)
def _(b):
    shutil.copytree(b.toy["raw"] / "images", b.tmp / "images")
    return (*b.cli("tokenizers", "build", "-i", b.write("in.jsonl", '{"parts": [{"image": "images/000000.png"}]}\n'),
                   "-o", b.tmp / "tok"), ["in.jsonl", "no text in the records"])


@row("tokenizers-pretrained-kind-without-model", 2)
def _(b):
    shutil.copytree(b.toy["raw"] / "images", b.tmp / "images")
    return (*b.cli("tokenizers", "build", "-i", b.write("in.jsonl", GOOD + "\n"), "-o", b.tmp / "tok",
                   "--image-kind", "janus"), ["--image-kind janus", "--image-model"])


@row("tokenizers-image-training-unfinished", 2)
def _(b):
    from megannm.data.build_tokenizers import load_pictures
    from megannm.data.image_tokenizer.learned import config_from, train_image_tokenizer
    files = [(f, f.name) for f in sorted((b.toy["raw"] / "images").glob("*.png"))[:4]]
    cfg = config_from({"steps": 300, "batch_size": 1, "codebook_size": 16, "holdout": 0, "save_every": 100,
                       "image_size": 16})
    r = train_image_tokenizer(load_pictures(files, (16, 16), "crop"), b.tmp / "vq", cfg, stop_at=1, say=lambda *a: 0)
    assert r["stopped"] and r["steps"] == 1  # killed, or interrupted and never resumed
    shutil.copytree(b.toy["raw"] / "images", b.tmp / "images")
    result = b.cli("tokenizers", "build", "-i", b.write("in.jsonl", GOOD + "\n"), "-o", b.tmp / "tok",
                   "--image-tokenizer", b.tmp / "vq")
    assert not (b.tmp / "tok").exists()
    return (*result, ["--image-tokenizer", "vq", "stopped at step 1 of 300", "--resume"])


@row("tokenizers-disk-full", 1)
def _(b):
    import subprocess
    disk = b.tmp / "disk"
    if not _mount_tmpfs(disk, "8k"):
        pytest.skip("needs root and mount for a real full disk")
    try:
        shutil.copytree(b.toy["raw"] / "images", b.tmp / "images")
        result = b.cli("tokenizers", "build", "-i", b.write("in.jsonl", GOOD + "\n"), "-o", disk / "tok")
        assert not list(disk.iterdir()), "a failed build left files behind"
        return (*result, [f"{disk / 'tok'}: cannot write the tokenizers folder", "No space left on device",
                          "free there", "nothing was written"])
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@row("tokenizers-info-not-a-tokenizer", 2)
def _(b):
    (b.tmp / "nothing").mkdir()
    return (*b.cli("tokenizers", "info", b.tmp / "nothing"), ["nothing"])


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints (megannm train --resume, init_from; saving)


@row("latest-garbage", 2)
def _(b):
    recipe, ck = b.trained()
    (ck / "latest").write_bytes(b"\xfb\x10\x00junk")
    return (*b.cli("train", recipe, "--resume"), ["latest", "not a checkpoint tag", "checkpoint.fallback"])


@row("latest-names-missing-folder", 2)
def _(b):
    recipe, ck = b.trained()
    (ck / "latest").write_text("step00000099\n")
    return (*b.cli("train", recipe, "--resume"), ["latest", "step00000099", "megannm.json", "incomplete"])


@row("weights-truncated", 2)
def _(b):
    recipe, ck = b.trained()
    truncate(ck / "step00000004" / "mp_rank_00_model_states.pt")
    return (*b.cli("train", recipe, "--resume"), ["step00000004/mp_rank_00_model_states.pt", "truncated"])


@row("optimizer-truncated", 2)
def _(b):
    recipe, ck = b.trained()
    truncate(ck / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", 0.9)
    return (*b.cli("train", recipe, "--resume"), ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "truncated"])


@row("optimizer-flipped-byte", 2)
def _(b):
    recipe, ck = b.trained()
    flip(ck / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return (*b.cli("train", recipe, "--resume"), ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "corrupt (crc32"])


@row("rng-file-missing", 2)
def _(b):
    recipe, ck = b.trained()
    (ck / "step00000004" / "rng" / "rank00000.pt").unlink()
    return (*b.cli("train", recipe, "--resume"), ["step00000004/rng/rank00000.pt", "missing"])


@row("metadata-not-json", 2)
def _(b):
    recipe, ck = b.trained()
    (ck / "step00000004" / "megannm.json").write_bytes(b"\x00\x01{")
    return (*b.cli("train", recipe, "--resume"), ["step00000004/megannm.json", "not valid JSON"])


@row("unrecorded-checkpoint-unreadable", 2)
def _(b):
    recipe, ck = b.trained()
    meta = json.loads((ck / "step00000004" / "megannm.json").read_text())
    del meta["files"]  # saved before files were recorded
    (ck / "step00000004" / "megannm.json").write_text(json.dumps(meta))
    truncate(ck / "step00000004" / "mp_rank_00_model_states.pt")
    return (*b.cli("train", recipe, "--resume"), ["step00000004/mp_rank_00_model_states.pt", "cannot read"])


@row("fallback-finds-nothing", 2)
def _(b):
    recipe, ck = b.trained()
    for tag in ("step00000002", "step00000004"):
        flip(ck / tag / "mp_rank_00_model_states.pt")
    return (*b.cli("train", recipe, "--resume", "checkpoint.fallback=true"),
            ["checkpoints", "no loadable checkpoint", "2 damaged", "step00000004/mp_rank_00_model_states.pt"])


@row("resume-other-model-shape", 2)
def _(b):
    recipe, _ = b.trained()
    return (*b.cli("train", recipe, "--resume", "model.hidden_size=64"),
            ["step00000004", "model parameter hidden", "32", "64"])


@row("resume-other-vocabulary", 2)
def _(b):
    from megannm.checkpoint import check_compatible, read_meta
    _, ck = b.trained()
    meta = read_meta(ck)
    return (*b.call(check_compatible, meta, meta["model_args"], "0123abcd", str(ck / "step00000004")),
            ["step00000004", "vocabulary fingerprint", "0123abcd"])


@row("resume-other-layout", 2)
def _(b):
    from megannm.checkpoint import check_compatible, read_meta
    _, ck = b.trained()
    meta = read_meta(ck)
    return (*b.call(check_compatible, meta, meta["model_args"], meta["vocab"]["fingerprint"],
                    str(ck / "step00000004"), {"tp": 2, "pp": 1}),
            ["step00000004", "saved at tp=1", "tp=2", "megannm convert"])


@row("init-from-not-a-checkpoint", 2)
def _(b):
    (b.tmp / "nothing").mkdir()
    return (*b.cli("train", b.recipe(), f"checkpoint.init_from={b.tmp / 'nothing'}"),
            ["nothing", "not a megannm checkpoint"])


@row("save-disk-full", 1)
def _(b):
    os.environ["MEGANNM_FAULT"] = "save_mid:4:enospc"
    try:
        return (*b.cli("train", b.recipe()),
                [".tmp-step00000004/rng/rank00000.pt", "No space left on device", "free there",
                 "step00000002 is untouched"])
    finally:
        del os.environ["MEGANNM_FAULT"]


@row("save-write-error", 1)
def _(b):
    from megannm.train import checkpoint as saving

    def refuse(*a, **k):  # what torch's writer raises when a file system fails mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    layout = type("L", (), {"rank": 0, "world_size": 1})()
    engine = type("E", (), {"save_checkpoint": refuse})()
    return (*b.call(saving.save, engine, b.tmp / "ck", 7, {}, layout),
            [".tmp-step00000007", "cannot save the checkpoint of step 7", "PytorchStreamWriter failed"])


# ---------------------------------------------------------------------------------------------------------------------
# runtime


@row("diverged", 3)
def _(b):
    return (*b.cli("train", b.recipe(), "optimizer.lr=1e9", "schedule.train_steps=8"),
            ["diverged at step 4", "3 bad steps in a row", "guard.max_bad_steps=3", "on rank 0",
             "last good checkpoint"])


@row("diverged-on-the-last-step", 3)
def _(b):
    return (*b.cli("train", b.recipe(), "optimizer.lr=1e9", "schedule.train_steps=2"),
            ["diverged at step 2", "the last step was bad", "non-finite gradient norm"])


@row("weights-not-finite-at-save", 3)
def _(b):
    return (*b.cli("train", b.recipe(), "optimizer.lr=1e9", "parallel.zero_stage=0", "checkpoint.save_interval=1"),
            ["diverged at step 2", "non-finite weights on rank 0", "nothing was saved", "step00000001"])


def stop_with(b, signum) -> tuple[int, str]:
    from megannm.train.loop import Trainer
    step = Trainer.train_step

    def stopped(self, batches):
        out = step(self, batches)
        if self.step == 1:
            signal.raise_signal(signum)
        return out

    Trainer.train_step = stopped
    try:
        os.environ.pop("MEGANNM_QUIET")
        return b.cli("train", b.recipe(), "schedule.train_steps=50")
    finally:
        Trainer.train_step = step
        os.environ["MEGANNM_QUIET"] = "1"


@row("ctrl-c", 130)
def _(b):
    return (*stop_with(b, signal.SIGINT), ["Ctrl-C", "saving after this step", "again"])


@row("preempted", 124)
def _(b):
    code, out = stop_with(b, signal.SIGTERM)
    return code, out.splitlines()[-2], ["[step 2] preempted", "signal=SIGTERM", "saved=", "step00000002"]


@row("ctrl-c-before-training", 130)
def _(b):
    import megannm.config as config
    load = config.load_recipe

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    config.load_recipe = interrupted
    try:
        return (*b.cli("train", b.recipe()), ["megannm train: interrupted"])
    finally:
        config.load_recipe = load


@row("world-does-not-hold-the-layout", 2)
def _(b):  # rank 0 of a 3-rank torchrun world (its environment), a recipe of tensor_parallel=2
    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        result = b.cli("train", b.recipe(), "parallel.tensor_parallel=2")
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert not (b.tmp / "run").exists()
    return (*result, ["r.yaml", "parallel.world_size", "got 3", "tensor_parallel=2"])


@row("torchrun-failure-summary", 1)
def _(b):
    """Under torchrun, the rank's line is the root cause in torchrun's failure summary (through the agent's error
    file), with the rank's own exit code; torchrun itself exits 1 for any failed rank."""
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(DOC.parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", "0",
                        "-m", "megannm", "check", str(b.tmp / "nope.yaml")], capture_output=True, text=True,
                       env=env, cwd=b.tmp, timeout=300)
    summary = r.stderr[r.stderr.index("Root Cause"):]
    assert re.search(r"exitcode\s+: 2 ", summary), summary  # the rank's exit code, as megannm gave it
    line = re.search(r"traceback\s+: (.*)", summary).group(1)
    return r.returncode, line, ["megannm check: error:", "nope.yaml", "recipe file not found"]


# ---------------------------------------------------------------------------------------------------------------------
# conversion (megannm convert)


@row("convert-source-missing", 2)
def _(b):
    return (*b.cli("convert", b.tmp / "nope", b.tmp / "out", "--to", "consolidated"), ["nope", "no such file"])


@row("convert-source-is-a-file", 2)
def _(b):
    return (*b.cli("convert", b.write("f.txt", "x"), b.tmp / "out", "--to", "consolidated"),
            ["f.txt", "a checkpoint is a folder"])


@row("convert-source-not-a-checkpoint", 2)
def _(b):
    (b.tmp / "plain").mkdir()
    return (*b.cli("convert", b.tmp / "plain", b.tmp / "out", "--to", "consolidated"),
            ["plain", "not a checkpoint", "config.json"])


@row("convert-destination-exists", 2)
def _(b):
    _, ck = b.trained()
    (b.tmp / "out").mkdir()
    return (*b.cli("convert", ck, b.tmp / "out", "--to", "consolidated"), ["out", "already exists", "--overwrite"])


@row("convert-layout-for-a-layoutless-form", 2)
def _(b):
    _, ck = b.trained()
    return (*b.cli("convert", ck, b.tmp / "out", "--to", "hf", "--tp", "2"), ["--tp/--pp", "--to hf"])


@row("convert-bad-shard-size", 2)
def _(b):
    _, ck = b.trained()
    return (*b.cli("convert", ck, b.tmp / "out", "--to", "consolidated", "--max-shard-size", "lots"),
            ["--max-shard-size", "lots"])


@row("convert-onto-itself", 2)
def _(b):
    _, ck = b.trained()
    return (*b.cli("convert", ck, ck, "--to", "consolidated", "--overwrite"), ["checkpoints", "the source itself"])


@row("convert-hf-without-image-tokenizer", 2)
def _(b):
    b.write("llm/config.json", "{}")
    return (*b.cli("convert", b.tmp / "llm", b.tmp / "out", "--to", "consolidated"),
            ["llm", "--image-tokenizer"])


@row("convert-hf-to-deepspeed", 2)
def _(b):
    b.write("llm/config.json", "{}")
    return (*b.cli("convert", b.tmp / "llm", b.tmp / "out", "--to", "deepspeed"), ["llm", "--to consolidated"])


@row("convert-truncated-checkpoint", 2)
def _(b):
    _, ck = b.trained()
    truncate(ck / "step00000004" / "mp_rank_00_model_states.pt")
    return (*b.cli("convert", ck, b.tmp / "out", "--to", "consolidated"),
            ["step00000004/mp_rank_00_model_states.pt"])


@row("convert-master-without-optimizer-files", 2)
def _(b):
    _, ck = b.trained()  # a module-only checkpoint (written by convert) has no optimizer files
    assert b.cli("convert", ck, b.tmp / "c", "--to", "consolidated")[0] == 0
    assert b.cli("convert", b.tmp / "c", b.tmp / "ds", "--to", "deepspeed")[0] == 0
    return (*b.cli("convert", b.tmp / "ds", b.tmp / "out", "--to", "consolidated", "--weights", "master"),
            ["ds/step00000004", "no optimizer partitions", "--weights module"])


@row("convert-weights-of-a-consolidated-source", 2)
def _(b):
    _, ck = b.trained()
    assert b.cli("convert", ck, b.tmp / "c", "--to", "consolidated")[0] == 0
    return (*b.cli("convert", b.tmp / "c", b.tmp / "out", "--to", "hf", "--weights", "module"), ["c", "--weights"])


@row("convert-tokenizers-of-another-vocabulary", 2)
def _(b):
    _, ck = b.trained()
    tok = b.tmp / "tok"
    shutil.copytree(b.toy["tokenizers"], tok)
    shutil.copy(other_vocab(b), tok / "vocab.json")
    return (*b.cli("convert", ck, b.tmp / "out", "--to", "consolidated", "--tokenizers", tok), ["tok"])


@row("convert-tp-does-not-divide-ffn", 2)
def _(b):  # a model whose FFN width (65) no tensor-parallel size but 1 divides
    recipe = b.recipe()
    assert b.cli("train", recipe, "model.ffn_hidden_size=65", "schedule.train_steps=1", "checkpoint.save_interval=1",
                 "schedule.warmup_steps=0")[0] == 0
    return (*b.cli("convert", b.tmp / "run" / "checkpoints", b.tmp / "out", "--to", "deepspeed", "--tp", "2"),
            ["--tp 2 does not divide the model's ffn=65"])


@row("convert-missing-tensor", 2)
def _(b):
    from safetensors.torch import load_file, save_file
    _, ck = b.trained()
    assert b.cli("convert", ck, b.tmp / "c", "--to", "consolidated")[0] == 0
    tensors = load_file(b.tmp / "c" / "model.safetensors")
    del tensors["layers.1.ffn.down_proj.0.weight"]  # an edited export without one tensor
    save_file(tensors, b.tmp / "c" / "model.safetensors")
    return (*b.cli("convert", b.tmp / "c", b.tmp / "out", "--to", "hf"),
            ["c", "missing parameter layers.1.ffn.down_proj.0.weight"])


@row("generate-not-a-checkpoint", 2)
def _(b):
    return (*b.cli("generate", b.tmp / "nope", "--tokenizers", b.toy["tokenizers"], "--caption", "a red circle"),
            ["nope", "not a megannm checkpoint"])


# ---------------------------------------------------------------------------------------------------------------------
# generate (megannm generate: options refused by the parser, inputs before anything is written)


@row("generate-temperature-negative", 2)
def _(b):
    return (*usage_error(b, "generate", b.tmp / "ck", "--tokenizers", b.tmp / "tok", "--caption", "x",
                         "--temperature", "-1"), ["--temperature", ">= 0", "-1"])


@row("generate-top-p-above-1", 2)
def _(b):
    return (*usage_error(b, "generate", b.tmp / "ck", "--tokenizers", b.tmp / "tok", "--caption", "x", "--top-p", "2"),
            ["--top-p", "(0, 1]", "got 2"])


@row("generate-top-k-negative", 2)
def _(b):
    return (*usage_error(b, "generate", b.tmp / "ck", "--tokenizers", b.tmp / "tok", "--caption", "x", "--top-k", "-5"),
            ["--top-k", "at least 0", "-5"])


@row("generate-max-new-tokens-zero", 2)
def _(b):
    return (*usage_error(b, "generate", b.tmp / "ck", "--tokenizers", b.tmp / "tok", "--image", "a.png",
                         "--max-new-tokens", "0"), ["--max-new-tokens", "at least 1", "got 0"])


@row("generate-image-missing", 2)
def _(b):
    _, ck = b.trained()
    return (*b.cli("generate", ck, "--tokenizers", b.toy["tokenizers"], "--image", b.tmp / "nope.png", "--out",
                   b.tmp / "out"), ["--image", "nope.png", "not found"])


@row("generate-caption-too-long", 2)
def _(b):
    _, ck = b.trained()
    result = b.cli("generate", ck, "--tokenizers", b.toy["tokenizers"], "--caption", "x" * 10_000, "--out",
                   b.tmp / "out")
    assert not (b.tmp / "out").exists(), "a refused generate left its output folder"
    return (*result, ["--caption 1", "10000 characters", "context of 96 tokens", "max_seq_len", "at most"])


@row("generate-answer-longer-than-the-context", 2)
def _(b):
    _, ck = b.trained()
    picture = b.toy["raw"] / "images" / "000000.png"
    return (*b.cli("generate", ck, "--tokenizers", b.toy["tokenizers"], "--image", picture, "--max-new-tokens", "500",
                   "--out", b.tmp / "out"), ["--max-new-tokens 500", "context of 96 tokens", "at most 29"])


@row("generate-caption-unseen-characters", 0)
def _(b):  # sampled all the same, with a warning naming the characters
    _, ck = b.trained()
    return (*b.cli("generate", ck, "--tokenizers", b.toy["tokenizers"], "--caption", "a 紫 circle", "--out",
                   b.tmp / "out"), ["warning", "--caption 1", "'紫' (U+7D2B)", "never saw"])


# ---------------------------------------------------------------------------------------------------------------------
# rewards and RL (megannm score / pairs; a GRPO rollout scores through the same Combined rewards)


REWARDS = """\
def boom(prompt, sample, truth):
    return 1 / 0


def nan(prompt, sample, truth):
    return float("nan")


def word(prompt, sample, truth):
    return "good"
"""


def score(b, rewards: str) -> tuple[int, str]:
    import sys
    _, ck = b.trained()
    b.write("my_rewards_mod.py", REWARDS)
    sys.path.insert(0, str(b.tmp))
    try:
        return b.cli("score", ck, "--tokenizers", b.toy["tokenizers"], "--prompts", "toy_caption", "--n", "2",
                     "--rewards", rewards, "--temperature", "0", "--max-new-tokens", "8")
    finally:
        sys.path.remove(str(b.tmp))
        sys.modules.pop("my_rewards_mod", None)


@row("reward-raises", 2)
def _(b):
    return (*score(b, "format,my_rewards_mod:boom"),
            ["rewards: my_rewards_mod:boom raised ZeroDivisionError", "division by zero", "on sample 0"])


@row("reward-not-a-number", 2)
def _(b):
    return (*score(b, "my_rewards_mod:nan"), ["my_rewards_mod:nan gave nan", "sample 0", "a finite number"])


@row("reward-a-string", 2)
def _(b):
    return (*score(b, "my_rewards_mod:word"), ["my_rewards_mod:word gave 'good' (str)", "sample 0", "finite number"])


@row("score-answer-longer-than-the-context", 2)
def _(b):
    _, ck = b.trained()
    return (*b.cli("score", ck, "--tokenizers", b.toy["tokenizers"], "--prompts", "toy_caption", "--n", "2",
                   "--rewards", "format", "--max-new-tokens", "32"),
            ["--max-new-tokens 32", "context of 96 tokens", "max_seq_len"])


def grpo(b, prompts: str, rewards: str) -> Path:
    return b.recipe(phase=f"{{kind: grpo, options: {{prompts_per_step: 1, group_size: 4, prompts: {prompts}, "
                          f"rewards: {rewards}}}}}")


@row("reward-unknown", 2)
def _(b):
    return (*b.cli("check", grpo(b, "toy_caption", "[formt]")),
            ["r.yaml", "phase.options.rewards", "unknown reward 'formt'", "format"])


@row("reward-cannot-import", 2)
def _(b):
    return (*b.cli("check", grpo(b, "toy_caption", "[nomod:f]")),
            ["r.yaml", "phase.options.rewards", "cannot import 'nomod:f'"])


@row("reward-server-unreachable", 1)
def _(b):
    import socket
    from megannm.rewards import Combined, Prompt, Sample
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score#retries=0"
    return (*b.call(Combined([url]).score_batch, [Prompt([1], "text", "q")], [Sample([1], "text", text="a")], [None]),
            [f"reward server http://127.0.0.1:{port}/score", "1 try"])


@row("rl-prompts-unknown", 2)
def _(b):
    return (*b.cli("check", grpo(b, "nope_prompts", "[format]")),
            ["r.yaml", "phase.options.prompts", "nope_prompts"])


# ---------------------------------------------------------------------------------------------------------------------
# Slurm (megannm stage; inside slurm/train.sbatch)


def chain(b, stages: str) -> Path:
    return b.write("chain.yaml", f"name: c\nrun_dir: {b.tmp / 'runs'}\nstages:\n{stages}")


@row("chain-unknown-key", 2)
def _(b):
    b.recipe()
    return (*b.cli("stage", chain(b, "  - {name: a, recipe: r.yaml, overides: []}\n"), "--dry-run"),
            ["chain.yaml", "stages.0.overides", "unknown key"])


@row("chain-stage-recipe-invalid", 2)
def _(b):
    b.recipe()
    return (*b.cli("stage", chain(b, "  - {name: a, recipe: r.yaml, overrides: [model.num_heads=5]}\n"),
                   "--dry-run"), ["chain.yaml", "stages.0.recipe", "model.num_heads"])


@row("chain-bad-stage-name", 2)
def _(b):
    b.recipe()
    return (*b.cli("stage", chain(b, "  - {name: 'a b', recipe: r.yaml}\n"), "--dry-run"),
            ["chain.yaml", "stages.0.name", "letters"])


@row("stage-without-slurm", 1)
def _(b, monkeypatch=None):
    b.recipe()
    path = os.environ["PATH"]
    os.environ["PATH"] = str(b.tmp / "no-bin")  # no sbatch here
    try:
        result = b.cli("stage", chain(b, "  - {name: a, recipe: r.yaml}\n"))
    finally:
        os.environ["PATH"] = path
    assert not (b.tmp / "runs").exists(), "a failed submission left its stage folder"
    return (*result, ["sbatch", "not found", "--dry-run"])


@row("job-too-small-for-the-recipe", 2)
def _(b):
    from megannm.cli.slurm import allocation as allocation_main
    recipe = b.recipe(parallel="{tensor_parallel: 2, zero_stage: 1}")
    err = io.StringIO()
    env = {"SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with redirect_stderr(err):
            code = allocation_main([str(recipe)])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return code, err.getvalue().strip(), ["r.yaml", "1 task(s)", "sbatch", "--ntasks-per-node=2"]


# --- runs (h-runs) ---


@row("run-folder-in-use", 2)
def _(b):
    import socket

    from megannm.train.runlock import RunLock
    recipe = b.recipe()
    held = RunLock([b.tmp / "run"])  # a live run of this very process holds the folder
    held.acquire()
    try:
        code, line = b.cli("train", recipe)
    finally:
        held.release()
    return code, line, [f"{b.tmp / 'run'}: another run is using this folder", f"host {socket.gethostname()}",
                        f"pid {os.getpid()} started ", "logging.dir / checkpoint.dir"]


@row("resume-other-data-parallel-size", 0)
def _(b):
    recipe, ckpts = b.trained()
    meta_path = ckpts / "step00000004" / "megannm.json"  # as if saved by 2 data-parallel ranks
    meta = json.loads(meta_path.read_text())
    meta["layout"].update(world_size=2, dp=2)
    meta_path.write_text(json.dumps(meta))
    os.environ.pop("MEGANNM_QUIET")
    try:
        code, out = b.cli("train", recipe, "--resume", "schedule.train_steps=5")
    finally:
        os.environ["MEGANNM_QUIET"] = "1"
    line = next((x for x in out.splitlines() if "elastic" in x), out)
    return code, line, ["[step 4] elastic", "step00000004: saved at data-parallel size 2, resumed at 1",
                        "Adam moments and step", "data position kept"]


# ---------------------------------------------------------------------------------------------------------------------
# litter: what killed runs left is reclaimed by the next run into the same folder, and only that


def test_killed_runs_litter_is_reclaimed_by_the_next_run_and_live_runs_are_left_alone(bench):
    """A SIGKILLed ``preprocess`` (its shard writer's folder) and ``tokenizers build`` (its staging folder) leave
    hidden folders named for their process; the next run into the same output removes those whose process is dead
    on this host, and keeps a live process's folder and one of another host."""
    import subprocess
    import sys
    from megannm.fileio import temp_name
    b = bench
    shutil.copytree(b.toy["raw"] / "images", b.tmp / "images")
    inp = b.write("in.jsonl", GOOD + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(DOC.parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    killed = []
    many = shutil.copy(b.toy["raw"] / "train.jsonl", b.tmp / "many.jsonl")  # 400 records: a long write
    for out, argv in ((b.tmp / "out", ["preprocess", "-i", many, "-o", b.tmp / "out", "-t", b.toy["tokenizers"],
                                       "--workers", "1", "--no-progress"]),
                      (b.tmp / "tok", ["tokenizers", "build", "-i", inp, "-o", b.tmp / "tok"])):
        # the run is killed (SIGKILL) as soon as its hidden folder appears: a crash mid-write
        p = subprocess.Popen([sys.executable, "-m", "megannm", *map(str, argv)], env=env, cwd=b.tmp,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        litter = [temp_name(out, tag).name.replace(str(os.getpid()), str(p.pid)) for tag in ("tmp", "build")]
        while p.poll() is None and not any((b.tmp / n).exists() for n in litter):
            time.sleep(0.002)
        p.kill()
        p.wait()
        left = [b.tmp / n for n in litter if (b.tmp / n).exists()]
        if not left:
            pytest.skip("the run finished before its hidden folder could be seen (a very fast machine)")
        killed += left
    sleeper = subprocess.Popen(["sleep", "300"])  # another run, still writing
    live = b.tmp / temp_name(b.tmp / "out").name.replace(str(os.getpid()), str(sleeper.pid))
    live.mkdir()
    other_host = b.tmp / f".out.tmp-{killed[0].name.split('-')[-1].split('@')[0]}@another-node"
    other_host.mkdir()
    try:
        assert preprocess(b, GOOD)[0] == 0
        assert b.cli("tokenizers", "build", "-i", inp, "-o", b.tmp / "tok", "--overwrite")[0] == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not [p for p in killed if p.exists()], "a killed run's hidden folder was not reclaimed"
    assert live.is_dir() and other_host.is_dir(), "a live run's (or another host's) folder was removed"
    assert (b.tmp / "out" / "manifest.json").is_file() and (b.tmp / "tok" / "vocab.json").is_file()
# --- safe loading (h-safe) ---
# Files that would run code to be loaded (docs/security.md; tests/test_security.py plants one in every kind of file
# and runs every command that reads it). The planted code would create MARKER.


@row("checkpoint-holds-code", 2)
def _(b):
    from tests.planted import plant_pickle
    recipe, ck = b.trained()
    plant_pickle(ck / "step00000004" / "mp_rank_00_model_states.pt", b.tmp / "MARKER")
    result = b.cli("train", recipe, "--resume")
    assert not (b.tmp / "MARKER").exists()
    return (*result, ["step00000004/mp_rank_00_model_states.pt", "pickled posix.system", "--trust-code"])


@row("convert-checkpoint-holds-code", 2)
def _(b):
    from tests.planted import plant_pickle
    _, ck = b.trained()
    plant_pickle(ck / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", b.tmp / "MARKER")
    result = b.cli("convert", ck, b.tmp / "out", "--to", "consolidated", "--weights", "master")
    assert not (b.tmp / "MARKER").exists()
    return (*result, ["step00000004/zero_pp_rank_0_mp_rank_00_optim_states.pt", "pickled posix.system",
                      "--trust-code"])


@row("image-tokenizer-kind-not-registered", 2)
def _(b):
    import sys

    from tests.planted import plant_kind
    _, ck = b.trained()
    tok = b.tmp / "tok"
    shutil.copytree(b.toy["tokenizers"], tok)
    kind = plant_kind(tok, b.tmp / "modules", b.tmp / "MARKER")
    sys.path.insert(0, str(b.tmp / "modules"))
    try:
        result = b.cli("generate", ck, "--tokenizers", tok, "--caption", "a red circle", "--out", b.tmp / "g")
    finally:
        sys.path.remove(str(b.tmp / "modules"))
    assert not (b.tmp / "MARKER").exists()
    return (*result, ["tok/image_tokenizer.npz", f"kind '{kind}'", "megannm.image_tokenizers", "--trust-code"])


@row("consolidated-truncated", 2)
def _(b):
    _, ck = b.trained()
    assert b.cli("convert", ck, b.tmp / "c", "--to", "consolidated")[0] == 0
    truncate(b.tmp / "c" / "model.safetensors")
    return (*b.cli("convert", b.tmp / "c", b.tmp / "out", "--to", "hf", "--tokenizers", b.toy["tokenizers"]),
            ["c/model.safetensors", "truncated", "its header describes"])


# ---------------------------------------------------------------------------------------------------------------------
# the table and the cases


def documented_ids() -> list[str]:
    return re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), re.M)


def test_every_row_of_the_table_has_a_case_and_every_case_a_row():
    ids = documented_ids()
    assert len(ids) == len(set(ids)) >= 50
    assert sorted(ids) == sorted(CASES)


PENDING: dict[str, str] = {}  # rows whose message still has to change (strict xfail until it does)


@pytest.mark.parametrize("rid", [pytest.param(r, marks=pytest.mark.xfail(strict=True, reason=PENDING[r]))
                                 if r in PENDING else r for r in CASES])
def test_row(bench, rid):
    f, code = CASES[rid]
    got, line, culprits = f(bench)
    assert got == code, f"{rid}: exit {got}, expected {code}: {line}"
    assert "\n" not in line.strip() and "Traceback" not in line
    missing = [c for c in culprits if c not in line]
    assert not missing, f"{rid}: {missing} not in: {line}"
    table = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z0-9-]+)` \| [^|]+ \| [^|]+ \| (\d+) \|",
                                                         DOC.read_text(), re.M)}
    assert int(table[rid]) == code, f"{rid}: docs/errors.md says exit {table[rid]}"


# ---------------------------------------------------------------------------------------------------------------------
# property-based: the shard reader and the recipe loader

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FEW = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """A data set of 60 random documents in many small frames over two shards, and the documents themselves."""
    from megannm.data.shards import write_dataset
    from megannm.vocab import Vocab
    vocab = Vocab(text_size=300, image_codes=64, image_grid=4)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab.size, rng.integers(1, 40)) for _ in range(60)]
    folder = tmp_path_factory.mktemp("props") / "set"
    write_dataset(folder, docs, vocab, docs_per_shard=30, frame_bytes=64)
    return folder, docs


def _read_all(folder: Path, docs) -> int:
    """Every document is either exactly what was written or a ShardError naming the file; nothing else. Returns
    how many documents were accounted for (all of them, or all at once when the data set refuses to open)."""
    from megannm.data.shards import ShardDataset, ShardError
    try:
        ds = ShardDataset(folder)
    except ShardError as e:
        assert str(folder) in str(e)
        return len(docs)
    seen = 0
    for i, want in enumerate(docs):
        try:
            tokens, _ = ds.get(i)
        except ShardError as e:
            assert "shard-0000" in str(e) and f"document {i}" in str(e), str(e)
            seen += 1
            continue
        np.testing.assert_array_equal(tokens, want, err_msg=f"document {i} read back wrong, silently")
        seen += 1
    ds.close()
    return seen


@FEW
@given(data=st.data())
def test_corrupt_or_truncated_shards_never_give_wrong_tokens(small_shards, tmp_path_factory, data):
    folder, docs = small_shards
    work = tmp_path_factory.mktemp("case") / "set"
    shutil.copytree(folder, work)
    name = data.draw(st.sampled_from(["shard-00000.zst", "shard-00001.zst", "shard-00000.idx"]))
    path = work / name
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans()):  # flip 1-3 bytes anywhere
        for at in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=3)):
            raw[at] ^= data.draw(st.integers(1, 255))
    else:  # cut it anywhere
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    path.write_bytes(bytes(raw))
    assert _read_all(work, docs) == len(docs)


KEYS = ["base", "model", "data", "optimizer", "schedule", "parallel", "phase", "checkpoint", "guard", "logging",
        "slurm", "kind", "options", "hidden_size", "num_heads", "lr", "train", "path", "seq_len", "zero_stage", "x"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 2 ** 40), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["12:00:00", "pretrain", "dpo", "auto", "~", "[", "{a: "]))
YAMLISH = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.integers(0, 3)), inner,
                                                 max_size=4)), max_leaves=12)


@FEW
@given(tree=YAMLISH, garbage=st.text(max_size=30), overrides=st.lists(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["model.hidden_size", "data.seq_len", "guard.spike_factor",
                                                         "phase.kind", "a.b.c", "seed"]),
              st.text(max_size=6)), max_size=2))
def test_random_yaml_never_gives_a_traceback(tmp_path_factory, tree, garbage, overrides):
    import yaml

    from megannm.config import RecipeError, load_recipe
    folder = tmp_path_factory.mktemp("yaml")
    for name, text in (("tree.yaml", yaml.safe_dump(tree)), ("garbage.yaml", garbage)):
        path = folder / name
        path.write_text(text)
        try:
            load_recipe(path, overrides)
        except RecipeError as e:  # what `megannm check` prints: the first line, naming the file (or the override)
            line = str(e).splitlines()[0]
            assert line.startswith(str(path)) or line.startswith("command line"), line
