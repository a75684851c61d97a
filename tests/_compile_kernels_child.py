"""Child process of test_kernels_compile.py: compile each kernel for sm_90 (no interpreter)."""

import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bcpt_compile.kernels import bcat_cluster as bc
from bcpt_compile.kernels import sbl_block_gemm as bg

FLOAT_POINTERS = {"x_ptr", "w_ptr", "b_ptr", "s_ptr", "y_ptr", "z_ptr", "dy_ptr", "g_ptr", "ds_ptr", "dx_ptr", "dw_ptr",
                  "db_ptr"}
BOOL_POINTERS = {"m_ptr"}


def _signature(kernel, constexprs, float_ptr):
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = float_ptr if name in FLOAT_POINTERS else "*i1" if name in BOOL_POINTERS else "*i32"
        else:
            sig[name] = "fp32" if name == "threshold" else "i32"
    return sig


TILE = dict(BM=128, BN=128, PRECISION="tf32")
NO_PERMS = dict(HAS_PERM=False, HAS_COL_PERM=False, perm_ptr=None, col_perm_ptr=None)
# unused pointers are None (constexpr), as the launchers pass them
CASES = [
    (bc._column_keys_kernel, dict(HAS_MASK=False, ROWS=32, BN=128)),
    (bc._row_tile_bits_kernel, dict(HAS_MASK=True, HAS_COL_PERM=True, ROWS=32, BN=128)),
    (bc._row_tile_bits_kernel, dict(HAS_MASK=False, HAS_COL_PERM=False, inv_col_ptr=None, ROWS=32, BN=128)),
    (bc._tile_bits_kernel, dict(HAS_MASK=False, ZERO_FILL=True, LIST=True, BM=128, BN=128, CHUNK=32, GROUP_M=8,
                                **NO_PERMS)),
    (bc._tile_bits_kernel, dict(HAS_MASK=True, HAS_PERM=True, HAS_COL_PERM=True, ZERO_FILL=False, y_ptr=None,
                                LIST=False, list_ptr=None, BM=128, BN=128, CHUNK=32, GROUP_M=8)),
    (bc._tile_bits_from_rows_kernel, dict(BM=128, WORDS=2)),
    (bc._compact_kernel, dict(TILES=64)),
    (bg._sddmm_forward_kernel, dict(TILE, BK=64, HAS_BIAS=True, HAS_MASK=False, HAS_PERM=True, HAS_COL_PERM=True,
                                    SAVE_Z=True, PROGRAMS=264, EVEN_K=False)),
    (bg._sddmm_forward_kernel, dict(TILE, BK=128, HAS_BIAS=False, b_ptr=None, HAS_MASK=True, SAVE_Z=False, z_ptr=None,
                                    PROGRAMS=264, EVEN_K=True, **NO_PERMS)),
    (bg._sddmm_backward_kernel, dict(TILE, BK=64, HAS_BIAS=True, HAS_MASK=True, NEED_DS=True, HAS_Z=True,
                                     GROUP_M=8, CHUNK=32, TILES=64, EVEN_K=True, **NO_PERMS)),
    (bg._sddmm_backward_kernel, dict(TILE, BK=64, HAS_BIAS=False, b_ptr=None, HAS_MASK=False, HAS_PERM=True,
                                     HAS_COL_PERM=True, NEED_DS=True, HAS_Z=False, z_ptr=None, GROUP_M=8, CHUNK=32,
                                     TILES=64, EVEN_K=False)),
    (bg._sddmm_backward_kernel, dict(TILE, BK=128, HAS_BIAS=True, HAS_MASK=False, NEED_DS=False, ds_ptr=None,
                                     HAS_Z=False, z_ptr=None, GROUP_M=8, CHUNK=32, TILES=64, EVEN_K=True, **NO_PERMS)),
    (bg._dense_forward_kernel, dict(TILE, BK=64, HAS_BIAS=True, HAS_MASK=False, HAS_PERM=True, HAS_COL_PERM=True,
                                    SAVE_Z=True, PROGRAMS=132, INT64=True, SPAN=2, GROUP_M=8, EVEN_K=False,
                                    TMA=False)),
    (bg._dense_forward_kernel, dict(TILE, BK=64, HAS_BIAS=False, b_ptr=None, HAS_MASK=True, SAVE_Z=False,
                                    z_ptr=None, PROGRAMS=132, INT64=False, SPAN=2, GROUP_M=8, EVEN_K=True,
                                    TMA=False, **NO_PERMS)),
    (bg._dense_forward_kernel, dict(TILE, BK=64, HAS_BIAS=True, HAS_MASK=False, SAVE_Z=True, PROGRAMS=132,
                                    INT64=False, SPAN=2, GROUP_M=8, EVEN_K=False, TMA=True, **NO_PERMS)),
    (bg._dx_kernel, dict(TILE, BK=128, BC=64, HAS_PERM=True, HAS_COL_PERM=True, EVEN=False, TMA=False)),
    (bg._dx_kernel, dict(TILE, BK=256, BC=64, EVEN=True, TMA=False, **NO_PERMS)),
    (bg._dx_kernel, dict(TILE, BK=256, BC=64, EVEN=False, TMA=True, **NO_PERMS)),  # CUDA_CONFIGS["dx"]
    (bg._dw_kernel, dict(TILE, BK=128, BC=64, HAS_PERM=True, HAS_COL_PERM=False, col_perm_ptr=None, NEED_DB=True,
                         EVEN=False, TMA=False)),
    (bg._dw_kernel, dict(TILE, BK=256, BC=64, NEED_DB=False, db_ptr=None, EVEN=True, TMA=False, **NO_PERMS)),
    (bg._dw_kernel, dict(TILE, BK=256, BC=64, NEED_DB=True, EVEN=False, TMA=True, **NO_PERMS)),  # CUDA_CONFIGS["dw"]
    (bg._dw_kernel, dict(TILE, BK=256, BC=64, NEED_DB=False, db_ptr=None, EVEN=True, TMA=True, **NO_PERMS)),
]


def compile_for_hopper(kernel, constexprs, float_ptr):
    if float_ptr == "*fp32" and "PRECISION" in constexprs:
        constexprs = dict(constexprs, PRECISION="ieee")
    src = ASTSource(fn=kernel, signature=_signature(kernel, constexprs, float_ptr), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
    assert compiled.asm["cubin"]


if __name__ == "__main__":
    failures = []
    for kernel, constexprs in CASES:
        for float_ptr in ("*bf16", "*fp32"):
            try:
                compile_for_hopper(kernel, constexprs, float_ptr)
            except Exception as exc:  # report them all
                failures.append(f"{kernel.fn.__name__} {float_ptr}: {type(exc).__name__}: {exc}")
    print("\n".join(failures) or f"compiled {2 * len(CASES)} kernels")
    sys.exit(1 if failures else 0)
