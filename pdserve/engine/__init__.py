"""The model executor that both worker roles share: model, KV cache, scheduler, runner, sampler."""
