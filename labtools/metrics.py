"""Strong-scaling arithmetic and repeat aggregation, kept separate so tests can check it on the paper's numbers."""
from __future__ import annotations

import math

LN10 = math.log(10.0)
COLLAPSE_TOL = 1e-3  # the paper's collapsed state: loss within this of ln 10 (the uniform prediction)
CHANCE_ACC = 0.11  # at most one point above the 10 % of guessing


def is_collapsed(loss) -> bool:
    """Exact collapse, the paper's criterion: the loss sits at ln 10, |loss - ln 10| < 1e-3."""
    return bool(abs(float(loss) - LN10) < COLLAPSE_TOL)


def is_at_chance(acc, loss=None) -> bool:
    """At chance: exactly collapsed, or accuracy <= 11 % (within one point of guessing). A superset of
    is_collapsed: a run can guess (10.1 %) with a loss that is not exactly ln 10.

    Dead conv10 channels are a diagnostic, not part of this test: they are counted on 256 training
    images (and, without the final ReLU, say nothing about the logits), so a run with every channel
    dead there can still score well above chance on the test set (issue 25: 19.9 % labelled at chance)."""
    return bool((loss is not None and is_collapsed(loss)) or float(acc) <= CHANCE_ACC)


def speedup(t_base, t):
    """S = T_base / T (the paper's S_n, relative to its np = 2 baseline)."""
    return t_base / t


def efficiency(speedup, np, np_base):
    """E in percent: speedup over the ideal speedup np / np_base (the paper's E_n)."""
    return speedup / (np / np_base) * 100.0


def aggregate(df, by, cols):
    """Per group of `by`: <col>_mean, <col>_std and n_runs.

    std uses ddof=1 (sample std over repeats), so a single repeat gives NaN rather than a
    misleading 0: one run says nothing about run-to-run spread.
    """
    import pandas as pd

    by = [by] if isinstance(by, str) else list(by)
    g = df.groupby(by, sort=True)
    out = pd.concat([g[cols].mean().add_suffix("_mean"), g[cols].std(ddof=1).add_suffix("_std")], axis=1)
    out = out[[f"{c}_{s}" for c in cols for s in ("mean", "std")]]  # mean and std side by side
    out["n_runs"] = g.size()
    return out.reset_index()


def add_scaling(df, time_col, np_col, base_np=2, base_rows=None):
    """Copy of df with speedup, efficiency_pct and base_np columns.

    The base time is the mean of `time_col` over the rows at the base np (a mean, so raw per-run
    rows work too). If no row has base_np, the smallest np present is the base and base_np says so:
    a silently different baseline would change every number. `base_rows` (boolean Series) limits
    which rows may serve as the base, e.g. only real cluster timings.
    """
    out = df.copy()
    cand = out if base_rows is None else out[base_rows]
    if cand.empty:
        raise ValueError("add_scaling: no rows eligible as the baseline")
    nb = base_np if (cand[np_col] == base_np).any() else cand[np_col].min()
    t_base = cand.loc[cand[np_col] == nb, time_col].mean()
    out["speedup"] = speedup(t_base, out[time_col])
    out["efficiency_pct"] = efficiency(out["speedup"], out[np_col], nb)
    out["base_np"] = nb
    return out
