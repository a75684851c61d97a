"""Spelling-independent views of Dynamo graph nodes.

Dynamo records the user's own spelling (``F.linear``, ``x @ W.T``, ``torch.einsum``,
``Tensor.relu``, ``torch.clamp(min=0)``, ...). The matchers here answer semantic
questions (is this a linear map of x by a 2-D weight? is this zero wherever a mask
is false?) so that each family pass is written once against the math.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
import torch.fx
import torch.nn.functional as F

Node = torch.fx.Node


def example_value(node: Any) -> Optional[torch.Tensor]:
    if not isinstance(node, Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


def _module(node: Node) -> Optional[torch.nn.Module]:
    if node.op != "call_module":
        return None
    gm = node.graph.owning_module
    try:
        return gm.get_submodule(node.target) if gm is not None else None
    except AttributeError:
        return None


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_function(node: Any, *targets: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, Node) and node.op == "call_method" and node.target in names


# ---------------------------------------------------------------- elementwise ops

MUL_TARGETS = (operator.mul, torch.mul, torch.Tensor.mul)
ADD_TARGETS = (operator.add, torch.add, torch.Tensor.add)


def is_fresh(node: Any) -> bool:
    """node's result is a tensor of its own: computed, not a view or an alias of an input
    (``.to`` to the same dtype and in-place ops return their input)."""
    val = example_value(node)
    if val is None or node.op not in ("call_function", "call_method"):
        return False
    try:
        storage = val.untyped_storage()._cdata  # a view of a temporary (3-D F.linear) is fine
        return all(example_value(i) is None or example_value(i).untyped_storage()._cdata != storage
                   for i in node.all_input_nodes)
    except (NotImplementedError, RuntimeError):
        return False


def functional_inplace(node: Any) -> bool:
    """``y *= r``, ``y += b``, ``y.mul_(r)``, ``y.add_(b)`` on a fresh y that nothing else reads:
    the same as the out-of-place op (no one can observe the mutation)."""
    if not (is_function(node, operator.imul, operator.iadd) or is_method(node, "mul_", "add_")):
        return False
    target = node.args[0] if node.args else None
    return isinstance(target, Node) and is_fresh(target) and len(target.users) == 1


def needs_grad(node: Any) -> bool:
    """The node's result requires grad (False under ``torch.no_grad()``, after ``.detach()``;
    True when unknown)."""
    val = example_value(node)
    return val is None or val.requires_grad


def read_after_inplace(node: Any) -> bool:
    """For ``y.mul_(r)`` / ``y.add_(b)`` / ``y *= r`` / ``y += b`` written as a statement on a fresh y
    (``y = linear(x, W); y.mul_(r); return y``): make y's later readers read the write's result,
    which is y itself (the same tensor), so the write becomes the functional form
    ``functional_inplace`` accepts. Done only when no reader of y precedes the write (those see
    the value before it) and y is fresh; returns whether the graph was changed. Additive: a
    graph that is not rewritten afterwards computes exactly what it did."""
    if not (is_function(node, operator.imul, operator.iadd) or is_method(node, "mul_", "add_")):
        return False
    target = node.args[0] if node.args else None
    if not isinstance(target, Node) or not is_fresh(target) or len(target.users) < 2:
        return False
    others = set(target.users) - {node}
    cur = target.next
    while cur is not node:  # readers between y and the write see y before it
        if cur in others or cur.op == "root":
            return False
        cur = cur.next
    target.replace_all_uses_with(node, delete_user_cb=lambda user: user in others)
    return True


def mul_operands(node: Any) -> Optional[tuple[Any, Any]]:
    if is_function(node, *MUL_TARGETS) or is_method(node, "mul") or (
        (is_function(node, operator.imul) or is_method(node, "mul_")) and functional_inplace(node)
    ):
        if len(node.args) == 2 and not node.kwargs:
            return node.args[0], node.args[1]
    return None


def add_operands(node: Any) -> Optional[tuple[Any, Any]]:
    if is_function(node, *ADD_TARGETS) or is_method(node, "add") or (
        (is_function(node, operator.iadd) or is_method(node, "add_")) and functional_inplace(node)
    ):
        if len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
            return node.args[0], node.args[1]
    return None


def is_zero(v: Any) -> bool:
    """A literal 0, or a tensor of zeros (``zeros_like(s)``, ``s.new_zeros(...)``, ``torch.zeros(...)``)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v == 0
    if is_function(v, torch.zeros_like, torch.zeros) or is_method(v, "new_zeros", "zero_"):
        return True
    if is_function(v, torch.tensor, torch.scalar_tensor):  # a constant scalar tensor, ``torch.tensor(0.0)``
        value = v.args[0] if v.args else None
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
    if is_function(v, torch.full_like) or is_method(v, "new_full"):
        return arg(v, 1, "fill_value") == 0
    return False


