"""DeepEmbed FFNs: a per-token row of a (vocab x width) table scales an FFN.

Two forms are matched on the Dynamo graph:

* output scale (RWKV-8 demo): ``linear(relu(k) ** 2, V) * table[idx]`` becomes
  ``bcpt.deepembed_linear``, whose GEMM epilogue gathers and multiplies, so the
  (tokens x d) gathered embedding is never written or read back;
* hidden scale (RWKV-7 DeepEmbed): ``a @ table[idx].view(.., r, r)`` becomes
  ``bcpt.deepembed_rowmix``, which reads each token's r x r matrix straight from its table
  row; the surrounding low-rank GEMMs and the ``relu ** 2 * scale`` stay with Inductor,
  which fuses that elementwise tail into one kernel.

The squared relu is required on the output-scale form: it is what makes the pattern an
FFN and not any ``linear * embedding``, whose owner may want its own kernel.

Every rewritten site gets the row plan of its ``idx`` (``bcpt.row_plan``, inserted once per
``idx`` right after the graph inputs, or after the lookups through ``idx`` by other rules that
precede the first site, such as a token embedding ``tok.weight[idx]``, so that a bad ``idx``
raises their error as in eager; shared by all layers): it checks ``idx`` once and groups the tokens by row for the row-sparse
table gradients (one sort per step, not per layer).

With ``deepembed_tables="cpu"`` a table that lives on the host is reached through
``bcpt.gather_rows(table, plan, device, grad_mode)``; the prefetch pass then splits every
gather into a prefetch at the graph input and a wait before its use. ``grad_mode`` says how
the table's gradient is delivered (``runtime/ops.py``): "dense" as eager, "sparse" for
``nn.Embedding(sparse=True)``, "fused:<key>" for a table with a ``FusedRowOptimizer``.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator

import torch
import torch.fx
import torch.nn.functional as F

from ..options import BODY_HOST_TABLES, BcptOptions
from ..report import Report
from .canonical import (
    DROPOUT_FUNCTIONS,
    Node,
    arg,
    erase_unused,
    example_value,
    flat_bias,
    is_function,
    is_method,
    linear_of,
    mul_operands,
    needs_grad,
    own_result,
    read_after_inplace,
    relu_input,
    through_inactive_dropout,
)

FAMILY = "deepembed"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)
EMBEDDING_FUNCTIONS = (F.embedding, torch.nn.functional.embedding)


# ------------------------------------------------------------------ spelling helpers

def _is_device_like(v: object) -> bool:
    return isinstance(v, (torch.device, str))


def device_move_input(node: object) -> Node | None:
    """x for ``x.to(device)``, ``x.cuda()``, ``x.cpu()`` (no dtype change), else None."""
    if not isinstance(node, Node):
        return None
    if is_method(node, "cuda", "cpu"):
        if all(k in ("non_blocking", "device", "memory_format") for k in node.kwargs) and all(
            _is_device_like(a) or isinstance(a, int) for a in node.args[1:]
        ):
            return node.args[0]
        return None
    if ((is_method(node, "to") or is_function(node, torch.Tensor.to))
            and all(_is_device_like(a) for a in node.args[1:])
            and set(node.kwargs) <= {"device", "non_blocking", "copy"}):
        return node.args[0]
    return None


def _cast_input(node: object) -> Node | None:
    """x for a dtype cast ``x.to(dtype)``, ``.type_as(y)``, ``.float()``, ``.half()``, ``.bfloat16()``,
    ``.long()``, ``.int()`` (device moves included), else None."""
    if not (is_method(node, "to", "type_as", "float", "half", "bfloat16", "double", "long", "int")
            or is_function(node, torch.Tensor.to)):
        return None
    if set(node.kwargs) - {"dtype", "device", "non_blocking", "copy"}:
        return None
    src = node.args[0]
    return src if isinstance(src, Node) else None


def _strip_moves_and_casts(node: object, value_kept) -> object:
    """``node`` under device moves and the dtype casts for which ``value_kept(before, after)``
    (example values) holds."""
    while True:
        src = device_move_input(node) or _cast_input(node)
        before, after = example_value(src), example_value(node)
        if src is None or before is None or after is None or not value_kept(before, after):
            return node
        node = src


def strip_index_casts(node: object) -> object:
    """idx under device moves and casts between integer index dtypes (``idx.long()``); a cast
    from another dtype is kept, so eager's error for a float idx stays."""
    return _strip_moves_and_casts(node, lambda before, after: before.dtype == after.dtype or (
        before.dtype in INDEX_DTYPES and after.dtype in INDEX_DTYPES))


