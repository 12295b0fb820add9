#!/usr/bin/env python
"""
The ablation study: (variant, seed) runs of ``train_net.py`` on the synthetic benchmark
that ``make train`` writes, resumable over several sittings, every result in one JSON file.

    python tools/study.py --variants vipa language language_relevance --seeds 0 1 2 \\
        --output output/study --results output/study/study.json [--max-iter 1000] [KEY VALUE ...]

A variant is a config leaf ``configs/synthetic/ablations/<variant>.yaml``; its run for seed
k trains into ``<output>/<variant>/seed<k>/`` with ``SEED k`` at the leaf's schedule
(``--max-iter`` shortens it, warm-up and checkpoint period in proportion). Sampler,
augmentations and per-iteration RNGs all derive from SEED (vipa_d2/engine/reproducibility.py):
every variant of a seed sees the same data in the same order. Runs go seed by seed, so a
study stopped early holds comparable pairs. Trailing ``KEY VALUE`` pairs go to every run.

Rerunning skips the runs the results file holds as done (and refuses one made with other
settings, the whole merged config compared, key by key: a changed default is a new recipe,
while a key added since the run, at its ``add_vipa_config`` default, is not, because keys
are added off, leaving the default path as it was; and one trained on a synthetic
benchmark of other settings than --data-root's). Every finished run of the file is
checked so before the first run, whatever its variant or seed: a new run is paired with
them all. The others restart with
``train_net.py --resume``: an interrupted run continues from its last checkpoint, and its
entry keeps the time already spent (written every minute, so even a killed study keeps it).
A run folder holding another recipe's checkpoints is refused too (its config.yaml compared
the same way), and so is a run whose folder another process holds: each run's
train_net.py inherits the folder's lock. A study stopped by Ctrl-C or SIGTERM stops its
train_net.py first; one killed outright (SIGKILL) has it stopped by the kernel on Linux
(``vipa_d2/utils/end_with_parent.py``), and elsewhere leaves it training, the run locked
until it ends (stop it, or wait). Each entry keeps the commits of the sittings it trained
in ("commits"), its train_net.py processes' CPU time ("cpu_s", counted when a process
ends: a sitting killed outright keeps its wall time, not its CPU time) beside the wall time,
and the thread setting (OMP_NUM_THREADS, the core count). ``tools/study_report.py`` renders the JSON.

Each run is its own train_net.py process, not a call into it: a fresh process starts from
clean RNG, memory and device state, a crash loses one run at most, and ``--num-gpus`` /
``MODEL.DEVICE cuda`` behave as for train_net.py; seconds of start-up beside minutes of run.
"""
import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time

from vipa_d2 import ConfigError, get_vipa_cfg
from vipa_d2.data.builtin import DATASETS_ENV
from vipa_d2.data.synthetic import benchmark_settings, finished_benchmark, settings_differences
from vipa_d2.utils.atomic_io import atomic_open
from vipa_d2.utils.runs import (
    RunFolderError,
    check_run_folder,
    flat_config,
    holding_run_folder,
    iteration_seconds,
    read_study_results,
    run_train_net,
    split_scores,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "train_net.py")
ABLATIONS = os.path.join(REPO, "configs", "synthetic", "ablations")
# Seconds between writes of a training run's wall time into its entry: a study killed
# outright (SIGKILL, e.g. when a sitting ends) runs no ``finally``, and would lose the time.
HEARTBEAT_S = 60.0
# Checkpoints only a resume needs, removed once a run is done (~0.3 GB each); model_final
# and model_best (TEST.EVAL_PERIOD) stay.
PERIODIC_CHECKPOINT = re.compile(r"model_\d{7}\.pth")