DROPOUT_FUNCTIONS = (F.dropout, torch.dropout, F.alpha_dropout, F.feature_alpha_dropout, F.dropout1d,
                     F.dropout2d, F.dropout3d)


def inactive_dropout_input(node: Any) -> Optional[Node]:
    """x for ``dropout(x)`` that is the identity: ``p == 0`` or ``training=False`` (an
    ``nn.Dropout`` in eval mode, as Dynamo inlines it)."""
    if not is_function(node, *DROPOUT_FUNCTIONS) or arg(node, 3, "inplace", False):
        return None
    p = arg(node, 1, "p", 0.5)
    training = arg(node, 2, "train" if node.target is torch.dropout else "training", True)
    return node.args[0] if (p == 0 or training is False) and isinstance(node.args[0], Node) else None


def through_inactive_dropout(node: Any) -> Any:
    """The input of ``node`` if it is an identity dropout read only by its one user (a
    product that a rewrite replaces), else ``node`` itself."""
    if isinstance(node, Node) and len(node.users) == 1:
        inner = inactive_dropout_input(node)
        if inner is not None:
            return inner
    return node


def strip_casts(node: Any) -> Any:
    """Follow dtype casts of a boolean mask (``.float()``, ``.to(x.dtype)``, ``.type_as(x)``)."""
    while isinstance(node, Node):
        if is_method(node, "float", "half", "bfloat16", "to", "type_as", "type") or is_function(
            node, torch.Tensor.to, torch.Tensor.float
        ):
            node = node.args[0]
        else:
            break
    return node


# ---------------------------------------------------------------- relu-like gates

RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu, torch.nn.functional.relu, torch.Tensor.relu)


_INPLACE_CLAMP_METHODS = ("clamp_", "clip_", "clamp_min_")
_INPLACE_CLAMP_FUNCTIONS = (torch.clamp_, torch.clip_, torch.clamp_min_)


def _is_clamp_min_zero(node: Any, names: tuple, functions: tuple) -> bool:
    """``clamp(s, min=0)`` in the given spellings (no upper bound)."""
    if not (is_method(node, *names) or is_function(node, *functions)):
        return False
    return arg(node, 1, "min") == 0 and arg(node, 2, "max") is None


def is_inplace_relu(node: Any) -> bool:
    """``relu_``, ``F.relu(s, inplace=True)``, ``nn.ReLU(inplace=True)``, ``s.clamp_(min=0)``: s
    itself is overwritten."""
    if is_function(node, torch.relu_) or is_method(node, "relu_"):
        return True
    if _is_clamp_min_zero(node, _INPLACE_CLAMP_METHODS, _INPLACE_CLAMP_FUNCTIONS):
        return True
    if is_function(node, F.relu, torch.nn.functional.relu):
        return bool(arg(node, 1, "inplace", False))
    mod = _module(node) if isinstance(node, Node) else None
    return isinstance(mod, torch.nn.ReLU) and mod.inplace


def relu_input(node: Any, allow_inplace: bool = False) -> Optional[Node]:
    """The input s of ``relu(s)`` in any of its spellings, else None.

    In-place forms overwrite s, so a rewrite that reads s instead of the relu's result
    would be wrong for s's other users; they match only with ``allow_inplace``.
    """
    if is_inplace_relu(node) and not allow_inplace:
        return None
    if is_function(node, *RELU_FUNCTIONS) or is_method(node, "relu", "relu_"):
        return node.args[0]
    mod = _module(node) if isinstance(node, Node) else None
    if isinstance(mod, torch.nn.ReLU):
        return node.args[0]
    if _is_clamp_min_zero(node, ("clamp", "clip", "clamp_min") + _INPLACE_CLAMP_METHODS,
                          (torch.clamp, torch.clip, torch.clamp_min) + _INPLACE_CLAMP_FUNCTIONS):
        return node.args[0]
    if (is_function(node, torch.maximum, torch.max) or is_method(node, "maximum", "max")) and len(node.args) == 2:
        # max(s, 0) against a zero tensor that does not broadcast s up (NaN propagates, as in relu)
        for s, z in (node.args, node.args[::-1]):
            sval, out = example_value(s), example_value(node)
            if is_zero(z) and sval is not None and out is not None and sval.shape == out.shape:
                return s
    return None


