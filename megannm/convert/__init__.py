"""Checkpoint conversion through one hub, the consolidated safetensors form (DESIGN.md section 7).

    files.py         errors, outputs written to a temporary folder and renamed, safetensors folders (+ index)
    reshard.py       canonical names and shapes; tensor-parallel slicing (full <-> one rank's shard)
    consolidated.py  the hub: write / read / open lazily; ``load_into_engine`` (``checkpoint.init_from``)
    deepspeed.py     DeepSpeed checkpoints of any TP x PP x ZeRO <-> canonical; module-only folders at any layout;
                     ``load_model`` for generate / evaluate / demo
    hf.py            canonical -> Hugging Face (Llama / Qwen3 / the MoT remote-code class); a Llama-architecture LLM ->
                     a native multimodal model
    hf_modeling/     the MoT model as a ``transformers`` class, copied into MoT exports
    cli.py           ``megannm convert SRC DST --to {consolidated,deepspeed,hf}``
"""
