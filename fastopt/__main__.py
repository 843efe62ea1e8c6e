"""`python -m fastopt`: what was built and what runs here (build_info()), for bug reports."""
from __future__ import annotations

import fastopt


def main() -> None:
    try:
        info = fastopt.build_info()
    except ImportError as e:      # still worth pasting: which version, and why
        raise SystemExit(f"fastopt {fastopt.__version__}: {e}") from None
    width = max(map(len, info))
    for key, value in info.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value)) or "none"
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
