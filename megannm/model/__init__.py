"""The native multimodal model: modality-aware embedding -> N x (MoT | dense) blocks -> vocab-parallel head.

- ``embedding.py``: ``EmbeddingStage`` (megatron-core VocabParallelEmbedding; emits modality and position ids)
- ``mot.py``: routing (``route``/``Routing``), the MoT ``Block`` and its dense twin (``mot: false``)
- ``attention.py``: one global causal attention with RoPE, document mask and ``KVCache``
- ``args.py``: ``ModelArgs`` (the model's shape) and ``STRUCTURAL`` (what must agree for weights to move)
- ``transformer.py``: ``HeadStage``, ``lm_loss``, ``NMMModel`` (state-dict names documented there)
- ``vocab_parallel.py``: padding mask, cross entropy with the log partition, log-probs and entropy over the split vocabulary
- ``pipeline.py``: the same stages as a DeepSpeed ``PipelineModule``
- ``build.py``: the model of a recipe (plain or pipeline), seeded alike on every rank
- ``flops.py``: parameter and FLOP counts from the dimensions
"""
from megannm.model.attention import KVCache
from megannm.model.embedding import EmbeddingStage
from megannm.model.mot import Block, Routing, route
from megannm.model.args import ModelArgs
from megannm.model.transformer import HeadStage, NMMModel, lm_loss

__all__ = ["ModelArgs", "EmbeddingStage", "Block", "HeadStage", "NMMModel", "lm_loss", "KVCache", "Routing", "route"]
