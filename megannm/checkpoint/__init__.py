"""The on-disk checkpoint format, below both training (``megannm.train``) and conversion (``megannm.convert``).

    names.py      file and folder names: ``latest``, ``protected``, tags ``step%08d``, ``megannm.json``, the
                  temporary prefix, the RNG files, DeepSpeed's files inside a tag, the consolidated folder's
                  ``consolidated.json``
    folders.py    ``CheckpointError`` / ``CorruptCheckpoint``; the ``latest`` pointer (write + fsync +
                  ``os.replace``), ``megannm.json``, ``resolve`` / ``latest`` / ``complete`` / ``orphans`` /
                  ``read_meta``, the guard's ``protected`` tags, ``kind_of`` (which format a folder holds)
    integrity.py  every file's size and crc32, recorded at save and checked before a load
    compat.py     ``check_compatible`` / ``check_structure``: the vocabulary, ``megannm.model.args.STRUCTURAL`` and
                  the parallel layout must agree for weights to load

Saving and loading through a live DeepSpeed engine is ``megannm.train``'s; reading and writing the weights offline is
``megannm.convert``'s. This package imports neither.
"""
from megannm.checkpoint.compat import check_compatible, check_structure
from megannm.checkpoint.folders import (CheckpointError, CorruptCheckpoint, complete, kind_of, latest, orphans,
                                        protect, protected, read_meta, resolve, write_latest, write_meta)
from megannm.checkpoint.names import (CONSOLIDATED_META, FILES_DIR, LATEST, META, PROTECTED, RNG_DIR, TMP_PREFIX,
                                      is_tag, layer_file, layer_pattern, layer_position, module_state_file, rng_file,
                                      tag_for, zero_files)

__all__ = ["CONSOLIDATED_META", "FILES_DIR", "LATEST", "META", "PROTECTED", "RNG_DIR", "TMP_PREFIX",
           "CheckpointError", "CorruptCheckpoint", "check_compatible", "check_structure", "complete", "is_tag",
           "kind_of", "latest", "layer_file", "layer_pattern", "layer_position", "module_state_file", "orphans",
           "protect", "protected", "read_meta", "resolve", "rng_file", "tag_for", "write_latest", "write_meta",
           "zero_files"]
