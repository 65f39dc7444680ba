"""Records -> a shard folder (what ``megannm preprocess`` runs).

Records come from a source (``megannm.data.sources``: JSONL, WebDataset tar shards, an Energon data set, Parquet
files or a saved Hugging Face data set), streamed in a fixed order and cut into fixed-size chunks; worker processes
tokenise chunks and the main process writes their documents in chunk order (``Pool.imap`` keeps it). The output is
therefore byte-identical whatever the number of workers. A bad sample (one the source's library cannot read, or
the tokenizer refuses) is one line naming its file and line, tar and member, or file and row: with ``skip_bad=0``
it aborts the whole run, and since the writer works in a temporary folder, nothing partial is left behind; with
``skip_bad=N`` up to N are skipped (each printed, all counted in the manifest's ``bad_samples``), in input order, so
which ones are skipped does not depend on the workers either.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import sys
from pathlib import Path

from megannm.data.shards import ShardWriter
from megannm.data.sources import SourceOptions, open_source
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


def _encode(records: list, base: Path, wheres: list[str]) -> list:
    dtype = _TOK.vocab.token_dtype()
    # narrowed before pickling; continuous images add the document's latents (float16) as a third element
    return [(d[0].astype(dtype), *d[1:]) for d in encode_records(records, _TOK, base, wheres)]


def _encode_chunk(chunk: tuple[str | None, list[tuple[str, object, str]]]) -> list[tuple]:
    """(base folder, [(where, record or JSONL line, source error)]) -> per item ``(where, tokens, mask)``, or
    ``(where, message)`` for a bad one. A chunk with a bad record is encoded one record at a time to find every
    bad one, then its good records again as one batch (the same codes as a chunk without the bad ones)."""
    base, items = chunk
    out: list = [None] * len(items)
    good: list[tuple[int, dict, str]] = []
    for k, (where, record, error) in enumerate(items):
        if error:
            out[k] = (where, f"{where}: {error}")
            continue
        if isinstance(record, str):
            try:
                record = json.loads(record)
            except json.JSONDecodeError as e:
                out[k] = (where, f"{where}: not valid JSON ({e.msg}, column {e.colno})")
                continue
        good.append((k, record, where))
    records = [r for _, r, _ in good]
    folder = Path(base) if base is not None else Path(".")  # (only a path names a file; bytes and arrays are images)
    try:
        docs = _encode(records, folder, [w for *_, w in good])
    except RecordError:
        keep = []
        for (k, _, where), record in zip(good, records):
            try:
                _encode([record], folder, [where])
                keep.append((k, record, where))
            except RecordError as e:  # (an object's address in a library's message would make the manifest vary)
                out[k] = (where, re.sub(r" at 0x[0-9a-fA-F]+", "", str(e).strip().splitlines()[0]))
        docs = _encode([r for _, r, _ in keep], folder, [w for *_, w in keep]) if keep else []
        good = keep
    for (k, _, where), doc in zip(good, docs):
        out[k] = (where, *doc)  # (tokens, mask[, latents])
    return out


def _chunks(items, size: int):
    """(base folder, [(where, record, error)]) chunks of ``size`` items, never spanning two base folders (image
    paths are relative to their file)."""
    base, chunk = None, []
    for item in items:
        if chunk and item.base_dir != base:
            yield base, chunk
            chunk = []
        base = item.base_dir
        chunk.append((item.where, item.record, item.error))
        if len(chunk) == size:
            yield base, chunk
            chunk = []
    if chunk:
        yield base, chunk


def preprocess(inputs, out_dir, tokenizers_dir, workers: int = 1, docs_per_shard: int = 100_000,
               progress: bool = True, overwrite: bool = False, chunk_records: int = CHUNK_RECORDS, *,
               source: str | None = None, options: SourceOptions | None = None, skip_bad: int = 0,
               say=None) -> dict:
    """Tokenise ``inputs`` (files or folders of one ``source`` kind, None: detected) into a shard folder
    ``out_dir``; returns its manifest.

    Image paths inside a JSONL record are relative to its file. ``workers`` processes tokenise (1 = in this
    process); the output does not depend on it. ``skip_bad``: how many bad samples to skip (each reported
    through ``say``, default stderr) before the next one aborts the run."""
    global _TOK
    src = open_source(inputs, source, options)
    out_dir, tokenizers_dir = Path(out_dir), Path(tokenizers_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (remove it, or pass --overwrite)")
    say = say or (lambda line: print(f"megannm preprocess: skipped: {line}", file=sys.stderr))
    tok = Tokenizers.load(tokenizers_dir)
    total = src.count()
    metadata = {"sources": [], "source_kind": src.kind, "tokenizers_fingerprint": tok.vocab.fingerprint}

    from tqdm import tqdm
    bar = tqdm(total=total, unit="sample", desc=f"preprocess {out_dir.name}", disable=not progress,
               dynamic_ncols=True)  # its rate is samples/s
    writer = ShardWriter(out_dir, tok.vocab, docs_per_shard=docs_per_shard, overwrite=overwrite, metadata=metadata)
    pool = None
    try:
        chunks = _chunks(src, chunk_records)
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
        bad: list[str] = []
        written = 0
        for docs in results:
            for where, *doc in docs:
                if len(doc) == 1:  # a bad sample: its one-line message
                    bad.append(doc[0])
                    if len(bad) > skip_bad:
                        raise RecordError(doc[0] if not skip_bad else
                                          f"{doc[0]} (bad sample {len(bad)}, more than --skip-bad {skip_bad})")
                    say(doc[0])
                    continue
                writer.add(*doc, where=where)
                written += 1
            bar.update(len(docs))
        if not written:  # an empty data set would only be refused later, by training
            raise RecordError(f"{', '.join(str(i) for i in inputs)}: no records in the inputs (nothing to write)")
        # known once everything is read (a streaming source counts as it goes)
        writer.metadata["sources"] = src.describe()
        writer.metadata["bad_samples"] = {"skipped": len(bad), "limit": skip_bad, "first": bad[:20]}
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

