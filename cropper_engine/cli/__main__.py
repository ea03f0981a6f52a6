"""`python -m cropper_engine.cli`: the command line, as the `cropper-engine` script runs it."""

from cropper_engine.cli import run

if __name__ == "__main__":
    run()
