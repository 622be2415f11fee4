"""`keras-brainformer search` (placeholder until the search lands)."""


def add_arguments(parser):
    parser.add_argument("--out", default="runs/search")


def run(args):
    raise NotImplementedError("keras-brainformer search is not implemented yet")
