"""A multi-shard NVFP4 checkpoint in modelopt's layout, a few MB, for the remote and streaming tests."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {"self_attn.q_proj": 512, "self_attn.k_proj": 128, "self_attn.v_proj": 128, "mlp.gate_proj": 1024,
          "mlp.up_proj": 1024, "mlp.down_proj": 512}  # fmt: skip


def layer(index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer (512 columns); k_proj and up_proj get a smaller scale, so both its groups are mismatched."""
    state = {}
    for name, rows in SHAPES.items():
        fqn = f"model.layers.{index}.{name}"
        state[f"{fqn}.weight"] = torch.randint(0, 256, (rows, 256), dtype=torch.uint8, generator=generator)
        state[f"{fqn}.weight_scale"] = (torch.rand(rows, 32, generator=generator) * 400 + 8).to(torch.float8_e4m3fn)
        state[f"{fqn}.weight_scale_2"] = torch.tensor(1e-4 / (1.5 if name.endswith(("k_proj", "up_proj")) else 1.0))
        state[f"{fqn}.input_scale"] = torch.tensor(2e-3)
    return state


def write_sharded(directory: Path, shards: int = 3) -> Path:
    """``shards`` shards of two layers each (about 1.7 MB a shard) with an index; 4 mismatched groups a shard."""
    directory.mkdir(parents=True)
    generator, weight_map = torch.Generator().manual_seed(0), {}
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        state = {key: value for index in (2 * shard, 2 * shard + 1) for key, value in layer(index, generator).items()}
        save_file(state, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory
