"""The paper's published numbers, typed once from its text, used only as the reference overlay.

Source: the paper's text (shared/paper/squeezenet-edge-mpi-paper.txt), Table 1 (batch sweep on one RPi 4B,
2 ranks/node) and Table 2 (strong scaling, 2 ranks per RPi). Values are as printed (percent
columns in percent, times in seconds); nothing here is derived from our runs, and nothing we
report is derived from here.
"""
from __future__ import annotations

PAPER_LABEL = "paper (RPi 4 cluster)"

TABLE1_COLUMNS = ["batch_per_node", "batch_per_rank", "avg_epoch_s", "mean_step_s", "global_img_per_s",
                  "peak_rss_mb", "cpu_pct"]
TABLE1 = [
    dict(zip(TABLE1_COLUMNS, row)) for row in [
        (8, 4, 91.63, 0.458, 17.46, 638.1, 108.2),
        (16, 8, 166.14, 0.831, 19.26, 637.7, 107.8),
        (24, 12, 241.01, 1.205, 19.92, 637.6, 107.5),
        (32, 16, 344.52, 1.723, 18.58, 655.7, 111.2),
    ]
]

TABLE2_COLUMNS = ["rpis", "np", "epochs", "test_acc_pct", "test_loss", "mean_train_loss", "mean_train_acc_pct",
                  "wall_s", "speedup", "efficiency_pct"]
TABLE2 = [
    dict(zip(TABLE2_COLUMNS, row)) for row in [
        (1, 2, 10, 61.61, 1.0779, 1.1403, 58.74, 5003.00, 1.0, 100.0),  # the baseline
        (2, 4, 10, 46.60, 1.4356, 1.5139, 43.45, 2535.56, 1.97313414, 98.66),
        (4, 8, 10, 35.61, 1.7313, 1.7995, 32.06, 2455.94, 2.037101884, 50.93),
        (8, 16, 10, 10.00, 2.3026, 2.3026, 10.01, 1156.48, 4.326058384, 54.08),
        (12, 24, 10, 10.00, 2.3026, 2.3026, 10.05, 851.04, 5.878689603, 48.99),
        (16, 32, 10, 10.00, 2.3026, 2.3026, 10.00, 699.52, 7.152047118, 44.70),
        (20, 40, 10, 10.00, 2.3026, 2.3026, 10.16, 627.32, 7.975196072, 39.88),
        (24, 48, 10, 10.00, 2.3026, 2.3026, 10.10, 432.11, 11.5780704, 48.24),
    ]
]


def table1():
    """Paper Table 1 as a DataFrame (a fresh copy: callers may modify it)."""
    import pandas as pd

    return pd.DataFrame(TABLE1, columns=TABLE1_COLUMNS)


def table2():
    """Paper Table 2 as a DataFrame (a fresh copy: callers may modify it)."""
    import pandas as pd

    return pd.DataFrame(TABLE2, columns=TABLE2_COLUMNS)
