"""``lrpkit explain`` (being written)."""


def add_parser(sub) -> None:
    sub.add_parser("explain", help="(not yet available)").set_defaults(func=lambda args: 2)
