"""The direct statistic's tables on hand-made rows, and the checkpoints it is measured at."""

from ditnorm import measures
from ditnorm.presets import PRESETS, RECIPES
from ditnorm.studies import direct as direct_tables


def hand_rows(values):
    """Rows of one (data, weights, timestep): values {(norm, seed): {step: p50}}; p99 = 10 p50."""
    return [dict(data="zeros", measure="abs_x", norm=n, seed=s, step=step, weights="raw", timestep=0,
                 noise_seed=1000 + s, inputs=100_000, p50=v, p99=10 * v, **{"p99.9": 100 * v}, nonfinite=0)
            for (n, s), by_step in values.items() for step, v in by_step.items()]


def test_the_main_table_takes_each_seeds_median_over_the_last_three_checkpoints():
    # step 1 is outside the last three and would reverse every seed; seed 2 of layernorm swings 12x
    values = {("layernorm", 0): {1: 1e-9, 2: 4.0, 3: 5.0, 4: 6.0},
              ("layernorm", 1): {1: 1e-9, 2: 3.0, 3: 3.0, 4: 3.0},
              ("layernorm", 2): {1: 1e-9, 2: 1.0, 3: 12.0, 4: 7.0},
              ("none", 0): {1: 9.0, 2: 1.0, 3: 1.0, 4: 1.0},
              ("none", 1): {1: 9.0, 2: 2.0, 3: 0.5, 4: 1.5},
              ("none", 2): {1: 9.0, 2: 2.0, 3: 2.0, 4: 2.0}}
    lines = direct_tables.table(hand_rows(values), ["layernorm", "none"], [2, 3, 4])
    p50 = next(line for line in lines if "| p50 |" in line)
    # layernorm seeds 5, 3, 7 -> 5 [3, 7]; none seeds 1, 1.5, 2 -> 1.5 [1, 2]: all 9 pairs ordered
    assert p50 == ("| zeros | raw | 0 | p50 | 5.00e+00 [3.00e+00, 7.00e+00] (n=3) "
                   "| 1.50e+00 [1.00e+00, 2.00e+00] (n=3) | 3.33 | 9 of 9 | 0.050 (0.050) |")
    last = direct_tables.table(hand_rows(values), ["layernorm", "none"], [4])
    assert last[2].startswith("| zeros | raw | 0 | p50 | 6.00e+00 [3.00e+00, 7.00e+00] (n=3) | 1.50e+00 ")
    assert last[2].endswith("| 4.00 | 9 of 9 | 0.050 (0.050) |")  # 6, 3, 7 against 1, 1.5, 2
    section = "\n".join(direct_tables.section(hand_rows(values), ["layernorm", "none"]))
    assert "steps 2, 3, 4 (3 of them measured per seed" in section and "0.050 (0.050)" in section


def test_a_table_without_both_norms_has_no_test():
    rows = hand_rows({("rmsnorm", 0): {5: 1.0}, ("rmsnorm", 1): {5: 2.0}})
    line = direct_tables.table(rows, ["layernorm", "rmsnorm"], [5])[2]
    assert line == "| zeros | raw | 0 | p50 | - | 1.50e+00 [1.00e+00, 2.00e+00] (n=2) | - | - | - |"
    assert direct_tables.section([], ["layernorm"]) == []


def test_the_direct_statistic_is_measured_at_the_recipes_last_checkpoints():
    direct = PRESETS["study"]["measure_args"]["direct"]
    assert measures.direct_steps(RECIPES["cpu-short"], direct) == {2000, 2500, 3000}
    assert measures.recipe_checkpoints(RECIPES["paper"]) == list(range(5000, 50_001, 5000))
    every = PRESETS["paper"]["measure_args"]["direct"]
    assert measures.direct_steps(RECIPES["paper"], every) == set(range(5000, 50_001, 5000))
    assert measures.direct_steps(RECIPES["cpu"], every) == {1000, 2000, 3000, 4000, 5000}
    assert all(p["measure_args"]["direct"]["num_inputs"] >= 100_000
               for name, p in PRESETS.items() if name in ("study", "reproduce", "paper"))


def test_the_step_table_lists_steps_in_order_when_a_later_seed_has_an_early_checkpoint():
    # seed 0 measured at 40k-50k only, seed 1 at 5k too: 5k belongs before 40k, not after 50k
    values = {("layernorm", 0): {40_000: 1.0, 45_000: 1.0, 50_000: 1.0},
              ("layernorm", 1): {5_000: 9.0, 40_000: 2.0, 45_000: 2.0, 50_000: 2.0},
              ("none", 0): {50_000: 0.5}}
    lines = direct_tables.step_table(hand_rows(values), ["layernorm", "none"])
    steps = [(line.split(" | ")[2], int(line.split(" | ")[3])) for line in lines[2:]]
    assert steps == [("layernorm", 5_000), ("layernorm", 40_000), ("layernorm", 45_000),
                     ("layernorm", 50_000), ("none", 50_000)]
    assert "| 5000 | 9.00e+00 [9.00e+00, 9.00e+00] (n=1) |" in lines[2]
