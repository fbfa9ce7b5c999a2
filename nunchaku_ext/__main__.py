"""Command line: `python -m nunchaku_ext doctor` (see nunchaku_ext/doctor.py)."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nunchaku_ext", description="ComfyUI-SVDQuant engine tools")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="check that the CUDA kernels build and compute correctly on this machine, "
                                       "and time one FLUX.1-dev linear against BF16")
    parser.parse_args(argv)
    from . import doctor

    return doctor.main()


if __name__ == "__main__":
    sys.exit(main())
