"""Copy the public bias benchmarks into the package, compactly and deterministically (run once).

    python scripts/bundle_data.py [--source /work/shared/data]

- StereoSet dev / test intrasentence: original schema, per-annotator ``labels`` and ``harm`` dropped
  (roles come from ``gold_label``), gzip with mtime 0.
- The 8:1 train / dev split ids of StereoSet test (``biasedit_peft.data.splits``).
- CrowS-Pairs CSV, unchanged bytes, gzip with mtime 0.
- ``bias_attribute_words.json`` and the CC BY-SA 4.0 license, unchanged.

Running it twice gives byte-identical files. Nothing in the package reads the source at run time.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from biasedit_peft.data.resources import (  # noqa: E402
    ATTRIBUTE_WORDS_FILE,
    CROWS_FILE,
    RESOURCES,
    STEREOSET_FILES,
    STEREOSET_SPLITS_FILE,
)
from biasedit_peft.data.splits import SPLIT_RATIO, SPLIT_SEED, split_train_dev  # noqa: E402
from biasedit_peft.data.stereoset import parse_item  # noqa: E402

LICENSE_FILE = "LICENSE-CC-BY-SA-4.0.txt"


def write_gzip(path: Path, payload: bytes) -> None:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as handle:
        handle.write(payload)
    path.write_bytes(buffer.getvalue())


def compact_stereoset(source: Path) -> dict:
    document = json.loads(source.read_text(encoding="utf-8"))
    rows = [
        {
            "id": row["id"], "target": row["target"], "bias_type": row["bias_type"], "context": row["context"],
            "sentences": [
                {"sentence": s["sentence"], "id": s["id"], "gold_label": s["gold_label"]} for s in row["sentences"]
            ],
        }
        for row in document["data"]["intrasentence"]
    ]
    return {"version": document["version"], "data": {"intrasentence": rows}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/work/shared/data"))
    args = parser.parse_args(argv)
    RESOURCES.mkdir(parents=True, exist_ok=True)

    compact = {}
    for split, name in STEREOSET_FILES.items():
        compact[split] = compact_stereoset(args.source / "stereoset" / f"{split}.json")
        payload = json.dumps(compact[split], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        write_gzip(RESOURCES / name, payload)

    test_rows = compact["test"]["data"]["intrasentence"]
    items = [parse_item(row, f"stereoset test row {index}") for index, row in enumerate(test_rows, 1)]
    split_ids = split_train_dev(items)
    splits = {"source": "StereoSet test (intrasentence)", "seed": SPLIT_SEED, "ratio": list(SPLIT_RATIO),
              "grouped_by": "target", "stratified_by": "bias_type", **split_ids}
    (RESOURCES / STEREOSET_SPLITS_FILE).write_text(json.dumps(splits, indent=0) + "\n", encoding="utf-8")

    write_gzip(RESOURCES / CROWS_FILE, (args.source / "crows_pairs" / "crows_pairs_anonymized.csv").read_bytes())
    shutil.copyfile(args.source / "bias_attribute_words.json", RESOURCES / ATTRIBUTE_WORDS_FILE)
    shutil.copyfile(args.source / LICENSE_FILE, RESOURCES / LICENSE_FILE)

    for path in sorted(RESOURCES.iterdir()):
        print(f"{path.stat().st_size:>9,d}  {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
