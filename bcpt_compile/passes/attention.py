"""Sparse causal attention: DynNSA block-masked dense attention and sliding-window attention.

Matched on the Dynamo graph, in two shapes:

* explicit: ``softmax(mask(scale * q k^T)) @ v`` (``@``/``matmul``/``einsum``; the mask applied
  by ``masked_fill`` (also in place), ``torch.where`` or additive ``-inf`` biases (``where``,
  ``log`` of a 0/1 mask, ``full(-inf).triu(1)``, sums of those), possibly in several steps);
* ``F.scaled_dot_product_attention(q, k, v, attn_mask=M)`` (bool or additive float M).

The explicit products may be in any layout (einsums on (B, T, H, D), grouped GQA views, ellipses,
3-D ``bmm``/``baddbmm`` on (B*H, T, D)): they are read as einsum letters and q, k, v are
permuted/reshaped to the ops' (B, H, T, D), the output back (see "layouts" below).

The mask is read as a conjunction of terms, each understood semantically rather than by
spelling: diagonal bounds ``lo <= j - i <= hi`` (from ``tril``/``triu`` of ones, or
comparisons of ``arange`` grids, negated or not), and at most one block-level mask
expanded by S in both trailing dims (``repeat_interleave`` twice, ``kron`` with a ones
block, or ``expand`` + ``reshape``) or a per-token one expanded along the keys only
(query block 1). Constants written in place are not read by the algebra; a mask that depends
on no graph input is evaluated instead and must be a band or whole S x S blocks (optionally
causal), whose layout is then sliced from the mask. Then:

* block term (+ optional causal bound ``hi = 0``) -> ``bcpt.nsa_selected_attention``; the
  kernel's index table is the top-k that ``scatter``-ed the block mask when the graph shows
  it, otherwise the block mask is turned into indices on the device (sort, no sync);
* ``hi = 0`` and ``lo = 1 - w`` -> ``bcpt.sliding_window_attention`` with window w;
* plain causal (or no) mask: not ours, left to SDPA / Inductor, and not reported.

Windowed layouts (local-attention's ``LocalAttention``, also inside native-sparse-attention's
``SparseAttention``): q cut into windows, keys gathered per window, constant masks. The
gathers and masks are evaluated at compile time on position probes (see "windowed
layouts" below) and the resulting visibility must be a causal sliding window or a
block-local band of whole key blocks, causal or looking ahead (-> selected attention with a
static table).

Gathered layouts (native-sparse-attention's fine branch): every query token gathers its
top-k key blocks (``gather`` by the top-k indices), under causality plus its own block
under a tril, with a per-entry validity mask. The gathers are evaluated on probes that
keep the top-k entry each slot reads (see "gathered layouts" below) and must be exactly
per-token selected attention with the top-k as its table (-> ``query_block = 1``, the own
block as the op's ``own_block`` step).

Anything that is attention with a mask term we cannot prove is reported as a near-miss.
Mask constants that arrive as graph inputs (a registered causal buffer) cannot be read at
compile time, so they are near-misses too.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Any, Optional, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_bool, statically_known_true

from ..lowering.attention import block_mask_to_indices, local_block_table, topk_to_indices
from ..options import BcptOptions
from ..report import Report
from .canonical import (Node, add_operands, arg, erase_unused, example_value, is_function,
                        is_method, mul_operands, writes_in_place)

FAMILY = "attention"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: A fill at or below this counts as "masked out" (finite spellings such as -1e9, finfo.min).
BIG_NEGATIVE = -1e4

SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax)
MATMUL = (operator.matmul, torch.matmul, torch.Tensor.matmul)
EINSUM = (torch.einsum, torch.functional.einsum)
AND = (operator.and_, torch.logical_and, torch.bitwise_and, torch.Tensor.logical_and, torch.Tensor.bitwise_and)
OR = (operator.or_, torch.logical_or, torch.bitwise_or)
NOT = (operator.invert, torch.logical_not, torch.bitwise_not)
CMP = {operator.ge: "ge", operator.gt: "gt", operator.le: "le", operator.lt: "lt",
       torch.ge: "ge", torch.gt: "gt", torch.le: "le", torch.lt: "lt"}
ONES = (torch.ones, torch.ones_like)


class NotAMask(Exception):
    """A mask term we cannot prove to be a diagonal bound or an expanded block mask."""


_CMP_FNS = {"gt": torch.gt, "ge": torch.ge, "lt": torch.lt, "le": torch.le, "ne": torch.ne, "eq": torch.eq}


@dataclasses.dataclass
class BlockTerm:
    mask: Node          # block-level mask (..., NQ, NK); "visible" where it is nonzero (xor negate)
    size: int
    negate: bool = False
    compare: Optional[tuple[str, float]] = None  # visible where ``mask <op> value`` instead (importance threshold)
    query_block: Optional[int] = None  # query rows per mask row: None = size; 1 = a per-token selection


@dataclasses.dataclass
class Visible:
    """The set of visible (query i, key j): lo <= j - i <= hi, and inside ``block`` when set."""

    hi: Optional[int] = None
    lo: Optional[int] = None
    block: Optional[BlockTerm] = None

    def __and__(self, other: "Visible") -> "Visible":
        if self.block is not None and other.block is not None:
            raise NotAMask("two block masks are combined")
        pick = lambda a, b, f: b if a is None else a if b is None else f(a, b)  # noqa: E731
        return Visible(pick(self.hi, other.hi, min), pick(self.lo, other.lo, max), self.block or other.block)

    def complement(self) -> "Visible":
        """The complement, which is again of this form only for a single term."""
        terms = sum(x is not None for x in (self.hi, self.lo, self.block))
        if terms != 1:
            raise NotAMask("the complement of a conjunction (a union of masks) is not a band or a block mask")
        if self.hi is not None:
            return Visible(lo=self.hi + 1)
        if self.lo is not None:
            return Visible(hi=self.lo - 1)
        return Visible(block=dataclasses.replace(self.block, negate=not self.block.negate))


# ----------------------------------------------------------------------------- small helpers
#
# Under dynamic shapes example values have ``torch.SymInt`` sizes. Sizes are compared with
# ``_same`` (provably equal, installs no guard), never with ``==`` / ``int()``, which would guard
# on (and so specialise) the symbolic T or batch.


def _sym(x: Any) -> Any:
    """A size as an int or SymInt: a Python int, or a graph node holding one (``q.size(2)``), else None."""
    if isinstance(x, Node):
        x = x.meta.get("example_value", x.meta.get("val"))
    return x if isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool) else None


def _same(a: Any, b: Any) -> bool:
    """a == b for sizes (ints or SymInts), only when provable: no guard is installed."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return statically_known_true(a == b)
    return a == b


def _same_shape(a: Any, b: Any) -> bool:
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _same_as_required(a: Any, b: Any) -> bool:
    """a == b for two sizes that the replaced call itself requires to be equal (eager fails
    otherwise, e.g. SDPA's key length of k and v, which its meta function leaves as two symbols):
    the equality is guarded, which relates the symbols but specialises neither."""
    if _same(a, b):
        return True
    if not _symbolic(a, b):
        return False
    hints = [x.node.hint if isinstance(x, torch.SymInt) else x for x in (a, b)]
    return hints[0] is not None and hints[0] == hints[1] and guard_bool(a == b)


def _symbolic(*sizes: Any) -> bool:
    return any(isinstance(n, torch.SymInt) for n in sizes)


def _static_size(x: Any, what: str) -> int:
    """A size that the rewrite needs as a constant (block size, window): refuse a symbolic one."""
    if isinstance(x, Node) and isinstance(_sym(x), torch.SymInt) or isinstance(x, torch.SymInt):
        raise NotAMask(f"the {what} is a symbolic size (dynamic shapes): only a constant {what} is supported")
    return x


def _cast_to(graph: torch.fx.Graph, nodes: list, replaced: Node) -> list:
    """q, k, v cast to the dtype the replaced attention produced. Under torch.autocast the
    matmuls ran in the autocast dtype, but the custom ops are not autocast-aware."""
    want = example_value(replaced)
    out = []
    for n in nodes:
        val = example_value(n)
        if want is not None and val is not None and val.dtype != want.dtype:
            n = graph.call_method("to", (n, want.dtype))
        out.append(n)
    return out


def _carries_grad(node: Node, through: bool = False) -> bool:
    """Whether the node's result requires grad (its example value; False for sizes and numbers,
    True when unknown, so that an unknown path keeps the operand as it is). ``through``: whether a
    gradient also flows through it to its inputs: a computed value without a ``grad_fn`` does not
    (a view taken under ``torch.no_grad()`` still requires grad, as in eager, but is cut off)."""
    val = node.meta.get("example_value", node.meta.get("val"))
    if val is None:
        return True
    return any(isinstance(t, torch.Tensor) and t.requires_grad and (
        not through or t.grad_fn is not None or node.op in ("placeholder", "get_attr"))
        for t in torch.utils._pytree.tree_leaves(val))


def _grad_reaches(src: Node, dst: Node) -> bool:
    """Whether eager differentiates ``dst`` with respect to ``src``: some path of graph nodes from
    src to dst passes a gradient all along. Not so where eager reads src without a gradient (the
    scores, probabilities or window gathers computed under ``torch.no_grad()``, a ``.detach()``,
    ``dst`` itself under no_grad): the op, handed src, would differentiate it anyway."""
    if not isinstance(src, Node) or not _carries_grad(src):
        return False
    stack, seen = [dst], set()
    while stack:
        n = stack.pop()
        if n is src:
            return True
        if n in seen or not isinstance(n, Node) or not _carries_grad(n, through=True):
            continue
        seen.add(n)
        stack.extend(m for m in n.all_input_nodes if not m < src)  # nodes before src cannot lie on a path from it
    return False


def _grad_as_eager(graph: torch.fx.Graph, nodes: list, dst: Node) -> list:
    """The op's operands, each ``.detach()``-ed where eager computes ``dst`` (the value the op
    replaces) without a gradient to it, so that the op's backward differentiates only what eager does."""
    out = []
    for n in nodes:
        if isinstance(n, Node) and _carries_grad(n) and not _grad_reaches(n, dst):
            val = example_value(n)
            n = graph.call_method("detach", (n,))
            if val is not None:
                n.meta["example_value"] = val.detach()
        out.append(n)
    return out


def _name(node: Any) -> str:
    if not isinstance(node, Node):
        return repr(node)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def _number(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) else None


def _is_masked_value(x: Any) -> bool:
    """A fill at or below ``BIG_NEGATIVE``: a number, or a constant tensor of one
    (``torch.tensor(-inf)``, ``full_like(s, finfo.min)``, casts of those)."""
    val = _number(x)
    if val is not None:
        return val <= BIG_NEGATIVE
    while isinstance(x, Node) and (is_method(x, "to", "type_as", "float", "half", "bfloat16") or
                                   is_function(x, torch.Tensor.to)):
        x = x.args[0]
    if is_function(x, torch.tensor, torch.as_tensor, torch.scalar_tensor) or is_method(x, "new_tensor"):
        val = _number(x.args[1] if is_method(x, "new_tensor") else x.args[0]) if len(x.args) > int(
            is_method(x, "new_tensor")) else None
        return val is not None and val <= BIG_NEGATIVE
    if (is_function(x, torch.full, torch.full_like) or is_method(x, "new_full")) \
            and not any(_writes(u, x) for u in x.users):
        val = _number(_fill_value(x))
        return val is not None and val <= BIG_NEGATIVE
    return False


def _fill_value(node: Node) -> Any:
    """The fill of ``full(size, c)``, ``full_like(x, c)`` or ``x.new_full(size, c)``."""
    return arg(node, 2, "fill_value") if is_method(node, "new_full") else arg(node, 1, "fill_value")


def _ndim(node: Any) -> Optional[int]:
    val = example_value(node)
    return val.dim() if val is not None else None


def _dim(node: Node, d: Any) -> Optional[int]:
    nd = _ndim(node)
    return d % nd if isinstance(d, int) and nd else None


_BOOL_CASTS = ("bool", "float", "half", "bfloat16", "to", "type_as", "type", "int", "long")


def _strip_casts(node: Any) -> Any:
    """Follow dtype casts (of 0/1 or bool masks): truthiness is unchanged."""
    while isinstance(node, Node) and (is_method(node, *_BOOL_CASTS) or is_function(node, torch.Tensor.to)):
        node = node.args[0]
    return node


def _cmp_name(node: Any) -> Optional[str]:
    for name in _CMP_FNS:
        if is_method(node, name) or is_function(node, _CMP_FNS[name], getattr(operator, name)):
            return name
    return None


def _from_bool(node: Any, depth: int = 8) -> bool:
    """Whether node provably holds only 0 and 1: bools, ones, and tril/triu/expansions/crops of those."""
    node = _strip_casts(node)
    val = example_value(node)
    if val is not None and val.dtype == torch.bool:
        return True
    if depth == 0 or not isinstance(node, Node):
        return False
    if _is_all_ones(node):
        return True
    if (is_function(node, operator.mul, torch.mul) or is_method(node, "mul")) and len(node.args) == 2:
        return all(isinstance(a, Node) and _from_bool(a, depth - 1) for a in node.args)
    if is_function(node, operator.sub, torch.sub) and _number(node.args[0]) == 1.0:
        return _from_bool(node.args[1], depth - 1)
    if (is_method(node, "scatter") or is_function(node, torch.scatter)) and not node.kwargs.get("reduce"):
        src = arg(node, 3, "src", arg(node, 3, "value"))  # zeros.scatter(-1, idx, 1.0)
        return _from_bool(node.args[0], depth - 1) and (src is True or src is False or _number(src) in (0.0, 1.0)
                                                         or (isinstance(src, Node) and _from_bool(src, depth - 1)))
    if _is_zeros(node):
        return True
    if is_function(node, torch.tril, torch.triu, torch.kron, torch.repeat_interleave, operator.getitem) or is_method(
            node, "tril", "triu", "repeat_interleave", "expand", "expand_as", "broadcast_to", "reshape", "view",
            "unsqueeze"):
        return _from_bool(node.args[0], depth - 1) and (not is_function(node, torch.kron) or _is_all_ones(node.args[1]))
    return False


def _is_filled_with(node: Any, value: bool, written_ok: bool = False) -> bool:
    """A tensor of all ones (True) or all zeros (False): ones/zeros factories or ``full``,
    not written in place afterwards (unless ``written_ok``: the caller reads the writes)."""
    node = _strip_casts(node)
    if not written_ok and isinstance(node, Node) and any(_writes(u, node) for u in node.users):
        return False
    makers, method = (ONES, "new_ones") if value else ((torch.zeros, torch.zeros_like), "new_zeros")
    if is_function(node, *makers) or is_method(node, method):
        return True
    if is_function(node, torch.full, torch.full_like) or is_method(node, "new_full"):
        fill = _fill_value(node)
        return fill is value or _number(fill) == float(value)
    return False


def _is_all_ones(node: Any) -> bool:
    return _is_filled_with(node, True)


def _is_zeros(node: Any, written_ok: bool = False) -> bool:
    return _is_filled_with(node, False, written_ok)


def _full_slices(index: Any) -> bool:
    """An index made of Ellipsis and slices that start at 0 with step 1 (a leading crop)."""
    items = index if isinstance(index, tuple) else (index,)
    for it in items:
        if it is Ellipsis:
            continue
        if not isinstance(it, slice) or it.start not in (None, 0) or it.step not in (None, 1):
            return False
    return True


# ----------------------------------------------------------------------------- index grids

def _arange_len(node: Any) -> Optional[int]:
    if not is_function(node, torch.arange):
        return None
    nums = [a for a in node.args]
    if len(nums) == 1:
        return _sym(nums[0])  # arange(T), T an int or a symbolic size (a graph node)
    if len(nums) in (2, 3) and nums[0] == 0 and (len(nums) == 2 or nums[2] == 1):
        return _sym(nums[1])
    return None


def _grid(node: Any) -> Optional[tuple[int, int, int]]:
    """``ci * i + cj * j + c`` for an expression of query (column) and key (row) aranges."""
    if isinstance(node, int) and not isinstance(node, bool):
        return (0, 0, node)
    if not isinstance(node, Node) or any(_writes(u, node) for u in node.users):
        return None
    val = example_value(node)
    if _arange_len(node) is not None:
        return (0, 1, 0)  # a 1-D arange broadcasts along the last dim: the key index
    src = None
    col = None
    if is_function(node, operator.getitem) and _arange_len(node.args[0]) is not None:
        idx = node.args[1]
        if idx == (slice(None), None):
            src, col = node.args[0], True
        elif idx in ((None, slice(None)), (None,)):
            src, col = node.args[0], False
    elif is_method(node, "unsqueeze") and _arange_len(node.args[0]) is not None:
        src, col = node.args[0], node.args[1] in (1, -1)
    elif is_method(node, "view", "reshape") and _arange_len(node.args[0]) is not None and val is not None and val.dim() == 2:
        src, col = node.args[0], _same(val.shape[1], 1) and not _same(val.shape[0], 1)
    if src is not None:
        return (1, 0, 0) if col else (0, 1, 0)
    for targets, sign in (((operator.add, torch.add), 1), ((operator.sub, torch.sub), -1)):
        if is_function(node, *targets) or is_method(node, "add" if sign == 1 else "sub"):
            a, b = _grid(node.args[0]), _grid(node.args[1])
            if a is None or b is None:
                return None
            return (a[0] + sign * b[0], a[1] + sign * b[1], a[2] + sign * b[2])
    return None


