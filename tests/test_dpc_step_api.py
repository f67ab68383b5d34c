"""benchmarks/dpc_step.py's `build_step`: the stage-2 step for outside harnesses."""


import jax
import numpy as np
import pytest

from helpers import load_benchmark



def test_build_step_gives_a_jitted_step_that_lowers_compiles_and_trains():
    bench = load_benchmark("dpc_step")
    step_fn, args = bench.build_step("tiny", num_classes=6, batch=2, top_k=3, layers=1)
    compiled = step_fn.lower(*args).compile()
    assert bench.step_flops(step_fn, args) > 0
    state, loss, aux = compiled(*args)
    assert np.all(np.isfinite(np.asarray(loss)))
    before = jax.tree_util.tree_leaves(args[0]["params"]["parallel"])
    after = jax.tree_util.tree_leaves(state["params"]["parallel"])
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))  # P' trained
    for a, b in zip(jax.tree_util.tree_leaves(args[0]["params"]["backbone"]),
                    jax.tree_util.tree_leaves(state["params"]["backbone"])):
        np.testing.assert_array_equal(a, b)  # P frozen
    assert bench.matmul_flops_per_s(n=128, repeats=1) > 0


def test_mapped_step_with_chunked_text_matches_the_step_without_elimination():
    """The trainer's mapped (shard_map) step with C = 12 > B(K+1) = 9 classes, so the distinct
    slot labels' texts run in chunks through `row_skipping.chunked_rows`' custom VJP: its update
    of P' equals the step without the elimination (every slot's text, every slot's image),
    within float32 rounding (tests/test_dpc_elimination.py's tolerance)."""
    bench = load_benchmark("dpc_step")
    updates = {}
    for eliminate in (True, False):
        step_fn, args = bench.build_step("tiny", num_classes=12, batch=3, top_k=2, layers=1,
                                         dedupe_text=eliminate, compact_negatives=eliminate)
        state, loss, _ = step_fn(*args)
        updates[eliminate] = (float(np.asarray(loss)[0]), jax.tree_util.tree_map(
            lambda new, old: np.asarray(new) - np.asarray(old),
            state["params"]["parallel"], args[0]["params"]["parallel"]))
    (loss, update), (base_loss, base_update) = updates[True], updates[False]
    np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
    for new, old in zip(jax.tree_util.tree_leaves(update), jax.tree_util.tree_leaves(base_update)):
        scale = float(np.max(np.abs(old)))
        assert scale > 0  # the step moved P'
        np.testing.assert_allclose(new, old, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("learner", ["coop", "ivlp"])
def test_flop_account_agrees_between_the_plain_and_the_eliminated_steps(learner):
    """`flop_account`'s minimal work reached two ways: from the plain step (every slot through
    both towers, no loops: XLA counts all of it, minus the rows not needed) and from the
    eliminated steps (XLA counts each skipping loop's body once: plus the chunks and rows that
    ran, minus the recomputation and the padding). B 4, K 6, C = 40 > B(K+1) = 28, so the
    texts run in chunks too; the same key and anchors give the same negatives in all three:
    11 valid negatives and 15 distinct texts, each leaving a partial chunk of 3. IVLP: the
    negatives' images are differentiated too (through its image prompts)."""
    bench = load_benchmark("dpc_step")
    accounts = {}
    for name, kw in (("plain", dict(dedupe_text=False, compact_negatives=False)),
                     ("single", dict(chunk_tail="single")), ("padded", dict(chunk_tail="padded"))):
        built = bench.build("tiny", 40, 4, 6, layers=1, learner_name=learner, **kw)
        _, _, metrics = built.step(*built.args)
        valid = int(np.asarray(metrics["valid_negatives"])[0])
        accounts[name] = bench.flop_account(built, bench.step_flops(built.step, built.args),
                                            valid)
    plain, single, padded = accounts["plain"], accounts["single"], accounts["padded"]
    assert (plain["image_rows"], plain["text_rows"]) == ((24, 11), (28, 15)), plain
    assert (single["image_rows"], single["text_rows"]) == ((11, 11), (15, 15)), single
    assert (padded["image_rows"], padded["text_rows"]) == ((12, 11), (16, 15)), padded
    for account in (single, padded):
        np.testing.assert_allclose(account["minimal"], plain["minimal"], rtol=0.01)
    assert plain["minimal"] < single["executed"] < padded["executed"] < plain["executed"]
