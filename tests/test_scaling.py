"""Scaling-law fits recover known exponents from synthetic sweeps and land inside Epoch AI's
intervals on Chinchilla's published runs."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaleyard.platform.scaling import Runs, compute_optimal, fit_chinchilla, fit_isoflop, fit_power_law

from conftest import REPO, scaleyard

CHINCHILLA = REPO / "tests" / "data" / "chinchilla_runs.csv"
TRUE = {"E": 1.7, "A": 400.0, "B": 1500.0, "alpha": 0.34, "beta": 0.30}


def synthetic_sweep(noise: float = 0.002, seed: int = 0) -> Runs:
    """An IsoFLOP ladder generated from L(N, D) with known parameters, with log-normal noise."""
    rng = np.random.default_rng(seed)
    params, tokens, compute, loss = [], [], [], []
    for c in np.geomspace(1e18, 1e21, 7):
        optimum = compute_optimal(TRUE, c)["params"]
        for n in optimum * np.geomspace(0.1, 10, 9):
            d = c / (6 * n)
            value = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
            params.append(n), tokens.append(d), compute.append(c)
            loss.append(value * np.exp(rng.normal(0, noise)))
    return Runs(params, tokens, compute, loss)


@pytest.mark.slow  # CI budget: the fit on Chinchilla's runs stays in the default tier
def test_parametric_fit_recovers_known_parameters():
    fit = fit_chinchilla(synthetic_sweep(), bootstrap=20)
    for key in ("E", "alpha", "beta"):
        assert fit.values[key] == pytest.approx(TRUE[key], rel=0.05), key
        low, high = fit.intervals[key]
        assert low <= fit.values[key] <= high


def test_isoflop_exponent_matches_the_closed_form():
    fit, optima = fit_isoflop(synthetic_sweep(noise=0.0))
    expected = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # N* grows as C^(beta/(alpha+beta))
    assert fit.values["a"] == pytest.approx(expected, abs=0.02)
    assert len(optima) == 7


def test_power_law_recovers_its_exponent():
    rng = np.random.default_rng(1)
    compute = np.geomspace(1e15, 1e20, 12)
    loss = (2.0 + 50.0 * compute**-0.12) * np.exp(rng.normal(0, 0.001, 12))
    fit = fit_power_law(Runs(np.ones(12), compute / 6, compute, loss), bootstrap=30)
    assert fit.values["alpha"] == pytest.approx(0.12, abs=0.01)
    assert fit.values["E"] == pytest.approx(2.0, abs=0.05)


def test_chinchilla_data_lands_inside_epochs_intervals():
    frame = pd.read_csv(CHINCHILLA).sort_values("loss").iloc[:-5]  # Epoch leaves out the 5 worst runs
    params, flops = frame["Model Size"].to_numpy(), frame["Training FLOP"].to_numpy()
    fit = fit_chinchilla(Runs(params, flops / (6 * params), flops, frame["loss"].to_numpy()))
    assert 1.769 <= fit.values["E"] <= 1.871
    assert 0.317 <= fit.values["alpha"] <= 0.373
    assert 0.331 <= fit.values["beta"] <= 0.415
    assert fit.values["A"] == pytest.approx(477.8, rel=0.02) and fit.values["B"] == pytest.approx(2143.9, rel=0.02)


def test_cli_writes_plots_table_and_json(tmp_path):
    runs = synthetic_sweep()
    csv = tmp_path / "runs.csv"
    pd.DataFrame({"params": runs.params, "tokens": runs.tokens, "compute": runs.compute,
                  "loss": runs.loss}).to_csv(csv, index=False)
    done = scaleyard("scaling", str(csv), "--out", str(tmp_path / "report"), "--bootstrap", "10")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report" / "scaling.json").read_text())
    assert report["chinchilla"]["values"]["alpha"] == pytest.approx(TRUE["alpha"], rel=0.05)
    assert "| alpha |" in (tmp_path / "report" / "scaling.md").read_text()
    png = Path(tmp_path / "report" / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    empty = scaleyard("scaling", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2"))
    assert empty.returncode == 2 and "no finished runs" in empty.stderr
