"""bench/checkpointing_cost.py: the two modes it alternates really differ (the checkpointed one
recomputes each block in backward), and its CLI reports ratios of the times it measured."""

from __future__ import annotations

import json
from types import SimpleNamespace

from bench.checkpointing_cost import build_parser, build_step
from tests.helpers import assert_ok

TINY = ["--network", "mbf", "--network-args", json.dumps({"blocks": [1, 1, 1, 1], "scale": 1}),
        "--embedding-size", "16", "--batch-size", "4", "--num-classes", "10"]


def test_toggling_the_flag_between_steps_recomputes_the_blocks() -> None:
    args = SimpleNamespace(**vars(build_parser().parse_args(TINY)))
    backbone, step, batch = build_step(args)
    block = backbone.layers[0]
    calls = []
    block.register_forward_pre_hook(lambda *_: calls.append(backbone.activation_checkpointing))
    for checkpointing in (False, True, False):
        backbone.activation_checkpointing = checkpointing
        step(batch, lr=0.1)
    assert calls == [False, True, True, False]  # forward, then its recomputation in backward


def test_cli_prints_the_ratios_of_its_own_times(run_cli) -> None:
    done = assert_ok(run_cli("bench.checkpointing_cost", *TINY, "--rounds", "1", "--steps",
                             "1", timeout=300))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["wall_ratio_per_round"] == [result["wall_ratio"]]
    assert abs(result["wall_ratio"] - result["step_s_checkpointing"]
               / result["step_s_plain"]) < 0.01 * result["wall_ratio"] + 0.002
    assert result["cpu_ratio"] > 0 and len(result["load_average"]) == 3
