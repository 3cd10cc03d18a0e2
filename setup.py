from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="moce-ds",
    version="0.1.0",
    description="MoCE (Mixture of Cluster-conditional Experts) MAE pre-training on DeepSpeed expert-parallel MoE",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["moce_ds", "moce_ds.*"]),
    package_data={"moce_ds": ["config/experiments/*.yaml", "metrics/grafana_dashboard.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        # 0.19.x: the gate contract (the 7-tuple "sparse routes" returned to MOELayer) depends on it.
        "deepspeed>=0.19,<0.20",
        "timm>=1.0.9,<2",
        "webdataset>=1.0,<1.1",
        "faiss-cpu>=1.8,<2",
        "mpi4py>=4,<5",
        "pyyaml>=6",
        "prometheus-client>=0.20",
        "numpy>=1.26",
        "pillow>=10",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        # the embedded data set's images ship inside these two packages
        "scikit-learn>=1.4",
        "scikit-image>=0.22",
    ],
    extras_require={
        # faiss-gpu replaces faiss-cpu on GPU machines: pip uninstall faiss-cpu first.
        "gpu": ["faiss-gpu-cu12>=1.8"],
        # the Hugging Face folder (<out>/hf) customisation writes beside the timm export
        "hf": ["transformers>=4.40"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.5", "transformers>=4.40"],
    },
)
