"""Fuse the exported step's attention blocks into ONNX Runtime's `MultiHeadAttention` (worker
side: onnx only).

The TorchScript exporter writes each attention block as a chain of small nodes: reshapes and
transposes into heads, the score products, scaling, masking with `Where`, softmax, masking the
probabilities again, the context product and the transposes back. ONNX Runtime runs each one as
a separate pass over a [B, heads, T, T] tensor; its contrib `MultiHeadAttention` (domain
`com.microsoft`) takes the projected query, key and value [B, T, D] and does the whole block in
one kernel. ONNX Runtime's own transformer optimizer does not recognise NeMo's blocks (its
`conformer` model type fused only SkipLayerNorm here), so they are matched here:

- the FastConformer's relative-position attention (`RelPositionMultiHeadAttention`):
  softmax((q + u)·kᵀ + rel_shift((q + v)·pᵀ)) / √d_k, masked. The position term becomes the
  kernel's `attention_bias`: scaled by 1/√d_k before its product (on the [B, T, heads, d_k]
  side, not the [B, heads, T, T] one), NeMo's rel_shift done as one strided slice
  (`_rel_shift`);
- the Transformer's plain attention (`MultiHeadAttention` of NeMo's transformer modules):
  softmax(q/c · (k/c)ᵀ + additive mask).

The masks become an additive `attention_bias` ([B, 1, T, T]). Valid query rows compute the same
function (masked keys get exp(-10000 - max) = 0 either way); a fully masked (padded) query row
gets a defined but meaningless value instead of NeMo's zeros, and no padded row reaches a valid
one (keys are masked, the convolution module zeroes padded frames, the preds are masked).
A block that does not have the expected shape is left as it is.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
HEADS_FIRST = [0, 2, 1, 3]  # [B, T, heads, d] <-> [B, heads, T, d]
KEYS_LAST = [0, 2, 3, 1]  # [B, T, heads, d] -> [B, heads, d, T]
SWAP_LAST = [0, 1, 3, 2]


def fuse_attention(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite `model` in place as the module docstring says; returns how many relative-position
    and plain attention blocks were fused. Nodes left unused are removed and the nodes sorted
    back into topological order. Raises nothing for a graph without such blocks (counts 0)."""
    g = _Graph(model.graph)
    counts = {"rel_pos_attention": 0, "attention": 0}
    for node in [n for n in model.graph.node if n.op_type == "Softmax"]:
        if _fuse_rel_pos(g, node):
            counts["rel_pos_attention"] += 1
        elif _fuse_plain(g, node):
            counts["attention"] += 1
    if any(counts.values()):
        g.commit(model)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


def fuse_attention_file(path: Path) -> dict[str, int]:
    """`fuse_attention` on the ONNX file at `path`, written back in place (the caller builds in
    a temporary folder). Returns the counts; raises what onnx raises on load or save."""
    model = onnx.load(path)
    counts = fuse_attention(model)
    if any(counts.values()):
        onnx.save(model, path)
    return counts


