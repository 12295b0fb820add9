"""The synthetic referring benchmark: masks, expressions, splits, determinism, CLI."""

import collections
import json
import os
import pickle

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import vipa_d2  # noqa: F401  registers the built-ins
from common import load_script
from vipa_d2.data import annotations_to_mask, register_referring_dataset
from vipa_d2.data.synthetic import writer
from vipa_d2.data.synthetic import (
    CATEGORIES,
    SPLITS,
    SynthConfig,
    assign_splits,
    evaluate,
    finished_benchmark,
    heldout_combos,
    regenerate_image,
    sample_scene,
    write_benchmark,
)

NUM, SEED = 20, 3
SINGLE_TYPES = {"category", "colour", "size", "position", "ordinal", "relation"}


@pytest.fixture(scope="module")
def bench(synthetic_benchmark):
    return synthetic_benchmark(NUM, seed=SEED, workers=2)


def _index(record):
    return int(os.path.splitext(os.path.basename(record["file_name"]))[0])


def _load(root, variant, split, generalized=False):
    name = f"test_synth_{variant}_{split}"
    image_root = os.path.join(root, "refsynth", "images")
    register_referring_dataset(
        name, root, variant, "unc", split, image_root, generalized=generalized
    )
    try:
        return DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_one_record_per_expression_and_masks_match_drawn_objects(bench):
    root, stats = bench
    with open(os.path.join(root, "refsynth", "refs(unc).p"), "rb") as f:
        refs = pickle.load(f)
    with open(os.path.join(root, "refsynth", "instances.json")) as f:
        cat_name = {c["id"]: c["name"] for c in json.load(f)["categories"]}
    scenes = {}
    total = 0
    for split in SPLITS:
        recs = _load(root, "refsynth", split)
        expected = sum(len(r["sentences"]) for r in refs if r["split"] == split)
        assert len(recs) == expected == stats["splits"][split]["expressions"] > 0
        total += len(recs)
        for r in recs:
            i = _index(r)
            scene = scenes.setdefault(i, regenerate_image(stats, i)[0])
            assert (r["height"], r["width"]) == (scene.height, scene.width)
            mask = annotations_to_mask(r["annotations"], r["height"], r["width"])
            assert mask.sum() > 0
            (ann,) = r["annotations"]
            hits = [
                k
                for k in range(len(scene.objects))
                if np.array_equal(mask, scene.instance_map == k + 1)
            ]
            assert len(hits) == 1, r["sentence"]
            assert scene.objects[hits[0]].category == cat_name[ann["category_id"]]
    assert total == len([s for r in refs for s in r["sentences"]])


def test_builtin_name_loads_the_generated_set(bench, monkeypatch):
    root, stats = bench
    monkeypatch.setenv("DETECTRON2_DATASETS", root)
    recs = DatasetCatalog.get("refsynth_unc_train")
    assert len(recs) == stats["splits"]["train"]["expressions"]
    assert len({r["sentence"]["sent_id"] for r in recs}) == len(recs)


def test_expressions_unambiguous_diverse_and_two_per_target(bench):
    _, stats = bench
    cfg = SynthConfig()
    types = collections.Counter()
    for i in range(NUM):
        scene, exprs = regenerate_image(stats, i)
        per_target = collections.defaultdict(list)
        for e in exprs:
            assert evaluate(e.program, scene, cfg) == frozenset(e.targets), e
            types[e.type] += 1
            if len(e.targets) == 1:
                per_target[e.targets].append(e.text)
        for texts in per_target.values():
            assert len(texts) >= 2 and len(set(texts)) == len(texts)
    assert SINGLE_TYPES | {"multi", "no_target"} <= set(types)