class StudyError(ValueError):
    """Bad arguments or a results file that does not match them (said without a traceback)."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"config leaves in --config-dir, by name (default: all of {ABLATIONS})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="SEED of the runs (default 0)")
    parser.add_argument("--output", default=os.path.join("output", "study"), help="folder of the run folders")
    parser.add_argument("--results", default=None, help="the study's JSON (default <output>/study.json)")
    parser.add_argument("--data-root", default=os.path.join(REPO, "datasets"), help="the 'make train' data")
    parser.add_argument("--config-dir", default=ABLATIONS, help="where the variants' YAML leaves are")
    parser.add_argument("--max-iter", type=int, default=None, help="shorter schedule: SOLVER.MAX_ITER")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per run (train_net.py)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' periodic checkpoints")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... for every run")
    args = parser.parse_args(argv)
    args.opts = [o for o in args.opts if o != "--"]
    if len(args.opts) % 2:
        parser.error(f"config overrides must be KEY VALUE pairs, got {args.opts}")
    if min(args.seeds) < 0:  # SEED < 0 draws a random seed per run: no paired data order
        parser.error(f"--seeds must be >= 0, got {args.seeds}")
    if args.max_iter is not None and args.max_iter < 1:
        parser.error(f"--max-iter must be >= 1, got {args.max_iter}")
    if args.num_gpus < 1:
        parser.error(f"--num-gpus must be >= 1, got {args.num_gpus}")
    args.results = args.results or os.path.join(args.output, "study.json")
    if os.path.isdir(args.results):  # read and written after each run: said before the first
        parser.error(f"--results {args.results}: a folder; expected the name of the study's JSON file")
    return args


def variant_configs(config_dir: str, names):
    """{variant: its YAML leaf}; all leaves of ``config_dir`` when ``names`` is None."""
    if not os.path.isdir(config_dir):
        raise StudyError(f"--config-dir {config_dir}: no such folder (expected a folder of ablation YAML leaves)")
    found = sorted(f[: -len(".yaml")] for f in os.listdir(config_dir) if f.endswith(".yaml"))
    names = names or found
    unknown = [n for n in names if n not in found]
    if unknown or len(set(names)) != len(names):
        raise StudyError(f"--variants {names}: unknown or repeated {unknown}; the leaves in {config_dir} are {found}")
    return {n: os.path.join(os.path.abspath(config_dir), n + ".yaml") for n in names}


def schedule_opts(cfg, max_iter):
    """SOLVER overrides for a shorter schedule: warm-up and checkpoint period scale with it."""
    if max_iter is None:
        return []
    scale = max_iter / cfg.SOLVER.MAX_ITER
    return ["SOLVER.MAX_ITER", str(max_iter),
            "SOLVER.WARMUP_ITERS", str(max(1, round(cfg.SOLVER.WARMUP_ITERS * scale))),
            "SOLVER.CHECKPOINT_PERIOD", str(max(1, round(cfg.SOLVER.CHECKPOINT_PERIOD * scale)))]


def load_results(path: str):
    """The study's results file ({"runs": {key: entry}}), empty when there is none yet."""
    try:
        return read_study_results(path) if os.path.isfile(path) else {"runs": {}}
    except ValueError as e:
        raise StudyError(f"--results {e}") from e


