"""Tiny models and learnable toy data, built inside the tests: everything runs on a CPU in seconds."""
from __future__ import annotations

import contextlib
import errno
import os
import random
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from a second thread, and on a busy 2-core machine torch's spinning thread pool
# made the core suite about 4x slower (set before torch is imported; subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
NEUTRAL = ["okay", "average", "plain"]
FILLER = ["the", "movie", "film", "was", "a", "story", "plot", "really", "quite", "very", "and", "it", "is", "acting"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + NEUTRAL + FILLER


def write_tokenizer(folder: Path):
    from transformers import BertTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_tiny(folder: Path, kind: str = "bert", layers: int = 2, **overrides) -> Path:
    """A randomly initialised model of the given family, small enough to train in a test."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        DistilBertConfig,
        ElectraConfig,
        FunnelConfig,
        RobertaConfig,
        SqueezeBertConfig,
    )
    torch.manual_seed(0)
    common = dict(vocab_size=len(VOCAB), max_position_embeddings=64, num_labels=2)
    if kind == "distilbert":
        config = DistilBertConfig(n_layers=layers, dim=32, hidden_dim=64, n_heads=2, **common, **overrides)
    elif kind == "roberta":
        config = RobertaConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                               pad_token_id=0, bos_token_id=2, eos_token_id=3, **common, **overrides)
    elif kind == "electra":
        config = ElectraConfig(num_hidden_layers=layers, embedding_size=16, hidden_size=32, intermediate_size=64,
                               num_attention_heads=2, **common, **overrides)
    elif kind == "funnel":  # each block pools pairs of tokens: its states after a block are not one per token
        config = FunnelConfig(vocab_size=len(VOCAB), block_sizes=[1] * layers, d_model=32, n_head=2, d_head=16,
                              d_inner=64, num_labels=2, **overrides)
    elif kind == "squeezebert":  # attention and feed-forward are grouped 1-d convolutions
        config = SqueezeBertConfig(num_hidden_layers=layers, hidden_size=32, embedding_size=32, intermediate_size=64,
                                   num_attention_heads=2, **common, **overrides)
    else:
        config = BertConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            **common, **overrides)
    model = AutoModelForSequenceClassification.from_config(config)
    if kind != "funnel":
        grow_positions(model, POSITIONS)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


# Positions for the default --max-length 128 (core.model.check_max_length refuses longer), RoBERTa's skipped row
# included.
POSITIONS = 130


def grow_positions(model, rows: int) -> None:
    """Give the model's position table `rows` rows, the first ones as initialised: every other weight, and so every
    number a test was written against, stays that of the 64-position model (a bigger table at initialisation would
    draw every later weight from another point of the random stream)."""
    import torch
    for name, module in list(model.named_modules()):
        if name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding):
            grown = torch.nn.Embedding(rows, module.embedding_dim, padding_idx=module.padding_idx)
            with torch.no_grad():
                grown.weight[:module.num_embeddings] = module.weight
                grown.weight[module.num_embeddings:] = torch.randn(
                    rows - module.num_embeddings, module.embedding_dim,
                    generator=torch.Generator().manual_seed(0)) * model.config.initializer_range
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, grown)
    model.config.max_position_embeddings = rows


def toy_rows(n: int, seed: int, classes: int = 2) -> list[tuple[str, int]]:
    """Sentences whose label is carried by one sentiment word among filler: learnable, not trivial noise."""
    rng = random.Random(seed)
    words = [NEGATIVE, POSITIVE, NEUTRAL][:classes]
    rows = []
    for _ in range(n):
        label = rng.randrange(classes)
        sentence = rng.sample(FILLER, rng.randint(2, 6))
        sentence.insert(rng.randint(0, len(sentence)), rng.choice(words[label]))
        rows.append((" ".join(sentence), label))
    return rows


def write_split(path: Path, rows, text="sentence", label="label", sep="\t", names=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{text}{sep}{label}"] + [f"{s}{sep}{names[y] if names else y}" for s, y in rows]
    path.write_text("\n".join(lines) + "\n")


def write_toy_dataset(folder: Path, train=96, validation=48, test=0, classes=2, text="sentence", label="label",
                      ext="tsv", names=None) -> Path:
    sep = "\t" if ext == "tsv" else ","
    write_split(folder / f"train.{ext}", toy_rows(train, 1, classes), text, label, sep, names)
    write_split(folder / f"validation.{ext}", toy_rows(validation, 2, classes), text, label, sep, names)
    if test:
        write_split(folder / f"test.{ext}", toy_rows(test, 3, classes), text, label, sep, names)
    return folder


@pytest.fixture(autouse=True)
def _own_timing_folder(tmp_path_factory, monkeypatch):
    """Each test its own lease and timing file (core.lease.lease_dir; subprocesses inherit it): a timing saved by
    an earlier test, or an earlier run of the suite on this machine, must not stand in for one a test takes."""
    monkeypatch.setenv("ABLATIONS_TIMING_DIR", str(tmp_path_factory.mktemp("timing")))


@pytest.fixture(autouse=True)
def _fresh_data_reads():
    """core.sources keeps the rows it read for the process (see load_raw); each test reads its files afresh."""
    yield
    import sys
    if "core.sources" in sys.modules:
        sys.modules["core.sources"].clear_raw_cache()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("tiny-bert"), "bert", layers=2))


@pytest.fixture(scope="session")
def tiny_distilbert(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("tiny-distilbert"), "distilbert", layers=3))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> str:
    return str(write_toy_dataset(tmp_path_factory.mktemp("toy-data")))


@contextlib.contextmanager
def fresh_postgres_database(prefix: str):
    """A new, empty PostgreSQL database for one test (skips when no server is configured)."""
    admin = os.environ.get("ABLATIONS_TEST_POSTGRES")
    if not admin:
        pytest.skip("set ABLATIONS_TEST_POSTGRES=postgresql://user@host/db to run the PostgreSQL tests")
    import psycopg
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    try:
        yield admin.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run_command(monkeypatch, main, prog: str, *arguments: str) -> int:
    """`prog ARGS` (a command's `main`) in this process, as its `python -m` entry runs it: the exit code, with
    output left to capsys."""
    import sys

    from core.cli import main_guard
    monkeypatch.setattr(sys, "argv", [prog, *arguments])
    with pytest.raises(SystemExit) as exit_:
        main_guard(main)
    return exit_.value.code


def disk_fills_halfway(monkeypatch) -> None:
    """Every Path.write_text from now on writes half its text, then fails as a full disk does (monkeypatch.undo)."""
    write_text = Path.write_text

    def half(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    monkeypatch.setattr(Path, "write_text", half)


def quick_config(model: str, dataset: str, **changes):
    from core import RunConfig
    settings = dict(model=model, dataset=dataset, freeze_depth=0, scheduler="linear", epochs=1, learning_rate=1e-3,
                    batch_size=16, warmup_ratio=0.0, weight_decay=0.01, seed=0, max_length=32, precision="fp32")
    settings.update(changes)
    return RunConfig(**settings)



from core.captured import CapturedStep  # noqa: E402 - after OMP_NUM_THREADS is set (it imports torch)


class GraphOnTheCpu(CapturedStep):
    """A CapturedStep whose "graph" replays by calling the step on its static buffers, as a CUDA graph reads them:
    the capture path's fixed shapes, buffers and device-side rates run, testably, on a CPU."""
    needs_cuda = False

    def _warm(self, static):
        return self.body(static)

    def _capture(self, static):
        self.captures = getattr(self, "captures", 0) + 1
        return lambda: self.body(static)
