"""A timing sitting kept with a study: the key of a run's work shape in it (`sitting_key`), one shape as stored
(`sitting_row`), the store (`store_sitting`, the study's `timing_sitting` attribute), and a record retimed from it
(`retimed`, which `ablations.storage.load_runs` applies), and `time_study`, the grid's and the search's sitting
before their first run, stored with their study. `python -m ablations.timing_passes --interleave --store` stores
one too.
"""
from __future__ import annotations

import json

from core.errors import UsageError


def sitting_key(config: dict, device: str | None, train_samples: int | None, compiled: bool = False) -> str:
    """The key of a run's work shape in a stored sitting: `shape_key` without the epochs (a sitting times one
    step; a run's steps, of any epoch count, multiply it), marked where the step ran through torch.compile (another
    step, another cost: a sitting of compiled steps never times an eager run, nor the reverse)."""
    key = shape_key({**config, "epochs": None}, device, train_samples)
    return json.dumps([*key, "compiled"] if compiled else key)


def shape_key(config: dict, device: str | None, train_samples: int | None) -> tuple:
    """`ablations.timing_passes.shape_of` for a run not recorded yet: its config, device label and training rows."""
    from core.config import COST_FREE
    fields = tuple(sorted((k, str(v)) for k, v in config.items() if k not in COST_FREE and k != "freeze_depth"))
    return config["freeze_depth"], fields, config.get("epochs"), device, train_samples


def sitting_row(shape: str, timing, prefix_seconds: float, prefix_evidence: str | None = None) -> dict:
    """One shape of a sitting as `store_sitting` keeps it: its key, its `core.timing.StepTiming` (per-step time,
    interval, rounds, contention) and the frozen-prefix build made for it; contended too where that build met
    foreign load (`prefix_evidence`): the runs retimed from it would be charged that build."""
    evidence = timing.evidence + (f"; frozen-prefix build: {prefix_evidence}" if prefix_evidence else "")
    return {"shape": shape, "measured_at": timing.measured_at, "per_step": timing.per_step,
            "per_step_low": timing.per_step_low, "per_step_high": timing.per_step_high,
            "prefix_seconds": prefix_seconds, "repeat_seconds": list(timing.repeat_seconds),
            "rounds": len(timing.repeat_seconds), "contended": timing.contended or bool(prefix_evidence),
            "evidence": evidence}


SITTING = "timing_sitting"  # the study's user attribute that holds a stored sitting


def store_sitting(url: str, study_name: str, rows: list[dict]) -> dict:
    """Keep an `ablations.timing_passes.interleaved` sitting with the study: from then on its runs are reported
    with the times of that sitting (`retimed`, applied by `ablations.storage.load_runs`), every shape's from the
    same minutes. Only a sitting on the study's own hardware stands in for its timings."""
    import optuna

    from ablations.storage import open_storage
    if loaded := next((row for row in rows if row["contended"]), None):
        raise UsageError(f"the sitting was contended ({loaded['evidence']}): not stored; run it again on a quiet "
                         "machine")
    sitting = {"measured_at": min(r["measured_at"] for r in rows), "rounds": rows[0]["rounds"],
               "evidence": rows[0]["evidence"],
               "shapes": {r["shape"]: {k: r[k] for k in ("per_step", "per_step_low", "per_step_high",
                                                         "prefix_seconds", "repeat_seconds")} for r in rows}}
    optuna.load_study(study_name=study_name, storage=open_storage(url)).set_user_attr(SITTING, sitting)
    return sitting


def retimed(record: dict, sitting: dict) -> dict | None:
    """The record with its time from the study's stored sitting (None where the sitting has no timing of its work
    shape, or the record has no timing pass to replace): train s = its steps x the sitting's per-step time (with
    the sitting's interval) + the sitting's frozen-prefix build; each epoch's alike. The pass it replaces is kept
    under `timing.pass`."""
    timing = record.get("timing") or {}
    shape = sitting["shapes"].get(sitting_key(record["config"], record.get("device"), record.get("train_samples"),
                                              bool(record.get("compiled"))))
    if shape is None or timing.get("steps") is None:
        return None
    steps, prefix = timing["steps"], shape["prefix_seconds"]

    def seconds(per_step: float | None, n: int = steps, extra: float = prefix) -> float | None:
        return None if per_step is None or per_step != per_step else round(n * per_step + extra, 3)
    history = [dict(entry) for entry in record.get("history") or []]
    for entry in history:  # epochs of one run take equal steps; the prefix build counts in the first
        entry["train_seconds"] = seconds(shape["per_step"], steps // max(1, len(history)),
                                         prefix if entry.get("epoch") == 1 else 0.0)
    return {**record, "history": history, "train_seconds": seconds(shape["per_step"]),
            "train_seconds_lo": seconds(shape["per_step_low"]), "train_seconds_hi": seconds(shape["per_step_high"]),
            "contended": False,
            "timing": {**timing, "per_step": shape["per_step"], "per_step_low": shape["per_step_low"],
                       "per_step_high": shape["per_step_high"], "repeat_seconds": shape["repeat_seconds"],
                       "extra_seconds": prefix, "measured_at": sitting["measured_at"],
                       "sitting": len(sitting["shapes"]), "contended": False, "evidence": sitting["evidence"],
                       "pass": {"measured_at": timing.get("measured_at"), "train_seconds": record["train_seconds"],
                                "sitting": timing.get("sitting", 1)}}}

