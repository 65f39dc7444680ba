"""megatron-energon data sets (a folder prepared with ``energon prepare``) through energon's own reader.

The split (``--split``, default train) is read once in stored order: ``get_val_dataset`` with one rank, no energon
worker processes (ours tokenise), images decoded by energon to uint8 [H, W, 3] arrays (``rgb8``). Sample types:
``CaptioningSample`` (image + caption) -> a caption pair; ``InterleavedSample`` (a sequence of texts and images)
-> parts in order; ``VQASample`` (image, context, answers) -> a user turn (image, question) and an assistant turn.
A sample energon's reader fails on reaches its error handler and becomes a bad Item naming its tar and members.
"""
from __future__ import annotations

import warnings
from typing import Iterator, Optional

import numpy as np

from megannm.data.sources import Item, Source, SourceError, require


def _where(sources) -> str:
    if not sources:
        return "?"
    s = sources[0]
    return f"{s.shard_name}:{','.join(s.file_names)}"


class EnergonSource(Source):
    kind = "energon"

    def _dataset(self, path, errors: list):
        energon = require("megatron.energon", "megatron-energon")
        check_prepared(path, self.options.split)
        from megatron.energon.flavors.webdataset.sample_decoder import SampleDecoder
        from megatron.energon.task_encoder.base import DefaultTaskEncoder

        def on_error(exc, sample, sources):  # energon skips the sample; we count it (and may stop) in order
            errors.append(Item(_where(sources), None, error=f"{type(exc).__name__}: {exc}"))

        encoder = DefaultTaskEncoder()
        encoder.decoder = SampleDecoder(image_decode="rgb8")
        config = energon.WorkerConfig(rank=0, world_size=1, num_workers=0, global_error_handler=on_error)
        ds = energon.get_val_dataset(str(path), split_part=self.options.split, worker_config=config,
                                     batch_size=None, task_encoder=encoder)
        with warnings.catch_warnings():  # torch's DataLoader warns about pinned memory without a GPU: not ours
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            return iter(energon.get_loader(ds))

    def __iter__(self) -> Iterator[Item]:
        for path in self.inputs:
            errors: list[Item] = []
            for sample in self._dataset(path, errors):
                yield from errors  # what failed before this sample, in order
                errors.clear()
                where = _where(getattr(sample, "__sources__", None))
                self._seen(path.name)
                yield self.item(where, sample)
            yield from errors

    def item(self, where: str, sample) -> Item:
        name = type(sample).__name__
        if hasattr(sample, "caption") and hasattr(sample, "image"):
            return Item(where, self.caption_pair(sample.caption, _image(sample.image)))
        if hasattr(sample, "sequence"):
            parts = [{"text": x} if isinstance(x, str) else {"image": _image(x)} for x in sample.sequence]
            return Item(where, {"parts": parts})
        if hasattr(sample, "context") and hasattr(sample, "image"):
            answers = sample.answers if isinstance(sample.answers, str) else (sample.answers or [""])[0]
            return Item(where, {"messages": [
                {"role": "user", "content": [{"type": "image", "image": _image(sample.image)},
                                             {"type": "text", "text": sample.context}]},
                {"role": "assistant", "content": answers}]})
        raise SourceError(f"{where}: energon sample type {name} is not supported (CaptioningSample, "
                          f"InterleavedSample or VQASample)")

    def count(self) -> Optional[int]:
        return None


def check_prepared(path, split: str) -> None:
    """A folder ``energon prepare`` made, or one line naming the folder and what it lacks (energon's own "Invalid
    dataset at ..." names neither). A metadataset (a .yaml file) is energon's to check."""
    from pathlib import Path
    path = Path(path)
    if not path.is_dir():
        return
    meta = path / ".nv-meta"
    missing = [] if meta.is_dir() else [".nv-meta/"]
    if meta.is_dir():
        if not ((meta / ".info.json").is_file() or (meta / ".info.yaml").is_file()):
            missing.append(".nv-meta/.info.json (or .info.yaml)")
        missing += [f".nv-meta/{f}" for f in ("dataset.yaml", "split.yaml") if not (meta / f).is_file()]
    if missing:
        raise SourceError(f"{path}: not an Energon data set (no {', '.join(missing)}; make one with `energon prepare "
                          f"{path}`, or name the input's kind with --source)")


def _image(x) -> np.ndarray:
    """An energon image (rgb8: uint8 [H, W, 3]; a torch tensor [C, H, W] in 0..1 from other decoders) as uint8 HWC."""
    if hasattr(x, "numpy"):  # torch
        x = x.detach().cpu().numpy()
        if x.ndim == 3 and x.shape[0] in (1, 3):
            x = np.moveaxis(x, 0, -1)
        if x.dtype != np.uint8:
            x = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    return np.asarray(x)
