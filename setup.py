"""megannm: a training stack for native multimodal models (text and image tokens in one sequence)."""
from setuptools import find_packages, setup

SOURCES = ["webdataset>=1.0", "megatron-energon>=7.0", "pyarrow>=15", "datasets>=3.0"]

MPI = ["mpi4py>=3.1"]

setup(
    name="megannm",
    version="0.1.0",
    description="Train native multimodal (MoT) models with megatron-core tensor parallelism and DeepSpeed",
    packages=find_packages(include=["megannm", "megannm.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is CPU-installable: `pip install torch==2.13.0` before this package on a machine without a GPU.
        "torch>=2.4",
        # megannm reaches into these three libraries' internals (DeepSpeed's engines and ZeRO optimizers,
        # megatron-core's parallel layers and state, transformers' cache and generation API): each is capped above the
        # newest release the test suite passed with (deepspeed 0.19.8, megatron-core 0.16.1, transformers 5.24.0).
        "deepspeed>=0.16,<0.20",
        "megatron-core>=0.12,<0.17",
        "transformers>=4.45,<5.25",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pydantic>=2.6",
        "pyyaml>=6.0",
        "zstandard>=0.22",
        "tensorboard>=2.16",
        "tqdm>=4.66",
        "pillow>=10.0",
        "psutil>=5.9",  # the run lock: a holder's process start time (pid reuse)
        # `megannm serve` and `megannm reward-server`: the ecosystem's serving stack, and /metrics
        "fastapi>=0.110,<1",
        "uvicorn>=0.29,<1",
        "prometheus_client>=0.20,<1",
    ],
    extras_require={
        # preprocessing sources beyond JSONL (each imported only when its kind of input is read)
        "sources": SOURCES,
        # scikit-image: the real photographs it ships inside its package (image tokenizer tests, benchmark);
        # ruff and import-linter: the style and import rules (ruff.toml, .importlinter) that .ci/run checks;
        # openai and lm-eval: the real clients `megannm serve` is tested with
        "test": ["pytest>=8.0", "hypothesis>=6.100", "scikit-image>=0.22", "ruff>=0.17", "import-linter>=2.17",
                 "openai>=1.30,<4", "lm-eval[api]>=0.4.8,<0.5", *SOURCES, *MPI],
        # rank discovery from MPI itself under mpirun / srun --mpi=pmix (builds against the MPI's headers:
        # Debian's libopenmpi-dev, which setup.sh installs)
        "mpi": MPI,
    },
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
            "toy_geneval = megannm.toy.geneval:toy_geneval",
        ],
        "megannm.prompts": [
            "toy_image = megannm.toy.prompts:toy_image",
            "toy_caption = megannm.toy.prompts:toy_caption",
            "toy_draw = megannm.toy.prompts:toy_draw",
            "toy_geneval = megannm.toy.geneval:generation_prompts",
            "toy_geneval_qa = megannm.toy.geneval:question_prompts",
        ],
        "megannm.benchmarks": ["toy = megannm.toy.evaluate:TOY", "toy-chat = megannm.toy.evaluate:TOY_CHAT",
                               "toy-geneval = megannm.toy.geneval:TOY_GENEVAL"],
    },
)
