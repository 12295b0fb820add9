"""tools/benchmark.py: a real --quick run (speed + accuracy) and the seed-spread verdict."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)
from bench.accuracy import compare  # noqa: E402
from bench.report import evaluate_targets  # noqa: E402

PAPER_METRICS = ("oIoU", "mIoU", "Prec@0.5", "Prec@0.7")
SPLITS = ("val", "testA", "testB")
TARGET_STATUSES = {"PASS", "FAIL", "n/a", "not measured"}


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def run_benchmark(*args):
    # The paper config (Swin-B + BERT-base) is left out to keep this test short.
    cmd = [sys.executable, os.path.join(TOOLS, "benchmark.py"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench"))
    proc = run_benchmark("all", "--quick", "--speed-configs", "tiny", "--output", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "benchmark.json")) as f:
        return out, json.load(f), proc.stdout


def test_quick_benchmark_json_and_resume(quick):
    out, data, stdout = quick
    # ---- speed: every interleaved case timed, finite and positive
    speed = data["speed"]
    tiny = speed["configs"]["tiny"]
    assert tiny["image_size"] == 96
    inference = [c for c in tiny["cases"] if c["kind"] == "inference"]
    assert {(c["mode"], c["batch"]) for c in inference} == {
        (m, b) for m in ("no_grad", "channels_last") for b in (1, 2)
    }
    # The tiny config runs NHWC: its own path is the one the targets read.
    assert tiny["default_mode"] == "channels_last"
    train = [(c["mode"], c["batch"]) for c in tiny["cases"] if c["kind"] == "train"]
    assert train == [("train", 2), ("train_channels_last_first_pass", 2), ("train_channels_last", 2)]
    for c in tiny["cases"]:
        assert c["latency_s"]["n"] == 2
        for key in ("per_image_ms", "cpu_wall_ratio", "peak_rss_mib", "images_per_s"):
            assert finite(c[key]) and c[key] > 0, (c["mode"], c["batch"], key, c[key])
    for c in inference:
        assert finite(c["matmul_fraction"]) and c["matmul_fraction"] > 0
    assert (
        finite(speed["matmul"]["gmacs_per_s"]["median"])
        and speed["matmul"]["gmacs_per_s"]["median"] > 0
    )
    assert tiny["gmacs_per_image"]["total"] > 0 and tiny["params"]["total"] > 1e6
    for batch, shares in tiny["module_time"].items():
        assert abs(sum(shares["share"].values()) - 1.0) < 1e-6, batch
        assert 0 < shares["head_share"] < 1
    assert speed["machine"]["torch_threads"] == 2 and speed["machine"]["cpu_model"]

    # ---- accuracy: both variants, every split, the paper's metrics in [0, 100]
    accuracy = data["accuracy"]
    assert accuracy["failed"] == []
    assert list(accuracy["runs"]) == ["vipa", "kv_language"]
    for variant, by_seed in accuracy["runs"].items():
        metrics = by_seed["0"]["metrics"]
        expected = set(SPLITS) | ({f"{s}/shuffled" for s in SPLITS} if variant == "vipa" else set())
        assert set(metrics) == expected, variant
        for split, values in metrics.items():
            for m in PAPER_METRICS:
                assert finite(values[m]) and 0 <= values[m] <= 100, (variant, split, m)
        summary = accuracy["variants"][variant]["val"]["oIoU"]
        assert (
            summary["n"] == 1
            and summary["mean"] == metrics["val"]["oIoU"]
            and summary["std"] is None
        )
    headline = accuracy["headline"]
    assert headline["outcome"] == "single seed" and "ONE seed" in headline["verdict"]
    assert headline["difference"]["mean"] == pytest.approx(
        accuracy["runs"]["vipa"]["0"]["metrics"]["val"]["oIoU"]
        - accuracy["runs"]["kv_language"]["0"]["metrics"]["val"]["oIoU"]
    )
    # Checkpoints of finished runs are removed (each holds ~340 MB of optimizer state).
    run_dir = os.path.join(out, "runs", "seed0", "vipa")
    assert not [f for f in os.listdir(run_dir) if f.endswith(".pth")]

    # ---- report: targets and markdown rendered from the JSON
    assert len(data["targets"]) == 6 and {t["status"] for t in data["targets"]} <= TARGET_STATUSES
    with open(os.path.join(out, "benchmark.md")) as f:
        md = f.read()
    for section in (
        "## Machine",
        "## Speed and cost",
        "## Accuracy and ablations",
        "## Which claims reproduce",
        "## Targets",
    ):
        assert section in md and section in stdout
    # The paired table: language K/V minus VIPA, the value the JSON's headline holds.
    paired = md.split("minus VIPA's, paired by seed")[1].split("**Run cost")[0]
    kv_row = next(line for line in paired.splitlines() if line.startswith("| kv_language"))
    head = data["accuracy"]["headline"]["difference"]["mean"]
    assert float(kv_row.split("|")[3].split("±")[0]) == pytest.approx(-head, abs=0.01)

    # ---- a second invocation reuses the finished runs instead of training again
    again = run_benchmark("accuracy", "--quick", "--output", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped (done before)") == 2
    with open(os.path.join(out, "benchmark.json")) as f:
        assert json.load(f)["accuracy"]["variants"] == accuracy["variants"]
    # ... and refuses to mix them with a run made under other settings
    other = run_benchmark("accuracy", "--quick", "--output", out, "--iters", "4")
    assert other.returncode == 2 and "other settings" in other.stderr


def _runs(a, b):
    return {
        "vipa": {str(s): {"metrics": {"val": {"oIoU": v}}} for s, v in enumerate(a)},
        "kv_language": {str(s): {"metrics": {"val": {"oIoU": v}}} for s, v in enumerate(b)},
    }


def test_compare_verdicts_need_agreement_beyond_seed_spread():
    beats = compare(_runs([50.0, 52.0, 51.0], [40.0, 41.0, 40.5]), "vipa", "kv_language")
    assert beats["outcome"] == "beats" and beats["verdict"].startswith(
        "vipa beats kv_language by 10.50 ± "
    )
    assert beats["difference"]["mean"] == pytest.approx(10.5)
    # Same mean gain but one seed disagrees: noise.
    noisy = compare(_runs([60.0, 40.0], [45.0, 44.0]), "vipa", "kv_language")
    assert noisy["outcome"] == "noise" and "not distinguishable from noise" in noisy["verdict"]
    # Consistent sign but a gain smaller than each variant's own seed spread: noise too.
    small = compare(_runs([50.0, 58.0], [49.0, 57.0]), "vipa", "kv_language")
    assert small["outcome"] == "noise"
    loses = compare(_runs([40.0, 41.0], [50.0, 50.5]), "vipa", "kv_language")
    assert loses["outcome"] == "loses"
    assert compare(_runs([50.0], [40.0]), "vipa", "kv_language")["outcome"] == "single seed"
    assert compare(_runs([], []), "vipa", "kv_language")["outcome"] == "not measured"


def test_speed_target_reads_the_config_path_and_names_a_faster_mode():
    def case(mode, images_per_s):
        return {"kind": "inference", "mode": mode, "batch": 8, "images_per_s": images_per_s}

    tiny = {"image_size": 320, "default_mode": "channels_last", "cases": [case("channels_last", 19.5)]}
    data = {"speed": {"settings": {"threads": 2}, "configs": {"tiny": tiny}}}
    alone = evaluate_targets(data)[0]
    assert (alone["measured"], alone["status"]) == (19.5, "FAIL") and "fastest" not in alone["note"]
    tiny["cases"].append(case("channels_last_compiled", 21.1))  # an opt-in mode: noted, not judged
    noted = evaluate_targets(data)[0]
    assert (noted["measured"], noted["status"]) == (19.5, "FAIL")
    assert noted["note"].endswith("channels_last (config); fastest: channels_last_compiled 21.10")


def test_evaluation_before_after_on_a_saved_checkpoint(tmp_path):
    """The 'evaluation' sub-task: every optimisation step timed on the real evaluation path."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from vipa_d2 import add_vipa_config
    from vipa_d2.data.synthetic import SynthConfig, write_benchmark

    root = str(tmp_path / "datasets")
    write_benchmark(root, 6, seed=0, cfg=SynthConfig(image_size=64), workers=1, progress=False)
    small = [
        "INPUT.IMAGE_SIZE", "64", "MODEL.TIMM.WEIGHTS", "", "MODEL.VIPA.HIDDEN_DIM", "32",
        "MODEL.VIPA.NHEADS", "2", "MODEL.VIPA.PIXEL_DECODER.MASK_DIM", "16",
        "DATALOADER.NUM_WORKERS", "0",
    ]
    cfg = get_cfg()
    add_vipa_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "synthetic", "vipa_tiny_cpu.yaml"))
    cfg.merge_from_list(small)
    torch.manual_seed(0)
    weights = str(tmp_path / "model.pth")
    torch.save({"model": build_model(cfg).state_dict()}, weights)

    out = str(tmp_path / "bench")
    proc = run_benchmark(
        "evaluation", "--output", out, "--weights", weights, "--eval-data-root", root,
        "--dataset", "refsynth_unc_val", "--eval-samples", "5", "--eval-repeats", "1", *small,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "benchmark.json")) as f:
        section = json.load(f)["evaluation"]
    steps = section["steps"]
    assert section["settings"]["samples"] == 5
    switches = ("trim_text_padding", "channels_last", "batch", "fold_bn", "fused_attention", "compile_backbone")
    assert [tuple(s[k] for k in switches) for s in steps] == [
        (False, False, 1, False, False, False), (True, False, 1, False, False, False),
        (True, True, 1, False, False, False), (True, True, 8, False, False, False),
        (True, True, 8, True, False, False), (True, True, 8, True, True, False),
        (True, True, 8, True, True, True),
    ]
    for s in steps:
        assert s["wall_s"]["n"] == 1 and s["samples_per_s"] > 0 and s["first_round_s"] > 0
        # The optimisations change the memory layout and shapes, not the values.
        for k, v in s["metrics"].items():
            assert v == pytest.approx(steps[0]["metrics"][k], abs=0.5), (s["step"], k)
    assert "## Evaluation before/after" in proc.stdout

    missing = run_benchmark("evaluation", "--output", out, "--weights", str(tmp_path / "no.pth"))
    assert missing.returncode == 2 and "no.pth: no such file" in missing.stderr