def _compare(node: Node, positive: bool) -> Visible:
    op = CMP.get(node.target) if node.op == "call_function" else (
        node.target if is_method(node, "ge", "gt", "le", "lt") else None)
    a, b = _grid(node.args[0]), _grid(node.args[1])
    if op is None or a is None or b is None:
        other = node.args[0] if a is None else node.args[1]
        if op is not None and isinstance(_sym(other), torch.SymInt):
            raise NotAMask(f"comparison {_name(node)} bounds j - i by a symbolic size {_name(other)} (dynamic "
                           "shapes): only a constant window is supported")
        raise NotAMask(f"comparison {_name(node)} of {_name(other)} is not a bound on j - i of arange grids")
    ci, cj, c = a[0] - b[0], a[1] - b[1], a[2] - b[2]
    # (ci * i + cj * j + c) op 0, with (ci, cj) = +-(1, -1): a bound on j - i
    if (ci, cj) == (1, -1):  # (i - j + c) op 0  <=>  (j - i) op' c
        op = {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt"}[op]
    elif (ci, cj) == (-1, 1):  # (j - i + c) op 0  <=>  (j - i) op -c
        c = -c
    else:
        raise NotAMask(f"comparison {_name(node)} is not a bound on j - i")
    vis = {"le": Visible(hi=c), "lt": Visible(hi=c - 1), "ge": Visible(lo=c), "gt": Visible(lo=c + 1)}[op]
    return vis if positive else vis.complement()


# ----------------------------------------------------------------------------- block expansion

def _block_expansion(node: Node) -> Optional[tuple[Node, int]]:
    """(block-level mask, S) if node is a mask expanded by S x S along its last two dims."""
    node = _strip_casts(node)
    if is_method(node, "repeat_interleave") or is_function(node, torch.repeat_interleave):
        inner = node.args[0]
        if not is_method(inner, "repeat_interleave") and not is_function(inner, torch.repeat_interleave):
            return None
        if any(isinstance(n, Node) and _writes(u, n) for n in (node, inner) for u in n.users):
            return None
        s1, d1 = _static_size(arg(node, 1, "repeats"), "block size"), _dim(node, arg(node, 2, "dim"))
        s2, d2 = _static_size(arg(inner, 1, "repeats"), "block size"), _dim(inner, arg(inner, 2, "dim"))
        nd = _ndim(node)
        if not (isinstance(s1, int) and s1 == s2 and nd is not None and {d1, d2} == {nd - 2, nd - 1}):
            return None
        return inner.args[0], s1
    if is_function(node, torch.kron) and _is_all_ones(node.args[1]):
        ones = example_value(node.args[1])
        if ones is not None and ones.dim() == 2 and _same(ones.shape[0], ones.shape[1]):
            return node.args[0], int(_static_size(ones.shape[0], "block size"))
        return None
    if is_method(node, "reshape", "view") and is_method(node.args[0], "expand"):
        exp = node.args[0]
        src, out, big = example_value(exp.args[0]), example_value(node), example_value(exp)
        if src is None or out is None or big is None or big.dim() < 4 or big.dim() != out.dim() + 2:
            return None
        nq, s1, nk, s2 = big.shape[-4:]
        if not _same_shape(src.shape[-4:], (nq, 1, nk, 1)) or not _same(s1, s2) \
                or not _same_shape(out.shape[-2:], (nq * s1, nk * s2)):
            return None
        _static_size(s1, "block size")
        # walk back through the singleton-inserting view to the (…, NQ, NK) block mask
        base = exp.args[0]
        while isinstance(base, Node) and (is_method(base, "unsqueeze", "view", "reshape") or
                                          is_function(base, torch.unsqueeze, torch.reshape) or  # einops.repeat
                                          (is_function(base, operator.getitem) and _full_slices_or_none(base.args[1]))):
            nxt = base.args[0]
            nv = example_value(nxt)
            if nv is None or not _same(nv.numel(), src.numel()):
                break
            base = nxt
            if _same_shape(nv.shape[-2:], (nq, nk)):
                return base, int(s1)
        return None
    return None


def _token_expansion(node: Node) -> Optional[tuple[Node, int]]:
    """(per-token block mask (..., T, NK), S) if node expands only its key dim by S:
    ``sel.repeat_interleave(S, -1)``, one mask row per query token (query block 1)."""
    node = _strip_casts(node)
    if not (is_method(node, "repeat_interleave") or is_function(node, torch.repeat_interleave)):
        return None
    s1, d1, nd = arg(node, 1, "repeats"), _dim(node, arg(node, 2, "dim")), _ndim(node)
    if nd is None or d1 != nd - 1:
        return None
    s1 = _static_size(s1, "block size")
    if not isinstance(s1, int) or _block_expansion(node) is not None:
        return None
    inner = node.args[0]
    if any(_writes(u, node) for u in node.users) or is_method(inner, "repeat_interleave") \
            or is_function(inner, torch.repeat_interleave):
        return None
    return inner, s1


def _full_slices_or_none(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(it is None or it is Ellipsis or it == slice(None) for it in items)


def _broadcast_source(node: Any) -> Optional[Node]:
    """src when node is src broadcast to more leading dims (``m[None, None]``, ``unsqueeze(0)``,
    ``view(1, 1, T, T)``, ``expand``): the last two dims stay (query, key) and every other dim
    keeps its place counted from the right, so a block mask's head dim stays a head dim."""
    if not isinstance(node, Node) or not node.args or not isinstance(node.args[0], Node):
        return None
    src, sv, out = node.args[0], example_value(node.args[0]), example_value(node)
    if sv is None or out is None or sv.dim() < 2 or out.dim() < sv.dim():
        return None
    if is_method(node, "expand", "expand_as", "broadcast_to") or is_function(node, torch.broadcast_to):
        return src
    if is_method(node, "view", "reshape", "unsqueeze") or is_function(node, torch.reshape, torch.unsqueeze):
        if is_method(node, "unsqueeze") or is_function(node, torch.unsqueeze):
            if arg(node, 1, "dim") not in (0, -out.dim()):
                return None
        lead = out.dim() - sv.dim()
        return src if _same_shape(out.shape, (1,) * lead + tuple(sv.shape)) else None
    if is_function(node, operator.getitem):
        items = list(node.args[1]) if isinstance(node.args[1], tuple) else [node.args[1]]
        if any(not (it is None or it is Ellipsis or it == slice(None)) for it in items) or items.count(Ellipsis) > 1:
            return None
        if Ellipsis not in items:
            items.append(Ellipsis)
        e = items.index(Ellipsis)
        items[e:e + 1] = [slice(None)] * (sv.dim() - sum(it is not None for it in items if it is not Ellipsis))
        first = next((n for n, it in enumerate(items) if it is not None), len(items))
        return src if all(it is not None for it in items[first:]) else None
    return None


# ----------------------------------------------------------------------------- mask analysis

def visible_set(node: Any, positive: bool = True) -> Visible:
    """Where ``node`` is nonzero (``positive``) or zero, as a ``Visible``; NotAMask if unprovable.
    A term the algebra cannot read is evaluated when it depends on no graph input."""
    try:
        return _read_mask(node, positive)
    except NotAMask:
        vis = _constant_mask(node, positive)
        if vis is None:
            raise
        return vis


def _read_mask(node: Any, positive: bool) -> Visible:
    if not isinstance(node, Node):
        raise NotAMask(f"mask is a constant {node!r}")
    if node.op == "placeholder" or node.op == "get_attr":
        raise NotAMask(f"mask term '{node.target}' is a graph input (passed in, or built before a graph break), "
                       "its pattern cannot be read at compile time")
    if any(_writes(u, node) for u in node.users):
        raise NotAMask(f"mask term {_name(node)} is written in place, its pattern cannot be read at compile time")
    if is_method(node, "eq") or is_function(node, operator.eq, torch.eq):
        if _number(node.args[1]) == 0.0 or node.args[1] is False:
            return visible_set(node.args[0], not positive)
        if _number(node.args[1]) == 1.0 or node.args[1] is True:
            return visible_set(node.args[0], positive)
    cmp_name = _cmp_name(node)
    if cmp_name is not None and _number(node.args[1]) is not None and isinstance(node.args[0], Node):
        inner = node.args[0]
        while is_function(inner, operator.getitem) and _full_slices(inner.args[1]):
            inner = inner.args[0]  # a crop [..., :T, :T] commutes with the comparison
        expansion, qb = _block_expansion(inner), None
        if expansion is None:
            expansion, qb = _token_expansion(inner), 1
        if expansion is not None:  # an expanded block-level score compared with a threshold
            return Visible(block=BlockTerm(expansion[0], expansion[1], negate=not positive,
                                           compare=(cmp_name, _number(node.args[1])), query_block=qb))
    if is_method(node, "ne", "gt") or is_function(node, operator.ne, torch.ne, operator.gt, torch.gt):
        if (_number(node.args[1]) == 0.0 or node.args[1] is False) and _grid(node.args[0]) is None:
            src = example_value(node.args[0])
            # x != 0 is x's truthiness; x > 0 only when x cannot be negative (a bool, or a cast of one)
            if is_method(node, "ne") or is_function(node, operator.ne, torch.ne) or _from_bool(node.args[0]):
                return visible_set(node.args[0], positive)
            raise NotAMask(f"{_name(node)} of a {src.dtype if src is not None else '?'} tensor is not a 0/1 mask")
    if is_method(node, *_BOOL_CASTS) or is_function(node, torch.Tensor.to):
        src, out = example_value(node.args[0]), example_value(node)
        if src is not None and out is not None and src.is_floating_point() and not out.is_floating_point() \
                and out.dtype != torch.bool:
            raise NotAMask("a float-to-integer cast of a mask can change which entries are zero")
        return visible_set(node.args[0], positive)
    if is_function(node, *NOT) or is_method(node, "logical_not", "bitwise_not", "__invert__"):
        return visible_set(node.args[0], not positive)
    if is_function(node, operator.getitem) and _full_slices(node.args[1]):
        return visible_set(node.args[0], positive)
    if _broadcast_source(node) is not None:
        return visible_set(node.args[0], positive)
    if _leading_move(node) is not None:
        return _band_only(visible_set(node.args[0], positive), node)
    if (is_function(node, operator.mul, torch.mul) or is_method(node, "mul")) and len(node.args) == 2 \
            and all(isinstance(a, Node) and _from_bool(a) for a in node.args):
        # a product of 0/1 masks is nonzero where both are: a conjunction
        if positive:
            return visible_set(node.args[0], True) & visible_set(node.args[1], True)
        raise NotAMask("the complement of a product of masks (a union of masks)")
    if (is_function(node, operator.sub, torch.sub) or is_method(node, "sub")) and _number(node.args[0]) == 1.0 \
            and _from_bool(node.args[1]):
        return visible_set(node.args[1], not positive)  # 1 - m of a 0/1 mask
    conj = is_function(node, *AND) or is_method(node, "logical_and", "bitwise_and", "__and__")
    disj = is_function(node, *OR) or is_method(node, "logical_or", "bitwise_or", "__or__")
    if (conj and positive) or (disj and not positive):
        return visible_set(node.args[0], positive) & visible_set(node.args[1], positive)
    if conj or disj:
        raise NotAMask("the mask is a union of terms")
    for fn, name in ((torch.tril, "tril"), (torch.triu, "triu")):
        if is_function(node, fn) or is_method(node, name):
            d = arg(node, 1, "diagonal", 0)
            if not isinstance(d, int):
                raise NotAMask(f"{name} with a non-constant diagonal")
            term = Visible(hi=d) if name == "tril" else Visible(lo=d)
            if _is_all_ones(node.args[0]):
                return term if positive else term.complement()
            if positive:
                return term & visible_set(node.args[0], True)
            raise NotAMask(f"the complement of {name} of a mask")
    if is_method(node, "ge", "gt", "le", "lt") or (node.op == "call_function" and node.target in CMP):
        return _compare(node, positive)
    expansion = _block_expansion(node)
    if expansion is not None:
        bm, size = expansion
        return Visible(block=BlockTerm(bm, size, negate=not positive))
    expansion = _token_expansion(node)
    if expansion is not None:  # per-token selection: the key dim only
        bm, size = expansion
        return Visible(block=BlockTerm(bm, size, negate=not positive, query_block=1))
    inputs = sorted(str(n.target) for n in _ancestors(node) if n.op == "placeholder")
    if inputs:  # e.g. transformers' mask from a padding ``attention_mask``
        raise NotAMask(f"mask term {_name(node)} is computed from graph input {', '.join(inputs[:2])} (a padding "
                       "mask?): not a causal/band bound or a block-expanded mask, and not constant")
    raise NotAMask(f"mask term {_name(node)} is not a causal/band bound or a block-expanded mask")


def _band_only(vis: Visible, node: Node) -> Visible:
    """A mask moved across its leading dims: a band is the same in every (T, T) slice, but which
    head a block mask's row belongs to is not tracked through the move."""
    if vis.block is not None:
        raise NotAMask(f"block mask moved across its leading dims by {_name(node)}: its heads cannot be "
                       "matched to the scores'")
    return vis


def _additive_bias(bias: Any) -> Visible:
    """Visible set of an additive bias that is 0 where visible and -inf (or -big) elsewhere.
    A bias the algebra cannot read is evaluated when it depends on no graph input."""
    try:
        return _read_bias(bias)
    except NotAMask:
        vis = _constant_bias(bias)
        if vis is None:
            raise
        return vis


def _read_bias(bias: Any) -> Visible:
    if not isinstance(bias, Node):
        raise NotAMask("additive bias is a constant")
    fills = [u for u in bias.users if u not in _READ_WRITES and _writes(u, bias)]
    if fills:  # ``bias.masked_fill_(m, -inf)`` before it is read (MoBA's gate under a causal tril)
        readers = [u for u in bias.users if u not in fills and not _reads_only_metadata(u)]
        if not all(is_method(u, "masked_fill_") and u.args[0] is bias and _is_masked_value(arg(u, 2, "value"))
                   and all(_runs_before(u, r) for r in readers) for u in fills):
            raise NotAMask(f"additive mask {_name(bias)} is written in place by {_name(fills[0])}")
        _READ_WRITES.update(fills)
        try:
            vis = _additive_bias(bias)
        finally:
            _READ_WRITES.difference_update(fills)
        for u in fills:
            vis = vis & visible_set(arg(u, 1, "mask"), False)
        return vis
    if is_method(bias, *_BOOL_CASTS) or is_function(bias, torch.Tensor.to):
        src, out = example_value(bias.args[0]), example_value(bias)
        if src is not None and out is not None and src.is_floating_point() and out.is_floating_point():
            return _additive_bias(bias.args[0])  # a float cast keeps 0 at 0 and -big at or below -1e4
    if _broadcast_source(bias) is not None or (is_function(bias, operator.getitem) and _full_slices(bias.args[1])):
        return _additive_bias(bias.args[0])
    if _leading_move(bias) is not None:
        return _band_only(_additive_bias(bias.args[0]), bias)
    if is_function(bias, torch.where) and len(bias.args) == 3:
        m, a, b = bias.args
        if _number(a) == 0.0 and _is_masked_value(b):
            return visible_set(m, True)
        if _is_masked_value(a) and _number(b) == 0.0:
            return visible_set(m, False)
    if is_method(bias, "masked_fill") or is_function(bias, torch.masked_fill):
        base, m, value = bias.args[0], arg(bias, 1, "mask"), arg(bias, 2, "value")
        if _is_zeros(base) and _is_masked_value(value):
            return visible_set(m, False)
        if _is_masked_value(base) and _number(value) == 0.0:  # full(-inf).masked_fill(keep, 0)
            return visible_set(m, True)
        if _number(value) == 0.0 and _fills_the_rest(base, m):  # m.float().masked_fill(m == 0, -inf).masked_fill(m == 1, 0)
            return visible_set(m, True)
        if _is_masked_value(value):  # a bias masked once more (MoBA's gate bias under a causal tril)
            return _additive_bias(base) & visible_set(m, False)
    for expansion, query_block in ((_block_expansion, None), (_token_expansion, 1)):
        found = expansion(bias)
        reader = _reader_of(found[0], bias) if found is not None else None
        blocks = _block_level_bias(found[0], reader) if found is not None else None
        if blocks is not None:  # where(block_mask, 0, -inf) expanded to tokens (MoBA's gate)
            return Visible(block=BlockTerm(blocks[0], found[1], negate=blocks[1], query_block=query_block))
    for fn, name in ((torch.triu, "triu"), (torch.tril, "tril")):  # full(-inf).triu(1): -inf above the diagonal
        if (is_function(bias, fn) or is_method(bias, name)) and _is_masked_value(bias.args[0]):
            d = arg(bias, 1, "diagonal", 0)
            if not isinstance(d, int):
                raise NotAMask(f"{name} with a non-constant diagonal")
            return Visible(hi=d - 1) if name == "triu" else Visible(lo=d + 1)
    if is_function(bias, torch.log) or is_method(bias, "log"):  # log of a 0/1 mask: 0 or -inf
        if _from_bool(bias.args[0]):
            return visible_set(bias.args[0], True)
        raise NotAMask("log of a tensor that is not provably a 0/1 mask")
    if (is_function(bias, operator.add, torch.add) or is_method(bias, "add")) and len(bias.args) == 2 \
            and not bias.kwargs:
        return _additive_bias(bias.args[0]) & _additive_bias(bias.args[1])  # biases add up: masked by either
    if (is_function(bias, operator.mul, torch.mul) or is_method(bias, "mul")) and len(bias.args) == 2:
        for m, c in (bias.args, bias.args[::-1]):
            if isinstance(m, Node) and _is_masked_value(c) and _from_bool(m):
                if not math.isfinite(_number(c)):
                    raise NotAMask("a 0/1 mask times -inf is NaN where the mask is 0")
                return visible_set(m, False)  # (1 - m) * -1e9: masked where (1 - m) is 1
    if _is_zeros(bias):
        return Visible()  # a zero bias (Bloom's baddbmm input without ALiBi) hides nothing
    if bias.op == "placeholder":
        raise NotAMask(f"additive mask '{bias.target}' is a graph input (passed in, or built before a graph break), "
                       "its pattern cannot be read at compile time")
    raise NotAMask(f"additive mask {_name(bias)} is not where(mask, 0, -inf) or zeros.masked_fill(mask, -inf)")


def _block_level_bias(node: Any, reader: Optional[Node] = None) -> Optional[tuple[Node, bool]]:
    """(m, negate) for a 0 / -big bias chosen by a mask: ``where(m, 0, -inf)`` -> (m, False),
    ``where(m, -inf, 0)`` / ``zeros.masked_fill(m, -inf)`` -> (m, True), also as two complementary
    setitems before ``reader`` (the expansion that reads node)."""
    if isinstance(node, Node) and reader is not None:
        found = _complementary_setitems(node, reader)
        if found is not None:
            return found
    if is_function(node, torch.where) and len(node.args) == 3 and isinstance(node.args[0], Node):
        m, a, b = node.args
        if _number(a) == 0.0 and _is_masked_value(b):
            return m, False
        if _is_masked_value(a) and _number(b) == 0.0:
            return m, True
    if (is_method(node, "masked_fill") or is_function(node, torch.masked_fill)) and _is_zeros(node.args[0]) \
            and _is_masked_value(arg(node, 2, "value")) and isinstance(arg(node, 1, "mask"), Node):
        return arg(node, 1, "mask"), True
    return None


#: Ops that read a tensor's shape, dtype and device, not its values (``ones_like(gate)``).
_METADATA_FUNCS = (torch.ones_like, torch.zeros_like, torch.empty_like, torch.full_like)


def _reads_only_metadata(node: Node) -> bool:
    return is_function(node, *_METADATA_FUNCS) or is_method(node, "size", "dim", "new_ones", "new_zeros",
                                                             "new_empty", "new_full")


def _reader_of(node: Node, consumer: Node) -> Optional[Node]:
    """The user of ``node`` through which ``consumer`` reads it (the start of an expansion chain)."""
    up = _ancestors(consumer)
    found = [u for u in node.users if u in up]
    return found[0] if len(found) == 1 else None


def _fills_the_rest(base: Any, keep: Any) -> bool:
    """Whether ``base`` is ``x.masked_fill(drop, -big)`` where drop and keep split a 0/1 mask
    (``m == 0`` / ``m == 1``, ``~m`` / ``m``): every entry is then -big or about to be 0."""
    if not (is_method(base, "masked_fill") or is_function(base, torch.masked_fill)):
        return False
    drop = arg(base, 1, "mask")
    if not _is_masked_value(arg(base, 2, "value")):
        return False

    def split(n: Any) -> Optional[tuple[Node, bool]]:
        """(m, True) for m == 1 / m, (m, False) for m == 0 / ~m, with m provably 0/1."""
        if is_method(n, "eq") or is_function(n, operator.eq, torch.eq):
            val = _number(n.args[1]) if n.args[1] not in (True, False) else float(n.args[1])
            if val in (0.0, 1.0) and _from_bool(n.args[0]):
                return _strip_casts(n.args[0]), val == 1.0
        if is_function(n, *NOT) or is_method(n, "logical_not", "bitwise_not"):
            inner = split(n.args[0])
            return (inner[0], not inner[1]) if inner is not None else None
        return (_strip_casts(n), True) if isinstance(n, Node) and _from_bool(n) else None

    a, b = split(drop), split(keep)
    return a is not None and b is not None and a[0] is b[0] and a[1] != b[1]


# ----------------------------------------------------------------------------- constant masks (evaluated)
#
# Real models build their masks in many more ways than the algebra above reads: HF's
# ``full(min).masked_fill_(...)`` and ``causal_mask *= diag`` with ``bitwise_or_``, masks
# filled row by row in a Python loop, ``abs(i - j) < w`` next to a causal bound, index
# grids broadcast to 4-D. When a mask term depends on no graph input, its values are fixed
# by the graph, so the pass *evaluates* it (replaying, in graph order, the constant nodes it
# is computed from and the in-place writes into them) and reads the band off the values.

#: Largest constant intermediate (elements) evaluated at compile time: T = 8k masks fit.
_MAX_CONST_NUMEL = 1 << 26
_RANDOM_NAMES = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "exponential", "cauchy",
                 "geometric", "log_normal", "random")


def _ancestors(node: Node) -> set:
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack += n.all_input_nodes
    return out


def _constant_value(node: Node) -> Optional[torch.Tensor]:
    """node's value as its readers outside the constant subgraph see it, or None when it depends
    on a graph input (NotAMask when it is constant but cannot be evaluated safely).

    The nodes it is computed from are replayed in graph order together with every in-place
    write on a constant in the graph (so writes through views and aliases land as in eager);
    the value is taken before each outside reader and must be the same for all of them."""
    memo: dict = {}
    if not isinstance(node, Node) or node.op not in ("call_function", "call_method") \
            or _depends_on_input(node, memo):
        return None
    readers = [u for u in node.users if _depends_on_input(u, memo)]
    if not readers:
        return None  # read only by other constants: the outermost constant term is evaluated instead
    mine = _ancestors(node)
    replay, written_from_outside = set(mine), []
    for n in node.graph.nodes:
        if not writes_in_place(n) or not n.args or not isinstance(n.args[0], Node) \
                or _depends_on_input(n.args[0], memo):
            continue
        if _depends_on_input(n, memo):  # a computed value written into a constant
            written_from_outside.append(n.args[0])
            replay |= _ancestors(n.args[0])
        else:
            replay |= _ancestors(n)
    replay |= _vmap_levels(node.graph, replay)
    for n in replay:
        name = str(getattr(n.target, "__name__", n.target))
        if any(r in name for r in _RANDOM_NAMES):
            raise NotAMask(f"constant mask {_name(node)} is built with a random op ({name})")
        val = n.meta.get("example_value", n.meta.get("val"))
        if isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape):
            raise NotAMask(f"constant mask {_name(node)} has symbolic sizes (dynamic shapes): it is "
                           "evaluated only for static shapes")
        if isinstance(val, torch.Tensor) and val.numel() > _MAX_CONST_NUMEL:
            raise NotAMask(f"constant mask {_name(node)} is too large to evaluate at compile time")
    env: dict = {}
    seen: list = []

    def value(x: Any) -> Any:
        if isinstance(x, Node):
            return env[x]
        if isinstance(x, (list, tuple)):
            return type(x)(value(i) for i in x)
        if isinstance(x, dict):
            return {k: value(i) for k, i in x.items()}
        return x

    level = torch._C._functorch.maybe_current_level()
    try:
        for n in node.graph.nodes:
            if n in readers:
                seen.append(env[node].clone())
            if n not in replay:
                continue
            if n.op not in ("call_function", "call_method"):
                raise NotAMask(f"constant mask {_name(node)} reads {n.op} {n.target}")
            args, kwargs = value(n.args), value(n.kwargs)
            if "device" in kwargs:
                kwargs["device"] = "cpu"
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method" \
                else n.target(*args, **kwargs)
    except NotAMask:
        raise
    except Exception as exc:  # an op we cannot replay outside the graph
        raise NotAMask(f"constant mask {_name(node)} could not be evaluated ({type(exc).__name__})") from None
    finally:
        while torch._C._functorch.maybe_current_level() != level:  # vmap levels a failed replay left open
            torch._C._functorch._vmap_decrement_nesting()
    storages = {env[n].untyped_storage().data_ptr() for n in mine if isinstance(env.get(n), torch.Tensor)
                and not torch._C._functorch.is_batchedtensor(env[n])}  # vmap's batched views own no storage
    if any(isinstance(env.get(c), torch.Tensor) and env[c].untyped_storage().data_ptr() in storages
           for c in written_from_outside):
        raise NotAMask(f"constant mask {_name(node)} is written in place by a computed value")
    if not all(isinstance(x, torch.Tensor) for x in seen) or any(not torch.equal(seen[0], x) for x in seen[1:]):
        raise NotAMask(f"constant mask {_name(node)} is written in place between its readers")
    return seen[0]


