"""loadtest.optimize: which variant the verdict calls optimised (the fastest within the held-out Dice bound)."""

from __future__ import annotations

from loadtest.optimize import MAX_DICE_DELTA, _verdict, choose_optimized


def _row(ratio: float, ips: float, others: float = 0.0) -> dict:
    return {"ips_median": ips, "over_fp32_median": ratio, "over_fp32_cpu_median": ratio,
            "other_cores_rounds": [others]}


def _result(variants: dict[str, tuple[float, float]]) -> dict:
    """Pipeline rows at b1 and b16 from {variant: (ratio to fp32, held-out Dice)}; fp32 at 10 images/s."""
    block = {name: {"1": _row(ratio, 10 * ratio), "16": _row(ratio, 10 * ratio)}
             for name, (ratio, _) in variants.items()}
    return {"pipeline": {"1p1t": {"variants": block}},
            "heldout": {name: {"dice_mean": d} for name, (_, d) in variants.items()}}


def test_fastest_variant_within_the_dice_bound_is_chosen_and_reported():
    result = _result({"fp32": (1.0, 0.900), "int8": (1.1, 0.899), "openvino_bf16": (2.2, 0.900 - 2 * MAX_DICE_DELTA),
                      "openvino_bf16_ort_decoder": (1.9, 0.901)})
    chosen = choose_optimized(result, [1, 16])
    assert chosen["variant"] == "openvino_bf16_ort_decoder"  # openvino_bf16 is faster but loses 0.01 Dice
    assert chosen["candidates"]["openvino_bf16"]["heldout_dice_delta"] == 2 * MAX_DICE_DELTA
    verdict = _verdict(result, [1, 16], chosen)
    assert verdict["optimized_variant"] == "openvino_bf16_ort_decoder"
    assert verdict["optimized_over_fp32_offline_b1"] == 1.9 and verdict["optimized_over_fp32_offline_b16"] == 1.9
    assert verdict["optimized_heldout_dice_delta"] == -0.001
    assert verdict["best_config_b1"] == {"config": "1p1t", "ips": 19.0, "over_fp32_1p1t": 1.9}


def test_no_variant_within_the_bound_leaves_fp32():
    result = _result({"fp32": (1.0, 0.900), "int8": (1.5, 0.880)})
    chosen = choose_optimized(result, [1, 16])
    assert chosen["variant"] == "fp32"
    assert _verdict(result, [1, 16], chosen)["optimized_over_fp32_offline_b16"] == 1.0
