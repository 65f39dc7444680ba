"""The native multimodal model: modality-aware embedding -> N x (MoT | dense) blocks -> vocab-parallel head.

- ``block.py``: the MoT block and its dense twin as the paper writes them (torch only; the export ships it)
- ``layers.py``: the layer spec of a training rank (megatron-core's parallel linears, apex's RMSNorm when
  importable) and regional compilation
- ``embedding.py``: ``EmbeddingStage`` (megatron-core VocabParallelEmbedding; emits modality and position ids)
- ``attention.py``: RoPE tables, document masks, the attention kernels and ``KVCache``
- ``args.py``: ``ModelArgs`` (the model's shape) and ``STRUCTURAL`` (what must agree for weights to move)
- ``transformer.py``: ``HeadStage``, ``lm_loss``, ``run_chain``, ``NMMModel`` (state-dict names documented there)
- ``vocab_parallel.py``: padding mask, cross entropy with the log partition, log-probs and entropy over the split
  vocabulary
- ``pipeline.py``: the same chain as a DeepSpeed ``PipelineModule``
- ``build.py``: the model of a recipe (plain or pipeline), seeded alike on every rank
- ``flops.py``: parameter and FLOP counts from the dimensions
"""
from megannm.model.args import ModelArgs
from megannm.model.attention import KVCache
from megannm.model.block import Block, Routing
from megannm.model.embedding import EmbeddingStage
from megannm.model.transformer import HeadStage, NMMModel, lm_loss

__all__ = ["ModelArgs", "EmbeddingStage", "Block", "HeadStage", "NMMModel", "lm_loss", "KVCache", "Routing"]
