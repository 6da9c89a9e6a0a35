"""No result is typed twice: the README's results block is what figures/paper/tables give, and the rest
of the README quotes no measured number."""
import re
from pathlib import Path

import sys

from labtools.readme import current_section, results_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import summary  # noqa: E402


def test_readme_results_block_matches_the_tables(monkeypatch):
    monkeypatch.chdir(ROOT)
    text = (ROOT / "README.md").read_text()
    block = current_section(text)
    assert block is not None, "README.md lost its generated results block"
    assert block == results_section("figures/paper"), (
        "README's results block differs from figures/paper/tables: run "
        "`labtools report --profile paper --readme README.md`")


def test_readme_quotes_no_measured_number_by_hand():
    text = (ROOT / "README.md").read_text()
    outside = text.replace(current_section(text) or "", "").replace(summary.current(text) or "", "")
    hand = re.findall(r"\d+(?:\.\d+)?\s?%|±\s?\d|\d+\.\d+\s?(?:s|img/s|MB)\b", outside)
    assert not hand, f"README quotes measured-looking numbers outside the generated block: {hand}"


def test_readme_bench_block_matches_the_bench_json():
    block = summary.current((ROOT / "README.md").read_text())
    assert block is not None, "README.md lost its generated bench block"
    assert block == summary.section(ROOT), "README's bench block differs from bench/results: run `python -m bench`"