_VMAP_LEVEL_CALLS = ("_vmap_increment_nesting", "_vmap_decrement_nesting")


def _vmap_levels(graph: torch.fx.Graph, replay: set) -> set:
    """Every vmap level call of the graph when the replay holds batched tensors (a mask function
    under ``torch.vmap``, as HF's ``masking_utils`` builds masks): ``_add_batch_dim`` takes its
    level as a constant, so the calls that open and close the levels are nobody's ancestors,
    yet the replay needs them, in graph order, to run the batched ops."""
    def name(n: Node) -> str:
        return str(getattr(n.target, "__name__", "")) if n.op == "call_function" else ""

    if not any(name(n) in ("_add_batch_dim", "_remove_batch_dim") for n in replay):
        return set()
    return {n for n in graph.nodes if name(n) in _VMAP_LEVEL_CALLS}


def _band_of(visible: torch.Tensor, what: str) -> Visible:
    """The band lo <= j - i <= hi that a constant (…, T, T) visibility equals, in every leading slice."""
    if visible.dim() < 2 or visible.shape[-1] != visible.shape[-2] or visible.shape[-1] < 2:
        raise NotAMask(f"{what} of shape {tuple(visible.shape)} is not a (T, T) mask over queries and keys")
    flat = visible.reshape(-1, *visible.shape[-2:])
    if not bool((flat == flat[:1]).all()):
        raise NotAMask(f"{what} differs between heads or batches")
    m = flat[0]
    n = m.shape[-1]
    i = torch.arange(n)
    d = i[None, :] - i[:, None]
    if not bool(m.any()):
        raise NotAMask(f"{what} hides every key")
    lo, hi = int(d[m].min()), int(d[m].max())
    if not torch.equal(m, (d >= lo) & (d <= hi)):
        raise NotAMask(f"{what} is not a diagonal band lo <= j - i <= hi")
    return Visible(hi=None if hi >= n - 1 else hi, lo=None if lo <= 1 - n else lo)


#: Block sizes tried for a constant block layout, largest first (the kernel's key tile is the block).
_CONSTANT_BLOCK_SIZES = (64, 32, 16)
#: meta key of the block masks that ``_sampled_blocks`` inserts (erased again when no site uses them).
_SAMPLED_BLOCKS = "bcpt_sampled_blocks"


def _constant_layout(node: Node, visible: torch.Tensor, what: str) -> Visible:
    """The band, or else the static block layout (whole S x S blocks, optionally under the causal
    bound j <= i), that a constant visibility equals: BigBird/Longformer-like fixed patterns,
    block-local masks, ``tril`` block layouts expanded to tokens. The layout is sampled from the
    mask at each block's first query and key, which is inside the causal bound for every key
    block up to the query's."""
    try:
        return _band_of(visible, what)
    except NotAMask as exc:
        band_reason = exc
    if visible.dim() < 2 or visible.shape[-1] != visible.shape[-2] or not bool(visible.any()):
        raise band_reason
    T = visible.shape[-1]
    i = torch.arange(T)
    causal = i[None, :] <= i[:, None]
    for S in _CONSTANT_BLOCK_SIZES:
        if S >= T:
            continue
        blocks = visible[..., ::S, ::S]
        tokens = blocks.repeat_interleave(S, -2).repeat_interleave(S, -1)[..., :T, :T]
        for bound in (None, causal):
            if torch.equal(visible, tokens if bound is None else tokens & bound):
                return Visible(hi=None if bound is None else 0, block=BlockTerm(_sampled_blocks(node, S), S))
    sizes = "/".join(map(str, _CONSTANT_BLOCK_SIZES))
    if "differs between" in str(band_reason):
        raise NotAMask(f"{band_reason}, and is not whole {sizes}-token blocks (optionally under the causal bound)")
    raise NotAMask(f"{what} is neither a diagonal band lo <= j - i <= hi nor whole {sizes}-token blocks "
                   "(optionally under the causal bound)")


def _sampled_blocks(node: Node, S: int) -> Node:
    """``node[..., ::S, ::S] != 0``, the block layout read off the mask at run time, inserted just
    before the first reader of ``node`` (where its value is the one evaluated; a copy, so later
    writes cannot reach it); reused when present."""
    for user in node.users:
        if user.meta.get(_SAMPLED_BLOCKS) == S:
            return user
    graph = node.graph
    order = {n: idx for idx, n in enumerate(graph.nodes)}
    memo: dict = {}
    first = min((u for u in node.users if _depends_on_input(u, memo)), key=order.__getitem__)
    sampled = example_value(node)[..., ::S, ::S]
    with graph.inserting_before(first):
        sample = graph.call_function(operator.getitem, (node, (Ellipsis, slice(None, None, S), slice(None, None, S))))
        blocks = graph.call_function(torch.ne, (sample, 0))
    sample.meta["example_value"] = sampled
    blocks.meta["example_value"] = sampled != 0
    blocks.meta[_SAMPLED_BLOCKS] = S
    return blocks


def _constant_mask(node: Any, positive: bool) -> Optional[Visible]:
    """visible_set of a mask that depends on no graph input, read from its values; None if not constant."""
    val = _constant_value(node) if isinstance(node, Node) else None
    if val is None:
        return None
    if val.is_floating_point() and bool(val.isnan().any()):
        raise NotAMask(f"constant mask {_name(node)} holds NaN")
    vis = _constant_layout(node, val != 0 if positive else val == 0, f"constant mask {_name(node)} (evaluated)")
    if vis.block is not None:
        vis.block.negate = not positive
    return vis


def _constant_bias(node: Any) -> Optional[Visible]:
    """_additive_bias of a bias that depends on no graph input: 0 where visible, -big elsewhere."""
    val = _constant_value(node) if isinstance(node, Node) else None
    if val is None:
        return None
    if not val.is_floating_point():
        raise NotAMask(f"additive mask {_name(node)} is not a float tensor")
    if bool(val.isnan().any()):
        raise NotAMask(f"constant additive mask {_name(node)} holds NaN (e.g. a 0/1 mask times -inf)")
    if not bool(((val == 0) | (val <= BIG_NEGATIVE)).all()):
        raise NotAMask(f"constant additive mask {_name(node)} holds values other than 0 and -inf / -big "
                       "(a positional bias, not a mask)")
    vis = _constant_layout(node, val == 0, f"constant additive mask {_name(node)} (evaluated)")
    if vis.block is not None:
        vis.block.negate = True  # visible where the bias is 0
    return vis


# ----------------------------------------------------------------------------- scores / softmax / PV

@dataclasses.dataclass
class Site:
    anchor: Node            # node whose value the op replaces (PV matmul or SDPA call)
    q: Node
    k: Node
    v: Node
    scale: Optional[float]  # None: 1/sqrt(D)
    vis: Visible
    layout: Optional[Layout] = None  # None: q, k, v are already (B, H, T, D) (SDPA)


def _transposed_k(node: Any, rank: int = 4) -> Optional[Node]:
    """x for ``x.transpose(-2, -1)`` (``.mT``, ``permute(…, -1, -2)``) of a ``rank``-D x (None: any rank >= 2)."""
    nd = _ndim(node)
    if not isinstance(node, Node) or nd is None or nd < 2 or (rank is not None and nd != rank):
        return None
    if is_method(node, "transpose", "swapaxes", "swapdims") or is_function(node, torch.transpose):
        dims = {d % nd for d in node.args[1:3] if isinstance(d, int)} if len(node.args) >= 3 else set()
        return node.args[0] if dims == {nd - 2, nd - 1} else None
    if is_function(node, getattr) and node.args[1] == "mT":
        return node.args[0]
    if is_method(node, "permute"):
        dims = node.args[1:] if len(node.args) > 2 else node.args[1]
        if not all(isinstance(d, int) for d in dims):
            return None
        return node.args[0] if tuple(d % nd for d in dims) == (*range(nd - 2), nd - 1, nd - 2) else None
    return None


def _einsum(node: Node) -> Optional[tuple[str, str, str, Node, Node]]:
    if not is_function(node, *EINSUM):
        return None
    eq, *ops = node.args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or "->" not in eq or len(ops) != 2:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    a, b = lhs.split(",")
    return a, b, out, ops[0], ops[1]


def _qk(node: Any) -> Optional[tuple[Node, Node]]:
    """(q, k) if node is q k^T over the last dims of 4-D tensors."""
    if not isinstance(node, Node):
        return None
    if is_function(node, *MATMUL) or is_method(node, "matmul"):
        k = _transposed_k(node.args[1])
        return (node.args[0], k) if k is not None and _ndim(node.args[0]) == 4 else None
    e = _einsum(node)
    if e is not None:
        a, b, out, q, k = e
        if len(a) == len(b) == len(out) == 4 and a[:2] == b[:2] == out[:2] and a[3] == b[3] \
                and out[2:] == a[2] + b[2] and len(set(a[2:] + b[2])) == 3:
            return q, k
    return None


def _pv(node: Any) -> Optional[tuple[Node, Node]]:
    """(p, v) if node is p @ v over (…, T, T) x (…, T, D)."""
    if not isinstance(node, Node):
        return None
    if is_function(node, *MATMUL) or is_method(node, "matmul"):
        return (node.args[0], node.args[1]) if _ndim(node.args[0]) == 4 and _ndim(node.args[1]) == 4 else None
    e = _einsum(node)
    if e is not None:
        a, b, out, p, v = e
        if len(a) == len(b) == len(out) == 4 and a[:2] == b[:2] == out[:2] and a[3] == b[2] \
                and out[2:] == a[2] + b[3] and len(set(a[2:] + b[3])) == 3:
            return p, v
    return None


# ----------------------------------------------------------------------------- layouts
#
# q k^T and P V are written in many layouts: matmuls on (B, H, T, D), einsums on (B, T, H, D),
# grouped 5-D GQA views (B, H_kv, G, T, D), ellipses, 3-D bmm on (B*H, T, D). Each product is
# read as an einsum (letters), and attention is recognised by what the letters do rather than
# by where they sit: the scores contract one feature letter d of q and k and keep the query
# letter i (q only) and the key letter j (k only) last; the letters both keep are batch/head
# dims, the ones only q keeps are the query heads of a KV group. A ``Layout`` records them,
# and the rewrite permutes/reshapes q, k, v to the ops' (B, H, T, D) and the output back.

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _product(node: Any) -> Optional[tuple[Node, Node, str, str, str]]:
    """(a, b, a_sub, b_sub, out_sub) for a product of two tensors in einsum letters: ``einsum``
    (an ellipsis becomes letters, right-aligned), ``matmul`` / ``bmm`` of operands of equal rank."""
    if not isinstance(node, Node):
        return None
    if is_function(node, *EINSUM):
        eq, *ops = node.args
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        if not isinstance(eq, str) or "->" not in eq or len(ops) != 2 or node.kwargs \
                or not all(isinstance(o, Node) for o in ops):
            return None
        lhs, out = eq.replace(" ", "").split("->")
        subs = lhs.split(",")
        nds = [_ndim(o) for o in ops]
        if len(subs) != 2 or None in nds:
            return None
        fresh = [c for c in _LETTERS if c not in eq]
        n_ell = [nd - (len(sb) - 3) if "..." in sb else 0 for sb, nd in zip(subs, nds)]
        m = max(n_ell)
        if min(n_ell) < 0 or m > len(fresh):
            return None
        ell = "".join(fresh[:m])
        subs = [sb.replace("...", ell[m - n:]) for sb, n in zip(subs, n_ell)]
        out = out.replace("...", ell)
        if any(len(sb) != nd or len(set(sb)) != nd or not sb.isalpha() for sb, nd in zip(subs, nds)) \
                or len(set(out)) != len(out) or not set(out) <= set(subs[0] + subs[1]):
            return None
        return ops[0], ops[1], subs[0], subs[1], out
    if is_function(node, *MATMUL, torch.bmm) or is_method(node, "matmul", "bmm"):
        a, b = node.args[:2]
        na, nb = _ndim(a), _ndim(b)
        if na is None or na < 2 or na != nb:
            return None
        batch = _LETTERS[:na - 2].upper()
        return a, b, batch + "xy", batch + "yz", batch + "xz"
    return None


@dataclasses.dataclass
class Scores:
    """q k^T read as letters: q's dims ``q_sub``, k's ``k_sub``, the product's ``s_sub`` (…, i, j)."""

    q: Node
    k: Node
    q_sub: str
    k_sub: str
    s_sub: str
    alpha: float = 1.0          # baddbmm's alpha
    bias: Optional[Node] = None  # baddbmm's input with beta = 1: an additive mask


def _scores(node: Any) -> Optional[Scores]:
    """q k^T in any layout: a product whose letters contract one feature dim, and whose last two
    letters are a query dim of one operand and a key dim of the other (the softmax is over keys).
    ``baddbmm(x, q, k^T, beta=0, alpha=c)`` is ``c q k^T`` (x ignored), with ``beta=1`` x is a bias."""
    alpha, bias = 1.0, None
    if is_function(node, torch.baddbmm) or is_method(node, "baddbmm"):
        if len(node.args) != 3 or set(node.kwargs) - {"beta", "alpha"}:
            return None
        beta, alpha = _number(node.kwargs.get("beta", 1)), _number(node.kwargs.get("alpha", 1))
        if alpha is None or alpha <= 0 or beta not in (0.0, 1.0) or _ndim(node.args[1]) != 3:
            return None
        bias = node.args[0] if beta == 1.0 else None
        prod = (node.args[1], node.args[2], "Axy", "Ayz", "Axz")
    else:
        prod = _product(node)
    if prod is None:
        return None
    a, b, a_sub, b_sub, s_sub = prod
    for x, sub in ((a, a_sub), (b, b_sub)):  # a transpose of the last two dims only swaps letters
        inner = _transposed_k(x, None)
        if inner is not None:
            if x is a:
                a, a_sub = inner, a_sub[:-2] + a_sub[-1] + a_sub[-2]
            else:
                b, b_sub = inner, b_sub[:-2] + b_sub[-1] + b_sub[-2]
    if len(s_sub) < 2:
        return None
    i, j = s_sub[-2], s_sub[-1]
    if i in b_sub and j in a_sub:
        a, b, a_sub, b_sub = b, a, b_sub, a_sub
    feat = (set(a_sub) & set(b_sub)) - set(s_sub)
    if not (i in a_sub and i not in b_sub and j in b_sub and j not in a_sub and len(feat) == 1) \
            or set(s_sub) | feat != set(a_sub) | set(b_sub) or not set(b_sub) - feat - {j} <= set(a_sub):
        return None
    return Scores(a, b, a_sub, b_sub, s_sub, alpha, bias)


@dataclasses.dataclass
class Layout:
    """Where the ops' (B, H, T, D) dims are in the user's q, k, v and output, as letters.

    q is ``lead + group + i + d``, k ``lead + j + d``, v ``lead_pv + j + e``, the output
    ``lead_pv + group + i + e``, each in the user's order (``*_sub``). The op's B is the
    leading letters but the last, its KV heads the last, its query heads that times the group
    letters (GQA: head // G is the KV head). ``lead_pv`` differs from ``lead`` only when the
    scores or probabilities are reshaped across their leading dims: the flat index over the
    leading dims is unchanged by such reshapes, so both sides flatten to the same (B, H)."""

    q_sub: str
    k_sub: str
    v_sub: str
    o_sub: str
    s_lead: str   # the scores' leading letters, in their order (block masks align with them)
    lead: str
    group: str
    lead_pv: str
    i: str
    j: str
    d: str
    e: str
    sizes: dict

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """q, k, v as the op takes them: (B, H_kv * G, T, D), (B, H_kv, T, D), (B, H_kv, T, E)."""
        z = self.sizes
        hkv = z[self.lead[-1]] if self.lead else 1
        n = math.prod(z[c] for c in self.lead)
        b, g = n // hkv if not _same(hkv, 0) else 0, math.prod(z[c] for c in self.group)
        return (b, hkv * g, z[self.i], z[self.d]), (b, hkv, z[self.j], z[self.d]), (b, hkv, z[self.j], z[self.e])

    def identity(self) -> bool:
        """Already the op's layout: nothing to permute or reshape."""
        return self.lead_pv == self.lead == self.s_lead and not self.group and len(self.lead) == 2 and (
            self.q_sub, self.k_sub, self.v_sub, self.o_sub) == (self.lead + self.i + self.d, self.lead + self.j + self.d,
                                                                self.lead + self.j + self.e, self.lead + self.i + self.e)


