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
    entry_points={"console_scripts": ["megannm=megannm.cli:main"]},
)
