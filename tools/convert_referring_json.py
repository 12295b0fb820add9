#!/usr/bin/env python
"""
Validate the simple referring JSON format and convert it to the REFER layout.

    python tools/convert_referring_json.py my_refs.json --out-root datasets --dataset mydata \
        [--split-by unc] [--generalized] [--image-root datasets/mydata/images] [--check-only] [--overwrite]

writes <out-root>/<dataset>/instances.json and refs(<split-by>).p (or, with --generalized,
grefs(<split-by>).json). Files it would replace (that refs file, even from the same
conversion, and a different instances.json, which every refs file of the folder indexes) are
refused unless --overwrite; another --split-by of the same images and objects is written
beside the first.
Register it with
vipa_d2.data.register_referring_dataset(name, out_root, dataset, split_by, split, image_root).
The format is documented in datasets/README.md. Exit status 1 on invalid input.
"""

import argparse
import os
import sys

from vipa_d2.data.custom import (
    ReferFolderConflict,
    ReferringFormatError,
    convert_simple_json,
    load_simple_json,
    validate_simple_json,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("json_file", help="file in the simple referring JSON format")
    parser.add_argument("--out-root", help="dataset root to write <out-root>/<dataset>/ into")
    parser.add_argument("--dataset", help="dataset folder name, e.g. mydata")
    parser.add_argument(
        "--split-by", default="unc", help="split provider in the refs file name (default: unc)"
    )
    parser.add_argument(
        "--generalized",
        action="store_true",
        help="allow multi-target / no-target expressions; write grefs(<split-by>).json",
    )
    parser.add_argument(
        "--image-root", help="also check that every image file exists under this folder"
    )
    parser.add_argument("--check-only", action="store_true", help="validate only, write nothing")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the REFER files of an existing <out-root>/<dataset>/"
    )
    args = parser.parse_args(argv)
    if not args.check_only and not (args.out_root and args.dataset):
        parser.error("--out-root and --dataset are required unless --check-only")
    # Both become file and folder names: a path would write outside <out-root>/<dataset>/.
    for option, name in (("--split-by", args.split_by), ("--dataset", args.dataset)):
        if name is not None and (name in ("", ".", "..") or os.path.basename(name) != name or "\\" in name):
            parser.error(f"{option} {name!r}: expected a plain name (no folders), e.g. unc")
    try:
        if args.check_only:
            data = load_simple_json(args.json_file)
            validate_simple_json(data, args.json_file, args.generalized, args.image_root)
            print(f"{args.json_file}: valid ({len(data['images'])} images)")
            return 0
        out_dir = os.path.join(args.out_root, args.dataset)
        paths = convert_simple_json(
            args.json_file,
            out_dir,
            split_by=args.split_by,
            generalized=args.generalized,
            image_root=args.image_root,
            overwrite=args.overwrite,
        )
    except ReferFolderConflict as e:
        held = ", ".join(e.files)
        print(f"error: {out_dir} already holds {held}, which this conversion would replace; "
              "give another --dataset, or --overwrite to replace them", file=sys.stderr)
        return 1
    except (ReferringFormatError, OSError) as e:  # OSError: FileNotFoundError, a folder that cannot be made
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {paths['instances']} and {paths['refs']}")
    if paths["outdated_refs"]:  # another split provider's refs, indexing the annotations replaced now
        print(f"warning: {', '.join(paths['outdated_refs'])} in {out_dir} index the instances.json replaced now: "
              "convert their data again, or remove them", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
