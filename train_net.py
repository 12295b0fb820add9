#!/usr/bin/env python
"""
Train / evaluate VIPA with Detectron2.

    python train_net.py --config-file configs/synthetic/vipa_tiny_cpu.yaml
    python train_net.py --config-file ... --num-gpus 2            # 2 processes (gloo for a CPU model)
    python train_net.py --config-file ... --resume                # continue the last checkpoint
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS out/model_final.pth
"""
import sys

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from vipa_d2 import ConfigError, get_vipa_cfg
from vipa_d2.data import ReferringDataError, register_refer_splits
from vipa_d2.engine import (
    ReferringTrainer,
    UntrustedCheckpointError,
    WeightsError,
    keep_freed_host_memory,
    launch_ranks,
    leave_process_group,
    load_weights,
    share_cpu_cores,
    verify_on_every_rank,
)


# Bad input found after setup (data files, weights): one line and exit status 1, not a
# traceback. In one process only: launch's spawned ranks report their own.
INPUT_ERRORS = (ConfigError, ReferringDataError, WeightsError, UntrustedCheckpointError, FileNotFoundError)


class Trainer(ReferringTrainer):
    """Project hooks go here; all referring-specific logic lives in ReferringTrainer."""

    # Your project's add_*_config functions (Detectron2's idiom), for the keys its modules
    # read: they run before the config file is merged, in every process.
    config_functions = ()


def load_config(args):
    """The config of ``args`` (its file and overrides) with the project's keys."""
    return get_vipa_cfg(args.config_file, args.opts, Trainer.config_functions)


def setup(args):
    cfg = load_config(args)
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup sets up Detectron2's and fvcore's loggers only: without this, vipa_d2's
    # (the evaluator's tables, the retrieval report) reach neither the console nor log.txt.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="vipa_d2")
    register_refer_splits(cfg.DATASETS.REFER_SPLITS)  # in every process launch starts
    Trainer.check_datasets(cfg)
    if cfg.MODEL.KEEP_FREED_HOST_MEMORY and cfg.MODEL.DEVICE == "cpu":
        keep_freed_host_memory()
    if cfg.MODEL.DEVICE == "cpu" and comm.get_local_size() > 1:
        share_cpu_cores(comm.get_local_size())  # ranks on one CPU split its cores
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # As strict as the demo: a checkpoint that does not match fails, listing the keys.
        load_weights(
            model,
            cfg.MODEL.WEIGHTS,
            trusted=cfg.MODEL.WEIGHTS_TRUSTED,
            resume_dir=cfg.OUTPUT_DIR if args.resume else "",
        )
        results = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            results.update(Trainer.test_with_TTA(cfg, model))
        verify_on_every_rank(cfg, results)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    leave_process_group()
    return results


def invoke_main() -> None:
    # default_setup logs the arguments once the logger exists.
    parser = default_argument_parser()
    args = parser.parse_args()
    try:  # a config that does not merge fails here, in one line, before any process starts
        cfg = load_config(args)
    except ConfigError as e:
        parser.error(str(e))
    try:
        launch_ranks(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            device=cfg.MODEL.DEVICE,
        )
    except INPUT_ERRORS as e:  # their messages name the file, record, key or value
        sys.exit(f"{parser.prog}: error: {e}")


if __name__ == "__main__":
    invoke_main()
