"""The Mixture-of-Transformers model as a Hugging Face ``transformers`` class (remote code).

``megannm convert ... --to hf`` copies ``configuration_megannm_mot.py``, ``modeling_megannm_mot.py`` and megannm's
own block (``megannm/model/block.py``, as ``megannm_block.py``) and latent modules (``megannm/model/latents.py``, as
``megannm_latents.py``) into the export and points ``auto_map`` in its
config.json at them, so that ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads the model
with stock ``transformers`` and without megannm installed. The files therefore import nothing from megannm (only
torch and transformers).
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name in the export -> the file copied there
SOURCES = {"configuration_megannm_mot.py": HERE / "configuration_megannm_mot.py",
           "modeling_megannm_mot.py": HERE / "modeling_megannm_mot.py",
           "megannm_block.py": HERE.parent.parent / "model" / "block.py",
           "megannm_latents.py": HERE.parent.parent / "model" / "latents.py"}
FILES = tuple(SOURCES)