def _generalized_sentences(root, stats):
    """[(ref, sentence, its Expression)] of grefsynth, and {ann id: (object index in its
    scene, image id)}: object k of an image is its k-th annotation (file order)."""
    with open(os.path.join(root, "grefsynth", "grefs(unc).json")) as f:
        grefs = json.load(f)
    with open(os.path.join(root, "refsynth", "instances.json")) as f:
        inst = json.load(f)
    index_of = {img["id"]: int(os.path.splitext(img["file_name"])[0]) for img in inst["images"]}
    ann_object, seen = {}, collections.Counter()
    for ann in inst["annotations"]:
        ann_object[ann["id"]] = (seen[ann["image_id"]], ann["image_id"])
        seen[ann["image_id"]] += 1
    exprs = {i: {e.text: e for e in regenerate_image(stats, i)[1]} for i in range(NUM)}
    sentences = [
        (ref, sent, exprs[index_of[ref["image_id"]]][sent["raw"]]) for ref in grefs for sent in ref["sentences"]
    ]
    return sentences, ann_object, exprs


def test_types_and_landmarks_reach_refer_sentences_and_records(bench):
    root, stats = bench
    sentences, ann_object, exprs = _generalized_sentences(root, stats)
    relations = 0
    for ref, sent, e in sentences:
        assert sent["type"] == e.type
        if e.type != "relation":
            assert "landmark_ann_id" not in sent and "landmark_phrase" not in sent
            continue
        relations += 1
        assert ann_object[sent["landmark_ann_id"]] == (e.landmark, ref["image_id"])
        assert e.landmark not in e.targets
        # The realized text ends with the landmark's noun phrase.
        assert sent["landmark_phrase"] == e.landmark_phrase
        assert sent["raw"].endswith(" the " + e.landmark_phrase)
    assert relations > 0

    scenes = {}
    for r in _load(root, "refsynth", "val"):
        i = _index(r)
        e = exprs[i][r["sentence"]["raw"]]
        assert r["type"] == e.type
        assert ("landmark" in r) == (e.type == "relation")
        if "landmark" in r:
            scene = scenes.setdefault(i, regenerate_image(stats, i)[0])
            mask = annotations_to_mask([r["landmark"]["annotation"]], r["height"], r["width"])
            np.testing.assert_array_equal(mask, scene.instance_map == e.landmark + 1)
            assert r["landmark"]["phrase"] == e.landmark_phrase


def test_groups_are_the_objects_the_category_and_colour_words_name(bench):
    """Every sentence's group_ann_ids: the objects matching its category / colour words,
    the targets among them; records turn them into object_in_group beside object_boxes."""
    root, stats = bench
    sentences, ann_object, exprs = _generalized_sentences(root, stats)
    by_type, scenes = collections.Counter(), {}
    for ref, sent, e in sentences:
        if _index(ref) not in scenes:
            scenes[_index(ref)] = regenerate_image(stats, _index(ref))[0]
        scene = scenes[_index(ref)]
        group = sorted(ann_object[a][0] for a in sent["group_ann_ids"])
        p = e.program
        named = [
            k
            for k, o in enumerate(scene.objects)
            if (p.category is None or o.category == p.category) and (p.colour is None or o.colour == p.colour)
        ]
        assert group == named, sent["raw"]
        assert set(e.targets) <= set(group)
        if e.type in ("category", "colour", "multi"):
            assert set(group) == set(e.targets)
        by_type[e.type] += len(group) > len(e.targets)
    assert by_type["ordinal"] > 0 and by_type["no_target"] == 0

    for r in _load(root, "refsynth", "val"):
        assert len(r["object_in_group"]) == len(r["object_boxes"])
        e = exprs[_index(r)][r["sentence"]["raw"]]
        # object_boxes lists the image's objects in annotation (= scene) order.
        assert [k for k, member in enumerate(r["object_in_group"]) if member] == list(e.group)


