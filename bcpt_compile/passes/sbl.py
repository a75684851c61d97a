"""SBL masked matmuls: ``linear(x, W[, b]) * R`` with R exactly zero off a gate.

The product is only needed where R is nonzero, so it is rewritten into
``torch.ops.bcpt.sbl_masked_linear``, which clusters R's support into blocks (BCAT)
and computes only those blocks, forward and backward. R enters the op as its
pre-gate value ``s`` plus the gate (``s > threshold`` or an explicit boolean mask),
so that the gradient with respect to ``s`` is also confined to the blocks.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
from typing import Optional, Union

import torch
import torch.fx
import torch.nn.functional as F

from ..options import BcptOptions
from ..report import Report
from .canonical import (
    DROPOUT_FUNCTIONS,
    Node,
    arg,
    erase_unused,
    example_value,
    flat_bias,
    inactive_dropout_input,
    is_function,
    is_inplace_relu,
    is_method,
    is_zero,
    linear_of,
    mul_operands,
    needs_grad,
    own_result,
    read_after_inplace,
    relu_input,
    strip_casts,
    through_inactive_dropout,
)

FAMILY = "sbl"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass
class Gate:
    """R = s where ``mask`` (or ``s > threshold`` when mask is None), else exactly 0.

    ``keep_source``: the mask is ``not (keep_source <= threshold)``, built by the rewrite, for a
    value that is zero where a relu-like gate of another tensor is (NaN kept, as relu keeps it);
    ``not (abs(keep_source) <= threshold)`` with ``keep_abs`` (``hardshrink``, ``softshrink``).
    """

    value: Node
    mask: Optional[Node] = None
    threshold: float = 0.0
    negate_mask: bool = False
    keep_source: Optional[Node] = None
    keep_abs: bool = False


def _is_bool(node: object) -> bool:
    val = example_value(node)
    return val is not None and val.dtype == torch.bool


def gate_of(node: object) -> Union[Gate, str]:
    """The gate that makes ``node`` exactly zero off a mask, or why it is not provably so."""
    if not isinstance(node, Node):
        return "the mask operand is a constant, not a gated tensor"
    s = relu_input(node, allow_inplace=True)
    if s is not None:
        # an in-place relu overwrote s: gate its result instead (relu(R) = R), and keep it
        return Gate(node) if is_inplace_relu(node) else Gate(s)
    if is_function(node, F.threshold, torch.threshold, torch.threshold_) and arg(node, 2, "value") == 0:
        th = arg(node, 1, "threshold")
        if isinstance(th, numbers.Real):
            if is_function(node, torch.threshold_) or arg(node, 3, "inplace", False):
                return Gate(node, threshold=float(th))  # s overwritten: gate the result, zero where s <= t
            return Gate(node.args[0], threshold=float(th))
    ops = mul_operands(node)
    if ops is not None:  # s * (s > t), s * mask.float(), ...
        for value, m in (ops, ops[::-1]):
            m = strip_casts(m)
            if _is_bool(m) and not _is_bool(value) and isinstance(value, Node):
                if is_function(m, operator.gt, torch.gt) and m.args[0] is value and isinstance(m.args[1], numbers.Real):
                    return Gate(value, threshold=float(m.args[1]))
                return Gate(value, mask=m)
    if is_function(node, torch.where) and len(node.args) == 3:
        m, a, b = node.args
        if _is_bool(m) and isinstance(a, Node) and not is_zero(a) and is_zero(b):
            return Gate(a, mask=m)
        if _is_bool(m) and isinstance(b, Node) and not is_zero(b) and is_zero(a):
            return Gate(b, mask=m, negate_mask=True)
    if (is_method(node, "masked_fill", "masked_fill_") or is_function(node, torch.masked_fill)) \
            and len(node.args) == 3 and is_zero(node.args[2]) and _is_bool(node.args[1]):
        # in place (``s.masked_fill_(~m, 0)``) s is overwritten: its result is the value
        return Gate(node if is_method(node, "masked_fill_") else node.args[0], mask=node.args[1], negate_mask=True)
    s = _capped_relu_input(node)
    if s is not None:  # relu6(s), clamp(s, 0, c): zero where s <= 0, but not s itself
        return Gate(node, keep_source=node if _writes_input(node) else s)
    s = _shrink_input(node)
    if s is not None:  # hardshrink is s itself where |s| > lambda; softshrink is zero there too
        lambd = float(arg(node, 1, "lambd", 0.5))
        value = s if is_function(node, F.hardshrink, torch.hardshrink) or is_method(node, "hardshrink") else node
        return Gate(value, keep_source=s, threshold=lambd, keep_abs=True)
    s = _unviewed(node)
    if s is not None:
        gate = gate_of(s)
        if isinstance(gate, Gate) and gate.mask is None and gate.keep_source is None:
            # relu(s).view(...): the viewed result is zero exactly where it is <= t
            return Gate(node, threshold=gate.threshold)
        if isinstance(gate, Gate):
            return "the gate is viewed after its mask is applied (apply the view to its input instead)"
    inner = _zero_preserving_input(node)
    if inner is not None:
        gate = gate_of(inner)
        if isinstance(gate, Gate):  # f(R) with f(0) = 0 is zero wherever R is
            src = gate.keep_source or (gate.value if gate.mask is None else None)
            return dataclasses.replace(gate, value=node, keep_source=src)
    what = node.target if node.op != "call_function" else getattr(node.target, "__name__", str(node.target))
    if node.op == "placeholder" and isinstance(getattr(node.meta.get("grapharg"), "example", None), torch.nn.Parameter):
        return f"gate is not provably zero off the mask (a parameter, {what}, scales the product)"
    if node.op == "placeholder":  # e.g. relu(s) computed before a graph break: not visible here
        return f"gate is not provably zero off the mask (graph input {what}; computed before a graph break?)"
    return f"gate is not provably zero off the mask ({node.op} {what})"


def _writes_input(node: Node) -> bool:
    """``relu6(s, inplace=True)``, ``hardtanh(..., inplace=True)``, ``s.clamp_(0, c)``: s is overwritten."""
    if is_function(node, F.relu6):
        return bool(arg(node, 1, "inplace", False))
    if is_function(node, F.hardtanh):
        return bool(arg(node, 3, "inplace", False))
    return is_method(node, "clamp_", "clip_") or is_function(node, torch.clamp_, torch.clip_)


def _capped_relu_input(node: Node) -> Optional[Node]:
    """s for ``relu6(s)``, ``hardtanh(s, 0, c)``, ``clamp(s, 0, c)`` with c > 0 (in-place forms too)."""
    if is_function(node, F.relu6):
        return node.args[0]
    if is_function(node, F.hardtanh):
        lo, hi = arg(node, 1, "min_val", -1.0), arg(node, 2, "max_val", 1.0)
    elif is_function(node, torch.clamp, torch.clip, torch.clamp_, torch.clip_) or is_method(
            node, "clamp", "clip", "clamp_", "clip_"):
        lo, hi = arg(node, 1, "min"), arg(node, 2, "max")
    else:
        return None
    ok = isinstance(hi, numbers.Real) and hi > 0 and isinstance(lo, numbers.Real) and lo == 0
    return node.args[0] if ok else None


def _shrink_input(node: Node) -> Optional[Node]:
    """s for ``hardshrink(s, l)`` / ``softshrink(s, l)`` with l >= 0: zero exactly where |s| <= l."""
    if not (is_function(node, F.hardshrink, F.softshrink, torch.hardshrink) or is_method(node, "hardshrink")):
        return None
    lambd = arg(node, 1, "lambd", 0.5)
    ok = isinstance(lambd, numbers.Real) and lambd >= 0 and isinstance(node.args[0], Node)
    return node.args[0] if ok else None


def _unviewed(node: Node) -> Optional[Node]:
    """x for ``x.view(...)``, ``reshape``, ``flatten``, ``unflatten``, ``view_as``, ``reshape_as``: the
    same elements in the same (row-major) order."""
    if is_method(node, "view", "reshape", "flatten", "unflatten", "view_as", "reshape_as") or is_function(
            node, torch.reshape, torch.flatten, torch.unflatten):
        src = node.args[0]
        bitcast = any(isinstance(a, torch.dtype) for a in (*node.args[1:], *node.kwargs.values()))
        return src if isinstance(src, Node) and example_value(src) is not None and not bitcast else None
    return None


def _zero_preserving_input(node: Node) -> Optional[Node]:
    """R for an elementwise f(R) of R's shape with f(0) = 0: dtype casts, ``detach``,
    ``contiguous``, ``clone``, dropout, ``R * t``, ``R / c``, ``R / t``, ``R ** p`` (p > 0), ``square``,
    ``clamp(R, lo <= 0 <= hi)``. The value is taken as f(R) itself, the keep mask as R's."""
    val, inner = example_value(node), None
    if is_method(node, "float", "half", "bfloat16", "to", "type_as", "type", "detach", "contiguous", "clone") or \
            is_function(node, torch.Tensor.to, torch.detach, torch.clone, *_ZERO_KEEPING_DROPOUTS):
        inner = node.args[0]
    elif is_function(node, operator.truediv, torch.div, torch.true_divide) or is_method(node, "div", "true_divide"):
        if len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], numbers.Real) and node.args[1] != 0:
            inner = node.args[0]
        elif len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], Node) and example_value(
                node.args[1]) is not None and example_value(node.args[1]).dtype.is_floating_point:
            # R / t, t a tensor that does not broadcast R up (a normaliser, ``r.sum(-1, keepdim=True) + eps``):
            # zero wherever R is, as R * (1 / t) (where t is 0 or NaN eager gives NaN, the op 0)
            inner = node.args[0]
    elif is_function(node, operator.pow, torch.pow) or is_method(node, "pow"):
        p = arg(node, 1, "exponent")
        inner = node.args[0] if isinstance(p, numbers.Real) and p > 0 else None
    elif is_function(node, torch.square) or is_method(node, "square"):
        inner = node.args[0]
    elif is_function(node, torch.clamp, torch.clip) or is_method(node, "clamp", "clip"):
        lo, hi = arg(node, 1, "min"), arg(node, 2, "max")
        if all(v is None or isinstance(v, numbers.Real) for v in (lo, hi)) and (lo or 0) <= 0 <= (0 if hi is None else hi):
            inner = node.args[0]
    else:
        ops = mul_operands(node)
        if ops is not None:  # R * t: either factor gated (a mask factor was handled above)
            for r, _ in (ops, ops[::-1]):
                if isinstance(r, Node) and isinstance(gate_of(r), Gate) and _same_shape(r, node):
                    return r
    return inner if isinstance(inner, Node) and _same_shape(inner, node) else None


