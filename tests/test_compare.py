import math
import re
from pathlib import Path

import pytest

from clso.compare import comparison, first_reach, value_at, verdict

CURVE = [{"step": s, "energy_wh": e, "flops": f, "val_loss": v}
         for s, e, f, v in [(0, 0.0, 0, 8.0), (100, 1.0, 100, 6.0), (200, 2.0, 200, 5.0), (300, 3.0, 300, 4.5)]]


def test_value_at_interpolates_and_flags_the_ends():
    xs, ys = [0.0, 1.0, 2.0], [8.0, 6.0, 5.0]
    assert value_at(xs, ys, 0.5) == (7.0, "interpolated")
    assert value_at(xs, ys, 2.0) == (5.0, "interpolated")
    assert value_at(xs, ys, 9.0) == (5.0, "beyond the baseline's run (its last point)")
    assert value_at(xs, ys, -1.0)[1] == "at the start of the baseline's run"


def test_first_reach_interpolates_or_says_never():
    xs, ys = [0.0, 1.0, 2.0], [8.0, 6.0, 5.0]
    assert first_reach(xs, ys, 7.0) == pytest.approx(0.5)
    assert first_reach(xs, ys, 5.5) == pytest.approx(1.5)
    assert first_reach(xs, ys, 9.0) == 0.0
    assert first_reach(xs, ys, 4.0) is None


def test_verdict_both_outcomes():
    win = verdict(clso_ppl=104.0, clso_energy=0.4, baseline_ppl=100.0, baseline_energy=1.0)
    assert win["holds"] and win["ppl_within_5pct"] and win["energy_at_most_half"]
    assert win["statement"].startswith("HOLDS")
    too_dear = verdict(clso_ppl=100.0, clso_energy=0.6, baseline_ppl=100.0, baseline_energy=1.0)
    assert not too_dear["holds"] and too_dear["ppl_within_5pct"] and not too_dear["energy_at_most_half"]
    too_poor = verdict(clso_ppl=106.0, clso_energy=0.1, baseline_ppl=100.0, baseline_energy=1.0)
    assert not too_poor["holds"] and too_poor["statement"].startswith("DOES NOT HOLD")


def point(val_loss, energy, flops):
    return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "test_ppl": math.exp(val_loss),
            "energy_wh": energy, "flops": flops}


def test_a_cheap_poor_clso_loses_plainly():
    result = comparison(point(7.0, 0.5, 50), point(4.5, 3.0, 300), CURVE)
    m = result["matched"]
    assert m["baseline_val_ppl_at_clso_energy"] == pytest.approx(math.exp(7.0))  # 8 → 6 halfway
    assert m["baseline_energy_wh_to_reach_clso"] == pytest.approx(0.5)
    assert m["baseline_step_to_reach_clso"] == 50
    assert not result["verdict"]["holds"] and result["ratio"]["energy_wh"] == pytest.approx(0.5 / 3.0, abs=1e-4)


def test_a_cheap_good_clso_wins_plainly():
    result = comparison(point(4.5, 1.0, 100), point(4.5, 3.0, 300), CURVE)
    assert result["verdict"]["holds"]
    assert result["matched"]["baseline_val_ppl_at_clso_energy"] == pytest.approx(math.exp(6.0))


def test_a_clso_better_than_the_whole_baseline_run_is_never_reached():
    m = comparison(point(4.0, 5.0, 500), point(4.5, 3.0, 300), CURVE)["matched"]
    assert not m["baseline_reached_clso_val_ppl"] and m["baseline_energy_wh_to_reach_clso"] is None
    assert m["at_clso_energy"].startswith("beyond")


def test_only_compare_reads_the_test_split():
    root = Path(__file__).resolve().parent.parent
    readers = sorted(str(p.relative_to(root)) for folder in ("clso", "stages") for p in (root / folder).rglob("*.py")
                     if re.search(r"""tokens\(\s*["']test["']\s*\)""", p.read_text()))
    assert readers == ["stages/compare.py"]


def test_readme_numbers_are_the_committed_metrics():
    import json

    from stages.compare import BEGIN, END, summary
    root = Path(__file__).resolve().parent.parent
    block = (root / "README.md").read_text().split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == summary(json.loads((root / "metrics/compare.json").read_text()))
