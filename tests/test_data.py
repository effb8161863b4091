import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from nanogpt.data import download_shakespeare, prepare_data
from nanogpt.dataset.batches import BatchSampler
from nanogpt.dataset.download import download
from nanogpt.errors import DataError, UserError
from nanogpt.text.tokenizers import UnknownTokenError, create_encoder_decoder, get_vocabulary, load_tokenizer


class FileServer:
    """A real HTTP server on loopback serving files from a folder; counts requests."""

    def __init__(self, folder: Path, fail_first: int = 0):
        outer = self
        self.requests = 0
        self.fail_first = fail_first

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                outer.requests += 1
                if outer.requests <= outer.fail_first:
                    self.send_error(503)
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "input.txt").write_text("hello world\n" * 1000)
    server = FileServer(folder)
    yield server, folder
    server.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_vocabulary_and_round_trip():
    text = "First Citizen:\nBefore we proceed"
    vocab = get_vocabulary(text)
    assert vocab == sorted(set(text))
    encode, decode = create_encoder_decoder(vocab)
    ids = encode(text)
    assert decode(ids) == text
    assert max(ids) == len(vocab) - 1


def test_unknown_character_is_a_clear_error():
    encode, _ = create_encoder_decoder(get_vocabulary("abc"))
    with pytest.raises(UnknownTokenError, match="'z'"):
        encode("abz")


def test_a_tokenizer_is_a_value_of_its_description_built_once():
    ab = load_tokenizer({"kind": "char", "vocabulary": ["a", "b"]})
    assert load_tokenizer({"vocabulary": ["a", "b"], "kind": "char"}) is ab  # built once, any key order
    assert list(ab.description) == ["kind", "vocabulary"]  # kept as given: what it stores is what it read
    ba = load_tokenizer({"kind": "char", "vocabulary": ["b", "a"]})
    assert ab != ba and len({ab, ba, load_tokenizer(dict(ab.description))}) == 2
    assert ab != ab.description and ab.name == "char (2 characters)" and ab.decode(ab.encode("ba")) == "ba"
    # A kind whose library or files may be missing is carried by its description, and built when first used.
    unknown = load_tokenizer({"kind": "tiktoken", "encoding": "no_such_encoding"})
    assert unknown.name == "tiktoken no_such_encoding"
    with pytest.raises(UserError, match="no_such_encoding"):
        unknown.encode("x")
    # A tokenizer.json encodes alike by its content, wherever it was read from.
    here, there, edited = (load_tokenizer({"kind": "hf", "origin": origin, "json": text})
                           for origin, text in (("a/tokenizer.json", "{}"), ("b/tokenizer.json", "{}"),
                                                ("a/tokenizer.json", '{"edited": 1}')))
    assert here != there and here.encodes_like(there) and not here.encodes_like(edited)
    assert not ab.encodes_like(ba) and ab.encodes_like(load_tokenizer(dict(ab.description)))


def test_download_through_loopback_http(served, tmp_path):
    server, folder = served
    dest = tmp_path / "out" / "input.txt"
    download(f"{server.url}/input.txt", dest, sha256(folder / "input.txt"))
    assert dest.read_bytes() == (folder / "input.txt").read_bytes()


def test_download_retries_transient_server_errors(served, tmp_path):
    server, folder = served
    server.fail_first = 2
    dest = tmp_path / "input.txt"
    download(f"{server.url}/input.txt", dest, retries=3)
    assert dest.read_bytes() == (folder / "input.txt").read_bytes()
    assert server.requests == 3


def test_checksum_mismatch_is_rejected_and_leaves_nothing(served, tmp_path):
    server, _ = served
    dest = tmp_path / "out" / "input.txt"
    with pytest.raises(DataError, match="sha256"):
        download(f"{server.url}/input.txt", dest, "0" * 64)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no partial or temporary file either


def test_failed_download_leaves_no_file(served, tmp_path):
    server, _ = served
    dest = tmp_path / "out" / "input.txt"
    with pytest.raises(DataError, match="HTTP 404"):
        download(f"{server.url}/missing.txt", dest, retries=0)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_download_shakespeare_checks_the_known_hash(shakespeare, tmp_path):
    dest = download_shakespeare(tmp_path / "input.txt", source=str(shakespeare))
    assert len(dest.read_text()) == 1_115_394
    wrong = tmp_path / "other.txt"
    wrong.write_text("not shakespeare")
    with pytest.raises(DataError, match="sha256"):
        download_shakespeare(tmp_path / "copy.txt", source=str(wrong))
    assert not (tmp_path / "copy.txt").exists()


