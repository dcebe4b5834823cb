"""Drift: PSI near 0 on the same distribution, above the threshold on a shifted one; a run is
stored and raises a WARNING event."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from appliance import cli
from appliance.feed.simulate import Labelled
from appliance.learning.drift import psi, reference_bins

from .support import make_transactions, query
from .test_retrain import stored_node


def test_psi_is_near_zero_on_the_same_distribution_and_large_on_a_shifted_one() -> None:
    rng = np.random.default_rng(2)
    reference = reference_bins(rng.lognormal(3, 1, 20000))
    assert psi(reference, rng.lognormal(3, 1, 20000)) < 0.01
    assert psi(reference, rng.lognormal(3.6, 1, 20000)) > 0.2
    counts = reference_bins(rng.integers(0, 3, 5000).astype(float))  # ties merge the bins
    assert len(counts["shares"]) == len(counts["edges"]) + 1
    assert psi(counts, rng.integers(0, 3, 5000).astype(float)) < 0.01


def test_drift_run_stores_the_report_and_warns_on_a_shift(tmp_path: Path) -> None:
    items = make_transactions(6000, seed=9)
    shifted = [Labelled(i.tx.__class__(**{**{f: getattr(i.tx, f) for f in i.tx.__struct_fields__},
                                          "amount": round(i.tx.amount * 8, 2)}),
                        i.fraud, i.typology) if n >= 4500 else i
               for n, i in enumerate(items)]
    settings = stored_node(tmp_path, shifted)
    window_days = (shifted[-1].tx.timestamp - shifted[4500].tx.timestamp).total_seconds() / 86400
    result = CliRunner().invoke(cli.cli, ["drift", "run", "--data-dir", str(settings.data_dir),
                                          "--days", f"{window_days * 0.98:.6f}"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["psi"]["amount"] > 0.2 and "amount" in report["drifted"]
    assert '"drift.detected"' in result.stderr and '"name":"amount"' in result.stderr
    stored = dict(query(settings.db_path, "SELECT name, psi FROM drift_reports"))
    assert abs(stored["amount"] - report["psi"]["amount"]) < 1e-4
    assert "risk" in stored
