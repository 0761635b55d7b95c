"""`promptkd toy ...`: the toy world's sub-commands (pretraining its tiny CLIPs, writing its domains).

The parser lives apart from `toy.pretrain` so that building it imports neither torch nor open_clip.
"""

from __future__ import annotations

import argparse

from promptkd.toy import TOY_MODELS

PRETRAIN_DESCRIPTION = "Contrastive pretraining of the toy CLIPs on the toy world's captions."


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    from promptkd.options import add_old_spellings, positive_float, positive_int

    p.add_argument("which", choices=["teacher", "student", *TOY_MODELS])
    p.add_argument("--out", metavar="DIR", default="runs/toy-pretrain", help="output folder (weights, checkpoints, log)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--steps", type=positive_int, help="optimiser steps (reproducible)")
    g.add_argument("--minutes", type=positive_float, help="wall-clock budget; steps set from measured speed")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--eval-seconds", type=float, default=300, help="seconds between zero-shot evaluations (0: none)")
    p.add_argument("--checkpoint-seconds", type=float, default=600, help="seconds between checkpoints (0: none)")
    p.add_argument("--deadline-minutes", type=positive_float, default=None, help="stop early at this wall time")
    p.add_argument("--stop-after-steps", type=positive_int, default=None,
                   help="stop at this step of the --steps schedule (a less trained model)")
    p.add_argument("--eval-n-per-class", type=int, default=50, help="domain test images per class for evaluations")
    p.add_argument("--ship", action="store_true", help="copy the final weights into the package assets")
    add_old_spellings(p, "toy pretrain")


def run_pretrain(a) -> int:
    from promptkd.errors import PromptKDError

    if a.stop_after_steps is not None and (a.steps is None or a.stop_after_steps > a.steps):
        raise PromptKDError("--stop-after-steps needs --steps and must not exceed it")
    from promptkd.toy.pretrain import pretrain

    pretrain(a.which, a.out, seed=a.seed, minutes=a.minutes, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
             weight_decay=a.weight_decay, warmup_steps=a.warmup_steps, threads=a.threads,
             eval_every_s=a.eval_seconds, checkpoint_every_s=a.checkpoint_seconds,
             deadline_minutes=a.deadline_minutes, eval_n_per_class=a.eval_n_per_class,
             stop_after_steps=a.stop_after_steps, ship=a.ship)
    return 0


def add_domain_arguments(p: argparse.ArgumentParser) -> None:
    from promptkd.options import add_output_options, non_negative_int, positive_int

    add_output_options(p, "dir", what="toy domain (images/ and split_zhou_Toy.json)")
    p.add_argument("--n-train", type=non_negative_int, default=64, help="train images per class (default 64)")
    p.add_argument("--n-val", type=non_negative_int, default=8, help="val images per class (default 8)")
    p.add_argument("--n-test", type=non_negative_int, default=50, help="test images per class (default 50)")
    p.add_argument("--seed", type=int, default=0, help="the world's and the splits' seed")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--n-classes", type=positive_int, metavar="N",
                   help="N classes drawn from the world's words instead of the 24 demo classes")
    g.add_argument("--classes", help="comma-separated class names, e.g. 'red circle,blue striped star'")


def run_domain(a) -> int:
    from pathlib import Path

    from promptkd.errors import PromptKDError
    from promptkd.toy.world import World, custom_classnames

    split = Path(a.out) / "split_zhou_Toy.json"
    if split.exists() and not a.overwrite:
        raise PromptKDError(f"{a.out} already holds a toy domain ({split.name}); pass --overwrite to write it again")
    names = None
    if a.classes:
        names = [c.strip() for c in a.classes.split(",") if c.strip()]
    elif a.n_classes is not None:
        names = custom_classnames(a.n_classes)
    world = World(a.seed, classnames=names)
    root = world.write_domain(a.out, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test, seed=a.seed)
    print(f"{root}: {world.n_classes} classes ({world.n_base} base); use --dataset split:{split} --root {root / 'images'}")
    return 0


def register(sub) -> None:
    """`promptkd toy pretrain ...` and `promptkd toy domain ...`."""
    toy = sub.add_parser("toy", help="the embedded toy world: pretrain its tiny CLIPs, write its domains",
                         description="Tools for the offline toy world (see docs/toy-world.md).")
    toy.set_defaults(func=lambda _args: toy.print_help() or 2)
    toy_sub = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND", parser_class=type(toy))
    p = toy_sub.add_parser("pretrain", help="contrastive pretraining of toy-teacher or toy-student",
                           description=PRETRAIN_DESCRIPTION)
    add_pretrain_arguments(p)
    p.set_defaults(func=run_pretrain)
    d = toy_sub.add_parser("domain", help="write a toy domain as a CoOp-style dataset (images + split file)",
                           description="The demo's 24-class domain, or one with other classes of the same style, "
                                       "for `--dataset split:DIR/split_zhou_Toy.json --root DIR/images`.")
    add_domain_arguments(d)
    d.set_defaults(func=run_domain)


def main(argv=None) -> int:
    """`python -m promptkd.toy.commands teacher --steps N ...`: the pretraining without the promptkd CLI."""
    p = argparse.ArgumentParser(prog="promptkd toy pretrain", description=PRETRAIN_DESCRIPTION)
    add_pretrain_arguments(p)
    return run_pretrain(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
