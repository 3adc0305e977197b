"""One bf16 DeepSpeed pipeline step over several micro-batches with a given DeepSpeed config; reports
whether the gradients the optimizer receives kept more precision than bf16 (fp32 accumulation)."""

from __future__ import annotations

import argparse
import json

import deepspeed
import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

from runner.compat import skip_deepspeed_shm_comm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ds-config", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    skip_deepspeed_shm_comm()  # as runner.train.init_distributed: no C++ build on CPU
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    ds = json.load(open(args.ds_config))
    gas = 8
    ds.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=gas, train_batch_size=2 * gas,
              gradient_clipping=0.0)
    model = PipelineModule([LayerSpec(nn.Linear, 64, 64), LayerSpec(nn.Tanh), LayerSpec(nn.Linear, 64, 64)],
                           num_stages=1, loss_fn=nn.MSELoss())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    finer = []  # per gradient the optimizer sees: does it hold values bf16 cannot represent?

    def inspect(opt, *_):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad.float()
                    finer.append(bool((g.bfloat16().float() != g).any()))

    optimizer.register_step_pre_hook(inspect)
    batches = [(torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(2, 64, dtype=torch.bfloat16)) for _ in range(gas)]
    engine.train_batch(iter(batches))
    json.dump({"finer_than_bf16": finer}, open(args.out, "w"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
