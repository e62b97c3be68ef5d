"""``convnextv2 push``: share a trained model on the Hugging Face Hub (tools/hub_push.py)."""
from __future__ import annotations

HELP = "Upload a run's weights, configs and model card to the Hugging Face Hub (timm or HF)."
EPILOG = """examples:
  convnextv2 push runs/ft user/convnextv2-atto-flowers                 # timm layout, public
  convnextv2 push runs/ft user/convnextv2-atto-flowers --layout hf --private
  convnextv2 push runs/fcmae/encoder.safetensors user/atto-fcmae --license apache-2.0
  convnextv2 push runs/ft user/convnextv2-atto-flowers --dry-run upload/   # no network

RUN_OR_CHECKPOINT: a finetune run folder (its best weights), a pretrain run folder (its
encoder) or a weight file. The folder holds model.safetensors, config.json (timm: the
architecture, label names and pretrained_cfg; hf: transformers' ConvNextV2Config, plus
preprocessor_config.json) and README.md, a model card built from the run's summary.json
(task, data, recipe and command, metrics, parameters and GMACs, licence; for FCMAE the
reconstruction grid). Log in first with `hf auth login` or set HF_TOKEN."""


def add_arguments(p):
    from ..tools.hub_push import DEFAULT_LICENSE, LAYOUTS

    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="finetune or pretrain run folder, or a weight file")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub model id: name or namespace/name")
    p.add_argument("--layout", choices=LAYOUTS, default="timm",
                   help="timm (default): timm's names and pretrained_cfg; hf: transformers'")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--license", default=DEFAULT_LICENSE, metavar="L",
                   help=f"licence identifier for the card (default {DEFAULT_LICENSE}, that of "
                        f"the official ConvNeXt V2 weights, which runs started from them "
                        f"inherit; choose yours for a model trained from scratch)")
    p.add_argument("--dry-run", metavar="DIR",
                   help="write the exact folder that would be uploaded to DIR (new or empty) "
                        "and upload nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="let --dry-run replace an earlier push folder in DIR")


def run(args) -> int:
    import sys

    from ..tools.hub_push import PushError, push_to_hub
    from ._guard import one_line

    if args.overwrite and not args.dry_run:
        raise ValueError("--overwrite applies to --dry-run DIR; a Hub push adds a commit and "
                         "replaces nothing")
    try:
        where = push_to_hub(args.source, args.repo_id, layout=args.layout,
                            private=args.private, license=args.license, dry_run=args.dry_run,
                            overwrite=args.overwrite)
    except PushError as e:  # the network or the Hub, not the user's input: exit 1
        print(f"convnextv2 push: failed: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"wrote the upload folder to {where} (nothing uploaded)" if args.dry_run
          else f"pushed to {where}")
    return 0
