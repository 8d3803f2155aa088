"""Figures quoted in a document's prose, checked against the files in results/.

A Quote is a phrase of the prose with `{}` where each figure sits, and a function of the results
folder that gives those figures as the prose writes them; a Quote without one marks a setting or a
published figure, which no file of ours holds. `check` finds every quote (line breaks may fall
anywhere a space is), compares its figures with the files, and lists each figure of the prose (a
decimal, a count with thousands separators, a percentage, steps, ops, points or a time) that sits in
no generated table and no quote, so that no figure goes unchecked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

NUMBER = r"[-−+]?\d[\d,]*(?:\.\d+)?"
UNITS = r"steps|ops|points|min|minutes|s|seconds|ms"
FIGURE = re.compile(rf"""(?<![\w.=/§-])(?:
    [-−+]?\d+\.\d+(?![\d.]*\.\d)x?                 # 0.740, −0.033, 1.27x (not a version such as 2.13.0)
  | \d{{1,3}}(?:,\d{{3}})+                          # 2,143
  | \d+(?:\.\d+)?%                                 # 14%
  | \d+\s(?:{UNITS})\b                             # 50 steps, 4 min, 38 s
)""", re.X)
# A flag's value (`--caption-dropout 0.2`) is a setting, spelled where the flag is.
FLAG_VALUE = re.compile(r"--[\w-]+(?:\s+|=)[\d.,:]+")
BLOCK = re.compile(r"<!-- table:[\w-]+ -->\n.*?<!-- end table -->", re.S)


@dataclass(frozen=True)
class Quote:
    phrase: str
    figures: Callable[[Path], tuple[str, ...]] | None = None

    def pattern(self) -> re.Pattern:
        parts = [r"\s+".join(map(re.escape, re.split(r"\s+", p))) for p in self.phrase.split("{}")]
        return re.compile(rf"(?<![\d.])({NUMBER})(?![.,]?\d)".join(parts))  # a whole number, never part of one


def _line(text: str, at: int) -> int:
    return text.count("\n", 0, at) + 1


def check(doc: str, text: str, quotes: list[Quote], results: Path) -> tuple[list[str], str]:
    """Problems of one document's prose, and its text with every quoted figure set to what the files
    give (so `python -m lab.report` mends a stale figure, `--check` reports it)."""
    problems, covered, edits = [], [m.span() for m in BLOCK.finditer(text)], []
    covered += [m.span() for m in FLAG_VALUE.finditer(text)]
    for q in quotes:
        found = list(q.pattern().finditer(text))
        if not found:
            problems.append(f"{doc}: the quote {q.phrase!r} is not in the text")
        want = q.figures(results) if q.figures and found else None
        for m in found:
            covered.append(m.span())
            if want is None:
                continue
            if len(want) != len(m.groups()):
                raise ValueError(f"{q.phrase!r}: {len(m.groups())} figures, {len(want)} computed")
            for i, (got, value) in enumerate(zip(m.groups(), want), 1):
                if got != value:
                    problems.append(f"{doc}:{_line(text, m.start(i))}: {got} where the files give {value} "
                                    f"(in {q.phrase!r})")
                    edits.append((m.start(i), m.end(i), value))
    for m in FIGURE.finditer(text):
        if not any(a <= m.start() and m.end() <= b for a, b in covered):
            problems.append(f"{doc}:{_line(text, m.start())}: {m.group()!r} is in no generated table and "
                            "no quote of lab/report_figures.py")
    for a, b, value in sorted(edits, reverse=True):
        text = text[:a] + value + text[b:]
    return problems, text