def _layout(sc: Scores, core: Node, p: Node, v: Node, p_sub: str, v_sub: str, o_sub: str,
            out: Node) -> Union[Layout, str]:
    """The layout of ``softmax(mask(q k^T)) -> P @ V`` (``core``: q k^T) from the two products' letters."""
    s_sub, i, j = sc.s_sub, sc.s_sub[-2], sc.s_sub[-1]
    d = ((set(sc.q_sub) & set(sc.k_sub)) - set(s_sub)).pop()
    s_lead = s_sub[:-2]
    lead = "".join(c for c in s_lead if c in sc.k_sub)
    group = "".join(c for c in s_lead if c not in sc.k_sub)
    reshaped = not _same_shape(example_value(core).shape, example_value(p).shape)
    used = set(sc.q_sub + sc.k_sub + s_sub)
    fresh = iter(c for c in _LETTERS if c not in used)
    ren = {p_sub[-2]: i, p_sub[-1]: j}
    if not reshaped:
        ren.update(zip(p_sub[:-2], s_lead))
    for c in p_sub + v_sub + o_sub:
        if c not in ren:
            ren[c] = next(fresh)
    p_sub, v_sub, o_sub = ("".join(ren[c] for c in x) for x in (p_sub, v_sub, o_sub))
    lead_pv = p_sub[:-2] if reshaped else lead
    if reshaped and group:
        return "grouped (GQA) scores reshaped across their leading dims"
    e = set(v_sub) & set(o_sub) - set(p_sub)
    if len(e) != 1 or set(v_sub) != set(lead_pv + j) | e or set(o_sub) != set(lead_pv + group + i) | e \
            or (reshaped and set(p_sub) != set(lead_pv + i + j)):
        return f"P @ V does not contract the key dim of the probabilities ({p_sub},{v_sub}->{o_sub})"
    e = e.pop()
    sizes: dict = {}
    for node, sub in ((sc.q, sc.q_sub), (sc.k, sc.k_sub), (core, s_sub), (p, p_sub), (v, v_sub), (out, o_sub)):
        val = example_value(node)
        if val is None:
            return "shapes unknown (no example values)"
        for c, n in zip(sub, val.shape):
            if not _same(sizes.setdefault(c, n), n):
                return f"dim '{c}' of q k^T / P @ V has sizes {sizes[c]} and {n} (broadcast batch or heads)"
    return Layout(sc.q_sub, sc.k_sub, v_sub, o_sub, s_lead, lead, group, lead_pv, i, j, d, e, sizes)


def _to_op_layout(graph: torch.fx.Graph, lay: Layout, q: Node, k: Node, v: Node) -> list[Node]:
    """q, k, v permuted and reshaped to the op's (B, H, T, D); no-op steps are left out."""
    out = []
    for node, sub, order, shape in zip((q, k, v), (lay.q_sub, lay.k_sub, lay.v_sub),
                                       (lay.lead + lay.group + lay.i + lay.d, lay.lead + lay.j + lay.d,
                                        lay.lead_pv + lay.j + lay.e), lay.shapes()):
        if sub != order:
            node = graph.call_method("permute", (node, *[sub.index(c) for c in order]))
        if not _same_shape(shape, (lay.sizes[c] for c in order)):
            node = graph.call_method("reshape", (node, tuple(shape)))
        out.append(node)
    return out


def _from_op_layout(graph: torch.fx.Graph, lay: Layout, out: Node) -> Node:
    """The op's (B, H, T, E) output back in the user's layout ``o_sub``."""
    order = lay.lead_pv + lay.group + lay.i + lay.e
    shape = tuple(lay.sizes[c] for c in order)
    if len(shape) != 4 or not _same_shape(shape[:2], lay.shapes()[0][:2]):
        out = graph.call_method("reshape", (out, shape))
    if order != lay.o_sub:
        out = graph.call_method("permute", (out, *[order.index(c) for c in lay.o_sub]))
    return out


def _block_layout(bt: BlockTerm, lay: Layout) -> Union[str, None]:
    """Why the block mask's leading dims cannot be served in this layout, or None."""
    bm = example_value(bt.mask)
    n = bm.dim() - 2
    if n > len(lay.s_lead):
        return f"block mask {tuple(bm.shape)} has more leading dims than the scores"
    for c, size in zip(lay.s_lead[len(lay.s_lead) - n:], bm.shape[:n]):
        if c in lay.group and not _same(size, 1):
            return (f"block mask has {size} entries along the query-head group dim '{c}': the query heads of a "
                    "KV group do not share one selection")
        if not (_same(size, 1) or _same(size, lay.sizes[c])):
            return f"block mask {tuple(bm.shape)} does not broadcast against the scores"
    return None


def _block_to_op_layout(graph: torch.fx.Graph, node: Node, lay: Optional[Layout], shape: tuple) -> Node:
    """A block-level tensor of ``shape`` (…, NQ, X), aligned with the scores' leading dims, as
    (B|1, H_kv|1, NQ, X)."""
    if lay is None or (lay.s_lead == lay.lead and len(lay.lead) <= 2):
        return node  # already (B, H_kv)-aligned from the right; the table helpers broadcast
    n = len(shape) - 2
    full = (1,) * (len(lay.s_lead) - n) + tuple(shape)
    order = lay.lead + lay.group
    sizes = [full[lay.s_lead.index(c)] for c in order]
    if n < len(lay.s_lead):
        node = graph.call_method("reshape", (node, full))
    perm = [lay.s_lead.index(c) for c in order]
    if perm != sorted(perm):
        node = graph.call_method("permute", (node, *perm, len(full) - 2, len(full) - 1))
    front = sizes[:max(len(lay.lead) - 1, 0)]
    if any(s != 1 for s in front) and any(s == 1 for s in front):  # flattening needs them all full
        node = graph.call_method("expand", (node, *[lay.sizes[c] for c in lay.lead[:-1]], *sizes[len(front):],
                                                -1, -1))
        front = [lay.sizes[c] for c in lay.lead[:-1]]
    hkv = sizes[len(lay.lead) - 1] if lay.lead else 1
    return graph.call_method("reshape", (node, (math.prod(front), hkv, *shape[-2:])))


def _softmax_input(node: Any) -> Optional[Node]:
    if not isinstance(node, Node):
        return None
    if is_function(node, *SOFTMAX) or is_method(node, "softmax"):
        dim = arg(node, 1, "dim")
        if isinstance(dim, int) and _ndim(node) and dim % _ndim(node) == _ndim(node) - 1:
            return node.args[0]
    return None


def _peel_probabilities(p: Any, leading: bool = False) -> tuple[Optional[Node], Optional[str]]:
    """The softmax behind the PV matmul's left operand, through casts and inactive dropout
    (and, with ``leading``, reshapes of the leading dims: Bloom's ``view(B * H, T, T)``)."""
    shared = False  # a cast of the probabilities used elsewhere (or written in place)
    while isinstance(p, Node):
        if _softmax_input(p) is not None:
            if shared:
                return None, "the attention probabilities have other users (the dense T x T matrix is needed anyway)"
            return p, None
        shared = shared or len(p.users) != 1
        if is_method(p, "to", "type_as", "float", "half", "bfloat16") or is_function(p, torch.Tensor.to) or (
                leading and (_leading_reshape(p) is not None or is_method(p, "type"))):
            p = p.args[0]
            continue
        if is_function(p, F.dropout, torch.dropout, torch.nn.functional.dropout):
            prob, training = arg(p, 1, "p", 0.5), arg(p, 2, "training", True)
            if _number(prob) == 0.0 or training is False:
                p = p.args[0]
                continue
            if isinstance(prob, Node):  # dynamic=True: floats are graph inputs, p may change
                return None, "dropout on the attention probabilities has p as a graph input (dynamic=True), not provably 0"
            return None, "dropout on the attention probabilities is active"
        return None, None
    return None, None


def _peel_scores(node: Node, reader: Node) -> tuple[Node, float, Visible]:
    """Undo masks and scalings from the softmax input back to q k^T (``reader``: the softmax)."""
    vis = Visible()
    scale = 1.0
    while True:
        for m in _inplace_masks(node, reader):
            vis = vis & visible_set(m, False)
        if reader is not node and isinstance(node, Node) and _leading_reshape(reader) is None \
                and not _same_shape(getattr(example_value(reader), "shape", ()) or (None,),
                                    getattr(example_value(node), "shape", ()) or (None,)):
            raise NotAMask("the mask broadcasts the scores to more dims")
        reader = node
        if is_method(node, "masked_fill") or is_function(node, torch.masked_fill):
            value = arg(node, 2, "value")
            if not _is_masked_value(value):
                raise NotAMask(f"masked_fill value {value!r} is not -inf or a large negative number")
            vis = vis & visible_set(arg(node, 1, "mask"), False)
            node = node.args[0]
            continue
        if is_function(node, torch.where) and len(node.args) == 3:
            m, a, b = node.args
            if _is_masked_value(b) and isinstance(a, Node):
                vis, node = vis & visible_set(m, True), a
                continue
            if _is_masked_value(a) and isinstance(b, Node):
                vis, node = vis & visible_set(m, False), b
                continue
            raise NotAMask("torch.where does not choose between the scores and -inf")
        if (is_function(node, operator.add, operator.iadd, torch.add) or is_method(node, "add", "add_")) \
                and len(node.args) == 2:  # ``scores += bias`` writes scores, which only this add reads
            if node.kwargs:
                raise NotAMask("additive term on the scores with alpha")
            a, b = node.args[0], node.args[1]
            # the bias is the side that parses as one (scores + bias1 + bias2 nests the adds);
            # the side that looks like the scores is tried as the scores first, for its reason
            looks = lambda x: _scores(_strip_scale(x)[0]) is not None or _is_masking(x)  # noqa: E731
            orders = sorted(((a, b), (b, a)), key=lambda sb: not looks(sb[0]))
            first_error = None
            for scores, bias in orders:
                try:
                    vis, node = vis & _additive_bias(bias), scores
                    break
                except NotAMask as exc:
                    first_error = first_error or exc
            else:
                if looks(a) or looks(b):
                    raise first_error
                raise NotAMask("additive term on the scores is not a recognisable mask")
            continue
        if _is_upcast(node):
            node = node.args[0]  # scores.float() before the softmax: exact, and the kernels accumulate in fp32
            continue
        if _row_max_shift(node) is not None:  # s - s.amax(-1, keepdim=True): the softmax is shift-invariant
            node = node.args[0]
            continue
        if _leading_reshape(node) is not None:  # GPT-2's scores.reshape(B, H, T, T) of a (B*H, T, T) bmm
            node = node.args[0]
            continue
        inner, c = _strip_scale(node, single=True)
        if inner is not node:
            scale *= c
            node = inner
            continue
        return node, scale, vis


def _leading_reshape(node: Any) -> Optional[Node]:
    """x for a reshape of x that keeps its last two dims (only the leading dims are split or merged)."""
    if not (is_method(node, "reshape", "view", "flatten", "unflatten") or
            is_function(node, torch.reshape, torch.flatten, torch.unflatten)) or not isinstance(node.args[0], Node):
        return None
    src, out = example_value(node.args[0]), example_value(node)
    if src is None or out is None or src.dim() < 2 or out.dim() < 2 or not _same_shape(src.shape[-2:], out.shape[-2:]):
        return None
    return node.args[0]


def _leading_move(node: Any) -> Optional[Node]:
    """x for data movement of a mask x that only touches its leading dims (every (T, T) slice is one
    of x's): leading reshapes, ``repeat`` with 1 for the last two dims, ``repeat_interleave`` on a
    leading dim (HF's ``mask.repeat_interleave(H, 0)`` to (B * H, T, T))."""
    if _leading_reshape(node) is not None:
        return node.args[0]
    out = example_value(node)
    if out is None or out.dim() < 2 or not isinstance(node, Node) or not node.args or not isinstance(node.args[0], Node):
        return None
    if is_method(node, "repeat") or is_function(node, torch.tile) or is_method(node, "tile"):
        reps = node.args[1:] if len(node.args) > 2 else node.args[1]
        reps = tuple(reps) if isinstance(reps, (list, tuple)) else (reps,)
        return node.args[0] if len(reps) >= 2 and tuple(reps[-2:]) == (1, 1) else None
    if is_method(node, "repeat_interleave") or is_function(node, torch.repeat_interleave):
        d = _dim(node, arg(node, 2, "dim"))
        return node.args[0] if d is not None and d < out.dim() - 2 and _ndim(node.args[0]) == out.dim() else None
    return None


def _is_upcast(node: Any) -> bool:
    """A cast to float32 (or to the same dtype) of a floating tensor: it changes no value."""
    if not (is_method(node, "float", "to", "type", "type_as") or is_function(node, torch.Tensor.to)):
        return False
    src, out = example_value(node.args[0]), example_value(node)
    return src is not None and out is not None and src.is_floating_point() and (
        out.dtype == src.dtype or out.dtype == torch.float32)


#: In-place ``masked_fill_(m, -big)`` writes on a bias that the bias reading accounts for (they only
#: mask more): not writes for the reading of what the bias is computed from.
_READ_WRITES: set = set()


def _writes(user: Node, node: Node, depth: int = 8) -> bool:
    """Whether ``user`` writes ``node`` in place, directly or through a view of it."""
    if user in _READ_WRITES:
        return False
    if writes_in_place(user) and user.args[0] is node:
        return True
    if depth and user.args and user.args[0] is node and (
            is_method(user, *_VIEW_METHODS, *_ALIAS_METHODS) or is_function(user, *_ALIAS_FUNCS)):
        return any(_writes(u, user, depth - 1) for u in user.users)
    return False


#: Ops whose result may share the input's storage (``m.to(torch.bool)`` of a bool mask is ``m``):
#: a write through them is a write to the input.
_ALIAS_METHODS = ("view_as", "reshape", "flatten", "to", "type", "type_as", "contiguous", "float", "bool", "half",
                  "bfloat16", "double", "int", "long", "detach", "narrow", "select", "diagonal", "as_strided", "t",
                  "mT", "T", "expand", "squeeze", "unsqueeze", "permute", "transpose")
_ALIAS_FUNCS = (operator.getitem, torch.Tensor.to, torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
                torch.permute, torch.transpose, torch.narrow, torch.select, torch.diagonal, torch.detach, torch.t)


def _inplace_masks(node: Any, reader: Node) -> list:
    """Masks that ``node.masked_fill_(m, -big)`` wrote before ``reader`` read node (Dynamo keeps
    the in-place call and lets later reads use node itself); any other in-place write refuses."""
    if not isinstance(node, Node):
        return []
    masks = []
    for user in node.users:
        if user is reader or not _writes(user, node):
            continue
        if is_method(user, "masked_fill_") and user.args[0] is node and _is_masked_value(arg(user, 2, "value")) \
                and _runs_before(user, reader):
            masks.append(arg(user, 1, "mask"))
            continue
        mask = _setitem_mask(user, node)
        if mask is not None and _is_masked_value(user.args[2]) and _runs_before(user, reader):
            masks.append(mask)  # ``s[m] = -inf`` / ``s[..., m] = -inf``: a masked_fill_ by m
            continue
        if is_function(user, operator.setitem):
            raise NotAMask(f"the scores are written in place by {_name(user)} (read as masking only as s[m] = -inf "
                           "or -big with a bool mask m over the trailing dims)")
        raise NotAMask(f"the scores are written in place by {_name(user)}")
    return masks


def _setitem_mask(user: Node, node: Node) -> Optional[Node]:
    """m for ``node[m] = x``, ``node[..., m] = x`` or ``node[:, :, m] = x`` with a bool m that
    indexes node's trailing dims: every entry where m (right-aligned) is True is written, as
    ``node.masked_fill_(m, x)`` writes it."""
    if not is_function(user, operator.setitem) or user.args[0] is not node:
        return None
    index = user.args[1]
    parts = list(index) if isinstance(index, tuple) else [index]
    mask = parts[-1]
    mv, nv = example_value(mask), example_value(node)
    if mv is None or nv is None or mv.dtype != torch.bool:
        return None
    lead = parts[:-1]
    if lead == [Ellipsis] or (all(_is_full_slice(x) for x in lead) and len(lead) + mv.dim() == nv.dim()):
        return mask if mv.dim() <= nv.dim() and _same_shape(mv.shape, nv.shape[nv.dim() - mv.dim():]) else None
    return None


def _is_full_slice(x: Any) -> bool:
    return isinstance(x, slice) and x == slice(None)


def _complementary_setitems(node: Node, reader: Node) -> Optional[tuple[Node, bool]]:
    """(m, negate) when the last writes to ``node`` before ``reader`` are ``node[m] = a`` and
    ``node[~m] = b`` (either order) with {a, b} = {0, -big}: then every entry was overwritten and
    node is ``where(m, a, b)`` (MoBA's ``gate[need_attend] = 0; gate[~need_attend] = -inf``;
    the gate's earlier values and writes only chose m)."""
    order = {n: idx for idx, n in enumerate(node.graph.nodes)}
    writes = sorted((u for u in node.users if _writes(u, node)), key=order.__getitem__)
    if len(writes) < 2 or order[writes[-1]] > order[reader] or not all(writes_in_place(u) for u in writes):
        return None  # a write through a view would run at a time its view node does not show
    prev, last = writes[-2:]
    masks = [_setitem_mask(u, node) for u in (prev, last)]
    if any(m is None for m in masks) or not _same_shape(example_value(masks[0]).shape, example_value(node).shape):
        return None
    for (m, a), (n, b) in (((masks[0], prev), (masks[1], last)), ((masks[1], last), (masks[0], prev))):
        if (is_function(n, *NOT) or is_method(n, "logical_not", "bitwise_not")) and n.args[0] is m:
            if _number(a.args[2]) == 0.0 and _is_masked_value(b.args[2]):
                return m, False
            if _is_masked_value(a.args[2]) and _number(b.args[2]) == 0.0:
                return m, True
    return None


def _runs_before(a: Node, b: Node) -> bool:
    n = a.next
    while n is not a and n.op != "root":
        if n is b:
            return True
        n = n.next
    return False


def _row_max_shift(node: Any) -> Optional[Node]:
    """s for ``s - s.amax(-1, keepdim=True)`` (also ``.detach()``, ``torch.amax``, ``s.max(-1,
    keepdim=True).values`` / ``[0]``): lucidrains' "stable softmax". Subtracting each row's own
    maximum leaves the softmax unchanged wherever eager is defined (a row whose maximum is -inf is
    an empty row, NaN in eager either way), so the shift is looked through."""
    if not isinstance(node, Node) or len(node.args) != 2 or node.kwargs \
            or not (is_function(node, operator.sub, torch.sub) or is_method(node, "sub")):
        return None
    s, m = node.args
    if not isinstance(s, Node) or not isinstance(m, Node):
        return None
    while is_method(m, "detach") or is_function(m, torch.detach):
        m = m.args[0]
    if (is_function(m, operator.getitem) and len(m.args) == 2 and m.args[1] == 0) \
            or (is_function(m, getattr) and len(m.args) == 2 and m.args[1] == "values"):
        m = m.args[0]
        if not (is_method(m, "max") or is_function(m, torch.max)):
            return None
    elif not (is_method(m, "amax") or is_function(m, torch.amax)):
        return None
    if not isinstance(m, Node) or not m.args or m.args[0] is not s:
        return None
    nd = _ndim(s)
    dim, keep = arg(m, 1, "dim"), arg(m, 2, "keepdim", False)
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    if nd is None or not isinstance(dim, int) or dim % nd != nd - 1 or keep is not True:
        return None
    return s


def _is_masking(node: Any) -> bool:
    return isinstance(node, Node) and (is_method(node, "masked_fill") or is_function(node, torch.where, torch.masked_fill))


def _scalar_constant(x: Any, product: Node) -> Optional[float]:
    """A positive finite number: a Python number, or a one-element tensor computed from no graph
    input (``torch.sqrt(torch.tensor(d))``, ``torch.tensor(d) ** -0.5``) whose product with the
    other operand keeps that operand's shape and dtype (a 0-d tensor does not promote the scores;
    a ``(1,)`` float32 tensor would promote bf16 scores, and is then not a plain scale)."""
    val = _number(x)
    if val is None and isinstance(x, Node):
        other = next((o for o in product.args[:2] if o is not x), None)
        xv, ov, pv = example_value(x), example_value(other), example_value(product)
        if xv is None or ov is None or pv is None or xv.numel() != 1 or xv.dtype == torch.bool \
                or pv.dtype != ov.dtype or not _same_shape(pv.shape, ov.shape):
            return None
        try:
            const = _constant_value(x)
        except NotAMask:
            return None
        if const is None or const.numel() != 1 or const.is_complex():
            return None
        val = float(const.reshape(()).item())
    return val if val is not None and 0 < val < math.inf else None


