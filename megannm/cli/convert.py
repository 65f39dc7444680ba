"""``megannm convert SRC DST --to {consolidated,deepspeed,hf}``: the parser; ``megannm.convert.route`` converts."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

EXAMPLES = """examples:
  megannm convert runs/joint/checkpoints out/joint --to consolidated --tokenizers tokenizers/
  megannm convert out/joint out/joint-tp2pp2 --to deepspeed --tp 2 --pp 2
  megannm convert out/joint out/joint-hf --to hf --tokenizers tokenizers/   (MoT: trust_remote_code=True)
  megannm convert llama/ out/start --to consolidated --image-tokenizer tokenizers/image_tokenizer.npz

A consolidated folder also starts training directly at any layout: checkpoint.init_from: <folder>."""


def convert(argv: list[str]) -> int:
    from megannm.checkpoint.tensors import DEFAULT_SHARD_SIZE
    from megannm.convert.route import DTYPES, TARGETS
    p = argparse.ArgumentParser(
        prog="megannm convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert checkpoints through the consolidated safetensors form: DeepSpeed (any tensor x pipeline "
                    "x ZeRO layout) <-> consolidated <-> Hugging Face; re-shard with --to deepspeed --tp N --pp N.",
        epilog=EXAMPLES)
    p.add_argument("src", type=Path, help="consolidated folder, megannm DeepSpeed checkpoint, or Hugging Face folder")
    p.add_argument("dst", type=Path, help="output folder (written to a temporary name, then renamed)")
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size of a --to deepspeed output (default 1)")
    p.add_argument("--pp", type=int, default=None, help="pipeline size of a --to deepspeed output (default 1)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the written weights (default: --to hf in the run's precision recorded in the "
                        "checkpoint, e.g. bf16 for a bf16 run; --to consolidated/deepspeed full precision, what a "
                        "next stage starts from: fp32 from a DeepSpeed checkpoint, as stored from a consolidated "
                        "folder)")
    p.add_argument("--weights", choices=("auto", "module", "master"), default="auto",
                   help="DeepSpeed source: 'module' reads the module files only (what the engine computes with: "
                        "fp32 under fp32, a bf16 copy under bf16, placeholders under ZeRO-3); 'master' the fp32 "
                        "master from the optimizer partitions (memory-mapped: only the master's bytes are used, a "
                        "third of those files beside the Adam moments, but the whole files are read once for their "
                        "crc32 check: ~6x the bytes of bf16 module files); "
                        "'auto' (default) reads the "
                        "partitions only where the module files cannot give --dtype exactly (ZeRO-3; bf16/fp16 "
                        "ZeRO-1/2 with --dtype fp32). The choice and its cost are printed in one line")
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)  # accepted for old scripts; unused
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--max-shard-size", default=str(DEFAULT_SHARD_SIZE),
                   help="safetensors file size above which weights are split into shards + index (e.g. 500MB)")
    p.add_argument("--tokenizers", type=Path, default=None,
                   help="tokenizer bundle (text/, image_tokenizer.*, vocab.json): exported beside --to hf weights "
                        "and kept inside a consolidated folder")
    p.add_argument("--image-tokenizer", type=Path, default=None,
                   help="Hugging Face LLM -> megannm: the image tokenizer whose codes extend the LLM's vocabulary")
    p.add_argument("--dense", action="store_true",
                   help="Hugging Face LLM -> megannm: the dense twin (default: MoT, every modality from the LLM)")
    p.add_argument("--seed", type=int, default=0, help="Hugging Face LLM -> megannm: noise seed of the new rows")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")  # megatron-core's import-time notices
    from megannm.convert.route import convert as run
    # progress on stdout: stderr holds only the one error line (and notes)
    run(a.src, a.dst, a.to, tp=a.tp, pp=a.pp, dtype=a.dtype, weights=a.weights, overwrite=a.overwrite,
        max_shard_size=a.max_shard_size, tokenizers=a.tokenizers, image_tokenizer=a.image_tokenizer, dense=a.dense,
        seed=a.seed, say=print, note=lambda line: print(line, file=sys.stderr))
    return 0
