"""agd_optax: Automatic Gradient Descent for JAX, as an optax gradient transformation.

Module map (each module imports only those above it in its group, and no module imports one
that imports it back):

Leaves and their roles
  ``_paths``         leaf paths and shapes as messages name them (``path_to_str``, ``leaf_shape``)
  ``_roles``         :class:`Role` and its constructors (``dense``, ``conv``, ...), ``RoleError``
  ``_naming``        roles inferred from Flax's parameter names (``infer_roles``)
  ``_layouts``       :class:`Layout`: what the step needs of each leaf; ``resolve_layouts``
  ``_flax``          roles read off NNX modules (``nnx_roles``); the only module importing flax
  ``_pytorch``       roles of a PyTorch-layout tree (``pytorch_roles``)
  ``_jaxpr/``        reading a jaxpr: ``values`` (what is known of each value), ``interpreter``
                     (runs a jaxpr, each primitive by its rule in ``RULES``), ``weights`` and
                     ``structure`` (the rules)
  ``_trace``         roles read off the computation (``trace_roles``) from the interpreter's uses

The step
  ``_checks``        what AGD refuses: bad gains, updates that do not fit the parameters
  ``_sharding``      ``param_specs``: each leaf's mesh axes and global shape inside ``shard_map``
  ``_plan``          the static plan of a tree's step: per-leaf facts (axes, scale, threshold)
  ``_floats``        exact powers of two, exponents, kept-axis sums, eta of G
  ``_sums``          each leaf's reductions: its sums of squares, the NaN/Inf check of the rest,
                     the per-leaf values joined into one vector
  ``_rescale``       the rescaled pass: the powers of two that keep every sum of squares exact
                     (one per norm for the divisors, one for all of G's norms)
  ``_step``          the step kernel every AGD transformation calls: prologue (``prepare``),
                     norms and their guard (``measure``), ``step_size``, ``normalise``, ``agd_step``

The optimizers
  ``_agd``           ``scale_by_agd``, ``agd`` and their state
  ``_agd_momentum``  ``scale_by_agd_momentum``, ``agd_momentum``: the step along an average
  ``_hypergradient`` hyperparameters learned by hypergradient descent (``hypergradient``)
  ``_towers``        towers of it (``hypergradient_tower``, ``learned_hyperparams``)
  ``_initializers``  AGD's orthogonal initialisation (``dense_init``, ``conv_init``, ...)
"""

from agd_optax._agd import AGDState, agd, scale_by_agd
from agd_optax._agd_momentum import AGDMomentumState, agd_momentum, scale_by_agd_momentum
from agd_optax._flax import nnx_roles  # Imports flax only when called.
from agd_optax._hypergradient import HypergradientState, hypergradient
from agd_optax._initializers import conv_init, dense_init, reinitialize, scaled_orthogonal
from agd_optax._layouts import Layout, resolve_layouts
from agd_optax._naming import infer_roles
from agd_optax._pytorch import pytorch_roles
from agd_optax._roles import (
    Role,
    RoleError,
    bias,
    conv,
    dense,
    embedding,
    norm,
)
from agd_optax._towers import hypergradient_tower, learned_hyperparams
from agd_optax._trace import trace_roles

__version__ = "0.1.0"

__all__ = [
    "AGDMomentumState",
    "AGDState",
    "HypergradientState",
    "Layout",
    "Role",
    "RoleError",
    "agd",
    "agd_momentum",
    "bias",
    "conv",
    "conv_init",
    "dense",
    "dense_init",
    "embedding",
    "hypergradient",
    "hypergradient_tower",
    "infer_roles",
    "learned_hyperparams",
    "nnx_roles",
    "norm",
    "pytorch_roles",
    "reinitialize",
    "resolve_layouts",
    "scale_by_agd",
    "scale_by_agd_momentum",
    "scaled_orthogonal",
    "trace_roles",
]
