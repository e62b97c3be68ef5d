"""``convnextv2 shards``: write WebDataset tar shards for ``--data`` (docs/data_pipeline.md)."""
from __future__ import annotations

HELP = "Write WebDataset tar shards from an ImageFolder tree, an image folder or 'builtin'."
EPILOG = """examples:
  convnextv2 shards /data/imagenet /data/in1k-shards --shard-size 1000
      # /data/imagenet/{train,val}/<class>/<image> -> /data/in1k-shards/{train,val}/*.tar
  convnextv2 shards ./photos ./photo-shards --shard-size 500   # plain folder: images only
  convnextv2 shards builtin ./fmnist-shards --shard-size 2000
  convnextv2 pretrain --data ./photo-shards ...               # a folder of .tar files
  convnextv2 pretrain --data './photo-shards/shards-{000000..000009}.tar' ...
  torchrun --nproc_per_node 2 -m convnextv2 finetune --data /data/in1k-shards ...

Each sample: KEY.<ext> (the image file's bytes), KEY.cls (class index) and KEY.class.txt
(class name); shards.json beside the shards lists each shard's sample count. Samples are
permuted by --seed (classes mixed within a shard), so the same input gives the same shards.
OUT must be new or empty (--overwrite moves an old one to OUT.old-<time>); the shards appear
only when all are written."""


def add_arguments(p):
    p.add_argument("source", metavar="SRC",
                   help="ImageFolder tree (train/ and val/ give OUT/train and OUT/val), "
                        "class-folder root, plain image folder, a train.csv/.tsv list of "
                        "path,label rows (val.csv beside it gives OUT/val), IDX folder or "
                        "'builtin'")
    p.add_argument("output", metavar="OUT", help="folder to create for the shards")
    p.add_argument("--shard-size", type=int, required=True, metavar="N",
                   help="samples per shard (the last one may hold fewer); pick N so that the "
                        "shards outnumber processes x workers, e.g. 1000 (about 100 MB of "
                        "ImageNet JPEGs)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sample order across the shards (default 0)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="keep the source's order (class by class) instead")
    p.add_argument("--overwrite", action="store_true",
                   help="OUT holds files: move them aside to OUT.old-<time> and write anew")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")


def run(args) -> int:
    from ..tools.shard_writer import write_shards

    written = write_shards(args.source, args.output, args.shard_size, seed=args.seed,
                           shuffle=args.shuffle, overwrite=args.overwrite,
                           progress=args.progress)
    for sub, index in written.items():
        shards = index["shards"]
        folder = f"{args.output}/{sub}" if sub != "." else args.output
        last = len(shards) - 1
        pattern = (f"{folder}/{index['split']}-{{000000..{last:06d}}}.tar" if last
                   else f"{folder}/{shards[0]['name']}")
        print(f"{index['samples']} samples, {len(index['classes'])} classes -> {len(shards)} "
              f"shard(s): {pattern}")
    return 0
