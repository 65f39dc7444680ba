#!/usr/bin/env python
"""Checkpoint conversion (the same as ``megannm convert``): DeepSpeed <-> consolidated <-> Hugging Face, re-sharding.

    python tools/convert_checkpoint.py runs/x/checkpoints out/consolidated --to consolidated
    python tools/convert_checkpoint.py out/consolidated out/tp2 --to deepspeed --tp 2
    python tools/convert_checkpoint.py out/consolidated out/hf --to hf --tokenizers tokenizers/
"""
import sys

from megannm.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