def _strip_scale(node: Any, single: bool = False) -> tuple[Any, float]:
    """(x, c) for ``x * c``, ``c * x``, ``x / c`` with a positive constant c (a number, or a
    one-element constant tensor: ``/ torch.sqrt(torch.tensor(d))``)."""
    scale = 1.0
    while isinstance(node, Node):
        if (is_function(node, operator.mul, operator.imul, torch.mul) or is_method(node, "mul", "mul_")) \
                and len(node.args) == 2 and not node.kwargs:  # ``scores *= c`` (MoBA) writes scores, which only this mul reads
            a, b = node.args
            cb = _scalar_constant(b, node) if isinstance(a, Node) else None
            ca = _scalar_constant(a, node) if cb is None and isinstance(b, Node) else None
            if cb is not None:
                node, scale = a, scale * cb
            elif ca is not None:
                node, scale = b, scale * ca
            else:
                break
        elif (is_function(node, operator.truediv, operator.itruediv, torch.div) or is_method(node, "div", "div_")) \
                and len(node.args) == 2 and not node.kwargs and isinstance(node.args[0], Node) \
                and _scalar_constant(node.args[1], node) is not None:
            node, scale = node.args[0], scale / _scalar_constant(node.args[1], node)
        else:
            break
        if single:
            break
    return node, scale


# ----------------------------------------------------------------------------- classification

def _explicit_site(pv_node: Node) -> Union[Site, str, None]:
    pv = _product(pv_node)
    if pv is None:
        return None
    p, v, p_sub, v_sub, o_sub = pv
    sm, why = _peel_probabilities(p, leading=True)
    if sm is None:
        return why or _masked_after_softmax(p)
    try:
        core, scale, vis = _peel_scores(_softmax_input(sm), sm)
    except NotAMask as exc:
        sv = example_value(sm)
        if sv is not None and sv.dim() >= 2 and not _same(sv.shape[-1], sv.shape[-2]):
            return None  # queries and keys of different lengths (NSA's compressed branch): never ours
        return str(exc) if _mentions_qk(_softmax_input(sm)) else None
    sc = _scores(core)
    if sc is None:
        if (vis.block is not None or vis.lo is not None or vis.hi not in (None, 0)) and _mentions_qk(core):
            return (f"the scores are computed on by {_name(core)} between q k^T and the mask (e.g. Gemma 2's "
                    "tanh soft-capping): only constant scales are supported")
        return None
    if len(sm.users) != 1:
        return "the attention probabilities have other users (the dense T x T matrix is needed anyway)"
    if sc.bias is not None:
        try:
            vis = vis & _additive_bias(sc.bias)
        except NotAMask as exc:
            return str(exc)
    lay = _layout(sc, core, p, v, p_sub, v_sub, o_sub, pv_node)
    if isinstance(lay, str):
        return lay
    if vis.block is not None and lay.lead_pv != lay.lead:
        return "block mask on scores reshaped across their leading dims: its heads cannot be matched to q's"
    return Site(pv_node, sc.q, sc.k, v, scale * sc.alpha, vis, None if lay.identity() else lay)


def _masked_after_softmax(p: Any) -> Optional[str]:
    """The reason for probabilities zero-filled after the softmax of a band or block mask
    (``softmax(...).masked_fill(~m, 0)``), reported only where the softmax itself would be ours."""
    if not isinstance(p, Node):
        return None
    if (is_method(p, "masked_fill") or is_function(p, torch.masked_fill)) and _number(arg(p, 2, "value")) == 0:
        inner = p.args[0]
    elif is_function(p, torch.where) and len(p.args) == 3 and 0.0 in (_number(p.args[1]), _number(p.args[2])):
        inner = p.args[2] if _number(p.args[1]) == 0 else p.args[1]
    else:
        return None
    sm, _ = _peel_probabilities(inner)
    if sm is None:
        return None
    try:
        core, _, vis = _peel_scores(_softmax_input(sm), sm)
    except NotAMask:
        return None
    sv = example_value(sm)
    if _scores(core) is None or sv is None or sv.dim() < 2 or not _same(sv.shape[-1], sv.shape[-2]) \
            or (vis.block is None and vis.lo is None and vis.hi in (None, 0)):
        return None
    return (f"the attention probabilities are masked again after the softmax ({_name(p)}, fill 0): only casts "
            "and inactive dropout are looked through between the softmax and P @ V")


def _mentions_qk(node: Any, depth: int = 6) -> bool:
    """Whether q k^T is among the first inputs of node: reasons are only worth reporting for attention."""
    if not isinstance(node, Node) or depth == 0:
        return False
    val = example_value(node)
    if _scores(node) is not None and val is not None and _same(val.shape[-1], val.shape[-2]):
        return True  # square: a matmul into a softmax over other sizes is a linear layer, not attention
    return any(_mentions_qk(n, depth - 1) for n in node.all_input_nodes)


def _sdpa_site(node: Node) -> Union[Site, str, None]:
    if not is_function(node, *SDPA):
        return None
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    dropout = arg(node, 4, "dropout_p", 0.0)
    causal = arg(node, 5, "is_causal", False)
    scale = arg(node, 6, "scale")
    if mask is None:
        return None  # dense or causal SDPA stays SDPA
    if causal:
        return "is_causal together with attn_mask"
    if _number(dropout) != 0.0:
        return f"dropout_p={dropout} is not supported"
    if scale is not None and _number(scale) is None:
        return "scale is not a constant"
    val = example_value(mask)
    try:
        vis = visible_set(mask, True) if val is not None and val.dtype == torch.bool else _additive_bias(mask)
    except NotAMask as exc:
        return str(exc)
    return Site(node, q, k, v, _number(scale) if scale is not None else None, vis)


def _op_shapes(site: Site) -> list:
    """q, k, v shapes as the op will take them."""
    if site.layout is not None:
        return list(site.layout.shapes())
    return [tuple(example_value(n).shape) for n in (site.q, site.k, site.v)]


def _refusal(site: Site, gqa_ok: bool) -> Optional[str]:
    vals = [example_value(n) for n in (site.q, site.k, site.v)]
    if any(v is None for v in vals):
        return "shapes unknown (no example values)"
    if site.layout is not None and site.layout.group:
        gqa_ok = True  # the group letters say which query heads share a KV head
    q, k, v = (tuple(s) for s in _op_shapes(site))  # (B, H, T, D) as the op will see them
    if len(q) != 4 or len(k) != 4 or len(v) != 4:
        return "q, k, v are not 4-D (B, H, T, D)"
    if site.layout is None and len(k) == len(v) == 4 and _same(k[-1], v[-1]) and _symbolic(*k[:3], *v[:3]):
        for a, b in zip(k[:3], v[:3]):  # SDPA: attn @ v needs v's (B, H, T) to be k's
            _same_as_required(a, b)
        q, k, v = (tuple(s) for s in _op_shapes(site))
    if not _same_shape(k, v) or not _same(q[-1], k[-1]) or not _same(q[0], k[0]):
        return f"q {q}, k {k}, v {v} are not self-attention shapes"
    if not _same(q[2], k[2]):
        return f"query length {q[2]} differs from key length {k[2]} (cross-attention or KV cache)"
    if not _same(q[1], k[1]) and not (gqa_ok and not _same(k[1], 0) and _same(q[1] % k[1], 0)):
        return f"query heads {q[1]} and key heads {k[1]} do not match"
    if site.layout is not None and _symbolic(*site.layout.sizes.values()) and _layout_reshapes(site):
        return ("dynamic shapes: the layout needs q, k, v (or the output, or the block mask) reshaped to the "
                "op's (B, H, T, D) with symbolic sizes, which is not supported yet (permutes are)")
    if _symbolic(q[-1]) and site.scale is None:
        return "dynamic shapes: the head dim is symbolic, so the default scale 1/sqrt(D) is not a constant"
    if site.layout is not None and site.vis.block is not None:
        reason = _block_layout(site.vis.block, site.layout)
        if reason is not None:
            return reason
    for t in vals:
        if t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype} is not supported (float32, bfloat16, float16)"
        if t.device.type not in ("cpu", "cuda"):
            return f"device {t.device.type} is not supported"
    if len({t.dtype for t in vals}) != 1:
        return "q, k, v have different dtypes"
    return None


def _layout_reshapes(site: Site) -> bool:
    """Whether the rewrite would reshape (not only permute) q, k, v, the output or the block
    mask between the user's layout and the op's: those reshapes take the sizes as constants."""
    lay = site.layout
    for sub, order, shape in zip((lay.q_sub, lay.k_sub, lay.v_sub),
                                 (lay.lead + lay.group + lay.i + lay.d, lay.lead + lay.j + lay.d,
                                  lay.lead_pv + lay.j + lay.e), lay.shapes()):
        if not _same_shape(shape, (lay.sizes[c] for c in order)):
            return True
    shape = tuple(lay.sizes[c] for c in lay.lead_pv + lay.group + lay.i + lay.e)
    if len(shape) != 4 or not _same_shape(shape[:2], lay.shapes()[0][:2]):
        return True
    return site.vis.block is not None and not (lay.s_lead == lay.lead and len(lay.lead) <= 2)


def _blocks_tile(n: Any, T: Any, S: int) -> bool:
    """Whether n is provably ceil(T / S) (either spelling of the ceiling, for a symbolic T)."""
    return _same(n, -(-T // S)) or _same(n, (T + S - 1) // S)


def _classify(site: Site) -> Union[str, tuple[str, Any], None]:
    """("window", w) / ("selected", causal) / None (plain causal or dense: not ours) / a reason."""
    vis = site.vis
    T = _op_shapes(site)[0][2]
    if vis.block is None:
        if vis.hi is None and vis.lo is None:
            return None
        if vis.hi == 0 and vis.lo is None:
            return None
        if vis.hi == 0 and vis.lo is not None and vis.lo <= 0:
            return ("window", 1 - vis.lo)
        if vis.hi is None or vis.hi > 0:
            ahead = "every later key" if vis.hi is None else f"keys up to i+{vis.hi}"
            why = f"{ahead} visible: the window kernel is causal only"
        else:
            why = "the query's own key is hidden"
        return f"diagonal band {vis.lo} <= j - i <= {vis.hi} is not a causal sliding window ({why})"
    if vis.lo is not None or vis.hi not in (None, 0):
        return f"block mask combined with the band {vis.lo} <= j - i <= {vis.hi} (only causal is supported)"
    bt = vis.block
    S = bt.size
    if S < 16 or S & (S - 1):
        return f"block size {S} is not a power of two >= 16"
    bm = example_value(bt.mask)
    qb = bt.query_block or S
    if bm is None or bm.dim() < 2 or not _blocks_tile(bm.shape[-1], T, S) or not _blocks_tile(bm.shape[-2], T, qb):
        why = " (not provably, for a symbolic T)" if _symbolic(T) else ""
        return f"block mask shape {tuple(bm.shape) if bm is not None else '?'} does not tile T={T} by {S}{why}"
    return ("selected", vis.hi == 0)


# ----------------------------------------------------------------------------- windowed layouts (probe-verified)
#
# Implementations such as local-attention's LocalAttention never build a T x T mask: they
# cut q into windows of n tokens, gather each window's keys (pad + unfold/cat of the
# neighbouring windows) into m slots, and mask (window, row, slot) with constants built
# from aranges. Which token sits in which slot is pure data movement, and the masks
# depend on no input, so instead of pattern-matching each einops spelling the pass
# *evaluates* those subgraphs at compile time: once on position probes (each token's
# id in every feature) and once for the constant masks. The (query, key) visibility
# that results is then checked to be a causal window or a causal block-local band.

_MOVE_METHODS = ("reshape", "view", "permute", "transpose", "contiguous", "unsqueeze", "squeeze", "flatten",
                 "unflatten", "movedim", "moveaxis", "unfold", "expand", "expand_as", "clone", "swapaxes",
                 "repeat", "repeat_interleave", "tile", "flip", "roll", "detach")
_MOVE_FUNCS = (torch.reshape, torch.cat, torch.concat, torch.permute, torch.transpose, torch.unsqueeze,
               torch.squeeze, torch.flatten, torch.movedim, torch.narrow, operator.getitem, F.pad, torch._C._nn.pad,
               torch.repeat_interleave, torch.tile, torch.stack, torch.flip, torch.roll, torch.detach)
# ``detach`` moves no data: the layout is evaluated through it, and the rewrite detaches the op's
# operands where eager has no gradient to them (``_grad_as_eager``), whatever cut it off.

#: Compile-time evaluation limit (elements per intermediate): position probes are int32 copies
#: of q, k, v, so a 64k-token, 16-head, D=128 layer (134M) fits; masks are far smaller.
_MAX_EVAL_NUMEL = 1 << 28


class NotEvaluable(Exception):
    pass


def _is_move(node: Node) -> bool:
    if is_function(node, operator.getitem) and example_value(node.args[0]) is None:
        return False  # picking an output of a multi-output op (split, chunk, topk): a source, not a move
    return is_method(node, *_MOVE_METHODS) or is_function(node, *_MOVE_FUNCS)


_VIEW_METHODS = ("view", "expand", "expand_as", "unsqueeze", "squeeze", "permute", "transpose", "movedim",
                 "moveaxis", "swapaxes", "unflatten", "unfold")


def _evaluate(node: Any, env: dict, memo: dict, on_gather: Any = None) -> Any:
    """Run the subgraph behind ``node`` on real tensors; nodes in ``env`` are probes.

    A node that depends on a probe must be pure data movement, so the probe's ids
    survive; anything else may be evaluated only if it depends on no graph input.
    ``on_gather(x, dim, index)``, when given, evaluates a ``gather`` of probes (see the
    gathered layouts below). Views are computed whatever their size (an ``expand`` of a
    probe costs nothing); anything that allocates is limited to ``_MAX_EVAL_NUMEL``.
    """
    if not isinstance(node, Node):
        if isinstance(node, (list, tuple)):
            vals = [_evaluate(n, env, memo, on_gather) for n in node]
            return type(node)(v[0] for v in vals), any(v[1] for v in vals)
        return node, False
    if node in env:
        return env[node], True
    if node in memo:
        return memo[node]
    if node.op != "call_function" and node.op != "call_method":
        raise NotEvaluable(f"{node.op} {node.target}")
    if node.op == "call_method" and str(node.target).endswith("_"):
        raise NotEvaluable("in-place method")
    name = str(getattr(node.target, "__name__", node.target))
    if "rand" in name or "dropout" in name or "bernoulli" in name:
        raise NotEvaluable("random op")
    args = [_evaluate(a, env, memo, on_gather) for a in node.args]
    kwargs = {k: _evaluate(a, env, memo, on_gather) for k, a in node.kwargs.items()}
    tainted = any(t for _, t in args) or any(t for _, t in kwargs.values())
    a = [x for x, _ in args]
    kw = {k: x for k, (x, _) in kwargs.items()}
    if "device" in kw:
        kw["device"] = "cpu"
    if tainted and on_gather is not None and _is_gather(node):
        out = on_gather(a[0], arg(node, 1, "dim") if node.op == "call_method" else a[1],
                        kw.get("index", a[2] if len(a) > 2 else None))
        memo[node] = (out, True)
        return memo[node]
    if tainted and not _is_move(node):
        raise NotEvaluable(f"{_name(node)} computes on the attention inputs")
    val = example_value(node)
    if val is not None and val.numel() > _MAX_EVAL_NUMEL and not (
            is_method(node, *_VIEW_METHODS) or _viewable(node, a)):
        raise NotEvaluable("too large to evaluate at compile time")
    out = getattr(a[0], node.target)(*a[1:], **kw) if node.op == "call_method" else node.target(*a, **kw)
    memo[node] = (out, tainted)
    return memo[node]


def _viewable(node: Node, a: list) -> bool:
    """Whether a reshape / basic index of ``a[0]`` is a view (no allocation)."""
    if not a or not isinstance(a[0], torch.Tensor):
        return False
    if is_method(node, "reshape", "flatten") or is_function(node, torch.reshape, torch.flatten):
        val = example_value(node)
        try:
            a[0].view(tuple(val.shape))
            return True
        except RuntimeError:
            return False
    if is_function(node, operator.getitem):
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in idx)
    return False


def _is_gather(node: Any) -> bool:
    return is_method(node, "gather") or is_function(node, torch.gather)


def _chain(node: Any) -> list[Node]:
    """node and what it is moved from, back to the value that the data movement starts from."""
    out = []
    while isinstance(node, Node):
        out.append(node)
        if not _is_move(node):
            break
        first = node.args[0]
        if isinstance(first, (list, tuple)):
            if len(first) != 1:
                break  # a cat of several tensors: a source of its own
            first = first[0]
        node = first
    return out


def _source(node: Any) -> Optional[Node]:
    """The tensor that a chain of data-movement ops starts from (a graph input or a computed value)."""
    chain = _chain(node)
    return chain[-1] if chain else None


def _kv_sources(kw: Node, vw: Node, q: Node) -> tuple[Optional[Node], Optional[Node]]:
    """The earliest k and v along their gathers that have q's layout (..., T, D) and the same shape.

    Ties broken toward fewer heads, so a GQA ``repeat`` of K/V is undone and the kernel
    serves the group (k may stop at a rotary embedding while v goes back to a projection).
    """
    qv = example_value(q)

    def cands(n: Node) -> list[Node]:
        res = []
        for c in reversed(_chain(n)):
            val = example_value(c)
            if val is not None and val.dim() == qv.dim() and tuple(val.shape[-2:]) == tuple(qv.shape[-2:]):
                res.append(c)
        return res

    ks, vs = cands(kw), cands(vw)
    pairs = [(a, b) for a in ks for b in vs if example_value(a).shape == example_value(b).shape]
    if not pairs:
        return (ks[0] if ks else None), (vs[0] if vs else None)
    return min(pairs, key=lambda ab: (example_value(ab[0]).numel(), ks.index(ab[0]) + vs.index(ab[1])))


def _probe(node: Node) -> torch.Tensor:
    """Each token's id + 1 in all its features: ids stay >= 1, so pad constants (0, -1) stand out."""
    val = example_value(node)
    ids = torch.arange(1, val[..., 0].numel() + 1, dtype=torch.int32).reshape(val.shape[:-1])
    return ids[..., None].expand(val.shape).clone()


def _masks_on(node: Node, reader: Node) -> tuple[Node, float, list[tuple[Any, bool]]]:
    """Peel masked_fill / where / scale from the softmax input: (scores, scale, [(mask, visible_when)]).
    NotAMask when the scores are written in place other than by ``masked_fill_(m, -big)``."""
    masks: list[tuple[Any, bool]] = []
    scale = 1.0
    while True:
        masks += [(m, False) for m in _inplace_masks(node, reader)]
        reader = node
        if (is_method(node, "masked_fill") or is_function(node, torch.masked_fill)) \
                and _is_masked_value(arg(node, 2, "value")):
            masks.append((arg(node, 1, "mask"), False))
            node = node.args[0]
        elif is_function(node, torch.where) and len(node.args) == 3 and _is_masked_value(node.args[2]):
            masks.append((node.args[0], True))
            node = node.args[1]
        else:
            inner, c = _strip_scale(node, single=True)
            if inner is node:
                return node, scale, masks
            node, scale = inner, scale * c


# ----------------------------------------------------------------------------- rotary in the window frame
#
# LocalAttention(dim=...) (the package's own usage) rotates the *window-gathered* q and k:
# ``x * cos(X) + rotate_half(x) * sin(X)`` with ``X = cat(outer(t, inv_freq), same)`` and
# ``t = arange(m)``, the keys' slots at positions 0..m-1 and the queries at the last n of
# them. Plain RoPE is relative: q.k only depends on q_pos - k_pos, and in the window frame
# q_pos - k_pos equals the tokens' difference (up to one shift for the whole site), so the
# same rotary applied in token space (positions = token index) gives the same scores.
# That is proved per site: the rotary is matched structurally (sum of the cos and sin
# terms, rotate_half replayed on a probe, other factors constants equal to 1), the
# positions of every (row, feature) of X are evaluated (the outer product replaced by a
# probe of its (row, column), ``t`` evaluated), and for every visible (query row, key slot)
# q_pos - k_pos - (token_i - token_j) must be one constant. xpos (a position-dependent
# scale) is refused: it is not purely relative.

_ROPE_EXACT = 1 << 24  # positions (floats in inv_freq's dtype) are exact integers below this
_SPLIT_METHODS = ("unbind", "chunk", "split", "tensor_split")
_SPLIT_FUNCS = (torch.unbind, torch.chunk, torch.split, torch.tensor_split)
_POS_CASTS = (torch.float32, torch.float64, torch.int64, torch.int32)


@dataclasses.dataclass
class WindowRotary:
    x: Node              # the window-gathered tensor that is rotated
    inv: Node            # inverse frequencies (D/2,), as the graph gives them
    pos: torch.Tensor    # float64, x.shape[:-1]: each row's position in the rotary's frame


def _is_split(node: Any) -> bool:
    return is_method(node, *_SPLIT_METHODS) or is_function(node, *_SPLIT_FUNCS)


def _replay(node: Any, env: dict, memo: dict) -> Any:
    """Data movement of the nodes in ``env`` only (views, reshapes, cat, slicing, unbind /
    chunk / split and their items), replayed on their probes; anything else raises."""
    if isinstance(node, (list, tuple)):
        return type(node)(_replay(n, env, memo) for n in node)
    if isinstance(node, dict):
        return {k: _replay(n, env, memo) for k, n in node.items()}
    if not isinstance(node, Node):
        return node
    if node in env:
        return env[node]
    if node in memo:
        return memo[node]
    item = is_function(node, operator.getitem) and _is_split(node.args[0])
    if not (item or _is_split(node) or _is_move(node)) or (
            node.op == "call_method" and str(node.target).endswith("_")):
        raise NotEvaluable(f"{_name(node)} is not data movement")
    a, kw = _replay(list(node.args), env, memo), _replay(dict(node.kwargs), env, memo)
    out = getattr(a[0], node.target)(*a[1:], **kw) if node.op == "call_method" else node.target(*a, **kw)
    memo[node] = out
    return out


def _move_leaves(node: Any, seen: set) -> set:
    """The non-movement nodes that a chain of data movement reads."""
    if isinstance(node, (list, tuple)):
        return set().union(*(_move_leaves(n, seen) for n in node)) if node else set()
    if not isinstance(node, Node) or node in seen:
        return set()
    seen.add(node)
    if _is_move(node) and not (node.op == "call_method" and str(node.target).endswith("_")):
        return _move_leaves(list(node.args), seen) | _move_leaves(list(node.kwargs.values()), seen)
    return {node}


def _factors(node: Any, stop: Any = None) -> list:
    """The factors of a product tree (``stop``: a subproduct kept as one factor)."""
    ops = None if node is stop else mul_operands(node)
    return [node] if ops is None else _factors(ops[0], stop) + _factors(ops[1], stop)


def _subproducts(node: Any) -> list:
    ops = mul_operands(node)
    return [node] + ([] if ops is None else _subproducts(ops[0]) + _subproducts(ops[1]))


def _trig(node: Any) -> Optional[str]:
    for name, fn in (("cos", torch.cos), ("sin", torch.sin)):
        if is_method(node, name) or is_function(node, fn):
            return name
    return None


def _outer(node: Any) -> Optional[tuple[Any, Any]]:
    """(t, inv) for ``einsum('i,j->ij', t, inv)`` / ``outer(t, inv)``."""
    if is_function(node, torch.outer, torch.ger) or is_method(node, "outer", "ger"):
        return (node.args[0], node.args[1]) if len(node.args) == 2 else None
    e = _einsum(node)
    if e is not None and len(e[0]) == len(e[1]) == 1 and e[2] == e[0] + e[1] and e[0] != e[1]:
        return e[3], e[4]
    return None


def _rotary_angles(node: Node) -> Union[tuple[Node, torch.Tensor], str]:
    """(inv, pos) when ``node`` (what cos / sin read) is data movement of ``cat(outer(t, inv), ...)``
    whose element (..., f) has angle pos[...] * inv[f mod D/2]; pos float64 of node.shape[:-1]."""
    leaves = _move_leaves(node, set())
    if len(leaves) != 1:
        return "its angles are not data movement of one outer product (positions x inv_freq)"
    (outer,) = leaves
    ti = _outer(outer)
    if ti is None:
        return "its angles are not an outer product of positions and inv_freq"
    t, inv = ti
    iv, ov, xv = example_value(inv), example_value(outer), example_value(node)
    if iv is None or ov is None or xv is None or iv.dim() != 1 or ov.dim() != 2 \
            or iv.dtype not in (torch.float32, torch.float64) or ov.dtype != iv.dtype:
        return "inv_freq is not a float32 / float64 vector"
    h = iv.shape[0]
    if xv.dim() < 1 or xv.shape[-1] != 2 * h or ov.shape[1] != h:
        return "its angles do not cover the features as cat(freqs, freqs)"
    while isinstance(t, Node) and (is_method(t, "type_as", "float", "double", "to", "type", "long", "int")
                                   or is_function(t, torch.Tensor.to)):
        tv = example_value(t)
        if tv is None or tv.dtype not in _POS_CASTS:
            return "its positions are cast to a type that rounds them"
        t = t.args[0]
    try:
        tval = _evaluate(t, {}, {})[0]
        rows = ov.shape[0]
        code = (torch.arange(rows, dtype=torch.int64)[:, None] * h
                + torch.arange(h, dtype=torch.int64)[None, :] + 1)
        seen = _replay(node, {outer: code}, {})
    except NotEvaluable:
        return "its positions are not constants (the arange the package uses)"
    except Exception as exc:
        return f"its angles could not be evaluated ({type(exc).__name__})"
    if not isinstance(tval, torch.Tensor) or tval.dim() != 1 or tval.shape[0] != ov.shape[0] \
            or not isinstance(seen, torch.Tensor) or tuple(seen.shape) != tuple(xv.shape):
        return "its positions are not a vector over the angle rows"
    tval = tval.double()
    if not bool(torch.all(tval == torch.round(tval))) or bool((tval.abs() >= _ROPE_EXACT).any()):
        return "its positions are not exact integers"
    if bool((seen < 1).any()):
        return "its angles mix in constants"
    r, c = torch.div(seen - 1, h, rounding_mode="floor"), (seen - 1) % h
    if not bool(torch.all(c == torch.arange(2 * h) % h)):
        return "its angles do not cover the features as cat(freqs, freqs)"
    pos = tval[r]
    if not bool(torch.all(pos == pos[..., :1])):
        return "a row's features have different positions"
    return inv, pos[..., 0]


@dataclasses.dataclass
class RotaryMiss:
    reason: str
    inputs: list         # what the rotary may rotate: x when found, else the cos term's subproducts


def _window_sources(a: Any, b: Any) -> bool:
    """a and b (q and k, up to a constant scale) are data movement of two values of the same
    shape (or GQA heads): window gathers of self-attention inputs, not cross-attention."""
    a, b = _strip_scale(a)[0], _strip_scale(b)[0]
    if not isinstance(a, Node) or not isinstance(b, Node):
        return False
    sa, sb = _source(a), _source(b)
    va, vb = example_value(sa), example_value(sb)
    if sa is a or sb is b or va is None or vb is None:
        return False
    return va.shape == vb.shape or (va.dim() == vb.dim() == 4 and vb.shape[1] > 0 and va.shape[1] % vb.shape[1] == 0
                                    and (va.shape[0], *va.shape[2:]) == (vb.shape[0], *vb.shape[2:]))


def _window_rotary(node: Any) -> Union[WindowRotary, RotaryMiss, None]:
    """Match ``x * cos(X) [* 1] + rotate_half(x) * sin(X) [* 1]`` (either order); None when node
    is not a rotary at all, a RotaryMiss when it is one that cannot be moved to token space."""
    found: list = []
    out = _match_window_rotary(node, found)
    return RotaryMiss(out, found) if isinstance(out, str) else out


def _match_window_rotary(node: Any, found: list) -> Union[WindowRotary, str, None]:
    ops = add_operands(node)
    if ops is None:
        return None
    terms = [_factors(t) for t in ops]
    trig = [[f for f in fs if _trig(f)] for fs in terms]
    if not all(len(t) == 1 for t in trig) or sorted(_trig(t[0]) for t in trig) != ["cos", "sin"]:
        return None
    if _trig(trig[0][0]) == "sin":
        terms, trig, ops = terms[::-1], trig[::-1], ops[::-1]
    cos_term = ops[0]
    (cos,), (sin,) = trig
    found += [c for c in _subproducts(cos_term) if isinstance(c, Node) and cos not in _factors(c)]
    sin_rest = [f for f in terms[1] if f is not sin]
    # rotate_half(x) = cat((-x[..., D/2:], x[..., :D/2]), -1), replayed on a probe of x
    rh = [f for f in sin_rest if (is_function(f, torch.cat, torch.concat)) and isinstance(f.args[0], (list, tuple))
          and len(f.args[0]) == 2 and (is_function(f.args[0][0], operator.neg, torch.neg)
                                       or is_method(f.args[0][0], "neg"))]
    if len(rh) != 1:
        return "rotary embedding on the window-gathered q/k: no rotate_half (cat(-x2, x1)) in its sin term"
    rh = rh[0]
    x, err = None, "its rotate_half is not the half-split convention of its cos term's input"
    for cand in _subproducts(cos_term):
        if cos in _factors(cand):
            continue
        xv, rv = example_value(cand), example_value(rh)
        if not isinstance(cand, Node) or xv is None or rv is None or tuple(xv.shape) != tuple(rv.shape) \
                or xv.shape[-1] % 2 or xv.numel() > _MAX_EVAL_NUMEL:
            continue
        dim = arg(rh, 1, "dim", 0)
        if not isinstance(dim, int) or dim % xv.dim() != xv.dim() - 1:
            continue
        h = xv.shape[-1] // 2
        probe = torch.arange(1, xv.numel() + 1, dtype=torch.int64).reshape(xv.shape)
        try:
            neg_in = rh.args[0][0].args[0]
            a, b = _replay([neg_in, rh.args[0][1]], {cand: probe}, {})
        except Exception:
            continue
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) \
                and a.shape == b.shape == probe[..., h:].shape \
                and torch.equal(a, probe[..., h:]) and torch.equal(b, probe[..., :h]):
            x = cand
            break
    if x is None:
        return f"rotary embedding on the window-gathered q/k: {err}"
    found[:] = [x]
    cos_rest = [f for f in _factors(cos_term, stop=x) if f is not cos]
    xv, ov = example_value(x), example_value(node)
    if ov is None or tuple(ov.shape) != tuple(xv.shape) or ov.dtype != xv.dtype:
        return "rotary embedding on the window-gathered q/k changes its shape or dtype"
    # the other factors must be constants equal to 1 (xpos would be a position-dependent scale)
    for f in [f for f in cos_rest if f is not x] + [f for f in sin_rest if f is not rh]:
        if _number(f) is not None:
            if _number(f) != 1:
                return "rotary embedding on the window-gathered q/k is scaled by a constant other than 1"
            continue
        try:
            val = _evaluate(f, {}, {})[0] if isinstance(f, Node) else None
        except Exception:
            val = None
        if val is None:
            return ("rotary embedding on the window-gathered q/k is scaled by a computed factor "
                    "(e.g. xpos): not purely relative")
        if not isinstance(val, torch.Tensor) or not bool(torch.all(val == 1)):
            return "rotary embedding on the window-gathered q/k is scaled by a constant other than 1"
    angles = [_rotary_angles(n.args[0]) for n in (cos, sin)]
    for a in angles:
        if isinstance(a, str):
            return f"rotary embedding on the window-gathered q/k: {a}"
    (inv, pc), (inv2, ps) = angles
    if inv is not inv2 or pc.shape != ps.shape or not torch.equal(pc, ps):
        return "rotary embedding on the window-gathered q/k: cos and sin read different angles"
    try:
        pos = torch.broadcast_to(pc[..., None], tuple(xv.shape[:-1]) + (1,))[..., 0]
    except RuntimeError:
        return "rotary embedding on the window-gathered q/k: its angles do not broadcast over the rows"
    return WindowRotary(x, inv, pos.contiguous())


