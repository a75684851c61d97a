"""Options accepted through ``torch.compile(..., backend="bcpt", options={...})``."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

FAMILIES = ("sbl", "deepembed", "attention", "prefetch")
INNER_COMPILERS = ("inductor", "aot_eager", "eager")
DEEPEMBED_TABLES = ("gpu", "cpu")
#: ``deepembed_tables`` inside a higher-order op's body (a checkpointed region) when the user
#: chose "cpu": tables are used where they live, no prefetch (a recompute would gather twice).
BODY_HOST_TABLES = "cpu-no-prefetch"


@dataclasses.dataclass(frozen=True)
class BcptOptions:
    #: BCAT tile edge (rows and columns of R per block). 128 fills an H100's tensor cores;
    #: tests on the Triton interpreter use 16.
    block_size: int = 128
    #: Active-tile fraction from which the SBL kernels run as dense GEMMs (wide tiles, no
    #: block list) instead of walking the active blocks; decided on the device, no host
    #: sync. 0.7: where the two paths meet on the H200 (benchmarks/crossover_sbl.py).
    density_crossover: float = 0.7
    #: Families to rewrite; the others are left to the inner compiler.
    families: tuple[str, ...] = FAMILIES
    #: Raise instead of logging a warning and compiling the graph unmodified.
    strict: bool = False
    #: What compiles the rewritten graph: "inductor", "aot_eager" or "eager" (debugging).
    inner_compiler: str = "inductor"
    #: Reorder rows (tokens) by their active column tiles before tiling (BCAT defragmentation).
    sbl_reorder: bool = False
    #: Extra options handed to Inductor (``torch.compile``'s own ``options``).
    inductor_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: Where DeepEmbed tables live: "gpu" (with the compute) or "cpu" (host memory, rows
    #: prefetched on a copy stream; see bcpt_compile.runtime.offload_tables).
    deepembed_tables: str = "gpu"

    @classmethod
    def from_user(cls, options: Mapping[str, Any] | None, mode: str | None = None) -> "BcptOptions":
        options = dict(options or {})
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(
                f"bcpt: unknown option(s) {unknown}; valid options are {sorted(valid)}"
            )
        if "families" in options:
            fams = options["families"]
            fams = (fams,) if isinstance(fams, str) else tuple(fams)
            bad = [f for f in fams if f not in FAMILIES]
            if bad:
                raise ValueError(f"bcpt: unknown families {bad}; valid families are {list(FAMILIES)}")
            options["families"] = fams
        opts = cls(**options)
        if opts.inner_compiler not in INNER_COMPILERS:
            raise ValueError(
                f"bcpt: inner_compiler must be one of {list(INNER_COMPILERS)}, got {opts.inner_compiler!r}"
            )
        if not (isinstance(opts.block_size, int) and opts.block_size >= 16 and opts.block_size & (opts.block_size - 1) == 0):
            raise ValueError(f"bcpt: block_size must be a power of two >= 16, got {opts.block_size!r}")
        if opts.deepembed_tables not in DEEPEMBED_TABLES:
            raise ValueError(
                f"bcpt: deepembed_tables must be one of {list(DEEPEMBED_TABLES)}, got {opts.deepembed_tables!r}"
            )
        if not 0.0 <= float(opts.density_crossover) <= 1.0:
            raise ValueError(f"bcpt: density_crossover must lie in [0, 1], got {opts.density_crossover!r}")
        if mode not in (None, "default") and opts.inner_compiler == "inductor":
            import torch._inductor

            merged = dict(torch._inductor.list_mode_options(mode))
            merged.update(opts.inductor_options)
            opts = dataclasses.replace(opts, inductor_options=merged)
        return opts

    def enabled(self, family: str) -> bool:
        return family in self.families
