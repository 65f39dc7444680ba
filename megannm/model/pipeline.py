"""The model as a DeepSpeed ``PipelineModule``: the same chain as ``NMMModel``, one ``LayerSpec`` per position.

    chain position   0               1 .. N                    N + 1
    module           EmbeddingStage  Block(layer = c - 1)      HeadStage      -> loss_fn: lm_loss on the last stage

A stage runs its part of the chain with ``transformer.run_chain``, exactly as ``NMMModel`` runs the whole: the first
stage takes the micro-batch's ``(input_ids, position_ids, document_ids)``, every stage but the last sends the carried
activations ``(hidden, modality, position_ids, document_ids)`` (three int64 tensors after the float one: DeepSpeed
sends no gradient for them), each stage builds the micro-batch's context (routing, mask, RoPE) from them once and
hands it to its blocks, and the last stage's head returns the vocab-parallel logits that ``lm_loss`` turns into the
loss. Activation checkpointing is ``run_chain``'s, block by block, as without a pipeline.

Weights: chain position c is built under the seed ``base + c`` (``transformer.seeded``), exactly as ``NMMModel``
does, so a stage that builds only its own positions holds the same weights as the whole model built from the same
torch seed; tensor-parallel slicing is megatron-core's, from the same CPU master weights.

Parameter names: DeepSpeed registers position c as the submodule ``"c"``, so the pipeline's state dict reads
``{c}.{name inside the stage}`` and DeepSpeed's checkpoint writes position c to ``layer_{c:02d}-model_{tp:02d}-
model_states.pt`` with the names inside the stage. ``pipeline_to_canonical`` / ``canonical_to_pipeline`` map both
onto ``NMMModel``'s names (``transformer.py``'s docstring):

    0.embed_tokens.weight          <->  embedding.embed_tokens.weight
    {1+i}.attn.q_proj.{m}.weight   <->  layers.{i}.attn.q_proj.{m}.weight          (every name inside a Block)
    {N+1}.norm.{m}.weight          <->  head.norm.{m}.weight
    {N+1}.output.weight            <->  head.output.weight

Training: the Trainer (``megannm.train.pipeline``) feeds an update's micro-batches to
``PipelineEngine.train_batch`` (1F1B); ``PipelineLoss`` keeps each micro-batch's per-modality statistics on the
last stage for the step's logs.
"""
from __future__ import annotations

import contextlib
import io
import re

import torch
from deepspeed.pipe import LayerSpec, PipelineModule

from megannm import parallel
from megannm.model import flops, layers
from megannm.model.args import ModelArgs
from megannm.model.block import Block
from megannm.model.embedding import EmbeddingStage
from megannm.model.latents import flow_arguments
from megannm.model.transformer import HeadStage, draw_init_seed, model_loss, run_chain, seeded
from megannm.parallel import Layout

__all__ = ["build_pipeline_module", "NMMPipeline", "PipelineLoss", "pipeline_batch", "pipeline_to_canonical",
           "canonical_to_pipeline", "stage_bounds"]


# ---------------------------------------------------------------------------------------------------------------------
# building


class SeededLayerSpec(LayerSpec):
    """A ``LayerSpec`` built under its own seed (and giving the caller's RNG stream back untouched)."""

    def __init__(self, seed: int, typename, *module_args, **module_kwargs):
        super().__init__(typename, *module_args, **module_kwargs)
        self.seed = seed

    def build(self, log=False):
        with seeded(self.seed):
            return super().build(log=log)


class PipelineLoss:
    """``loss_fn(output, (labels, loss_mask[, flow_target, flow_mask]))`` of the last stage: ``model_loss``,
    keeping each micro-batch's (loss, stats) for the step's logs (``take`` empties the list)."""

    def __init__(self, args: ModelArgs, layout: Layout):
        self.args, self.layout = args, layout
        self.kept: list[tuple[torch.Tensor, dict]] = []

    def __call__(self, output, labels) -> torch.Tensor:
        loss, stats = model_loss(output, *labels[:2], self.args, self.layout, *labels[2:])
        self.kept.append((loss.detach(), stats))
        return loss

    def take(self) -> list[tuple[torch.Tensor, dict]]:
        kept, self.kept = self.kept, []
        return kept


class NMMPipeline(PipelineModule):
    """DeepSpeed's ``PipelineModule`` over the chain, with the ``parameters`` partition counted from the dimensions
    (DeepSpeed's own count builds every layer of the whole model on every rank)."""

    def __init__(self, args: ModelArgs, specs: list, recompute: bool = False, **kwargs):
        self.args, self.recompute = args, recompute
        super().__init__(specs, **kwargs)
        if args.compile:
            layers.compile_blocks([m for m in self.forward_funcs if isinstance(m, Block)])

    def forward(self, x):
        """This stage's part of the chain (``run_chain``): ids or carried activations in, carried activations or
        logits out."""
        return run_chain(self.args, self.forward_funcs, x, recompute=self.recompute and self.training)

    def _count_layer_params(self):
        a = self.args
        table = a.padded_vocab_size * a.hidden  # embedding; the output layer has the same shape
        block = a.n_sets * (flops.block_matmul_params(a) + flops.block_norm_params(a))
        latent_in, velocity = flops.latent_params(a)
        return [table + latent_in] + [block] * a.layers + [a.n_sets * a.hidden + table + velocity]

    def flops_per_token(self, seq_len: int) -> float:
        """The whole model's training FLOPs per token (what MFU is measured against), not this stage's."""
        return flops.flops_per_token(self.args, seq_len)


