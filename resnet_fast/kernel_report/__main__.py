"""``python -m resnet_fast.kernel_report``: the kernel report's command (see :mod:`.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
