"""Session fixtures of the tests: tiny data, a tiny teacher, the 2-rank reference run.

The helpers they use (and the tests import) are in ``tests.helpers``.
"""

from __future__ import annotations

import pytest

from tests.helpers import SEQ_LEN, make_teacher, ref_config, run_ranks


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(tokenizer_dir, data_dir) of a real tiny corpus (SentencePiece tokenizer trained in-test)."""
    from tests.data_fixtures import make_tiny_corpus_shards

    return make_tiny_corpus_shards(tmp_path_factory.mktemp("corpus"), seq_len=SEQ_LEN)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_data):
    from pipeline.data.reader import read_manifest

    vocab = read_manifest(tiny_data[1]).tokenizer.vocab_size
    return make_teacher(tmp_path_factory.mktemp("teacher") / "teacher", vocab)


@pytest.fixture(scope="session")
def ref_run(tmp_path_factory, tiny_data, tiny_teacher):
    """(work dir, config dict, metrics records) of the uninterrupted 2-rank reference run."""
    work = tmp_path_factory.mktemp("ref_run")
    cfg = ref_config(work / "run", tiny_data, tiny_teacher)
    records = run_ranks(2, cfg, work)
    return work, cfg, records
