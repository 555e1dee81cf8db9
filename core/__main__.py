"""`python -m core`: train one config, print a summary, write its record as JSON."""
from __future__ import annotations

import json

from core.cli import (
    ArgumentParser,
    add_cache_arguments,
    add_run_arguments,
    check_output_file,
    config_from_args,
    main_guard,
    make_session,
)


def main() -> int:
    parser = ArgumentParser(prog="python -m core", description="Fine-tune one text classifier and record the run.")
    add_run_arguments(parser)
    parser.add_argument("--output", default="run.json", help="where to write the run record (default: run.json)")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="recompute the frozen layers every step instead of caching their outputs "
                             "(default: cached)")
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile (default: off)")
    add_cache_arguments(parser)
    parser.set_defaults(model=None)  # not given: distilbert-base-uncased, or offline the packaged MiniLM
    args = parser.parse_args()
    from core.config import RunConfig
    from core.hub import checked_sources

    check_output_file(args.output)
    # a model or data folder that cannot be found is refused before torch and transformers load
    model = checked_sources(args.model, RunConfig.model, args.dataset)
    config = config_from_args(args, model=model)  # a bad setting is refused before the training code loads
    from core.device import resolve_device
    from core.record import write_record
    from core.train import run

    resolve_device(args.device)
    session = make_session(args)
    record = run(config, device=args.device, progress=not args.no_progress,
                 use_prefix_cache=not args.no_prefix_cache, compile=args.compile, session=session)
    write_record(record, args.output)
    print(record.summary())
    print(json.dumps({e["epoch"]: {"accuracy": e["accuracy"], "loss": e["loss"]} for e in record.history}))
    print(f"record written to {args.output}")
    return 0


if __name__ == "__main__":
    main_guard(main)
