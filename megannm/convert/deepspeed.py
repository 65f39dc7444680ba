"""megannm's DeepSpeed checkpoints <-> the consolidated form, and ``load_model`` for generate / evaluate / demo.

``open_checkpoint`` and ``rank_state`` (one tensor rank's weights under canonical names) are the readers that
``megannm.train.load`` also uses to load a checkpoint module-only into a live engine. File names are
``megannm.checkpoint``'s.

Reading (``read_deepspeed``), per tensor-parallel rank, then merged with ``reshard.merge_states``:

- ZeRO 0-2, fp32: the module weights in ``mp_rank_XX_model_states.pt`` are the trained fp32 weights themselves
  (ZeRO-1/2 copy the updated fp32 partitions back into the module after every step).
- ZeRO-3 (and ZeRO-1/2 under bf16): the module files hold empty placeholders (or bf16 copies); the fp32 master
  weights are gathered from the ``*_optim_states.pt`` partitions by DeepSpeed's own
  ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``. That function globs every
  ``*_model_states.pt`` / ``*_optim_states.pt`` of a tag and expects one file per data-parallel rank, so at TP > 1
  (one set of files per ``mp_rank_XX``) it refuses ("Expected 2 of '*_optim_states.pt' ... found 4"); it is
  therefore called once per TP rank on a folder of symlinks to that rank's files only.
- ZeRO-1 under bf16/fp16 with fp32 accumulation (the default): DeepSpeed's BF16_Optimizer keeps its fp32 master
  in a format ``zero_to_fp32`` does not read (no ``zero_stage`` in it); ``_fp32_from_bf16_optimizer`` joins its
  per-rank partitions by their ``param_slice_mappings``.
- ZeRO-0 under bf16, and pipelines under bf16: ``zero_to_fp32`` cannot parse pipeline model files (``module:
  None``); the bf16 module weights are used (upcast to fp32: exact as bf16 values, the master's extra bits are
  lost) and the source records ``weights: ... (bf16)``.
- Pipeline (PP > 1): DeepSpeed writes one ``layer_{c:02d}-model_{tp:02d}-model_states.pt`` per chain position c and
  TP rank, names inside the stage; ``megannm.model.pipeline.pipeline_to_canonical`` maps them.

Writing (``write_deepspeed``): a DeepSpeed checkpoint dir (``latest`` + ``step<N>/``) at any TP x PP holding the
module weights only, in DeepSpeed's own file layout (``mp_rank_XX_model_states.pt``; under a pipeline the layer
files plus one ``mp_rank_XX`` file per stage and TP rank with ``module: None``), any data-parallel size. Its
``megannm.json`` marks it ``module_only``: ``init_from`` (``megannm.train.load``) loads the weights at any ZeRO stage
with a fresh optimizer and schedule; ``--resume`` also continues the step count, the data position and the
learning-rate schedule from the source's step, with fresh Adam moments (the optimizer state does not survive the
consolidated form).
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from megannm import checkpoint
from megannm.checkpoint import integrity, layer_file, module_state_file
from megannm.convert import reshard
from megannm.convert.consolidated import Consolidated, Opened, normalise_args
from megannm.convert.files import ConvertError
from megannm.fileio import atomic_output
from megannm.vocab import Vocab


def _torch_load(path: Path):
    try:  # memory-mapped: tensors are read from the page cache as they are used, not copied up front
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing file") from None
    except Exception as e:  # truncated or not a torch file
        raise ConvertError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def read_module_state(ckpt: Path, tp_rank: int) -> dict:
    path = module_state_file(ckpt, tp_rank)
    if not path.exists():
        raise ConvertError(f"{ckpt}: no module weights for tensor rank {tp_rank} ({path.name} missing)")
    state = _torch_load(path)
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise ConvertError(f"{path}: no module weights in it (key 'module')")
    return state["module"]


# ---------------------------------------------------------------------------------------------------------------------
# reading


def _fp32_from_zero(ckpt: Path, tp_rank: int) -> dict:
    """DeepSpeed's own fp32 gathering over the data-parallel partitions of ONE tensor-parallel rank."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    mine = checkpoint.zero_files(ckpt, tp_rank)
    if not any(p.name.endswith("_optim_states.pt") for p in mine):
        raise ConvertError(f"{ckpt}: no *_mp_rank_{tp_rank:02d}_optim_states.pt (the fp32 weights of tensor rank "
                           f"{tp_rank} live in the ZeRO optimizer partitions)")
    with tempfile.TemporaryDirectory(prefix="megannm-zero-") as tmp:
        tag = Path(tmp) / ckpt.name
        tag.mkdir()
        for p in mine:
            os.symlink(p.resolve(), tag / p.name)
        quiet = io.StringIO()
        old = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"
        try:
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                state = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=ckpt.name)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise ConvertError(f"{ckpt}: DeepSpeed's zero_to_fp32 failed for tensor rank {tp_rank}: "
                               f"{str(e).splitlines()[0]}") from None
        finally:
            if old is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = old
    return dict(state)


