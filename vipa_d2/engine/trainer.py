"""DefaultTrainer for referring segmentation: VIPA data, evaluator, optimizer, exact resume."""
import inspect
import logging
import os
import re
import traceback
import weakref
from collections import OrderedDict
from typing import Optional

import detectron2
import torch
from detectron2.data import (
    DatasetCatalog,
    DatasetFromList,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from vipa_d2.config import ConfigError, check_amp_device
from vipa_d2.data.custom import referring_dataset_names, register_refer_splits
from vipa_d2.data.dataset_mapper import ReferringDatasetMapper
from vipa_d2.data.eval_resolution import build_test_mapper
from vipa_d2.data.refer import REFERRING_EVALUATOR_TYPE
from vipa_d2.data.validation import has_no_target, shortlist
from vipa_d2.evaluation import ReferringEvaluator, print_csv_format, results_file_name
from vipa_d2.modeling import VIPA, no_target_threshold, runtime_options
from vipa_d2.modeling.registry import get_registered

from .best_checkpoint import BestMetricCheckpointer, best_metric_name
from .checkpoint import LAST_CHECKPOINT_KEY, AtomicDetectionCheckpointer, UntrustedCheckpointError, WeightsError
from .expected_results import verify_on_every_rank
from .expression_control import SHUFFLED_SUFFIX, check_shufflable, shuffle_expressions
from .optimizer import build_vipa_optimizer
from .process_group import raise_on_every_rank
from .reproducibility import (
    PositionSeededDataset,
    ResumablePreciseBN,
    ResumableTrainingSampler,
    StepSeedHook,
)
from .test_time_augmentation import TTA_RESULTS_FOLDER, TTA_SUFFIX, VIPAWithTTA, check_flip

logger = logging.getLogger(__name__)
# Where Detectron2's own modules are (its asserts on config keys are said as config errors).
_DETECTRON2_DIR = os.path.dirname(os.path.abspath(detectron2.__file__)) + os.sep

def run_seed(cfg) -> int:
    """The run's base seed: cfg.SEED, or one random seed shared by all ranks when SEED < 0."""
    return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()


def broadcast_buffers_from_main(model) -> None:
    """
    Give every rank the main process's buffers (BatchNorm running statistics). DDP runs with
    ``broadcast_buffers=False``, so each rank's statistics follow its own batches; without
    this, mid-training evaluation would score a different model on each rank than the one
    rank 0 checkpoints.
    """
    if comm.get_world_size() == 1:
        return
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)


# Registered referring datasets a refusal lists before "... (+N more)".
MAX_DATASETS_LISTED = 12
# How a refusal says to register a referring dataset of your own.
_OWN_DATASET_REGISTRATION = "DATASETS.REFER_SPLITS or vipa_d2.data.register_referring_dataset"


