"""The cache's bytes do not change with a refactor: shards encoded from fixed teacher outputs are byte-identical to
those the code wrote before the cache was split into modules (commit 54d5c16).

tests/data/cache_golden_rows.npz holds raw teacher rows (fcos_mobilenetv3_micro, seed 0, three 96 px shapes
images, both views); tests/data/cache_golden.json the sha256 of the shard those rows made then, for three
compression settings. tests/data/make_cache_golden.py wrote both (run with that commit's code on the path). The
rows are stored rather than recomputed, so the check holds on any CPU: the teacher's forward is not part of it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from teachers.cache import table_to_bytes
from teachers.precompute import encode_shard

DATA = Path(__file__).parent / "data"
GOLDEN = json.loads((DATA / "cache_golden.json").read_text())


def _rows() -> list[dict]:
    arrays = np.load(DATA / "cache_golden_rows.npz")
    rows = []
    for r, (meta, columns) in enumerate(zip(GOLDEN["rows"], GOLDEN["columns"])):
        rows.append({**meta, "hw": tuple(meta["hw"]), "boxes": arrays[f"{r}/boxes"],
                     "raw": {name: arrays[f"{r}/raw/{name}"] for name in columns}})
    return rows


@pytest.mark.parametrize("setting", sorted(GOLDEN["settings"]))
def test_shard_bytes_equal_the_ones_written_before_the_split(setting):
    g = GOLDEN["settings"][setting]
    data = table_to_bytes(encode_shard(_rows(), g["spec"]), g["meta"])
    assert len(data) == g["bytes"] and hashlib.sha256(data).hexdigest() == g["sha256"]
