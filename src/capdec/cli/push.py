"""``capdec push``: upload a checkpoint to the Hugging Face Hub, with its model card."""

from __future__ import annotations

import argparse
import logging

HELP = "upload a checkpoint to the Hugging Face Hub (with a generated model card)"
DESCRIPTION = (
    "Upload the checkpoint directory CHECKPOINT to the Hugging Face Hub model repo REPO (owner/name; created "
    "if it does not exist). The model card (CHECKPOINT/README.md) is rewritten first, with the repo id and "
    "--license; a README.md you wrote yourself (without capdec's marker line) is uploaded as it is. The "
    "training state (training/: optimizer moments) is left out unless --include-training-state. Uses your "
    "Hugging Face login (hf auth login, or HF_TOKEN) unless --token is given. Others then use it as "
    "'capdec caption REPO photos/', 'capdec serve REPO' or Captioner.from_pretrained('REPO')."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory (from capdec train)")
    parser.add_argument("repo", metavar="REPO", help="Hub model repo id, owner/name")
    parser.add_argument("--license", metavar="ID",
                        help="licence identifier for the card's front matter (mit, apache-2.0, cc-by-4.0, other...); "
                             "default: the one recorded, else 'unknown'")
    parser.add_argument("--revision", metavar="BRANCH", help="push to this branch (created from main if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", metavar="TOKEN", help="Hub token (default: your saved login or HF_TOKEN)")
    parser.add_argument("--message", metavar="TEXT", help="commit message")
    parser.add_argument("--include-training-state", action="store_true",
                        help="also upload training/ (optimizer state), so others can resume the training")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the model card and list the files that would be uploaded; upload nothing")


def run(args: argparse.Namespace) -> int:
    from capdec.hub import push_checkpoint

    log = logging.getLogger("capdec.hub")
    result = push_checkpoint(args.checkpoint, args.repo, revision=args.revision, private=args.private,
                             token=args.token, commit_message=args.message, license=args.license,
                             include_training_state=args.include_training_state, dry_run=args.dry_run)
    if args.dry_run:
        log.info("would upload %d file(s) of %s to %s:", len(result), args.checkpoint, args.repo)
        for name in result:
            print(name)
    else:
        log.info("pushed %s to %s: %s", args.checkpoint, args.repo, result)
    return 0