def on_axis(record: dict, sitting: dict | None) -> dict:
    """The record on its study's time axis: `retimed` from the study's stored sitting where that holds its shape,
    else as stored. What the report, the search's pruning and its replays all read a run's time from."""
    return (retimed(record, sitting) if sitting else None) or record


def time_study(url: str, study_name: str, pending: list, session, device=None, compile: bool = False,
               progress=print, copied: set[str] | None = None) -> list:
    """The grid's or the search's sitting before its first run (`core.sitting`): the shapes of the runs it is
    about to train that this machine has no timing of and, when there are any, every shape the study already holds
    runs of on this hardware, and every shape of the runs it will copy from other studies of the storage (`copied`:
    their run ids, the grid's), all timed together. Where the study held such runs (it is being extended), will
    copy some, or may copy some (`copied` None, the search's: it finds a run to copy only as it asks, so another
    study holding timed runs of a shape it is about to train counts), the sitting is stored with it
    (`store_sitting`), so its report reads every run's time, old, copied and new, from this one sitting; a
    contended sitting is not stored (one line says so) and the command goes on."""
    from ablations.storage import load_runs
    from core.config import RunConfig
    from core.device import resolve_device
    from core.model import device_name
    from core.sitting import sitting
    from core.timing import work_shape

    here = device_name(resolve_device(device))
    timed_here = [(r["study"], r["record"].get("run_id") or r["run_id"], RunConfig.from_dict(r["record"]["config"]),
                   r["record"])
                  for r in load_runs(url, retime=False)  # every study's trials, copies as their own study's
                  if r["state"] == "COMPLETE" and r["record"] and r["record"].get("device") == here
                  and (r["record"].get("timing") or {}).get("measured_at")]
    mine = [(config, record) for study, run_id, config, record in timed_here
            if study == study_name or run_id in (copied or ())]
    held = [config for config, _ in mine]
    shapes = {work_shape(c) for c in [*pending, *held]}
    copyable = copied is None and any(study != study_name and work_shape(config) in shapes
                                      for study, _, config, _ in timed_here)
    # Every shape already timed, but by different sittings (two earlier grids, one shape each): this study's
    # speed-ups would divide one sitting's time by another's, so its shapes are timed together again.
    mixed = len(axis_passes(url, study_name, [record for _, record in mine], pending, session, device, compile)) > 1
    timed = sitting([*pending, *held], session, device, compile, together=True, progress=progress, force=mixed)
    if not timed or not (held or copyable):
        return timed
    rows = [sitting_row(sitting_key(t.config.to_dict(), t.device_label, t.rows, compile), t.timing, t.prefix_seconds,
                        t.prefix_evidence) for t in timed]
    try:
        store_sitting(url, study_name, rows)
    except UsageError as error:
        progress(f"study {study_name!r} holds or copies runs of earlier timing passes; {error}")
        return timed
    if progress:
        shapes = f"its {len(rows)} shapes" if len(rows) > 1 else "its one shape"
        progress(f"study {study_name!r}: this sitting of {shapes} is stored with it; its report takes "
                 "every run's time from it, the runs stored or copied before included")
    return timed


def axis_passes(url: str, study_name: str, records: list[dict], pending: list, session, device=None,
                compile: bool = False) -> set[str]:
    """The timing passes (their `measured_at`) the study's report would read its times from, were `pending` trained
    now: each of `records` (its runs, and those it copies) from the study's stored sitting where that covers its
    shape, else from its own pass; each pending run likewise, else from the machine's saved timing of its shape (a
    shape with none is timed in the coming sitting, no pass yet)."""
    from ablations.storage import open_storage
    from core.device import resolve_device
    from core.model import device_name
    from core.timing import work_shape
    from core.train import planned_run
    storage = open_storage(url)
    held = {s.study_name: s for s in storage.get_all_studies()}.get(study_name)
    stored = held.user_attrs.get(SITTING) if held is not None else None
    found = set()
    for record in records:
        found.add(stored["measured_at"] if stored and retimed(record, stored) is not None
                  else record["timing"]["measured_at"])
    label = device_name(resolve_device(device))
    for config in {work_shape(c): c for c in pending}.values():  # configs of one work shape share its timing
        key, rows = planned_run(config, session, device, compile)
        if stored and sitting_key(config.to_dict(), label, rows, compile) in stored["shapes"]:
            found.add(stored["measured_at"])
        elif (known := session.timer.known(key)) is not None:
            found.add(known.measured_at)
    return found