def _token_rotary(graph: torch.fx.Graph, x: Node, like: torch.Tensor, inv: Node, shift: int, cache: dict) -> Node:
    """``x * cos(F) + rotate_half(x) * sin(F)``, ``F = cat(outer(arange(T) + shift, inv), same)``:
    the package's rotary at token positions (x is (..., T, D) as ``like``; the arithmetic is
    left to Inductor). ``cache`` shares cos / sin between q and k."""
    T, h = like.shape[-2], like.shape[-1] // 2
    if (T, shift) not in cache:
        pos = graph.call_function(torch.arange, (shift, T + shift), {"device": like.device})
        pos = graph.call_method("type_as", (pos, inv))
        freqs = graph.call_function(torch.outer, (pos, inv))
        freqs = graph.call_function(torch.cat, ((freqs, freqs),), {"dim": -1})
        cache[T, shift] = (graph.call_method("cos", (freqs,)), graph.call_method("sin", (freqs,)))
    cos, sin = cache[T, shift]
    x1 = graph.call_function(operator.getitem, (x, (Ellipsis, slice(None, h))))
    x2 = graph.call_function(operator.getitem, (x, (Ellipsis, slice(h, None))))
    rh = graph.call_function(torch.cat, ((graph.call_function(operator.neg, (x2,)), x1),), {"dim": -1})
    out = graph.call_function(operator.add, (graph.call_function(operator.mul, (x, cos)),
                                             graph.call_function(operator.mul, (rh, sin))))
    if example_value(x) is not None:
        out.meta["example_value"] = example_value(x)  # same shape and dtype (checked on the window side)
    return out


@dataclasses.dataclass
class WindowedSite:
    q: Node
    k: Node
    v: Node
    out: Node          # the node whose value the op replaces (back in q's layout)
    scale: float
    kind: str          # "window" or "local"
    window: int = 0    # window: keys i-w+1..i
    block: int = 0     # local: block size; key blocks W-lookback..W+lookforward, whole unless causal
    lookback: int = 0
    lookforward: int = 0
    causal: bool = True
    rotary: Optional[tuple[Node, int]] = None  # (inv_freq, q's position shift): rotate q, k in token space


def _windowed_site(pv_node: Node) -> Union[WindowedSite, str, None]:
    pv = _pv(pv_node)
    if pv is None:
        return _per_token_window_site(pv_node)
    sm, _ = _peel_probabilities(pv[0])
    if sm is None or len(sm.users) != 1:
        return None
    try:
        core, scale, masks = _masks_on(_softmax_input(sm), sm)
    except NotAMask:
        return None  # written in place: the dense path reports it
    qk = _qk(core)
    if qk is None:
        return None
    qw, kw_, vw = qk[0], qk[1], pv[1]
    qw, s2 = _strip_scale(qw)
    scale *= s2
    sq, sk, sv = (example_value(n) for n in (qw, kw_, vw))
    if sq is None or sk is None or sq.shape[-2] == sk.shape[-2]:
        return None  # same length: a dense layout, handled by the mask algebra
    # a rotary applied after the window gather (local-attention's default): peeled here and
    # moved to token space once its positions are proved relative; anything else about a
    # rotary is reported only when it rotates a window gather (else: as before)
    rot_q, rot_k = _window_rotary(qw), _window_rotary(kw_)
    xs = [[r.x] if isinstance(r, WindowRotary) else r.inputs if isinstance(r, RotaryMiss) else [n]
          for r, n in ((rot_q, qw), (rot_k, kw_))]
    if (rot_q is not None or rot_k is not None) and any(_window_sources(a, b) for a in xs[0] for b in xs[1]):
        for r in (rot_q, rot_k):
            if isinstance(r, RotaryMiss):
                return f"windowed attention: {r.reason}"
        if rot_q is None or rot_k is None:
            return "windowed attention: a rotary embedding on only one of the window-gathered q, k"
        if rot_q.inv is not rot_k.inv:
            return "windowed attention: q and k are rotated with different inv_freq"
        qw, s3 = _strip_scale(rot_q.x)
        scale *= s3
        kw_ = rot_k.x
    else:
        rot_q = rot_k = None
    q = _source(qw)
    if q is qw and _source(kw_) is kw_:
        return None  # no window gather: cross-attention or a KV cache, reported by the dense path
    k, v = _kv_sources(kw_, vw, q) if q is not None and example_value(q) is not None else (None, None)
    if q is None or k is None or v is None:
        return "windowed attention whose q/k/v gathers are not pure data movement"
    qv, kv, vv = (example_value(n) for n in (q, k, v))
    if any(isinstance(d, torch.SymInt) for t in (qv, kv, vv, sq, sk) if t is not None for d in t.shape):
        return "windowed attention: dynamic shapes are not supported yet"
    if qv is None or kv is None or vv is None or kv.shape != vv.shape or qv.dim() < 2:
        return "windowed attention over k, v of different shapes"
    gqa = qv.dim() == 4 and kv.dim() == 4 and qv.shape[1] != kv.shape[1] and kv.shape[1] \
        and qv.shape[1] % kv.shape[1] == 0 and (qv.shape[0], *qv.shape[2:]) == (kv.shape[0], *kv.shape[2:])
    if qv.shape != kv.shape and not gqa:
        return "windowed attention over q, k, v of different shapes"
    try:
        rows = _evaluate(qw, {q: _probe(q)}, {})[0][..., 0].double()
        slots = _evaluate(kw_, {k: _probe(k)}, {})[0][..., 0].double()
        vslots = _evaluate(vw, {v: _probe(v)}, {})[0][..., 0].double()
        visible = torch.ones((), dtype=torch.bool)
        for m, when in masks:
            mv = _evaluate(m, {}, {})[0]
            if not isinstance(mv, torch.Tensor) or mv.dtype != torch.bool:
                raise NotEvaluable("mask is not boolean")
            visible = visible & (mv if when else ~mv)
    except NotEvaluable as exc:
        return f"windowed attention: {exc}"
    except Exception as exc:  # an op we cannot replay outside the graph
        return f"windowed attention: could not evaluate its layout ({type(exc).__name__})"
    return _window_layout(q, k, v, qv, kv, gqa, scale, rows, slots, vslots, visible, int(sq.shape[-2]),
                          rot_q, rot_k, pv_node, rows.to(torch.int32)[..., None].expand(example_value(pv_node).shape))


def _slot_and_feature(p_sub: str, v_sub: str, o_sub: str) -> Optional[tuple[str, str]]:
    """(key-slot letter, feature letter) of ``P @ V`` in subscripts, when it contracts exactly one
    dim of key slots and keeps one feature dim of V."""
    slot = (set(p_sub) & set(v_sub)) - set(o_sub)
    feat = (set(v_sub) & set(o_sub)) - set(p_sub)
    if len(slot) != 1 or len(feat) != 1 or set(o_sub) != (set(p_sub) - slot) | feat \
            or not set(v_sub) <= set(p_sub) | feat:
        return None
    return slot.pop(), feat.pop()


def _scores_over_slots(p: Node, p_sub: str, o_sub: str, slot: str, what: str, keys: str) -> Union[tuple, str, None]:
    """From the probabilities of a per-token or gathered layout back to its scores, q times the
    ``keys``: ``(scale, masks, q, keys, q_sub, k_sub, fl)`` in P's letters (``fl`` a fresh letter
    for the contracted feature dim), else a reason, or None when P is not a softmax at all."""
    sm, why = _peel_probabilities(p)
    if sm is None:
        return why  # not attention, or inactive dropout's reason
    if p_sub[-1] != slot:
        return f"{what}: the softmax is not over the key slots"
    if len(sm.users) != 1:
        return "the attention probabilities have other users (the dense T x T matrix is needed anyway)"
    try:
        core, scale, masks = _masks_on(_softmax_input(sm), sm)
    except NotAMask as exc:
        return f"{what}: {exc}"
    qk = _contraction(core)
    if qk is None or len(qk[4]) != len(p_sub):
        return f"{what}: the scores are not q times the {keys} ({_name(core)})"
    a, b, a_sub, b_sub, s_sub = qk
    fl = (set(a_sub) & set(b_sub)) - set(s_sub)
    if len(fl) != 1 or set(s_sub) != (set(a_sub) | set(b_sub)) - fl:
        return f"{what}: the scores do not contract one feature dim"
    fl = fl.pop()
    ren = dict(zip(s_sub, p_sub))
    ren[fl] = next(ch for ch in _LETTERS if ch not in p_sub + o_sub)  # V's letters are among these
    a_sub, b_sub = "".join(ren[x] for x in a_sub), "".join(ren[x] for x in b_sub)
    qn, kx, q_sub, k_sub = (b, a, b_sub, a_sub) if slot in a_sub else (a, b, a_sub, b_sub)
    return scale, masks, qn, kx, q_sub, k_sub, ren[fl]


