"""Options shared by several subcommands."""


def add_v1_block_argument(group) -> None:
    group.add_argument("--v1-block", action="store_true",
                       help="ConvNeXt V1 block for ablations: no GRN, layer scale 1e-6")

