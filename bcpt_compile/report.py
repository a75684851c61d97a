"""What the passes did to a graph: rewritten sites and refused near-misses."""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch.fx

from .options import FAMILIES


#: Libraries a model calls *through*: a frame inside them is not the line to show.
_LIBRARY_DIRS = ("/einops/", "/torch/")


def user_source_line(node: torch.fx.Node) -> str:
    """The last user frame of the node's stack trace, as ``file:line  code``: the last one
    outside einops and torch (an ``einsum`` spelled through einops points at the model's
    line, not einops'), or the last one at all."""
    trace = node.meta.get("stack_trace") or ""
    lines = [l.strip() for l in trace.strip().splitlines() if l.strip()]
    # stack traces alternate 'File "...", line N, in fn' / 'code'
    frames = []
    for i, line in enumerate(lines):
        if line.startswith("File "):
            loc = line.split(",")
            full = loc[0][len('File "') : -1]
            lineno = loc[1].strip().replace("line ", "") if len(loc) > 1 else "?"
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            frames.append((full, lineno, code))
    if not frames:
        return f"<graph node {node.name}>"
    user = [f for f in frames if not any(d in f[0] for d in _LIBRARY_DIRS)]
    full, lineno, code = (user or frames)[-1]
    return f"{full.rsplit('/', 1)[-1]}:{lineno}  {code}".strip()


def describe_tensor(node: torch.fx.Node) -> str:
    val = node.meta.get("example_value", node.meta.get("val"))
    if val is None or not hasattr(val, "shape"):
        return "?"
    dtype = str(val.dtype).replace("torch.", "")
    return f"{dtype}[{','.join(str(s) for s in val.shape)}]"


@dataclasses.dataclass
class Site:
    family: str
    source: str
    op: str
    shapes: str

    def __str__(self) -> str:
        return f"{self.family:<10} {self.op:<28} {self.shapes:<48} {self.source}"


@dataclasses.dataclass
class Miss:
    family: str
    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.family:<10} {self.reason:<60} {self.source}"


@dataclasses.dataclass
class Report:
    sites: list[Site] = dataclasses.field(default_factory=list)
    misses: list[Miss] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    graphs: int = 0

    @property
    def counts(self) -> dict[str, int]:
        counts = {f: 0 for f in FAMILIES}
        for s in self.sites:
            counts[s.family] += 1
        return counts

    def extend(self, other: "Report") -> None:
        self.sites += other.sites
        self.misses += other.misses
        self.failures += other.failures
        self.graphs += other.graphs

    def add_site(self, family: str, anchor: torch.fx.Node, op: str, inputs: Iterable[torch.fx.Node]) -> None:
        shapes = " ".join(describe_tensor(n) for n in inputs if isinstance(n, torch.fx.Node))
        self.sites.append(Site(family, user_source_line(anchor), op, shapes))

    def add_miss(self, family: str, anchor: torch.fx.Node, reason: str) -> None:
        self.misses.append(Miss(family, user_source_line(anchor), reason))

    def __str__(self) -> str:
        out = [f"bcpt explain: {self.graphs} graph(s)"]
        out.append("rewritten sites: " + ", ".join(f"{k}={v}" for k, v in self.counts.items()))
        if self.sites:
            out.append(f"  {'family':<10} {'op':<28} {'inputs':<48} source")
            out += [f"  {s}" for s in self.sites]
        out.append(f"near-misses: {len(self.misses)}")
        if self.misses:
            out.append(f"  {'family':<10} {'reason':<60} source")
            out += [f"  {m}" for m in self.misses]
        if self.failures:
            out.append(f"pass failures (graph compiled unmodified): {len(self.failures)}")
            out += [f"  {f}" for f in self.failures]
        return "\n".join(out)

    __repr__ = __str__
