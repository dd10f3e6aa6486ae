"""benchmarks/profile_step.py: exclusive times of nested trace events, HLO parsing, and a real traced program."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import profile_step as ps
from metalora.compiler import jit


def _event(name, ts, dur, tid=1):
    return {"ph": "X", "pid": 7, "tid": tid, "ts": ts, "dur": dur, "name": name}


def test_exclusive_times_subtract_children_on_the_same_thread_only():
    events = [_event("while.1", 0, 10), _event("fusion.2", 2, 4), _event("dot.3", 7, 2),
              _event("fusion.4", 3, 5, tid=2),  # overlaps while.1 in time, but on another thread: not its child
              {"ph": "M", "pid": 7, "tid": 1, "name": "thread_name", "args": {"name": "x"}}]
    assert sorted(ps.exclusive_times(events)) == [("dot.3", 2.0), ("fusion.2", 4.0), ("fusion.4", 5.0),
                                                  ("while.1", 4.0)]


def test_exclusive_times_of_nested_levels():
    # a loop whose body holds a fusion which itself ran a library call
    events = [_event("while", 0, 100), _event("body_fusion", 10, 50), _event("ynn_fusion", 20, 30)]
    assert dict(ps.exclusive_times(events)) == {"while": 50.0, "body_fusion": 20.0, "ynn_fusion": 30.0}


HLO = "\n".join([
    '  %ynn_fusion.1 = f32[8,64]{1,0} fusion(f32[8,32]{1,0} %p0, f32[32,64]{1,0} %p1), kind=kCustom, calls=%c, '
    'metadata={op_name="jit(step)/jvp(f)/dot_general" stack_frame_id=3}',
    '  %loop_add_fusion = f32[8,64]{1,0} fusion(%ynn_fusion.1), kind=kLoop, calls=%d, '
    'metadata={op_name="jit(step)/transpose(jvp(f))/add_any"}',
    "  ROOT %tuple.3 = (s32[], f32[256,256]{1,0}) tuple(%a, %b)",
    "  %while.2 = (s32[], f32[8,64]{1,0}) while(%tuple.3), condition=%cond, body=%body",
])


def test_hlo_instructions_parse_opcode_category_and_jax_op():
    table = ps.hlo_instructions(HLO)
    assert table["ynn_fusion.1"] == {"opcode": "fusion", "category": "ynnpack library call", "jax_op": "dot_general",
                                     "phase": "forward"}
    assert table["loop_add_fusion"] == {"opcode": "fusion", "category": "fusion (kLoop)", "jax_op": "add_any",
                                        "phase": "backward"}
    assert table["tuple.3"]["opcode"] == "tuple" and table["tuple.3"]["jax_op"] == "(no metadata)"
    assert table["tuple.3"]["phase"] == "(no metadata)"
    assert table["while.2"]["category"] == "while"


def test_summarize_groups_per_step_and_skips_runtime_events():
    events = [_event("ynn_fusion.1", 0, 3000), _event("loop_add_fusion", 3000, 1000),
              _event("ynn_fusion.1", 5000, 3000), _event("ThunkExecutor::Execute (wait for completion)", 0, 9000, 3),
              _event("PjitFunction(step)", 0, 9000, 4)]
    tables = ps.summarize(events, ps.hlo_instructions(HLO), steps=2, top=1)
    assert tables["category"] == [
        {"category": "ynnpack library call", "ms_per_step": 3.0, "share": pytest.approx(6 / 7), "calls_per_step": 1.0},
        {"category": "fusion (kLoop)", "ms_per_step": 0.5, "share": pytest.approx(1 / 7), "calls_per_step": 0.5}]
    assert [row["jax_op"] for row in tables["jax_op"]] == ["dot_general", "add_any"]
    assert [(row["phase"], row["ms_per_step"]) for row in tables["phase"]] == [("forward", 3.0), ("backward", 0.5)]
    assert len(tables["instruction"]) == 1  # top=1


def test_profile_a_real_program_accounts_for_its_ops():
    @jit
    def f(x, w):
        def body(carry, _):
            return jnp.tanh(carry @ w), None
        y, _ = jax.lax.scan(body, x, None, length=4)
        return jnp.sum(y, axis=0)

    x, w = jnp.ones((128, 128)), jnp.eye(128) * 0.5

    def run():
        f(x, w).block_until_ready()

    run()
    result = ps.profile(run, f.lower(x, w).compile().as_text(), steps=3, top=5)
    assert result["op_ms_per_step"] > 0 and result["wall_ms_per_step"] > 0
    assert sum(row["share"] for row in result["category"]) == pytest.approx(1.0)
    # the loop body's matmul ran 4 times per call, as a dot on YNNPACK (or XLA's own dot where it is not used)
    dots = [row for row in result["jax_op"] if row["jax_op"] == "dot_general"]
    assert dots and dots[0]["calls_per_step"] == pytest.approx(4.0)
