"""Install the MITKD distillation toolkit.

torch is deliberately *not* pinned here so GPU users keep their CUDA build; CPU machines
install with ``-c constraints.txt`` which pins the local CPU wheel.
"""
from setuptools import find_packages, setup

setup(
    name="mitkd-toolkit",
    version="0.1.0",
    description="Multi-task Infused Task-agnostic Knowledge Distillation (ERNIE 3.0 Tiny) for BERT and ERNIE 3.0",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["toolkit", "toolkit.*"]),
    include_package_data=True,
    package_data={"toolkit": ["configs/*.yaml", "configs/**/*.yaml", "ds_configs/*.json", "cpu/csrc/*.c", "cpu/csrc/*.h"]},
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "transformers>=4.40",
        "datasets>=2.18",
        "sentencepiece>=0.1.99",
        "tensorboard>=2.14",
        "click>=8.1",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tqdm>=4.66",
        "psutil>=5.9",
        "pyarrow>=14",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=7.4", "scikit-learn>=1.3", "scipy>=1.10"],
        "dev": ["pytest>=7.4", "scikit-learn>=1.3", "scipy>=1.10", "ruff"],
        "triton": ["triton>=3.0"],
    },
    entry_points={"console_scripts": ["toolkit=toolkit.cli:entry"]},
)