@dataclass
class _Graph:
    """Producer/consumer maps over a graph, plus the nodes to add and the outputs taken over."""

    graph: onnx.GraphProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=lambda: defaultdict(list))
    added: list[onnx.NodeProto] = field(default_factory=list)
    dropped: set[int] = field(default_factory=set)  # id() of nodes whose output a new node took over
    cache: dict[str, str] = field(default_factory=dict)
    fresh: int = 0

    def __post_init__(self) -> None:
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                self.consumers[name].append(node)
        self.inits = {t.name: t for t in self.graph.initializer}

    def op(self, name: str, op_type: str, **attrs: list[int]) -> onnx.NodeProto | None:
        """The node producing `name` if it is an `op_type` (with these attribute values)."""
        node = self.producer.get(name)
        if node is None or node.op_type != op_type:
            return None
        values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return node if all(list(values.get(k, [])) == v for k, v in attrs.items()) else None

    def only_consumer(self, name: str, op_type: str, **attrs: list[int]) -> onnx.NodeProto | None:
        """The one non-`Shape` consumer of `name`, if it is an `op_type` (with these attributes).
        `Shape` readers only feed the reshapes that the fusion makes dead."""
        users = [n for n in self.consumers.get(name, []) if n.op_type != "Shape"]
        if len(users) != 1 or users[0].op_type != op_type:
            return None
        values = {a.name: helper.get_attribute_value(a) for a in users[0].attribute}
        return users[0] if all(list(values.get(k, [])) == v for k, v in attrs.items()) else None

    def scalar(self, name: str) -> float | None:
        """The value of a one-element constant (initializer or `Constant` node), else None."""
        if name in self.inits:
            value = numpy_helper.to_array(self.inits[name])
        else:
            node = self.producer.get(name)
            if node is None or node.op_type != "Constant" or node.attribute[0].name != "value":
                return None
            value = numpy_helper.to_array(node.attribute[0].t)
        return float(value.reshape(-1)[0]) if value.size == 1 else None

    def heads(self, reshape: onnx.NodeProto) -> int | None:
        """The head count a [B, T, D] -> [B, T, heads, d] Reshape splits into: its target's
        third entry, from an initializer or a Concat of constants."""
        target = reshape.input[1]
        if target in self.inits:
            shape = numpy_helper.to_array(self.inits[target]).reshape(-1)
            return int(shape[2]) if shape.size == 4 and shape[2] > 0 else None
        concat = self.op(target, "Concat")
        if concat is None or len(concat.input) != 4:
            return None
        value = self.scalar(concat.input[2])
        return int(value) if value is not None and value > 0 else None

    def name(self, hint: str) -> str:
        self.fresh += 1
        return f"{hint}/fused_{self.fresh}"

    def const(self, hint: str, values: np.ndarray) -> str:
        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(values, name))
        return name

    def add(self, op_type: str, inputs: list[str], hint: str, domain: str = "",
            outputs: list[str] | None = None, **attrs: object) -> str:
        """Queue a new node; returns its (first) output's name."""
        out = outputs or [self.name(hint)]
        self.added.append(helper.make_node(op_type, inputs, out, name=f"{out[0]}/{op_type}",
                                           domain=domain or None, **attrs))
        return out[0]

    def commit(self, model: onnx.ModelProto) -> None:
        """Put the new nodes in, drop what nothing reads any more, sort topologically."""
        nodes = [n for n in self.graph.node if id(n) not in self.dropped] + self.added
        live = {o.name for o in self.graph.output}
        keep: list[onnx.NodeProto] = []
        for node in reversed(_toposort(nodes, self.graph)):
            if any(o in live for o in node.output):
                keep.append(node)
                live.update(i for i in node.input if i)
        del self.graph.node[:]
        self.graph.node.extend(reversed(keep))
        unused = [t for t in self.graph.initializer if t.name not in live]
        for t in unused:
            self.graph.initializer.remove(t)
        # Shapes of removed tensors go; ONNX's shape inference cannot type a contrib op's output,
        # and the int8 quantizer needs the type of what reads it.
        del model.graph.value_info[:]
        model.graph.value_info.extend(
            helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, [None, None, None])
            for n in self.added if n.op_type == "MultiHeadAttention")


