"""``megannm generate`` and ``megannm evaluate``: a checkpoint's samples, and its scores."""
from __future__ import annotations

import argparse
from typing import Optional

from megannm.cli.options import float_in, int_at_least
from megannm.generate import DEFAULT_CFG_SCALE


def generate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm generate", description="Sample pictures for captions, or captions for "
                                                                     "pictures, from a checkpoint.")
    p.add_argument("checkpoint", help="checkpoint folder (or its parent holding `latest`)")
    p.add_argument("--tokenizers", required=True, help="tokenizer bundle folder (text/, image tokenizer, vocab.json)")
    p.add_argument("--caption", action="extend", nargs="+", default=[],
                   help="text -> image: generate an image for each caption (repeatable)")
    p.add_argument("--image", action="extend", nargs="+", default=[], help="image -> text: caption each picture")
    p.add_argument("--prompts", default=None, help='a JSONL of prompts, one {"caption": TEXT} or {"image": PATH} '
                                                   'a line (with --caption/--image: all of them, one results file)')
    p.add_argument("--batch-size", type=int, default=64, help="rows decoding together (KV cache slots)")
    p.add_argument("--out", default="generated", help="folder for PNGs and results.json")
    p.add_argument("--cfg-scale", type=float_in(0), default=DEFAULT_CFG_SCALE,
                   help=f"classifier-free guidance scale (1 = off; default {DEFAULT_CFG_SCALE:g})")
    p.add_argument("--temperature", type=float_in(0, note=" (0 = greedy)"), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int_at_least(0, " (0 = off)"), default=0, help="0 = off")
    p.add_argument("--top-p", type=float_in(0, 1, low_open=True, note=" (1 = off)"), default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=32)
    p.add_argument("--verbose", action="store_true", help="keep library warnings")
    a = p.parse_args(argv)
    from megannm.generate import SamplingConfig, generate_files, read_prompts
    captions, images = list(a.caption), list(a.image)
    if a.prompts:
        more = read_prompts(a.prompts)
        captions, images = captions + more[0], images + more[1]
    if a.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive (got {a.batch_size})")
    sampling = SamplingConfig.from_options(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    generate_files(a.checkpoint, a.tokenizers, a.out, captions=captions, images=images, sampling=sampling,
                   cfg_scale=a.cfg_scale, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    return 0


def _evaluate_parser(bench, names: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megannm evaluate", description="Evaluate a checkpoint: a registered benchmark, "
                                "or losses and caption exact match over your own records.",
                                epilog=bench.description if bench else None)
    p.add_argument("checkpoint", help="checkpoint folder (or its parent holding `latest`)")
    p.add_argument("--tokenizers", required=True, help="tokenizer bundle folder")
    p.add_argument("--benchmark", default=None, help=f"a registered benchmark ({names}) or package.module:object; "
                                                     f"--benchmark NAME --help lists its own options")
    p.add_argument("--data", action="append", default=[], metavar="[NAME=]RECORDS.jsonl",
                   help="your own records, one split per file (repeatable)")
    p.add_argument("--out", default="eval", help="folder for report.json (and samples.png)")
    p.add_argument("--n", type=int_at_least(1), default=None,
                   help="examples (per split); default: the benchmark's own, or every record")
    p.add_argument("--seed", type=int, default=None, help="sampling seed; default: the benchmark's own, or 0")
    p.add_argument("--temperature", type=float_in(0, note=" (0 = greedy)"), default=0.0, help="0 = greedy")
    p.add_argument("--cfg-scale", type=float_in(0), default=DEFAULT_CFG_SCALE,
                   help=f"classifier-free guidance for images (1 = off; default {DEFAULT_CFG_SCALE:g}, as generate)")
    p.add_argument("--verbose", action="store_true", help="keep library warnings")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=32, help="longest generated caption (--data)")
    if bench is not None and bench.add_arguments is not None:
        bench.add_arguments(p)
    return p


def evaluate(argv: list[str]) -> int:
    from megannm.evaluate import benchmarks, evaluate_checkpoint, get_benchmark
    # The benchmark is known before the full parse so that its own options (and their --help) are part of it.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--benchmark", default=None)
    name: Optional[str] = pre.parse_known_args(argv)[0].benchmark
    bench = get_benchmark(name) if name else None
    a = _evaluate_parser(bench, ", ".join(sorted(benchmarks())) or "none installed").parse_args(argv)
    _, table, path = evaluate_checkpoint(a.checkpoint, a.tokenizers, a.out, benchmark=bench, options=a,
                                         data=a.data, n=a.n, seed=a.seed, temperature=a.temperature,
                                         cfg_scale=a.cfg_scale, max_new_tokens=a.max_new_tokens)
    print(table)
    picture = path.parent / "samples.png"
    print(f"report: {path}" + (f"  picture: {picture}" if picture.exists() else ""))
    return 0
