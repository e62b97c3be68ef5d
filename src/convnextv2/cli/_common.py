"""Options shared by several subcommands."""

V1_BLOCK = dict(use_grn=False, layer_scale_init_value=1e-6)


def add_v1_block_argument(group) -> None:
    group.add_argument("--v1-block", action="store_true",
                       help="ConvNeXt V1 block for ablations: no GRN, layer scale 1e-6")


def block_kwargs(v1_block: bool) -> dict:
    """Constructor overrides for the block type (empty for the default V2 block)."""
    return dict(V1_BLOCK) if v1_block else {}