def _bf16_optimizer_files(ckpt: Path, tp_rank: int) -> list[Path]:
    """The data-parallel partitions of DeepSpeed's BF16_Optimizer (bf16/fp16 at ZeRO 1 with fp32 accumulation), in
    data-parallel rank order: ``bf16_zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt``."""
    files = ckpt.glob(f"bf16_zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt")
    return sorted(files, key=lambda f: int(f.name.split("_")[4]))


def _fp32_from_bf16_optimizer(ckpt: Path, tp_rank: int) -> dict:
    """The fp32 master weights of one tensor rank from BF16_Optimizer's partitions, which ``zero_to_fp32`` does not
    read (their optimizer state has no ``zero_stage``). Each data-parallel rank's file holds, per parameter group,
    its flat fp32 partition and where each parameter's fragment lies in it (``param_slice_mappings``); a parameter's
    fragments joined in rank order are the parameter, shaped as the module file's ``param_shapes`` say."""
    shapes = {}
    for group in _torch_load(module_state_file(ckpt, tp_rank)).get("param_shapes") or []:
        shapes.update(group)
    pieces: dict = {}
    for f in _bf16_optimizer_files(ckpt, tp_rank):
        opt = _torch_load(f).get("optimizer_state_dict") or {}
        if "single_partition_of_fp32_groups" not in opt:
            raise ConvertError(f"{f}: not a BF16_Optimizer partition (no single_partition_of_fp32_groups)")
        for flat, mapping in zip(opt["single_partition_of_fp32_groups"], opt["param_slice_mappings"]):
            for name, frag in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, frag.start, frag.numel))
    out = {}
    for name, shape in shapes.items():
        t = torch.cat(pieces.get(name, [])) if name in pieces else None
        if t is None or t.numel() != torch.Size(shape).numel():
            raise ConvertError(f"{ckpt}: the BF16_Optimizer partitions of tensor rank {tp_rank} do not hold all of "
                               f"{name} (expected {torch.Size(shape).numel()} values)")
        out[name] = t.view(shape).clone()
    return out


def _pipeline_rank_state(ckpt: Path, tp_rank: int) -> tuple[dict, str]:
    """One TP rank's canonical-named state from the pipeline's per-layer files (``layer_{c:02d}-model_{tp:02d}-
    model_states.pt`` holds chain position c's weights under the names inside that stage)."""
    from megannm.model.pipeline import pipeline_to_canonical
    pattern = checkpoint.layer_pattern(tp_rank)
    files = sorted(ckpt.glob(pattern))
    if not files:
        raise ConvertError(f"{ckpt}: no {pattern} files (the pipeline weights of tensor rank {tp_rank})")
    out = {}
    for f in files:
        position = checkpoint.layer_position(f)
        state = _torch_load(f)
        if not isinstance(state, dict):
            raise ConvertError(f"{f}: not a layer state dict")
        for name, t in state.items():
            if name.endswith("._extra_state"):
                continue
            try:
                canonical = pipeline_to_canonical(name, position)
            except ValueError as e:
                raise ConvertError(f"{f}: unexpected parameter {name} ({e})") from None
            if canonical in out:
                raise ConvertError(f"{f}: parameter {canonical} also came from another layer file")
            out[canonical] = t
    return out, str(ckpt / pattern)


