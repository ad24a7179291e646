"""Small in-memory training data for trainer tests (real tensors, real model, real steps)."""
import torch
from torch.utils.data import Dataset


class RandomReports(Dataset):
    def __init__(self, tokenizer, n_image_tokens: int, image_size: int = 32, n: int = 24, resp_len: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.px = torch.rand(n, 1, image_size, image_size, generator=g) * 2 - 1
        self.prefix = torch.tensor(tokenizer.prefix_ids(n_image_tokens))
        self.resp = torch.randint(5, tokenizer.vocab_size, (n, resp_len), generator=g)
        self.resp[:, -1] = tokenizer.eos_id

    def __len__(self):
        return len(self.px)

    def __getitem__(self, i):
        return {"pixel_values": self.px[i], "prefix_ids": self.prefix, "response_ids": self.resp[i], "id": str(i)}


def collate(items):
    resp = torch.stack([it["response_ids"] for it in items])
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "prefix_ids": torch.stack([it["prefix_ids"] for it in items]),
        "response_ids": resp,
        "response_mask": torch.ones_like(resp, dtype=torch.bool),
    }
