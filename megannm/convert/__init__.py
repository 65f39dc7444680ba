"""Checkpoint conversion through one hub, the consolidated safetensors form; offline, no training engine.

    files.py         ``ConvertError`` (a ``megannm.checkpoint.CheckpointError``), sizes, ``LazyState`` (tensors read
                     when asked for), safetensors folders (+ index) written tensor by tensor by our own writer
    filebytes.py     mapped inputs, outputs written at offsets (splice / copy_file_range: no user-space copy of
                     bytes that only move; dim-1 rows through a staging buffer), crc32
    torchzip.py      torch's zip format (DeepSpeed's files): read over one mapping, written without torch.save
    reshard.py       canonical names and shapes; tensor-parallel slicing (full <-> one rank's shard)
    consolidated.py  the hub: write / read / open lazily (``Opened.local``: one TP rank's slice, read from disk)
    deepspeed.py     DeepSpeed checkpoints of any TP x PP x ZeRO <-> canonical; module-only folders at any layout;
                     ``load_model`` for generate / evaluate / demo
    zero.py          the fp32 master weights in DeepSpeed's optimizer partitions, read lazily
    hf.py            canonical -> Hugging Face (Llama / Qwen3 / the MoT remote-code class); a Llama-architecture LLM ->
                     a native multimodal model
    hf_modeling/     the MoT model as a ``transformers`` class, copied into MoT exports
    cli.py           ``megannm convert SRC DST --to {consolidated,deepspeed,hf}``

Every conversion streams: one tensor at a time (a few in flight in threads), memory-mapped inputs, never the whole
model in memory. Names on disk come from ``megannm.checkpoint``, atomic outputs from ``megannm.fileio``. Nothing
here imports ``megannm.train``: loading into a live engine (``checkpoint.init_from``) is ``megannm.train.load``, over
these readers.
"""
