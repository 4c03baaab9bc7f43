"""Install the MITKD distillation toolkit.

torch is deliberately *not* pinned here so GPU users keep their CUDA build; CPU machines
install with ``-c constraints.txt`` which pins the local CPU wheel.

A built wheel (or an install from the sdist) is complete on its own: the build step below
copies the top-level ``ds_configs/`` and ``configs/`` into the package as
``toolkit/shipped/``, where ``toolkit/resources.py`` finds them outside a checkout. Editable
installs skip the copy and read the checkout's folders directly.
"""
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent

#: Top-level folders shipped inside the package, with the files each contributes.
SHIPPED = {"ds_configs": ("*.json",), "configs": ("*.yaml", "models/*", "models/*/*")}


class BuildPyWithShippedFiles(build_py):
    """``build_py`` that also copies the shipped top-level folders into ``toolkit/shipped/``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder, patterns in SHIPPED.items():
            files = sorted({p for pattern in patterns for p in (HERE / folder).glob(pattern) if p.is_file()})
            if not files:
                raise SystemExit(f"setup.py: {HERE / folder} has no {', '.join(patterns)} to ship "
                                 f"(an sdist without it is incomplete)")
            for src in files:
                dst = Path(self.build_lib) / "toolkit" / "shipped" / src.relative_to(HERE)
                self.mkpath(str(dst.parent))
                self.copy_file(str(src), str(dst))


def _minimums():
    """toolkit/requirements.py's MINIMUMS and PYTHON, read without importing the package."""
    ns = {}
    exec((HERE / "toolkit" / "requirements.py").read_text(encoding="utf-8"), ns)
    return ns["MINIMUMS"], ns["PYTHON"]


MINIMUMS, PYTHON = _minimums()
readme = HERE / "README.md"

setup(
    name="mitkd-toolkit",
    version="0.1.0",
    description="Multi-task Infused Task-agnostic Knowledge Distillation (ERNIE 3.0 Tiny) for BERT and ERNIE 3.0",
    long_description=readme.read_text(encoding="utf-8") if readme.is_file() else "",
    long_description_content_type="text/markdown",
    python_requires=f">={PYTHON}",
    packages=find_packages(include=["toolkit", "toolkit.*"]),
    include_package_data=False,
    cmdclass={"build_py": BuildPyWithShippedFiles},
    install_requires=[
        *(f"{name}>={version}" for name, version in MINIMUMS.items()),
        "pydantic>=2",
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
        "test": ["pytest>=7.4", "pytest-timeout>=2.1", "scikit-learn>=1.3", "scipy>=1.10"],
        "dev": ["pytest>=7.4", "pytest-timeout>=2.1", "scikit-learn>=1.3", "scipy>=1.10", "ruff"],
        "triton": ["triton>=3.0"],
    },
    entry_points={"console_scripts": ["toolkit=toolkit.cli:entry"]},
)