def _per_token_window_site(pv_node: Node) -> Union[WindowedSite, str, None]:
    """Per-token windows: every query row contracts with its own key slots, cut from k by
    ``unfold`` (``F.pad(k, (0, 0, w - 1, 0)).unfold(-2, w, 1)``), ``einsum("bhtd,bhtwd->bhtw")`` or a
    matmul on ``(..., 1, d)`` rows. The layout is evaluated on probes as the windowed layouts are,
    each query row a window of one token (``n = 1``)."""
    c = _contraction(pv_node)
    if c is None:
        return None
    p, vw, p_sub, v_sub, o_sub = c
    dims = _slot_and_feature(p_sub, v_sub, o_sub)
    if dims is None:
        return None
    slot, feat = dims
    if p_sub[-1] != slot or not any(is_method(n, "unfold") for n in _chain(vw)):
        return None
    what = "per-token windowed attention"
    found = _scores_over_slots(p, p_sub, o_sub, slot, what, "window-gathered keys")
    if not isinstance(found, tuple):
        return found
    scale, masks, qn, kw, q_sub, k_sub, fl = found
    lead = p_sub[:-1]
    if slot in q_sub or set(q_sub) != set(lead) | {fl}:
        return f"{what}: the query operand is not one row per token"
    qn, s2 = _strip_scale(qn)
    scale *= s2
    q = _source(qn)
    k, v = _kv_sources(kw, vw, q) if q is not None and example_value(q) is not None else (None, None)
    if q is None or k is None or v is None:
        return f"{what} whose q/k/v gathers are not pure data movement"
    qv, kv, vv = (example_value(n) for n in (q, k, v))
    if any(isinstance(d, torch.SymInt) for t in (qv, kv, vv) if t is not None for d in t.shape):
        return f"{what}: dynamic shapes are not supported yet"
    if qv is None or kv is None or vv is None or kv.shape != vv.shape or qv.dim() < 2:
        return f"{what} over k, v of different shapes"
    gqa = qv.dim() == 4 and kv.dim() == 4 and qv.shape[1] != kv.shape[1] and kv.shape[1] \
        and qv.shape[1] % kv.shape[1] == 0 and (qv.shape[0], *qv.shape[2:]) == (kv.shape[0], *kv.shape[2:])
    if qv.shape != kv.shape and not gqa:
        return f"{what} over q, k, v of different shapes"
    try:
        rows, sub = _drop_letter(_evaluate(qn, {q: _probe(q)}, {})[0], q_sub, fl)
        rows = _align(rows.double(), sub, lead)
        slots, sub = _drop_letter(_evaluate(kw, {k: _probe(k)}, {})[0], k_sub, fl)
        slots = _align(slots.double(), sub, lead + slot)
        vslots, sub = _drop_letter(_evaluate(vw, {v: _probe(v)}, {})[0], v_sub, feat)
        vslots = _align(vslots.double(), sub, lead + slot)
        visible = torch.ones((), dtype=torch.bool)
        for m, when in masks:
            mv = _evaluate(m, {}, {})[0]
            if not isinstance(mv, torch.Tensor) or mv.dtype != torch.bool:
                raise NotEvaluable("mask is not boolean")
            visible = visible & (mv if when else ~mv)
    except NotEvaluable as exc:
        return f"{what}: {exc}"
    except Exception as exc:  # an op we cannot replay outside the graph
        return f"{what}: could not evaluate its layout ({type(exc).__name__})"
    try:
        if visible.dim() > len(p_sub) or torch.broadcast_shapes(rows.shape, slots.shape[:-1], vslots.shape[:-1],
                                                                 visible.shape[:-1]) != rows.shape:
            raise RuntimeError
        slots, vslots = (x.expand(*rows.shape, x.shape[-1]) for x in (slots, vslots))
        out_probe = _align(rows.to(torch.int32)[..., None].expand(*rows.shape, example_value(pv_node).shape[
            o_sub.index(feat)]), lead + feat, o_sub).expand(example_value(pv_node).shape)
    except RuntimeError:
        return f"{what}: the masks or key slots broadcast the query rows"
    visible = visible.unsqueeze(-2) if visible.dim() else visible
    return _window_layout(q, k, v, qv, kv, gqa, scale, rows[..., None], slots, vslots, visible, 1, None, None,
                          pv_node, out_probe)


def _window_layout(q: Node, k: Node, v: Node, qv: torch.Tensor, kv: torch.Tensor, gqa: bool, scale: float,
                   rows: torch.Tensor, slots: torch.Tensor, vslots: torch.Tensor, visible: torch.Tensor, n: int,
                   rot_q: Any, rot_k: Any, pv_node: Node, out_probe: torch.Tensor) -> Union[WindowedSite, str]:
    """Classify an evaluated window layout: ``rows`` (..., W, n) the query token ids + 1 of each
    window row, ``slots`` / ``vslots`` (..., W, m) the key / value token ids + 1 of its key slots,
    ``visible`` broadcastable to (..., W, n, m); ``out_probe`` the query token id + 1 of every
    element of P @ V (for moving the output back). ``n = 1``: per-token windows."""
    if not torch.equal(slots, vslots):
        return "windowed attention: keys and values are gathered differently"
    T = qv.shape[-2]
    vis = visible.expand(*rows.shape, slots.shape[-1])
    slot_ids = slots[..., None, :].expand(vis.shape)
    real = rows >= 1  # query rows that are padding (autopad) must be cropped from the output
    vis = vis[real]
    slot_ids = slot_ids[real] - 1
    row_ids = rows[real] - 1
    if bool((vis & (slot_ids < 0)).any()):
        return "windowed attention: padding slots are visible"
    if not torch.equal(torch.sort(row_ids).values, torch.arange(qv[..., 0].numel(), dtype=torch.float64)):
        return "windowed attention: query windows do not cover each token once"
    # the key's (batch, KV head) must be the query's (batch, head // G): GQA by contiguous groups
    G = qv.shape[1] // kv.shape[1] if gqa else 1
    row_lead = torch.div(row_ids, T, rounding_mode="floor")
    if gqa:
        b, h = torch.div(row_lead, qv.shape[1], rounding_mode="floor"), row_lead % qv.shape[1]
        row_lead = b * kv.shape[1] + torch.div(h, G, rounding_mode="floor")
    same = torch.div(slot_ids, T, rounding_mode="floor") == row_lead[:, None]
    if bool((vis & ~same).any()):
        return "windowed attention mixes heads or batches"
    i = (row_ids % T).long()
    j = torch.where(vis, slot_ids % T, float("inf")).reshape(i.numel(), -1)
    j_sorted = torch.sort(j, dim=-1).values
    cnt = vis.reshape(i.numel(), -1).sum(-1)
    jmin, jmax = j_sorted[:, 0], torch.where(cnt > 0, j_sorted.gather(1, (cnt - 1).clamp_min(0)[:, None])[:, 0], -1)
    steps = j_sorted[:, 1:] - j_sorted[:, :-1]
    inside = torch.arange(1, j.shape[1], dtype=torch.long)[None, :] < cnt[:, None]
    if not bool(torch.all((steps == 1) | ~inside)) or not bool(torch.all(cnt > 0)):
        return "windowed attention is not a contiguous window (gaps, or a query that sees no key)"
    rotary = None
    if rot_q is not None:
        # plain RoPE is relative: every visible (row, slot) must have q_pos - k_pos equal to the
        # tokens' difference plus one shift, which the token-space rotary then gives q
        shape = (*rows.shape, slots.shape[-1])
        if tuple(rot_q.pos.shape) != tuple(rows.shape) or tuple(rot_k.pos.shape) != tuple(slots.shape):
            return "windowed attention: rotary positions do not line up with the window rows"
        dq = rot_q.pos - (rows - 1) % T
        dk = rot_k.pos - (slots - 1) % T
        d = (dq[..., :, None] - dk[..., None, :]).expand(shape)[real][vis]
        if d.numel() == 0 or not bool(torch.all(d == d[0])) or abs(float(d[0])) + T >= _ROPE_EXACT \
                or float(d[0]) != round(float(d[0])):
            return ("windowed attention: the rotary positions of the window-gathered q/k are not the "
                    "token positions up to one shift (not purely relative)")
        rotary = (rot_q.inv, int(d[0]))
    if not bool(torch.all(jmax == i)):
        if n == 1 and bool(torch.any(jmax > i)):
            return (f"windowed attention looks ahead of the query (keys up to i+{int((jmax - i).max())}) at token "
                    "level: the sliding-window kernel is causal only")
        if n == 1:
            return "per-token windowed attention hides the query's own key: not a causal sliding window"
        return _non_causal_local(q, k, v, scale, i, jmin, jmax, n, T, rotary, pv_node, rows)
    out = _output_node(pv_node, out_probe, q)
    if isinstance(out, str):
        return out
    w = int(cnt.max())
    if bool(torch.all(jmin == (i - w + 1).clamp_min(0))):
        return WindowedSite(q, k, v, out, scale, "window", window=w, rotary=rotary)
    if n == 1:
        return "per-token windowed attention is not a sliding window (its windows differ in length)"
    S = n
    lookback = (int(i[-1]) // S * S - int(jmin[-1])) // S if i.numel() else 0
    if bool(torch.all(jmin == ((torch.div(i, S, rounding_mode="floor") - lookback) * S).clamp_min(0))):
        if S < 16 or S & (S - 1):
            return f"block-local attention with window {S}: not a power of two >= 16"
        return WindowedSite(q, k, v, out, scale, "local", block=S, lookback=lookback, rotary=rotary)
    return "windowed attention is neither a sliding window nor block-local"


def _non_causal_local(q: Node, k: Node, v: Node, scale: float, i: torch.Tensor, jmin: torch.Tensor,
                      jmax: torch.Tensor, S: int, T: int, rotary: Optional[tuple[Node, int]], pv_node: Node,
                      rows: torch.Tensor) -> Union[WindowedSite, str]:
    """A window that looks ahead: exact only as whole key blocks W-L..W+F around the query's
    block W (local-attention's ``causal=False`` without ``exact_windowsize``), which is selected
    attention with a static table and no causal bound; a token-level two-sided window is not
    (the window kernel sees keys i-w+1..i only)."""
    blk = torch.div(i, S, rounding_mode="floor")
    lookback = int((blk - torch.div(jmin, S, rounding_mode="floor")).max())
    lookforward = int((torch.div(jmax, S, rounding_mode="floor") - blk).max())
    block_aligned = bool(torch.all(jmin == ((blk - lookback) * S).clamp_min(0))) \
        and bool(torch.all(jmax == ((blk + lookforward + 1) * S - 1).clamp_max(T - 1)))
    if not block_aligned:
        ahead = int((jmax - i).max())
        return (f"windowed attention looks ahead of the query (keys up to i+{ahead}) at token level: the "
                "sliding-window kernel is causal only, and the window is not whole key blocks "
                "(selected attention)")
    if S < 16 or S & (S - 1):
        return f"block-local attention with window {S}: not a power of two >= 16"
    out = _output_node(pv_node, rows.to(torch.int32)[..., None].expand(example_value(pv_node).shape), q)
    if isinstance(out, str):
        return out
    return WindowedSite(q, k, v, out, scale, "local", block=S, lookback=lookback, lookforward=lookforward,
                        causal=False, rotary=rotary)


def _output_node(pv_node: Node, probe: torch.Tensor, q: Node, what: str = "windowed attention") -> Union[Node, str]:
    """Follow data movement after P @ V back to q's layout, proving by probe that token ids land home.

    ``probe`` holds, in P @ V's shape, the id of the query token each row was computed for.
    """
    node = pv_node
    target = example_value(q)
    while True:
        val = example_value(node)
        if val is not None and tuple(val.shape) == tuple(target.shape):
            break
        if len(node.users) != 1:
            return f"{what} output is used in the window layout"
        (user,) = node.users
        if not _is_move(user) or user.args[0] is not node:
            return f"{what} output is not moved back to the input layout"
        node = user
    try:
        back = _evaluate(node, {pv_node: probe}, {})[0]
    except Exception:
        return f"{what} output layout could not be evaluated"
    if not torch.equal(back, _probe(q)):
        return f"{what} output does not return each token to its place"
    return node


def _as_heads(graph: torch.fx.Graph, node: Node) -> Node:
    val = example_value(node)
    if val.dim() == 4:
        return node
    return graph.call_function(torch.reshape, (node, (1, -1, val.shape[-2], val.shape[-1])))


def _rewrite_windowed(graph: torch.fx.Graph, site: WindowedSite, anchor: Node, report: Report) -> None:
    qv = example_value(site.q)
    for t in (site.q, site.k, site.v):
        val = example_value(t)
        if val.dtype not in SUPPORTED_DTYPES or val.device.type not in ("cpu", "cuda"):
            report.add_miss(FAMILY, anchor, f"dtype {val.dtype} / device {val.device.type} is not supported")
            return
    with graph.inserting_before(site.out):
        q, k, v = [_as_heads(graph, n) for n in _grad_as_eager(graph, [site.q, site.k, site.v], site.out)]
        if site.rotary is not None:
            inv, shift = site.rotary
            cache: dict = {}
            q = _token_rotary(graph, q, qv, inv, shift, cache)
            k = _token_rotary(graph, k, example_value(site.k), inv, 0, cache)
        q, k, v = _cast_to(graph, [q, k, v], site.out)
        if site.kind == "window":
            call = graph.call_function(torch.ops.bcpt.sliding_window_attention.default,
                                       (q, k, v, site.window, float(site.scale)))
            op = "bcpt.sliding_window_attention"
        else:
            table = graph.call_function(local_block_table, (k, site.block, site.lookback, site.lookforward))
            idx = graph.call_function(operator.getitem, (table, 0))
            counts = graph.call_function(operator.getitem, (table, 1))
            call = graph.call_function(torch.ops.bcpt.nsa_selected_attention.default,
                                       (q, k, v, idx, counts, site.block, site.block, site.causal,
                                        float(site.scale)))
            op = "bcpt.nsa_selected_attention"
        out = graph.call_function(operator.getitem, (call, 0))
        if qv.dim() != 4:
            out = graph.call_function(torch.reshape, (out, tuple(qv.shape)))
    out.meta.update({key: val for key, val in site.out.meta.items()
                     if key in ("example_value", "stack_trace", "nn_module_stack", "source_fn_stack")})
    report.add_site(FAMILY, anchor, op, [site.q, site.k, site.v])
    site.out.replace_all_uses_with(out)
    erase_unused(site.out)


# ----------------------------------------------------------------------------- gathered layouts (probe-verified)
#
# native-sparse-attention's fine branch never builds a T x T mask either: every query row
# gathers its own K/V slots (``gather`` along a block dim with the top-k block indices, plus
# its own block appended under causality) and masks (row, slot) with the top-k validity and
# a constant causal tril. The gather index is data, so the layout is evaluated on probes
# that keep provenance: the index chain on *entry probes* (the negative id of each top-k
# entry; constants such as the appended own block stay >= 0), the gathered tensor on
# position probes, the masks on validity-entry probes (id + 2; constants are 0 / 1). Every
# (row, slot) then reads "key j of the block in top-k entry e" or "key j of constant block
# c", visible when "valid[e']" or a constant, and that must be exactly what
# ``nsa_selected_attention(query_block=1, causal=False, own_block=...)`` computes from the
# top-k table: each row reads each of its own entries' S keys once, under that entry's
# validity, and the constant slots it sees are its own block up to itself.

_CODE = 1 << 31  # gathered slot code: ref * _CODE + token (ref >= 1: top-k entry ref - 1; ref <= -1: block -ref - 1)


@dataclasses.dataclass
class GatheredSite:
    q: Node
    k: Node
    v: Node
    out: Node          # the node whose value the op replaces (back in q's layout)
    scale: float
    table: Node        # top-k block indices (B|1, H_kv|1, T, k)
    valid: Optional[Node]  # bool, like table: which entries are attended (None: all)
    block: int
    own: bool          # each row also sees its own block, causally


def _contraction(node: Any) -> Optional[tuple[Node, Node, str, str, str]]:
    """(a, b, a_sub, b_sub, out_sub) for a two-operand einsum, or a matmul of equal-rank
    operands with equal batch dims, in einsum letters."""
    e = _einsum(node)
    if e is not None:
        a_sub, b_sub, out, a, b = e
        if not (isinstance(a, Node) and isinstance(b, Node)) or "." in a_sub + b_sub + out:
            return None
        if len(set(a_sub)) != len(a_sub) or len(set(b_sub)) != len(b_sub) or len(a_sub) != _ndim(a) \
                or len(b_sub) != _ndim(b):
            return None
        return a, b, a_sub, b_sub, out
    if is_function(node, *MATMUL) or is_method(node, "matmul"):
        a, b = node.args[:2]
        va, vb = example_value(a), example_value(b)
        if va is None or vb is None or va.dim() < 3 or va.dim() != vb.dim() or va.shape[:-2] != vb.shape[:-2]:
            return None
        batch = "abcdefghijklmnopqrstuvw"[:va.dim() - 2]
        return a, b, batch + "xy", batch + "yz", batch + "xz"
    return None


def _gather_source(node: Any) -> Optional[Node]:
    src = _source(node)
    return src if _is_gather(src) else None


def _data_sources(node: Any, memo: dict) -> set:
    """Where graph-input data enters ``node`` through data movement (and gathers): the
    inputs themselves or the first computed values. Constants (no input behind them) are
    not sources; they are evaluated."""
    if isinstance(node, (list, tuple)):
        return set().union(*(_data_sources(n, memo) for n in node)) if node else set()
    if not isinstance(node, Node):
        return set()
    if node.op in ("placeholder", "get_attr"):
        return {node}
    if _is_move(node) or _is_gather(node):
        return set().union(*(_data_sources(n, memo) for n in node.all_input_nodes)) if node.all_input_nodes else set()
    return {node} if _depends_on_input(node, memo) else set()


def _depends_on_input(node: Node, memo: dict) -> bool:
    """Whether a graph input is among node's ancestors (iterative: a model's graph is deep)."""
    stack = [node]
    while stack:
        n = stack[-1]
        if n in memo:
            stack.pop()
            continue
        if n.op in ("placeholder", "get_attr"):
            memo[n] = True
            stack.pop()
            continue
        pending = [i for i in n.all_input_nodes if i not in memo]
        if pending:
            stack += pending
            continue
        memo[n] = any(memo[i] for i in n.all_input_nodes)
        stack.pop()
    return memo[node]


def _compact(t: torch.Tensor) -> torch.Tensor:
    """t with its broadcast (stride-0) dims cut to size 1: the same values, broadcastable back."""
    return t[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(t.stride(), t.shape))]


def _drop_letter(t: torch.Tensor, sub: str, letter: str) -> tuple[torch.Tensor, str]:
    """t without its ``letter`` dim, which must hold one value (a token's features move together)."""
    pos = sub.index(letter)
    t = _compact(t)
    if t.shape[pos] > 1 and not bool((t == t.narrow(pos, 0, 1)).all()):
        raise NotEvaluable("the features of a token are moved apart")
    return t.select(pos, 0), sub.replace(letter, "")


def _align(t: torch.Tensor, sub: str, letters: str) -> torch.Tensor:
    """t (dims named by ``sub``) with its dims in ``letters`` order, size 1 where a letter is missing."""
    present = [c for c in letters if c in sub]
    t = t.permute([sub.index(c) for c in present])
    for i, c in enumerate(letters):
        if c not in sub:
            t = t.unsqueeze(i)
    return t