def test_prepare_splits_and_memmaps(corpus, data_root):
    text = corpus.read_text()
    data = prepare_data("toy", str(corpus), data_root)
    meta = json.loads((data.directory / "meta.json").read_text())
    n_train = int(len(text) * 0.9)
    assert meta["train_tokens"] == n_train and meta["val_tokens"] == len(text) - n_train
    encode, decode = create_encoder_decoder(meta["tokenizer"]["vocabulary"])
    train = np.memmap(data.split_path("train"), dtype=np.uint16, mode="r")
    val = np.memmap(data.split_path("val"), dtype=np.uint16, mode="r")
    assert decode(train.tolist()) == text[:n_train]
    assert decode(val.tolist()) == text[n_train:]
    assert meta["source_sha256"] == sha256(corpus)


def test_prepare_once_then_reuse_then_rebuild_on_change(corpus, data_root):
    first = prepare_data("toy", str(corpus), data_root)
    stamp = first.split_path("train").stat().st_mtime_ns
    again = prepare_data("toy", str(corpus), data_root)
    assert again.split_path("train").stat().st_mtime_ns == stamp
    corpus.write_text(corpus.read_text() + "A brand new line with new letters: XYZ\n")
    changed = prepare_data("toy", str(corpus), data_root)
    assert changed.meta["source_sha256"] == sha256(corpus)
    assert "X" in changed.meta["tokenizer"]["vocabulary"]


def test_url_source_is_downloaded_once(served, data_root):
    server, folder = served
    url = f"{server.url}/input.txt"
    prepare_data("web", url, data_root, sha256=sha256(folder / "input.txt"))
    prepare_data("web", url, data_root, sha256=sha256(folder / "input.txt"))
    assert server.requests == 1


def test_directory_source_concatenates_txt_files(tmp_path, data_root):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "b.txt").write_text("second book\n" * 50)
    (folder / "a.txt").write_text("first book\n" * 50)
    (folder / "notes.md").write_text("ignored")
    data = prepare_data("books", str(folder), data_root)
    assert (data.directory / "input.txt").read_text().startswith("first book")
    assert data.meta["train_tokens"] + data.meta["val_tokens"] == 11 * 50 + 12 * 50


def test_missing_source_is_a_clear_error(tmp_path, data_root):
    with pytest.raises(DataError, match="does not exist"):
        prepare_data("nothing", str(tmp_path / "nope.txt"), data_root)


def test_batches_are_shifted_windows(corpus, data_root):
    data = prepare_data("toy", str(corpus), data_root)
    sampler = BatchSampler(data, block_size=16, batch_size=4, device=torch.device("cpu"), seed=1)
    x, y = sampler.get_batch("train")
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = torch.from_numpy(np.fromfile(data.split_path("train"), dtype=np.uint16).astype(np.int64))
    for row in range(4):  # every row is a real window of the train split
        windows = train.unfold(0, 16, 1)
        assert (windows == x[row]).all(dim=1).any()


def test_sampler_is_reproducible_from_its_seed(corpus, data_root):
    data = prepare_data("toy", str(corpus), data_root)
    a = BatchSampler(data, 16, 4, torch.device("cpu"), seed=3).get_batch("val")
    b = BatchSampler(data, 16, 4, torch.device("cpu"), seed=3).get_batch("val")
    assert torch.equal(a[0], b[0])


def test_block_size_larger_than_val_split_is_a_clear_error(corpus, data_root):
    data = prepare_data("toy", str(corpus), data_root)
    with pytest.raises(DataError, match="block_size"):
        BatchSampler(data, block_size=data.meta["val_tokens"], batch_size=2, device=torch.device("cpu"))


def test_prepared_files_are_readable_by_others(corpus, data_root):
    import os
    import stat

    old = os.umask(0o022)
    try:
        data = prepare_data("perm", str(corpus), data_root)
    finally:
        os.umask(old)
    for name in ("train.bin", "val.bin", "meta.json"):
        mode = stat.S_IMODE((data.directory / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode))