def strip_float_casts(node: object) -> object:
    """``node`` under device moves and float dtype casts (``emb(idx).to(x.dtype)``, ``value(k).float()``)."""
    return _strip_moves_and_casts(node, lambda before, after: (
        before.dtype in FLOAT_DTYPES and after.dtype in FLOAT_DTYPES and before.shape == after.shape))


def squared_relu_of(node: object, loose: bool = False) -> Node | None:
    """The relu node r for ``r ** 2``, ``torch.pow(r, 2)``, ``r * r``, ``torch.square(r)``, also
    ``relu(u) * relu(u)``.

    ``loose`` (the square is only recognised, not recomputed): float casts around the relu and
    the square are looked through too.
    """
    node = _through_basic_views(strip_float_casts(node)) if loose else node
    if not isinstance(node, Node):
        return None
    base = None
    if is_function(node, operator.pow, torch.pow) or is_method(node, "pow"):
        exponent = arg(node, 1, "exponent")
        if isinstance(exponent, numbers.Real) and float(exponent) == 2.0:
            base = node.args[0]
    elif is_function(node, torch.square) or is_method(node, "square"):
        base = node.args[0]
    else:
        ops = mul_operands(node)
        if ops is not None and (ops[0] is ops[1] or _same_relu(*ops)):
            base = ops[0]
    base = strip_float_casts(base) if loose else base
    # an in-place relu overwrites its input, which the rewrites never read
    return base if base is not None and relu_input(base, allow_inplace=True) is not None else None


def _through_basic_views(node: object) -> object:
    """``node`` under views and basic slices of an elementwise value (``k[:, 1:]``, ``k[:, -1]``,
    ``k.view(B * T, C)``, ``.reshape``, ``.flatten``, ``.contiguous()``): a slice of ``relu(u) ** 2``
    is still a squared relu, element for element."""
    while isinstance(node, Node):
        src = node.args[0] if node.args else None
        if is_method(node, "view", "reshape", "flatten", "contiguous") or is_function(node, torch.reshape, torch.flatten):
            if any(isinstance(a, torch.dtype) for a in (*node.args[1:], *node.kwargs.values())):
                return node  # view(dtype): a bitcast
        elif is_function(node, operator.getitem):
            index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if not all(isinstance(k, (int, slice)) or k is None or k is Ellipsis for k in index):
                return node  # advanced indexing gathers
        else:
            return node
        if not isinstance(src, Node):
            return node
        node = src
    return node


def _same_relu(a: object, b: object) -> bool:
    """``F.relu(u)`` and ``F.relu(u)`` written twice (Dynamo records two nodes of one value)."""
    u = relu_input(a)
    return u is not None and u is relu_input(b) and a.target == b.target and a.args == b.args and a.kwargs == b.kwargs


@dataclasses.dataclass
class Gather:
    """rows = table[idx] (``indexing``: ``weight[idx]`` rules, else ``F.embedding``'s)."""

    table: Node
    idx: Node
    indexing: bool
    sparse: bool = False  # F.embedding(..., sparse=True): eager gives a sparse COO gradient


