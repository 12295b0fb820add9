#!/usr/bin/env python
r"""
Export a model-only checkpoint: the weights and the text encoder's config and tokenizer
files, without the optimizer, scheduler and iteration a training checkpoint carries.

    python tools/slim_checkpoint.py --config-file configs/synthetic/vipa_tiny_cpu.yaml \
        --input output/vipa_tiny_cpu/model_final.pth --output model_slim.pth [--fp16] [--overwrite] [KEY VALUE ...]

The checkpoint is loaded strictly into the model ``--config-file`` builds (a file that does
not match fails, listing the keys), so the export loads wherever the config does: the demo,
``VIPAPredictor`` and ``train_net.py --eval-only MODEL.WEIGHTS model_slim.pth``.
``--fp16`` stores floating-point weights in half precision (about half the size); they are
loaded back into the float32 model, so masks agree closely but not exactly.
"""
import argparse
import os
import sys
from typing import Optional, Sequence

import torch
from detectron2.modeling import build_model

from vipa_d2 import get_vipa_cfg
from vipa_d2.config import add_config_function_option, import_config_functions
from vipa_d2.engine.checkpoint import load_weights, model_checkpoint, save_checkpoint_file
from vipa_d2.utils.checkpoint_file import local_weights_path

MEGABYTE = 1024 * 1024


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config the checkpoint was trained with")
    add_config_function_option(parser)
    parser.add_argument("--input", required=True, metavar="FILE", help="checkpoint to export (e.g. model_final.pth)")
    parser.add_argument("--output", required=True, metavar="FILE", help="model-only checkpoint to write")
    parser.add_argument("--fp16", action="store_true", help="store floating-point weights in half precision")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    return parser


def export(config_file: str, source: str, output: str, fp16: bool = False, opts: Sequence[str] = (),
           config_functions: Sequence = (), overwrite: bool = False) -> str:
    """Write ``source``'s model, checked against ``config_file`` (with the keys of
    ``config_functions``), to ``output`` (an existing file only with ``overwrite``).
    Returns the local file read (``source`` fetched, if a URL)."""
    if os.path.abspath(source) == os.path.abspath(output):
        raise ValueError(f"--output {output} is the --input file; give another path")
    # --output before --input, which may be a download; both before the model is built and loaded.
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise FileNotFoundError(f"--output {output}: its folder does not exist")
    if os.path.isdir(output):
        raise ValueError(f"--output {output} is a folder; give the checkpoint file to write, e.g. {output}/model_slim.pth")
    if os.path.exists(output) and not overwrite:  # e.g. a run's model_final.pth, which last_checkpoint names
        raise FileExistsError(f"--output {output} exists; give another path, or --overwrite to replace it")
    local = local_weights_path(source, key="--input")  # FileNotFoundError naming --input
    cfg = get_vipa_cfg(config_file, list(opts) + ["MODEL.WEIGHTS", source, "MODEL.DEVICE", "cpu"], config_functions)
    cfg.freeze()
    model = build_model(cfg)
    load_weights(model, source, trusted=cfg.MODEL.WEIGHTS_TRUSTED, key="--input")
    save_checkpoint_file(model_checkpoint(model, torch.float16 if fp16 else None), output)
    return local


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        local = export(args.config_file, args.input, args.output, args.fp16, args.opts,
                       import_config_functions(args.config_function), args.overwrite)
    # ConfigError and WeightsError are ValueErrors; each of these names the file or key (an
    # OSError of the write names the file too: a full disk, a folder removed meanwhile).
    except (ValueError, OSError) as e:
        parser.error(str(e))
    before, after = os.path.getsize(local), os.path.getsize(args.output)
    precision = "fp16" if args.fp16 else "fp32"
    print(
        f"{args.output}: {after / MEGABYTE:.1f} MB ({precision}, model only), "
        f"from {args.input}: {before / MEGABYTE:.1f} MB ({after / before:.0%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