def save_entry(path: str, key: str, entry) -> None:
    """Write one run's entry into the results file, re-read under a lock on its folder: studies
    sharing the file (other variants or seeds in parallel) keep each other's entries."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    lock = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load_results(path)
        with atomic_open(path, "w") as f:  # a killed study never leaves half a file
            json.dump({**data, "runs": {**data["runs"], key: entry}}, f, indent=1, sort_keys=True)
    finally:
        os.close(lock)  # releases the lock


@contextlib.contextmanager
def keeping_time(path: str, key: str, entry, every: float = HEARTBEAT_S):
    """Inside the block, every ``every`` seconds, ``entry`` (its "wall_s" plus the time spent
    in the block) is written to the results file; the writes end before the block does."""
    base, start, stop = entry["wall_s"], time.perf_counter(), threading.Event()

    def beat():
        while not stop.wait(every):
            save_entry(path, key, {**entry, "wall_s": base + time.perf_counter() - start})

    thread = threading.Thread(target=beat, name="study-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def config_digest(cfg) -> str:
    """Digest of a run's whole merged config. Leaf name and overrides do not say which recipe
    a run had: a default changed between sittings would pair runs of two recipes."""
    return hashlib.sha256(cfg.dump().encode()).hexdigest()[:16]


def recipe_changes(stored, current, defaults):
    """
    {key: (stored value, current value)} where a run's stored flat config and the current
    one differ. A key the stored config lacks was added since: the same recipe only at its
    default (``defaults``), since keys are added off; "<absent>" marks a missing side.
    """
    absent = "<absent>"
    changes = {k: (v, current.get(k, absent)) for k, v in stored.items() if current.get(k, absent) != v}
    changes.update({k: (absent, v) for k, v in current.items() if k not in stored and v != defaults.get(k, absent)})
    return changes


def data_settings(data_root):
    """The synthetic benchmark's settings under ``data_root`` (benchmark_settings), None
    where there is none: two runs are paired only when trained on the same data."""
    try:
        generator = finished_benchmark(data_root)
    except ValueError as e:
        raise StudyError(f"--data-root {e}") from e
    return None if generator is None else benchmark_settings(generator)


def check_same_recipe(key, entry, signature, config, results_path):
    """Raise StudyError when a results entry was made with other settings than this run's."""
    # An entry of an older study.py has no "data": its config is all there is to compare.
    if "data" in entry and entry["data"] != signature["data"]:
        stored, current = (d if isinstance(d, dict) else {} for d in (entry["data"], signature["data"]))
        listed = "; ".join(settings_differences(stored, current, ("then", "now"))[:10])
        raise StudyError(f"{results_path}: run {key} (commit {entry.get('commit')}) was trained on another synthetic "
                         f"benchmark than the one under --data-root ({listed or 'none there now'}). Use other "
                         "--results/--output, the --data-root of that run, or drop that entry")
    if entry.get("config_file") != signature["config_file"] or entry.get("opts") != signature["opts"]:
        raise StudyError(f"{results_path}: run {key} was made with {entry.get('config_file')} {entry.get('opts')} "
                         f"(commit {entry.get('commit')}), not {signature['config_file']} {signature['opts']}. "
                         "Use other --results/--output or drop that entry")
    if "config" not in entry:  # an entry of an older study.py: its digest is all there is to compare
        if entry.get("config_digest") != signature["config_digest"]:
            raise StudyError(f"{results_path}: run {key} has config_digest {entry.get('config_digest')} (commit "
                             f"{entry.get('commit')}), not {signature['config_digest']}: a changed default or leaf "
                             "changes config_digest. Use other --results/--output or drop that entry")
        return
    changes = recipe_changes(entry["config"], config, flat_config(get_vipa_cfg()))
    if changes:
        listed = "; ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in sorted(changes.items())[:10])
        raise StudyError(f"{results_path}: run {key} (commit {entry.get('commit')}) had another recipe, "
                         f"{len(changes)} key(s) differ: {listed}. Use other --results/--output or drop that entry")


def git_commit():
    """HEAD of the repository, '-dirty' with uncommitted changes to tracked files (None outside git)."""
    try:  # --exclude: the commit, never a tag's name
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_signature(config_file, opts, data):
    """(signature, flat config, merged config) of a run of the leaf ``config_file`` with
    ``opts`` on the benchmark of settings ``data``: what its entry stores and is compared by."""
    cfg = get_vipa_cfg(config_file, opts)
    signature = {"config_file": os.path.relpath(config_file, REPO), "opts": opts, "config_digest": config_digest(cfg),
                 "data": data}
    return signature, flat_config(cfg), cfg


def check_finished_runs(args, data):
    """Raise StudyError when a finished run of the results file, whatever its variant or seed,
    had another recipe than its leaf and overrides give now, or other data: a new run would
    be paired with it (a changed default between sittings, or data regenerated otherwise)."""
    for key, entry in load_results(args.results)["runs"].items():
        if entry.get("status") != "done":  # rerun under run_one's own check, or never paired
            continue
        leaf, opts = entry.get("config_file"), entry.get("opts")
        if not isinstance(leaf, str) or not isinstance(opts, list):
            raise StudyError(f"{args.results}: finished run {key} has no config_file / opts (got {leaf!r}, {opts!r}): "
                             "not an entry tools/study.py writes")
        config_file = os.path.join(REPO, leaf)
        if not os.path.isfile(config_file):
            raise StudyError(f"{args.results}: finished run {key} was made with {leaf}, which is gone: its recipe "
                             "cannot be compared with the new runs'. Use other --results/--output or drop that entry")
        try:
            signature, config, _ = run_signature(config_file, opts, data)
        except (ConfigError, ValueError) as e:  # a key or value this version refuses
            raise StudyError(f"{args.results}: finished run {key} ({leaf} {opts}) does not load now: {e}") from e
        check_same_recipe(key, entry, signature, config, args.results)


