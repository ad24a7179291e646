"""The training dataset: image tensor, prompt prefix ids and response ids of every study.

A study with several images uses its first one (the CheXpert Plus loader lists frontal
views first; other formats keep their own order). Decoded images and token ids are cached in memory: the
datasets this project trains on are small.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from runtime.preprocess import preprocess_image
from runtime.text import ReportTokenizer

from .study import Study


def truncate_response(ids: Sequence[int], max_tokens: int, eos_id: int) -> list[int]:
    """At most max_tokens ids; a truncated response still ends with EOS."""
    ids = list(ids)
    if len(ids) <= max_tokens:
        return ids
    return ids[: max_tokens - 1] + [eos_id]


class ReportDataset(Dataset):
    def __init__(
        self,
        studies: Sequence[Study],
        tokenizer: ReportTokenizer,
        image_size: int,
        n_image_tokens: int,
        max_response_tokens: int,
        cache_images: bool = True,
        preprocess: str = "echo",
    ) -> None:
        if max_response_tokens < 1:
            raise ValueError("max_response_tokens must be at least 1")
        self.studies = list(studies)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.max_response_tokens = int(max_response_tokens)
        self.cache_images = cache_images
        self.preprocess = preprocess  # runtime/preprocess.PREPROCESS_MODES: the model's vision.preprocess
        self.prefix = torch.tensor(tokenizer.prefix_ids(n_image_tokens), dtype=torch.long)
        self._responses = [
            torch.tensor(truncate_response(tokenizer.encode_response(s.report), self.max_response_tokens,
                                           tokenizer.eos_id), dtype=torch.long)
            for s in self.studies
        ]
        self._images: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.studies)

    def image(self, i: int) -> np.ndarray:
        arr = self._images.get(i)
        if arr is None:
            arr = preprocess_image(self.studies[i].image_paths[0], self.image_size, self.preprocess).astype(np.float32)
            if self.cache_images:
                self._images[i] = arr
        return arr

    def __getitem__(self, i: int) -> dict:
        return {
            "pixel_values": torch.from_numpy(self.image(i)),
            "prefix_ids": self.prefix,
            "response_ids": self._responses[i],
            "id": self.studies[i].id,
        }


def collate_reports(batch: Sequence[dict], pad_to_multiple: int, eos_id: int) -> dict:
    """Stack a batch; responses are right-padded WITH EOS ids to a common length that is a
    multiple of `pad_to_multiple`.

    Returns pixel_values [B,1,S,S] float32, prefix_ids [B,P], response_ids [B,L],
    response_mask [B,L] bool (True for real tokens including the first EOS), ids."""
    if pad_to_multiple < 1:
        raise ValueError("pad_to_multiple must be at least 1")
    lengths = [len(b["response_ids"]) for b in batch]
    L = -(-max(lengths) // pad_to_multiple) * pad_to_multiple
    resp = torch.full((len(batch), L), eos_id, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.bool)
    for k, b in enumerate(batch):
        n = lengths[k]
        resp[k, :n] = b["response_ids"]
        mask[k, :n] = True
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "prefix_ids": torch.stack([b["prefix_ids"] for b in batch]),
        "response_ids": resp,
        "response_mask": mask,
        "ids": [b["id"] for b in batch],
    }