def _fuse_rel_pos(g: _Graph, softmax: onnx.NodeProto) -> bool:
    """Where(mask, -c, (MatMul(q+u, kᵀ) + bd) / s) -> Softmax -> Where(mask, 0, ·) -> MatMul(·, v)
    -> Transpose -> Reshape: see the module docstring."""
    masked = g.op(softmax.input[0], "Where")
    if masked is None or g.scalar(masked.input[1]) is None:
        return False
    div = g.op(masked.input[2], "Div")
    s = g.scalar(div.input[1]) if div is not None else None
    total = g.op(div.input[0], "Add") if div is not None else None
    if total is None or not s:
        return False
    pair = _split_sum(total, lambda name: g.op(name, "MatMul") is not None
                      and g.op(g.producer[name].input[0], "Transpose", perm=HEADS_FIRST) is not None)
    if pair is None:
        return False
    ac, bd_name = g.producer[pair[0]], pair[1]
    q_heads = g.op(ac.input[0], "Transpose", perm=HEADS_FIRST)
    k_heads = g.op(ac.input[1], "Transpose", perm=KEYS_LAST)
    k_split = g.op(k_heads.input[0], "Reshape") if k_heads is not None else None
    found = _rel_shift_product(g, bd_name)
    bd, nemo_shift = found if found is not None else (None, False)
    after = g.only_consumer(softmax.output[0], "Where")
    if (q_heads is None or k_split is None or bd is None or after is None
            or after.input[2] != softmax.output[0] or g.scalar(after.input[1]) != 0.0):
        return False
    tail = _context_tail(g, after.output[0])
    heads = g.heads(k_split)
    if tail is None or heads is None:
        return False
    v_name, reshape = tail
    # NeMo crops the position term to the score matrix's width, read with Shape from the q·kᵀ
    # product: that Shape would keep the product alive, so it is rebuilt from q and k.
    shape_users = [n for n in g.consumers[ac.output[0]] if n.op_type == "Shape"]
    if any(len(n.attribute) for n in shape_users):
        return False
    hint = softmax.name.rsplit("/", 1)[0] or "attention"
    if shape_users:
        heads_first = g.const(hint, np.array([0, 2, 1], np.int64))
        b_h_t = g.add("Gather", [g.add("Shape", [q_heads.input[0]], hint), heads_first], hint, axis=0)
        t_k = g.add("Shape", [k_split.input[0]], hint, start=1, end=2)
        for user in shape_users:  # [B, heads, T, T_k]
            g.add("Concat", [b_h_t, t_k], hint, outputs=[user.output[0]], axis=0)
            g.dropped.add(id(user))
    # bd / s, scaled on its [B, heads, T, d_k] operand: s·T·d_k values instead of heads·T·T.
    inv_s = g.const(hint, np.array(1.0 / s, np.float32))
    bd.input[0] = g.add("Mul", [bd.input[0], inv_s], hint)
    zero = g.const(hint, np.array(0.0, np.float32))
    mask_bias = g.add("Where", [masked.input[0], masked.input[1], zero], hint)
    if nemo_shift:
        bd_name = _rel_shift(g, bd.output[0], hint)
    bias = g.add("Add", [bd_name, mask_bias], hint)
    flat = g.const(hint, np.array([0, 0, -1], np.int64))
    query = g.add("Reshape", [q_heads.input[0], flat], hint)
    g.add("MultiHeadAttention", [query, k_split.input[0], v_name, "", "", bias], hint, domain=MS_DOMAIN,
          outputs=[reshape.output[0]], num_heads=heads, scale=1.0 / s)
    g.dropped.add(id(reshape))
    return True


def _fuse_plain(g: _Graph, softmax: onnx.NodeProto) -> bool:
    """MatMul(q/c1, Transpose(k/c2)) + mask -> Softmax -> MatMul(·, v) -> Transpose -> Reshape."""
    total = g.op(softmax.input[0], "Add")
    if total is None:
        return False
    pair = _split_sum(total, lambda name: g.op(name, "MatMul") is not None)
    if pair is None:
        return False
    scores, mask_name = g.producer[pair[0]], pair[1]
    q_div, k_swap = g.op(scores.input[0], "Div"), g.op(scores.input[1], "Transpose", perm=SWAP_LAST)
    k_div = g.op(k_swap.input[0], "Div") if k_swap is not None else None
    if q_div is None or k_div is None:
        return False
    c1, c2 = g.scalar(q_div.input[1]), g.scalar(k_div.input[1])
    q_heads = g.op(q_div.input[0], "Transpose", perm=HEADS_FIRST)
    k_heads = g.op(k_div.input[0], "Transpose", perm=HEADS_FIRST)
    q_split = g.op(q_heads.input[0], "Reshape") if q_heads is not None else None
    k_split = g.op(k_heads.input[0], "Reshape") if k_heads is not None else None
    tail = _context_tail(g, softmax.output[0])
    if not c1 or not c2 or q_split is None or k_split is None or tail is None:
        return False
    heads = g.heads(q_split)
    if heads is None:
        return False
    v_name, reshape = tail
    hint = softmax.name.rsplit("/", 1)[0] or "attention"
    bias = g.cache.get(mask_name)
    if bias is None:  # [B, 1, 1, T] -> [B, 1, T, T], once for every layer that shares the mask
        length = g.add("Shape", [q_split.input[0]], hint, start=1, end=2)
        one = g.const(hint, np.array([1, 1], np.int64))
        last = g.const(hint, np.array([1], np.int64))
        shape = g.add("Concat", [one, length, last], hint, axis=0)
        bias = g.cache[mask_name] = g.add("Expand", [mask_name, shape], hint)
    g.add("MultiHeadAttention", [q_split.input[0], k_split.input[0], v_name, "", "", bias], hint,
          domain=MS_DOMAIN, outputs=[reshape.output[0]], num_heads=heads, scale=1.0 / (c1 * c2))
    g.dropped.add(id(reshape))
    return True


