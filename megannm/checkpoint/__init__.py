"""The on-disk checkpoint format, below both training (``megannm.train``) and conversion (``megannm.convert``).

    names.py      file and folder names: ``latest``, ``protected``, tags ``step%08d``, ``megannm.json``, the
                  temporary prefix, the RNG files, DeepSpeed's files inside a tag, the consolidated folder's
                  ``consolidated.json``
    folders.py    ``CheckpointError`` / ``CorruptCheckpoint``; the ``latest`` pointer (write + fsync +
                  ``os.replace``), ``megannm.json``, ``resolve`` / ``latest`` / ``complete`` / ``orphans`` /
                  ``read_meta``, the guard's ``protected`` and ``diverged`` tags, ``kind_of`` (which format a
                  folder holds)
    integrity.py  every file's size and crc32, recorded at save and checked before a load
    compat.py     ``check_compatible`` / ``check_structure``: the vocabulary, ``megannm.model.args.STRUCTURAL`` and
                  the parallel layout must agree for weights to load
    tensors.py    tensor files through their libraries: safetensors folders (``safe_open`` / ``save_file`` per
                  shard + index), torch files (``torch.load(mmap=True, weights_only=True)``), ``LazyState``
    canonical.py  canonical names and shapes, tensor-parallel slicing and joining, name and shape checks
    consolidated.py  the consolidated safetensors folder (the conversion hub): written, read lazily, sliced per rank
    deepspeed.py  DeepSpeed checkpoints of any TP x PP x ZeRO layout read under canonical names (module files,
                  pipeline layer files, the fp32 master in the optimizer partitions)
    opened.py     ``load_model``, ``open_checkpoint`` / ``Opened``: a checkpoint opened as a model for sampling

Saving and resuming through a live DeepSpeed engine, and loading weights into one, is ``megannm.train``'s; the
converters between forms are ``megannm.convert``'s. This package imports neither.
"""
from megannm.checkpoint.compat import check_compatible, check_structure
from megannm.checkpoint.folders import (CheckpointError, CorruptCheckpoint, complete, diverged, kind_of, latest,
                                        mark_diverged, orphans, protect, protected, read_meta, remove_latest, resolve,
                                        unmark_diverged, write_latest, write_meta)
from megannm.checkpoint.names import (CONSOLIDATED_META, DIVERGED, FILES_DIR, LATEST, META, PROTECTED, RNG_DIR,
                                      TMP_PREFIX, is_tag, is_temporary, layer_file, layer_pattern, layer_position,
                                      module_state_file, rng_file, tag_for, zero_files)

__all__ = ["CONSOLIDATED_META", "DIVERGED", "FILES_DIR", "LATEST", "META", "PROTECTED", "RNG_DIR", "TMP_PREFIX",
           "CheckpointError", "CorruptCheckpoint", "check_compatible", "check_structure", "complete", "diverged",
           "is_tag", "is_temporary", "kind_of", "latest", "layer_file", "layer_pattern", "layer_position",
           "mark_diverged", "module_state_file", "orphans", "protect", "protected", "read_meta", "remove_latest",
           "resolve", "rng_file", "tag_for", "unmark_diverged", "write_latest", "write_meta", "zero_files"]