def test_scene_rules():
    cfg = SynthConfig()
    heldout = heldout_combos(0)
    distractors, occluded, cats, colours, sizes = 0, 0, set(), set(), set()
    n = 60
    for i in range(n):
        scene = sample_scene(cfg, np.random.default_rng([11, i]), heldout, use_heldout=False)
        objs = scene.objects
        assert cfg.min_objects <= len(objs) <= cfg.max_objects
        assert max(scene.height, scene.width) == cfg.image_size
        sizes.add((scene.height, scene.width))
        assert all(o.visible_frac >= cfg.min_visible for o in objs)
        assert all(heldout[o.category] != o.colour for o in objs)
        counts = collections.Counter(o.category for o in objs)
        distractors += max(counts.values()) >= 2
        occluded += any(o.visible_frac < 1.0 for o in objs)
        cats |= set(counts)
        colours |= {o.colour for o in objs}
        # Instance ids are drawn in z-order: the last object is never occluded, and an
        # occluded object is overlapped by an object drawn after it.
        assert set(np.unique(scene.instance_map).tolist()) == set(range(len(objs) + 1))
        assert objs[-1].visible_frac == 1.0
        for k, o in enumerate(objs):
            if o.visible_frac < 1.0:
                assert any(
                    np.hypot(o.cx - p.cx, o.cy - p.cy) < o.radius + p.radius for p in objs[k + 1 :]
                )
    assert distractors / n >= 0.7
    assert occluded > 0
    assert cats == set(CATEGORIES) and len(colours) >= 6
    assert len(sizes) > 10  # varied sizes / aspect ratios


def test_testb_holds_unseen_combinations(bench):
    _, stats = bench
    heldout = heldout_combos(SEED)
    splits = assign_splits(NUM, SEED, SynthConfig())
    assert set(splits) == set(SPLITS)
    for i, split in enumerate(splits):
        scene, exprs = regenerate_image(stats, i)
        novel = {k for k, o in enumerate(scene.objects) if heldout[o.category] == o.colour}
        if split == "testB":
            assert novel
            assert all(set(e.targets) & novel for e in exprs if e.targets)
        else:
            assert not novel
    assert stats["heldout_combinations"] == dict(sorted(heldout.items()))


def test_generalized_variant(bench):
    root, stats = bench
    recs = _load(root, "grefsynth", "train", generalized=True)
    g = stats["splits"]["train"]["generalized_expressions"]
    assert len(recs) == g["single"] + g["multi"] + g["no_target"]
    empty = [r for r in recs if r["empty"]]
    multi = [r for r in recs if len(r["annotations"]) > 1]
    assert len(empty) == g["no_target"] > 0 and len(multi) == g["multi"] > 0
    assert all(r["annotations"] == [] for r in empty)
    for r in multi[:10]:
        scene = regenerate_image(stats, _index(r))[0]
        mask = annotations_to_mask(r["annotations"], r["height"], r["width"])
        covered = set(np.unique(scene.instance_map[mask > 0]).tolist())
        assert 0 not in covered and len(covered) == len(r["annotations"])
        np.testing.assert_array_equal(mask, np.isin(scene.instance_map, list(covered)))


def test_statistics(bench):
    root, stats = bench
    with open(os.path.join(root, "refsynth", "stats.json")) as f:
        saved = json.load(f)
    assert saved["splits"] == stats["splits"]
    assert sum(s["images"] for s in saved["splits"].values()) == NUM
    for s in saved["splits"].values():
        assert s["objects"] >= 3 * s["images"]
        assert 0.0 <= s["share_same_category_distractors"] <= 1.0
        assert sum(s["expression_types"].values()) == s["expressions"]
    assert os.path.isfile(os.path.join(root, "grefsynth", "stats.json"))


def test_cli_is_deterministic_and_worker_independent(bench, tmp_path, capsys):
    root, _ = bench
    out = tmp_path / "again"
    load_script("datasets/prepare_synthetic.py").main(
        ["--out", str(out), "--num-images", str(NUM), "--seed", str(SEED), "--workers", "1"]
    )
    printed = capsys.readouterr().out
    assert "testB" in printed and "expression types" in printed
    for rel in (
        "refsynth/refs(unc).p",
        "refsynth/instances.json",
        "grefsynth/grefs(unc).json",
        "refsynth/images/000000.jpg",
        f"refsynth/images/{NUM - 1:06d}.jpg",
    ):
        with open(os.path.join(root, rel), "rb") as a, open(out / rel, "rb") as b:
            assert a.read() == b.read(), rel
    # Another seed gives other data; regenerating into a generated folder is allowed.
    load_script("datasets/prepare_synthetic.py").main(
        ["--out", str(out), "--num-images", str(NUM), "--seed", str(SEED + 1), "--workers", "1"]
    )
    with open(os.path.join(root, "refsynth/instances.json"), "rb") as a, open(
        out / "refsynth/instances.json", "rb"
    ) as b:
        assert a.read() != b.read()


