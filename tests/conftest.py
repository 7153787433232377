import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tensors in the tests are tiny: extra threads only add synchronisation, and on a busy 2-core machine
    # they make the tests several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