def check_referring_datasets(cfg, own_evaluator: bool = False) -> None:
    """
    ConfigError naming a ``DATASETS.TRAIN`` entry that is not registered, a
    ``DATASETS.TEST`` entry that is not a registered referring dataset (one with the
    referring evaluator; with ``own_evaluator``, a trainer whose ``build_evaluator`` is
    one's own, any registered one), with the ones there are, two test sets that would write
    one results file, ``TEST.AUG`` without its flip, or a ``TEST.EXPECTED_RESULTS`` task of a
    set the config does not evaluate: before any model is built, where each would otherwise
    surface only after the whole training (or, two sets in one file, never).
    """
    registered = DatasetCatalog.list()
    referring = referring_dataset_names()
    # Training data needs no evaluator: a dataset registered with its own loader will do.
    for key, names, allowed in (
        ("DATASETS.TRAIN", cfg.DATASETS.TRAIN, registered),
        ("DATASETS.TEST", cfg.DATASETS.TEST, registered if own_evaluator else referring),
    ):
        for name in names:
            if name in allowed:
                continue
            listed = shortlist(referring, MAX_DATASETS_LISTED)
            if name not in registered:
                raise ConfigError(
                    f"{key}: {name!r} is not registered; the referring datasets are {listed} (your own: "
                    f"{_OWN_DATASET_REGISTRATION})"
                )
            # Registered with DatasetCatalog alone (a loader of your own): what it lacks is the
            # metadata that names the evaluator, said before the list that does not show it.
            evaluator_type = MetadataCatalog.get(name).get("evaluator_type", None)
            raise ConfigError(
                f"{key}: {name!r} is not a referring dataset; the referring datasets are those whose MetadataCatalog "
                f"entry has evaluator_type={REFERRING_EVALUATOR_TYPE!r}, and {name!r} is registered in DatasetCatalog "
                f"but its entry has evaluator_type={evaluator_type!r} (your own loader: "
                f"MetadataCatalog.get({name!r}).set(evaluator_type={REFERRING_EVALUATOR_TYPE!r}), or "
                f"{_OWN_DATASET_REGISTRATION}); they are {listed}"
            )
    written = {}  # results file -> the set writing it
    for name in cfg.DATASETS.TEST:
        file_name = results_file_name(name)
        if file_name in written:
            raise ConfigError(
                f"DATASETS.TEST: {written[file_name]!r} and {name!r} would write one results file, {file_name}: "
                "the second would replace the first; evaluate each set once, under names that differ beyond '/' "
                "and '_'"
            )
        written[file_name] = name
    _check_evaluated_tasks(cfg)


def evaluated_sets(cfg, tta: bool = True) -> list:
    """The names the trainer reports results under: each ``DATASETS.TEST`` set, and its
    shuffled-expression control and (with ``tta``) test-time-augmented pass when the config
    runs them."""
    evaluated = list(cfg.DATASETS.TEST)
    if cfg.TEST.SHUFFLED_EXPRESSION_CONTROL:
        evaluated += [name + SHUFFLED_SUFFIX for name in cfg.DATASETS.TEST]
    if tta and cfg.TEST.AUG.ENABLED:
        evaluated += [name + TTA_SUFFIX for name in cfg.DATASETS.TEST]
    return evaluated


def result_owner(key: str, evaluated) -> Optional[str]:
    """The set of ``evaluated`` that the results key ``key`` ("<set>/<section>[/<metric>]")
    belongs to, or None. The longest set the key starts with: "<set>/shuffled/refer" is not
    "<set>"'s, even when the control does not run."""
    owner = max((name for name in evaluated if key.startswith(name + "/")), key=len, default=None)
    return None if owner is None or key[len(owner) :].startswith(SHUFFLED_SUFFIX + "/") else owner


