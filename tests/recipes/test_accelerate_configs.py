"""The shipped accelerate configs (recipes/accelerate/) load with accelerate's own parser and say how to launch."""

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
EXPECTED = {"single_gpu": ("NO", 1), "ddp": ("MULTI_GPU", 8), "fsdp2": ("FSDP", 8), "fsdp2_offload": ("FSDP", 8),
            "zero2": ("DEEPSPEED", 8), "zero3": ("DEEPSPEED", 8), "two_node_fsdp2": ("FSDP", 16)}


def test_every_engine_has_a_config():
    assert {p.stem for p in CONFIGS} == set(EXPECTED)
    assert (ROOT / "recipes" / "accelerate" / "slurm_two_node.sh").exists()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses_and_says_how_to_launch(path):
    config = ClusterConfig.from_yaml_file(str(path))
    kind, processes = EXPECTED[path.stem]
    assert str(config.distributed_type).split(".")[-1] == kind and config.num_processes == processes
    assert "accelerate launch --config_file recipes/accelerate/" in path.read_text()
    raw = yaml.safe_load(path.read_text())
    if kind == "FSDP":
        assert raw["fsdp_config"]["fsdp_version"] == 2
        assert raw["fsdp_config"]["fsdp_offload_params"] == (path.stem == "fsdp2_offload")
    if kind == "DEEPSPEED":
        assert raw["deepspeed_config"]["zero_stage"] == (3 if path.stem == "zero3" else 2)