def gather_of(node: object) -> Gather | str | None:
    """The table gather behind ``node`` (device moves and dtype casts skipped: the caller
    compares dtypes); a reason when it cannot be fused. ``.detach()`` is looked through: the
    rewrites detach the table where the rows need no gradient."""
    node = strip_float_casts(node)
    while is_method(node, "detach") or is_function(node, torch.detach):
        node = strip_float_casts(node.args[0])
    if not isinstance(node, Node):
        return None
    if is_function(node, torch.embedding):  # the ATen-level spelling: (weight, idx), padding_idx=-1 is none
        if arg(node, 2, "padding_idx", -1) != -1:
            return "embedding with padding_idx (its row's gradient is dropped; not modelled)"
        if arg(node, 3, "scale_grad_by_freq", False):
            return "embedding with scale_grad_by_freq"
        g = Gather(node.args[0], strip_index_casts(node.args[1]), indexing=False,
                   sparse=bool(arg(node, 4, "sparse", False)))
    elif is_function(node, *EMBEDDING_FUNCTIONS):
        idx, table = node.args[0], arg(node, 1, "weight")
        if arg(node, 2, "padding_idx") is not None:
            return "embedding with padding_idx (its row's gradient is dropped; not modelled)"
        if arg(node, 3, "max_norm") is not None:
            return "embedding with max_norm (renormalises table rows in place)"
        if arg(node, 5, "scale_grad_by_freq", False):
            return "embedding with scale_grad_by_freq"
        g = Gather(table, strip_index_casts(idx), indexing=False, sparse=bool(arg(node, 6, "sparse", False)))
    elif is_function(node, operator.getitem) and isinstance(node.args[1], Node):
        g = Gather(node.args[0], strip_index_casts(node.args[1]), indexing=True)
    elif (is_function(node, torch.index_select) or is_method(node, "index_select")) and arg(node, 1, "dim") == 0:
        g = Gather(node.args[0], strip_index_casts(arg(node, 2, "index")), indexing=False)
    else:
        return None
    t, i = example_value(g.table), example_value(g.idx)
    if t is None or i is None or t.dim() != 2:
        return None
    if g.table.op != "placeholder" and g.table.op != "get_attr":
        return "the table is computed in the graph, not a parameter or input"
    return g


# ------------------------------------------------------------------ checks shared by both forms

def _dtype_reason(**vals: torch.Tensor | None) -> str | None:
    for name, v in vals.items():
        if v is None:
            return "shapes unknown (no example values)"
        if v.dtype not in FLOAT_DTYPES:
            return f"{name} dtype {v.dtype} is not supported (float32, bfloat16, float16)"
    return None


def _placement(table_val: torch.Tensor, compute: torch.device, opts: BcptOptions,
               sparse: bool = False) -> str | tuple[str, str]:
    """("direct" | "host", note) or a refusal reason."""
    where = _where(table_val, compute, opts)
    if sparse and not isinstance(where, str) and where[0] == "direct":
        return ("embedding with sparse=True on a table used in place keeps eager's sparse-gradient path "
                "(host tables with deepembed_tables='cpu' are rewritten)")
    return where


def _where(table_val: torch.Tensor, compute: torch.device, opts: BcptOptions) -> str | tuple[str, str]:
    if table_val.device == compute:
        if opts.deepembed_tables == "cpu" and compute.type != "cpu":
            return ("direct", (f"table is already on {compute}; move it to the host with "
                               "bcpt_compile.runtime.offload_tables to prefetch it"))
        return ("host", "") if opts.deepembed_tables == "cpu" else ("direct", "")
    if table_val.device.type == "cpu" and compute.type == "cuda":
        if opts.deepembed_tables == "cpu":
            return ("host", "")
        if opts.deepembed_tables == BODY_HOST_TABLES:
            return ("table is in host memory inside a checkpointed (higher-order op) body, where rows are not "
                    "prefetched: move the embedding lookup out of the checkpoint")
        return "table is in host memory; deepembed_tables='cpu' prefetches its rows"
    return f"table on {table_val.device} and compute on {compute}"


def _real_tensor(node: Node) -> torch.Tensor | None:
    """The tensor a placeholder / get_attr stands for (Dynamo keeps it on the node), if any."""
    try:
        if node.op == "placeholder":
            ex = getattr(node.meta.get("grapharg"), "example", None)
            return ex if isinstance(ex, torch.Tensor) else None
        if node.op == "get_attr":
            obj = node.graph.owning_module
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj if isinstance(obj, torch.Tensor) else None
    except (AttributeError, ReferenceError, TypeError):  # a dead reference or a missing attribute
        return None
    return None


def grad_mode_of(g: Gather) -> str:
    from ..runtime.fused import mode_for

    fused = mode_for(_real_tensor(g.table))
    if fused is not None:
        return fused
    return "sparse" if g.sparse else "dense"