# ---------------------------------------------------------------- linear maps

@dataclasses.dataclass
class LinearMatch:
    """``y = x @ weight.T (+ bias)`` where ``weight`` is (N, K) (a node, possibly a view we add)."""

    x: Node
    weight: Node  # (N, K), or (K, N) when weight_is_kn
    bias: Optional[Node]
    weight_is_kn: bool = False


def _transpose_of_2d(node: Any) -> Optional[Node]:
    """W if node is W^T for a 2-D W (``.T``, ``.mT``, ``.t()``, ``transpose(0, 1)``, ``permute(1, 0)``)."""
    if not isinstance(node, Node):
        return None
    src = None
    if is_function(node, getattr) and node.args[1] in ("T", "mT", "H"):
        src = node.args[0]
    elif is_method(node, "t") or is_function(node, torch.t):
        src = node.args[0]
    elif is_method(node, "transpose", "swapaxes", "swapdims") or is_function(node, torch.transpose):
        dims = {d % 2 for d in node.args[1:3]} if len(node.args) >= 3 else set()
        src = node.args[0] if dims == {0, 1} else None
    elif is_method(node, "permute"):
        dims = node.args[1:] if len(node.args) > 2 else node.args[1]
        src = node.args[0] if tuple(dims) in ((1, 0), (-1, -2), (-1, 0), (1, -2)) else None
    val = example_value(src)
    return src if val is not None and val.dim() == 2 else None


def _einsum_linear(node: Node) -> Optional[LinearMatch]:
    if not (is_function(node, torch.einsum, torch.functional.einsum)):
        return None
    eq, *ops = node.args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or len(ops) != 2 or "->" not in eq:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    specs = lhs.split(",")
    # x first ("bti,oi->bto") or the weight first ("oi,bti->bto")
    for (a, b), (x, w) in ((specs, ops), (specs[::-1], ops[::-1])):
        if len(b) != 2 or "." in b or not a:
            continue
        contracted = a[-1]
        if contracted not in b or contracted in out:
            continue
        other = b.replace(contracted, "", 1)
        if out != a[:-1] + other or other in a:
            continue
        return LinearMatch(x, w, None, weight_is_kn=(b[0] == contracted))
    return None


