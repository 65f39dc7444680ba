"""JSONL records -> a shard folder (``megannm preprocess``).

Records are cut into fixed-size chunks in file order; worker processes tokenise chunks and the main process writes
their documents in chunk order (``Pool.imap`` keeps it). The output is therefore byte-identical whatever the number
of workers. Any bad record aborts the whole run with one line ``file:line: what``, and since the writer works in a
temporary folder, nothing partial is left behind.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np

from megannm.data.shards import ShardError, ShardWriter
from megannm.data.tokenize import RecordError, Tokenizers, encode_records

CHUNK_RECORDS = 256  # records per worker task: big enough to batch image encoding, small enough to balance

_TOK: Tokenizers | None = None  # the worker's tokenizers (inherited on fork, loaded by the initializer otherwise)


def _init_worker(tokenizers_dir: str) -> None:
    global _TOK
    if _TOK is None:
        _TOK = Tokenizers.load(tokenizers_dir)
    torch = sys.modules.get("torch")  # only if an image tokenizer uses it (importing it here costs seconds)
    if torch is not None:
        torch.set_num_threads(1)  # one thread per worker: the workers are the parallelism


def _encode_chunk(chunk: tuple[str, list[tuple[int, str]]]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    source, lines = chunk
    path = Path(source)
    records, wheres = [], []
    for lineno, line in lines:
        where = f"{path.name}:{lineno}"
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise RecordError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        wheres.append(where)
    docs = encode_records(records, _TOK, path.parent, wheres)
    dtype = _TOK.vocab.token_dtype()
    return [(t.astype(dtype), m) for t, m in docs]  # narrow before pickling back to the parent


def _chunks(inputs: list[Path], size: int):
    """(file, [(line number, text)]) chunks, never spanning two files (image paths are relative to their file)."""
    for path in inputs:
        lines = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    lines.append((lineno, line))
                    if len(lines) == size:
                        yield str(path), lines
                        lines = []
        if lines:
            yield str(path), lines


def _count_records(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def preprocess(inputs, out_dir, tokenizers_dir, workers: int = 1, docs_per_shard: int = 100_000,
               progress: bool = True, overwrite: bool = False, chunk_records: int = CHUNK_RECORDS) -> dict:
    """Tokenise JSONL ``inputs`` into a shard folder ``out_dir``; returns its manifest.

    Image paths inside a record are relative to its JSONL file. ``workers`` processes tokenise (1 = in this
    process); the output does not depend on it."""
    global _TOK
    inputs = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    if not inputs:
        raise ValueError("preprocess: no input files")
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: input file not found")
    out_dir, tokenizers_dir = Path(out_dir), Path(tokenizers_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (remove it, or pass --overwrite)")
    tok = Tokenizers.load(tokenizers_dir)
    counts = [_count_records(p) for p in inputs]
    metadata = {"sources": [{"file": p.name, "records": n} for p, n in zip(inputs, counts)],
                "tokenizers_fingerprint": tok.vocab.fingerprint}

    from tqdm import tqdm
    bar = tqdm(total=sum(counts), unit="rec", desc=f"preprocess {out_dir.name}", disable=not progress,
               dynamic_ncols=True)
    writer = ShardWriter(out_dir, tok.vocab, docs_per_shard=docs_per_shard, overwrite=overwrite, metadata=metadata)
    pool = None
    try:
        chunks = _chunks(inputs, chunk_records)
        if workers <= 1:
            _TOK = tok
            results = map(_encode_chunk, chunks)
        else:
            # fork shares the loaded tokenizers for free; the Rust tokenizer must not have threads across the fork
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            _TOK = tok if method == "fork" else None
            pool = mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(str(tokenizers_dir),))
            results = pool.imap(_encode_chunk, chunks)  # ordered: the output never depends on scheduling
        for docs in results:
            for tokens, mask in docs:
                writer.add(tokens, mask)
            bar.update(len(docs))
        manifest = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        _TOK = None
    return manifest


def preprocess_main(argv: list[str] | None = None) -> int:
    """``megannm preprocess`` / ``tools/preprocess_data.py``: exit 0, or 2 with one line on bad input."""
    p = argparse.ArgumentParser(prog="megannm preprocess",
                                description="Tokenise JSONL records (interleaved 'parts' or chat 'messages') into a "
                                            "folder of zstd token shards with a manifest.")
    p.add_argument("--input", "-i", required=True, nargs="+", action="extend", type=Path,
                   help="JSONL file(s); image paths in records are relative to their file")
    p.add_argument("--output", "-o", required=True, type=Path, help="shard folder to create")
    p.add_argument("--tokenizers", "-t", required=True, type=Path,
                   help="tokenizer bundle folder (text/, image_tokenizer.*, vocab.json)")
    p.add_argument("--workers", "-w", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                   help="tokenising processes (default: CPUs - 1); the output does not depend on it")
    p.add_argument("--docs-per-shard", type=int, default=100_000, help="documents per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        m = preprocess(a.input, a.output, a.tokenizers, workers=a.workers, docs_per_shard=a.docs_per_shard,
                       progress=not a.no_progress and sys.stderr.isatty(), overwrite=a.overwrite)
    except (RecordError, ShardError, ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        if os.environ.get("MEGANNM_TRACEBACK") == "1":
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"megannm preprocess: error: {msg}", file=sys.stderr)
        return 2
    print(f"{a.output}: {m['num_docs']} documents, {m['num_tokens']} tokens, {len(m['shards'])} shard(s), "
          f"{sum(s['bytes'] for s in m['shards'])} bytes (vocabulary {m['vocab_fingerprint']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(preprocess_main())
