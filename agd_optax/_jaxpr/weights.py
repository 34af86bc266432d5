"""Rules for the primitives that make a parameter a weight: ``dot_general`` (a dense map),
``conv_general_dilated`` (a convolution) and ``gather`` (an embedding lookup, or indexing)."""

from __future__ import annotations

import math

from agd_optax._jaxpr.values import EMPTY, Axes, Info, Use, View
from agd_optax._roles import conv, dense, embedding


def gather(interp, eqn, ins, where):
    operand, indices = ins[0], ins[1]
    dn = eqn.params["dimension_numbers"]
    slice_sizes = tuple(eqn.params["slice_sizes"])
    op_shape = tuple(eqn.invars[0].aval.shape)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    batch_out = [d for d in range(len(out_shape)) if d not in dn.offset_dims]
    if indices.views or (operand.views and dn.operand_batching_dims):
        interp.other(ins, f"'gather'{where}")
        return [EMPTY]
    kept = [a for a in range(len(op_shape)) if a not in dn.collapsed_slice_dims]
    if not operand.views:
        return [Info(const=operand.const and indices.const)]
    if not batch_out:  # One slice, no index batch: indexing, W[i].
        views = []
        for v in operand.views:
            axes: list[Axes] = [()] * len(out_shape)
            for d, a in zip(dn.offset_dims, kept):
                axes[d] = v.axes[a]
            gone = {x for a in dn.collapsed_slice_dims for x in v.axes[a]}
            views.append(View(v.leaf, tuple(axes), v.selected | frozenset(gone)))
        return [Info(views=tuple(views))]
    outputs = []
    for v in operand.views:
        fan_in = [x for a in dn.start_index_map for x in v.axes[a]]
        partial = [a for a in kept if slice_sizes[a] not in (1, op_shape[a])]
        fan_out = [x for a in kept if a not in dn.start_index_map for x in v.axes[a]]
        what = f"'gather' (a lookup){where}"
        role = weight_role(interp, v, fan_in, fan_out, [], what, lookup=True)
        if role is None:
            continue
        if partial:
            interp.uses[v.leaf].append(Use("other", f"a partial {what}"))
            continue
        interp.uses[v.leaf].append(Use("lookup", what, role))
        axes = [()] * len(out_shape)
        for d, a in zip(dn.offset_dims, kept):
            axes[d] = v.axes[a]
        outputs.append((v.leaf, tuple(axes)))
    return [Info(outputs=tuple(outputs))]


# Weights -------------------------------------------------------------------------------
def weight_role(interp, v, fan_in, fan_out, stack, what, *, spatial=None, groups=1, lookup=False):
    ndim = len(interp.shapes[v.leaf])
    stack = set(stack) | set(v.selected)
    parts = [set(fan_in), set(fan_out), stack, set(spatial or ())]
    used = [x for p in parts for x in p]
    if len(used) != len(set(used)) or set(used) != set(range(ndim)) or not fan_in or not fan_out:
        interp.uses[v.leaf].append(
            Use(
                "other",
                f"{what} with fan-in axes {sorted(set(fan_in))}, fan-out axes "
                f"{sorted(set(fan_out))}, stack axes {sorted(stack)}"
                + (f", spatial axes {sorted(set(spatial))}" if spatial else "")
                + f" (of {ndim})",
            )
        )
        return None
    fi, fo, st = tuple(sorted(set(fan_in))), tuple(sorted(set(fan_out))), tuple(sorted(stack))
    if spatial is not None:
        return conv(tuple(sorted(spatial)), fi[0], fo[0], groups=groups, stack_axes=st)
    if lookup:  # A table reads as the map from its features to its entries (embedding()).
        fi, fo = fo, fi
        if fi == (ndim - 1,) and fo == (ndim - 2,):
            return embedding(stack_axes=st)
    return dense(fi, fo, stack_axes=st)


def dot_general(interp, eqn, ins, where):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    out_ndim = len(eqn.outvars[0].aval.shape)
    if ins[0].views and ins[1].views:
        interp.other(ins, f"'dot_general' of two parameters{where}")
        return [EMPTY]
    outputs = []
    for side, (info, c, b) in enumerate(((ins[0], lc, lb), (ins[1], rc, rb))):
        ndim = len(eqn.invars[side].aval.shape)
        free = [d for d in range(ndim) if d not in c and d not in b]
        # one_hot(ids) @ table is a lookup, as table[ids] is: contracted over the one-hot axis.
        hot = ins[1 - side].one_hot
        lookup = hot.count(True) == 1 and [hot.index(True)] == list((rc, lc)[side])
        for v in info.views:
            fan_in = [x for d in c for x in v.axes[d]]
            fan_out = [x for d in free for x in v.axes[d]]
            stack = [x for d in b for x in v.axes[d]]
            what = f"'dot_general'{' with one-hot ids (a lookup)' if lookup else ''}{where}"
            role = weight_role(interp, v, fan_in, fan_out, stack, what, lookup=lookup)
            if role is None:
                continue
            interp.uses[v.leaf].append(Use("lookup" if lookup else "weight", what, role))
            other_free = len(eqn.invars[1 - side].aval.shape) - len(c) - len(b)
            axes = [v.axes[d] for d in b]
            if side == 0:
                axes += [v.axes[d] for d in free] + [()] * other_free
            else:
                axes += [()] * other_free + [v.axes[d] for d in free]
            assert len(axes) == out_ndim
            outputs.append((v.leaf, tuple(axes)))
    return [Info(outputs=tuple(outputs), const=ins[0].const and ins[1].const)]


def conv_general_dilated(interp, eqn, ins, where):
    dn = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    if lhs.views or eqn.params["batch_group_count"] != 1:
        interp.other(ins, f"'conv_general_dilated'{where}")
        return [EMPTY]
    outputs = []
    out_axes: list[Axes] = [()] * len(eqn.outvars[0].aval.shape)
    for v in rhs.views:
        shape = interp.shapes[v.leaf]
        outs = v.axes[dn.rhs_spec[0]]
        ins_ = v.axes[dn.rhs_spec[1]]
        spatial = [x for d in dn.rhs_spec[2:] for x in v.axes[d]]
        groups = int(eqn.params["feature_group_count"])
        stack: list[int] = []
        what = f"'conv_general_dilated'{where}"
        if len(outs) > 1:  # vmap folds a stack axis into the output features and the groups.
            lead = outs[:-1]
            m = math.prod(shape[a] for a in lead)
            if groups % m == 0:
                stack, groups, outs = list(lead), groups // m, outs[-1:]
        if len(outs) != 1 or len(ins_) != 1:
            interp.uses[v.leaf].append(Use("other", f"{what} whose features merge axes"))
            continue
        if not spatial and groups == 1:
            role = weight_role(interp, v, ins_, outs, stack, what)
        else:
            role = weight_role(interp, v, ins_, outs, stack, what, spatial=spatial, groups=groups)
        if role is None:
            continue
        interp.uses[v.leaf].append(Use("weight", what, role))
        axes = list(out_axes)
        axes[dn.out_spec[1]] = v.axes[dn.rhs_spec[0]]
        outputs.append((v.leaf, tuple(axes)))
    return [Info(outputs=tuple(outputs), const=lhs.const and rhs.const)]
