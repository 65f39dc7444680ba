"""WebDataset tar shards through the ``webdataset`` library: samples grouped by key, members by extension.

A sample is a caption pair (an image member ``.jpg``/``.jpeg``/``.png``/``.webp`` and a ``.txt`` member or a
``.json`` member with a ``caption`` or ``text`` field), or a ``.json`` member holding a whole record (``parts`` or
``messages``) whose image parts name members of the same sample by extension (``{"image": "jpg"}``), for
interleaved data. Shards are read in the order given (a folder: its .tar files sorted by name), samples in stored
order. A shard the library cannot read ends with one bad Item naming it, and reading goes on with the next.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from megannm.data.sources import Item, Source, require

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def shard_paths(inputs: list[Path], pattern: str = "*.tar") -> list[Path]:
    out = []
    for p in inputs:
        out.extend(sorted(p.glob(pattern)) if p.is_dir() else [p])
    return out


class WebDatasetSource(Source):
    kind = "webdataset"

    def __iter__(self) -> Iterator[Item]:
        wds = require("webdataset", "webdataset")
        for shard in shard_paths(self.inputs):
            try:
                # per shard, so that a broken one is named and the next ones still read; no shuffling: stored order
                for sample in wds.WebDataset([str(shard)], shardshuffle=False, empty_check=False):
                    self._seen(shard.name)
                    yield self.item(shard.name, sample)
            except Exception as e:  # the library's own error: a truncated or corrupt tar
                yield Item(f"{shard.name}", None, error=f"unreadable tar shard ({type(e).__name__}: {e})")

    def item(self, shard: str, sample: dict) -> Item:
        key = sample["__key__"]
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        where = f"{shard}:{key}.{image_ext}" if image_ext else f"{shard}:{key}"
        meta = None
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return Item(f"{shard}:{key}.json", None, error=f"not valid JSON ({e})")
        if isinstance(meta, dict) and ("parts" in meta or "messages" in meta):
            return self._record(where, meta, members)
        text = members.get("txt")
        if text is not None:
            text = text.decode("utf-8", errors="strict") if isinstance(text, bytes) else text
        elif isinstance(meta, dict):
            text = meta.get("caption", meta.get("text"))
        if image_ext is None or text is None:
            missing = "image member (.jpg/.png/.webp)" if image_ext is None else "caption (.txt member or json caption)"
            return Item(where, None, error=f"sample has no {missing} (members: {', '.join(sorted(members))})")
        return Item(where, self.caption_pair(text, members[image_ext]))

    @staticmethod
    def _record(where: str, record: dict, members: dict) -> Item:
        """A whole record from the sample's .json: its image parts name members, replaced by their bytes."""
        def fill(part):
            if isinstance(part, dict) and "image" in part and isinstance(part["image"], str):
                name = part["image"].lstrip(".")
                if name not in members:
                    raise KeyError(name)
                return {**part, "image": members[name]}
            return part

        try:
            if "parts" in record:
                return Item(where, {**record, "parts": [fill(p) for p in record["parts"]]})
            messages = []
            for m in record["messages"]:
                if isinstance(m, dict) and isinstance(m.get("content"), list):
                    m = {**m, "content": [fill(p) for p in m["content"]]}
                messages.append(m)
            return Item(where, {**record, "messages": messages})
        except KeyError as e:
            return Item(where, None, error=f"image member {e.args[0]!r} is not in the sample (members: "
                                           f"{', '.join(sorted(members))})")
