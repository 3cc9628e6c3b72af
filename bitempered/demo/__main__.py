"""``python -m bitempered.demo``: the noisy-label experiment. See ``--help`` and ``__init__.py``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

from bitempered.demo.data import Noise
from bitempered.extras import require
from bitempered.demo.mlp import DEFAULT_LOSSES, LossSpec, Recipe, TemperatureRecipe

DEFAULT_NOISES = ("0", "0.2", "0.4", "0.6", "flip:0.4")
QUICK = dict(noise_rates=("0", "0.4", "flip:0.4"), seeds=2, epochs=3, boundary_epochs=4)


def _split(values, commas: bool = False):
    """Flattens tokens that hold several values: ["0", "0.2 0.4"] -> ["0", "0.2", "0.4"]
    (with ``commas``, "0,0.2" too; a loss "t1,t2" keeps its comma)."""
    return [v for value in values for v in (value.replace(",", " ") if commas else value).split()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bitempered.demo",
        description="Noisy-label experiment on scikit-learn's 8x8 digits: cross-entropy vs the "
                    "bi-tempered logistic loss, accuracy on CLEAN test labels at the final epoch, "
                    "plus a 2-D decision-boundary picture.")
    parser.add_argument("--framework", choices=("torch", "jax"), default="torch")
    parser.add_argument("--device", default=None,
                        help="torch device string (default cpu; 'cuda' uses the Triton kernels). "
                             "With --framework jax: a JAX platform name such as 'cpu' or 'gpu'.")
    parser.add_argument("--noise-rates", nargs="+", default=None, metavar="NOISE",
                        help="training-label noise settings: a rate (symmetric noise, e.g. 0.4) or "
                             f"flip:RATE (class-flip noise). Default: {' '.join(DEFAULT_NOISES)}")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds (0..N-1): split, noise, init and batch order (default 3)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs of the digits MLP (default 60)")
    parser.add_argument("--losses", nargs="+", default=None, metavar="LOSS",
                        help="'ce' or 't1,t2' per loss (default: ce 0.8,1.2 0.5,2.0 0.2,4.0)")
    parser.add_argument("--lr", type=float, default=Recipe.lr,
                        help="Adam learning rate of the digits MLP (the same for every loss)")
    parser.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    parser.add_argument("--hidden", type=int, default=Recipe.hidden, help="hidden units of the MLP")
    parser.add_argument("--out", default="demo_results", help="output folder (default ./demo_results)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny configuration for CI (explicit flags still win)")
    parser.add_argument("--learn-temperatures", action="store_true",
                        help="also train every model with its own learnable (t1, t2), starting at (1, 1), "
                             "jointly with its weights on the training loss, clipped to t1 in [0, 1.95], "
                             "t2 in [0.2, 4]; writes learned_temperatures.md/.csv next to the fixed "
                             "losses' results (no 2-D picture)")
    parser.add_argument("--temperature-lr", type=float, default=TemperatureRecipe.lr,
                        help="Adam learning rate of the learned temperatures (with --learn-temperatures)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--boundaries-only", action="store_true", help="only the 2-D picture")
    which.add_argument("--no-boundaries", action="store_true", help="skip the 2-D picture")
    args = parser.parse_args(argv)

    quick = QUICK if args.quick else {}
    args.noise_rates = [Noise.parse(v) for v in _split(
        args.noise_rates or quick.get("noise_rates", DEFAULT_NOISES), commas=True)]
    args.seeds = args.seeds if args.seeds is not None else quick.get("seeds", 3)
    args.epochs = args.epochs if args.epochs is not None else quick.get("epochs", Recipe.epochs)
    args.losses = [LossSpec.parse(v) for v in _split(args.losses)] if args.losses else list(DEFAULT_LOSSES)
    if args.seeds < 1 or args.epochs < 1:
        parser.error("--seeds and --epochs must be >= 1")
    args.recipe = Recipe(hidden=args.hidden, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    args.boundary_epochs = quick.get("boundary_epochs")
    if args.learn_temperatures and args.boundaries_only:
        parser.error("--learn-temperatures trains the digits models: it cannot go with --boundaries-only")
    if not args.temperature_lr > 0:
        parser.error(f"--temperature-lr must be > 0, got {args.temperature_lr}")
    args.temperature_recipe = TemperatureRecipe(lr=args.temperature_lr)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for module in ("tqdm", "sklearn", "matplotlib", args.framework):  # before any work: say what is missing
        require(module, "demo" if module != args.framework else args.framework, "python -m bitempered.demo")
    from tqdm import tqdm

    from bitempered.demo import boundaries, experiment, learned_temperatures, plots, report

    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    boundary_recipe = boundaries.RECIPE
    if args.boundary_epochs is not None:
        boundary_recipe = replace(boundary_recipe, epochs=args.boundary_epochs)
    run_main = not args.boundaries_only
    run_boundaries = not (args.no_boundaries or args.learn_temperatures)
    total = ((len(args.losses) + args.learn_temperatures) * args.recipe.epochs if run_main else 0) + \
            (len(args.losses) * boundary_recipe.epochs if run_boundaries else 0)
    models = len(args.noise_rates) * args.seeds
    print(f"framework={args.framework} device={args.device or 'default'} | digits: "
          f"{len(args.noise_rates)} noise settings x {args.seeds} seeds = {models} models per loss, "
          f"{len(args.losses)} losses{' + learned temperatures' if args.learn_temperatures else ''}, "
          f"{args.recipe}", flush=True)

    written = []
    with tqdm(total=total, unit="epoch", desc="training", file=sys.stderr) as bar:
        if run_main:
            results = experiment.run(args.framework, args.noise_rates, list(range(args.seeds)),
                                     args.losses, args.recipe, device=args.device, progress=bar)
        if args.learn_temperatures:
            learned = learned_temperatures.run(args.framework, args.noise_rates, list(range(args.seeds)),
                                               args.recipe, args.temperature_recipe, device=args.device,
                                               progress=bar, fixed=results)
        if run_boundaries:
            path = os.path.join(args.out, "decision_boundaries.png")
            boundaries.plot_boundaries(args.framework, args.losses, path, device=args.device,
                                       recipe=boundary_recipe, progress=bar)
            written.append(path)
    elapsed = time.perf_counter() - start

    command = " ".join(["python -m bitempered.demo"] + list(sys.argv[1:] if argv is None else argv))
    if run_main:
        table = report.text_table(results)
        print()
        print("Clean test accuracy at the final epoch, mean ± std over "
              f"{args.seeds} seed(s) ('*' = best mean in the row):")
        print(table)
        csv_path = os.path.join(args.out, "results.csv")
        md_path = os.path.join(args.out, "results.md")
        png_path = os.path.join(args.out, "accuracy_vs_noise.png")
        report.write_csv(results, csv_path)
        images = "![accuracy vs noise](accuracy_vs_noise.png)"
        if run_boundaries:
            images += "\n\n![decision boundaries](decision_boundaries.png)"
        report.write_markdown(results, md_path, footer=(
            f"Command: `{command}`  \nFramework: {args.framework}, device: "
            f"{args.device or 'default'}; {args.recipe}; wall time {elapsed:.0f} s.\n\n{images}"))
        plots.plot_accuracy(results, png_path,
                            title=f"Digits MLP, noisy training labels ({args.framework}, "
                                  f"{args.recipe.epochs} epochs, {args.seeds} seeds)")
        written = [png_path, md_path, csv_path] + written
    if args.learn_temperatures:
        written = _report_learned(learned, args, command, elapsed) + written
    print(f"\nwrote {', '.join(written)} in {time.perf_counter() - start:.0f} s")
    return 0


def _report_learned(learned, args, command: str, elapsed: float) -> list:
    """Prints the learned-temperature table and writes its Markdown and CSV; returns their paths."""
    from bitempered.demo import learned_temperatures

    print()
    print(f"Learned temperatures at the final epoch, then clean test accuracy (learned, then each "
          f"fixed loss), mean ± std over {args.seeds} seed(s) ('*' = best mean accuracy in the row):")
    print(learned_temperatures.text_table(learned))
    print()
    print(learned_temperatures.trajectory_summary(learned))
    print()
    print(learned_temperatures.explanation(learned))
    md_path = os.path.join(args.out, "learned_temperatures.md")
    csv_path = os.path.join(args.out, "learned_temperatures.csv")
    learned_temperatures.write_csv(learned, csv_path)
    learned_temperatures.write_markdown(learned, md_path, footer=(
        f"Command: `{command}`  \nFramework: {args.framework}, device: {args.device or 'default'}; "
        f"{args.recipe}; {args.temperature_recipe}; wall time {elapsed:.0f} s."))
    return [md_path, csv_path]


if __name__ == "__main__":
    sys.exit(main())
