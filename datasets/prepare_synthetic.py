#!/usr/bin/env python
"""
Generate the synthetic referring benchmark (refsynth + its generalized variant grefsynth).

    python datasets/prepare_synthetic.py --out datasets --num-images 5000 --seed 0

writes <out>/refsynth/{images/, instances.json, refs(unc).p, stats.json} and
<out>/grefsynth/{instances.json, grefs(unc).json, stats.json}; with --out set to
$DETECTRON2_DATASETS (default datasets/) the built-in names refsynth_unc_* and
grefsynth_unc_* load it. See datasets/README.md for what the benchmark contains.
"""

import argparse
import logging

from vipa_d2.data.synthetic import SynthConfig, format_stats, write_benchmark


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="datasets", help="dataset root (default: datasets)")
    parser.add_argument(
        "--num-images", type=int, default=5000, help="images over all splits (default: 5000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="generation seed; same seed, same data")
    parser.add_argument(
        "--image-size",
        type=int,
        default=SynthConfig.image_size,
        help="long image side in pixels (default: %(default)s)",
    )
    parser.add_argument("--workers", type=int, default=2, help="rendering processes (default: 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stats = write_benchmark(
        args.out,
        args.num_images,
        seed=args.seed,
        cfg=SynthConfig(image_size=args.image_size),
        workers=args.workers,
    )
    print(
        f"Wrote {args.num_images} images to {args.out}/refsynth and {args.out}/grefsynth "
        f"in {stats['generator']['seconds']:.1f} s"
    )
    print(format_stats(stats))


if __name__ == "__main__":
    main()
