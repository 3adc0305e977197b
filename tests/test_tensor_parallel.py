"""The TP ops on two CPU ranks: gather forward/backward, the sequence-parallel ops, vocab-parallel
cross entropy vs full."""

from conftest import TESTS, torchrun


def test_gather_and_vocab_parallel_cross_entropy_on_two_ranks():
    proc = torchrun(TESTS / "tp_ops_worker.py", 2)
    assert proc.stderr.count(" ok") == 2