def sitting_commits(entry, commit):
    """The commits of every sitting a run trained in, oldest first: a run resumed under other
    code than it started with trained on both."""
    commits = list(entry.get("commits") or ([entry["commit"]] if entry.get("commit") else []))
    return commits + [commit] if commit and commits[-1:] != [commit] else commits


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished (waited for) children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_one(key, variant, seed, config_file, shared, args):
    """Train + score one run unless the results hold it as done; True when it is done."""
    opts = shared + ["SEED", str(seed)]
    signature, config, cfg = run_signature(config_file, opts, data_settings(args.data_root))
    entry = load_results(args.results)["runs"].get(key, {})
    if entry:  # made before: only with the same settings is it this run
        check_same_recipe(key, entry, signature, config, args.results)
    if entry.get("status") == "done":
        print(f"[study] {key}: done before, skipped")
        return True
    run_dir = os.path.join(os.path.abspath(args.output), variant, f"seed{seed}")
    check_run_folder(run_dir, config)
    with holding_run_folder(run_dir) as lock:
        # Read again under the lock: another study may have finished the run meanwhile, and
        # resuming it would only evaluate it again and write over its entry.
        if load_results(args.results)["runs"].get(key, {}).get("status") == "done":
            print(f"[study] {key}: done meanwhile by another study, skipped")
            return True
        commit = git_commit()
        # CPU time and the thread setting beside the wall time: two lanes side by side, or
        # one thread against all cores, change the minutes, and the entry says which it was.
        entry = {**signature, "config": config, "variant": variant, "seed": seed, "output_dir": run_dir,
                 "status": "running", "wall_s": entry.get("wall_s", 0.0), "cpu_s": entry.get("cpu_s", 0.0),
                 "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
                 "device": cfg.MODEL.DEVICE, "commit": commit, "commits": sitting_commits(entry, commit)}
        save_entry(args.results, key, entry)
        print(f"[study] {key}: training {cfg.SOLVER.MAX_ITER} iterations in {run_dir}", flush=True)
        start, cpu_start = time.perf_counter(), children_cpu_seconds()
        try:
            with keeping_time(args.results, key, entry):
                run_train_net(TRAIN_NET, ["--config-file", config_file, "--resume", "--num-gpus", str(args.num_gpus),
                                          *opts, "OUTPUT_DIR", run_dir], os.path.join(run_dir, "train_console.log"),
                              {**os.environ, DATASETS_ENV: os.path.abspath(args.data_root)}, print, pass_fds=(lock,))
            entry.update(split_scores(run_dir, cfg.DATASETS.TEST), status="done", iterations=cfg.SOLVER.MAX_ITER,
                         ratio=cfg.MODEL.VIPA.VEG.RATIO, sec_per_iter=iteration_seconds(run_dir),
                         finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        # ValueError: an unreadable results or metrics file of the run (named in the error).
        except (subprocess.CalledProcessError, FileNotFoundError, ValueError) as e:
            entry.update(status="failed", error=f"{e} {getattr(e, 'output', '')}"[-800:])
            print(f"[study] {key}: FAILED: {entry['error']}", file=sys.stderr)
        finally:  # an interrupted run keeps the time it spent (its status stays "running"; killed: see HEARTBEAT_S)
            entry["wall_s"] += time.perf_counter() - start
            entry["cpu_s"] += children_cpu_seconds() - cpu_start  # train_net.py's, once it has ended
            save_entry(args.results, key, entry)
    if entry["status"] == "done":
        print(f"[study] {key}: val oIoU {entry['splits'].get('val', {}).get('oIoU')}, {entry['wall_s']:.0f} s")
        for name in [] if args.keep_checkpoints else os.listdir(run_dir):
            if PERIODIC_CHECKPOINT.fullmatch(name):
                os.remove(os.path.join(run_dir, name))
    return entry["status"] == "done"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        configs, failed = variant_configs(args.config_dir, args.variants), 0
        # Every variant's config merged with the overrides before the first run starts.
        shared = {v: schedule_opts(get_vipa_cfg(f, args.opts), args.max_iter) + args.opts for v, f in configs.items()}
        check_finished_runs(args, data_settings(args.data_root))
        for seed in args.seeds:
            for variant, config_file in configs.items():
                failed += not run_one(f"{variant}/seed{seed}", variant, seed, config_file, shared[variant], args)
    except (StudyError, ConfigError, RunFolderError) as e:
        print(f"study.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an --output or --results that cannot be written: the path and why, in one line
        print(f"study.py: error: {e} (--output {args.output}, --results {args.results})", file=sys.stderr)
        return 2
    print(f"[study] results in {args.results}" + (f"; {failed} run(s) failed, rerun to retry" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
