"""``python -m app``: same as ``defect-serve``."""

from app.cli import main

main()
