"""``biasedit bench``: quality, speed, memory and size figures, as JSON and a short table.

    biasedit bench [--model testbed] [--sections speed,solve,forward,memory,size,quality] [--out bench]
                   [--dtypes fp32,bf16] [--throughput-limit 10] [--throughput-repeats 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from biasedit_peft.cli._common import (
    add_model_argument,
    add_preset_argument,
    add_resume_arguments,
    add_runtime_arguments,
    copy_file,
    split_list,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from biasedit_peft.workflows.bench import SECTIONS, SPEED_DTYPES

    parser = subparsers.add_parser(
        "bench",
        help="measure quality (with ablations), speed, memory and adapter size",
        description="Benchmarks anyone can rerun. Sections: quality (the demo and its ablations: paper loss, "
        "no retention loss, first vs last blocks), speed (the speed goals in each of --dtypes, measured "
        "interleaved: scoring tokens/s on a sample of the evaluate --benchmark all workload and the whole "
        "workload's time extrapolated from its exact token count, seconds per meta-step, bf16 vs fp32 speed-up "
        "and decision agreement, each against the compute bound of the measured matmul rate), solve (joint delta for "
        "128 / 1024 samples, primal vs dual), forward (adapter overhead), memory (peak RSS), size (dense vs "
        "factored vs LoRA). Writes OUT/bench.json after every section.",
    )
    add_model_argument(parser, default="testbed")
    add_preset_argument(parser)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated of {','.join(SECTIONS)}")
    parser.add_argument("--out", default="bench", help="output folder (default ./bench)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write bench.json here")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up (default 5)")
    parser.add_argument("--n-edits", type=int, default=32, help="samples per meta-step in the speed section")
    parser.add_argument("--dtypes", default="fp32,bf16",
                        help=f"LM dtypes of the speed section, of {','.join(SPEED_DTYPES)} (default fp32,bf16; "
                        "the editor stays float32)")
    parser.add_argument("--throughput-limit", type=int, default=10,
                        help="speed section's scoring sample: first N StereoSet test items and CrowS-Pairs pairs per "
                        "bias type and N perplexity paragraphs (default 10, ~300 sentences)")
    parser.add_argument("--throughput-repeats", type=int, default=2,
                        help="timed rounds over the scoring sample, each dtype once per round (default 2)")
    parser.add_argument("--score-batch-size", type=int, default=32,
                        help="sentences per forward pass when scoring (default 32, as biasedit evaluate)")
    parser.add_argument("--matmul-size", type=int, default=2048,
                        help="side of the square matmul that measures the FLOP rate of the compute bound "
                        "(default 2048)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sentence pairs per LM forward pass (default: the preset's)")
    parser.add_argument("--forward-repeats", type=int, default=20,
                        help="round-robin rounds of the forward section (default 20)")
    parser.add_argument("--solve-sizes", default="128,1024", help="samples per joint delta (solve section)")
    parser.add_argument("--max-system", type=int, default=8192,
                        help="skip timing ridge systems larger than N x N (default 8192)")
    parser.add_argument("--lora-ranks", default="1,4,16,64", help="LoRA export ranks (size section)")
    parser.add_argument("--quality-steps", type=int, default=150, help="meta-training steps per quality variant")
    parser.add_argument("--limit", type=int, default=None,
                        help="first N items per bias type in the quality, size and memory sections (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    add_resume_arguments(parser, "continue an interrupted bench (or extend the one in --out): complete sections "
                         "are kept, the quality variants' demos resumed")
    add_runtime_arguments(parser, dtype=False)
    return parser


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values


def run(args: argparse.Namespace) -> int:
    import biasedit_peft  # noqa: F401
    from biasedit_peft._io import check_resumable_output_folder, resumable_folder_in_place, run_folder
    from biasedit_peft.workflows import bench

    try:
        out_dir = check_resumable_output_folder(args.out, [args.model], resume=args.resume, overwrite=args.overwrite)
        config = bench.BenchConfig(
            model=args.model, out=args.out, preset=args.preset, sections=tuple(split_list(args.sections) or ()),
            repeats=args.repeats,
            n_edits=args.n_edits, batch_size=args.batch_size, dtypes=tuple(split_list(args.dtypes) or ()),
            throughput_limit=args.throughput_limit, throughput_repeats=args.throughput_repeats,
            score_batch_size=args.score_batch_size, matmul_size=args.matmul_size,
            forward_repeats=args.forward_repeats, solve_sizes=_ints(args.solve_sizes, "--solve-sizes"),
            max_system=args.max_system, lora_ranks=_ints(args.lora_ranks, "--lora-ranks"),
            quality_steps=args.quality_steps,
            limit=args.limit, seed=args.seed, device=args.device, progress=not args.quiet,
        )
        with resumable_folder_in_place(out_dir, resume=args.resume) as work:  # the old bench or the whole new one
            results = bench.run_bench(config, folder=work, resume=args.resume)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the sections so far are in {run_folder(args.out)}; rerun the same command with "
              "--resume to continue", file=sys.stderr)
        return 130
    print(bench.format_bench(results))
    out = Path(args.out) / "bench.json"
    print(f"\nwrote {out}")
    if args.json_path:
        copy_file(out, args.json_path)
        print(f"wrote {args.json_path}")
    return 0