#: Dropouts that keep zeros even in training (they zero and rescale); not the alpha
#: dropouts of ``canonical.DROPOUT_FUNCTIONS``, which move dropped entries off zero.
_ZERO_KEEPING_DROPOUTS = (F.dropout, torch.dropout, F.dropout1d, F.dropout2d, F.dropout3d)


def _detached(graph: torch.fx.Graph, node: object) -> object:
    """``node.detach()`` where it requires grad (a tensor read under no_grad by eager), else node."""
    val = example_value(node)
    if val is None or not val.requires_grad:
        return node
    return graph.call_method("detach", (node,))


def _same_shape(a: Node, b: Node) -> bool:
    va, vb = example_value(a), example_value(b)
    return va is not None and vb is not None and va.shape == vb.shape


def _through_identities(node: object) -> object:
    """The product under what keeps its values: an inactive dropout, ``.contiguous()`` and float
    casts (``linear(x, W).float()``, ``.type_as(x)``), each read only by the next. A cast up is
    only rounded less by the op; ``_refusal`` checks the op's result dtype is the product's."""
    while isinstance(node, Node):
        inner = through_inactive_dropout(node)
        if inner is node and len(node.users) == 1 and (
                is_method(node, "float", "half", "bfloat16", "to", "type_as", "type", "contiguous")
                or is_function(node, torch.Tensor.to)) and isinstance(node.args[0], Node):
            before, after = example_value(node.args[0]), example_value(node)
            same = before is not None and after is not None and (before.shape, before.device) == (
                after.shape, after.device) and before.dtype.is_floating_point and after.dtype.is_floating_point
            inner = node.args[0] if same else node
        if inner is node:
            break
        node = inner
    return node


