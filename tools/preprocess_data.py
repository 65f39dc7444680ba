#!/usr/bin/env python
"""JSONL records -> zstd token shards (the same as ``megannm preprocess``).

    python tools/preprocess_data.py --input data/train.jsonl --output shards/train --tokenizers tokenizers/
"""
import sys

from megannm.cli.data import preprocess as preprocess_main

if __name__ == "__main__":
    sys.exit(preprocess_main(sys.argv[1:]))
