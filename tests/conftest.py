import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    # The token cache and the demo's base live under $XDG_CACHE_HOME: keep the tests' out of the user's, and
    # shared by the test processes (subprocesses inherit the environment).
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tensors in the tests are tiny: extra threads only add synchronisation, and on a busy 2-core machine
    # they make the tests several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