def chain_specs(args: ModelArgs, layout: Layout, seed: int) -> list[LayerSpec]:
    """Chain position c = 0 embedding, 1 + i block i, N + 1 head; each built under ``seed + c`` as in NMMModel."""
    spec = layers.linears(args, layout)
    return ([SeededLayerSpec(seed, EmbeddingStage, args, layout)]
            + [SeededLayerSpec(seed + 1 + i, Block, args.block_shape, spec, i) for i in range(args.layers)]
            + [SeededLayerSpec(seed + args.layers + 1, HeadStage, args, layout)])


def build_pipeline_module(args: ModelArgs, layout: Layout, partition: str = "parameters",
                          activation_checkpointing: bool = False) -> NMMPipeline:
    """This rank's stage of the pipeline; the caller seeds torch first (the same seed as for ``NMMModel``)."""
    seed = draw_init_seed()  # the same draw NMMModel makes: the same weights at every layout
    quiet = io.StringIO()  # DeepSpeed prints its partition table and seed settings on rank 0
    with contextlib.redirect_stdout(quiet):
        module = NMMPipeline(
            args, chain_specs(args, layout, seed), recompute=activation_checkpointing,
            topology=parallel.pipeline_topology(layout), loss_fn=PipelineLoss(args, layout),
            partition_method=partition)
    parallel.check_pipeline_grid(module.mpu(), layout)
    _count_replicated_once(module, layout)
    return module


def _count_replicated_once(module: torch.nn.Module, layout) -> None:
    """ZeRO 0's gradient clipping (deepspeed.runtime.utils.clip_grad_norm_) counts a parameter that is not
    tensor-parallel only on the rank whose pipeline-x-tensor "model-parallel rank" is 0, i.e. only on the FIRST
    stage: the norms of every later stage would be missing from the global norm. Mark this stage's copy on tensor
    rank 0 as counted (``model_parallel``); the other tensor ranks' replicas stay uncounted. ZeRO 1 and bf16 ask the
    tensor rank themselves, which this does not change."""
    if layout.tp_rank != 0:
        return
    for p in module.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.model_parallel = True


# ---------------------------------------------------------------------------------------------------------------------
# parameter names

_CANONICAL_BLOCK = re.compile(r"layers\.(\d+)\.(.+)")


def pipeline_to_canonical(name: str, layer_offset: int = 0) -> str:
    """A pipeline parameter name -> ``NMMModel``'s canonical name.

    ``name`` is either a key of the pipeline module's state dict, ``"{c}.{inner}"`` (c = chain position, which
    DeepSpeed keeps global on every stage; ``layer_offset`` is added to it when the keys were renumbered from a
    stage's first position), or a key of one DeepSpeed layer file, ``"{inner}"``, with ``layer_offset`` = the file's
    chain position (``layer_{c:02d}-...``). The stage is recognised by its inner name, so N is not needed.
    """
    head, _, rest = name.partition(".")
    if head.isdigit():
        position, inner = int(head) + layer_offset, rest
    else:
        position, inner = layer_offset, name
    if inner.startswith(("embed_tokens.", "latents.")):
        if position != 0:
            raise ValueError(f"pipeline name {name!r}: the embedding is chain position 0 (got {position})")
        return f"embedding.{inner}"
    if inner.startswith(("attn.", "ffn.")):
        if position < 1:
            raise ValueError(f"pipeline name {name!r}: blocks are chain positions >= 1 (got {position})")
        return f"layers.{position - 1}.{inner}"
    if inner.startswith(("norm.", "output.", "velocity.")):
        return f"head.{inner}"
    raise ValueError(f"pipeline name {name!r}: not a parameter of EmbeddingStage, Block or HeadStage")


def canonical_to_pipeline(name: str, num_layers: int) -> tuple[int, str]:
    """A canonical name -> (chain position, name inside that stage); the pipeline state-dict key is
    ``f"{position}.{inner}"`` and DeepSpeed's layer file is ``layer_{position:02d}-...``."""
    if name.startswith("embedding."):
        return 0, name[len("embedding."):]
    if name.startswith("head."):
        return num_layers + 1, name[len("head."):]
    m = _CANONICAL_BLOCK.fullmatch(name)
    if m and int(m.group(1)) < num_layers:
        return int(m.group(1)) + 1, m.group(2)
    raise ValueError(f"parameter {name!r}: not a canonical megannm name for a model of {num_layers} layers")


# ---------------------------------------------------------------------------------------------------------------------
# steps


def pipeline_batch(batch: dict) -> tuple[tuple, tuple]:
    """A loader micro-batch dict -> DeepSpeed's ``((first stage inputs), (loss_fn labels))``; continuous images add
    the noised latents and timesteps to the inputs, the velocity target and its mask to the labels."""
    inputs, labels = (batch["input_ids"], batch["position_ids"], batch["document_ids"]), (batch["labels"],
                                                                                           batch["loss_mask"])
    flow = flow_arguments(batch)
    if flow:
        inputs += (flow["latents"], flow["timesteps"])
        labels += (flow["flow_target"], flow["flow_mask"])
    return inputs, labels


def stage_bounds(module: PipelineModule) -> tuple[int, int]:
    """[first, last + 1) chain positions this rank's stage holds."""
    return int(module._local_start), int(module._local_stop)
