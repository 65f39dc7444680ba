"""Parquet files (through pyarrow) and Hugging Face data sets saved on disk (through ``datasets``).

Each row is a caption pair: the ``--image-column`` (encoded image bytes, or a ``{"bytes", "path"}`` struct as the
``datasets`` Image feature stores it) and the ``--text-column``; a row with no image is a text-only record. Rows
are read in stored order, a batch at a time (streaming: a file never has to fit in memory), and named
``file:row N`` (0-based) in messages.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

from megannm.data.sources import Item, Source, SourceError, require

BATCH_ROWS = 256


def _files(inputs: list[Path]) -> list[Path]:
    out = []
    for p in inputs:
        out.extend(sorted(p.glob("*.parquet")) if p.is_dir() else [p])
    return out


class ParquetSource(Source):
    kind = "parquet"

    def _columns(self, names: list[str], where: str) -> list[str]:
        o = self.options
        if o.text_column not in names:
            raise SourceError(f"{where}: no text column {o.text_column!r} (columns: {', '.join(names)}); "
                              f"name it with --text-column")
        return [c for c in (o.image_column, o.text_column) if c in names]

    def rows(self, name: str, batches) -> Iterator[Item]:
        """Items of the rows of a stream of pyarrow record batches or tables."""
        o, row = self.options, 0
        for batch in batches:
            texts = batch.column(o.text_column).to_pylist()
            images = batch.column(o.image_column).to_pylist() if o.image_column in batch.schema.names else \
                [None] * len(texts)
            for text, image in zip(texts, images):
                self._seen(name)
                yield self.row_item(f"{name}:row {row}", text, image)
                row += 1

    def row_item(self, where: str, text, image) -> Item:
        if isinstance(image, dict):  # the datasets Image feature: encoded bytes, or a path to a file
            image = image.get("bytes") or image.get("path")
        if image is None:
            return Item(where, {"parts": [{"text": text}]})
        if not isinstance(image, (bytes, str)):
            return Item(where, None, error=f"image cell is {type(image).__name__}, expected encoded bytes")
        return Item(where, self.caption_pair(text, image))

    def __iter__(self) -> Iterator[Item]:
        pq = require("pyarrow.parquet", "pyarrow")
        for path in _files(self.inputs):
            f = pq.ParquetFile(path)
            cols = self._columns(f.schema_arrow.names, str(path))
            yield from self.rows(path.name, f.iter_batches(batch_size=BATCH_ROWS, columns=cols))

    def count(self) -> Optional[int]:
        pq = require("pyarrow.parquet", "pyarrow")
        return sum(pq.ParquetFile(p).metadata.num_rows for p in _files(self.inputs))


class HFDiskSource(ParquetSource):
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict: ``--split`` picks one)."""
    kind = "hf"

    def _open(self, path: Path):
        datasets = require("datasets", "datasets")
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if self.options.split not in ds:
                raise SourceError(f"{path}: no split {self.options.split!r} (splits: {', '.join(ds)}); name it "
                                  f"with --split")
            ds = ds[self.options.split]
        self._columns(list(ds.column_names), str(path))
        return ds

    def __iter__(self) -> Iterator[Item]:
        for path in self.inputs:
            ds = self._open(path)
            # the arrow format: image cells stay encoded bytes (no decoding to PIL and back)
            yield from self.rows(path.name, ds.with_format("arrow").iter(batch_size=BATCH_ROWS))

    def count(self) -> Optional[int]:
        return sum(len(self._open(p)) for p in self.inputs)
