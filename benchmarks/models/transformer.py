"""A decoder-only transformer language model (GPT style) in Flax NNX.

Token and learned position embeddings, ``depth`` pre-norm blocks (causal multi-head attention,
then a GELU MLP, each added to the residual stream), a final LayerNorm and an output head that is
either its own ``Linear`` or the token embedding transposed (``tied=True``).

With ``scan_layers=True`` the blocks are one stacked module (built with ``nnx.vmap``, applied
with ``nnx.scan``): every block parameter gets a leading ``depth`` axis and the forward pass
compiles one block instead of ``depth``. :func:`stack_blocks` / :func:`unstack_blocks` move
parameters between the two layouts, which compute the same function.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import agd_optax

INITS = ("agd", "gpt2")
MLP_RATIO = 4
GPT2_STD = 0.02


def _initializers(init: str, depth: int) -> dict[str, Any]:
    """Kernel and embedding initialisers of every weight for ``init``.

    ``"agd"``: AGD's scaled semi-orthogonal weights (attention projections as the matrices
    ``width -> heads * head_dim`` and back, embeddings as the map ``width -> rows``, fan-in the width).
    ``"gpt2"``: normal(0.02) everywhere, the residual outputs (attention output and second MLP
    layer) scaled by ``1 / sqrt(2 * depth)``, the usual recipe for Adam-trained LMs.
    """
    if init == "agd":
        # LinearGeneral initialises its kernel as the flat (fan-in, fan-out) matrix and reshapes
        # it, so the attention projections take the plain dense initialiser too.
        dense = agd_optax.dense_init()
        embed = agd_optax.scaled_orthogonal(agd_optax.embedding())
        return dict(qkv=dense, attn_out=dense, dense=dense, residual=dense, embed=embed)
    if init == "gpt2":
        normal = jax.nn.initializers.normal(GPT2_STD)
        residual = jax.nn.initializers.normal(GPT2_STD / math.sqrt(2 * depth))
        return dict(qkv=normal, attn_out=residual, dense=normal, residual=residual, embed=normal)
    raise ValueError(f"unknown init {init!r}; expected one of {INITS}")


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(
        self, width: int, heads: int, *, bias: bool, inits: dict[str, Any], rngs: nnx.Rngs
    ):
        norm = dict(use_scale=bias, use_bias=bias, rngs=rngs)
        self.ln1 = nnx.LayerNorm(width, **norm)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads,
            in_features=width,
            use_bias=bias,
            kernel_init=inits["qkv"],
            out_kernel_init=inits["attn_out"],
            decode=False,
            rngs=rngs,
        )
        self.ln2 = nnx.LayerNorm(width, **norm)
        hidden = MLP_RATIO * width
        self.fc1 = nnx.Linear(width, hidden, use_bias=bias, kernel_init=inits["dense"], rngs=rngs)
        self.fc2 = nnx.Linear(
            hidden, width, use_bias=bias, kernel_init=inits["residual"], rngs=rngs
        )

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class Transformer(nnx.Module):
    """Decoder-only LM mapping token ids ``(batch, length)`` to logits ``(batch, length, vocab)``.

    Args:
      vocab_size: number of token ids.
      context: the longest sequence the model reads (rows of the position embedding).
      depth: number of blocks.
      width: model (residual stream) width; the MLP is ``4 * width`` wide.
      heads: attention heads; must divide ``width``.
      bias: biases in every Linear and attention projection, and LayerNorm scales and offsets
        (default: none of them, the AGD paper's convention).
      tied: the output head is the token embedding transposed (no separate head weight).
      scan_layers: stack the blocks and apply them with ``nnx.scan``.
      init: ``"agd"`` (AGD's scaled orthogonal initialisation of every weight) or ``"gpt2"``.
      rngs: ``nnx.Rngs`` for initialisation.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        context: int,
        depth: int,
        width: int,
        heads: int,
        bias: bool = False,
        tied: bool = False,
        scan_layers: bool = False,
        init: str = "agd",
        rngs: nnx.Rngs,
    ):
        for name, value in (
            ("vocab_size", vocab_size),
            ("context", context),
            ("depth", depth),
            ("width", width),
            ("heads", heads),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Transformer: {name} must be a positive int, got {value!r}")
        if width % heads:
            raise ValueError(f"Transformer: heads={heads} does not divide width={width}")
        inits = _initializers(init, depth)
        self.vocab_size, self.context, self.depth = vocab_size, context, depth
        self.tied, self.scan_layers = tied, scan_layers
        self.token_embed = nnx.Embed(vocab_size, width, embedding_init=inits["embed"], rngs=rngs)
        self.pos_embed = nnx.Embed(context, width, embedding_init=inits["embed"], rngs=rngs)
        block = dict(width=width, heads=heads, bias=bias, inits=inits)
        if scan_layers:

            @nnx.split_rngs(splits=depth)
            @nnx.vmap(in_axes=0, out_axes=0)
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(**block, rngs=rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(**block, rngs=rngs) for _ in range(depth)])
        self.ln_f = nnx.LayerNorm(width, use_scale=bias, use_bias=bias, rngs=rngs)
        if tied:
            self.head = None
        else:
            self.head = nnx.Linear(
                width, vocab_size, use_bias=bias, kernel_init=inits["dense"], rngs=rngs
            )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2:
            raise ValueError(f"Transformer expects token ids (batch, length), got {tokens.shape}")
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(f"sequence length {length} exceeds the model's context {self.context}")
        x = self.token_embed(tokens) + self.pos_embed(jnp.arange(length))[None]
        mask = nnx.make_causal_mask(jnp.ones((1, length), jnp.int32))
        if self.scan_layers:

            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def apply(block: Block, x: jax.Array) -> jax.Array:
                return block(x, mask)

            x = apply(self.blocks, x)
        else:
            for block in self.blocks:
                x = block(x, mask)
        x = self.ln_f(x)
        return self.token_embed.attend(x) if self.tied else self.head(x)


def make_transformer(vocab_size: int, *, scan_layers: bool = False, **kwargs: Any) -> Transformer:
    """A :class:`Transformer` whose initial weights do not depend on ``scan_layers``: the blocks
    are initialised one by one and, for ``scan_layers=True``, stacked. So the two layouts of a
    seed start from, and train to, the same numbers. Takes :class:`Transformer`'s arguments."""
    model = Transformer(vocab_size, scan_layers=False, **kwargs)
    if not scan_layers:
        return model
    kwargs = {k: v for k, v in kwargs.items() if k != "rngs"}
    scanned = nnx.eval_shape(
        lambda: Transformer(vocab_size, scan_layers=True, rngs=nnx.Rngs(0), **kwargs)
    )
    load_params(scanned, stack_blocks(nnx.state(model, nnx.Param), model.depth))
    return scanned


# --------------------------------------------------------------------------------------------------
# Moving parameters between the stacked and unstacked layouts.


def _flat(state: Any) -> dict[tuple, Any]:
    return {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}


def stack_blocks(params: Any, depth: int) -> dict[tuple[str, ...], jax.Array]:
    """Parameters of an unstacked model (``blocks/<i>/...``) laid out for its ``scan_layers``
    twin (``blocks/...`` with a leading ``depth`` axis), as a flat ``{path: array}`` dict for
    :func:`load_params`."""
    flat = {k: v[...] for k, v in _flat(params).items()}
    out: dict[tuple[str, ...], jax.Array] = {}
    for key in flat:
        if key[0] != "blocks":
            out[key] = flat[key]
        elif key[1] == "0":
            rest = key[2:]
            out[("blocks", *rest)] = jnp.stack(
                [flat[("blocks", str(i), *rest)] for i in range(depth)]
            )
    return out


def unstack_blocks(params: Any, depth: int) -> dict[tuple[str, ...], jax.Array]:
    """The inverse of :func:`stack_blocks`: a stacked model's parameters for its unstacked twin."""
    out: dict[tuple[str, ...], jax.Array] = {}
    for key, value in _flat(params).items():
        value = value[...]
        if key[0] != "blocks":
            out[key] = value
        else:
            for i in range(depth):
                out[("blocks", str(i), *key[1:])] = value[i]
    return out


def load_params(model: nnx.Module, flat: dict[tuple[str, ...], jax.Array]) -> None:
    """Sets ``model``'s parameters from a flat ``{path: array}`` dict covering all of them."""
    state = nnx.state(model, nnx.Param)
    mine = _flat(state)
    if set(mine) != set(flat):
        missing = sorted("/".join(k) for k in set(mine) - set(flat))
        extra = sorted("/".join(k) for k in set(flat) - set(mine))
        raise ValueError(f"parameters do not match the model: missing {missing}, extra {extra}")
    for key, var in mine.items():
        if tuple(var.shape) != tuple(flat[key].shape):
            raise ValueError(
                f"parameter '{'/'.join(key)}' has shape {tuple(var.shape)} in the model but "
                f"{tuple(flat[key].shape)} in the given parameters"
            )
        var.set_value(flat[key])


# --------------------------------------------------------------------------------------------------
# Sampling.


def generate(
    model: Transformer, prompt: jax.Array, steps: int, key: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """``steps`` tokens sampled after ``prompt`` (1-D ids), each from the model's distribution
    given the last ``context`` tokens (``temperature=0``: the most likely token)."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 1 or prompt.shape[0] < 1:
        raise ValueError(f"generate needs a non-empty 1-D prompt, got shape {prompt.shape}")
    context = model.context
    window = prompt[-context:]
    n = window.shape[0]
    window = jnp.concatenate([window, jnp.zeros(context - n, jnp.int32)])
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(window, n, key):
        logits = nnx.merge(graphdef, state)(window[None])[0]
        last = jax.lax.dynamic_index_in_dim(logits, n - 1, keepdims=False)
        if temperature == 0:
            token = jnp.argmax(last).astype(jnp.int32)
        else:
            token = jax.random.categorical(key, last / temperature).astype(jnp.int32)
        full = n == context
        shifted = jnp.where(full, jnp.roll(window, -1), window)
        window = jax.lax.dynamic_update_index_in_dim(shifted, token, jnp.where(full, n - 1, n), 0)
        return window, jnp.minimum(n + 1, context), token

    out = []
    n = jnp.asarray(n, jnp.int32)
    for k in jax.random.split(key, steps):
        window, n, token = step(window, n, k)
        out.append(token)
    return jnp.stack(out) if out else jnp.zeros((0,), jnp.int32)
