"""The Mixture-of-Transformers model as a Hugging Face ``transformers`` class (remote code).

``megannm convert ... --to hf`` copies ``configuration_megannm_mot.py`` and ``modeling_megannm_mot.py`` into the
export and points ``auto_map`` in its config.json at them, so that ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` loads the model with stock ``transformers`` and without megannm installed. The two files
therefore import nothing from megannm (only torch and transformers).
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = ("configuration_megannm_mot.py", "modeling_megannm_mot.py")
