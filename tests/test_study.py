"""tools/study.py on a 1-run quick list: results JSON, skip on rerun, resume; the ablation leaves."""
import contextlib
import json
import os
import time

import pytest

from common import CONFIGS_DIR, TINY_CONFIG, load_script
from vipa_d2.data.synthetic import SynthConfig, write_benchmark
from vipa_d2 import get_vipa_cfg
from vipa_d2.evaluation import results_file_name
from vipa_d2.utils.runs import split_scores

ABLATIONS = os.path.join(CONFIGS_DIR, "synthetic", "ablations")
# Each leaf's whole difference from the tiny config it is based on.
LEAF_CHANGES = {
    "vipa": {},
    "language": {"MODEL.VIPA.KV_SOURCE": "language"},
    "language_relevance": {
        "MODEL.VIPA.KV_SOURCE": "language_relevance", "MODEL.VIPA.LOSS.RELEVANCE_TEXT_GRADIENT": True,
    },
    "step1_only": {"MODEL.VIPA.VEG.STEP2": False},
    "step2_only": {"MODEL.VIPA.VEG.STEP1": False},
    "global_cue_only": {"MODEL.VIPA.VEG.LOCAL_CUES": False},
    "local_cues_only": {
        "MODEL.VIPA.VEG.GLOBAL_CUE": False, "MODEL.VIPA.VEG.CENTRE_WORDS": False, "MODEL.VIPA.LOSS.CONTRASTIVE_CUES": "all",
    },
    "ratio_0.1": {"MODEL.VIPA.VEG.RATIO": 0.1},
    "ratio_0.5": {"MODEL.VIPA.VEG.RATIO": 0.5},
    "ratio_0.8": {"MODEL.VIPA.VEG.RATIO": 0.8},
    "fusion_none": {"MODEL.VIPA.FUSION": "none"},
    "fusion_late": {"MODEL.VIPA.FUSION": "late"},
    "language_fusion_none": {"MODEL.VIPA.KV_SOURCE": "language", "MODEL.VIPA.FUSION": "none"},
    "language_fusion_late": {"MODEL.VIPA.KV_SOURCE": "language", "MODEL.VIPA.FUSION": "late"},
}
# A model that trains a few iterations in seconds; checkpoints after iterations 2 and 4.
TINY = [
    "INPUT.IMAGE_SIZE", "64", "MODEL.TIMM.WEIGHTS", "", "MODEL.TEXT_ENCODER.FREEZE", "True",
    "MODEL.VIPA.HIDDEN_DIM", "32", "MODEL.VIPA.NHEADS", "2", "MODEL.VIPA.VEG.DIM_FEEDFORWARD", "64",
    "MODEL.VIPA.PIXEL_DECODER.MASK_DIM", "32", "MODEL.VIPA.DECODER.NUM_LAYERS", "2",
    "MODEL.VIPA.DECODER.DIM_FEEDFORWARD", "64", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0",
]
SPLITS = ("val", "testA", "testB")


study = load_script("tools/study.py")


@pytest.mark.parametrize("variant", sorted(LEAF_CHANGES))
def test_ablation_leaf_holds_only_its_change(variant):
    # Each leaf builds and predicts in tests/test_configs_zoo.py (every config under configs/).
    base = study.flat_config(get_vipa_cfg(TINY_CONFIG))
    leaf = get_vipa_cfg(os.path.join(ABLATIONS, f"{variant}.yaml"))
    assert {k: v for k, v in study.flat_config(leaf).items() if base[k] != v} == LEAF_CHANGES[variant]


def test_every_leaf_is_listed():
    assert sorted(f[: -len(".yaml")] for f in os.listdir(ABLATIONS)) == sorted(LEAF_CHANGES)