def _split_sum(add: onnx.NodeProto, is_first: Callable[[str], bool]) -> tuple[str, str] | None:
    """The two inputs of `add`, the one `is_first` accepts first; None when neither is."""
    a, b = add.input
    return (a, b) if is_first(a) else (b, a) if is_first(b) else None


def _rel_shift_product(g: _Graph, name: str) -> tuple[onnx.NodeProto, bool] | None:
    """The MatMul that NeMo's rel_shift (Pad, Reshape, Slice, Reshape) and the crop to T
    (Slice) start from, walking up from `name`, and whether the chain is exactly that."""
    chain = []
    for _ in range(8):
        node = g.producer.get(name)
        if node is None:
            return None
        if node.op_type == "MatMul":
            return node, chain == ["Slice", "Reshape", "Slice", "Reshape", "Pad"]
        if node.op_type not in ("Pad", "Reshape", "Slice"):
            return None
        chain.append(node.op_type)
        name = node.input[0]
    return None


def _rel_shift(g: _Graph, product: str, hint: str) -> str:
    """NeMo's rel_shift of `product` [B, H, T, P = 2T-1] cropped to [B, H, T, T], in one copy
    fewer: out[i, j] = product[i, T-1-i+j] is element T-1 + i·(P-1) + j of the flattened rows,
    so a slice of the flat rows read with row stride P-1 (at least 1, for T = 1) and cropped
    gives it, without NeMo's padded copy."""
    i64 = lambda *v: g.const(hint, np.array(v, np.int64))  # noqa: E731
    shape = g.add("Shape", [product], hint)
    t = g.add("Gather", [shape, i64(2)], hint, axis=0)
    width = g.add("Gather", [shape, i64(3)], hint, axis=0)
    stride = g.add("Max", [g.add("Sub", [width, i64(1)], hint), i64(1)], hint)
    start = g.add("Sub", [t, i64(1)], hint)
    end = g.add("Add", [start, g.add("Mul", [t, stride], hint)], hint)
    flat = g.add("Reshape", [product, i64(0, 0, -1)], hint)
    rows = g.add("Slice", [flat, start, end, i64(2)], hint)
    split = g.add("Reshape", [rows, g.add("Concat", [i64(0, 0), t, stride], hint, axis=0)], hint)
    return g.add("Slice", [split, i64(0), t, i64(3)], hint)


def _context_tail(g: _Graph, probs: str) -> tuple[str, onnx.NodeProto] | None:
    """After the probabilities: MatMul(probs, heads-first v) -> Transpose -> Reshape to [B, T, D].
    Returns (v before it was split into heads, the final Reshape)."""
    context = g.only_consumer(probs, "MatMul")
    if context is None or context.input[0] != probs:
        return None
    v_heads = g.op(context.input[1], "Transpose", perm=HEADS_FIRST)
    v_split = g.op(v_heads.input[0], "Reshape") if v_heads is not None else None
    back = g.only_consumer(context.output[0], "Transpose", perm=HEADS_FIRST)
    reshape = g.only_consumer(back.output[0], "Reshape") if back is not None else None
    if v_split is None or reshape is None:
        return None
    return v_split.input[0], reshape


def _toposort(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """`nodes` in an order where every input is made before it is read (stable: the given
    order where it already is one)."""
    made = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {o: n for n in nodes for o in n.output}
    done: set[int] = set()
    out: list[onnx.NodeProto] = []
    for root in nodes:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if id(node) in done:
                continue
            if expanded:
                done.add(id(node))
                out.append(node)
                made.update(node.output)
                continue
            stack.append((node, True))
            for name in node.input:
                if name not in made and name in producer and id(producer[name]) not in done:
                    stack.append((producer[name], False))
    return out


__all__ = ["MS_DOMAIN", "fuse_attention", "fuse_attention_file"]
