"""
``train_net.py`` runs for the tools (``tools/main_job.py``, ``tools/study.py``): starting
one as a process, and reading back what it leaves in its OUTPUT_DIR (the evaluator's
per-split results files, the training iteration times) and the config it ran.
"""
import contextlib
import fcntl
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from typing import Callable, Dict, Mapping, Optional, Sequence

from vipa_d2.config import ConfigError, flatten_config, get_vipa_cfg
from vipa_d2.data.builtin import BUILTIN_REFERRING
from vipa_d2.data.validation import read_json_file
from vipa_d2.engine import SHUFFLED_SUFFIX, TTA_RESULTS_FOLDER, TTA_SUFFIX
from vipa_d2.evaluation import results_file_name
from vipa_d2.evaluation.breakdown import BY_TYPE_KEY, RETRIEVAL_KEY

__all__ = [
    "RunFolderError", "check_run_folder", "flat_config", "holding_run_folder",
    "run_train_net", "split_label", "read_json_object", "read_study_results", "read_results", "required_results",
    "split_scores", "iteration_seconds",
]

# Lines of Detectron2's console log worth echoing while a run goes.
PROGRESS_MARKERS = (" iter: ", "Start inference on", "Total inference time", "Saving checkpoint")
# How long a train_net.py child gets to end on SIGTERM before it is killed.
CHILD_STOP_SECONDS = 30
# What starts the child so that it ends with its tool even when the tool is SIGKILLed.
END_WITH_PARENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "end_with_parent.py")
# Where ReferringTrainer.test writes the evaluator's files: the plain run, and the
# shuffled-expression control (TEST.SHUFFLED_EXPRESSION_CONTROL).
_RESULT_FOLDERS = (("", "inference"), (SHUFFLED_SUFFIX, os.path.join("inference", "shuffled")))
# Where ReferringTrainer.test_with_TTA writes them (TEST.AUG.ENABLED): the same file names.
_TTA_RESULT_FOLDERS = ((TTA_SUFFIX, TTA_RESULTS_FOLDER),)


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM raises SystemExit in the main thread for the block (the default action
    restored after), so that ``kill <tool>`` reaches the block's cleanup. A handler the
    caller set (or SIG_IGN) is left as it is, and so is the block outside the main thread,
    where no handler can be set."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(proc: subprocess.Popen) -> None:
    """End ``proc``: SIGTERM, then SIGKILL if it is still there after CHILD_STOP_SECONDS."""
    proc.terminate()
    try:
        proc.wait(timeout=CHILD_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_train_net(
    train_net: str,
    args: Sequence[str],
    log_path: str,
    env: Mapping[str, str],
    echo: Callable[[str], None],
    pass_fds: Sequence[int] = (),
) -> float:
    """
    Run the script ``train_net`` with ``args`` in a fresh process under ``env`` (inheriting
    the file descriptors ``pass_fds``): its console output is appended to ``log_path``; the
    command and the progress lines go to ``echo``. Returns the seconds taken;
    CalledProcessError (the end of the log as its output) on failure.

    The process ends with the caller: on an exception (Ctrl-C) or a SIGTERM sent to the
    caller alone, it is stopped before the exception goes on (a SIGTERM handler the caller
    set runs instead; an exception it raises stops the process too). Without this it trained on,
    unseen, its console output going nowhere. A caller killed outright (SIGKILL) runs none of
    that: on Linux the kernel then sends the process SIGTERM (``end_with_parent.py`` starts
    it); elsewhere it keeps the run folder's lock until it ends, see :func:`holding_run_folder`.
    """
    cmd = [sys.executable, "-u", train_net, *args]  # unbuffered: the log and the echo keep up
    echo(f"$ {' '.join(cmd)}\n  (console output: {log_path})")
    start = time.perf_counter()
    with open(log_path, "a", buffering=1) as log, _sigterm_as_exit():
        log.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen([sys.executable, END_WITH_PARENT, str(os.getpid()), *cmd],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=os.path.dirname(os.path.abspath(train_net)), env=dict(env),
                                pass_fds=tuple(pass_fds))
        try:
            for line in proc.stdout:
                log.write(line)
                if any(marker in line for marker in PROGRESS_MARKERS):
                    echo("    " + line.rstrip()[:200])
            returncode = proc.wait()
        except BaseException:
            _stop(proc)
            raise
    if returncode != 0:
        with open(log_path) as f:
            raise subprocess.CalledProcessError(returncode, cmd, output=f"end of {log_path}:\n{f.read()[-3000:]}")
    return time.perf_counter() - start


class RunFolderError(ValueError):
    """A run folder that another recipe's checkpoints, or another process, hold."""


def flat_config(cfg) -> Dict:
    """{"FULL.KEY": value} of a config (:func:`vipa_d2.config.flatten_config`), as JSON
    stores it (tuples become lists)."""
    return json.loads(json.dumps(flatten_config(cfg)))


def check_run_folder(run_dir: str, config: Dict, ignored: Sequence[str] = ("OUTPUT_DIR",)) -> None:
    """
    RunFolderError when ``run_dir`` holds the checkpoints of a run with another recipe than
    ``config`` (a :func:`flat_config`): the config.yaml train_net.py saved there, compared
    key by key but for the ``ignored`` keys (those the caller sets per step). ``--resume``
    would go on from that run's weights, or re-evaluate them if it had finished, under this
    recipe's name.
    """
    saved = os.path.join(run_dir, "config.yaml")
    if not (os.path.isfile(os.path.join(run_dir, "last_checkpoint")) and os.path.isfile(saved)):
        return
    try:
        stored = flat_config(get_vipa_cfg(saved))
    except ConfigError as e:  # a key removed since, say: another recipe too
        raise RunFolderError(f"{run_dir} holds the checkpoints of a run whose config.yaml this version cannot read "
                             f"({e}); --resume would continue from them. Use another --output or delete that folder") from e
    changes = sorted(k for k, v in stored.items() if k not in ignored and config.get(k) != v)
    if changes:
        listed = "; ".join(f"{k}: {stored[k]!r} there, {config.get(k)!r} now" for k in changes[:10])
        raise RunFolderError(f"{run_dir} holds the checkpoints of a run with another recipe, {len(changes)} key(s) "
                             f"differ ({listed}); --resume would continue from them. Use another --output or delete "
                             "that folder")


@contextlib.contextmanager
def holding_run_folder(run_dir: str):
    """
    A lock on the folder ``run_dir`` (made if need be) for the block, which gets its file
    descriptor to hand to the train_net.py processes it starts (``run_train_net``'s
    ``pass_fds``): such a process holds the lock until it ends, even when the tool that
    started it is killed outright (where :func:`run_train_net` cannot end it with its tool).
    A second run reaching the folder meanwhile is refused
    (RunFolderError) rather than writing the same checkpoints.
    """
    os.makedirs(run_dir, exist_ok=True)
    lock = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise RunFolderError(f"another process runs in {run_dir} (another run, or the train_net.py of one that "
                                 "was killed, which goes on until it ends): wait for it or stop it") from e
        yield lock
    finally:
        os.close(lock)  # the lock stays with a train_net.py still holding it


def split_label(dataset_name: str) -> str:
    """'refsynth_unc_val' -> 'val', 'refsynth_unc_val/shuffled' -> 'val/shuffled' (built-in
    splits by their split name; other names unchanged)."""
    shuffled = dataset_name.endswith(SHUFFLED_SUFFIX)
    base = dataset_name[: -len(SHUFFLED_SUFFIX)] if shuffled else dataset_name
    label = BUILTIN_REFERRING[base][2] if base in BUILTIN_REFERRING else base
    return label + SHUFFLED_SUFFIX if shuffled else label


def read_json_object(path: str) -> Dict:
    """
    The JSON object in file ``path`` (results files the tools read back, a study's results);
    ValueError naming the file when it cannot be read, is not JSON or is not an object.
    """
    try:
        data = read_json_file(path)  # names the file and where the JSON breaks
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


# Fields of a study's run entry that tools/study.py and study_report.py compute with: the
# types they must hold (a hand-edited entry is read before any run, not midway through one).
STUDY_ENTRY_FIELDS = {
    "status": (str, "a string"),
    "variant": (str, "a string"),
    "seed": (int, "an integer"),
    "wall_s": ((int, float), "a number of seconds"),
    "cpu_s": ((int, float), "a number of seconds"),
    "commits": (list, "a list of commits"),
    "config_file": (str, "a path"),
    "iterations": (int, "an integer"),
    "opts": (list, "a list of KEY VALUE overrides"),
    "config": (dict, "an object of config keys"),
    "splits": (dict, "an object of {split: {metric: value}}"),
}


def read_study_results(path: str) -> Dict:
    """
    A study's results file (``{"runs": {key: entry}}``, written by tools/study.py); ValueError
    naming the file, and the run, where it holds something else.
    """
    data = read_json_object(path)
    runs = data.get("runs")
    if not isinstance(runs, dict):
        raise ValueError(f"{path}: not a study's results: 'runs' holds {type(runs).__name__}, expected an object "
                         "of run entries")
    for key, entry in runs.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: run {key!r} holds {type(entry).__name__}, expected an object")
        for field, (types, expected) in STUDY_ENTRY_FIELDS.items():
            value = entry.get(field)
            # bool is an int to isinstance, and never what these fields hold.
            if field in entry and (isinstance(value, bool) or not isinstance(value, types)):
                raise ValueError(f"{path}: run {key!r}: {field!r} holds {json.dumps(value)[:80]}, expected {expected}")
    return data


def read_results(output_dir: str, dataset_names: Sequence[str], tta: bool = False) -> "OrderedDict[str, Dict]":
    """
    {dataset name: the evaluator's ``referring_results_<name>.json``} for the datasets
    evaluated in ``output_dir``; the shuffled control's under ``<name>/shuffled``. With
    ``tta``, the test-time-augmented pass's instead, under ``<name>_TTA``.
    """
    rows = OrderedDict()
    for name in dataset_names:
        for suffix, folder in _TTA_RESULT_FOLDERS if tta else _RESULT_FOLDERS:
            path = os.path.join(output_dir, folder, results_file_name(name))
            if os.path.isfile(path):
                rows[name + suffix] = read_json_object(path)
    return rows


def required_results(output_dir: str, dataset_names: Sequence[str], tta: bool = False) -> "OrderedDict[str, Dict]":
    """:func:`read_results`, or FileNotFoundError naming the datasets without a results file."""
    results = read_results(output_dir, dataset_names, tta)
    suffix = TTA_SUFFIX if tta else ""
    missing = [n for n in dataset_names if n + suffix not in results]
    if missing or not results:
        where = f" with test-time augmentation ({TTA_RESULTS_FOLDER}/)" if tta else ""
        raise FileNotFoundError(f"{output_dir}: no evaluation results{where} for {missing or 'any dataset'}")
    return results


def split_scores(output_dir: str, dataset_names: Sequence[str]) -> Dict[str, Dict]:
    """
    {"splits" / "by_type" / "retrieval": {split label: that section}} of the datasets
    evaluated in ``output_dir`` (see :func:`split_label`); FileNotFoundError naming the
    datasets without a results file.
    """
    results = required_results(output_dir, dataset_names)
    sections = (("splits", "metrics"), ("by_type", BY_TYPE_KEY), ("retrieval", RETRIEVAL_KEY))
    return {
        key: {split_label(name): p[field] for name, p in results.items() if field in p} for key, field in sections
    }


def iteration_seconds(output_dir: str) -> Optional[float]:
    """Median seconds per training iteration in Detectron2's ``metrics.json`` (None if none).
    A line that is not a JSON object is passed over: a run killed while writing one leaves
    it cut off, and its resumed run appends after it."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    times = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "time" in row:
                times.append(row["time"])
    return statistics.median(times) if times else None
