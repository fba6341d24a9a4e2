"""`qwen3-sft` / `python -m job`: run (default), preflight, eval, export, config. Maps errors to exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

from job.cards import ModelCards
from job.config.docs import explain
from job.config.schema import JobConfig, process_cfg
from job.errors import INTERRUPTED, ExitCode, exit_code_for, find_job_error, reported_code
from job.train import launch
from job.train.launch import is_worker, launched_here, write_error_record
from job.utils.redact import redact, scrub, setup_logging

log = logging.getLogger("job")
COMMANDS = ("run", "preflight", "eval", "export", "config")


# Each command imports its module (and with it torch and the training stack, 12-17 s on 2 cores) only when it runs,
# so `config`, `--help` and a mistyped setting answer within a second: the one place job/ imports its own modules
# lazily. Every command gets the process's one config, built by main() before any of them runs.
def _cmd_run(_args, cfg: JobConfig) -> int:
    nproc = cfg.train.nproc_per_node
    # A worker (of torchrun or of the launcher) never launches; otherwise count the GPUs only when the setting
    # leaves it to them (torch's import is paid by `run` anyway).
    the_plan = None if launch.is_worker(os.environ) else launch.plan(os.environ, nproc, _cuda_devices(nproc))
    if the_plan is None:
        from job.train.flow import main as train_main

        train_main(cfg)
        return ExitCode.OK
    code, failure = launch.launch(the_plan, ["run"], cfg)
    if failure is not None:  # the first failing rank's message, once, as a single process prints it
        _print_error(*failure)
    return code


def _cuda_devices(nproc_setting: int | None) -> int:
    if nproc_setting is not None:
        return 0
    import torch

    return torch.cuda.device_count()


def _cmd_preflight(_args, cfg: JobConfig) -> int:
    from job.inputs import preflight_command

    preflight_command(cfg)
    return ExitCode.OK


def _cmd_eval(_args, cfg: JobConfig) -> int:
    from job.eval.command import main as eval_main

    eval_main(cfg)
    return ExitCode.OK


def _cmd_export(_args, cfg: JobConfig) -> int:
    from job.export.command import main as export_main

    export_main(cfg)
    return ExitCode.OK


def _cmd_config(args, cfg: JobConfig) -> int:
    values = redact(cfg.model_dump(mode="json"))
    if args.explain:
        print(explain(values, ModelCards().qwen3_vl_8b_instruct), end="")
    else:
        print(json.dumps(values, indent=2, sort_keys=True))
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen3-sft", description="QLoRA SFT for Qwen3-VL-8B-Instruct, configured by SFT_* environment variables.",
        epilog="exit codes: " + ", ".join(f"{int(c)} {c.name.lower()}" for c in ExitCode),
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="preflight, pre-eval, train, post-eval, save (default)").set_defaults(fn=_cmd_run)
    sub.add_parser("preflight", help="check every data row and the config on CPU; no model weights").set_defaults(
        fn=_cmd_preflight
    )
    sub.add_parser("eval", help="evaluate the base model or an adapter on the eval split").set_defaults(fn=_cmd_eval)
    sub.add_parser("export", help="merge the adapter into the base model, verify it, write merged/").set_defaults(
        fn=_cmd_export
    )
    config = sub.add_parser("config", help="print the effective config (secrets redacted)")
    config.add_argument("--explain", action="store_true",
                        help="each SFT_* setting instead: its effective value, type, default and meaning")
    config.set_defaults(fn=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["run"])
    cfg = None
    try:
        # Before any command imports torch: a mistyped setting is exit 2 within a second, every problem at once.
        cfg = process_cfg(ModelCards().qwen3_vl_8b_instruct)
        code = int(args.fn(args, cfg))
    except KeyboardInterrupt:
        print("qwen3-sft: interrupted before a checkpoint could be saved", file=sys.stderr)
        return INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
        code = _report(exc)
    # A worker hands the launcher its real code; the process the orchestrator watches may translate it, by
    # SFT_EXIT_CODES, or `standard` when the configuration itself is what failed (its error is exit 2 either way).
    return code if is_worker(os.environ) else reported_code(code, cfg.train.exit_codes if cfg else "standard")


def _report(exc: BaseException) -> int:
    """Print the error the way its code asks (one line for 2, 3, 4 and 143; the traceback for a bug) and record it
    for torch elastic's agent. A worker of our own launcher prints nothing: the launcher prints the first failing
    rank's message once."""
    code = exit_code_for(exc)
    job_error = find_job_error(exc)
    if code in (ExitCode.USER, ExitCode.TRANSIENT, ExitCode.GATE_REFUSED, ExitCode.PREEMPTED) and job_error:
        message, detail = scrub(str(job_error)), ""  # a user can fix these: one clear message, no traceback
    else:
        message, detail = scrub(str(exc)), scrub("".join(traceback.format_exception(exc)))
    write_error_record(code, message, detail)
    if not launched_here():
        _print_error(message, detail)
    return code


def _print_error(message: str, detail: str) -> None:
    if detail:
        print(detail, file=sys.stderr)
    print(f"qwen3-sft: {'internal error' if detail else 'error'}: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
