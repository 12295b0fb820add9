"""tools/data_scale.py on a small folder: it writes a REFER folder of the asked size that the
loader reads, and times each step of the data path it names (no timing is asserted)."""
import json

from detectron2.data import DatasetCatalog, MetadataCatalog

from common import load_script

data_scale = load_script("tools/data_scale.py")


def test_data_scale_writes_a_readable_folder_and_times_every_step(tmp_path):
    names = [f"{data_scale.NAME}_{split}" for split, _ in data_scale.SPLITS]
    try:
        data_scale.main(["--out", str(tmp_path / "data"), "--images", "40", "--output", str(tmp_path / "scale.json")])
        result = json.loads((tmp_path / "scale.json").read_text())
    finally:
        for name in names:
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
    counts = result["expressions"]
    assert set(counts) == set(names) and all(n > 0 for n in counts.values())
    # 2.5 referred objects an image, 2 to 4 sentences each.
    assert 40 * 2 * 2 <= sum(counts.values()) <= 40 * 3 * 4
    steps = [row["step"] for row in result["steps"]]
    assert steps[:3] == ["DatasetCatalog.get refscale_train", "DatasetCatalog.get refscale_train, again",
                         "check_test_sets (before training: each test set's first read)"]
    assert steps[3:] == [f"{loader} refscale_{split} (each evaluation)" for split in ("val", "testA", "testB")
                         for loader in ("build_test_loader", "build_shuffled_test_loader")]
    assert all(row["wall_s"] >= 0 and row["peak_rss_mib"] > 0 for row in result["steps"])