def _peel_view(node: object) -> Optional[Node]:
    """The linear under a view of it (``view``, ``reshape``, ``flatten``, ...: the product is elementwise,
    so it is the op's result viewed alike, e.g. split into heads)."""
    src = _unviewed(node) if isinstance(node, Node) else None
    before = example_value(src)
    if src is None or before is None or before.dim() == 0:
        return None
    return src if linear_of(src) is not None and len(src.users) == 1 else None


def _refusal(mul: Node, lin_node: Node, lin_inputs: list, gate: Union[Gate, str]) -> Optional[str]:
    if isinstance(gate, str):
        return gate
    out, s, y = example_value(lin_node), example_value(gate.value), example_value(mul)
    if out is None or s is None or y is None:
        return "shapes unknown (no example values)"
    if tuple(s.shape) != tuple(out.shape):
        return f"gate shape {tuple(s.shape)} is not the linear output's {tuple(out.shape)} (a broadcast gate is not block-sparse)"
    if tuple(y.shape) != tuple(out.shape):
        return f"the gate broadcasts the product up from {tuple(out.shape)} to {tuple(y.shape)} (not one gate per element)"
    for name, val in (("input", out), ("gate", s)):
        if val.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {val.dtype} is not supported (float32, bfloat16, float16)"
        if val.device.type not in ("cpu", "cuda"):
            return f"device {val.device.type} is not supported"
    if len(lin_node.users) != 1:
        return "the dense product linear(x, W) has other users, so it is computed anyway"
    dtypes = {example_value(n).dtype for n in lin_inputs if example_value(n) is not None}
    if len(dtypes) > 1 and out.dtype not in dtypes:
        return f"x, weight and bias have mixed dtypes {sorted(str(d) for d in dtypes)}"
    if torch.promote_types(out.dtype, s.dtype) != y.dtype:
        return (f"the product linear(x, W) ({out.dtype}) is cast to {y.dtype} before the mask, "
                f"but the op computes in {torch.promote_types(out.dtype, s.dtype)}")
    if gate.mask is not None or gate.keep_source is not None:
        m = example_value(gate.mask if gate.mask is not None else gate.keep_source)
        if m is None:
            return "shapes unknown (no example values)"
        try:
            broadcast = torch.broadcast_shapes(tuple(m.shape), tuple(s.shape))
        except RuntimeError:
            broadcast = None
        if broadcast is None or tuple(broadcast) != tuple(s.shape):
            return f"mask shape {tuple(m.shape)} does not broadcast to {tuple(s.shape)}"
    return None