def test_image_size_option_and_bad_inputs(tmp_path, monkeypatch):
    stats = write_benchmark(
        str(tmp_path / "small"),
        4,
        seed=0,
        cfg=SynthConfig(image_size=96),
        workers=1,
        progress=False,
    )
    for i in range(4):
        scene = regenerate_image(stats, i)[0]
        assert max(scene.height, scene.width) == 96
    foreign = tmp_path / "foreign" / "refsynth"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_benchmark(str(tmp_path / "foreign"), 4, seed=0, workers=1, progress=False)
    assert (foreign / "mine.txt").read_text() == "keep me"
    # A generation stopped midway (Ctrl-C, a full disk) is cleared by the next one; it
    # refused the folder as not the generator's, on every rerun (main-job review, session 47).
    real_entry, calls = writer._image_entry, []

    def stops_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real_entry(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(writer, "_image_entry", stops_after_two)
        with pytest.raises(KeyboardInterrupt):
            write_benchmark(str(tmp_path / "stopped"), 4, seed=0, workers=1, progress=False)
    assert finished_benchmark(str(tmp_path / "stopped")) is None
    write_benchmark(str(tmp_path / "stopped"), 4, seed=0, workers=1, progress=False)
    assert finished_benchmark(str(tmp_path / "stopped"))["num_images"] == 4
    assert not list(tmp_path.glob(f"stopped/*/{writer.UNFINISHED_MARK}"))
    with pytest.raises(ValueError, match="num_images=3"):
        assign_splits(3, 0, SynthConfig())
    with pytest.raises(ValueError, match="num_images=3"):  # before any folder is made
        write_benchmark(str(tmp_path / "too_few"), 3, seed=0, workers=1, progress=False)
    assert not (tmp_path / "too_few").exists()


def test_finished_benchmark_reads_the_stats_written_last(bench, tmp_path):
    root, stats = bench
    assert finished_benchmark(root) == json.loads(json.dumps(stats["generator"]))  # as stored
    # A generation stopped midway (folders, no stats files) is not a finished benchmark.
    (tmp_path / "refsynth" / "images").mkdir(parents=True)
    (tmp_path / "grefsynth").mkdir()
    assert finished_benchmark(str(tmp_path)) is None
    for name in ("refsynth", "grefsynth"):
        (tmp_path / name / "stats.json").write_text("{}")
    with pytest.raises(ValueError, match=r"refsynth/stats.json: expected the generator's statistics"):
        finished_benchmark(str(tmp_path))
    (tmp_path / "refsynth" / "stats.json").write_text("{cut")
    with pytest.raises(ValueError, match=r"refsynth/stats.json: not valid JSON"):
        finished_benchmark(str(tmp_path))
    main_job = load_script("tools/main_job.py")
    # The main job uses a benchmark it finds only when it is the one asked for: another seed's
    # data was trained on and reported as the asked-for seed's.
    assert main_job.ensure_synthetic_data(root, NUM, SEED) == 0.0
    with pytest.raises(SystemExit, match=rf"{root} holds a synthetic benchmark made with other settings \(num_images "
                       rf"{NUM} there, {NUM + 1} asked; seed {SEED} there, 0 asked\): give --num-images / --seed"):
        main_job.ensure_synthetic_data(root, NUM + 1, 0)
    with pytest.raises(SystemExit) as e:
        main_job.parse_args(["--num-images", "3"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="image_size=32"):
        SynthConfig(image_size=32)
