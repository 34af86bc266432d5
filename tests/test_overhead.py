"""The cost benchmark (benchmarks.overhead) on tiny trees: it runs, gives finite numbers, the
state-bytes table and the fusion counts. Timings are never asserted on."""

import math

import jax
import jax.numpy as jnp
import pytest

import agd_optax
from benchmarks import overhead


def test_quick_run_gives_finite_ratios_and_the_state_table(tmp_path):
    # Float32 updates here; the bfloat16 ones are timed in test_main_writes_the_device_table.
    args = overhead.parse_args(["--quick", "--dtypes", "float32", "--out", str(tmp_path)])
    result = overhead.run(args)
    assert {(r["tree"], r["dtype"]) for r in result["updates"]} == {
        (t, "float32") for t in ("tiny_mlp", "tiny_cnn")
    }
    for row in result["updates"]:
        assert set(row["seconds"]) == set(overhead.OPTIMIZERS)
        base = row["seconds"]["sgd"]
        for seconds in row["seconds"].values():
            ratio = seconds / base
            assert math.isfinite(ratio) and ratio > 0
    assert [r["model"] for r in result["train_steps"]] == ["mlp", "cnn1d"]
    for row in result["train_steps"]:
        assert all(math.isfinite(s) and s > 0 for s in row["seconds"].values())
    state = result["state_bytes"]
    assert state["agd"]["float32"] == (0.0, 12)  # Three scalars: count, eta, G.
    assert state["adam"]["float32"][0] == 8.0
    assert state["sgd"]["float32"][0] == 0.0 and state["sgd_momentum"]["float32"][0] == 4.0
    assert state["adam"]["bfloat16"][0] == 4.0
    text = overhead.markdown(result, args, "cmd")
    assert "| agd | 0 | 0 | 12 |" in text and "| adam | 8 | 4 |" in text


def test_main_writes_the_device_table(tmp_path):
    argv = ["--quick", "--no-train-step", "--optimizers", "agd", "--dtypes", "bfloat16"]
    assert overhead.main([*argv, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "overhead_cpu.md").read_text()
    assert "| tiny_mlp |" in text and "| sgd ms |" in text and "bfloat16" in text
    assert "## What XLA emits" in text


def test_agd_update_reads_each_leaf_in_reductions_and_one_elementwise_pass():
    shapes = overhead.tiny_cnn()
    threshold = overhead.smallest_weight(shapes)
    agd = overhead.fusion_counts(
        overhead.update_hlo(agd_optax.agd(), shapes, jnp.float32), threshold
    )
    sgd = overhead.fusion_counts(
        overhead.update_hlo(overhead.OPTIMIZERS["sgd"](), shapes, jnp.float32), threshold
    )
    leaves = len(jax.tree.leaves(shapes))
    assert sgd.get("elementwise") == leaves and sgd.get("reduction", 0) == 0
    # One elementwise pass per leaf (update and apply fused) and at least one reduction (its
    # norm): XLA may recompute a small leaf's reduction rather than keep it, so not exactly one.
    assert agd.get("elementwise") == leaves and agd.get("reduction", 0) >= leaves


def test_gpt2_small_tree_has_gpt2_size_and_agd_infers_every_role():
    shapes = overhead.gpt2_small()
    assert overhead.num_params(shapes) == pytest.approx(124.4e6, rel=0.01)
    roles = agd_optax.infer_roles(shapes)  # Raises naming the leaf if one cannot be inferred.
    kinds = {
        r.kind for r in jax.tree.leaves(roles, is_leaf=lambda r: isinstance(r, agd_optax.Role))
    }
    assert kinds == {"embedding", "dense", "bias", "norm"}


def test_fusion_counts_on_hand_written_hlo():
    hlo = """HloModule m

%fused_computation (p0: f32[64,64]) -> f32[] {
  ROOT %r = f32[] reduce(...)
}

ENTRY %main (g: f32[64,64], p: f32[64,64]) -> (f32[64,64]) {
  %g = f32[64,64]{1,0} parameter(0)
  %p = f32[64,64]{1,0} parameter(1)
  %c = f32[] constant(0)
  %norm = f32[] fusion(%c, %g), kind=kInput, calls=%fused_computation
  %inv = f32[] fusion(%norm), kind=kLoop, calls=%fused_computation.1
  %upd = f32[64,64]{1,0} fusion(%p, %g, %inv), kind=kLoop, calls=%fused_computation.2
  ROOT %t = (f32[64,64]{1,0}) tuple(%upd)
}
"""
    counts = overhead.fusion_counts(hlo, min_leaf=4096)
    assert counts["fusions"] == 3
    assert counts["reduction"] == 1 and counts["elementwise"] == 1 and counts["small"] == 1
    assert counts["kind_kLoop"] == 2 and counts["kind_kInput"] == 1


def test_distinct_fusions_are_the_different_programs():
    """Two fusions calling computations that differ only in their names and metadata are one
    program; another output shape, or another operation, is another."""
    body = """%{name} (p0: f32[8]) -> f32[8] {{
  %p0.{n} = f32[8]{{0}} parameter(0)
  ROOT %m.{n} = f32[8]{{0}} {op}(%p0.{n}, %p0.{n}), metadata={{op_name="x{n}"}}
}}
"""
    hlo = "HloModule m\n\n" + "\n".join(
        body.format(name=name, n=n, op=op)
        for n, (name, op) in enumerate(
            [("fa", "multiply"), ("fb", "multiply"), ("fc", "add"), ("fd", "multiply")]
        )
    )
    hlo += """
ENTRY %main (g: f32[8], h: f32[8,8]) -> (f32[8]) {
  %g = f32[8]{0} parameter(0)
  %h = f32[8,8]{1,0} parameter(1)
  %a = f32[8]{0} fusion(%g), kind=kLoop, calls=%fa
  %b = f32[8]{0} fusion(%a), kind=kLoop, calls=%fb
  %c = f32[8]{0} fusion(%b), kind=kLoop, calls=%fc
  %d = f32[8,8]{1,0} fusion(%h), kind=kLoop, calls=%fd
  ROOT %t = (f32[8]{0}) tuple(%c)
}
"""
    counts = overhead.fusion_counts(hlo, min_leaf=64)
    assert counts["fusions"] == 4 and counts["distinct"] == 3


def test_compile_mode_prints_ratios_to_adam(tmp_path, capsys):
    """``--compile``: compile and un-jitted call times of agd and agd_momentum over Adam's, on a
    small dense stack (timings are reported, never asserted on)."""
    argv = ["--compile", "--leaves", "4", "--repeats", "1", "--out", str(tmp_path)]
    assert overhead.main(argv) == 0
    text = (tmp_path / "overhead_compile_cpu.md").read_text()
    assert "| agd compile / adam |" in text and "| agd_momentum eager / adam |" in text
    row = next(line for line in text.splitlines() if line.startswith("| 4 |"))
    ratios = [float(cell.strip().rstrip("x")) for cell in row.split("|")[3:-1] if "x" in cell]
    assert len(ratios) == 4 and all(math.isfinite(r) and r > 0 for r in ratios)
    assert text in capsys.readouterr().out
