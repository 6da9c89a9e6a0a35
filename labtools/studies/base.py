"""What every study is: parameters per profile, a plan, tables, figures and a generated interpretation.

A study is the code behind one notebook. It is usable without papermill (tests call it directly);
its notebook calls ``collect``, ``tables``, ``figures``, ``interpret`` and ``save`` in that order.
"""
from __future__ import annotations

from typing import ClassVar

from ..notebook import Context


class Study:
    notebook: ClassVar[str]  # the notebook this study is the code of (see labtools.studies.NOTEBOOKS)
    title: ClassVar[str]
    PARAMS: ClassVar[dict[str, dict]]  # profile -> parameters
    # Output name -> the parts of the study (ensure's descriptions) it is made from; others: all parts.
    # A gap in one part marks only the outputs made from it as partial.
    PARTS: ClassVar[dict[str, tuple]] = {}

    def __init__(self, profile: str = "quick", out_dir=None, results_root=None, runner: str = "pool",
                 run_missing: bool = True, cifar_dir=None, retime: bool = False, write_store: bool = False,
                 **overrides):
        if profile not in self.PARAMS:
            raise ValueError(f"unknown profile {profile!r} for {self.notebook}; choose one of {', '.join(self.PARAMS)}")
        self.ctx = Context(profile, self.notebook, out_dir, results_root, runner, run_missing,
                           params={**self.PARAMS[profile], **overrides}, cifar_dir=cifar_dir, retime=retime,
                           write_store=write_store)
        self.profile = profile
        self.p = self.ctx.params

    # -------------------------------------------------------------- the four steps
    def plan(self) -> list:
        raise NotImplementedError

    def planned(self) -> list:
        """Every run the study may need (for a progress estimate before it starts): plan() by default."""
        return self.plan()

    def collect(self):
        """Run what the store lacks (unless run_missing=False) and return the planned runs' records."""
        return self.ctx.ensure(self.plan(), self.notebook)

    def tables(self, runs) -> dict:
        return {}

    def figures(self, runs, tables: dict) -> dict:
        return {}

    def interpret(self, runs, tables: dict) -> str:
        return ""

    def parts_of(self, name: str):
        return self.PARTS.get(name)

    # -------------------------------------------------------------- writing
    def save(self, tables: dict, figures: dict) -> list:
        paths = []
        for name, t in tables.items():
            paths += self.ctx.save_table(t, name, parts=self.parts_of(name))
        for name, fig in figures.items():
            paths += self.ctx.save_figure(fig, name, parts=self.parts_of(name))
        return paths

    def publish(self, tables: dict, figures: dict) -> list:
        """Save every table and figure (with provenance) and show them: tables as tables, figures inline."""
        from IPython.display import Image, Markdown, display

        from ..tables import display_frame

        paths = self.save(tables, figures)
        for name, t in tables.items():
            display(Markdown(f"**{name}** (`{self.ctx.out_dir.name}/tables/{name}.csv`)"))
            display(display_frame(t))
            for note in t.attrs.get("notes", []):
                display(Markdown(f"<small>{note}</small>"))
        for name in figures:
            display(Image(filename=str(self.ctx.out_dir / "figures" / f"{name}.png"), width=720))
        return paths

    def config(self, experiment: str, **kw):
        return self.ctx.base_config(experiment, **kw)
