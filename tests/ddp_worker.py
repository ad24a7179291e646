"""Run by tests/test_training.py under torchrun: 2 CPU processes, gloo."""
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import make_tiny_model, make_tokenizer  # noqa: E402
from training_fixtures import RandomReports, collate  # noqa: E402

from echo_train.stages.stage2_rad import make_diffusion_loss  # noqa: E402
from echo_train.stages.trainer import TrainConfig, train  # noqa: E402

out = sys.argv[1]
torch.set_num_threads(1)
tok = make_tokenizer()
model = make_tiny_model(tok, stage="rad", block_size=4)
data = RandomReports(tok, model.n_image_tokens)
state = train(model, tok, data, collate, make_diffusion_loss(4, tok.mask_id), TrainConfig(steps=4, batch_size=4, save_every=100),
              out, desc="ddp")
# every rank must hold identical weights after DDP steps
w = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, w)
assert all(torch.equal(gathered[0], g) for g in gathered), "ranks diverged"
print(f"rank {dist.get_rank()} of {dist.get_world_size()} finished step {state['step']}")
dist.destroy_process_group()
