
import pytest
import torch

# Two CI cores: keep torch from oversubscribing them (and the timings of tests stable).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
