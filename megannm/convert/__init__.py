"""Checkpoint conversion through one hub, the consolidated safetensors form; offline, no training engine.

    deepspeed.py     consolidated -> a module-only DeepSpeed checkpoint at any TP x PP (re-sharding)
    hf.py            consolidated -> Hugging Face (Llama / Qwen3 / the MoT remote-code class); a Llama-architecture
                     LLM -> a native multimodal model
    hf_modeling/     the MoT model as a ``transformers`` class, copied into MoT exports
    route.py         one conversion, SRC (recognised by what it holds) -> DST (``megannm convert`` parses, calls it)

The formats themselves are read and written in ``megannm.checkpoint`` (DeepSpeed checkpoints of any TP x PP x ZeRO
layout -> canonical: ``checkpoint.deepspeed``; the consolidated folder: ``checkpoint.consolidated``; tensor files
through safetensors and ``torch.load``: ``checkpoint.tensors``), which training and sampling load from too. Every
adapter here checks names and shapes against ``checkpoint.canonical`` and writes one output file at a time into a
folder that ``megannm.fileio.atomic_output`` renames into place at the end.
"""
from megannm.checkpoint import CheckpointError


class ConvertError(CheckpointError):
    """A conversion that cannot proceed; the message is one line naming the file and the parameter at fault."""