def test_bad_arguments_are_named(tmp_path, capsys):
    assert study.main(["--variants", "vipa", "vipaa", "--output", str(tmp_path)]) == 2
    assert "unknown or repeated ['vipaa']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--seeds", "0", "-1", "--output", str(tmp_path)])
    assert "--seeds must be >= 0, got [0, -1]" in capsys.readouterr().err
    for option, value in (("--max-iter", "0"), ("--num-gpus", "0")):
        with pytest.raises(SystemExit):
            study.main([option, value, "--output", str(tmp_path)])
        assert f"{option} must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--results", str(tmp_path), "--output", str(tmp_path)])
    assert f"--results {tmp_path}: a folder; expected the name of the study's JSON file" in capsys.readouterr().err
    # yacs refuses an int for a float key: said in one line, before any run starts.
    assert study.main(["--variants", "vipa", "--output", str(tmp_path), "MODEL.VIPA.LOSS.CONTRASTIVE_WEIGHT", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("study.py: error: invalid config override: Type mismatch") and "CONTRASTIVE_WEIGHT" in err
    assert not os.listdir(tmp_path)  # nothing started
    # An --output under a file was a NotADirectoryError traceback (tools review, session 56).
    (tmp_path / "a_file").write_text("")
    assert study.main(["--variants", "vipa", "--output", str(tmp_path / "a_file" / "study"), "--max-iter", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("study.py: error: [Errno 20] Not a directory") and f"--output {tmp_path / 'a_file'}" in err
    assert "Traceback" not in err


def test_studies_sharing_a_results_file_keep_each_others_entries(tmp_path):
    path = str(tmp_path / "study.json")
    study.save_entry(path, "vipa/seed0", {"status": "done"})
    study.save_entry(path, "language/seed1", {"status": "running"})  # as written by another study
    study.save_entry(path, "vipa/seed0", {"status": "done", "wall_s": 1.0})
    assert study.load_results(path) == {
        "runs": {"vipa/seed0": {"status": "done", "wall_s": 1.0}, "language/seed1": {"status": "running"}}
    }
    assert os.listdir(tmp_path) == ["study.json"]  # no lock or temporary file left behind


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """One run (VIPA, seed 0), 4 iterations, on 6 synthetic images. (A language-baseline run
    was a second train_net.py process in the suite's slowest file; its empty retrieval
    section is read by test_a_run_without_retrieval_has_an_empty_retrieval_section.)"""
    tmp = tmp_path_factory.mktemp("study")
    write_benchmark(str(tmp / "data"), 6, seed=0, cfg=SynthConfig(image_size=64), workers=1, progress=False)
    argv = ["--variants", "vipa", "--seeds", "0", "--max-iter", "4", "--output", str(tmp / "runs"),
            "--data-root", str(tmp / "data"), "--keep-checkpoints", *TINY]
    assert study.main(argv) == 0
    with open(tmp / "runs" / "study.json") as f:
        return tmp, argv, json.load(f)


def test_study_writes_every_run_to_one_json(quick_study):
    tmp, _, data = quick_study
    assert sorted(data["runs"]) == ["vipa/seed0"]
    for key, entry in data["runs"].items():
        assert entry["status"] == "done" and entry["iterations"] == 4 and entry["wall_s"] > 0
        assert entry["output_dir"] == str(tmp / "runs" / key.replace("/", os.sep))
        assert entry["opts"][-2:] == ["SEED", "0"] and entry["config_file"].endswith(f"{entry['variant']}.yaml")
        assert set(entry["splits"]) == set(SPLITS) and set(entry["by_type"]) == set(SPLITS)
        for metrics in entry["splits"].values():
            assert {"oIoU", "mIoU", "Prec@0.5", "Prec@0.9"} <= set(metrics)
            assert all(0 <= v <= 100 for v in metrics.values())
        assert entry["sec_per_iter"] > 0 and entry["ratio"] == 0.3 and entry["commit"]
        # What the minutes were made with: train_net.py's CPU time, the thread setting.
        assert entry["commits"] == [entry["commit"]] and entry["cpu_s"] > 0 and entry["cpu_count"] == os.cpu_count()
        assert entry["omp_num_threads"] == os.environ.get("OMP_NUM_THREADS")
    assert set(data["runs"]["vipa/seed0"]["retrieval"]) == set(SPLITS)


def test_a_run_without_retrieval_has_an_empty_retrieval_section(tmp_path):
    # The language baseline's evaluation writes no retrieval report (its runs' entries hold
    # "retrieval": {}); a split without a results file is named.
    (tmp_path / "inference").mkdir()
    metrics = {"oIoU": 50.0}
    (tmp_path / "inference" / results_file_name("refsynth_unc_val")).write_text(json.dumps({"metrics": metrics}))
    assert split_scores(str(tmp_path), ["refsynth_unc_val"]) == {"splits": {"val": metrics}, "by_type": {}, "retrieval": {}}
    with pytest.raises(FileNotFoundError, match=r"no evaluation results for \['refsynth_unc_testA'\]"):
        split_scores(str(tmp_path), ["refsynth_unc_val", "refsynth_unc_testA"])


def test_rerun_skips_finished_runs(quick_study, capsys):
    tmp, argv, data = quick_study
    metrics = tmp / "runs" / "vipa" / "seed0" / "metrics.json"
    mtime = metrics.stat().st_mtime_ns
    assert study.main(argv) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 1
    assert metrics.stat().st_mtime_ns == mtime  # nothing trained, nothing evaluated
    with open(tmp / "runs" / "study.json") as f:
        assert json.load(f) == data
    # ... and a run made with other settings is refused, not mixed in.
    assert study.main(argv + ["SOLVER.BASE_LR", "0.001"]) == 2
    assert "vipa/seed0 was made with" in capsys.readouterr().err
    # So is one whose recipe changed under the same leaf and overrides (a changed default),
    # naming the key; a key added since the run is the same recipe only at its default.
    vipa = data["runs"]["vipa/seed0"]
    stored = {k: v for k, v in vipa["config"].items() if k != "MODEL.VIPA.LOSS.GROUP_GATE_ONLY"}
    cases = {  # stored config -> the error, or None when the run counts as done
        "changed": ({**vipa["config"], "MODEL.VIPA.DECODER.COUNT_MAPS": 3}, "COUNT_MAPS: 3 then, 8 now"),
        "added at its default": (stored, None),
        "added, not at its default": (
            {k: v for k, v in vipa["config"].items() if k != "MODEL.VIPA.DECODER.COUNT_CENTRES"},
            "COUNT_CENTRES: '<absent>' then, True now",
        ),
    }
    for case, (config, error) in cases.items():
        with open(tmp / "runs" / "study.json", "w") as f:
            json.dump({"runs": {**data["runs"], "vipa/seed0": {**vipa, "config": config}}}, f)
        assert study.main(argv) == (2 if error else 0), case
        assert (error or "done before, skipped") in capsys.readouterr()[1 if error else 0], case
    # ... and so is one trained on another synthetic benchmark (another --data-root, seed or
    # size), which it would be paired with as if on the same data.
    assert vipa["data"]["num_images"] > 0
    for case, (entry, error) in {
        "other data": ({**vipa, "data": {**vipa["data"], "seed": 7}}, f"was trained on another synthetic benchmark "
                       f"than the one under --data-root (seed 7 then, {vipa['data']['seed']} now)"),
        "older study.py": ({k: v for k, v in vipa.items() if k != "data"}, None),
    }.items():
        with open(tmp / "runs" / "study.json", "w") as f:
            json.dump({"runs": {**data["runs"], "vipa/seed0": entry}}, f)
        assert study.main(argv) == (2 if error else 0), case
        assert (error or "done before, skipped") in capsys.readouterr()[1 if error else 0], case
    # Every finished run of the file is compared so, not only those of the variants and
    # seeds asked for: the new runs are paired with them all (a default changed between
    # sittings, a leaf since removed).
    seed5 = {**vipa, "seed": 5, "opts": [*vipa["opts"][:-1], "5"], "config": {**vipa["config"], "SEED": 5}}
    for case, (entry, error) in {
        "same recipe": (seed5, None),
        "changed default": ({**seed5, "config": {**seed5["config"], "MODEL.VIPA.DECODER.COUNT_MAPS": 3}},
                            "run vipa/seed5 (commit "),
        "leaf gone": ({**seed5, "config_file": "configs/synthetic/ablations/gone.yaml"},
                      "finished run vipa/seed5 was made with configs/synthetic/ablations/gone.yaml, which is gone"),
    }.items():
        with open(tmp / "runs" / "study.json", "w") as f:
            json.dump({"runs": {**data["runs"], "vipa/seed5": entry}}, f)
        assert study.main(argv) == (2 if error else 0), case
        captured = capsys.readouterr()
        assert (error or "done before, skipped") in captured[1 if error else 0], case
        if case == "changed default":
            assert "COUNT_MAPS: 3 then, 8 now" in captured.err
    # An entry of an older study.py has only the digest, which must match.
    old = {k: v for k, v in vipa.items() if k != "config"}
    with open(tmp / "runs" / "study.json", "w") as f:
        json.dump({"runs": {**data["runs"], "vipa/seed0": {**old, "config_digest": "0" * 16}}}, f)
    assert study.main(argv) == 2
    assert "a changed default or leaf changes config_digest" in capsys.readouterr().err


def test_sitting_commits_keep_every_sitting_of_a_resumed_run():
    assert study.sitting_commits({}, "a") == ["a"]
    assert study.sitting_commits({"commit": "a"}, "b") == ["a", "b"]  # an entry of an older study.py
    assert study.sitting_commits({"commit": "b", "commits": ["a", "b"]}, "b") == ["a", "b"]
    assert study.sitting_commits({"commits": ["a"]}, None) == ["a"]  # outside git


def test_config_digest_sees_defaults():
    cfg = get_vipa_cfg(TINY_CONFIG)
    other = cfg.clone()
    other.MODEL.VIPA.DECODER.COUNT_MAPS = 0
    assert study.config_digest(cfg) == study.config_digest(cfg.clone())
    assert study.config_digest(cfg) != study.config_digest(other)


def test_interrupted_run_resumes_from_its_last_checkpoint(quick_study, capsys):
    tmp, argv, data = quick_study
    run_dir = tmp / "runs" / "vipa" / "seed0"
    # As if killed after iteration 2: the periodic checkpoint is the last, the entry unfinished.
    (run_dir / "model_final.pth").unlink()
    (run_dir / "last_checkpoint").write_text("model_0000001.pth")
    interrupted = {k: v for k, v in data["runs"]["vipa/seed0"].items() if k not in ("splits", "status")}
    with open(tmp / "runs" / "study.json", "w") as f:
        json.dump({"runs": {**data["runs"], "vipa/seed0": {**interrupted, "status": "running"}}}, f)
    # A killed run's cut-off last line of metrics.json, which the resumed run appends after.
    with open(run_dir / "metrics.json", "a") as f:
        f.write('{"iteration": 2, "ti')
    # While another process holds the run folder (a second study, or the train_net.py of a
    # study killed outright, which inherits the lock), the run is refused, not trained twice.
    with study.holding_run_folder(str(run_dir)):
        assert study.main(argv) == 2
    assert f"another process runs in {run_dir}" in capsys.readouterr().err

    assert study.main(argv) == 0
    with open(tmp / "runs" / "study.json") as f:
        resumed = json.load(f)["runs"]["vipa/seed0"]
    console = (run_dir / "train_console.log").read_text().split("$ ")[-1]
    assert "model_0000001.pth" in console and "Starting training from iteration 2" in console
    assert resumed["status"] == "done" and resumed["splits"] == data["runs"]["vipa/seed0"]["splits"]
    assert resumed["wall_s"] > data["runs"]["vipa/seed0"]["wall_s"]  # both sittings counted
    assert resumed["sec_per_iter"] > 0

    # Without the entries (dropped, or another --results), a run folder holding the
    # checkpoints of another recipe is refused: --resume would go on from its weights.
    with open(tmp / "runs" / "study.json", "w") as f:
        json.dump({"runs": {}}, f)
    assert study.main(argv + ["SOLVER.BASE_LR", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "holds the checkpoints of a run with another recipe, 1 key(s) differ (SOLVER.BASE_LR: 0.0003 there, 0.001 now)" in err
    # ... and so is one whose config.yaml holds a key this version does not have.
    saved = run_dir / "config.yaml"
    saved.write_text(saved.read_text() + "REMOVED_KEY: 1\n")
    assert study.main(argv) == 2
    err = capsys.readouterr().err
    assert "holds the checkpoints of a run whose config.yaml this version cannot read" in err and "REMOVED_KEY" in err


def test_cleanup_removes_periodic_checkpoints_only():
    assert study.PERIODIC_CHECKPOINT.fullmatch("model_0000499.pth")
    assert not any(study.PERIODIC_CHECKPOINT.fullmatch(name) for name in ("model_final.pth", "model_best.pth"))


study_report = load_script("tools/study_report.py")


def _entry(variant, seed, val, test_a, test_b, ratio=0.3):
    splits = {"val": {"oIoU": val}, "testA": {"oIoU": test_a}, "testB": {"oIoU": test_b}}
    by_type = {"val": {"ordinal": {"oIoU": val - 40.0}}}
    return {"variant": variant, "seed": seed, "status": "done", "splits": splits, "by_type": by_type,
            "retrieval": {"val": {"cue_jaccard": 60.0 + seed, "cue_jaccard_samples": 9}},
            "ratio": ratio, "iterations": 4, "wall_s": 60.0}


def test_report_applies_the_rule_and_draws(tmp_path, capsys):
    runs = [_entry("vipa", s, v, v, v) for s, v in enumerate([80.0, 81.0, 82.0])]
    runs += [_entry("language", s, v, v, v) for s, v in enumerate([77.0, 78.0, 78.5])]  # +3, +3, +3.5
    runs += [_entry("fusion_none", s, v, v, v + 5) for s, v in enumerate([77.0, 78.0])]  # testB flips
    runs += [_entry("ratio_0.1", s, v, v, v, 0.1) for s, v in enumerate([70.0, 90.0])]  # +10, -9: noise
    runs += [_entry("ratio_0.8", 0, 70.0, 70.0, 70.0, 0.8)]  # one seed
    runs.append({**_entry("step1_only", 0, 1.0, 1.0, 1.0), "status": "running"})  # unfinished: left out
    runs[0]["note"] = "trained elsewhere, re-evaluated here"
    runs[1]["commits"] = ["a" * 40, "b" * 40 + "-dirty"]  # resumed under other code
    results = tmp_path / "study.json"
    results.write_text(json.dumps({"runs": {f"{e['variant']}/seed{e['seed']}": e for e in runs}}))
    out = tmp_path / "docs"
    assert study_report.main([str(results), "--output", str(out)]) == 0
    md = (out / "study.md").read_text()
    assert md == capsys.readouterr().out.rstrip("\n") + "\n" and study_report.RULE in md
    verdicts = {line.split("|")[1].strip(): line.split("|")[-2].strip()
                for line in md.split("## Paired differences, reference minus variant")[1].split("##")[0].splitlines()
                if line.startswith("| ") and "verdict" not in line}
    assert verdicts == {"language": "reproduces", "fusion_none": "does not reproduce",
                        "ratio_0.1": "does not reproduce", "ratio_0.8": "undecided (1 seed)"}
    words = " ".join(md.split())  # tabulate pads the columns
    assert "| language | vipa | 0: +3.00, 1: +3.00, 2: +3.50 | +3.17 ± 0.17 |" in words
    assert "| vipa | 0 1 2 | 81.00 ± 1.00 |" in words and "| 4 | 3 | aaaaaaa bbbbbbb-dirty |" in words
    assert "| language | 0 1 2 | 77.83 ± 0.76 |" in words and "| 4 | 3 | - |" in words
    # The unfinished run is left out of every table, and named.
    assert words.count("step1_only") == 1 and "Left out, not finished: step1_only/seed0 (running)." in words
    assert "Notes on single runs: - vipa, seed 0: trained elsewhere, re-evaluated here ## Paired" in words
    assert "| variant | reference | ordinal | |---" in words and "| language | vipa | +3.17 ± 0.17 |" in words
    for picture in ("ratio_curve.png", "variants.png", "differences.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({picture})" in md
    finished = study_report.by_variant(json.loads(results.read_text())["runs"])
    diffs = study_report.differences(finished, study_report.references(finished, "vipa", [])[0], "oIoU")
    assert list(diffs) == ["language", "fusion_none", "ratio_0.1", "ratio_0.8"]
    assert [diffs["fusion_none"][s]["splits"]["testB"]["oIoU"] for s in (0, 1)] == [-2.0, -2.0]


def test_running_entry_keeps_its_time_while_the_block_runs(tmp_path):
    """keeping_time: a study killed outright mid-run still leaves the time it had spent in
    its entry (written every HEARTBEAT_S), and nothing is written after the block ends."""
    results = str(tmp_path / "study.json")
    entry = {"status": "running", "wall_s": 100.0}
    study.save_entry(results, "vipa/seed0", entry)

    def stored():
        with open(results) as f:
            return json.load(f)["runs"]["vipa/seed0"]

    with study.keeping_time(results, "vipa/seed0", entry, every=0.01):
        for _ in range(1000):  # until the first beat lands (at most ~10 s)
            if stored()["wall_s"] > 100.0:
                break
            time.sleep(0.01)
        assert stored()["wall_s"] > 100.0 and stored()["status"] == "running"
    entry.update(status="done", wall_s=123.0)
    study.save_entry(results, "vipa/seed0", entry)
    time.sleep(0.05)  # a beat left running would overwrite the finished entry
    assert stored() == {"status": "done", "wall_s": 123.0}


def test_report_pairs_a_variant_with_its_own_reference(tmp_path, capsys):
    """--pair: the language baseline without fusion against VIPA without fusion (one key
    apart), not against VIPA with fusion (two keys apart); a pair whose variant has not run
    yet is left out, saying so; bad pairs are named."""
    runs = [_entry("vipa", s, v, v, v) for s, v in enumerate([90.0, 91.0])]
    runs += [_entry("fusion_none", s, v, v, v) for s, v in enumerate([83.0, 82.0])]
    runs += [_entry("language_fusion_none", s, v, v, v) for s, v in enumerate([79.0, 79.5])]  # +4, +2.5
    results = tmp_path / "study.json"
    results.write_text(json.dumps({"runs": {f"{e['variant']}/seed{e['seed']}": e for e in runs}}))
    out = tmp_path / "docs"
    pairs = ["--pair", "language_fusion_none=fusion_none", "--pair", "language_fusion_late=fusion_late"]
    assert study_report.main([str(results), "--output", str(out), *pairs]) == 0
    err = capsys.readouterr().err
    assert "--pair 'language_fusion_late=fusion_late' left out: its variant has no finished run yet" in err
    words = " ".join((out / "study.md").read_text().split())
    assert "| fusion_none | vipa | 0: +7.00, 1: +9.00 |" in words
    assert "| language_fusion_none | fusion_none | 0: +4.00, 1: +2.50 | +3.25 ± 0.75 |" in words
    assert "| language_fusion_none | fusion_none | +3.25 ± 0.75 |" in words  # per type, same reference
    assert (out / "differences.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    for bad in ("language_fusion_none", "language_fusion_none=late", "vipa=fusion_none", "fusion_none=fusion_none",
                "late=late"):
        assert study_report.main([str(results), "--output", str(out), "--pair", bad]) == 2
        err = capsys.readouterr().err
        assert f"--pair {bad!r}: expected VARIANT=REFERENCE" in err and str(results) in err
    assert study_report.main([str(results), "--output", str(out), "--reference", "vip"]) == 0  # not run yet
    assert "--reference 'vip' has no finished run yet (have: vipa, fusion_none, language_fusion_none): nothing is " \
           "paired with it" in capsys.readouterr().err
    words = " ".join((out / "study.md").read_text().split())
    assert "| language_fusion_none | vip | - | - | - | - | undecided (0 seeds) |" in words


def test_report_and_study_refuse_a_results_file_they_cannot_use(tmp_path, capsys):
    """One line naming the file (and the run or option), status 2, nothing written."""
    out, other = tmp_path / "docs", tmp_path / "runs"
    done = _entry("vipa", 0, 80.0, 80.0, 80.0)
    cases = {  # file content -> what the error names
        "{bad": "not valid JSON",
        "[1, 2]": "expected a JSON object at the top level, got list",
        json.dumps({"runs": [done]}): "not a study's results: 'runs' holds list, expected an object of run entries",
        json.dumps({"runs": {"vipa/seed0": 5}}): "run 'vipa/seed0' holds int, expected an object",
        # A hand-edited field: the heartbeat's time, or the report's means, would fail midway.
        json.dumps({"runs": {"vipa/seed0": {**done, "status": "running", "wall_s": "60"}}}):
            "run 'vipa/seed0': 'wall_s' holds \"60\", expected a number of seconds",
        json.dumps({"runs": {"vipa/seed0": {**done, "seed": True}}}): "run 'vipa/seed0': 'seed' holds true, expected an integer",
        # Added to in the finally of a run: a string there lost the finished run's scores.
        json.dumps({"runs": {"vipa/seed0": {**done, "status": "running", "cpu_s": "12"}}}):
            "run 'vipa/seed0': 'cpu_s' holds \"12\", expected a number of seconds",
        json.dumps({"runs": {"vipa/seed0": {**done, "opts": "SEED 0"}}}):
            "run 'vipa/seed0': 'opts' holds \"SEED 0\", expected a list of KEY VALUE overrides",
        json.dumps({"runs": {"vipa/seed0": {k: v for k, v in done.items() if k != "ratio"}}}):
            "finished run 'vipa/seed0' has no ratio",
        json.dumps({"runs": {"vipa/seed0": {**done, "splits": {"val": None}}}}):
            "finished run 'vipa/seed0': 'splits' holds {\"val\": null}, expected an object",
        # A shortened smoke-test seed beside full runs would be averaged and paired with them.
        json.dumps({"runs": {"vipa/seed0": {**done, "opts": ["A", "1", "SEED", "0"]},
                             "vipa/seed1": {**done, "seed": 1, "opts": ["A", "1", "SEED", "1"], "iterations": 100}}}):
            "finished runs 'vipa/seed0' and 'vipa/seed1' were made with other settings (4 iterations, overrides "
            "['A', '1']; 100 iterations, overrides ['A', '1'])",
        json.dumps({"runs": {"vipa/seed0": {**done, "opts": ["SEED", "0"]},
                             "vipa/seed1": {**done, "seed": 1, "opts": ["MODEL.X", "2", "SEED", "1"]}}}):
            "finished runs 'vipa/seed0' and 'vipa/seed1' were made with other settings (4 iterations, overrides []; "
            "4 iterations, overrides ['MODEL.X', '2'])",
        # Lanes merged by hand, one trained on a regenerated benchmark.
        json.dumps({"runs": {"vipa/seed0": {**done, "data": {"seed": 0}},
                             "vipa/seed1": {**done, "seed": 1, "data": {"seed": 7}}}}):
            "finished runs 'vipa/seed0' and 'vipa/seed1' were trained on other synthetic benchmarks "
            "(seed 0 vipa/seed0, 7 vipa/seed1)",
    }
    for i, (content, problem) in enumerate(cases.items()):
        path = tmp_path / f"results{i}.json"
        path.write_text(content)
        assert study_report.main([str(path), "--output", str(out)]) == 2, content
        err = capsys.readouterr().err
        assert err.startswith(f"study_report.py: error: {path}: {problem}"), err
        if "finished run" not in problem:  # study.py reads the same file before any run
            assert study.main(["--variants", "vipa", "--results", str(path), "--output", str(other)]) == 2
            assert err.split(": ", 2)[2].rstrip() in capsys.readouterr().err
    assert study_report.main([str(tmp_path / "none.json"), "--output", str(out)]) == 2
    assert "none.json: cannot read it (No such file or directory)" in capsys.readouterr().err
    # The same overrides in another order, and each leaf's own warm-up under --max-iter,
    # are one setting.
    same = tmp_path / "same.json"
    same.write_text(json.dumps({"runs": {
        "vipa/seed0": {**done, "opts": ["A", "1", "B", "2", "SOLVER.WARMUP_ITERS", "1", "SEED", "0"]},
        "language/seed0": {**_entry("language", 0, 79.0, 79.0, 79.0),
                           "opts": ["B", "2", "A", "1", "SOLVER.WARMUP_ITERS", "3", "SEED", "0"]},
    }}))
    assert study_report.main([str(same), "--output", str(tmp_path / "same_docs")]) == 0
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"runs": {"vipa/seed0": done}}))
    assert study_report.main([str(good), "--output", str(out), "--metric", "oIOU"]) == 2
    assert "--metric oIOU: the runs hold ['oIoU']" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert study_report.main([str(good), "--output", str(tmp_path / "a_file")]) == 2
    assert "--output " in capsys.readouterr().err
    assert study.main(["--config-dir", str(tmp_path / "no_leaves"), "--output", str(other)]) == 2
    assert "study.py: error: --config-dir" in capsys.readouterr().err
    assert not out.exists() and not other.exists()


def test_report_draws_a_variant_without_a_split(tmp_path):
    # A variant evaluated on val only (no testA / testB scores) leaves its bars out.
    runs = [_entry("vipa", s, v, v, v) for s, v in enumerate([80.0, 81.0])]
    for s, v in enumerate([77.0, 78.0]):
        entry = _entry("language", s, v, v, v)
        entry["splits"] = {"val": entry["splits"]["val"]}
        runs.append(entry)
    results = tmp_path / "study.json"
    results.write_text(json.dumps({"runs": {f"{e['variant']}/seed{e['seed']}": e for e in runs}}))
    assert study_report.main([str(results), "--output", str(tmp_path / "docs")]) == 0
    assert (tmp_path / "docs" / "variants.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # +3 at both seeds, but nothing to confirm it on: undecided, not "does not reproduce".
    words = " ".join((tmp_path / "docs" / "study.md").read_text().split())
    assert "| language | vipa | 0: +3.00, 1: +3.00 | +3.00 ± 0.00 | - | - | undecided (no testA / testB pairs) |" in words
    # A testA score of a seed that val lacks confirms nothing the rule read: the confirming
    # means (table and verdict) are over the deciding split's seeds.
    runs.append({**_entry("language", 2, 90.0, 90.0, 90.0), "splits": {"testA": {"oIoU": 90.0}}})
    runs.append(_entry("vipa", 2, 80.0, 80.0, 80.0))
    finished = study_report.by_variant({f"{e['variant']}/seed{e['seed']}": e for e in runs})
    diffs = study_report.split_differences(finished, "language", "vipa", "oIoU")
    assert diffs == {"val": {0: 3.0, 1: 3.0}, "testA": {}, "testB": {}}


def test_a_run_with_an_unreadable_results_file_is_marked_failed(tmp_path, monkeypatch, capsys):
    # Stands in for a train_net.py run that left a cut evaluator results file: the study
    # marks the run failed, naming the file, instead of stopping with it left "running".
    def cut_results(train_net, argv, log_path, env, echo, pass_fds=()):
        run_dir = argv[argv.index("OUTPUT_DIR") + 1]
        os.makedirs(os.path.join(run_dir, "inference"), exist_ok=True)
        for name in ("refsynth_unc_val", "refsynth_unc_testA", "refsynth_unc_testB"):
            with open(os.path.join(run_dir, "inference", f"referring_results_{name}.json"), "w") as f:
                f.write('{"metrics": {"oIoU": 5')
        return 1.0

    monkeypatch.setattr(study, "run_train_net", cut_results)
    assert study.main(["--variants", "vipa", "--output", str(tmp_path / "runs"), *TINY]) == 1
    entry = study.load_results(str(tmp_path / "runs" / "study.json"))["runs"]["vipa/seed0"]
    assert entry["status"] == "failed" and "referring_results_refsynth_unc_val.json: not valid JSON" in entry["error"]
    assert "1 run(s) failed, rerun to retry" in capsys.readouterr().out


def test_a_run_finished_by_another_study_meanwhile_is_not_run_again(tmp_path, monkeypatch, capsys):
    # The entry said "not done" when read, the other study finished the run before this one
    # took the folder's lock: it resumed from model_final (evaluation only) and wrote over
    # the finished entry (tools review, session 52).
    def fails(*args, **kwargs):
        raise FileNotFoundError("no run")

    monkeypatch.setattr(study, "run_train_net", fails)
    argv = ["--variants", "vipa", "--output", str(tmp_path / "runs"), *TINY]
    assert study.main(argv) == 1  # a "failed" entry with this recipe: to be run again
    results = str(tmp_path / "runs" / "study.json")
    finished = {**study.load_results(results)["runs"]["vipa/seed0"], "status": "done", "by": "the other study"}
    real_lock = study.holding_run_folder

    @contextlib.contextmanager
    def finished_while_waiting(run_dir):
        study.save_entry(results, "vipa/seed0", finished)
        with real_lock(run_dir) as lock:
            yield lock

    def must_not_run(*args, **kwargs):
        raise AssertionError("ran a finished run again")

    monkeypatch.setattr(study, "holding_run_folder", finished_while_waiting)
    monkeypatch.setattr(study, "run_train_net", must_not_run)
    assert study.main(argv) == 0
    assert "vipa/seed0: done meanwhile by another study, skipped" in capsys.readouterr().out
    assert study.load_results(results)["runs"]["vipa/seed0"] == finished
