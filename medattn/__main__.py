"""``python -m medattn`` == the ``medattn`` console command (also under ``torchrun -m medattn``)."""
import sys

from medattn.cli import main

if __name__ == "__main__":
    sys.exit(main())