def rank_state(ckpt: Path, meta: dict, tp_rank: int) -> tuple[dict, str, str]:
    """One tensor-parallel rank's weights (all pipeline stages) under canonical names, TP-sliced and padded as saved:
    (state, source files, how they were read)."""
    layout = meta.get("layout") or {}
    pp, zero = int(layout.get("pp") or 1), meta.get("zero_stage")
    precision = (meta.get("recipe") or {}).get("precision", "fp32")
    if pp > 1:
        state, source = _pipeline_rank_state(ckpt, tp_rank)
        how = "module weights of the pipeline layer files" + (" (bf16)" if precision == "bf16" else "")
    elif not meta.get("module_only") and zero == 1 and _bf16_optimizer_files(ckpt, tp_rank):
        state = _fp32_from_bf16_optimizer(ckpt, tp_rank)
        source = str(ckpt / f"bf16_zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt")
        how = "fp32 master from the BF16_Optimizer partitions"
    elif not meta.get("module_only") and (zero == 3 or (precision != "fp32" and zero in (1, 2))):
        state, source = _fp32_from_zero(ckpt, tp_rank), str(ckpt / f"*_mp_rank_{tp_rank:02d}_*_states.pt")
        how = "fp32 master from the ZeRO partitions (deepspeed.utils.zero_to_fp32)"
    else:
        state, source = read_module_state(ckpt, tp_rank), str(module_state_file(ckpt, tp_rank))
        how = "module weights" + (" (bf16)" if precision == "bf16" else "")
    # megatron-core layers may add `_extra_state` entries (for Transformer Engine): not weights
    return {k: v for k, v in state.items() if not k.endswith("._extra_state")}, source, how


def open_checkpoint(path: str | Path) -> tuple[Path, dict, Vocab, object]:
    """(checkpoint folder, its ``megannm.json``, Vocab, ModelArgs as saved) of a folder or a dir with ``latest``."""
    from megannm.model.args import ModelArgs
    ckpt = checkpoint.resolve(path)
    meta = checkpoint.read_meta(ckpt)
    integrity.verify(ckpt, meta)  # a truncated or flipped file is named, never read silently
    where = str(ckpt / checkpoint.META)
    try:
        vocab = Vocab.from_dict(meta["vocab"], source=where)
        args = ModelArgs.from_dict(meta["model_args"])
    except KeyError as e:
        raise ConvertError(f"{where}: required key {e.args[0]} is missing") from None
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{where}: {e}") from None
    return ckpt, meta, vocab, args


def read_deepspeed(path: str | Path) -> Consolidated:
    """A megannm DeepSpeed checkpoint (folder, or a checkpoint dir with ``latest``) at any layout -> canonical form."""
    ckpt, meta, vocab, args = open_checkpoint(path)
    layout = meta.get("layout") or {}
    parts, sources, how = [], [], ""
    for r in range(int(layout.get("tp") or 1)):
        state, source, how = rank_state(ckpt, meta, r)
        parts.append(state)
        sources.append(source)
    state = reshard.merge_states(parts, args, sources)
    state = {k: (v.float() if v.dtype != torch.float32 and v.is_floating_point() else v) for k, v in state.items()}
    source = {"kind": "deepspeed", "path": str(ckpt.resolve()), "layout": layout, "zero_stage": meta.get("zero_stage"),
              "precision": (meta.get("recipe") or {}).get("precision", "fp32"), "weights": how,
              "step": meta.get("step"), "consumed_samples": meta.get("consumed_samples")}
    return Consolidated(state, normalise_args(args, vocab), vocab, source, meta.get("recipe"))


# ---------------------------------------------------------------------------------------------------------------------
# writing


def _module_file(module: dict, tp: int, dp: int, step: int, consumed: int) -> dict:
    """What DeepSpeed's ``save_checkpoint`` puts in ``mp_rank_XX_model_states.pt``, module weights only."""
    import deepspeed
    return {"module": module, "buffer_names": [], "optimizer": None, "param_shapes": None,
            "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": None,
            "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
            "global_steps": step, "global_samples": consumed, "dp_world_size": dp, "mp_world_size": tp,
            "ds_version": deepspeed.__version__, "step": step, "consumed_samples": consumed}


def write_deepspeed(c: Consolidated, dst: str | Path, tp: int = 1, pp: int = 1, overwrite: bool = False) -> Path:
    """A module-only DeepSpeed checkpoint dir (``latest`` + ``step<N>/``) at TP x PP from the canonical form."""
    padded = c.vocab.padded_size(tp)
    reshard.check_divisible(c.args, tp, pp, padded, where=f"{dst}")
    args = normalise_args(c.args, c.vocab, tp)
    step, consumed = c.step, c.consumed_samples
    tag = checkpoint.tag_for(step)
    dst = Path(dst)
    with atomic_output(dst, overwrite) as tmp:
        folder = tmp / tag
        folder.mkdir()
        if pp > 1:
            _write_pipeline(c, folder, args, tp, pp, padded, step, consumed)
        else:
            for r in range(tp):
                local = OrderedDict((k, reshard.shard_tensor(k, v, tp, r, padded).clone())
                                    for k, v in c.state.items())
                torch.save(_module_file(local, tp, 1, step, consumed), module_state_file(folder, r))
        meta = {"recipe": c.recipe, "recipe_source": None, "model_args": args.to_dict(), "vocab": c.vocab.to_dict(),
                "layout": {"world_size": None, "tp": tp, "pp": pp, "dp": None}, "zero_stage": None,
                "module_only": True, "consumed_samples": consumed, "step": step, "tag": tag,
                "converted_from": c.source}
        checkpoint.write_meta(folder, meta)
        checkpoint.write_latest(tmp, tag)
    return dst