class _GatherProbe:
    """``gather(x, dim, index)`` of a position probe x by entry-probe indices, as slot codes.

    x must hold contiguous key blocks along ``dim`` (block w's j-th key is token w * S + j,
    zero padding past T), so the slot's token is known from its block reference and j.
    """

    def __init__(self, T: int):
        self.T = T
        self.block: Optional[int] = None

    def __call__(self, x: Any, dim: Any, index: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not isinstance(index, torch.Tensor) or not isinstance(dim, int):
            raise NotEvaluable("gather of something other than keys by block indices")
        dim = dim % x.dim()
        xc = _compact(x.long())
        if xc.shape[dim] < 2:
            raise NotEvaluable("the keys are gathered from a single block")
        base = xc.narrow(dim, 0, 1)
        first = xc.narrow(dim, 1, 1) - base
        S = int(first.max())
        w = torch.arange(xc.shape[dim]).view([-1 if d == dim else 1 for d in range(xc.dim())])
        j = (base - 1) % self.T
        inside = j + w * S < self.T
        ok = (base >= 1) & (j < S) & torch.where(inside, xc == base + w * S, xc <= 0)
        if S < 1 or not bool(ok.all()) or self.block not in (None, S):
            raise NotEvaluable("the gathered tensor is not contiguous key blocks")
        self.block = S
        ic = _compact(index.long())
        base = base[tuple(slice(None) if d == dim or base.shape[d] == 1 else slice(0, index.shape[d])
                          for d in range(base.dim()))]
        ref = torch.where(ic < 0, -ic, -(ic + 1))
        return (ref * _CODE + base).expand(index.shape)


def _peel_not(mask: Any, when: bool) -> tuple[Any, bool]:
    while isinstance(mask, Node) and (is_function(mask, *NOT) or is_method(mask, "logical_not", "bitwise_not")):
        mask, when = mask.args[0], not when
    return mask, when


def _topk_range(node: Node) -> Optional[int]:
    """n when node is the indices of a top-k over a last dim of size n (every index is < n)."""
    if (is_function(node, operator.getitem) and node.args[1] == 1) or (
            is_function(node, getattr) and node.args[1] == "indices"):
        top = node.args[0]
        if is_method(top, "topk") or is_function(top, torch.topk):
            src = example_value(top.args[0])
            if src is not None and _dim(top.args[0], arg(top, 2, "dim", -1)) == src.dim() - 1:
                return int(src.shape[-1])
    return None


def _gathered_site(pv_node: Node) -> Union[GatheredSite, str, None]:
    c = _contraction(pv_node)
    if c is None:
        return None
    p, vg, p_sub, v_sub, o_sub = c
    gv = _gather_source(vg)
    what = "gathered attention"
    if gv is None:
        adv = [n for n in _chain(vg) if is_function(n, operator.getitem) and isinstance(n.args[1], tuple) and any(
            isinstance(x, Node) and example_value(x) is not None and example_value(x).dim() >= 1
            and not example_value(x).is_floating_point() for x in n.args[1])]
        if adv and _softmax_input(_source(p)) is not None:
            return (f"{what}: K/V are gathered by advanced indexing ({_name(adv[0])}: x[b, ids, h]), not by "
                    "torch.gather of whole key blocks along a block dim: the slots' blocks and entries are not read")
        return None
    dims = _slot_and_feature(p_sub, v_sub, o_sub)
    if dims is None:
        return f"{what}: P @ V does not contract one dim of key slots"
    slot, feat = dims
    # None from it: not attention (q times gathered keys has the same shape)
    found = _scores_over_slots(p, p_sub, o_sub, slot, what, "gathered keys")
    if not isinstance(found, tuple):
        return found
    scale, masks, qn, kg, q_sub, k_sub, fl = found
    if slot in q_sub:
        return f"{what}: the query operand has a key-slot dim"
    gk = _gather_source(kg)
    if gk is None:
        return f"{what}: the values are gathered but the keys are computed on after their gather " \
               f"(e.g. differentiable top-k gates)"
    q = _source(qn)
    k, v = _kv_sources(gk.args[0], gv.args[0], q) if example_value(q) is not None else (None, None)
    vals = [example_value(n) for n in (q, k, v)]
    if any(t is None or t.dim() != 4 for t in vals):
        return f"{what}: q, k, v are not (B, H, T, D) tensors gathered by data movement"
    qv, kv, vv = vals
    if any(isinstance(d, torch.SymInt) for t in vals for d in t.shape):
        return f"{what}: dynamic shapes are not supported yet"
    B, H, T, D = qv.shape
    Hkv = kv.shape[1]
    if kv.shape != vv.shape or kv.shape[0] != B or tuple(kv.shape[2:]) != (T, D) or Hkv == 0 or H % Hkv:
        return f"{what}: q {tuple(qv.shape)}, k {tuple(kv.shape)}, v {tuple(vv.shape)} are not self-attention shapes"
    memo: dict = {}
    tsrc = _data_sources(arg(gk, 2, "index"), memo)
    if len(tsrc) != 1 or _data_sources(arg(gv, 2, "index"), memo) != tsrc:
        return f"{what}: keys and values are not gathered by one index table"
    table = tsrc.pop()
    tv = example_value(table)
    if tv is None or tv.dtype not in (torch.int32, torch.int64) or tv.dim() != 4:
        return f"{what}: the gather indices are not a (B, H, T, k) integer table"
    Bt, Ht, Tt, Kt = tv.shape
    if Ht == H != Hkv:
        return f"{what}: each of the {H} query heads selects its own blocks, but K/V have {Hkv} heads " \
               f"(the kernel serves a KV group with one selection)"
    if Tt != T or Bt not in (1, B) or Ht not in (1, Hkv):
        return f"{what}: the index table {tuple(tv.shape)} is not one row per token of q {tuple(qv.shape)}"
    mask_terms, valid = [], None
    for m, when in masks:
        m, when = _peel_not(m, when)
        src = _data_sources(m, memo)
        if len(src) > 1 or (src and valid is not None and src != {valid}):
            return f"{what}: the slot mask depends on more than one computed tensor"
        if src:
            valid = next(iter(src))
            mval = example_value(valid)
            if not when or mval is None or mval.dtype != torch.bool or tuple(mval.shape) != tuple(tv.shape):
                return f"{what}: the slot mask is not a bool validity of the top-k entries"
        mask_terms.append((m, when))
    gp = _GatherProbe(T)
    try:
        entries = -(torch.arange(tv.numel()).view(tuple(tv.shape)) + 1)
        q_tok, q_sub = _drop_letter(_evaluate(qn, {q: _probe(q)}, {})[0], q_sub, fl)
        kc, k_sub = _drop_letter(_evaluate(kg, {k: _probe(k), table: entries}, {}, gp)[0], k_sub, fl)
        vc, v_sub = _drop_letter(_evaluate(vg, {v: _probe(v), table: entries}, {}, gp)[0], v_sub, feat)
        cond = torch.ones((1,) * len(p_sub), dtype=torch.long)
        for m, when in mask_terms:
            env = {valid: torch.arange(tv.numel()).view(tuple(tv.shape)) + 2} if valid is not None else {}
            mv = _evaluate(m, env, {})[0]
            if not isinstance(mv, torch.Tensor) or mv.dtype.is_floating_point:
                raise NotEvaluable("the slot mask is not boolean")
            mv = _compact(mv.long())
            if not when:  # a constant mask, masked where true
                mv = 1 - mv
            mv = mv.view((1,) * (len(p_sub) - mv.dim()) + tuple(mv.shape))
            cond = torch.where((cond == 0) | (mv == 0), 0, torch.where(mv == 1, cond, torch.where(
                (cond == 1) | (cond == mv), mv, -1)))
    except NotEvaluable as exc:
        return f"{what}: {exc}"
    except Exception as exc:  # an op we cannot replay outside the graph
        return f"{what}: could not evaluate its layout ({type(exc).__name__})"
    S = gp.block
    if S is None or S < 16 or S & (S - 1):
        return f"{what}: block size {S} is not a power of two >= 16"
    kc, vc = _align(kc, k_sub, p_sub), _align(vc, v_sub, p_sub)
    if not torch.equal(*torch.broadcast_tensors(kc, vc)):
        return f"{what}: keys and values are gathered differently"
    if bool((cond < 0).any()):
        return f"{what}: a slot is masked by two different validities"
    # query rows: the token, and the KV row its keys must come from (GQA: head // G)
    qa = _align(q_tok.long(), q_sub, p_sub)
    lead, tq = torch.div(qa - 1, T, rounding_mode="floor"), (qa - 1) % T
    kvl = torch.div(lead, H, rounding_mode="floor") * Hkv + torch.div(lead % H, H // Hkv, rounding_mode="floor")
    real = qa >= 1
    for d in range(len(p_sub)):  # rows that differ only in a dim no slot depends on (GQA heads) are alike
        if qa.shape[d] > 1 and kc.shape[d] == 1 and cond.shape[d] == 1:
            if not all(bool((t == t.narrow(d, 0, 1)).all()) for t in (kvl, tq, real)):
                return f"{what}: query heads that share their keys are different tokens"
            kvl, tq, real = (t.narrow(d, 0, 1) for t in (kvl, tq, real))
    kvl, tq, real, kc, cond = torch.broadcast_tensors(kvl, tq, real, kc, cond)
    n = kc.shape[-1]
    kvl, tq, real, kc, cond = (t.reshape(-1, n) for t in (kvl, tq, real, kc, cond))
    ref = torch.div(kc, _CODE, rounding_mode="floor")
    base = kc - ref * _CODE
    klead, kj = torch.div(base - 1, T, rounding_mode="floor"), (base - 1) % T
    seen = real & (cond != 0)
    if bool((real & (klead != kvl)).any()):
        return f"{what} mixes heads or batches"
    ent, cst = seen & (ref >= 1), seen & (ref <= -1)
    e = (ref - 1).clamp_min(0)
    es, et = e % Kt, torch.div(e, Kt, rounding_mode="floor") % Tt
    eh, eb = torch.div(e, Kt * Tt, rounding_mode="floor") % Ht, torch.div(e, Kt * Tt * Ht, rounding_mode="floor")
    row_of = (eb == (torch.div(kvl, Hkv, rounding_mode="floor") if Bt > 1 else 0)) \
        & (eh == (kvl % Hkv if Ht > 1 else 0)) & (et == tq)
    if bool((ent & ~row_of).any()):
        return f"{what}: a row reads top-k entries of another row"
    if bool((ent & (cond != (e + 2 if valid is not None else 1))).any()):
        return f"{what}: a selected slot is not masked by its own entry's validity"
    key = torch.where(ent, es * S + kj, Kt * S)
    hits = torch.zeros(key.shape[0], Kt * S + 1, dtype=torch.long).scatter_add_(1, key, torch.ones_like(key))
    if not bool((hits[:, :Kt * S] == real.any(-1, keepdim=True).long()).all()):
        return f"{what}: a row does not read each key of its selected blocks once"
    cb = -ref - 1
    if bool((cst & ((cond != 1) | (cb != torch.div(tq, S, rounding_mode="floor")) | (kj > tq % S))).any()):
        return f"{what}: a constant key block is visible that is not the query's own block up to itself"
    key = torch.where(cst, kj, S)
    hits = torch.zeros(key.shape[0], S + 1, dtype=torch.long).scatter_add_(1, key, torch.ones_like(key))[:, :S]
    own = bool(cst.any())
    want = (torch.arange(S)[None, :] <= (tq % S)[:, :1]) & real[:, :1] if own else torch.zeros_like(hits, dtype=torch.bool)
    if not torch.equal(hits, want.long()):
        return f"{what}: the own-block slots are not each key up to the query once"
    if T % S and (_topk_range(table) or -(-T // S)) * S > T:
        return f"{what}: the last, partial key block can be selected, and eager attends its zero padding"
    q_rows = _align(q_tok.long(), q_sub, o_sub).expand(example_value(pv_node).shape)
    out = _output_node(pv_node, q_rows, q, what)
    if isinstance(out, str):
        return out
    return GatheredSite(q, k, v, out, scale, table, valid, S, own)


def _rewrite_gathered(graph: torch.fx.Graph, site: GatheredSite, anchor: Node, report: Report) -> None:
    for t in (site.q, site.k, site.v):
        val = example_value(t)
        if val.dtype not in SUPPORTED_DTYPES or val.device.type not in ("cpu", "cuda"):
            report.add_miss(FAMILY, anchor, f"dtype {val.dtype} / device {val.device.type} is not supported")
            return
    B, Hkv = example_value(site.q).shape[0], example_value(site.k).shape[1]
    with graph.inserting_before(site.out):
        q, k, v = _cast_to(graph, _grad_as_eager(graph, [site.q, site.k, site.v], site.out), site.out)
        idx = site.table
        if site.valid is not None:
            idx = graph.call_function(torch.where, (site.valid, idx, -1))
        table = graph.call_function(topk_to_indices, (idx, B, Hkv))
        call = graph.call_function(torch.ops.bcpt.nsa_selected_attention.default, (
            q, k, v, graph.call_function(operator.getitem, (table, 0)), graph.call_function(operator.getitem, (table, 1)),
            site.block, 1, False, float(site.scale), site.own))
        out = graph.call_function(operator.getitem, (call, 0))
    out.meta.update({key: val for key, val in site.out.meta.items()
                     if key in ("example_value", "stack_trace", "nn_module_stack", "source_fn_stack")})
    report.add_site(FAMILY, anchor, "bcpt.nsa_selected_attention", [site.q, site.k, site.v])
    site.out.replace_all_uses_with(out)
    erase_unused(site.out)


# ----------------------------------------------------------------------------- rewrite

def _topk_table(bt: BlockTerm) -> Optional[tuple[Node, Any]]:
    """(top-k indices node, validity) when the block mask was scattered from a top-k along its last dim.

    ``zeros.scatter(-1, topk(...).indices, True)`` (or in place with ``scatter_``), where the
    scattered value may also be a bool tensor (per-row variable k): then invalid entries
    become -1, which the kernel skips.
    """
    if bt.negate or bt.compare is not None:
        return None
    node = _strip_casts(bt.mask)
    scatter = None
    if is_method(node, "scatter") or is_function(node, torch.scatter):
        scatter = node
    elif _is_zeros(node, written_ok=True):
        inplace = [u for u in node.users if is_method(u, "scatter_") and u.args[0] is node]
        if len(inplace) == 1 and all(u is inplace[0] or not (u.op == "call_method" and str(u.target).endswith("_"))
                                     for u in node.users):
            scatter = inplace[0]
    if scatter is None or not _is_zeros(scatter.args[0], written_ok=scatter is not node):
        return None
    dim, idx, src = arg(scatter, 1, "dim"), arg(scatter, 2, "index"), arg(scatter, 3, "src", arg(scatter, 3, "value"))
    if _dim(scatter, dim) != (_ndim(scatter) or 0) - 1 or scatter.kwargs.get("reduce") is not None:
        return None
    if not (is_function(idx, operator.getitem) and idx.args[1] == 1) and not (
            is_function(idx, getattr) and idx.args[1] == "indices"):
        return None
    top = idx.args[0]
    if not (is_method(top, "topk") or is_function(top, torch.topk)):
        return None
    iv, sv = example_value(idx), example_value(scatter)
    if iv is None or sv is None or not _same_shape(iv.shape[:-1], sv.shape[:-1]):
        return None  # a smaller index scatters into part of the mask only: read the mask itself
    tdim = arg(top, 2, "dim", -1)
    if _dim(top.args[0], tdim) != (_ndim(top.args[0]) or 0) - 1:  # any top-k: its indices are distinct
        return None
    if src is True or _number(src) == 1.0:
        return idx, None
    sval = example_value(src)
    if sval is not None and sval.dtype == torch.bool and _same_shape(sval.shape, example_value(idx).shape):
        return idx, src
    return None


def _table_nodes(graph: torch.fx.Graph, bt: BlockTerm, batch: Union[int, Node], kv_heads: Union[int, Node],
                 lay: Optional[Layout] = None) -> tuple[Node, Node]:
    found = _topk_table(bt)
    if found is not None:
        idx, valid = found
        if valid is not None:
            idx = graph.call_function(torch.where, (valid, idx, -1))
        idx = _block_to_op_layout(graph, idx, lay, tuple(example_value(found[0]).shape))
        table = graph.call_function(topk_to_indices, (idx, batch, kv_heads))
    else:
        mask = bt.mask
        if bt.compare is not None:
            mask = graph.call_function(_CMP_FNS[bt.compare[0]], (mask, bt.compare[1]))
        elif _strip_casts(mask) is not mask and getattr(example_value(_strip_casts(mask)), "dtype", None) == torch.bool:
            mask = _strip_casts(mask)
        val = example_value(mask)
        if bt.compare is None and (val is None or val.dtype != torch.bool):
            mask = graph.call_function(torch.ne, (mask, 0))
        if bt.negate:
            mask = graph.call_function(torch.logical_not, (mask,))
        mask = _block_to_op_layout(graph, mask, lay, tuple(example_value(bt.mask).shape))
        table = graph.call_function(block_mask_to_indices, (mask, batch, kv_heads))
    return (graph.call_function(operator.getitem, (table, 0)), graph.call_function(operator.getitem, (table, 1)))


def _heads_ok(bt: BlockTerm, H: int, Hkv: int) -> Optional[str]:
    bm = example_value(bt.mask)
    hdim = bm.shape[-3] if bm.dim() >= 3 else 1
    if not (_same(hdim, 1) or _same(hdim, Hkv)):
        return (f"block mask has {hdim} heads but K/V have {Hkv}: the query heads of a KV group "
                "do not share one selection")
    return None


def rewrite_sparse_attention(gm: torch.fx.GraphModule, opts: BcptOptions, report: Report) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if getattr(node, "_erased", False) or node.op not in ("call_function", "call_method"):
            continue  # call_method too: ``p.matmul(v)`` is an anchor
        sdpa = is_function(node, *SDPA)
        if not sdpa:
            gathered = _gathered_site(node)
            if isinstance(gathered, GatheredSite):
                _rewrite_gathered(graph, gathered, node, report)
                continue
            if isinstance(gathered, str):
                report.add_miss(FAMILY, node, gathered)
                continue
            windowed = _windowed_site(node)
            if isinstance(windowed, WindowedSite):
                _rewrite_windowed(graph, windowed, node, report)
                continue
            if isinstance(windowed, str):
                report.add_miss(FAMILY, node, windowed)
                continue
        site = _sdpa_site(node) if sdpa else _explicit_site(node)
        if site is None:
            continue
        if isinstance(site, str):
            report.add_miss(FAMILY, node, site)
            continue
        if site.vis.block is None and site.vis.lo is None and site.vis.hi in (None, 0):
            continue  # dense or plain causal attention: not ours, and not worth a report
        gqa_ok = sdpa and bool(arg(node, 7, "enable_gqa", False))
        reason = _refusal(site, gqa_ok)
        kind = None
        if reason is None:
            kind = _classify(site)
            if kind is None:
                continue
            if isinstance(kind, str):
                reason = kind
        qs, ks, _ = _op_shapes(site)
        if reason is None and kind[0] == "selected" and site.layout is None:
            reason = _heads_ok(site.vis.block, qs[1], ks[1])
        if reason is not None:
            report.add_miss(FAMILY, node, reason)
            continue
        B, H, T, D = qs
        Hkv = ks[1]
        scale = site.scale if site.scale is not None else 1.0 / math.sqrt(D)
        with graph.inserting_before(node):
            q, k, v = _cast_to(graph, _grad_as_eager(graph, [site.q, site.k, site.v], node), node)
            if site.layout is not None:
                q, k, v = _to_op_layout(graph, site.layout, q, k, v)
            # a symbolic batch / KV-head count is read from the graph (q.size(0)), never baked in
            if _symbolic(B):
                B = graph.call_method("size", (q, 0))
            if _symbolic(Hkv):
                Hkv = graph.call_method("size", (k, 1))
            if kind[0] == "window":
                call = graph.call_function(torch.ops.bcpt.sliding_window_attention.default,
                                           (q, k, v, int(kind[1]), float(scale)))
                op = "bcpt.sliding_window_attention"
            else:
                bt = site.vis.block
                idx, counts = _table_nodes(graph, bt, B, Hkv, site.layout)
                call = graph.call_function(torch.ops.bcpt.nsa_selected_attention.default,
                                           (q, k, v, idx, counts, bt.size, bt.query_block or bt.size,
                                            bool(kind[1]), float(scale)))
                op = "bcpt.nsa_selected_attention"
            out = graph.call_function(operator.getitem, (call, 0))
            if site.layout is not None:
                out = _from_op_layout(graph, site.layout, out)
        out.meta.update({k: v for k, v in node.meta.items()
                         if k in ("example_value", "stack_trace", "nn_module_stack", "source_fn_stack")})
        report.add_site(FAMILY, node, op, [site.q, site.k, site.v])
        old_inputs = list(node.all_input_nodes)
        node.replace_all_uses_with(out)
        erase_unused(node, *old_inputs)
    for node in list(graph.nodes):
        if node.meta.get(_SAMPLED_BLOCKS) and not node.users:  # sampled for a site that was refused
            erase_unused(node)
