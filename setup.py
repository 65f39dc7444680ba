"""megannm: a training stack for native multimodal models (text and image tokens in one sequence)."""
from setuptools import find_packages, setup

setup(
    name="megannm",
    version="0.1.0",
    description="Train native multimodal (MoT) models with megatron-core tensor parallelism and DeepSpeed",
    packages=find_packages(include=["megannm", "megannm.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is CPU-installable: `pip install torch==2.13.0` before this package on a machine without a GPU.
        "torch>=2.4",
        "deepspeed>=0.16",
        "megatron-core>=0.12",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pydantic>=2.6",
        "pyyaml>=6.0",
        "zstandard>=0.22",
        "tensorboard>=2.16",
        "tqdm>=4.66",
        "pillow>=10.0",
    ],
    extras_require={"test": ["pytest>=8.0"]},
    entry_points={
        "console_scripts": ["megannm=megannm.cli:main"],
        # The embedded toy world registers itself the way a user's package would: the core finds these by name
        # (megannm.rewards, megannm.phases.rl.prompts, megannm.evaluate) and never imports megannm.toy.
        "megannm.rewards": [
            "toy_caption = megannm.toy.rewards:toy_caption",
            "toy_caption_kind = megannm.toy.rewards:toy_caption_kind",
            "toy_caption_colour = megannm.toy.rewards:toy_caption_colour",
            "toy_caption_size = megannm.toy.rewards:toy_caption_size",
            "toy_caption_position = megannm.toy.rewards:toy_caption_position",
            "toy_image = megannm.toy.rewards:toy_image",
            "toy_image_kind = megannm.toy.rewards:toy_image_kind",
            "toy_image_colour = megannm.toy.rewards:toy_image_colour",
            "toy_image_size = megannm.toy.rewards:toy_image_size",
            "toy_image_position = megannm.toy.rewards:toy_image_position",
            "toy_format = megannm.toy.rewards:toy_format",
        ],
        "megannm.prompts": [
            "toy_image = megannm.toy.prompts:toy_image",
            "toy_caption = megannm.toy.prompts:toy_caption",
            "toy_draw = megannm.toy.prompts:toy_draw",
        ],
        "megannm.benchmarks": ["toy = megannm.toy.evaluate:TOY", "toy-chat = megannm.toy.evaluate:TOY_CHAT"],
    },
)