def _dropout_on_product(ops: tuple) -> Optional[str]:
    """Why ``dropout(linear(x, W)) * R`` is refused, if that is the product: a dropout that is
    active (training) puts its random mask between the product and the gate, and one whose
    ``p`` is a graph input (``dynamic=True`` does not specialise floats) may be active next call."""
    for d, r in (ops, ops[::-1]):
        if is_function(d, *DROPOUT_FUNCTIONS) and isinstance(d.args[0], Node) and linear_of(d.args[0]) is not None \
                and inactive_dropout_input(d) is None and isinstance(gate_of(r), Gate):
            if isinstance(arg(d, 1, "p", 0.5), Node):
                return "dropout on the product linear(x, W) has p as a graph input (dynamic=True), not provably 0"
            return "dropout on the product linear(x, W) is active (training): its random mask is not modelled"
    return None


def _slice_of_fused_product(ops: tuple) -> Optional[str]:
    """Why ``up * relu(gate)`` with ``gate, up = linear(x, W).chunk(2, -1)`` (a fused gate/up
    projection) is refused: the op would need W's rows split, which the pass does not do."""
    for piece, r in (ops, ops[::-1]):
        src = piece.args[0] if is_function(piece, operator.getitem) and isinstance(piece.args[0], Node) else None
        if is_method(src, "chunk", "split", "tensor_split") or is_function(src, torch.chunk, torch.split):
            src = src.args[0]
        if isinstance(src, Node) and linear_of(src) is not None and isinstance(gate_of(r), Gate):
            return ("the product is a slice of a fused linear (e.g. gate_up_proj(x).chunk(2, -1)): "
                    "its weight is not split, so the whole product is computed anyway")
    return None