def _check_evaluated_tasks(cfg) -> None:
    if cfg.TEST.AUG.ENABLED:
        try:
            check_flip(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    evaluated = evaluated_sets(cfg)
    for i, entry in enumerate(cfg.TEST.EXPECTED_RESULTS):
        if result_owner(entry[0], evaluated) is None:
            raise ConfigError(
                f"TEST.EXPECTED_RESULTS[{i}]: task {entry[0]!r} is not of a set this config evaluates "
                f"({shortlist(evaluated, MAX_DATASETS_LISTED) or 'none'}); expected '<set>/<section>', e.g. "
                f"'{cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else 'refcoco_unc_val'}/refer'"
            )


def _check_not_empty(records, name: str) -> None:
    if not records:  # Detectron2's test loader asserts on it (after the training)
        raise ConfigError(f"DATASETS.TEST: {name!r} has no records (its loader returned none): nothing "
                          "to score; register it with its samples or leave it out of DATASETS.TEST")


def _check_no_target_scored(records, name: str) -> None:
    """ConfigError when a referring set not marked ``generalized`` has expressions without a
    target: ReferringEvaluator scores such a set as RefCOCO (every expression has a target,
    the mask from before the no-target verdict), so a correct "no target" would count as a
    miss, and nothing would say so."""
    metadata = MetadataCatalog.get(name)
    if metadata.get("evaluator_type", None) != REFERRING_EVALUATOR_TYPE or metadata.get("generalized", False):
        return
    no_target = sum(map(has_no_target, records))  # as the mapper reads it
    if no_target:
        raise ConfigError(
            f"DATASETS.TEST: {name!r} has {no_target} of its {len(records)} expressions without a target, but its "
            "MetadataCatalog entry lacks generalized=True: ReferringEvaluator would score them as RefCOCO's, whose "
            "expressions all have one (a correct no-target verdict as a miss); set "
            f"MetadataCatalog.get({name!r}).set(generalized=True) to score the verdict (gRefCOCO's N-acc, gIoU), "
            "or leave those expressions out"
        )


def _check_test_set(mapper, records, name: str) -> None:
    """The checks of a ``DATASETS.TEST`` set's records before its loader reads any."""
    _check_not_empty(records, name)
    mapper.check_records(records, name)
    _check_no_target_scored(records, name)


def _check_shufflable(records, name: str) -> None:
    try:
        check_shufflable(records, name)
    except ValueError as e:
        raise ConfigError(f"TEST.SHUFFLED_EXPRESSION_CONTROL: {e}") from e


def evaluates_periodically(cfg) -> bool:
    """Whether ``cfg`` evaluates every TEST.EVAL_PERIOD (and keeps model_best.pth)."""
    return cfg.TEST.EVAL_PERIOD > 0 and bool(cfg.DATASETS.TEST)


def check_best_metric(cfg) -> str:
    """
    The set of ``TEST.BEST_METRIC`` (set, with periodic evaluation): ConfigError when the
    key is of no set evaluated every ``TEST.EVAL_PERIOD`` or lacks a section or a metric.
    Checked when the trainer is built, not at setup: ``--eval-only`` on other sets does not
    read it.
    """
    metric = cfg.TEST.BEST_METRIC
    periodic = evaluated_sets(cfg, tta=False)
    owner = result_owner(metric, periodic)
    parts = metric[len(owner) + 1 :].split("/") if owner else []
    if len(parts) < 2 or not all(parts):  # a section and a metric, each named
        raise ConfigError(
            f"TEST.BEST_METRIC: {metric!r} is not a metric of a set evaluated every TEST.EVAL_PERIOD "
            f"({shortlist(periodic, MAX_DATASETS_LISTED)}); expected '<set>/<section>/<metric>', e.g. "
            f"{best_metric_name(cfg.DATASETS.TEST[0])!r} (the flipped pass, '<set>{TTA_SUFFIX}', runs after the "
            "training only)"
        )
    return owner


def check_ranks_start_alike(start_iters, output_dir: str) -> None:
    """
    ConfigError when the ranks' ``start_iters`` (by rank) differ. Only rank 0 writes
    checkpoints, so on machines that do not share OUTPUT_DIR --resume finds them on rank 0's
    machine alone: the other ranks would start anew beside it, averaging gradients of other
    weights, until they hung waiting for rank 0 at the end.
    """
    if len(set(start_iters)) > 1:
        found = ", ".join(f"rank {rank}: {it}" for rank, it in enumerate(start_iters))
        raise ConfigError(
            f"--resume: the ranks found different checkpoints in OUTPUT_DIR {output_dir} (iteration to start at, "
            f"{found}). Only rank 0 writes checkpoints: give every machine the same OUTPUT_DIR (a shared file "
            "system), or copy rank 0's last_checkpoint and the file it names to the others"
        )


class ReferringTrainer(DefaultTrainer):
    """
    ``DefaultTrainer`` with:

    * ``ReferringDatasetMapper`` loaders; the train loader is resumable bit-exactly on CPU
      (see :mod:`vipa_d2.engine.reproducibility`; on GPU some kernels are not
      deterministic) and every iteration's RNG is seeded from (SEED, rank, iteration) when
      ``SEED >= 0``; ranks that would resume at different iterations are refused;
    * ``ReferringEvaluator`` for datasets whose metadata says ``evaluator_type="referring"``;
    * AdamW/SGD with encoder lr multipliers (:mod:`vipa_d2.engine.optimizer`);
    * atomic checkpoints, loaded weights-only unless ``MODEL.WEIGHTS_TRUSTED``;
    * DDP over gloo on CPU-only machines (detectron2 passes ``device_ids=[local_rank]``,
      which DDP rejects for CPU modules);
    * ``TEST.EVAL_PERIOD > 0``: ``model_best.pth`` keeps the weights of the best oIoU on the
      first ``DATASETS.TEST`` set, or of ``TEST.BEST_METRIC``
      (:class:`vipa_d2.engine.best_checkpoint.BestMetricCheckpointer`);
    * ``TEST.SHUFFLED_EXPRESSION_CONTROL``: each test set also scored with shuffled
      expressions, reported as ``<dataset>/shuffled``.
    """

    def __init__(self, cfg):
        # Same steps as DefaultTrainer.__init__, except the DDP wrapper and the checkpointer.
        TrainerBase.__init__(self)
        # train_net.py registers them in setup(); a trainer built from Python must too (a
        # registered entry is skipped).
        register_refer_splits(cfg.DATASETS.REFER_SPLITS)
        self.check_datasets(cfg)  # as train_net.py's setup() does, before any model is built
        for name in ("detectron2", "vipa_d2"):  # when not set up by train_net.py's default_setup
            if not logging.getLogger(name).isEnabledFor(logging.INFO):
                setup_logger(name=name, distributed_rank=comm.get_rank())  # the main process on the console
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        check_amp_device(cfg)  # here, not in get_vipa_cfg: inference on the CPU reads GPU training configs
        # What the config and the test sets' files can refuse, before the model is built
        # (minutes for a large one) and the training data read.
        named_best = evaluates_periodically(cfg) and cfg.TEST.BEST_METRIC
        self._best_metric_set = check_best_metric(cfg) if named_best else None
        self.check_test_sets(cfg)
        self.seed = run_seed(cfg)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg, seed=self.seed)
        model = self.wrap_ddp(model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trusted=cfg.MODEL.WEIGHTS_TRUSTED, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        """DefaultTrainer's model, run as the config asks (layout, compilation: not part
        of the architecture, see VIPA.set_runtime_options). A config value the modules
        refuse is a ConfigError: train_net.py says it in one line."""
        try:
            # Detectron2's build_model would say a bare KeyError: the key and the entries here.
            get_registered(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE, "MODEL.META_ARCHITECTURE")
            model = super().build_model(cfg)
            if isinstance(model, VIPA):
                model.set_runtime_options(**runtime_options(cfg))
        except (WeightsError, UntrustedCheckpointError):  # MODEL.WEIGHTS read for its encoders
            raise
        except ValueError as e:  # the modules' from_config checks: keys that do not fit together
            raise ConfigError(f"the model cannot be built from this config: {e}") from e
        except AssertionError as e:
            # Detectron2's builders check their keys with bare asserts ("AssertionError: []" for
            # an FPN without MODEL.FPN.IN_FEATURES): the line says which. An assert elsewhere (a
            # module of one's own, torch) is a bug to trace, and keeps its traceback.
            where = traceback.extract_tb(e.__traceback__)[-1]
            if not os.path.abspath(where.filename).startswith(_DETECTRON2_DIR):
                raise
            raise ConfigError(
                f"the model cannot be built from this config: detectron2's {os.path.basename(where.filename)}:"
                f"{where.lineno} asserts `{where.line}`" + (f": {e}" if str(e) else "")
            ) from e
        return model

    @staticmethod
    def wrap_ddp(model):
        """DDP when there is more than one process; ``device_ids`` only for a CUDA model."""
        if comm.get_world_size() == 1:
            return model
        on_cuda = next(model.parameters()).device.type == "cuda"
        device_ids = [comm.get_local_rank()] if on_cuda else None
        # Unused parameters are legitimate in ablations (e.g. VEG off, no-target head on
        # non-generalized data), so DDP must not expect a gradient for every parameter.
        return DistributedDataParallel(
            model, device_ids=device_ids, broadcast_buffers=False, find_unused_parameters=True
        )

    def resume_or_load(self, resume=True):
        if resume:
            # Each machine reads its own OUTPUT_DIR: a refusal on one is raised on all.
            problem = None
            try:
                self.check_resume_folder()
            except Exception as e:  # its refusals, or an OSError of this machine's folder
                problem = e
            raise_on_every_rank(problem)
        super().resume_or_load(resume=resume)
        if comm.get_world_size() > 1:
            check_ranks_start_alike(comm.all_gather(self.start_iter), self.cfg.OUTPUT_DIR)
        if self.start_iter > 0:
            # Continue the sample stream where the checkpointed run stopped.
            self._trainer.reset_data_loader(
                lambda: self.build_train_loader(self.cfg, self.start_iter, seed=self.seed)
            )
            self._remember_earlier_checkpoints()

    def load_state_dict(self, state_dict):
        # AMPTrainer reads its GradScaler's state without asking whether it is there: a
        # checkpoint of a run without AMP was a bare KeyError 'grad_scaler'. (The checkpointer
        # names the file.)
        if isinstance(self._trainer, AMPTrainer) and "grad_scaler" not in state_dict.get("_trainer", {}):
            raise WeightsError(
                "it holds no GradScaler state, so it was written by a run without SOLVER.AMP.ENABLED: resume it "
                "with SOLVER.AMP.ENABLED False, or start anew from its weights in AMP (another OUTPUT_DIR, "
                "MODEL.WEIGHTS set to this file, without --resume)"
            )
        super().load_state_dict(state_dict)

    def check_resume_folder(self) -> None:
        """
        What --resume would do wrong without a word: Detectron2 starts from scratch when
        OUTPUT_DIR has no ``last_checkpoint``, and then overwrites the checkpoints a folder
        holds (say, a model_final.pth copied there); and a ``last_checkpoint`` naming a file
        that is gone fails in an assertion. Both are refused, naming the files.
        """
        out = self.cfg.OUTPUT_DIR
        if self.checkpointer.has_checkpoint():
            named = self.checkpointer.get_checkpoint_file()
            if not os.path.isfile(named):
                raise WeightsError(f"{LAST_CHECKPOINT_KEY.format(out)} names {named}, which does not exist: restore "
                                   "it, or write the name of a checkpoint that is there into that file")
            return
        held = sorted(n for n in os.listdir(out) if n.startswith("model_") and n.endswith(".pth")) if os.path.isdir(out) else []
        if held:
            raise ConfigError(
                f"--resume: OUTPUT_DIR {out} holds {held} but no last_checkpoint, so training would start from "
                "scratch and write over them. To continue from one, write its name into "
                f"{LAST_CHECKPOINT_KEY.format(out)}; to start anew, use another OUTPUT_DIR"
            )

    def _remember_earlier_checkpoints(self):
        """
        fvcore's PeriodicCheckpointer deletes only the files it wrote itself, so after a
        resume SOLVER.CHECKPOINT_MAX_KEEP would never reach the run's earlier ones: hand it
        the newest of those (as many as it keeps), as if the run had not stopped.
        """
        for h in self._hooks:
            if isinstance(h, hooks.PeriodicCheckpointer) and h.max_to_keep:
                save_dir = h.checkpointer.save_dir
                pattern = re.compile(rf"{re.escape(h.file_prefix)}_(\d{{7}})\.pth")
                found = [(int(m.group(1)), m.group(0)) for m in map(pattern.fullmatch, PathManager.ls(save_dir)) if m]
                earlier = sorted(name for it, name in found if it < self.start_iter)  # fixed width: by iteration
                h.recent_checkpoints = [os.path.join(save_dir, name) for name in earlier[-h.max_to_keep :]]

    def build_hooks(self):
        ret = [self._resumable(h) for h in super().build_hooks()]
        evaluation = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
        if evaluates_periodically(self.cfg):
            # After EvalHook, whose results it reads; the first test set is the validation set.
            named = self.cfg.TEST.BEST_METRIC
            ret.insert(
                evaluation + 1,
                BestMetricCheckpointer(
                    self.cfg.TEST.EVAL_PERIOD,
                    self.checkpointer,
                    named or best_metric_name(self.cfg.DATASETS.TEST[0]),
                    mode=self.cfg.TEST.BEST_METRIC_MODE,
                    # The default is left to Detectron2's warning: an evaluator of one's own
                    # may report no "refer/oIoU", and no key of the config says otherwise.
                    evaluated_set=self._best_metric_set,
                ),
            )
        elif self.cfg.TEST.BEST_METRIC:
            logger.warning(f"TEST.BEST_METRIC {self.cfg.TEST.BEST_METRIC!r} is not read: model_best.pth is kept only "
                           "with periodic evaluation (TEST.EVAL_PERIOD > 0 and DATASETS.TEST)")
        if self.cfg.TEST.AUG.ENABLED:
            # After the plain evaluation (Detectron2's train_net.py registers it last): its
            # results join the ones train() returns and TEST.EXPECTED_RESULTS checks.
            def test_with_tta_and_save():
                results = self.test_with_TTA(self.cfg, self.model)
                self._last_eval_results = {**(getattr(self, "_last_eval_results", None) or {}), **results}
                return results

            ret.insert(evaluation + 1, hooks.EvalHook(0, test_with_tta_and_save))
        if self.cfg.SEED >= 0:
            ret.insert(0, StepSeedHook(self.seed))
        else:
            logger.warning("SEED < 0: a resumed run will not reproduce an uninterrupted one.")
        return ret

    def _resumable(self, hook):
        """``hook`` made to continue a resumed run as the uninterrupted one would: the
        periodic checkpointer keeps SOLVER.CHECKPOINT_MAX_KEEP files, precise BN reads the
        batches after those its earlier passes read."""
        keep = self.cfg.SOLVER.CHECKPOINT_MAX_KEEP
        if isinstance(hook, hooks.PeriodicCheckpointer) and keep > 0:
            return hooks.PeriodicCheckpointer(hook.checkpointer, hook.period, max_to_keep=keep)
        if isinstance(hook, hooks.PreciseBN):
            cfg = self.cfg.clone()
            cfg.defrost()
            cfg.DATALOADER.NUM_WORKERS = 0  # as DefaultTrainer builds its loader
            return ResumablePreciseBN(
                cfg.TEST.EVAL_PERIOD,
                self.model,
                lambda start_iter: self.build_train_loader(cfg, start_iter, seed=self.seed),
                cfg.TEST.PRECISE_BN.NUM_ITER,
            )
        return hook

    def train(self):
        """
        Train; returns the final evaluation results (on every rank, {} where not main),
        checked against ``TEST.EXPECTED_RESULTS`` on the main process.
        """
        # DefaultTrainer.train minus its verify_results call, which reads task-keyed results.
        TrainerBase.train(self, self.start_iter, self.max_iter)
        results = getattr(self, "_last_eval_results", None)
        verify_on_every_rank(self.cfg, results)
        return results

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """
        Score every ``DATASETS.TEST`` set with :class:`VIPAWithTTA` (``TEST.AUG``: the image
        also flipped, left/right words swapped), as ``<dataset>_TTA``; per-sample results in
        ``OUTPUT_DIR/inference_TTA``. The shuffled-expression control is not repeated.
        """
        folder = os.path.join(cfg.OUTPUT_DIR, TTA_RESULTS_FOLDER)
        runs = [
            (name + TTA_SUFFIX, cls.build_test_loader(cfg, name),
             cls.named_evaluator(cfg, name, folder, name + TTA_SUFFIX))
            for name in cfg.DATASETS.TEST
        ]
        broadcast_buffers_from_main(model)
        return cls._evaluate(VIPAWithTTA(cfg, model), runs)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_vipa_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0, seed=None):
        """
        Batches of ``SOLVER.IMS_PER_BATCH`` consecutive sampler positions (no aspect-ratio
        grouping, which would make the positions a batch consumes data dependent), starting
        at the position of iteration ``start_iter``.
        """
        seed = run_seed(cfg) if seed is None else seed
        if cfg.DATALOADER.ASPECT_RATIO_GROUPING:  # Detectron2's default; Base-VIPA.yaml sets False
            logger.warning("DATALOADER.ASPECT_RATIO_GROUPING is not read: batches take consecutive sampler "
                           "positions (a resumed run's data order depends on it); set it False to silence this")
        records = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
        mapper = ReferringDatasetMapper(cfg, True)
        mapper.check_records(records, f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}")
        if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:  # after the check: it reads every record's annotations
            records = filter_images_with_only_crowd_annotations(records, cfg.DATASETS.TRAIN)
        sampler = ResumableTrainingSampler(
            len(records), seed=seed, start_position=start_iter * cfg.SOLVER.IMS_PER_BATCH
        )
        dataset = PositionSeededDataset(DatasetFromList(records, copy=True), mapper, seed)
        return build_detection_train_loader(
            dataset,
            mapper=None,
            sampler=sampler,
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=False,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            # Its own generator for the workers' base seed: creating the loader iterator
            # must not draw from the global RNG, or a resumed run's RNG would drift.
            seed=seed,
        )

    @classmethod
    def check_test_sets(cls, cfg) -> None:
        """Each ``DATASETS.TEST`` set loads, passes the test mapper's record checks (the
        fields it reads, all image files at their records' sizes) and, with
        ``TEST.SHUFFLED_EXPRESSION_CONTROL``, has records enough to shuffle. The trainer
        checks this before the first iteration: test() would otherwise meet a split missing
        from the refs file, a missing image or a misshaped record only after the last one,
        and score no set. An empty set is refused too, and one with no-target expressions
        whose metadata lacks ``generalized`` (:func:`_check_no_target_scored`)."""
        mapper = build_test_mapper(cfg)
        for name in cfg.DATASETS.TEST:
            records = DatasetCatalog.get(name)
            _check_test_set(mapper, records, name)
            if cfg.TEST.SHUFFLED_EXPRESSION_CONTROL:
                _check_shufflable(records, name)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        records = DatasetCatalog.get(dataset_name)
        mapper = build_test_mapper(cfg)
        # As check_test_sets does before training; --eval-only comes here directly.
        _check_test_set(mapper, records, dataset_name)
        return build_detection_test_loader(
            records,
            mapper=mapper,
            batch_size=cfg.TEST.IMS_PER_BATCH,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_shuffled_test_loader(cls, cfg, dataset_name):
        """Test loader of ``dataset_name`` with its expressions shuffled across samples."""
        # Not run_seed(): every rank must shuffle identically without communicating.
        # Its image files are the dataset's, checked by build_test_loader, which test() calls first.
        records = DatasetCatalog.get(dataset_name)
        _check_shufflable(records, dataset_name)  # as check_test_sets does; --eval-only comes here directly
        records = shuffle_expressions(records, max(cfg.SEED, 0))
        return build_detection_test_loader(
            records,
            mapper=build_test_mapper(cfg),
            batch_size=cfg.TEST.IMS_PER_BATCH,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None, name=None):
        """The referring evaluator of ``dataset_name``; ``name``: what its log lines call the
        results (see :class:`ReferringEvaluator`)."""
        evaluator_type = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", None)
        if evaluator_type != REFERRING_EVALUATOR_TYPE:
            raise ValueError(
                f"No evaluator for dataset {dataset_name!r}: its metadata has "
                f"evaluator_type={evaluator_type!r}, expected {REFERRING_EVALUATOR_TYPE!r} "
                "(register it with vipa_d2.data.register_referring_dataset)."
            )
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return ReferringEvaluator(
            dataset_name,
            distributed=True,
            output_dir=output_folder,
            mask_threshold=cfg.MODEL.VIPA.MASK_THRESHOLD,
            no_target_threshold=no_target_threshold(cfg),
            resolution=cfg.TEST.EVAL_RESOLUTION,
            save_prediction_rle=cfg.TEST.SAVE_PREDICTION_RLE,
            name=name,
        )

    @classmethod
    def check_datasets(cls, cfg) -> None:
        """:func:`check_referring_datasets` for this trainer: a ``build_evaluator`` or a
        ``test`` of one's own may evaluate test sets of another ``evaluator_type``."""
        own = any(getattr(cls, method).__func__ is not getattr(ReferringTrainer, method).__func__
                  for method in ("build_evaluator", "test"))
        check_referring_datasets(cfg, own_evaluator=own)

    @classmethod
    def named_evaluator(cls, cfg, dataset_name, output_folder, name):
        """:meth:`build_evaluator` for a run whose results are reported as ``name`` (the
        flipped or shuffled-expression pass). An override with Detectron2's signature,
        ``(cfg, dataset_name, output_folder=None)``, is called without the name."""
        params = inspect.signature(cls.build_evaluator).parameters
        if "name" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return cls.build_evaluator(cfg, dataset_name, output_folder=output_folder, name=name)
        return cls.build_evaluator(cfg, dataset_name, output_folder=output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """
        Score every ``DATASETS.TEST`` set; with ``TEST.SHUFFLED_EXPRESSION_CONTROL`` also each
        set with shuffled expressions (key ``<dataset>/shuffled``, per-sample results under
        ``inference/shuffled``). Returns ``{dataset: {"refer": {metric: value}}}``.
        """
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        if evaluators is not None and len(evaluators) != len(cfg.DATASETS.TEST):
            raise ValueError(
                f"{len(evaluators)} evaluators given for {len(cfg.DATASETS.TEST)} test sets"
            )
        broadcast_buffers_from_main(model)
        runs = []
        for idx, name in enumerate(cfg.DATASETS.TEST):
            evaluator = evaluators[idx] if evaluators is not None else cls.build_evaluator(cfg, name)
            runs.append((name, cls.build_test_loader(cfg, name), evaluator))
        if cfg.TEST.SHUFFLED_EXPRESSION_CONTROL:
            for name in cfg.DATASETS.TEST:
                folder = os.path.join(cfg.OUTPUT_DIR, "inference", SHUFFLED_SUFFIX.strip("/"))
                runs.append(
                    (
                        name + SHUFFLED_SUFFIX,
                        cls.build_shuffled_test_loader(cfg, name),
                        cls.named_evaluator(cfg, name, folder, name + SHUFFLED_SUFFIX),
                    )
                )
        return cls._evaluate(model, runs)

    @staticmethod
    def _evaluate(model, runs) -> "OrderedDict":
        """``inference_on_dataset`` of each (result name, loader, evaluator) run, logged in
        csv format under its result name."""
        results = OrderedDict()
        for name, loader, evaluator in runs:
            results[name] = inference_on_dataset(model, loader, evaluator)
            if comm.is_main_process():
                logger.info(f"Evaluation results for {name} in csv format:")
                print_csv_format(results[name])
        return results
