"""One flag style (snake_case, kebab-case accepted for every flag) and a cheap parser (`--help` imports
no torch, diffusers, transformers or PEFT)."""

import argparse
import json
import subprocess
import sys

import pytest

from gralora_diffusion import __version__
from gralora_diffusion.cli import build_parser, main

HEAVY = ("torch", "diffusers", "transformers", "peft")


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _value(action):
    if action.choices:
        return str(list(action.choices)[0])
    return {int: "3", float: "0.5"}.get(action.type, "x")


def _base_argv(command_parser):
    """The positionals and required flags a command needs before any other flag parses."""
    argv = []
    for action in command_parser._actions:
        if not action.option_strings and action.dest != "help":
            argv.append("x")
        elif action.required:
            argv += [action.option_strings[0], _value(action)]
    return argv


def _flags():
    for name, command_parser in _commands().items():
        for action in command_parser._actions:
            if action.help is argparse.SUPPRESS or isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            for option in action.option_strings:
                yield name, command_parser, action, option


@pytest.mark.parametrize("name, command_parser, action, option",
                         [pytest.param(*f, id=f"{f[0]} {f[3]}") for f in _flags()])
def test_every_flag_parses_in_both_spellings(name, command_parser, action, option):
    assert "-" not in option[5:] if option.startswith("--no-") else "-" not in option[2:], f"{name} {option}: not snake_case"
    takes_value = action.nargs != 0
    results = []
    for spelling in (option, option[:5] + option[5:].replace("_", "-") if option.startswith("--no-") else "--" + option[2:].replace("_", "-")):
        argv = [name, *_base_argv(command_parser), spelling, *([_value(action)] if takes_value else [])]
        args = build_parser().parse_args(argv)
        results.append(getattr(args, action.dest))
        if takes_value:  # --flag=value as well
            args = build_parser().parse_args([name, *_base_argv(command_parser), f"{spelling}={_value(action)}"])
            results.append(getattr(args, action.dest))
    assert len(set(map(repr, results))) == 1, results
    assert results[0] is not None


def test_every_command_has_flags_walked():
    walked = {name for name, *_ in _flags()}
    assert walked == set(_commands())  # every sub-command has at least --num_threads or its own flags
    assert {"--svd_rank", "--output_dir", "--side_by_side", "--max_size"} <= {option for *_, option in _flags()}


def test_booleans_in_every_spelling():
    argv = ["train", "--instance_data_dir", "d"]
    for flag, expected in (("--random_flip", True), ("--random-flip", True), ("--no-random_flip", False),
                           ("--no-random-flip", False), ("--no_random_flip", False)):
        assert build_parser().parse_args(argv + [flag]).random_flip is expected, flag


def test_export_svd_rank_and_its_old_name():
    for flag in ("--svd_rank", "--svd-rank", "--rank"):
        assert build_parser().parse_args(["export-lora", "a", "b", flag, "4"]).svd_rank == 4
    shown = _commands()["export-lora"].format_help()
    assert "--svd_rank" in shown and "--rank" not in shown.replace("--svd_rank", "")


def test_help_shows_snake_case_only():
    for name, command_parser in _commands().items():
        words = [w.strip("[],") for w in command_parser.format_help().split() if w.startswith(("--", "[--"))]
        kebab = [w for w in words if "-" in w.strip("[").removeprefix("--no-").removeprefix("--")]
        assert not kebab, (name, kebab)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"gralora-diffusion {__version__}"


def test_values_that_look_like_flags_are_left_alone():
    args = build_parser().parse_args(["generate", "--prompt=--output-dir", "--output-dir", "out"])
    assert args.prompt == ["--output-dir"] and str(args.output_dir) == "out"


def _run_timed(argv):
    code = ("import resource, subprocess, sys, json\n"
            f"r = subprocess.run([sys.executable, '-m', 'gralora_diffusion.cli', *{argv!r}], capture_output=True, text=True)\n"
            "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(json.dumps([r.returncode, r.stdout, r.stderr, u.ru_utime + u.ru_stime]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)


@pytest.mark.parametrize("argv, code, text", [
    (["--help"], 0, "export-lora"),
    (["train", "--help"], 0, "--instance_data_dir"),
    (["train", "--outptu_dir", "x"], 2, "did you mean --output_dir?"),
    (["generate", "--stepz", "3"], 2, "did you mean --steps?"),
])
def test_help_and_typos_are_fast(argv, code, text):
    """Under 2 s of CPU (user + system, the child alone), whatever the machine's load."""
    rc, out, err, cpu = _run_timed(argv)
    assert rc == code and text in out + err
    assert cpu < 2.0, f"{argv}: {cpu:.2f} s of CPU"


def test_building_the_parser_imports_no_heavy_library():
    code = ("import sys\nfrom gralora_diffusion.cli import build_parser, _unknown_flags\np = build_parser()\n"
            "p.format_help()\n[c.format_help() for a in p._actions if hasattr(a, 'choices') and isinstance(a.choices, dict) "
            "for c in a.choices.values()]\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