def _detach_unless(graph: torch.fx.Graph, node: object, keep_grad: bool) -> object:
    """``node.detach()`` when eager read it without a gradient (under ``torch.no_grad()``) and it
    would otherwise give the fused op's backward a path to it, else ``node``."""
    if keep_grad or not isinstance(node, Node):
        return node
    val = example_value(node)
    if val is not None and not val.requires_grad:
        return node
    return graph.call_method("detach", (node,))


class _Rewriter:
    def __init__(self, gm: torch.fx.GraphModule, opts: BcptOptions, report: Report):
        self.gm, self.graph, self.opts, self.report = gm, gm.graph, opts, report
        self.plans: dict[tuple, Node] = {}

    def _after_inputs(self, node: Node) -> Node:
        """Where to insert a node computed from ``node`` as early as possible: after it,
        and after the last placeholder (placeholders must stay first)."""
        last_ph = None
        for n in self.graph.nodes:
            if n.op == "placeholder":
                last_ph = n
            else:
                break
        if node.op == "placeholder":
            return last_ph
        return node

    def _after_earlier_lookups(self, where: Node, key: tuple, at: Node) -> Node:
        """``where``, or the last lookup through ``idx`` before ``at`` that checks it by other rules
        (a token embedding ``tok(idx)`` of another size or spelling, an earlier plan) if later:
        eager raises a bad idx's error at the first lookup, so the plan's check, whose message
        follows ``key = (idx, rows, indexing)``, must not run before those."""
        idx = key[0]
        plans = {plan for plan_key, plan in self.plans.items() if plan_key[0] is idx}
        seen_where = False
        for n in self.graph.nodes:
            if n is at:
                break
            if not seen_where:
                seen_where = n is where
                continue
            g = gather_of(n) if n not in plans else None
            if n in plans or (isinstance(g, Gather) and g.idx is idx
                              and (idx, example_value(g.table).shape[0], g.indexing) != key):
                where = n
        return where

    def table_operands(self, g: Gather, at: Node, compute: torch.device, host: bool):
        """(table, idx, indexing, plan, slots) for the fused op: the table itself, or the host
        table's rows gathered to ``compute`` (slot-indexed, ``idx`` the tokens' slots)."""
        rows = example_value(g.table).shape[0]
        idx = g.idx
        key = (idx, rows, g.indexing)
        plan = self.plans.get(key)
        if plan is None:
            where, idx_val = self._after_earlier_lookups(self._after_inputs(idx), key, at), example_value(idx)
            if not idx_val.is_contiguous():  # idx[:, -1]: the kernels read idx flat
                with self.graph.inserting_after(where):
                    idx = where = self.graph.call_method("contiguous", (idx,))
            if idx_val.device != compute:  # ids on the host, compute on the GPU
                with self.graph.inserting_after(where):
                    idx = where = self.graph.call_method("to", (idx, str(compute)))
            with self.graph.inserting_after(where):
                plan = self.graph.call_function(torch.ops.bcpt.row_plan.default, (idx, rows, g.indexing))
            self.plans[key] = plan
        idx = plan.args[0]
        if not host:
            return g.table, idx, g.indexing, plan, False
        with self.graph.inserting_before(at):
            got = self.graph.call_function(torch.ops.bcpt.gather_rows.default,
                                           (g.table, plan, str(compute), grad_mode_of(g)))
            got.meta["stack_trace"] = at.meta.get("stack_trace")
            rows_node = self.graph.call_function(operator.getitem, (got, 0))
            inv_node = self.graph.call_function(operator.getitem, (got, 1))
        return rows_node, inv_node, False, plan, True

    # -------------------------------------------------------------- output-scale form

    def output_scale(self, mul: Node) -> None:
        ops = mul_operands(mul)
        if ops is None and mul.args and isinstance(mul.args[0], Node) \
                and linear_of(_through_value_identities(mul.args[0])) is not None and read_after_inplace(mul):
            ops = mul_operands(mul)  # ``y = value(k); y.mul_(emb(idx)); return y``: later reads of y read the write
        if ops is None:
            return
        for outer, g_node in (ops, ops[::-1]):
            lin_node = _through_value_identities(outer)
            lin = linear_of(lin_node)
            g = gather_of(_token_rows(g_node)) if lin is not None else None
            if lin is not None and g is not None:
                break
        else:
            reason = _hidden_rows_reason(ops) or _dropout_on_value_reason(ops)
            if reason is not None:
                self.report.add_miss(FAMILY, mul, reason)
            return
        if isinstance(g, str):
            self.report.add_miss(FAMILY, mul, g)
            return
        reason = self._output_refusal(mul, lin, lin_node, g, g_node)
        if isinstance(reason, str):
            self.report.add_miss(FAMILY, mul, reason)
            return
        compute = example_value(mul).device
        where, note = reason
        if note:
            self.report.add_miss("prefetch", mul, note)
        table, idx, indexing, plan, slots = self.table_operands(g, mul, compute, where == "host")
        with self.graph.inserting_before(mul):
            weight = self.graph.call_function(torch.t, (lin.weight,)) if lin.weight_is_kn else lin.weight
            # under autocast the value projection ran in its cast dtype: cast its inputs alike
            z_dtype = example_value(lin_node).dtype
            h, weight, bias = (
                self.graph.call_method("to", (n, z_dtype))
                if n is not None and example_value(n) is not None and example_value(n).dtype != z_dtype else n
                for n in (lin.x, weight, flat_bias(self.graph, lin.bias))
            )
            # the value projection or the rows read under ``torch.no_grad()``: no gradient through them
            h, weight, bias = (_detach_unless(self.graph, n, needs_grad(lin_node)) for n in (h, weight, bias))
            table = _detach_unless(self.graph, table, needs_grad(g_node))
            call = self.graph.call_function(torch.ops.bcpt.deepembed_linear.default,
                                            (h, weight, bias, table, idx, indexing, plan, slots))
            out = self.graph.call_function(operator.getitem, (call, 0))
            y_dtype = example_value(mul).dtype
            if torch.promote_types(z_dtype, example_value(g.table).dtype) != y_dtype:  # rows cast first
                out = self.graph.call_method("to", (out, y_dtype))
            out = own_result(self.graph, out, mul)
        out.meta.update({k: v for k, v in mul.meta.items() if k in ("example_value", "stack_trace", "nn_module_stack")})
        self.report.add_site(FAMILY, mul, "bcpt.deepembed_linear", [lin.x, lin.weight, g.table, g.idx])
        mul.replace_all_uses_with(out)
        erase_unused(mul, g_node, outer)

    def _output_refusal(self, mul, lin, lin_node, g: Gather, g_node):
        if squared_relu_of(lin.x, loose=True) is None:
            return "the value projection's input is not a squared relu (not a DeepEmbed FFN)"
        h, w, t, i = (example_value(n) for n in (lin.x, lin.weight, g.table, g.idx))
        z, e, y = example_value(lin_node), example_value(g_node), example_value(mul)
        reason = _dtype_reason(input=h, weight=w, table=t, output=y)
        if reason:
            return reason
        if i is None or i.dtype not in INDEX_DTYPES:
            return f"idx dtype {getattr(i, 'dtype', None)} is not an integer index (eager raises)"
        if e is None or z is None or tuple(e.shape) != tuple(z.shape):
            return "the embedding broadcasts against the value output (shapes differ)"
        flat_tokens = i.dim() == 1 and i.numel() == h.numel() // max(h.shape[-1], 1)  # emb(idx.flatten()).view(...)
        if tuple(i.shape) != tuple(h.shape[:-1]) and not flat_tokens:
            return f"idx shape {tuple(i.shape)} is not the tokens' shape {tuple(h.shape[:-1])}"
        if len(lin_node.users) != 1:
            return "the unscaled value output has other users, so it is computed anyway"
        if any(v is not None and v.dtype not in FLOAT_DTYPES for v in (h, w, z, e)):
            return "value input, weight and rows must be float32, bfloat16 or float16"
        if y.dtype != torch.promote_types(z.dtype, e.dtype):
            return "the product's dtype is not the promotion of its operands"
        return _placement(t, y.device, self.opts, g.sparse)

    # -------------------------------------------------------------- hidden-scale form

    def hidden_scale(self, mm: Node) -> None:
        operands = _einsum_rowmix_operands(mm)
        vector = operands is not None  # einsum: a is (..., r), not (..., 1, r)
        if vector:
            a_node, ev_node = operands
        elif not (is_function(mm, operator.matmul, torch.matmul, torch.bmm) or is_method(mm, "matmul", "bmm")):
            return
        elif len(mm.args) != 2 or mm.kwargs:
            return
        else:
            a_node, ev_node = mm.args
        if not (is_method(ev_node, "view", "reshape") or is_function(ev_node, torch.reshape)):
            return
        g = gather_of(ev_node.args[0])
        if g is None:
            return
        if isinstance(g, str):
            self.report.add_miss(FAMILY, mm, g)
            return
        reason = self._hidden_refusal(mm, a_node, ev_node, g, vector)
        if isinstance(reason, str):
            self.report.add_miss(FAMILY, mm, reason)
            return
        where, note = reason
        out_val = example_value(mm)
        r = example_value(ev_node).shape[-1]
        if note:
            self.report.add_miss("prefetch", mm, note)
        table, idx, indexing, plan, slots = self.table_operands(g, mm, out_val.device, where == "host")
        with self.graph.inserting_before(mm):
            a2 = self.graph.call_function(torch.reshape, (a_node, (-1, r)))
            table = _detach_unless(self.graph, table, needs_grad(ev_node))  # rows gathered under no_grad
            call = self.graph.call_function(torch.ops.bcpt.deepembed_rowmix.default,
                                            (a2, table, idx, r, indexing, plan, slots))
            out = self.graph.call_method("reshape_as", (call, a_node))  # a @ E keeps a's shape
        out.meta.update({k: v for k, v in mm.meta.items() if k in ("example_value", "stack_trace", "nn_module_stack")})
        self.report.add_site(FAMILY, mm, "bcpt.deepembed_rowmix", [a_node, g.table, g.idx])
        mm.replace_all_uses_with(out)
        erase_unused(mm, ev_node)
        if self.fuse_producer(out, r):
            self.report.sites[-1].op = "bcpt.deepembed_rowmix+hidden"

    def fuse_producer(self, mix: Node, r: int) -> bool:
        """Fold ``relu(x @ K) ** 2 * (mix @ s2 + s0)`` into ``bcpt.deepembed_hidden``.

        Optional: when the surrounding FFN is spelled differently the rowmix site stands alone.
        """
        while len(mix.users) == 1:
            user = next(iter(mix.users))
            if is_method(user, "squeeze", "view", "reshape") or is_function(user, torch.squeeze, torch.reshape) or \
                    _drops_unit_dims(user):
                mix = user
            else:
                break
        if len(mix.users) != 1:
            return False
        scale = next(iter(mix.users))
        if len(scale.users) == 1:
            outer = next(iter(scale.users))
            lm = linear_of(outer)
            if lm is not None and lm.x is mix and lm.bias is not None:
                scale = outer
        lm = linear_of(scale)
        if lm is None or lm.x is not mix or len(scale.users) != 1:
            return False
        kmul = next(iter(scale.users))
        ops = mul_operands(kmul)
        if ops is None:
            return False
        sq = ops[0] if ops[1] is scale else ops[1]
        relu = squared_relu_of(sq)
        u_node = relu_input(relu, allow_inplace=True) if relu is not None else None
        ul = linear_of(u_node)
        if ul is None or ul.bias is not None:
            return False
        if len(u_node.users) != 1 or len(relu.users) != 1 or len(sq.users) != 1:
            return False
        x, w, m, s2, y = (example_value(n) for n in (ul.x, ul.weight, mix, lm.weight, kmul))
        s0 = example_value(lm.bias) if lm.bias is not None else None
        if any(v is None for v in (x, w, m, s2, y)) or y.shape[:-1] != x.shape[:-1]:
            return False
        if len({v.dtype for v in (x, w, m, s2, y) + ((s0,) if s0 is not None else ())}) != 1:
            return False
        if m.numel() // r != x.numel() // x.shape[-1]:
            return False
        inputs = [ul.x, ul.weight, mix, lm.weight] + ([lm.bias] if lm.bias is not None else [])
        if any(needs_grad(n) for n in inputs) and not all(needs_grad(n) for n in (u_node, sq, scale, kmul)):
            return False  # part of the FFN ran under no_grad: the fused op would give it a gradient
        with self.graph.inserting_before(kmul):
            kw = self.graph.call_function(torch.t, (ul.weight,)) if ul.weight_is_kn else ul.weight
            s2w = lm.weight if lm.weight_is_kn else self.graph.call_function(torch.t, (lm.weight,))
            b2 = self.graph.call_function(torch.reshape, (mix, (-1, r)))
            s0 = flat_bias(self.graph, lm.bias)  # RWKV keeps s0 as a (1, 1, hidden) parameter
            call = self.graph.call_function(torch.ops.bcpt.deepembed_hidden.default, (ul.x, kw, b2, s2w, s0))
            k = own_result(self.graph, self.graph.call_function(operator.getitem, (call, 0)), kmul)
        k.meta.update({key: v for key, v in kmul.meta.items() if key in ("example_value", "stack_trace", "nn_module_stack")})
        kmul.replace_all_uses_with(k)
        erase_unused(kmul, sq, scale)
        return True

    def _hidden_refusal(self, mm, a_node, ev_node, g: Gather, vector: bool = False):
        a, ev, t, i, y = (example_value(n) for n in (a_node, ev_node, g.table, g.idx, mm))
        reason = _dtype_reason(input=a, table=t, output=y)
        if reason:
            return reason
        if i is None or i.dtype not in INDEX_DTYPES:
            return f"idx dtype {getattr(i, 'dtype', None)} is not an integer index (eager raises)"
        if ev is None or ev.dim() < 2 or ev.shape[-1] != ev.shape[-2] or ev.shape[-1] ** 2 != t.shape[1]:
            return "the table row is not viewed as a square (r, r) matrix"
        r = ev.shape[-1]
        if not isinstance(r, int):
            return "the (r, r) view of the table row has a symbolic r"
        tokens = i.numel()
        if vector:
            ok = (a.dim() >= 1 and a.shape[-1] == r and tuple(a.shape[:-1]) == tuple(ev.shape[:-2])
                  and a.numel() == tokens * r)
        elif a.dim() == 1:
            ok = ev.dim() == 2 and a.shape[0] == r and tokens == 1
        else:
            ok = (a.dim() == ev.dim() and a.shape[-2] == 1 and a.shape[-1] == r
                  and tuple(a.shape[:-2]) == tuple(ev.shape[:-2]) and a.numel() == tokens * r)
        if not ok or tuple(y.shape) != tuple(a.shape):
            return f"a {tuple(a.shape)} is not one r-vector per token for rows {tuple(ev.shape)}"
        if a.dtype != t.dtype or example_value(ev_node.args[0]).dtype != t.dtype:
            return f"a {a.dtype}, table {t.dtype} and the gathered rows must have one dtype"
        return _placement(t, y.device, self.opts, g.sparse)


