"""`qwen3-sft` / `python -m job`: run (default), preflight, eval, export, config. Maps errors to exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

from job.cards import ModelCards
from job.config import build_cfg
from job.errors import ExitCode, find_job_error
from job.utils.redact import redact, scrub, setup_logging

log = logging.getLogger("job")
COMMANDS = ("run", "preflight", "eval", "export", "config")


def _check_config() -> None:
    """Validate the SFT_* environment before a command imports torch and the training stack (12-17 s on 2 cores):
    a mistyped setting is exit 2 within a second. The command builds the same config again (milliseconds)."""
    build_cfg(ModelCards().qwen3_vl_8b_instruct)


# Each command imports its module (and with it torch and the training stack) only when it runs, so `config`,
# `--help` and a mistyped setting answer within a second: the one place job/ imports its own modules lazily.
def _cmd_run(_args) -> int:
    _check_config()
    from job.train.flow import main as train_main

    train_main()
    return ExitCode.OK


def _cmd_preflight(_args) -> int:
    _check_config()
    from job.preflight.run import main as preflight_main

    preflight_main()
    return ExitCode.OK


def _cmd_eval(_args) -> int:
    _check_config()
    from job.eval.command import main as eval_main

    eval_main()
    return ExitCode.OK


def _cmd_export(_args) -> int:
    _check_config()
    from job.export.command import main as export_main

    export_main()
    return ExitCode.OK


def _cmd_config(_args) -> int:
    print(json.dumps(redact(build_cfg(ModelCards().qwen3_vl_8b_instruct).model_dump(mode="json")), indent=2,
                     sort_keys=True))
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
    sub.add_parser("config", help="print the effective config (secrets redacted)").set_defaults(fn=_cmd_config)
    return parser


def exit_code_for(exc: BaseException) -> int:
    job_error = find_job_error(exc)
    return int(job_error.exit_code) if job_error is not None else int(ExitCode.INTERNAL)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["run"])
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        print("qwen3-sft: interrupted before a checkpoint could be saved", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
        code = exit_code_for(exc)
        job_error = find_job_error(exc)
        if (
            code in (ExitCode.USER, ExitCode.TRANSIENT, ExitCode.GATE_REFUSED, ExitCode.PREEMPTED)
            and job_error is not None
        ):
            # A user can fix these: one clear message, no traceback.
            print(f"qwen3-sft: error: {scrub(str(job_error))}", file=sys.stderr)
        else:
            print(scrub("".join(traceback.format_exception(exc))), file=sys.stderr)
            print(f"qwen3-sft: internal error: {scrub(str(exc))}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
