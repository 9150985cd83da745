"""The deterministic 8:1 train / dev split of StereoSet's test file (BiasEdit paper, Table 5).

Grouped by target term (no target on both sides), stratified by bias type (each type is split on
its own), seeded. The bundling script computes it once and ships the ids; a test recomputes it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

from .stereoset import StereoSetItem

SPLIT_SEED = 0
SPLIT_RATIO = (8, 1)  # train : dev
SPLIT_BIAS_TYPES = ("gender", "race", "religion")
CALIBRATION_SEED = 1
"""The shuffle seed of the carve of ``train`` into ``train-fit`` / ``train-calib`` (:func:`split_calibration`)."""


def split_train_dev(
    items: Sequence[StereoSetItem],
    bias_types: Sequence[str] = SPLIT_BIAS_TYPES,
    seed: int = SPLIT_SEED,
    ratio: tuple[int, int] = SPLIT_RATIO,
) -> dict[str, list[str]]:
    """``{"train": ids, "dev": ids}`` (file order kept within each side).

    Per bias type: target groups sorted by name, shuffled with ``random.Random(f"{seed}:{type}")``,
    then each group goes to dev if that brings dev's size closer to ``n * dev / (train + dev)``,
    else to train.

    Args:
        items: StereoSet items (the bundled split is made from StereoSet's test file).
        bias_types: The bias types split; others are left out.
        seed: The shuffle seed.
        ratio: ``(train, dev)`` proportions.
    """
    by_type_target: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        if item.bias_type in bias_types:
            by_type_target[item.bias_type][item.target].append(item.id)
    dev_ids: set[str] = set()
    for bias_type in bias_types:
        groups = by_type_target[bias_type]
        targets = sorted(groups)
        random.Random(f"{seed}:{bias_type}").shuffle(targets)
        goal = sum(len(ids) for ids in groups.values()) * ratio[1] / sum(ratio)
        dev_size = 0
        for target in targets:
            size = len(groups[target])
            if abs(dev_size + size - goal) < abs(dev_size - goal):
                dev_ids.update(groups[target])
                dev_size += size
    chosen = [item.id for item in items if item.bias_type in bias_types]
    return {"train": [i for i in chosen if i not in dev_ids], "dev": [i for i in chosen if i in dev_ids]}


def split_calibration(train: Sequence[StereoSetItem]) -> dict[str, list[str]]:
    """``{"train-fit": ids, "train-calib": ids}``: ``train`` carved 8:1 again, by target term, the way
    :func:`split_train_dev` split the file (seed :data:`CALIBRATION_SEED`).

    ``train-calib`` holds target terms an editor meta-trained on ``train-fit`` never saw, about as many as ``dev``
    (3 gender, 11 race and 1 religion term of the bundled split against ``dev``'s 3 / 13 / 1), so an editor's edit
    scale can be calibrated on twice ``dev``'s terms without touching ``test``.
    """
    split = split_train_dev(train, seed=CALIBRATION_SEED)
    return {"train-fit": split["train"], "train-calib": split["dev"]}


def check_limit(limit: int | None, option: str = "--limit") -> None:
    """Raise ``ValueError`` for a ``limit`` below 1 (it would keep nothing), naming it as ``option``."""
    if limit is not None and limit < 1:
        raise ValueError(f"{option} must be at least 1, got {limit}")


def take_per_type(items: list, limit: int | None, key: str = "bias_type", option: str = "--limit") -> list:
    """The first ``limit`` items of each ``key`` group (all of them when ``limit`` is None), in order.

    Raises:
        ValueError: ``limit`` is below 1 (it would keep nothing), named as ``option``.
    """
    if limit is None:
        return list(items)
    check_limit(limit, option)
    seen: dict[str, int] = {}
    kept = []
    for item in items:
        group = item.get(key) if isinstance(item, dict) else getattr(item, key)
        if seen.get(group, 0) < limit:
            seen[group] = seen.get(group, 0) + 1
            kept.append(item)
    return kept
