"""megannm: train native multimodal models (text and image tokens in one sequence) with Mixture-of-Transformers
blocks on megatron-core tensor parallelism and DeepSpeed pipeline/ZeRO."""
__version__ = "0.1.0"
