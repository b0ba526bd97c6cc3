"""Speculative decoding: the ``--speculative-config`` settings, the n-gram proposer and the
verification math the compiled step runs. The EAGLE-3 draft head is ``jaxllm.models.eagle3``."""