def _through_value_identities(node: Node) -> Node:
    """The value projection under an inactive dropout and float casts (``value(k).float()``), each
    read only by the next: the op's result is cast to the product's dtype."""
    while isinstance(node, Node) and len(node.users) == 1:
        inner = through_inactive_dropout(node)
        if inner is node:
            src = _cast_input(node)
            before, after = example_value(src), example_value(node)
            same_place = before is not None and after is not None and (before.shape, before.device) == (
                after.shape, after.device)
            inner = src if same_place and before.dtype in FLOAT_DTYPES and after.dtype in FLOAT_DTYPES else node
        if inner is node:
            return node
        node = inner
    return node


def _token_rows(node: object) -> object:
    """The gathered rows under a view that only regroups tokens (``emb(idx.flatten()).view(B, T, C)``,
    ``W.index_select(0, idx.flatten()).view_as(x)``): each row stays whole and in token order."""
    if not (is_method(node, "view", "reshape", "view_as", "reshape_as", "unflatten") or is_function(node, torch.reshape)):
        return node
    src = node.args[0]
    before, after = example_value(src), example_value(node)
    if before is None or after is None or before.dim() != 2 or after.dim() == 0 or before.shape[-1] != after.shape[-1]:
        return node
    return src if len(src.users) == 1 else node


