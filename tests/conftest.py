import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny models run faster single-threaded: a second intra-op thread costs more than it
    saves (up to 30x slower NLS training when the 2 cores are shared). Tests marked ``slow``
    use the real model and keep every thread."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
