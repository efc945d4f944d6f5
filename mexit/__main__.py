"""The `mexit` command (and `python -m mexit`): `mexit eval` is lm-eval's command line with mexit's model
(`mexit.frontends.harness`, needing the `eval` extra), every other command mexit's own (`mexit.frontends.cli`), with
the benchmark commands of `mexit.bench` (`bench`, `ablate`, `bench-speculative`) added to it here."""

import sys

from .frontends import cli


def option_values(argv: list[str], *names: str, many: bool = False) -> list[str]:
    """The values given to an option (any of `names`) as `NAME VALUE` or `NAME=VALUE`; many: `NAME V1 V2 ...`
    (lm-eval's --model_args) joined by commas."""
    found = []
    for i, a in enumerate(argv):
        if a.startswith(tuple(f"{n}=" for n in names)):
            found.append(a.split("=", 1)[1])
        elif a in names:
            rest = argv[i + 1:]
            values = rest[: next((j for j, v in enumerate(rest) if v.startswith("-")), len(rest))]
            found.append(",".join(values if many else values[:1]))
    return found


def eval_device(argv: list[str]) -> list[str]:
    """`--device D` to put before the user's arguments (theirs win): the device named in --model_args, else none
    where a --config file names one, else mexit's default (cuda when available, else cpu; lm-eval's own default is
    cuda:0, GPU or not)."""
    import re

    from mexit.model.placement import resolve_device

    for model_args in option_values(argv, "--model_args", "-a", many=True):
        named = re.search(r"(?:^|,)\s*device=([^,]+)", model_args)
        if named:
            return ["--device", named.group(1).strip()]
    for path in option_values(argv, "--config", "-C"):
        try:
            import yaml

            if "device" in (yaml.safe_load(open(path)) or {}):
                return []
        except (OSError, ImportError, ValueError, AttributeError):  # lm-eval reports an unreadable file itself
            return []
    return ["--device", str(resolve_device(None))]


def run_eval(argv: list[str]) -> int:
    """`mexit eval ARGS`: lm-eval's `run` command line with `--model mexit` (lm-eval's own command line only finds
    models registered in its process: `mexit.frontends.harness` registers mexit's) and mexit's default device
    (`eval_device`); everything else lm-eval's."""
    given = option_values(argv, "--model", "-M")
    if any(model != "mexit" for model in given):
        print(f"error: mexit eval runs --model mexit (got --model {given[0]}); for other models run lm-eval",
              file=sys.stderr)
        return 2
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging

        from .frontends import harness  # noqa: F401  registers --model mexit
    except ImportError as err:
        print(f"error: mexit eval needs lm-eval ({err}): pip install 'mexit[eval]'", file=sys.stderr)
        return 2
    setup_logging()
    saved = sys.argv
    sys.argv = ["mexit eval", "run", *([] if given else ["--model", "mexit"]), *eval_device(argv), *argv]
    try:
        cli = HarnessCLI()
        mexit_help(cli)
        args = cli.parse_args()
        if getattr(args, "config", None) is None:  # a --config file's model_args are lm-eval's to merge
            harness.MexitLM.check_arguments(getattr(args, "model_args", None) or {})
        cli.execute(args)
    except SystemExit as done:  # --help (0) or a usage error (2, its line already printed)
        return int(done.code or 0) if isinstance(done.code, int) or done.code is None else 2
    except (ValueError, OSError, NotImplementedError, KeyError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


def mexit_help(cli) -> None:
    """lm-eval's `run` help with mexit's defaults for --model and --device (where its parser has them)."""
    import argparse

    for action in cli._parser._actions:
        if isinstance(action, argparse._SubParsersAction) and "run" in action.choices:
            for option in action.choices["run"]._actions:
                if "--model" in option.option_strings:
                    option.help = "mexit (the only model `mexit eval` runs; lm-eval runs the others)"
                elif "--device" in option.option_strings:
                    option.help = "cpu or cuda (default: cuda when available, else cpu)"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:
        return run_eval(argv[1:])
    from .bench import ablate, latency, speculative_sweep

    return cli.main(argv, commands=(latency.add_parser, ablate.add_parser, speculative_sweep.add_parser))


if __name__ == "__main__":
    sys.exit(main())