def _hidden_rows_reason(ops: tuple) -> str | None:
    """Why ``relu(key(x)) ** 2 * emb(idx)`` (the rows scale the hidden, then ``value`` projects) is left."""
    for sq, rows in (ops, ops[::-1]):
        if squared_relu_of(sq, loose=True) is not None and isinstance(gather_of(rows), Gather):
            return ("the rows scale the hidden relu(key(x)) ** 2 before the value projection "
                    "(value(k * emb(idx))): no fused op for this form")
    return None


def _dropout_on_value_reason(ops: tuple) -> str | None:
    """Why ``dropout(value(relu(key(x)) ** 2)) * emb(idx)`` is left: in training the dropout's
    random mask sits between the GEMM and its epilogue (in eval mode it is looked through)."""
    for d, rows in (ops, ops[::-1]):
        if not (is_function(d, *DROPOUT_FUNCTIONS) and isinstance(gather_of(_token_rows(rows)), Gather)):
            continue
        lin = linear_of(_through_value_identities(d.args[0]))
        if lin is not None and squared_relu_of(lin.x, loose=True) is not None:
            return "dropout on the value projection is active (training): its random mask is not modelled"
    return None


def _einsum_rowmix_operands(node: Node) -> tuple[Node, Node] | None:
    """(a, rows) for ``einsum("btr,btrs->bts", a, rows)``: any letters, prefix or ``...``."""
    if not is_function(node, torch.einsum, torch.functional.einsum) or node.kwargs:
        return None
    eq, *ops = node.args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or "->" not in eq or len(ops) != 2 or eq.count(",") != 1:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    a, e = lhs.split(",")
    if not a or len(e) != len(a) + 1 or not e.startswith(a) or out != a[:-1] + e[-1]:
        return None
    i, j, prefix = a[-1], e[-1], a[:-1]
    if i == j or i in prefix or j in prefix or "." in i + j:
        return None
    ev = ops[1]
    ok = is_method(ev, "view", "reshape") or is_function(ev, torch.reshape)
    return (ops[0], ev) if ok and isinstance(ops[0], Node) else None


