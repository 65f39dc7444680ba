"""Where ``megannm preprocess`` reads records from: one module per kind, each through its own library, streaming.

Every source yields ``Item``s in a fixed order: the record dict that JSONL gives (``{"parts": [{"text": ...},
{"image": ...}]}`` or chat ``{"messages": [...]}``), so that tokenization is shared, with ``where`` naming the
file and line, tar and member, or file and row for error messages. An image is a path relative to ``base_dir``
(JSONL) or the image itself: encoded bytes (a .jpg/.png member, a Parquet cell) or a uint8 [H, W, 3] array (what
Energon decodes). A sample the source's library could not read arrives as an ``Item`` with ``error`` set, so that
``--skip-bad`` counts it like a record the tokenizer refuses.

Registry: ``SOURCES`` maps a kind to ``package.module:Class``; ``open_source`` picks the kind from the inputs when
it is not given (a .jsonl file, .tar shards, a folder ``energon prepare`` made, .parquet files, a folder
``datasets.save_to_disk`` made).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

SOURCES = {
    "jsonl": "megannm.data.sources.jsonl:JsonlSource",
    "webdataset": "megannm.data.sources.webdataset:WebDatasetSource",
    "energon": "megannm.data.sources.energon:EnergonSource",
    "parquet": "megannm.data.sources.parquet:ParquetSource",
    "hf": "megannm.data.sources.parquet:HFDiskSource",
}


@dataclass
class Item:
    """One sample: its record (a dict, or a JSONL line the worker parses), where it came from, what went wrong."""
    where: str
    record: Union[dict, str, None]
    base_dir: Optional[str] = None  # relative image paths start here (JSONL); None: images are bytes or arrays
    error: str = ""  # the source could not read this sample (the record is then None)


@dataclass
class SourceOptions:
    """How a non-JSONL sample becomes a record (``megannm preprocess`` options)."""
    image_column: str = "image"  # Parquet / HF column of encoded image bytes (or {"bytes", "path"} structs)
    text_column: str = "text"  # Parquet / HF column of the caption or text
    image_first: bool = False  # a caption pair as image then text (understanding) instead of text then image
    split: str = "train"  # the split of an Energon data set or a saved DatasetDict


class SourceError(ValueError):
    """Inputs that no source can read; one line naming the input."""


class Source:
    """Base class: ``__iter__`` yields Items; ``count()`` is the number of samples if cheap to know, else None;
    ``describe()`` is the manifest's ``sources`` list (per input: its name and the records read from it)."""
    kind = "source"

    def __init__(self, inputs: list[Path], options: SourceOptions):
        self.inputs, self.options = inputs, options
        self.counts: dict[str, int] = {}

    def __iter__(self) -> Iterator[Item]:
        raise NotImplementedError

    def count(self) -> Optional[int]:
        return None

    def describe(self) -> list[dict]:
        return [{"file": name, "records": n} for name, n in self.counts.items()]

    def _seen(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def caption_pair(self, text, image) -> dict:
        """A caption pair as a record, in the order the options ask for."""
        parts = [{"text": text}, {"image": image}]
        return {"parts": parts[::-1] if self.options.image_first else parts}


def require(module: str, package: str):
    """Import a source's library, or one line saying which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SourceError(f"this source needs the {package!r} package (pip install {package})") from None


def detect(inputs: list[Path]) -> str:
    """The kind of source the inputs are (all inputs must be of one kind)."""
    kinds = set()
    for p in inputs:
        if p.is_dir():
            if (p / ".nv-meta").is_dir():
                kinds.add("energon")
            elif (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
                kinds.add("hf")
            elif any(p.glob("*.tar")):
                kinds.add("webdataset")
            elif any(p.glob("*.parquet")):
                kinds.add("parquet")
            else:
                raise SourceError(f"{p}: a folder of neither .tar shards, .parquet files, an Energon data set "
                                  f"(.nv-meta/) nor a saved Hugging Face data set (dataset_info.json)")
        elif p.suffix in (".jsonl", ".json"):
            kinds.add("jsonl")
        elif p.suffix in (".tar", ".tgz"):
            kinds.add("webdataset")
        elif p.suffix == ".parquet":
            kinds.add("parquet")
        elif not p.exists():
            raise FileNotFoundError(f"{p}: input file not found")
        else:
            raise SourceError(f"{p}: unknown input type (expected .jsonl, .tar, .parquet or a data set folder); "
                              f"name the kind with --source")
    if len(kinds) != 1:
        raise SourceError(f"inputs are of several kinds ({', '.join(sorted(kinds))}): preprocess one kind at a time")
    return kinds.pop()


def open_source(inputs, kind: Optional[str] = None, options: Optional[SourceOptions] = None) -> Source:
    """The source of ``inputs`` (paths) of ``kind`` (None or "auto": detected)."""
    inputs = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    if not inputs:
        raise ValueError("preprocess: no input files")
    for p in inputs:
        if not p.exists():
            raise FileNotFoundError(f"{p}: input file not found")
    kind = detect(inputs) if kind in (None, "auto") else kind
    if kind not in SOURCES:
        raise SourceError(f"unknown source kind {kind!r} (expected one of {', '.join(SOURCES)})")
    module, name = SOURCES[kind].split(":")
    return getattr(importlib.import_module(module), name)(inputs, options or SourceOptions())
