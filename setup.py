from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
for line in (here / "rlad_kernels" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="rlad",
    version=version["__version__"],
    description="Fused Triton kernels and a thin trainer for RL-aware knowledge distillation (RLAD / TRRD) "
                "of reasoning LLMs",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rlad_kernels", "rlad_kernels.*", "rlad", "rlad.*"]),
    package_data={"rlad_kernels": ["ops/*/README.md"], "rlad": ["assets/tokenizer/*"]},
    install_requires=[
        # install the CPU or CUDA build of torch you want first; this range accepts 2.4 and later
        "torch>=2.4",
        "triton>=3.0",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "numpy",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    entry_points={"console_scripts": ["rlad=rlad.cli:main"]},
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "liger-kernel>=0.5"],
        "bench": ["pytest-benchmark>=4", "liger-kernel>=0.5", "cut-cross-entropy>=25.1"],
        "gpu": ["flash-attn>=2.6"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