def _drops_unit_dims(node: Node) -> bool:
    """``y[:, :, 0]`` / ``y[..., 0, :]`` / ``select`` that only drop size-1 dims: a reshape."""
    src = node.args[0] if node.args else None
    before, after = example_value(src), example_value(node)
    if before is None or after is None or before.numel() != after.numel():
        return False
    if is_method(node, "select") or is_function(node, torch.select):
        return True
    if not is_function(node, operator.getitem):
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return all(isinstance(k, int) or k is Ellipsis or k is None or k == slice(None) for k in index)


def rewrite_deepembed(gm: torch.fx.GraphModule, opts: BcptOptions, report: Report) -> None:
    """Rewrite both DeepEmbed forms, then place prefetch hints for host tables."""
    rw = _Rewriter(gm, opts, report)
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False):
            continue
        if mul_operands(node) is not None or is_method(node, "mul_") or is_function(node, operator.imul):
            rw.output_scale(node)
        else:
            rw.hidden_scale(node)
    _one_fused_update_per_table(gm, report)
    if opts.enabled("prefetch"):
        from .prefetch import insert_prefetch_hints

        insert_prefetch_hints(gm, opts, report)


def _one_fused_update_per_table(gm: torch.fx.GraphModule, report: Report) -> None:
    """A table with a fused row optimizer used by several sites would be updated once per
    site: those gathers return a sparse gradient instead, which AccumulateGrad sums and the
    optimizer's hook applies once, as in eager."""
    gathers: dict[Node, list[Node]] = {}
    for n in gm.graph.nodes:
        if is_function(n, torch.ops.bcpt.gather_rows.default) and str(n.args[3]).startswith("fused:"):
            gathers.setdefault(n.args[0], []).append(n)
    for nodes in gathers.values():
        if len(nodes) > 1:
            for n in nodes:
                n.args = (*n.args[:3], "sparse")
            report.add_miss("prefetch", nodes[0], f"table with a FusedRowOptimizer used {len(nodes)} times in one "
                                                  "graph: sparse gradient, applied once by the optimizer's hook "
                                                  "(one sync per use)")
