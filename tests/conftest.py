import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small local corpus (400 Shakespeare documents) for end-to-end runs; caches go beside it."""
    from poetlm.train.data import read_documents

    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text("\n\n".join(read_documents("shakespeare", max_documents=400)))
    return path
