"""Every stored result (benchmarks/results, docs/studies, tests/data) is strict JSON: no NaN or Infinity, which
Python writes by default but JSON has no such numbers (other readers refuse the file). A missing value is null."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILES = sorted([*ROOT.glob("benchmarks/results/*.json"), *ROOT.glob("docs/studies/**/*.json"),
                       *ROOT.glob("tests/data/*.json")])


def _refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_there_are_stored_results():
    assert len(RESULT_FILES) > 10


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_stored_result_is_strict_json(path):
    json.loads(path.read_text(), parse_constant=_refuse)


def test_the_check_refuses_nan(tmp_path):
    with pytest.raises(ValueError, match="NaN is not JSON"):
        json.loads(json.dumps({"x": float("nan")}), parse_constant=_refuse)
