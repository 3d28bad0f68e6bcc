"""Shared test settings: small thread count, smoke mode, fixed seeds."""

import os

os.environ.setdefault("MINI_IMAGEN_SMOKE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# At most two threads (this CI machine has two cores); fewer if OMP_NUM_THREADS asks for fewer.
torch.set_num_threads(min(torch.get_num_threads(), 2))