def _write_pipeline(c, folder, args, tp, pp, padded, step, consumed) -> None:
    """DeepSpeed's pipeline layout: one file per chain position and TP rank (names inside the stage), plus one
    ``mp_rank_XX_model_states.pt`` per (stage, TP rank) with ``module: None`` (XX = stage * tp + tp_rank)."""
    from megannm.model.pipeline import canonical_to_pipeline
    positions: dict[int, dict] = {}
    for name in c.state:
        position, inner = canonical_to_pipeline(name, args.layers)
        positions.setdefault(position, {})[inner] = name
    for r in range(tp):
        for position, names in sorted(positions.items()):
            sd = OrderedDict((inner, reshard.shard_tensor(name, c.state[name], tp, r, padded).clone())
                             for inner, name in names.items())
            torch.save(sd, layer_file(folder, position, r))
    for mp_rank in range(tp * pp):
        torch.save(_module_file(None, tp * pp, 1, step, consumed), module_state_file(folder, mp_rank))


# ---------------------------------------------------------------------------------------------------------------------
# a model for generate / evaluate / demo


def load_model(path: str | Path, layout, vocab: Vocab | None = None):
    """Model (eval mode) + metadata from a DeepSpeed checkpoint of ANY layout, or from a consolidated folder, at
    this process's tensor-parallel size (pipeline size 1).

    A checkpoint saved at this TP size with exact fp32 module weights (ZeRO 0-2, pipeline 1) loads its own file
    directly; every other layout goes through the canonical form in memory."""
    from megannm.model.transformer import NMMModel
    path = Path(path)
    if layout.pp != 1:
        raise ConvertError(f"load_model: runs at pipeline size 1 (got pp={layout.pp})")
    if checkpoint.kind_of(path) == "consolidated":
        opened = Opened(path)
        meta = dict(opened.meta)
        fingerprint, where = opened.vocab.fingerprint, str(path / checkpoint.CONSOLIDATED_META)
        args = normalise_args(opened.args, opened.vocab, layout.tp)
        get = lambda name: opened.local(name, layout.tp, layout.tp_rank, args.padded_vocab_size)  # noqa: E731
    else:
        ckpt = checkpoint.resolve(path)
        meta = checkpoint.read_meta(ckpt)
        fingerprint, where = meta["vocab"]["fingerprint"], str(ckpt / checkpoint.META)
        saved = meta.get("layout", {})
        precision = (meta.get("recipe") or {}).get("precision", "fp32")
        direct = (saved.get("tp") == layout.tp and saved.get("pp", 1) == 1 and precision == "fp32"
                  and (meta.get("zero_stage") in (0, 1, 2) or meta.get("module_only")))
        if direct:
            from megannm.model.args import ModelArgs
            args = ModelArgs.from_dict(meta["model_args"])
            state = read_module_state(ckpt, layout.tp_rank)
            get = state.__getitem__
        else:
            c = read_deepspeed(ckpt)
            args = normalise_args(c.args, c.vocab, layout.tp)
            get = lambda name: reshard.shard_tensor(name, c.state[name], layout.tp, layout.tp_rank,  # noqa: E731
                                                    args.padded_vocab_size)
    if vocab is not None:
        vocab.check_same(fingerprint, "the tokenizers", where)
    reshard.check_divisible(args, layout.tp, 1, args.padded_vocab_size, where=where)
    model = NMMModel(args, layout)
    expected = reshard.local_shapes(args, layout.tp, args.padded_vocab_size)
    state = {}
    for name in expected:
        try:
            state[name] = get(name)
        except KeyError:
            raise ConvertError(f"{where}: missing parameter {name}") from None
    reshard.check_shapes(state, expected, where)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ConvertError(f"{where}: {what}")
    model.eval()
    return model, meta