def linear_of(node: Any) -> Optional[LinearMatch]:
    """Recognise ``x W^T (+ b)`` for a 2-D W in the spellings users write."""
    if not isinstance(node, Node):
        return None
    mod = _module(node)
    if isinstance(mod, torch.nn.Linear):  # only when Dynamo did not inline the module
        return None
    if is_function(node, torch._C._nn.linear, F.linear):
        return LinearMatch(node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias"))
    if is_function(node, operator.matmul, torch.matmul, torch.mm, torch.Tensor.matmul) or is_method(
        node, "matmul", "mm"
    ):
        x, b = node.args[0], node.args[1]
        w = _transpose_of_2d(b)
        if w is not None:
            return LinearMatch(x, w, None)
        bval = example_value(b)
        if bval is not None and bval.dim() == 2:
            return LinearMatch(x, b, None, weight_is_kn=True)
        return None
    if is_function(node, torch.addmm) or is_method(node, "addmm"):
        bias, x, b = node.args[0], node.args[1], node.args[2]
        if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or set(node.kwargs) - {"beta", "alpha"}:
            return None  # a scaled addmm is not x W^T + b
        bval = example_value(bias)
        if bval is None or bval.dim() != 1:
            return None
        w = _transpose_of_2d(b)
        return LinearMatch(x, w, bias) if w is not None else LinearMatch(x, b, bias, weight_is_kn=True)
    einsum = _einsum_linear(node) if node.op == "call_function" else None
    if einsum is not None:
        wval = example_value(einsum.weight)
        return einsum if wval is not None and wval.dim() == 2 else None
    ops = add_operands(node)
    if ops is not None:  # (x @ W^T) + b with a per-feature bias
        for lin, bias in (ops, ops[::-1]):
            inner = linear_of(lin)
            if inner is not None and inner.bias is None and len(lin.users) == 1 and _is_feature_bias(bias, lin, node):
                return dataclasses.replace(inner, bias=bias)
    return None


def _is_feature_bias(bias: Any, product: Node, total: Node) -> bool:
    """``bias`` adds one value per output feature: shape (N,), or (1, ..., 1, N) as RWKV-style
    ``nn.Parameter(torch.zeros(1, 1, N))`` writes it, without broadcasting the product up."""
    b, z, y = example_value(bias), example_value(product), example_value(total)
    if b is None or z is None or y is None or b.dim() == 0 or z.dim() == 0 or y.shape != z.shape:
        return False
    return b.shape[-1] == z.shape[-1] and all(d == 1 for d in b.shape[:-1])


def flat_bias(graph: torch.fx.Graph, bias: Any) -> Any:
    """The (N,) vector the fused ops take for a ``LinearMatch.bias`` (a (1, ..., 1, N) bias is reshaped)."""
    val = example_value(bias)
    if val is None or val.dim() == 1:
        return bias
    return graph.call_method("reshape", (bias, -1))


#: Functions that write their first argument in place (``y += r``, ``s[m] = v``, ``m &= w``).
INPLACE_FUNCTIONS = (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                     operator.iand, operator.ior, operator.ixor)


def writes_in_place(node: Any) -> bool:
    """``node`` writes its first argument in place: ``x.add_(y)``, ``torch.relu_(x)``, ``y += r``,
    ``s[m] = v``, ``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``. The one test both the
    fused ops' clone-before-write check and the attention pass's write checks use."""
    if not isinstance(node, Node) or not node.args:
        return False
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_function":
        name = str(getattr(node.target, "__name__", ""))
        if node.target in INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
            return True
        if name.endswith("_") and not name.startswith("__") \
                and getattr(node.target, "__module__", None) not in ("_operator", "operator"):
            return True
    return is_inplace_relu(node)


def mutated_later(node: Node) -> bool:
    """Some later op writes ``node``'s result (or a view of it) in place: ``y += r`` on the
    FFN's output, ``out.view(...).add_(b)``. Aliases are found by storage, as Dynamo records them."""
    val = example_value(node)
    try:
        storage = val.untyped_storage()._cdata if val is not None else None
    except (NotImplementedError, RuntimeError):
        return True  # unknown aliasing: assume the worst
    aliases, stack = {node}, list(node.users)
    while storage is not None and stack:
        user = stack.pop()
        if user in aliases:
            continue
        if writes_in_place(user) and user.args[0] in aliases:
            return True
        uval = example_value(user)
        try:
            alias = uval is not None and uval.untyped_storage()._cdata == storage
        except (NotImplementedError, RuntimeError):
            alias = False
        if alias:  # a view of the result: its writers write the result too
            aliases.add(user)
            stack += list(user.users)
    return False


def own_result(graph: torch.fx.Graph, out: Node, replaced: Node) -> Node:
    """``out`` (a fused op's result standing in for ``replaced``), cloned when a later op writes
    it in place: the custom ops' outputs are views that autograd forbids writing outside
    AOTAutograd (``explain``, ``inner_compiler="eager"``); Inductor fuses the copy into the write."""
    return graph.call_method("clone", (out,)) if mutated_later(replaced) else out


def erase_unused(*nodes: Any) -> None:
    """Erase the given nodes, and then their inputs, where nothing uses them any more.

    Only nodes this pass replaced are passed in, so no side-effecting op is dropped.
    """
    stack = [n for n in nodes if isinstance(n, Node)]
    erased: set[Node] = set()
    while stack:
        node = stack.pop()
        if node in erased or node.users or node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_method" and str(node.target).endswith("_") and not functional_inplace(node):
            continue  # in-place: keep its effect
        inputs = list(node.all_input_nodes)
        node.graph.erase_node(node)
        erased.add(node)
        stack += inputs