def rewrite_sbl_masked_linear(gm: torch.fx.GraphModule, opts: BcptOptions, report: Report) -> None:
    graph = gm.graph
    for mul in list(graph.nodes):
        ops = mul_operands(mul)
        if ops is None and mul.args and isinstance(mul.args[0], Node) \
                and linear_of(_through_identities(mul.args[0])) is not None and read_after_inplace(mul):
            ops = mul_operands(mul)  # ``y = linear(x, W); y.mul_(r); return y``: later reads of y read the write
        if ops is None:
            continue
        for lin_node, r_node in (ops, ops[::-1]):
            outer, lin_node = lin_node, _through_identities(lin_node)  # eval-mode dropout, same-dtype casts
            inner = _peel_view(lin_node)
            lin = linear_of(inner if inner is not None else lin_node)
            if lin is not None:
                break
        else:
            reason = _dropout_on_product(ops) or _slice_of_fused_product(ops)
            if reason is not None:
                report.add_miss(FAMILY, mul, reason)
            continue
        if _is_bool(strip_casts(r_node)):
            continue  # linear * mask: a plain masked product (often the gate's own s * (s > t))
        gate = gate_of(r_node)
        reason = _refusal(mul, lin_node, [lin.x, lin.weight, lin.bias], gate)
        if reason is not None:
            report.add_miss(FAMILY, mul, reason)
            continue
        assert isinstance(gate, Gate)
        reshaped = inner is not None  # a view sits between the linear and the product
        with graph.inserting_before(mul):
            weight = graph.call_function(torch.t, (lin.weight,)) if lin.weight_is_kn else lin.weight
            x, bias, value, mask = lin.x, flat_bias(graph, lin.bias), gate.value, gate.mask
            # under autocast the linear ran in its cast dtype: cast its inputs alike, since
            # the custom op is not autocast-aware
            lin_dtype = example_value(inner if inner is not None else lin_node).dtype
            x, weight, bias = (
                graph.call_method("to", (n, lin_dtype))
                if n is not None and example_value(n) is not None and example_value(n).dtype != lin_dtype else n
                for n in (x, weight, bias)
            )
            # an operand read under ``torch.no_grad()`` (the linear, or the gate computed from a value
            # that needs a gradient) gets none in eager: the op must not give it one either
            if not needs_grad(inner if inner is not None else lin_node):
                x, weight, bias = (_detached(graph, n) for n in (x, weight, bias))
            if not needs_grad(r_node):
                value = _detached(graph, value)
            if gate.keep_source is not None:  # keep = not (s <= t): NaN kept, as relu keeps it
                source = graph.call_function(torch.abs, (gate.keep_source,)) if gate.keep_abs else gate.keep_source
                mask = graph.call_function(operator.le, (source, gate.threshold))
                mask = graph.call_function(torch.logical_not, (mask,))
            elif mask is not None and gate.negate_mask:
                mask = graph.call_function(torch.logical_not, (mask,))
            if reshaped:  # run on 2-D (tokens, features) and view the result back
                n_out, n_in = example_value(inner).shape[-1], example_value(x).shape[-1]
                if mask is not None:
                    mask = graph.call_method("expand_as", (mask, value))
                    mask = graph.call_method("reshape", (mask, -1, n_out))
                x = graph.call_method("reshape", (x, -1, n_in))
                shape = graph.call_method("size", (value,))
                value = graph.call_method("reshape", (value, -1, n_out))
            gate_value = example_value(gate.value)
            save_product = bool(gate_value is not None and gate_value.requires_grad and needs_grad(r_node))  # ds needed
            call = graph.call_function(
                torch.ops.bcpt.sbl_masked_linear.default,
                (x, weight, bias, value, mask, gate.threshold,
                 opts.block_size, float(opts.density_crossover), bool(opts.sbl_reorder), save_product),
            )
            out = graph.call_function(operator.getitem, (call, 0))  # y; the rest feeds the backward
            if reshaped:
                out = graph.call_method("view", (out, shape))
            out = own_result(graph, out, mul)
        out.meta.update({k: v for k, v in mul.meta.items() if k in ("example_value", "stack_trace", "nn_module_stack", "source_fn_stack")})
        report.add_site(FAMILY, mul, "bcpt.sbl_masked_linear", [lin.x, lin.weight, gate.value])
        mul.replace_all_uses_with(out)
        erase_unused(mul, r_node, outer)
